//! Scoring a plan on a trace (use a held-out trace, not the one solved on): per
//! layer max and mean GPU token load, crossing transitions between consecutive
//! layers (intra- vs inter-node), worst directed pair traffic / bandwidth, expert
//! copies and bytes per GPU, and the load lower bound.

use crate::cluster::Cluster;
use crate::cost::{gpu_load, pair_traffic, Layers};
use crate::stats::Stats;
use serde::Serialize;

/// Figures of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerScore {
    /// Token load of each GPU.
    pub load: Vec<f64>,
    /// Largest GPU load.
    pub max: f64,
    /// Mean GPU load.
    pub mean: f64,
    /// Lower bound on the largest load for this plan's replica counts:
    /// `max(mean, max_e T[e] / replicas[e])`.
    pub lower_bound: f64,
}

/// Figures of one transition (layer `l` to `l + 1`).
#[derive(Clone, Debug, Serialize)]
pub struct TransitionScore {
    /// All (expert, expert) transitions.
    pub total: f64,
    /// Transitions between different GPUs.
    pub cross: f64,
    /// ... of which between GPUs of one node.
    pub intra_node: f64,
    /// ... of which between nodes.
    pub inter_node: f64,
    /// Worst directed GPU pair: tokens / (GB/s).
    pub worst_pair_per_bw: f64,
}

/// A plan's score on a trace.
#[derive(Clone, Debug, Serialize)]
pub struct PlanScore {
    /// Per layer.
    pub layers: Vec<LayerScore>,
    /// Per transition.
    pub transitions: Vec<TransitionScore>,
    /// Expert copies per GPU (all layers).
    pub experts_per_gpu: Vec<usize>,
    /// Bytes of experts per GPU, when the expert size is known.
    pub bytes_per_gpu: Option<Vec<u64>>,
}

impl PlanScore {
    /// Mean over layers of max/mean load.
    pub fn mean_imbalance(&self) -> f64 {
        self.layers.iter().map(|l| l.max / l.mean.max(1e-12)).sum::<f64>() / self.layers.len().max(1) as f64
    }

    /// Worst layer's max/mean load.
    pub fn worst_imbalance(&self) -> f64 {
        self.layers.iter().map(|l| l.max / l.mean.max(1e-12)).fold(0.0, f64::max)
    }

    /// Mean over layers of the lower bound on max/mean.
    pub fn bound_imbalance(&self) -> f64 {
        self.layers.iter().map(|l| l.lower_bound / l.mean.max(1e-12)).sum::<f64>() / self.layers.len().max(1) as f64
    }

    fn sum(&self, f: impl Fn(&TransitionScore) -> f64) -> f64 {
        self.transitions.iter().map(f).sum()
    }
}

/// Scores `layers` (a validated plan's layers) on `stats`.
pub fn score(stats: &Stats, cluster: &Cluster, layers: &Layers) -> PlanScore {
    let g = cluster.num_gpus();
    let per_layer = (0..stats.layers)
        .map(|l| {
            let load = gpu_load(stats, layers, l, g);
            let mean = stats.layer_total(l) / g as f64;
            let hottest =
                layers[l].iter().enumerate().map(|(e, r)| stats.load[l][e] / r.len() as f64).fold(0.0, f64::max);
            LayerScore { max: load.iter().copied().fold(0.0, f64::max), mean, lower_bound: mean.max(hottest), load }
        })
        .collect();
    let transitions = (0..stats.layers.saturating_sub(1))
        .map(|l| {
            let m = pair_traffic(stats, layers, l, g);
            let mut t = TransitionScore {
                total: m.iter().sum(),
                cross: 0.0,
                intra_node: 0.0,
                inter_node: 0.0,
                worst_pair_per_bw: 0.0,
            };
            for i in 0..g {
                for j in (0..g).filter(|&j| j != i) {
                    let v = m[i * g + j];
                    t.cross += v;
                    if cluster.node_of(i) == cluster.node_of(j) {
                        t.intra_node += v;
                    } else {
                        t.inter_node += v;
                    }
                    t.worst_pair_per_bw = t.worst_pair_per_bw.max(v / cluster.bandwidth(i, j));
                }
            }
            t
        })
        .collect();
    let mut experts_per_gpu = vec![0; g];
    for gpu in layers.iter().flatten().flatten() {
        experts_per_gpu[*gpu as usize] += 1;
    }
    let bytes_per_gpu = cluster.expert_bytes().map(|b| experts_per_gpu.iter().map(|&n| n as u64 * b).collect());
    PlanScore { layers: per_layer, transitions, experts_per_gpu, bytes_per_gpu }
}

/// Side-by-side Markdown table of several plans' scores.
pub fn table(rows: &[(String, PlanScore)]) -> String {
    let mut out = String::from(
        "| plan | max/mean load (mean over layers) | worst layer | bound | cross-GPU transitions | % of all | \
         intra-node | inter-node | sum of worst pair / bw | experts per GPU |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, s) in rows {
        let total = s.sum(|t| t.total).max(1e-12);
        let cross = s.sum(|t| t.cross);
        let (lo, hi) = (
            s.experts_per_gpu.iter().min().copied().unwrap_or(0),
            s.experts_per_gpu.iter().max().copied().unwrap_or(0),
        );
        let bytes = s
            .bytes_per_gpu
            .as_ref()
            .map(|b| format!(" ({:.2} GB max)", *b.iter().max().unwrap_or(&0) as f64 / 1e9))
            .unwrap_or_default();
        out.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1}% | {:.0} | {:.0} | {:.3} | {lo}-{hi}{bytes} |\n",
            s.mean_imbalance(),
            s.worst_imbalance(),
            s.bound_imbalance(),
            cross,
            100.0 * cross / total,
            s.sum(|t| t.intra_node),
            s.sum(|t| t.inter_node),
            s.sum(|t| t.worst_pair_per_bw),
        ));
    }
    out
}

/// Per-layer detail of one plan (Markdown).
pub fn per_layer(name: &str, s: &PlanScore) -> String {
    let mut out = format!(
        "\n{name}: per layer\n\n| layer | max/mean | bound | cross to next | inter-node | worst pair / bw |\n|---|---|---|---|---|---|\n"
    );
    for (l, ls) in s.layers.iter().enumerate() {
        let t = s.transitions.get(l);
        out.push_str(&format!(
            "| {l} | {:.3} | {:.3} | {} | {} | {} |\n",
            ls.max / ls.mean.max(1e-12),
            ls.lower_bound / ls.mean.max(1e-12),
            t.map_or("-".into(), |t| format!("{:.0}", t.cross)),
            t.map_or("-".into(), |t| format!("{:.0}", t.inter_node)),
            t.map_or("-".into(), |t| format!("{:.3}", t.worst_pair_per_bw)),
        ));
    }
    out
}

//! The joint formulation for small instances: load balance and inter-layer traffic
//! in one MILP over every (layer, expert, GPU).
//!
//! Objective (units: tokens per GB/s):
//! `load_weight * sum_l sum_g |load(l, g) - mean_l| / fastest_bw + sum_l cost_l`, where
//! `cost_l` is the transition cost of [`crate::cost::transition_cost`] (worst directed
//! pair traffic / bandwidth + `mean_weight` x mean). Constraints: each expert on one
//! GPU, group sizes per layer within a [`SizeRange`], each GPU's total over layers
//! at most `ceil(L E / G)` (memory balance) and within its memory.
//!
//! Traffic is linearised per source expert: `q[l][e][i][j] >= sum_f R[l][e][f] x[l+1][f][j]
//! - M_e (1 - x[l][e][i])`, `q >= 0`, so `traffic(i, j) = sum_e q[l][e][i][j]` at an optimum.
//! With uniform links, expert `i` (by decreasing load) of the first layer may only
//! sit on GPUs `0..=i` (symmetry breaking).

use crate::cluster::Cluster;
use crate::cost::{self, Single};
use crate::error::{PlaceError, Result};
use crate::milp::{Milp, MilpLimits, MilpSolution, Var};
use crate::stage1::SizeRange;
use crate::stats::Stats;
use good_lp::{constraint, Expression};

/// Weights of the joint objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JointWeights {
    /// Weight of the load-deviation term.
    pub load_weight: f64,
    /// Weight of the mean-pair term within each transition's cost.
    pub mean_weight: f64,
}

/// Joint objective of a one-GPU-per-expert placement (what the MILP minimises).
pub fn joint_cost(stats: &Stats, cluster: &Cluster, gpu: &Single, w: JointWeights) -> f64 {
    let layers = cost::to_layers(gpu);
    let g = cluster.num_gpus();
    let fastest = cluster.intra_node_gbps.max(cluster.inter_node_gbps);
    let dev: f64 = (0..stats.layers).map(|l| cost::deviation(&cost::gpu_load(stats, &layers, l, g))).sum();
    let traffic: f64 = (0..stats.layers.saturating_sub(1))
        .map(|l| cost::transition_cost(&cost::pair_traffic(stats, &layers, l, g), cluster, w.mean_weight))
        .sum();
    w.load_weight * dev / fastest + traffic
}

/// The joint MILP's answer.
pub struct JointOutput {
    /// `gpu[l][e]`.
    pub gpu: Single,
    /// Joint objective of `gpu`.
    pub objective: f64,
    /// Proven lower bound.
    pub bound: f64,
    /// `optimal`, `gap_limit` or `time_limit`.
    pub status: &'static str,
}

/// Solves the joint MILP warm-started from `start`.
pub fn solve(
    stats: &Stats,
    cluster: &Cluster,
    (sizes, w): (SizeRange, JointWeights),
    start: &Single,
    limits: &MilpLimits,
) -> Result<JointOutput> {
    let (layers, experts, g) = (stats.layers, stats.experts, cluster.num_gpus());
    let fastest = cluster.intra_node_gbps.max(cluster.inter_node_gbps);
    let mem = (layers * experts).div_ceil(g).min(cluster.max_experts_per_gpu());
    if mem * g < layers * experts {
        return Err(PlaceError::Input(format!("{} expert copies do not fit {g} GPUs of {mem}", layers * experts)));
    }
    let mut m = Milp::new();
    let mut order: Vec<usize> = (0..experts).collect();
    order.sort_by(|&a, &b| stats.load[0][b].total_cmp(&stats.load[0][a]).then(a.cmp(&b)));
    let mut rank = vec![0; experts];
    for (i, &e) in order.iter().enumerate() {
        rank[e] = i;
    }
    let symmetric = cluster.is_uniform();
    let x: Vec<Vec<Vec<Var>>> = (0..layers)
        .map(|l| (0..experts).map(|e| (0..g).map(|q| m.binary(start[l][e] == q)).collect()).collect())
        .collect();
    let mut objective = Expression::from(0.0);
    for l in 0..layers {
        let mean = stats.layer_total(l) / g as f64;
        for e in 0..experts {
            let one: Expression = x[l][e].iter().map(|v| v.v).sum();
            m.constrain(constraint!(one == 1.0));
            if symmetric && l == 0 {
                for v in x[l][e].iter().skip(rank[e] + 1) {
                    m.constrain(constraint!(v.v == 0.0));
                }
            }
        }
        let layer_x = &x[l];
        for q in 0..g {
            let size: Expression = layer_x.iter().map(|row| row[q].v).sum();
            m.constrain(constraint!(size.clone() >= sizes.lo as f64));
            m.constrain(constraint!(size <= sizes.hi as f64));
            let load: Expression = layer_x.iter().zip(&stats.load[l]).map(|(row, &t)| t * row[q].v).sum();
            let start_load: f64 = (0..experts).filter(|&e| start[l][e] == q).map(|e| stats.load[l][e]).sum();
            let d = m.nonneg((start_load - mean).abs());
            m.constrain(constraint!(d.v >= load.clone() - mean));
            m.constrain(constraint!(d.v >= mean - load));
            objective += (w.load_weight / fastest) * d.v;
        }
    }
    for q in 0..g {
        let total: Expression = x.iter().flatten().map(|row| row[q].v).sum();
        m.constrain(constraint!(total <= mem as f64));
    }
    let pairs = (g * (g - 1)).max(1) as f64;
    for l in 0..layers.saturating_sub(1) {
        let z = m.nonneg(0.0);
        let mut pair_sum = vec![Expression::from(0.0); g * g];
        let mut pair_start = vec![0.0; g * g];
        for e in 0..experts {
            let big: f64 = (0..experts).map(|f| stats.r(l, e, f)).sum();
            if big == 0.0 {
                continue;
            }
            for i in 0..g {
                for j in (0..g).filter(|&j| j != i) {
                    let q_start = if start[l][e] == i {
                        (0..experts).filter(|&f| start[l + 1][f] == j).map(|f| stats.r(l, e, f)).sum()
                    } else {
                        0.0
                    };
                    pair_start[i * g + j] += q_start / cluster.bandwidth(i, j);
                    let q = m.nonneg(q_start);
                    let inflow: Expression = (0..experts).map(|f| stats.r(l, e, f) * x[l + 1][f][j].v).sum();
                    m.constrain(constraint!(q.v >= inflow - big + big * x[l][e][i].v));
                    pair_sum[i * g + j] += q.v;
                }
            }
        }
        for i in 0..g {
            for j in (0..g).filter(|&j| j != i) {
                let t = pair_sum[i * g + j].clone() * (1.0 / cluster.bandwidth(i, j));
                objective += t.clone() * (w.mean_weight / pairs);
                m.constrain(constraint!(z.v >= t));
            }
        }
        m.set_start(z, pair_start.iter().copied().fold(0.0, f64::max));
        objective += z.v;
    }
    eprintln!("  joint MILP: {} variables", m.num_vars());
    let sol: MilpSolution = m.minimise(objective, limits)?;
    let gpu: Single = x
        .iter()
        .map(|layer| layer.iter().map(|row| row.iter().position(|v| sol.is_set(*v)).unwrap_or(0)).collect())
        .collect();
    let objective = joint_cost(stats, cluster, &gpu, w);
    let start_cost = joint_cost(stats, cluster, start, w);
    let (gpu, objective) = if objective <= start_cost + 1e-12 { (gpu, objective) } else { (start.clone(), start_cost) };
    let status = match sol.status {
        crate::milp::MilpStatus::Optimal => "optimal",
        s => s.as_str(),
    };
    Ok(JointOutput { gpu, objective, bound: sol.bound.min(objective), status })
}

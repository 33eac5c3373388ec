//! Affinity local search for instances too large for the ILPs: swap two experts of
//! one layer between GPUs when that lowers the bandwidth-weighted number of
//! transitions crossing GPUs, never raising any layer's maximum GPU load above a
//! per-GPU cap and never changing how many experts a GPU holds (so memory stays as it was).
//!
//! Cost of a transition between GPUs `i != j`: `fastest_bw / bw(i, j)` per token
//! (1 inside a node, more across nodes). Deterministic: experts and layers are
//! visited in index order and ties keep the lower index.

use crate::cluster::Cluster;
use crate::cost::Single;
use crate::stats::Stats;

/// Result of the search.
#[derive(Clone, Debug)]
pub struct SearchOutcome {
    /// Weighted crossing transitions before.
    pub before: f64,
    /// Weighted crossing transitions after.
    pub after: f64,
    /// Swaps applied.
    pub swaps: usize,
}

struct Weights {
    intra: f64,
    inter: f64,
    gpn: usize,
    nodes: usize,
}

/// Weighted crossing transitions of a placement.
pub fn weighted_crossings(stats: &Stats, cluster: &Cluster, gpu: &Single) -> f64 {
    let w = weights(cluster);
    let mut total = 0.0;
    for l in 0..stats.layers.saturating_sub(1) {
        for e in 0..stats.experts {
            for f in 0..stats.experts {
                let (i, j) = (gpu[l][e], gpu[l + 1][f]);
                if i != j {
                    let c = if i / w.gpn == j / w.gpn { w.intra } else { w.inter };
                    total += c * stats.r(l, e, f);
                }
            }
        }
    }
    total
}

fn weights(cluster: &Cluster) -> Weights {
    let fastest = cluster.intra_node_gbps.max(cluster.inter_node_gbps);
    Weights {
        intra: fastest / cluster.intra_node_gbps,
        inter: fastest / cluster.inter_node_gbps,
        gpn: cluster.gpus_per_node,
        nodes: cluster.nodes,
    }
}

/// Improves `gpu` in place. `cap[l][g]`: the largest load allowed on GPU `g` at layer `l`;
/// `max_rounds` bounds the passes over all layers.
pub fn improve(
    stats: &Stats,
    cluster: &Cluster,
    gpu: &mut Single,
    cap: &[Vec<f64>],
    max_rounds: usize,
) -> SearchOutcome {
    let (layers, experts, g) = (stats.layers, stats.experts, cluster.num_gpus());
    let w = weights(cluster);
    // n[l][e * g + i]: transitions between expert e at layer l and experts on GPU i at l +- 1
    let mut n = vec![vec![0.0; experts * g]; layers];
    let mut node_n = vec![vec![0.0; experts * w.nodes]; layers];
    for l in 0..layers.saturating_sub(1) {
        for e in 0..experts {
            for f in 0..experts {
                let r = stats.r(l, e, f);
                if r != 0.0 {
                    n[l][e * g + gpu[l + 1][f]] += r;
                    n[l + 1][f * g + gpu[l][e]] += r;
                    node_n[l][e * w.nodes + gpu[l + 1][f] / w.gpn] += r;
                    node_n[l + 1][f * w.nodes + gpu[l][e] / w.gpn] += r;
                }
            }
        }
    }
    let total: Vec<Vec<f64>> =
        n.iter().map(|nl| (0..experts).map(|e| nl[e * g..(e + 1) * g].iter().sum()).collect()).collect();
    // cost of expert e of layer l sitting on GPU q
    let cost = |n: &[Vec<f64>], node_n: &[Vec<f64>], l: usize, e: usize, q: usize| {
        let same_node = node_n[l][e * w.nodes + q / w.gpn];
        w.intra * (same_node - n[l][e * g + q]) + w.inter * (total[l][e] - same_node)
    };
    let before = weighted_crossings(stats, cluster, gpu);
    let mut swaps = 0;
    for _round in 0..max_rounds {
        let mut improved = 0.0;
        for l in 0..layers {
            let mut load = vec![0.0; g];
            for e in 0..experts {
                load[gpu[l][e]] += stats.load[l][e];
            }
            for e1 in 0..experts {
                let g1 = gpu[l][e1];
                let mut best: Option<(f64, usize)> = None;
                for (e2, &g2) in gpu[l].iter().enumerate() {
                    if g2 == g1 {
                        continue;
                    }
                    let d = stats.load[l][e2] - stats.load[l][e1];
                    if (d > 0.0 && load[g1] + d > cap[l][g1] + 1e-9) || (d < 0.0 && load[g2] - d > cap[l][g2] + 1e-9) {
                        continue;
                    }
                    let delta = cost(&n, &node_n, l, e1, g2) - cost(&n, &node_n, l, e1, g1)
                        + cost(&n, &node_n, l, e2, g1)
                        - cost(&n, &node_n, l, e2, g2);
                    if delta < -1e-9 && best.is_none_or(|(b, _)| delta < b) {
                        best = Some((delta, e2));
                    }
                }
                if let Some((delta, e2)) = best {
                    let g2 = gpu[l][e2];
                    let d = stats.load[l][e2] - stats.load[l][e1];
                    load[g1] += d;
                    load[g2] -= d;
                    for (e, from, to) in [(e1, g1, g2), (e2, g2, g1)] {
                        gpu[l][e] = to;
                        shift(stats, &mut n, &mut node_n, (l, e, from, to), (g, w.nodes, w.gpn));
                    }
                    improved -= delta;
                    swaps += 1;
                }
            }
        }
        if improved <= 1e-6 * before.max(1.0) {
            break;
        }
    }
    SearchOutcome { before, after: weighted_crossings(stats, cluster, gpu), swaps }
}

/// Updates the neighbour tables after expert `e` of layer `l` moved `from -> to`.
fn shift(
    stats: &Stats,
    n: &mut [Vec<f64>],
    node_n: &mut [Vec<f64>],
    (l, e, from, to): (usize, usize, usize, usize),
    (g, nodes, gpn): (usize, usize, usize),
) {
    let experts = stats.experts;
    let mut update = |k: usize, f: usize, r: f64| {
        n[k][f * g + from] -= r;
        n[k][f * g + to] += r;
        node_n[k][f * nodes + from / gpn] -= r;
        node_n[k][f * nodes + to / gpn] += r;
    };
    if l > 0 {
        for a in 0..experts {
            update(l - 1, a, stats.r(l - 1, a, e));
        }
    }
    if l + 1 < stats.layers {
        for f in 0..experts {
            update(l + 1, f, stats.r(l, e, f));
        }
    }
}

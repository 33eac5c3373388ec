//! Expert-level re-placement of one layer with its neighbours fixed, as a MILP
//! (a generalised assignment problem): with layers `l - 1` and `l + 1` fixed, the
//! bandwidth-weighted crossing transitions of layer `l` are linear in
//! `y[e][g]` (expert `e` on GPU `g`):
//! `min sum_{e,g} C[e][g] y[e][g]`, `C[e][g] = sum_i N[e][i] w(i, g)`, where `N[e][i]` counts
//! transitions between `e` and the neighbours' experts on GPU `i` and `w` is the link
//! weight of [`crate::local_search`]; each expert on one GPU, each GPU keeps its
//! expert count (memory unchanged) and its load under its cap. Sweeping the
//! layers repeatedly is a large-neighbourhood search warm-started from the current
//! plan; every accepted step is no worse, so the plan only improves.

use crate::cluster::Cluster;
use crate::cost::Single;
use crate::error::Result;
use crate::local_search::weighted_crossings;
use crate::milp::{Milp, MilpLimits};
use crate::stats::Stats;
use good_lp::{constraint, Expression};
use std::time::Instant;

/// Link weight between GPUs `i` and `j` (0 on the same GPU).
fn link(cluster: &Cluster, i: usize, j: usize) -> f64 {
    if i == j {
        0.0
    } else {
        cluster.intra_node_gbps.max(cluster.inter_node_gbps) / cluster.bandwidth(i, j)
    }
}

/// `C[e][g]` for layer `l` given the current placement of its neighbours.
fn costs(stats: &Stats, cluster: &Cluster, gpu: &Single, l: usize) -> Vec<Vec<f64>> {
    let g = cluster.num_gpus();
    let mut n = vec![vec![0.0; g]; stats.experts];
    for (e, row) in n.iter_mut().enumerate() {
        if l > 0 {
            for a in 0..stats.experts {
                row[gpu[l - 1][a]] += stats.r(l - 1, a, e);
            }
        }
        if l + 1 < stats.layers {
            for f in 0..stats.experts {
                row[gpu[l + 1][f]] += stats.r(l, e, f);
            }
        }
    }
    n.iter().map(|row| (0..g).map(|q| (0..g).map(|i| row[i] * link(cluster, i, q)).sum()).collect()).collect()
}

/// Re-places layer `l`; returns whether it changed.
fn replace_layer(
    stats: &Stats,
    cluster: &Cluster,
    gpu: &mut Single,
    (l, cap): (usize, &[f64]),
    limits: &MilpLimits,
) -> Result<bool> {
    let g = cluster.num_gpus();
    let c = costs(stats, cluster, gpu, l);
    let mut count = vec![0usize; g];
    for &q in &gpu[l] {
        count[q] += 1;
    }
    let current: f64 = gpu[l].iter().enumerate().map(|(e, &q)| c[e][q]).sum();
    let mut m = Milp::new();
    let y: Vec<Vec<crate::milp::Var>> =
        (0..stats.experts).map(|e| (0..g).map(|q| m.binary(gpu[l][e] == q)).collect()).collect();
    let mut objective = Expression::from(0.0);
    for (e, row) in y.iter().enumerate() {
        let one: Expression = row.iter().map(|v| v.v).sum();
        m.constrain(constraint!(one == 1.0));
        for (q, v) in row.iter().enumerate() {
            objective += c[e][q] * v.v;
        }
    }
    for q in 0..g {
        let n: Expression = y.iter().map(|row| row[q].v).sum();
        m.constrain(constraint!(n == count[q] as f64));
        let load: Expression = y.iter().zip(&stats.load[l]).map(|(row, &t)| t * row[q].v).sum();
        m.constrain(constraint!(load <= cap[q]));
    }
    let sol = m.minimise(objective, limits)?;
    let next: Vec<usize> = y.iter().map(|row| row.iter().position(|v| sol.is_set(*v)).unwrap_or(0)).collect();
    let cost: f64 = next.iter().enumerate().map(|(e, &q)| c[e][q]).sum();
    let load_ok = (0..g).all(|q| {
        next.iter().zip(&stats.load[l]).filter(|(&p, _)| p == q).map(|(_, t)| t).sum::<f64>() <= cap[q] + 1e-6
    });
    if cost < current - 1e-9 && load_ok {
        gpu[l] = next;
        return Ok(true);
    }
    Ok(false)
}

/// Sweeps the layers until a pass gains under 0.1% or `seconds` run out; `cap[l][g]`
/// bounds each GPU's load at layer `l`. Returns (before, after) weighted crossings.
pub fn sweep(
    stats: &Stats,
    cluster: &Cluster,
    gpu: &mut Single,
    cap: &[Vec<f64>],
    (seconds, log): (f64, bool),
) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let before = weighted_crossings(stats, cluster, gpu);
    let mut last = before;
    for pass in 1.. {
        for (l, layer_cap) in cap.iter().enumerate() {
            let left = seconds - t0.elapsed().as_secs_f64();
            if left <= 0.05 {
                break;
            }
            let per = (left / (stats.layers - l) as f64).max(0.05);
            let limits = MilpLimits { time_limit: per, rel_gap: 1e-4, solver_log: log };
            replace_layer(stats, cluster, gpu, (l, layer_cap), &limits)?;
        }
        let now = weighted_crossings(stats, cluster, gpu);
        eprintln!(
            "  layer MILP sweep {pass}: weighted crossings {last:.0} -> {now:.0} ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        if now > last * 0.999 || t0.elapsed().as_secs_f64() >= seconds - 0.05 {
            last = now;
            break;
        }
        last = now;
    }
    Ok((before, last))
}

//! The cost model shared by the solvers and `eval`: per-GPU token load of a layer
//! and directed GPU-to-GPU traffic between consecutive layers, for a placement
//! that may replicate experts (tokens split evenly across replicas).

use crate::cluster::Cluster;
use crate::stats::Stats;
use moe_types::placement::{spread_load, spread_transition};

/// `layers[l][e]`: GPUs holding expert `e` of MoE layer `l` (the plan's `layers`).
pub type Layers = Vec<Vec<Vec<u16>>>;

/// A placement with exactly one GPU per expert: `gpu[l][e]`.
pub type Single = Vec<Vec<usize>>;

/// Turns a one-GPU-per-expert placement into plan layers.
pub fn to_layers(single: &Single) -> Layers {
    single.iter().map(|l| l.iter().map(|&g| vec![g as u16]).collect()).collect()
}

/// Token load of each GPU at layer `l`.
pub fn gpu_load(stats: &Stats, layers: &Layers, l: usize, gpus: usize) -> Vec<f64> {
    let mut load = vec![0.0; gpus];
    for (e, reps) in layers[l].iter().enumerate() {
        spread_load(reps, stats.load[l][e], &mut load);
    }
    load
}

/// Directed traffic `m[i * gpus + j]`: transitions from an expert copy on GPU `i`
/// at layer `l` to one on GPU `j` at layer `l + 1` (the diagonal stays local).
pub fn pair_traffic(stats: &Stats, layers: &Layers, l: usize, gpus: usize) -> Vec<f64> {
    let mut m = vec![0.0; gpus * gpus];
    let e_count = stats.experts;
    for (e, from) in layers[l].iter().enumerate() {
        let row = &stats.trans[l][e * e_count..(e + 1) * e_count];
        for (f, to) in layers[l + 1].iter().enumerate() {
            let r = row[f];
            if r == 0.0 {
                continue;
            }
            spread_transition(from, to, r, |i, j, share| m[i * gpus + j] += share);
        }
    }
    m
}

/// Cost of one layer transition: worst directed pair traffic / bandwidth, plus
/// `mean_weight` times the mean over the `G(G-1)` directed pairs. Units: tokens per GB/s.
pub fn transition_cost(traffic: &[f64], cluster: &Cluster, mean_weight: f64) -> f64 {
    let g = cluster.num_gpus();
    let (mut worst, mut sum) = (0.0f64, 0.0);
    for i in 0..g {
        for j in 0..g {
            if i != j {
                let t = traffic[i * g + j] / cluster.bandwidth(i, j);
                worst = worst.max(t);
                sum += t;
            }
        }
    }
    let pairs = (g * g.saturating_sub(1)).max(1) as f64;
    worst + mean_weight * sum / pairs
}

/// Sum of `|load - mean|` over the GPUs of one layer.
pub fn deviation(load: &[f64]) -> f64 {
    let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
    load.iter().map(|x| (x - mean).abs()).sum()
}

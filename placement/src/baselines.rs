//! Baselines that ignore inter-layer traffic: contiguous blocks, round-robin, and
//! greedy balanced packing in the style of DeepSeek's EPLB (optionally with
//! redundant replicas of the hottest experts, tokens split evenly across replicas).

use crate::cost::{Layers, Single};
use crate::stats::Stats;

/// Expert `e` of `E` on GPU `e * G / E`, every layer.
pub fn contiguous(layers: usize, experts: usize, gpus: usize) -> Single {
    vec![(0..experts).map(|e| e * gpus / experts).collect(); layers]
}

/// Expert `e` on GPU `e mod G`, every layer.
pub fn round_robin(layers: usize, experts: usize, gpus: usize) -> Single {
    vec![(0..experts).map(|e| e % gpus).collect(); layers]
}

/// Replica count per expert: start at one and give each of `extra` replicas to the
/// expert with the largest load per replica (lowest id on ties).
pub fn replica_counts(load: &[f64], extra: usize) -> Vec<usize> {
    let mut count = vec![1usize; load.len()];
    for _ in 0..extra {
        let mut best = 0;
        for e in 1..load.len() {
            if load[e] / count[e] as f64 > load[best] / count[best] as f64 {
                best = e;
            }
        }
        count[best] += 1;
    }
    count
}

/// Greedy balanced packing of one layer: items (expert, share of its load) in
/// decreasing load order, each to the least-loaded GPU that still has a free slot
/// (`slots[g]` on GPU `g`) and holds no copy of that expert yet.
pub fn pack_layer(load: &[f64], counts: &[usize], slots: &[usize]) -> Vec<Vec<u16>> {
    let gpus = slots.len();
    let mut items: Vec<(usize, f64)> = Vec::new();
    for (e, &c) in counts.iter().enumerate() {
        items.extend(std::iter::repeat_n((e, load[e] / c as f64), c));
    }
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut gpu_load = vec![0.0f64; gpus];
    let mut used = vec![0usize; gpus];
    let mut placed: Vec<Vec<u16>> = vec![Vec::new(); load.len()];
    for (e, share) in items {
        let g = (0..gpus)
            .filter(|&g| used[g] < slots[g] && !placed[e].contains(&(g as u16)))
            .min_by(|&a, &b| gpu_load[a].total_cmp(&gpu_load[b]).then(a.cmp(&b)))
            .expect("a GPU with a free slot exists: replicas never exceed the GPU count");
        gpu_load[g] += share;
        used[g] += 1;
        placed[e].push(g as u16);
    }
    for p in &mut placed {
        p.sort_unstable();
    }
    placed
}

/// Slots per GPU for one layer of `items` copies: `floor(items / G)` each, and the
/// remainder to the GPUs holding the fewest copies so far (lowest id on ties), so
/// every GPU ends with the same number of copies over all layers, give or take one.
pub fn layer_slots(items: usize, held: &[usize]) -> Vec<usize> {
    let gpus = held.len();
    let mut slots = vec![items / gpus; gpus];
    let mut order: Vec<usize> = (0..gpus).collect();
    order.sort_by_key(|&g| (held[g], g));
    for &g in order.iter().take(items % gpus) {
        slots[g] += 1;
    }
    slots
}

/// EPLB-style greedy packing of every layer with `extra` replicas per layer.
pub fn greedy(stats: &Stats, gpus: usize, extra: usize) -> Layers {
    let extra = extra.min(stats.experts * (gpus - 1));
    let mut held = vec![0; gpus];
    let mut out = Vec::with_capacity(stats.layers);
    for load in &stats.load {
        let slots = layer_slots(stats.experts + extra, &held);
        for (h, s) in held.iter_mut().zip(&slots) {
            *h += s;
        }
        out.push(pack_layer(load, &replica_counts(load, extra), &slots));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_of_simple_baselines() {
        assert_eq!(contiguous(1, 8, 4), vec![vec![0, 0, 1, 1, 2, 2, 3, 3]]);
        assert_eq!(round_robin(1, 6, 4), vec![vec![0, 1, 2, 3, 0, 1]]);
    }

    #[test]
    fn greedy_replicates_the_hottest_and_balances() {
        let load = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(replica_counts(&load, 2), vec![3, 1, 1, 1, 1, 1, 1, 1]);
        let p = pack_layer(&load, &[2, 1, 1, 1, 1, 1, 1, 1], &[3, 3, 3]);
        assert_eq!(layer_slots(10, &[5, 4, 4]), vec![3, 4, 3]);
        assert_eq!(p[0], vec![0, 1]);
        let slots: Vec<usize> = (0..3).map(|g| p.iter().filter(|r| r.contains(&g)).count()).collect();
        assert_eq!(slots, vec![3, 3, 3]);
    }
}

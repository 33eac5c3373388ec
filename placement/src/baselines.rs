//! Baselines that ignore inter-layer traffic: contiguous blocks, round-robin, and
//! greedy balanced packing in the style of DeepSeek's EPLB (optionally with
//! redundant replicas of the hottest experts, tokens split evenly across replicas).

use crate::cost::{Layers, Single};
use crate::error::{PlaceError, Result};
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

/// Greedy balanced packing of one layer: experts in decreasing order of load per
/// copy, the copies of each on the least-loaded distinct GPUs that still have a free
/// slot (`slots[g]` on GPU `g`); then swaps of two copies between the busiest GPU and
/// another while that lowers the busier of the two. `None` when the copies of an
/// expert find too few GPUs with room.
pub fn pack_layer(load: &[f64], counts: &[usize], slots: &[usize]) -> Option<Vec<Vec<u16>>> {
    let gpus = slots.len();
    let share: Vec<f64> = load.iter().zip(counts).map(|(t, &c)| t / c as f64).collect();
    let mut order: Vec<usize> = (0..load.len()).collect();
    order.sort_by(|&a, &b| (counts[b] > 1).cmp(&(counts[a] > 1)).then(share[b].total_cmp(&share[a])).then(a.cmp(&b)));
    let mut gpu_load = vec![0.0f64; gpus];
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); gpus];
    for e in order {
        let mut free: Vec<usize> = (0..gpus).filter(|&g| held[g].len() < slots[g]).collect();
        free.sort_by(|&a, &b| gpu_load[a].total_cmp(&gpu_load[b]).then(a.cmp(&b)));
        if free.len() < counts[e] {
            return None;
        }
        for &g in &free[..counts[e]] {
            gpu_load[g] += share[e];
            held[g].push(e);
        }
    }
    rebalance(&share, &mut held, &mut gpu_load);
    let mut placed: Vec<Vec<u16>> = vec![Vec::new(); load.len()];
    for (g, experts) in held.iter().enumerate() {
        for &e in experts {
            placed[e].push(g as u16);
        }
    }
    Some(placed)
}

fn rebalance(share: &[f64], held: &mut [Vec<usize>], gpu_load: &mut [f64]) {
    for _ in 0..10_000 {
        let a = (0..held.len()).max_by(|&x, &y| gpu_load[x].total_cmp(&gpu_load[y]).then(y.cmp(&x))).unwrap_or(0);
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for b in (0..held.len()).filter(|&b| b != a) {
            for (i, &ea) in held[a].iter().enumerate() {
                for (j, &eb) in held[b].iter().enumerate() {
                    let d = share[ea] - share[eb];
                    if d <= 1e-12 || held[a].contains(&eb) || held[b].contains(&ea) {
                        continue;
                    }
                    let worst = (gpu_load[a] - d).max(gpu_load[b] + d);
                    if worst < gpu_load[a] - 1e-9 && best.is_none_or(|x| worst < x.0) {
                        best = Some((worst, b, i, j));
                    }
                }
            }
        }
        let Some((_, b, i, j)) = best else { return };
        let d = share[held[a][i]] - share[held[b][j]];
        let tmp = held[a][i];
        held[a][i] = held[b][j];
        held[b][j] = tmp;
        gpu_load[a] -= d;
        gpu_load[b] += d;
    }
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
pub fn greedy(stats: &Stats, gpus: usize, extra: usize) -> Result<Layers> {
    let mut held = vec![0; gpus];
    let mut out = Vec::with_capacity(stats.layers);
    for (l, load) in stats.load.iter().enumerate() {
        let slots = layer_slots(stats.experts + extra, &held);
        for (h, s) in held.iter_mut().zip(&slots) {
            *h += s;
        }
        let counts = replica_counts(load, extra);
        if counts.iter().any(|&c| c > gpus) {
            return Err(PlaceError::Input(format!(
                "{extra} replicas would put copies of one expert on every GPU twice"
            )));
        }
        let placed = pack_layer(load, &counts, &slots)
            .ok_or_else(|| PlaceError::Input(format!("layer {l}: the replicas do not fit distinct GPUs")))?;
        out.push(placed);
    }
    Ok(out)
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
        let p = pack_layer(&load, &[2, 1, 1, 1, 1, 1, 1, 1], &[3, 3, 3]).unwrap();
        assert_eq!(layer_slots(10, &[5, 4, 4]), vec![3, 4, 3]);
        assert_eq!(p[0], vec![0, 1]);
        let slots: Vec<usize> = (0..3).map(|g| p.iter().filter(|r| r.contains(&g)).count()).collect();
        assert_eq!(slots, vec![3, 3, 3]);
    }
}

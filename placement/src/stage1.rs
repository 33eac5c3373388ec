//! MoETuner stage 1: per layer, partition the experts into one group per GPU
//! minimising the total deviation of group token load from the mean,
//! `sum_g |load_g - mean|`, with group sizes in `[lo, hi]`.
//!
//! MILP: `x[e][g]` binary (expert `e` in group `g`), `d[g] >= +-(sum_e T[e] x[e][g] - mean)`.
//! Groups are interchangeable, so with experts in decreasing load order expert `i` may
//! only join groups `0..=i` (symmetry breaking). The warm start is a greedy packing
//! improved by moves and swaps.

use crate::error::Result;
use crate::milp::{Milp, MilpLimits, MilpStatus};
use good_lp::{constraint, Expression};

/// Group sizes allowed in stage 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeRange {
    /// Smallest group.
    pub lo: usize,
    /// Largest group.
    pub hi: usize,
}

impl SizeRange {
    /// `floor(E/G) - slack ..= ceil(E/G) + slack`, never below 1.
    pub fn balanced(experts: usize, gpus: usize, slack: usize) -> Self {
        SizeRange { lo: (experts / gpus).saturating_sub(slack).max(1), hi: experts.div_ceil(gpus) + slack }
    }
}

/// A partition of one layer's experts.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    /// `groups[g]`: experts of group `g`, ascending.
    pub groups: Vec<Vec<usize>>,
    /// `sum_g |load_g - mean|`.
    pub objective: f64,
    /// Proven lower bound on the objective.
    pub bound: f64,
    /// How it ended (`heuristic` when no MILP ran).
    pub status: &'static str,
}

/// Objective of a partition.
pub fn partition_deviation(load: &[f64], groups: &[Vec<usize>]) -> f64 {
    let sums: Vec<f64> = groups.iter().map(|g| g.iter().map(|&e| load[e]).sum()).collect();
    crate::cost::deviation(&sums)
}

/// Greedy size-respecting packing, then first-improvement moves and swaps.
pub fn heuristic(load: &[f64], gpus: usize, sizes: SizeRange) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..load.len()).collect();
    order.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); gpus];
    let mut sums = vec![0.0f64; gpus];
    for (k, &e) in order.iter().enumerate() {
        let remaining = load.len() - k;
        let deficit: usize = groups.iter().map(|g| sizes.lo.saturating_sub(g.len())).sum();
        let g = (0..gpus)
            .filter(|&g| groups[g].len() < sizes.hi && (remaining > deficit || groups[g].len() < sizes.lo))
            .min_by(|&a, &b| sums[a].total_cmp(&sums[b]).then(a.cmp(&b)))
            .expect("sizes admit a partition");
        groups[g].push(e);
        sums[g] += load[e];
    }
    improve(load, &mut groups, sizes);
    for g in &mut groups {
        g.sort_unstable();
    }
    groups
}

fn improve(load: &[f64], groups: &mut [Vec<usize>], sizes: SizeRange) {
    let mean = load.iter().sum::<f64>() / groups.len() as f64;
    let mut sums: Vec<f64> = groups.iter().map(|g| g.iter().map(|&e| load[e]).sum()).collect();
    let dev = |a: f64, b: f64| (a - mean).abs() + (b - mean).abs();
    for _round in 0..200 {
        let mut improved = false;
        for a in 0..groups.len() {
            for b in 0..groups.len() {
                if a == b {
                    continue;
                }
                let before = dev(sums[a], sums[b]);
                // move one expert a -> b
                if groups[a].len() > sizes.lo && groups[b].len() < sizes.hi {
                    if let Some(i) = (0..groups[a].len())
                        .find(|&i| dev(sums[a] - load[groups[a][i]], sums[b] + load[groups[a][i]]) < before - 1e-9)
                    {
                        let e = groups[a].remove(i);
                        groups[b].push(e);
                        sums[a] -= load[e];
                        sums[b] += load[e];
                        improved = true;
                        continue;
                    }
                }
                // swap one expert of a with one of b
                'swap: for i in 0..groups[a].len() {
                    for j in 0..groups[b].len() {
                        let d = load[groups[a][i]] - load[groups[b][j]];
                        if dev(sums[a] - d, sums[b] + d) < before - 1e-9 {
                            let tmp = groups[a][i];
                            groups[a][i] = groups[b][j];
                            groups[b][j] = tmp;
                            sums[a] -= d;
                            sums[b] += d;
                            improved = true;
                            break 'swap;
                        }
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
}

/// Solves one layer: the heuristic, then the MILP warm-started from it.
pub fn solve_layer(load: &[f64], gpus: usize, sizes: SizeRange, limits: &MilpLimits) -> Result<Partition> {
    let experts = load.len();
    let start = heuristic(load, gpus, sizes);
    let start_obj = partition_deviation(load, &start);
    if sizes.lo == sizes.hi && sizes.hi == 1 || start_obj < 1e-9 {
        return Ok(Partition { groups: start, objective: start_obj, bound: start_obj, status: "optimal" });
    }
    let mut order: Vec<usize> = (0..experts).collect();
    order.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
    // warm start relabelled so group labels appear in order of their first expert
    let mut group_of = vec![0; experts];
    for (g, members) in start.iter().enumerate() {
        for &e in members {
            group_of[e] = g;
        }
    }
    let mut relabel = vec![usize::MAX; gpus];
    let mut next = 0;
    for &e in &order {
        if relabel[group_of[e]] == usize::MAX {
            relabel[group_of[e]] = next;
            next += 1;
        }
    }
    let mean = load.iter().sum::<f64>() / gpus as f64;
    let mut m = Milp::new();
    let x: Vec<Vec<Option<crate::milp::Var>>> = order
        .iter()
        .enumerate()
        .map(|(i, &e)| (0..gpus).map(|g| (g <= i).then(|| m.binary(relabel[group_of[e]] == g))).collect())
        .collect();
    let mut objective = Expression::from(0.0);
    for g in 0..gpus {
        let members: Vec<(usize, crate::milp::Var)> =
            x.iter().enumerate().filter_map(|(i, row)| row[g].map(|v| (order[i], v))).collect();
        let size: Expression = members.iter().map(|(_, v)| v.v).sum();
        let group_load: Expression = members.iter().map(|&(e, v)| load[e] * v.v).sum();
        let start_load: f64 = members.iter().filter(|(e, _)| relabel[group_of[*e]] == g).map(|(e, _)| load[*e]).sum();
        let d = m.nonneg((start_load - mean).abs());
        m.constrain(constraint!(size.clone() >= sizes.lo as f64));
        m.constrain(constraint!(size <= sizes.hi as f64));
        m.constrain(constraint!(d.v >= group_load.clone() - mean));
        m.constrain(constraint!(d.v >= mean - group_load));
        objective += d.v;
    }
    for row in &x {
        let one: Expression = row.iter().flatten().map(|v| v.v).sum();
        m.constrain(constraint!(one == 1.0));
    }
    let sol = m.minimise(objective, limits)?;
    let mut groups = vec![Vec::new(); gpus];
    for (i, row) in x.iter().enumerate() {
        let g = row.iter().position(|v| v.is_some_and(|v| sol.is_set(v))).unwrap_or(0);
        groups[g].push(order[i]);
    }
    for g in &mut groups {
        g.sort_unstable();
    }
    let objective = partition_deviation(load, &groups);
    let (groups, objective) = if objective <= start_obj { (groups, objective) } else { (start, start_obj) };
    let status = if sol.status == MilpStatus::Optimal { "optimal" } else { sol.status.as_str() };
    Ok(Partition { groups, objective, bound: sol.bound.min(objective), status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heuristic_respects_sizes() {
        let load: Vec<f64> = (0..9).map(|e| (e * e) as f64).collect();
        let g = heuristic(&load, 4, SizeRange::balanced(9, 4, 0));
        assert!(g.iter().all(|g| (2..=3).contains(&g.len())), "{g:?}");
        assert_eq!(g.iter().map(Vec::len).sum::<usize>(), 9);
    }
}

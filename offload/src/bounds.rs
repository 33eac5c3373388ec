//! Offline bounds over a recorded access sequence, for benchmarks only (they
//! need the future): Belady's optimal replacement (fewest loads any demand
//! cache can make with the budget) and an oracle prefetcher (perfect
//! foresight of the next `depth` layers, same budget).
//!
//! An access is one MoE layer of one engine step needing a set of experts;
//! the sequence of accesses comes from a routing trace (`step` orders them).

use moe_types::trace::TraceToken;
use std::collections::BTreeMap;

/// The distinct experts one MoE layer of one step used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// MoE layer index.
    pub layer: usize,
    /// Distinct experts, ascending.
    pub experts: Vec<u16>,
}

/// Accesses in execution order: steps ascending, MoE layers in order.
pub fn accesses(records: &[TraceToken]) -> Vec<Access> {
    let mut steps: BTreeMap<u64, Vec<Vec<u16>>> = BTreeMap::new();
    for r in records {
        let s = steps.entry(r.step).or_insert_with(|| vec![Vec::new(); r.experts.len()]);
        for (l, ids) in r.experts.iter().enumerate() {
            if let Some(set) = s.get_mut(l) {
                set.extend_from_slice(ids);
            }
        }
    }
    let mut out = Vec::new();
    for (_, layers) in steps {
        for (layer, mut experts) in layers.into_iter().enumerate() {
            experts.sort_unstable();
            experts.dedup();
            out.push(Access { layer, experts });
        }
    }
    out
}

/// Loads and hits of a simulated run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundResult {
    /// Experts read from the slow tier.
    pub loads: u64,
    /// Experts resident at the time of need.
    pub hits: u64,
    /// Experts needed.
    pub needs: u64,
}

impl BoundResult {
    /// Hits / needs.
    pub fn hit_ratio(&self) -> f64 {
        if self.needs == 0 {
            0.0
        } else {
            self.hits as f64 / self.needs as f64
        }
    }
}

/// Future use times of every (layer, expert).
struct Future {
    uses: Vec<Vec<usize>>,
    experts: usize,
}

impl Future {
    fn new(acc: &[Access], layers: usize, experts: usize) -> Self {
        let mut uses = vec![Vec::new(); layers * experts];
        for (t, a) in acc.iter().enumerate() {
            for &e in &a.experts {
                uses[a.layer * experts + e as usize].push(t);
            }
        }
        Self { uses, experts }
    }

    fn key(&self, a: &Access, e: u16) -> usize {
        a.layer * self.experts + e as usize
    }

    /// First use at or after `t` (usize::MAX if never).
    fn next_use(&self, key: usize, t: usize) -> usize {
        let u = &self.uses[key];
        let i = u.partition_point(|&x| x < t);
        u.get(i).copied().unwrap_or(usize::MAX)
    }
}

/// The resident key used farthest in the future (after `t`), not in `keep`.
fn farthest(resident: &[usize], keep: &[usize], f: &Future, t: usize) -> Option<(usize, usize)> {
    resident
        .iter()
        .enumerate()
        .filter(|(_, k)| !keep.contains(k))
        .map(|(i, &k)| (i, f.next_use(k, t)))
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
}

fn layers_of(acc: &[Access]) -> usize {
    acc.iter().map(|a| a.layer + 1).max().unwrap_or(0)
}

/// Belady's rule: on a miss, evict the resident expert needed farthest in
/// the future.
pub fn belady(acc: &[Access], experts: usize, slots: usize) -> BoundResult {
    let f = Future::new(acc, layers_of(acc), experts);
    let mut resident: Vec<usize> = Vec::with_capacity(slots);
    let mut r = BoundResult::default();
    for (t, a) in acc.iter().enumerate() {
        let keep: Vec<usize> = a.experts.iter().map(|&e| f.key(a, e)).collect();
        serve(&keep, &mut resident, slots, &f, t, &mut r);
    }
    r
}

/// Serves one access on demand with Belady eviction.
fn serve(keep: &[usize], resident: &mut Vec<usize>, slots: usize, f: &Future, t: usize, r: &mut BoundResult) {
    for &k in keep {
        r.needs += 1;
        if resident.contains(&k) {
            r.hits += 1;
            continue;
        }
        r.loads += 1;
        if resident.len() >= slots {
            if let Some((i, _)) = farthest(resident, keep, f, t + 1) {
                resident.swap_remove(i);
            }
        }
        resident.push(k);
    }
}

/// Perfect foresight of the next `depth` accesses: after each access, load
/// what they need (nearest first) whenever some resident expert is needed
/// later than that (Belady's rule), then serve the next access. Prefetches
/// are assumed to finish before they are needed (an upper bound).
pub fn oracle_prefetch(acc: &[Access], experts: usize, slots: usize, depth: usize) -> BoundResult {
    let f = Future::new(acc, layers_of(acc), experts);
    let mut resident: Vec<usize> = Vec::with_capacity(slots);
    let mut r = BoundResult::default();
    for (t, a) in acc.iter().enumerate() {
        let current: Vec<usize> = a.experts.iter().map(|&e| f.key(a, e)).collect();
        serve(&current, &mut resident, slots, &f, t, &mut r);
        let mut keep = current;
        for (b, next) in acc.iter().enumerate().skip(t + 1).take(depth) {
            for &e in &next.experts {
                let k = f.key(next, e);
                if !keep.contains(&k) {
                    keep.push(k);
                }
                if resident.contains(&k) {
                    continue;
                }
                if resident.len() < slots {
                    resident.push(k);
                    r.loads += 1;
                } else if let Some((i, when)) = farthest(&resident, &keep, &f, t + 1) {
                    if when > b {
                        resident.swap_remove(i);
                        resident.push(k);
                        r.loads += 1;
                    }
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(seq: &[(usize, &[u16])]) -> Vec<Access> {
        seq.iter().map(|&(layer, e)| Access { layer, experts: e.to_vec() }).collect()
    }

    #[test]
    fn belady_matches_the_textbook_example() {
        // one layer, reference string 1 2 3 4 1 2 5 1 2 3 4 5 with 3 slots: 7 faults
        let refs = [1u16, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5];
        let a: Vec<Access> = refs.iter().map(|&e| Access { layer: 0, experts: vec![e] }).collect();
        let r = belady(&a, 6, 3);
        assert_eq!((r.loads, r.needs, r.hits), (7, 12, 5));
    }

    #[test]
    fn oracle_prefetch_hides_loads_that_fit_and_never_loads_more_than_needed() {
        let a = acc(&[(0, &[0, 1]), (1, &[2, 3]), (0, &[0, 1]), (1, &[2, 3])]);
        let b = belady(&a, 4, 4);
        assert_eq!((b.loads, b.hits), (4, 4));
        let o = oracle_prefetch(&a, 4, 4, 1);
        assert_eq!((o.loads, o.hits, o.needs), (4, 6, 8), "only the first access misses");
        let tight = oracle_prefetch(&a, 4, 2, 1);
        assert_eq!(tight.needs, 8);
        assert!(tight.loads >= belady(&a, 4, 2).loads);
    }

    #[test]
    fn accesses_group_by_step_and_layer() {
        let t = |step, e: [u16; 2]| TraceToken {
            step,
            seq: 0,
            pos: 0,
            token: 0,
            experts: vec![vec![e[0]], vec![e[1]]],
            weights: vec![vec![1.0]; 2],
        };
        let a = accesses(&[t(2, [1, 0]), t(1, [3, 3]), t(1, [2, 3])]);
        assert_eq!(a, acc(&[(0, &[2, 3]), (1, &[3]), (0, &[1]), (1, &[0])]));
    }
}

//! Token regrouping (ExpertFlow): when more sequences are runnable than one
//! micro-batch holds, choose the ones that run now so that, together, they
//! need few distinct experts, preferring experts already in the fast tier.
//!
//! The choice is greedy expert-set packing rather than ExpertFlow's balanced
//! k-medoids: it needs no clustering pass over all sequences per step (the
//! cost is micro-batch x candidates x layers set operations), it takes the
//! cache's current contents into account (among candidates adding the same
//! number of experts to the group, the one whose experts are resident wins),
//! and the starvation bound is a hard rule rather than a balance constraint.
//! (A multi-start variant, growing groups from the four most-deferred
//! sequences and keeping the smallest, measured no better on the benchmark
//! and cost more scheduler time, so it is not used.) Fairness: sequences deferred `max_deferral` times are taken
//! first, oldest first; a new group is seeded with the most-deferred
//! sequence, so groups form around whoever waited longest.

use moe_types::{ExpertSet, SeqId};

/// How the sequences of a step are chosen when they exceed the micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum GroupingMode {
    /// Round robin in arrival order (most deferred first).
    Fcfs,
    /// A random subset (seeded, deterministic), for comparison.
    Random,
    /// Greedy expert-set packing on predicted paths.
    Regroup,
}

impl GroupingMode {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fcfs => "fcfs",
            Self::Random => "random",
            Self::Regroup => "regroup",
        }
    }

    /// Parses a flag value.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Fcfs, Self::Random, Self::Regroup].into_iter().find(|m| m.name() == s)
    }
}

/// An unknown `--grouping` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown grouping {0:?} (expected fcfs, random or regroup)")]
pub struct UnknownGrouping(pub String);

impl std::str::FromStr for GroupingMode {
    type Err = UnknownGrouping;
    fn from_str(s: &str) -> Result<Self, UnknownGrouping> {
        Self::parse(s).ok_or_else(|| UnknownGrouping(s.to_string()))
    }
}

moe_types::setting_from_str!(named GroupingMode);

/// Micro-batching settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupingConfig {
    /// How to choose.
    pub mode: GroupingMode,
    /// Most sequences computed in one step; 0 means no limit (every runnable
    /// sequence runs every step, as without regrouping).
    pub micro_batch: usize,
    /// Most consecutive steps a running sequence may be left out.
    pub max_deferral: u32,
    /// Seed of the random mode.
    pub seed: u64,
}

impl Default for GroupingConfig {
    fn default() -> Self {
        Self { mode: GroupingMode::Fcfs, micro_batch: 0, max_deferral: 8, seed: 0 }
    }
}

/// What the engine predicts for the next step: per sequence, the experts its
/// next token is forecast to use at each MoE layer; per MoE layer, the
/// experts resident in the fast tier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathHints {
    /// Forecast paths of running sequences (absent: unknown, e.g. prefill).
    pub paths: std::collections::HashMap<SeqId, Vec<ExpertSet>>,
    /// Resident experts per MoE layer.
    pub resident: Vec<ExpertSet>,
}

/// A running sequence as the chooser sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate<'a> {
    pub seq: SeqId,
    pub deferred: u32,
    pub path: Option<&'a [ExpertSet]>,
}

/// Picks at most `slots` candidates (given oldest first); returns their
/// indices. Deterministic for the same inputs and `rng` state.
pub(crate) fn choose(
    cfg: &GroupingConfig,
    cands: &[Candidate<'_>],
    slots: usize,
    resident: &[ExpertSet],
    rng: &mut u64,
) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::with_capacity(slots);
    // starving sequences first, most deferred first, then oldest
    let mut forced: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].deferred >= cfg.max_deferral).collect();
    forced.sort_by_key(|&i| (std::cmp::Reverse(cands[i].deferred), i));
    chosen.extend(forced.into_iter().take(slots));
    fn free<'c>(n: usize, chosen: &'c [usize]) -> impl Iterator<Item = usize> + 'c {
        (0..n).filter(move |i| !chosen.contains(i))
    }
    let n = cands.len();
    match cfg.mode {
        GroupingMode::Fcfs => {
            let mut rest: Vec<usize> = free(n, &chosen).collect();
            rest.sort_by_key(|&i| (std::cmp::Reverse(cands[i].deferred), i));
            chosen.extend(rest.into_iter().take(slots.saturating_sub(chosen.len())));
        }
        GroupingMode::Random => {
            let mut rest: Vec<usize> = free(n, &chosen).collect();
            for i in (1..rest.len()).rev() {
                rest.swap(i, (next(rng) % (i as u64 + 1)) as usize);
            }
            chosen.extend(rest.into_iter().take(slots.saturating_sub(chosen.len())));
        }
        GroupingMode::Regroup => {
            // unknown paths (prefill) are not deferred for packing's sake
            let unknown: Vec<usize> = free(n, &chosen).filter(|&i| cands[i].path.is_none()).collect();
            chosen.extend(unknown.into_iter().take(slots.saturating_sub(chosen.len())));
            let layers = resident.len().max(cands.iter().filter_map(|c| c.path.map(<[_]>::len)).max().unwrap_or(0));
            let mut union = vec![ExpertSet::new(); layers];
            let add = |union: &mut Vec<ExpertSet>, c: &Candidate<'_>| {
                if let Some(p) = c.path {
                    for (u, s) in union.iter_mut().zip(p) {
                        *u = u.union(s);
                    }
                }
            };
            chosen.iter().for_each(|&i| add(&mut union, &cands[i]));
            if chosen.is_empty() && slots > 0 {
                if let Some(seed) = free(n, &chosen).min_by_key(|&i| (std::cmp::Reverse(cands[i].deferred), i)) {
                    chosen.push(seed);
                    add(&mut union, &cands[seed]);
                }
            }
            while chosen.len() < slots {
                let cost = |i: usize| {
                    let p = cands[i].path.unwrap_or(&[]);
                    let (mut new, mut loads) = (0, 0);
                    for (l, s) in p.iter().enumerate() {
                        let u = union.get(l).copied().unwrap_or_default();
                        let r = resident.get(l).copied().unwrap_or_default();
                        new += s.count_outside(&u);
                        loads += s.count_outside(&u.union(&r));
                    }
                    (new, loads, std::cmp::Reverse(cands[i].deferred), i)
                };
                let Some(best) = free(n, &chosen).min_by_key(|&i| cost(i)) else { break };
                chosen.push(best);
                add(&mut union, &cands[best]);
            }
        }
    }
    chosen
}

/// xorshift64*: a tiny deterministic generator for the random mode.
fn next(state: &mut u64) -> u64 {
    let mut x = *state | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_types::ExpertId;

    fn set(ids: &[u16]) -> ExpertSet {
        ids.iter().map(|&e| ExpertId(e)).collect()
    }

    fn cfg(mode: GroupingMode) -> GroupingConfig {
        GroupingConfig { mode, micro_batch: 2, max_deferral: 3, seed: 1 }
    }

    #[test]
    fn regrouping_packs_similar_paths_and_prefers_resident_experts() {
        let paths = [vec![set(&[0, 1])], vec![set(&[4, 5])], vec![set(&[0, 1])], vec![set(&[4, 6])]];
        let cands: Vec<Candidate<'_>> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| Candidate { seq: SeqId(i as u64), deferred: 0, path: Some(p) })
            .collect();
        let mut rng = 1;
        // seeded with the oldest (0), then its twin (2)
        assert_eq!(choose(&cfg(GroupingMode::Regroup), &cands, 2, &[], &mut rng), vec![0, 2]);
        assert_eq!(choose(&cfg(GroupingMode::Fcfs), &cands, 2, &[], &mut rng), vec![0, 1]);
        // the most deferred seeds the group; resident experts cost nothing
        let mut c2 = cands.clone();
        c2[1].deferred = 2;
        assert_eq!(choose(&cfg(GroupingMode::Regroup), &c2, 2, &[set(&[6])], &mut rng), vec![1, 3]);
    }

    #[test]
    fn starving_and_unknown_sequences_go_first() {
        let p = [set(&[0])];
        let cands = [
            Candidate { seq: SeqId(0), deferred: 0, path: Some(&p) },
            Candidate { seq: SeqId(1), deferred: 3, path: Some(&p) },
            Candidate { seq: SeqId(2), deferred: 0, path: None },
        ];
        let mut rng = 7;
        for mode in [GroupingMode::Fcfs, GroupingMode::Random, GroupingMode::Regroup] {
            let got = choose(&cfg(mode), &cands, 2, &[], &mut rng);
            assert_eq!(got[0], 1, "{mode:?}");
            assert_eq!(got.len(), 2);
        }
        assert_eq!(choose(&cfg(GroupingMode::Regroup), &cands, 2, &[], &mut rng), vec![1, 2]);
        assert_eq!(GroupingMode::parse("regroup"), Some(GroupingMode::Regroup));
    }
}

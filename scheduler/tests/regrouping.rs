//! Micro-batching under every grouping mode, on randomised workloads
//! (arrivals, finishes, forecast paths): a step never exceeds the
//! micro-batch, no running sequence is left out more than the deferral bound
//! in a row, every sequence finishes, and the same inputs give the same
//! schedule. Plus a trace-driven snapshot of the groups regrouping forms.

use moe_scheduler::{BlockAllocator, GroupingConfig, GroupingMode, PathHints, Scheduler, SchedulerConfig};
use moe_types::{ExpertId, ExpertSet, SeqId};
use std::collections::HashMap;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn sched(mode: GroupingMode, micro_batch: usize, max_seqs: usize, bound: u32) -> Scheduler {
    let cfg = SchedulerConfig { max_num_seqs: max_seqs, max_batched_tokens: 64 };
    Scheduler::new(cfg, BlockAllocator::new(512, 16))
        .with_grouping(GroupingConfig { mode, micro_batch, max_deferral: bound, seed: 3 })
        .unwrap()
}

/// Runs a random workload; returns the sequence of step plans (seq ids).
fn simulate(mode: GroupingMode, seed: u64) -> Vec<Vec<u64>> {
    let (m, max_seqs, bound) = (4, 12, 4);
    let mut s = sched(mode, m, max_seqs, bound);
    let mut rng = Rng(seed);
    let mut remaining: HashMap<u64, u32> = HashMap::new();
    let mut left_out: HashMap<u64, u32> = HashMap::new();
    let mut next_id = 0u64;
    let mut plans = Vec::new();
    for step in 0..1000 {
        if step < 300 && rng.below(5) == 0 {
            let prompt = (0..1 + rng.below(20)).map(|i| i as u32).collect();
            s.add(SeqId(next_id), prompt);
            remaining.insert(next_id, 1 + rng.below(30) as u32);
            next_id += 1;
        }
        let mut hints = PathHints::default();
        for &id in s.running() {
            let path = (0..3).map(|_| (0..2).map(|_| ExpertId(rng.below(8) as u16)).collect::<ExpertSet>()).collect();
            hints.paths.insert(id, path);
        }
        hints.resident = (0..3).map(|_| [ExpertId(rng.below(8) as u16)].into_iter().collect()).collect();
        let running_before: Vec<u64> = s.running().iter().map(|i| i.0).collect();
        let plan = s.schedule_with(&hints);
        assert!(plan.chunks.len() <= m, "{mode:?}: micro-batch exceeded");
        let ran: Vec<u64> = plan.chunks.iter().map(|c| c.seq.0).collect();
        for id in running_before {
            if !s.running().iter().any(|r| r.0 == id) {
                continue; // preempted
            }
            let n = left_out.entry(id).or_default();
            *n = if ran.contains(&id) { 0 } else { *n + 1 };
            assert!(*n <= bound, "{mode:?}: sequence {id} left out {n} steps in a row (bound {bound})");
            assert_eq!(
                s.deferred(SeqId(id)),
                *n,
                "{mode:?} seq {id} step {step} ran {ran:?} preempted {:?}",
                plan.preempted
            );
        }
        s.commit(&plan);
        for c in plan.chunks.iter().filter(|c| c.sample) {
            let left = remaining.get_mut(&c.seq.0).unwrap();
            *left -= 1;
            if *left == 0 {
                s.remove(c.seq);
                remaining.remove(&c.seq.0);
            } else {
                s.append_token(c.seq, 5);
            }
        }
        plans.push(ran);
    }
    assert!(s.is_idle(), "{mode:?}: sequences left after the workload drained");
    plans
}

#[test]
fn every_mode_keeps_the_micro_batch_and_the_deferral_bound_on_random_workloads() {
    for mode in [GroupingMode::Fcfs, GroupingMode::Random, GroupingMode::Regroup] {
        for seed in 1..40 {
            let a = simulate(mode, seed * 7919);
            assert_eq!(a, simulate(mode, seed * 7919), "{mode:?}: not deterministic");
        }
    }
}

#[test]
fn an_impossible_deferral_bound_is_refused() {
    let cfg = SchedulerConfig { max_num_seqs: 64, max_batched_tokens: 64 };
    let g = GroupingConfig { mode: GroupingMode::Regroup, micro_batch: 8, max_deferral: 2, seed: 0 };
    let e = Scheduler::new(cfg, BlockAllocator::new(8, 16)).with_grouping(g).err().unwrap().to_string();
    assert!(e.contains("deferral bound of at least 9"), "{e}");
}

/// Four decoding sequences, two kinds of paths, micro-batch of 2: regrouping
/// pairs the twins (0 with 3, 1 with 2) where round robin pairs by age.
#[test]
fn snapshot_of_the_groups_formed() {
    let run = |mode| {
        let mut s = sched(mode, 2, 4, 3);
        for i in 0..4 {
            s.add(SeqId(i), vec![1]);
        }
        let a: ExpertSet = [0, 1].into_iter().map(ExpertId).collect();
        let b: ExpertSet = [5, 6].into_iter().map(ExpertId).collect();
        let mut hints = PathHints::default();
        for i in 0..4u64 {
            hints.paths.insert(SeqId(i), vec![if i == 0 || i == 3 { a } else { b }]);
        }
        let mut groups = Vec::new();
        for _ in 0..6 {
            let plan = s.schedule_with(&hints);
            s.commit(&plan);
            for c in plan.chunks.iter().filter(|c| c.sample) {
                s.append_token(c.seq, 9);
            }
            let mut g: Vec<u64> = plan.chunks.iter().map(|c| c.seq.0).collect();
            g.sort_unstable();
            groups.push(g);
        }
        groups
    };
    // (admission takes the first steps; then regrouping pairs the twins)
    assert_eq!(
        run(GroupingMode::Regroup),
        vec![vec![0, 1], vec![0, 2], vec![1, 3], vec![0, 3], vec![1, 2], vec![0, 3]]
    );
    assert_eq!(run(GroupingMode::Fcfs), vec![vec![0, 1], vec![0, 2], vec![1, 3], vec![0, 2], vec![1, 3], vec![0, 2]]);
}

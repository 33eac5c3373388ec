//! Continuous batching: which sequences run in the next step and how many
//! of their tokens, under a token budget, a sequence limit and the KV-cache
//! capacity.
//!
//! Two verbs, as in vLLM: [`Scheduler::schedule`] plans a step;
//! [`Scheduler::commit`] records what the step computed (and
//! [`Scheduler::append_token`] the token sampled after it). Running sequences
//! are served first, oldest first, so decodes are never starved by new
//! prompts; a long prompt is prefilled in chunks that fit the budget left
//! over. When blocks run out the newest running sequence is preempted: its
//! blocks are freed and it is recomputed later from its tokens (prompt and
//! output so far), so no request fails for lack of memory.

use crate::blocks::{BlockAllocator, BlockTable};
use crate::grouping::{choose, Candidate, GroupingConfig, PathHints};
use crate::SchedulerError;
use moe_types::{BlockId, SeqId, TokenId};
use std::collections::{HashMap, VecDeque};

/// Limits of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one step.
    pub max_batched_tokens: usize,
}

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledChunk {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first token to compute (tokens before it are cached).
    pub start: usize,
    /// Tokens to compute.
    pub len: usize,
    /// The chunk reaches the last known token: sample the next one after it.
    pub sample: bool,
}

/// What one step computes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Chunks in batch order.
    pub chunks: Vec<ScheduledChunk>,
    /// Sequences preempted while planning (their cache was dropped; they
    /// will be recomputed).
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    /// Tokens computed by the step.
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }
}

struct Seq {
    tokens: Vec<TokenId>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
    /// Consecutive steps this running sequence was left out of the micro-batch.
    deferred: u32,
}

/// The continuous-batching state: waiting and running sequences and the KV
/// block allocator.
pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, Seq>,
    /// Admission order; preempted sequences go back to the front.
    waiting: VecDeque<SeqId>,
    /// Oldest first.
    running: Vec<SeqId>,
    preemptions: u64,
    grouping: GroupingConfig,
    rng: u64,
    deferrals: u64,
}

impl Scheduler {
    /// An empty scheduler over `alloc`'s blocks.
    pub fn new(cfg: SchedulerConfig, alloc: BlockAllocator) -> Self {
        assert!(cfg.max_num_seqs > 0 && cfg.max_batched_tokens > 0, "limits must be positive");
        Self {
            cfg,
            alloc,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            grouping: GroupingConfig::default(),
            rng: 0,
            deferrals: 0,
        }
    }

    /// Sets micro-batching and regrouping. Errors when the deferral bound
    /// cannot be kept: with `m` sequences per step (one slot kept for
    /// admissions when `m` > 1) and up to `max_num_seqs` running, round robin
    /// alone needs `ceil(max_num_seqs / (m - 1)) - 1` steps of deferral.
    pub fn with_grouping(mut self, g: GroupingConfig) -> Result<Self, SchedulerError> {
        self.set_grouping(g)?;
        Ok(self)
    }

    /// [`with_grouping`](Self::with_grouping) in place.
    pub fn set_grouping(&mut self, g: GroupingConfig) -> Result<(), SchedulerError> {
        if g.micro_batch > 0 {
            let slots = g.micro_batch - usize::from(g.micro_batch > 1);
            let need = self.cfg.max_num_seqs.div_ceil(slots).saturating_sub(1);
            if (g.max_deferral as usize) < need {
                return Err(SchedulerError::DeferralBound {
                    micro_batch: g.micro_batch,
                    max_num_seqs: self.cfg.max_num_seqs,
                    needed: need,
                    max_deferral: g.max_deferral,
                });
            }
        }
        self.rng = g.seed;
        self.grouping = g;
        Ok(())
    }

    /// The micro-batching settings.
    pub fn grouping(&self) -> &GroupingConfig {
        &self.grouping
    }

    /// Running sequences, oldest first.
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    /// Steps sequences were left out of a micro-batch, in total.
    pub fn deferrals(&self) -> u64 {
        self.deferrals
    }

    /// Consecutive steps `id` has been left out (0 if it ran last step).
    pub fn deferred(&self, id: SeqId) -> u32 {
        self.seqs.get(&id).map_or(0, |s| s.deferred)
    }

    /// Queues a sequence whose known tokens are `prompt`.
    ///
    /// # Panics
    /// If `id` is already present or the prompt is empty (caller bugs).
    pub fn add(&mut self, id: SeqId, prompt: Vec<TokenId>) {
        assert!(!prompt.is_empty(), "empty prompt");
        let prev = self.seqs.insert(id, Seq { tokens: prompt, computed: 0, table: BlockTable::new(), deferred: 0 });
        assert!(prev.is_none(), "sequence {id} added twice");
        self.waiting.push_back(id);
    }

    /// Removes a sequence (finished or aborted), freeing its blocks.
    /// Returns false if it was unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(mut s) = self.seqs.remove(&id) else { return false };
        s.table.release(&mut self.alloc);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        true
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: TokenId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Records that the step computed `plan`'s chunks.
    pub fn commit(&mut self, plan: &StepPlan) {
        for c in &plan.chunks {
            if let Some(s) = self.seqs.get_mut(&c.seq) {
                s.computed = s.computed.max(c.start + c.len);
            }
        }
    }

    /// Known tokens of a sequence (prompt then output).
    pub fn tokens(&self, id: SeqId) -> &[TokenId] {
        self.seqs.get(&id).map_or(&[], |s| &s.tokens)
    }

    /// Tokens of a sequence whose keys and values are cached.
    pub fn computed(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.computed)
    }

    /// KV blocks of a sequence.
    pub fn blocks(&self, id: SeqId) -> &[BlockId] {
        self.seqs.get(&id).map_or(&[], |s| s.table.blocks())
    }

    /// Sequences running (holding cache).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether there is nothing to do.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Blocks in use and in total.
    pub fn blocks_used(&self) -> (usize, usize) {
        (self.alloc.num_blocks() - self.alloc.num_free(), self.alloc.num_blocks())
    }

    /// Preemptions so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Whether a sequence that will reach `total_tokens` can ever fit.
    pub fn fits(&self, total_tokens: usize) -> bool {
        self.alloc.blocks_for(total_tokens) <= self.alloc.num_blocks()
    }

    /// Plans the next step (no path hints: regrouping falls back to round robin).
    pub fn schedule(&mut self) -> StepPlan {
        self.schedule_with(&PathHints::default())
    }

    /// Which running sequences may run this step: all of them, or a
    /// micro-batch chosen by the grouping mode when there are more.
    fn micro_batch(&mut self, hints: &PathHints) -> Option<Vec<SeqId>> {
        let m = self.grouping.micro_batch;
        if m == 0 {
            return None;
        }
        let admissible = self.waiting.len().min(self.cfg.max_num_seqs.saturating_sub(self.running.len()));
        let slots = if admissible > 0 && m > 1 { m - 1 } else { m };
        if self.running.len() <= slots {
            return None;
        }
        let cands: Vec<Candidate<'_>> = self
            .running
            .iter()
            .map(|&seq| Candidate {
                seq,
                deferred: self.seqs[&seq].deferred,
                path: hints.paths.get(&seq).map(Vec::as_slice),
            })
            .collect();
        let picked = choose(&self.grouping, &cands, slots, &hints.resident, &mut self.rng);
        let group: Vec<SeqId> = picked.into_iter().map(|i| cands[i].seq).collect();
        Some(group)
    }

    /// Plans the next step, regrouping with `hints` when a micro-batch is set.
    pub fn schedule_with(&mut self, hints: &PathHints) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_batched_tokens;
        let group = self.micro_batch(hints);
        {
            for &id in &self.running {
                let s = self.seqs.get_mut(&id).expect("running sequence exists");
                if group.as_ref().is_none_or(|g| g.contains(&id)) {
                    s.deferred = 0;
                } else {
                    s.deferred += 1;
                    self.deferrals += 1;
                }
            }
        }
        let limit = if self.grouping.micro_batch > 0 { self.grouping.micro_batch } else { usize::MAX };
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            if group.as_ref().is_some_and(|g| !g.contains(&id)) {
                i += 1;
                continue;
            }
            let (start, need) = {
                let s = &self.seqs[&id];
                (s.computed, s.tokens.len() - s.computed)
            };
            let n = need.min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            // make room, preempting the newest running sequences if needed
            loop {
                let s = self.seqs.get_mut(&id).expect("running sequence exists");
                if s.table.grow_to(&mut self.alloc, start + n).is_ok() {
                    break;
                }
                let victim = *self.running.last().expect("running is non-empty");
                self.preempt(victim, &mut plan);
                if victim == id {
                    break;
                }
            }
            if !self.running.contains(&id) {
                break; // preempted itself: nothing newer left to free
            }
            let total = self.seqs[&id].tokens.len();
            plan.chunks.push(ScheduledChunk { seq: id, start, len: n, sample: start + n == total });
            budget -= n;
            i += 1;
        }
        // admit waiting sequences while budget, sequence slots and blocks allow;
        // nothing is admitted in a step that had to preempt
        while plan.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.cfg.max_num_seqs
            && plan.chunks.len() < limit
        {
            let Some(&id) = self.waiting.front() else { break };
            let s = self.seqs.get_mut(&id).expect("waiting sequence exists");
            let n = (s.tokens.len() - s.computed).min(budget);
            if s.table.grow_to(&mut self.alloc, s.computed + n).is_err() {
                break; // wait for blocks
            }
            self.waiting.pop_front();
            self.running.push(id);
            plan.chunks.push(ScheduledChunk {
                seq: id,
                start: s.computed,
                len: n,
                sample: s.computed + n == s.tokens.len(),
            });
            budget -= n;
        }
        plan
    }

    fn preempt(&mut self, id: SeqId, plan: &mut StepPlan) {
        let s = self.seqs.get_mut(&id).expect("preempted sequence exists");
        s.table.release(&mut self.alloc);
        s.computed = 0;
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        plan.chunks.retain(|c| c.seq != id);
        plan.preempted.push(id);
        self.preemptions += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, block_size: usize, seqs: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig { max_num_seqs: seqs, max_batched_tokens: budget },
            BlockAllocator::new(blocks, block_size),
        )
    }

    /// Runs a step: plan, check invariants, commit, and "sample" token 7 for
    /// every sampled chunk. Returns the plan.
    fn step(s: &mut Scheduler, cfg_budget: usize, cfg_seqs: usize) -> StepPlan {
        let plan = s.schedule();
        assert!(plan.num_tokens() <= cfg_budget, "budget exceeded");
        assert!(plan.chunks.len() <= cfg_seqs, "too many sequences");
        for c in &plan.chunks {
            assert!(c.len > 0);
            assert!(s.blocks(c.seq).len() * s.alloc.block_size() >= c.start + c.len, "blocks do not cover chunk");
            assert_eq!(c.sample, c.start + c.len == s.tokens(c.seq).len());
        }
        s.commit(&plan);
        for c in plan.chunks.iter().filter(|c| c.sample) {
            s.append_token(c.seq, 7);
        }
        plan
    }

    #[test]
    fn decodes_first_then_chunked_prefill() {
        let mut s = sched(100, 4, 8, 10);
        s.add(SeqId(1), vec![1; 3]);
        let p = step(&mut s, 10, 8);
        assert_eq!(p.chunks, vec![ScheduledChunk { seq: SeqId(1), start: 0, len: 3, sample: true }]);
        s.add(SeqId(2), vec![2; 25]);
        let p = step(&mut s, 10, 8);
        assert_eq!(
            p.chunks,
            vec![
                ScheduledChunk { seq: SeqId(1), start: 3, len: 1, sample: true },
                ScheduledChunk { seq: SeqId(2), start: 0, len: 9, sample: false },
            ]
        );
        let p = step(&mut s, 10, 8);
        assert_eq!(p.chunks[0], ScheduledChunk { seq: SeqId(1), start: 4, len: 1, sample: true });
        assert_eq!(p.chunks[1], ScheduledChunk { seq: SeqId(2), start: 9, len: 9, sample: false });
        let p = step(&mut s, 10, 8);
        assert_eq!(p.chunks[1], ScheduledChunk { seq: SeqId(2), start: 18, len: 7, sample: true });
    }

    #[test]
    fn waits_for_blocks_then_preempts_newest_and_recomputes() {
        // 4 blocks of 4 slots: two sequences of 6 tokens fit (2 blocks each) until they grow
        let mut s = sched(4, 4, 8, 64);
        s.add(SeqId(1), vec![1; 6]);
        s.add(SeqId(2), vec![2; 6]);
        s.add(SeqId(3), vec![3; 2]);
        let p = step(&mut s, 64, 8);
        assert_eq!(p.chunks.len(), 2, "third waits for blocks");
        assert_eq!(s.num_waiting(), 1);
        // grow both to 8 tokens (still 2 blocks each), then to 9: no room
        step(&mut s, 64, 8);
        step(&mut s, 64, 8);
        let p = step(&mut s, 64, 8);
        assert_eq!(p.preempted, vec![SeqId(2)], "newest running sequence is preempted");
        assert_eq!(p.chunks, vec![ScheduledChunk { seq: SeqId(1), start: 8, len: 1, sample: true }]);
        assert_eq!(s.tokens(SeqId(2)).len(), 9, "preemption keeps generated tokens");
        // finishing 1 frees room; 2 is recomputed from its 9 tokens before 3
        s.remove(SeqId(1));
        let p = step(&mut s, 64, 8);
        assert_eq!(p.chunks[0], ScheduledChunk { seq: SeqId(2), start: 0, len: 9, sample: true });
        assert_eq!(s.preemptions(), 1);
    }

    #[test]
    fn remove_frees_everything() {
        let mut s = sched(10, 4, 8, 64);
        for i in 0..3 {
            s.add(SeqId(i), vec![1; 5]);
        }
        step(&mut s, 64, 8);
        assert_eq!(s.blocks_used().0, 6);
        for i in 0..3 {
            assert!(s.remove(SeqId(i)));
        }
        assert!(!s.remove(SeqId(0)));
        assert_eq!(s.blocks_used(), (0, 10));
        assert!(s.is_idle());
    }

    /// Randomised workloads (deterministic LCG): invariants hold every step
    /// and every sequence finishes.
    #[test]
    fn every_sequence_finishes_under_pressure() {
        let mut rng = 12345u64;
        let mut next = |m: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % m
        };
        for round in 0..20 {
            let (budget, seqs) = (8 + next(32) as usize, 1 + next(8) as usize);
            let mut s = sched(12 + next(20) as usize, 4, seqs, budget);
            let mut targets = HashMap::new();
            let mut next_id = 0;
            let mut finished = 0;
            for t in 0..5000 {
                if next_id < 30 && next(3) == 0 {
                    let prompt = 1 + next(20) as usize;
                    let max_new = 1 + next(12) as usize;
                    s.add(SeqId(next_id), vec![1; prompt]);
                    targets.insert(SeqId(next_id), prompt + max_new);
                    next_id += 1;
                }
                let p = step(&mut s, budget, seqs);
                for c in p.chunks.iter().filter(|c| c.sample) {
                    if s.tokens(c.seq).len() >= targets[&c.seq] {
                        s.remove(c.seq);
                        finished += 1;
                    }
                }
                let (used, total) = s.blocks_used();
                assert!(used <= total);
                if next_id == 30 && s.is_idle() {
                    break;
                }
                assert!(
                    t < 4999,
                    "round {round}: not finished ({} running, {} waiting)",
                    s.num_running(),
                    s.num_waiting()
                );
            }
            assert_eq!(finished, 30, "round {round}");
            assert_eq!(s.blocks_used().0, 0);
        }
    }
}

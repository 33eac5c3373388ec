//! Scheduling state that must stay pure and deterministic: which sequences
//! run in each step, and which KV-cache blocks each holds.
//!
//! Owns: [`Scheduler`] (continuous batching: waiting and running sequences,
//! token budget, chunked prefill, preemption by recomputation),
//! [`BlockAllocator`] (the free list of physical KV blocks) and
//! [`BlockTable`] (one sequence's logical-to-physical block map). Deals only
//! in token and block ids, never in tensors: the KV tensors live in
//! `moe-model`'s `KvCache`, addressed by the ids handed out here.
//!
//! Invariants: a block id is held by at most one table at a time; a step
//! never exceeds its token budget or sequence limit; running sequences are
//! served oldest first (unless a micro-batch is set: then [`GroupingMode`]
//! chooses which run, and no running sequence is left out more than
//! `max_deferral` steps in a row). No IO, no clocks, no async.

mod batch;
mod blocks;
mod grouping;

pub use batch::{ScheduledChunk, Scheduler, SchedulerConfig, StepPlan};
pub use blocks::{BlockAllocator, BlockTable};
pub use grouping::{GroupingConfig, GroupingMode, PathHints, UnknownGrouping};

/// Errors of the scheduling state.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    /// Not enough free KV blocks for the request.
    #[error("out of KV cache blocks: need {needed}, {free} free")]
    OutOfBlocks {
        /// Blocks requested.
        needed: usize,
        /// Blocks available.
        free: usize,
    },
    /// A micro-batch too small for the deferral bound (see
    /// `Scheduler::set_grouping`).
    #[error("a micro-batch of {micro_batch} with up to {max_num_seqs} running sequences needs a deferral bound of at least {needed} steps (got {max_deferral})")]
    DeferralBound {
        /// Sequences per step.
        micro_batch: usize,
        /// Most running sequences.
        max_num_seqs: usize,
        /// The smallest bound round robin can keep.
        needed: usize,
        /// The bound asked for.
        max_deferral: u32,
    },
}

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
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    /// Not enough free KV blocks for the request.
    #[error("out of KV cache blocks: need {needed}, {free} free")]
    OutOfBlocks {
        /// Blocks requested.
        needed: usize,
        /// Blocks available.
        free: usize,
    },
}

//! Scheduling state that must stay pure and deterministic: which KV-cache
//! blocks are free and which blocks each sequence holds.
//!
//! Owns: [`BlockAllocator`] (the free list of physical KV blocks) and
//! [`BlockTable`] (one sequence's logical-to-physical block map). Deals only
//! in block ids, never in tensors: the KV tensors live in `moe-model`'s
//! `KvCache`, addressed by the ids handed out here.
//!
//! Invariants: a block id is held by at most one table at a time; a table's
//! blocks cover exactly `ceil(tokens / block_size)` blocks. No IO, no clocks,
//! no async. The continuous-batching scheduler and ExpertFlow's token
//! regrouping land here in later work.

mod blocks;

pub use blocks::{BlockAllocator, BlockTable};

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

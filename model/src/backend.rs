//! How the engine runs a step: [`StepBackend`]. Every CPU expert provider is
//! one (the CPU forward pass over it); the GPU backend (moe-offload's
//! `GpuBackend`, feature `cuda`) runs the step on the device instead.

use crate::experts::{ExpertPlanner, ExpertProvider};
use crate::forward::{ForwardOutput, SeqChunk, Workspace};
use crate::kv_cache::KvCache;
use crate::weights::Model;
use crate::Result;

/// Runs forward steps for the engine, and answers its planning questions
/// ([`ExpertPlanner`]).
pub trait StepBackend: ExpertPlanner {
    /// One step of `model` over `chunks`. `kv` and `ws` are the engine's host
    /// KV cache and workspace; a backend with its own (a GPU) reads only
    /// `kv`'s shape and `ws`'s capture setting.
    fn forward_step(
        &mut self,
        model: &Model,
        chunks: &[SeqChunk<'_>],
        kv: &mut KvCache,
        ws: &mut Workspace,
    ) -> Result<ForwardOutput>;

    /// Whether keys and values live in the engine's host [`KvCache`]
    /// (false: the backend keeps its own, and the engine allocates the host
    /// cache without storage).
    fn host_kv(&self) -> bool {
        true
    }
}

impl<E: ExpertProvider + ExpertPlanner + Sync> StepBackend for E {
    fn forward_step(
        &mut self,
        model: &Model,
        chunks: &[SeqChunk<'_>],
        kv: &mut KvCache,
        ws: &mut Workspace,
    ) -> Result<ForwardOutput> {
        model.forward(chunks, kv, &*self, ws)
    }
}

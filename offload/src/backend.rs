//! [`DeviceBackend`]: the engine's [`StepBackend`] over a device, a device
//! forward pass ([`DeviceModel`]) and its expert tier. On a GPU it is
//! `gpu::GpuBackend` (feature `cuda`); the tests run it on host memory
//! (`tests/tests/device_tier.rs`), so this glue is the one the GPU uses.

use moe_model::device::{Device, DeviceExperts, DeviceModel};
use moe_model::{ExpertPlanner, ForwardOutput, KvCache, Model, SeqChunk, StepBackend, StepToken, Workspace};
use moe_types::{ExpertSet, SeqId};

/// A device model and its expert tier, as the engine drives them.
pub struct DeviceBackend<D: Device, T> {
    model: DeviceModel<D>,
    experts: T,
}

impl<D: Device, T> DeviceBackend<D, T> {
    /// Pairs a device model with its expert tier (on the same device).
    pub fn new(model: DeviceModel<D>, experts: T) -> Self {
        Self { model, experts }
    }

    /// The expert tier (counters).
    pub fn experts(&self) -> &T {
        &self.experts
    }

    /// The device model (sizes).
    pub fn model(&self) -> &DeviceModel<D> {
        &self.model
    }

    /// The device model and the tier, to run [`DeviceModel::forward`] directly.
    pub fn parts(&mut self) -> (&mut DeviceModel<D>, &mut T) {
        (&mut self.model, &mut self.experts)
    }
}

impl<D: Device, T: ExpertPlanner> ExpertPlanner for DeviceBackend<D, T> {
    fn begin_step(&self, tokens: &[StepToken]) {
        self.experts.begin_step(tokens);
    }

    fn end_sequence(&self, seq: SeqId) {
        self.experts.end_sequence(seq);
    }

    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        self.experts.predict_paths(tokens)
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        self.experts.resident_sets()
    }
}

impl<D: Device, T: DeviceExperts<D> + ExpertPlanner> StepBackend for DeviceBackend<D, T> {
    fn forward_step(
        &mut self,
        model: &Model,
        chunks: &[SeqChunk<'_>],
        _kv: &mut KvCache,
        ws: &mut Workspace,
    ) -> moe_model::Result<ForwardOutput> {
        self.model.capture_hidden(ws.captures_hidden());
        self.model.forward(model, chunks, &mut self.experts)
    }

    /// The device holds the KV cache.
    fn host_kv(&self) -> bool {
        false
    }
}

//! A fast tier on a slot device, as a forward pass drives it: the residency
//! core, a [`DeviceMover`] and the decoder-layer map. Generic over the
//! [`SlotDevice`], so everything the GPU tier decides (pins, demand loads,
//! forecasts, releases, counters) is tested on CPU against a fake device;
//! moe-offload's `GpuExperts` is this over the GPU slot pool.

use super::{CopyStats, DeviceMover, Pin, ResidencyCore, SlotDevice};
use crate::stats::Publisher;
use moe_model::{ModelError, StepToken};
use moe_types::{ExpertId, ExpertKey, LayerId, LayerRouting, MoeLayerId};

/// The residency core driving a slot device, per decoder layer.
pub struct DeviceTier<D> {
    core: ResidencyCore,
    mover: DeviceMover<D>,
    /// Decoder layer -> MoE index.
    moe_of: Vec<Option<MoeLayerId>>,
    published: Publisher,
    /// Copy waits already published.
    waits: u64,
}

fn refused(e: impl std::fmt::Display) -> ModelError {
    ModelError::ExpertTier(e.to_string())
}

impl<D: SlotDevice> DeviceTier<D> {
    /// `core` over `dev` (same slots, empty) for a model of `num_layers`
    /// decoder layers whose MoE layers are `moe_layers` (ascending).
    pub fn new(core: ResidencyCore, dev: D, num_layers: usize, moe_layers: &[usize]) -> Self {
        let mut moe_of = vec![None; num_layers];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_of[l] = Some(MoeLayerId(i as u16));
        }
        Self { core, mover: DeviceMover::new(dev), moe_of, published: Publisher::new(moe_layers.len()), waits: 0 }
    }

    /// The core (counters, residency).
    pub fn core(&self) -> &ResidencyCore {
        &self.core
    }

    /// The device.
    pub fn device(&self) -> &D {
        self.mover.device()
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        self.mover.device_mut()
    }

    /// Copy counters.
    pub fn copy_stats(&self) -> CopyStats {
        self.mover.stats()
    }

    /// The MoE index of decoder layer `layer`.
    pub fn moe(&self, layer: LayerId) -> Result<MoeLayerId, ModelError> {
        self.moe_of
            .get(layer.index())
            .copied()
            .flatten()
            .ok_or_else(|| ModelError::Input(format!("layer {} has no experts", layer.index())))
    }

    /// The key of an expert of decoder layer `layer`.
    pub fn key(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertKey, ModelError> {
        Ok(ExpertKey { layer: self.moe(layer)?, expert })
    }

    /// Queues the copy of every expert of `layers x experts` (a tier with a
    /// slot for each); the caller waits for the device if it must.
    pub fn load_all(&mut self, layers: usize, experts: usize) -> Result<(), ModelError> {
        for l in 0..layers {
            for e in 0..experts {
                let key = ExpertKey { layer: MoeLayerId(l as u16), expert: ExpertId(e as u16) };
                if self.core.pin(key, false).map_err(refused)? == Pin::Wait {
                    self.mover.pump(&mut self.core).map_err(refused)?;
                }
                self.core.unpin(key).map_err(refused)?;
            }
        }
        self.mover.pump(&mut self.core).map_err(refused)?;
        self.mover.reap().map_err(refused)
    }

    /// A step begins: counters are published, the first layers' forecasts
    /// start copying before the step's compute.
    pub fn begin_step(&mut self, tokens: &[StepToken]) {
        self.publish();
        self.core.begin_step(tokens);
        // a prefetch the device refuses is a failed load for the core, not an error of this step
        let _ = self.mover.pump(&mut self.core);
    }

    /// Look-ahead gating: while `from` runs, `layer`'s router chose `ids`.
    pub fn forecast(&mut self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        let (Ok(from), Ok(layer)) = (self.moe(from), self.moe(layer)) else { return };
        self.core.gating(from, layer, ids);
        let _ = self.mover.pump(&mut self.core);
    }

    /// The residual stream entering MoE layer `layer`.
    pub fn hidden(&mut self, layer: LayerId, h: &[f32]) {
        let Ok(layer) = self.moe(layer) else { return };
        self.core.hidden(layer, h);
        let _ = self.mover.pump(&mut self.core);
    }

    /// MoE layer `routing.layer` runs next over `used`: each is made resident
    /// (its copy queued, ordered on the device before the compute that reads
    /// it) and pinned until [`Self::release`].
    pub fn prepare(&mut self, routing: &LayerRouting, used: &[ExpertId]) -> Result<(), ModelError> {
        let moe = self.moe(routing.layer)?;
        let unavailable = |e: ExpertId, message: String| ModelError::ExpertUnavailable {
            layer: routing.layer.index(),
            expert: e.index(),
            message,
        };
        self.mover.reap().map_err(refused)?;
        self.core.prepare(moe, routing, used).map_err(refused)?;
        self.mover.pump(&mut self.core).map_err(refused)?;
        for (i, &e) in used.iter().enumerate() {
            let key = ExpertKey { layer: moe, expert: e };
            let mut waited = false;
            loop {
                match self.core.pin(key, waited).map_err(refused)? {
                    Pin::Ready(_) => break,
                    Pin::Failed(msg) => {
                        self.unpin_all(moe, &used[..i]);
                        return Err(unavailable(e, msg));
                    }
                    // queued: issuing it reports it (loads are reported when queued)
                    Pin::Wait if !waited => {
                        self.mover.pump(&mut self.core).map_err(refused)?;
                        waited = true;
                    }
                    Pin::Wait => {
                        self.unpin_all(moe, &used[..i]);
                        return Err(unavailable(e, "no slot could be freed for it".into()));
                    }
                }
            }
            self.mover.needed(key).map_err(refused)?;
        }
        Ok(())
    }

    fn unpin_all(&mut self, moe: MoeLayerId, experts: &[ExpertId]) {
        for &e in experts {
            let _ = self.core.unpin(ExpertKey { layer: moe, expert: e });
        }
    }

    /// The products reading `used` are queued: their pins go, and slots that
    /// frees may admit prefetches.
    pub fn release(&mut self, layer: LayerId, used: &[ExpertId]) -> Result<(), ModelError> {
        let moe = self.moe(layer)?;
        self.unpin_all(moe, used);
        self.mover.pump(&mut self.core).map_err(refused)
    }

    /// A sequence ended: the predictor forgets it.
    pub fn end_sequence(&mut self, seq: moe_types::SeqId) {
        self.core.end_sequence(seq);
    }

    /// The forecast paths of `tokens`, for the engine's regrouping.
    pub fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<moe_types::ExpertSet>>> {
        self.core.predict_paths(tokens)
    }

    /// The resident experts of each MoE layer, for the engine's regrouping.
    pub fn resident_sets(&self) -> Vec<moe_types::ExpertSet> {
        self.core.resident_sets()
    }

    /// Publishes the counters that changed since the last call.
    pub fn publish(&mut self) {
        self.published.publish(&self.core);
        let waited = self.mover.stats().waited;
        metrics::counter!(crate::metric_names::COPY_WAITS).increment(waited - self.waits);
        self.waits = waited;
    }
}

#[cfg(test)]
mod tests;

//! The GPU backend (feature `cuda`): the model's forward pass on the device
//! ([`moe_model::gpu::GpuModel`]) over a GPU expert tier ([`GpuExperts`]).
//!
//! Three tiers: expert slots in device memory (the fast tier, `slots` of
//! them), pinned host memory holding every expert (the middle tier, filled
//! once from the [`ExpertSource`]: the checkpoint's files), and the files.
//! The [`ResidencyCore`] decides what sits in the slots exactly as on the
//! CPU (same policies and predictors); a [`DeviceMover`] queues its copies on
//! the pool's copy stream, so prefetches of forecast experts overlap the
//! current layer's compute, and the compute stream waits, on the device, only
//! for the experts it reads.

use crate::residency::{CopyStats, DeviceMover, Pin, ResidencyConfig, ResidencyCore, SlotDevice};
use crate::stats::{CacheStats, Publisher};
use crate::{ExpertSource, OffloadError, PolicyKind, PredictorKind};
use moe_kernels::cuda::expert_pool::{ExpertSlotPool, PoolShape};
use moe_kernels::cuda::{CudaError, GpuContext};
use moe_model::gpu::{GpuExpertTier, GpuModel};
use moe_model::{
    ExpertPlanner, ForwardOutput, KvCache, Model, ModelConfig, ModelError, SeqChunk, StepBackend, StepToken, Workspace,
};
use moe_types::{ExpertId, ExpertKey, ExpertSet, LayerId, LayerRouting, MoeLayerId, SeqId, SlotId};
use std::sync::{Mutex, MutexGuard};

impl SlotDevice for ExpertSlotPool {
    type Error = CudaError;

    fn load_into(&mut self, key: ExpertKey, slot: SlotId) -> Result<(), CudaError> {
        ExpertSlotPool::load_into(self, key, slot)
    }

    fn evict(&mut self, key: ExpertKey) -> Result<SlotId, CudaError> {
        ExpertSlotPool::evict(self, key)
    }

    fn is_ready(&self, key: ExpertKey) -> Result<bool, CudaError> {
        ExpertSlotPool::is_ready(self, key)
    }
}

/// How the GPU expert tier is set up.
#[derive(Clone, Debug)]
pub struct GpuTierConfig {
    /// Expert slots in device memory (at least one MoE layer's experts; all
    /// of them for a fully resident model).
    pub slots: usize,
    /// Victim choice.
    pub policy: PolicyKind,
    /// Forecasts for prefetching.
    pub predictor: PredictorKind,
    /// MoE layers ahead to forecast and prefetch.
    pub depth: usize,
    /// Forecasts less precise than this are not prefetched.
    pub min_precision: f64,
}

struct TierState {
    core: ResidencyCore,
    mover: DeviceMover<ExpertSlotPool>,
    published: Publisher,
    /// Copy waits already published.
    waits: u64,
}

impl TierState {
    /// Publishes the counters that changed (once per step).
    fn publish(&mut self) {
        self.published.publish(&self.core);
        let waited = self.mover.stats().waited;
        metrics::counter!(crate::metric_names::COPY_WAITS).increment(waited - self.waits);
        self.waits = waited;
    }
}

/// Expert slots on the GPU over pinned host memory, driven by a residency core.
pub struct GpuExperts {
    state: Mutex<TierState>,
    /// Decoder layer -> MoE index.
    moe_of: Vec<Option<MoeLayerId>>,
    lookahead: usize,
    wants_hidden: bool,
}

fn gpu_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Unsupported(format!("GPU expert tier: {e}"))
}

impl GpuExperts {
    /// Stages every expert of `model` from `source` into pinned host memory
    /// and allocates `cfg.slots` device slots (empty: the first steps load
    /// on demand, or every expert is loaded now when the slots hold them all).
    pub fn new(
        g: &GpuContext,
        model: &ModelConfig,
        source: &dyn ExpertSource,
        cfg: GpuTierConfig,
    ) -> Result<Self, OffloadError> {
        cfg.predictor.check_width(model.hidden_size)?;
        let moe_layers: Vec<usize> = model.moe_layers().collect();
        let shape = PoolShape {
            hidden: model.hidden_size,
            ffn: model.moe.expert_ffn,
            layers: moe_layers.len(),
            experts: model.moe.num_experts,
            slots: cfg.slots,
        };
        let core = ResidencyCore::new(ResidencyConfig {
            layers: moe_layers.len(),
            experts: model.moe.num_experts,
            top_k: model.moe.top_k,
            slots: cfg.slots,
            expert_bytes: 2 * shape.slot_elems() as u64,
            policy: cfg.policy,
            predictor: cfg.predictor,
            depth: cfg.depth,
            min_precision: cfg.min_precision,
        })?;
        let cuda = |e: CudaError| OffloadError::Config(format!("GPU expert tier: {e}"));
        let mut pool = ExpertSlotPool::new(g, shape).map_err(cuda)?;
        for (moe, &l) in moe_layers.iter().enumerate() {
            for e in 0..shape.experts {
                let w = source.load(LayerId(l as u16), ExpertId(e as u16))?;
                let key = ExpertKey { layer: MoeLayerId(moe as u16), expert: ExpertId(e as u16) };
                pool.stage(key, &w.gate_up, &w.down).map_err(cuda)?;
            }
        }
        let mut moe_of = vec![None; model.num_layers()];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_of[l] = Some(MoeLayerId(i as u16));
        }
        let lookahead = core.lookahead();
        let wants_hidden = core.wants_hidden();
        metrics::gauge!(crate::metric_names::SLOTS).set(cfg.slots as f64);
        let state =
            TierState { core, mover: DeviceMover::new(pool), published: Publisher::new(moe_layers.len()), waits: 0 };
        let tier = Self { state: Mutex::new(state), moe_of, lookahead, wants_hidden };
        if cfg.slots >= shape.layers * shape.experts {
            tier.load_all().map_err(|e| OffloadError::Config(e.to_string()))?;
        }
        Ok(tier)
    }

    fn lock(&self) -> MutexGuard<'_, TierState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the copy of every expert (fully resident), then waits for them.
    fn load_all(&self) -> Result<(), ModelError> {
        let mut st = self.lock();
        let TierState { core, mover, .. } = &mut *st;
        let shape = mover.device().shape();
        let (layers, experts) = (shape.layers, shape.experts);
        for l in 0..layers {
            for e in 0..experts {
                let key = ExpertKey { layer: MoeLayerId(l as u16), expert: ExpertId(e as u16) };
                if core.pin(key, false).map_err(gpu_err)? == Pin::Wait {
                    mover.pump(core).map_err(gpu_err)?;
                }
                core.unpin(key).map_err(gpu_err)?;
            }
        }
        mover.pump(core).map_err(gpu_err)?;
        mover.device().synchronize_copies().map_err(gpu_err)?;
        mover.reap().map_err(gpu_err)?;
        Ok(())
    }

    fn moe(&self, layer: LayerId) -> Result<MoeLayerId, ModelError> {
        self.moe_of
            .get(layer.index())
            .copied()
            .flatten()
            .ok_or_else(|| ModelError::Input(format!("layer {} has no experts", layer.index())))
    }

    /// The residency counters (hits, misses, prefetches, bytes).
    pub fn stats(&self) -> CacheStats {
        self.lock().core.stats()
    }

    /// The copy counters (copies queued; experts needed while their copy ran).
    pub fn copy_stats(&self) -> CopyStats {
        self.lock().mover.stats()
    }

    /// Bytes copied host-to-device so far.
    pub fn bytes_copied(&self) -> u64 {
        self.lock().mover.device().bytes_loaded()
    }
}

impl GpuExpertTier for GpuExperts {
    fn lookahead(&self) -> usize {
        self.lookahead
    }

    fn forecast(&mut self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        let (Ok(from), Ok(layer)) = (self.moe(from), self.moe(layer)) else { return };
        let mut st = self.lock();
        let TierState { core, mover, .. } = &mut *st;
        core.gating(from, layer, ids);
        // a prefetch the device refuses is a failed load for the core, not an error of this step
        let _ = mover.pump(core);
    }

    fn wants_hidden(&self) -> bool {
        self.wants_hidden
    }

    fn hidden(&mut self, layer: LayerId, h: &[f32]) {
        let Ok(layer) = self.moe(layer) else { return };
        let mut st = self.lock();
        let TierState { core, mover, .. } = &mut *st;
        core.hidden(layer, h);
        let _ = mover.pump(core);
    }

    fn prepare(&mut self, _g: &GpuContext, routing: &LayerRouting, used: &[ExpertId]) -> moe_model::Result<()> {
        let moe = self.moe(routing.layer)?;
        let mut st = self.lock();
        let TierState { core, mover, .. } = &mut *st;
        mover.reap().map_err(gpu_err)?;
        core.prepare(moe, routing, used).map_err(gpu_err)?;
        mover.pump(core).map_err(gpu_err)?;
        for &e in used {
            let key = ExpertKey { layer: moe, expert: e };
            let mut waited = false;
            loop {
                match core.pin(key, waited).map_err(gpu_err)? {
                    Pin::Ready(_) => break,
                    Pin::Failed(msg) => {
                        return Err(ModelError::ExpertUnavailable {
                            layer: routing.layer.index(),
                            expert: e.index(),
                            message: msg,
                        })
                    }
                    // queued: issuing it reports it (loads are reported when queued)
                    Pin::Wait if !waited => {
                        mover.pump(core).map_err(gpu_err)?;
                        waited = true;
                    }
                    Pin::Wait => {
                        return Err(ModelError::ExpertUnavailable {
                            layer: routing.layer.index(),
                            expert: e.index(),
                            message: "no slot could be freed for it".into(),
                        })
                    }
                }
            }
            mover.needed(key).map_err(gpu_err)?;
        }
        Ok(())
    }

    fn pool(&mut self) -> &ExpertSlotPool {
        self.state.get_mut().unwrap_or_else(|p| p.into_inner()).mover.device()
    }

    fn key(&self, layer: LayerId, expert: ExpertId) -> moe_model::Result<ExpertKey> {
        Ok(ExpertKey { layer: self.moe(layer)?, expert })
    }

    fn release(&mut self, layer: LayerId, used: &[ExpertId]) -> moe_model::Result<()> {
        let moe = self.moe(layer)?;
        let mut st = self.lock();
        for &e in used {
            st.core.unpin(ExpertKey { layer: moe, expert: e }).map_err(gpu_err)?;
        }
        let TierState { core, mover, .. } = &mut *st;
        // slots freed by the unpins may admit prefetches now
        mover.pump(core).map_err(gpu_err)?;
        Ok(())
    }
}

impl ExpertPlanner for GpuExperts {
    fn begin_step(&self, tokens: &[StepToken]) {
        let mut st = self.lock();
        st.publish();
        let TierState { core, mover, .. } = &mut *st;
        core.begin_step(tokens);
        // the first layers' forecasts start copying before the step's compute
        let _ = mover.pump(core);
    }

    fn end_sequence(&self, seq: SeqId) {
        self.lock().core.end_sequence(seq);
    }

    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        self.lock().core.predict_paths(tokens)
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        self.lock().core.resident_sets()
    }
}

/// The engine's backend on a GPU: the model on the device and the GPU expert tier.
pub struct GpuBackend {
    model: GpuModel,
    experts: GpuExperts,
}

impl GpuBackend {
    /// Pairs a device model with its expert tier (built on the same context).
    pub fn new(model: GpuModel, experts: GpuExperts) -> Self {
        Self { model, experts }
    }

    /// The expert tier (counters).
    pub fn experts(&self) -> &GpuExperts {
        &self.experts
    }

    /// The device model (sizes).
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The device model and the tier, to run [`GpuModel::forward`] directly.
    pub fn parts(&mut self) -> (&mut GpuModel, &mut GpuExperts) {
        (&mut self.model, &mut self.experts)
    }
}

impl ExpertPlanner for GpuBackend {
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

impl StepBackend for GpuBackend {
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

    fn host_kv(&self) -> bool {
        false
    }
}

/// The engine thread owns the backend: it must move there.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<GpuBackend>();
};

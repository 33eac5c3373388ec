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

use crate::backend::DeviceBackend;
use crate::residency::{CopyStats, DeviceTier, ResidencyConfig, ResidencyCore, SlotDevice};
use crate::stats::CacheStats;
use crate::{ExpertSource, OffloadError, PolicyKind, PredictorKind};
use moe_kernels::cuda::expert_pool::{ExpertSlotPool, PoolShape};
use moe_kernels::cuda::{CudaError, GpuContext};
use moe_model::device::DeviceExperts;
use moe_model::gpu::{CudaDevice, CudaExpert};
use moe_model::{ExpertPlanner, ModelConfig, ModelError, StepToken};
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

/// Expert slots on the GPU over pinned host memory, driven by a residency core.
pub struct GpuExperts {
    /// Behind a mutex for the engine's planner, which asks through `&self`.
    state: Mutex<DeviceTier<ExpertSlotPool>>,
    lookahead: usize,
    wants_hidden: bool,
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
        let lookahead = core.lookahead();
        let wants_hidden = core.wants_hidden();
        metrics::gauge!(crate::metric_names::SLOTS).set(cfg.slots as f64);
        let mut tier = DeviceTier::new(core, pool, model.num_layers(), &moe_layers);
        if cfg.slots >= shape.layers * shape.experts {
            let full = |e: ModelError| OffloadError::Config(format!("GPU expert tier: loading every expert: {e}"));
            tier.load_all(shape.layers, shape.experts).map_err(full)?;
            tier.device().synchronize_copies().map_err(cuda)?;
        }
        Ok(Self { state: Mutex::new(tier), lookahead, wants_hidden })
    }

    fn lock(&self) -> MutexGuard<'_, DeviceTier<ExpertSlotPool>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tier(&mut self) -> &mut DeviceTier<ExpertSlotPool> {
        self.state.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// The residency counters (hits, misses, prefetches, bytes).
    pub fn stats(&self) -> CacheStats {
        self.lock().core().stats()
    }

    /// The copy counters (copies queued; experts needed while their copy ran).
    pub fn copy_stats(&self) -> CopyStats {
        self.lock().copy_stats()
    }

    /// Bytes copied host-to-device so far.
    pub fn bytes_copied(&self) -> u64 {
        self.lock().device().bytes_loaded()
    }
}

impl DeviceExperts<CudaDevice> for GpuExperts {
    fn lookahead(&self) -> usize {
        self.lookahead
    }

    fn forecast(&mut self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        self.tier().forecast(from, layer, ids);
    }

    fn wants_hidden(&self) -> bool {
        self.wants_hidden
    }

    fn hidden(&mut self, layer: LayerId, h: &[f32]) {
        self.tier().hidden(layer, h);
    }

    fn prepare(&mut self, routing: &LayerRouting, used: &[ExpertId]) -> moe_model::Result<()> {
        self.tier().prepare(routing, used)
    }

    fn expert(&mut self, layer: LayerId, expert: ExpertId) -> moe_model::Result<CudaExpert<'_>> {
        let tier = self.tier();
        let key = tier.key(layer, expert)?;
        Ok(CudaExpert { pool: tier.device(), key })
    }

    fn release(&mut self, layer: LayerId, used: &[ExpertId]) -> moe_model::Result<()> {
        self.tier().release(layer, used)
    }
}

impl ExpertPlanner for GpuExperts {
    fn begin_step(&self, tokens: &[StepToken]) {
        self.lock().begin_step(tokens);
    }

    fn end_sequence(&self, seq: SeqId) {
        self.lock().end_sequence(seq);
    }

    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        self.lock().predict_paths(tokens)
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        self.lock().resident_sets()
    }
}

/// The engine's backend on a GPU: the model on the device and the GPU expert tier.
pub type GpuBackend = DeviceBackend<CudaDevice, GpuExperts>;

/// The engine thread owns the backend: it must move there.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<GpuBackend>();
};

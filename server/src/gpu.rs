//! `--device cuda` (feature `cuda`): loads a model onto the GPU. Non-expert
//! weights go to the device once; every expert is staged from the
//! checkpoint into pinned host memory (the middle tier) and the device holds
//! `--expert-cache` of them (the fast tier: all by default), under the same
//! `--expert-policy`, `--predictor` and `--prefetch-depth` as on the CPU.

use crate::offload::OffloadSettings;
use anyhow::Context;
use moe_kernels::cuda::GpuContext;
use moe_model::gpu::{CudaDevice, GpuModel};
use moe_model::{Model, QuantTarget, TextCodec};
use moe_offload::gpu::{GpuBackend, GpuExperts, GpuTierConfig};
use moe_offload::{DiskExperts, DiskIo, ExpertSource, MemoryExperts};
use std::path::Path;

/// A model loaded for the GPU: the host copy of the non-expert weights (the
/// engine's planner and sampling read its configuration), the backend and
/// the tokenizer.
pub struct GpuServed {
    /// Non-expert weights (host copy; the device has its own).
    pub model: Model,
    /// The device model and expert tier.
    pub backend: GpuBackend,
    /// Tokenizer and generation facts.
    pub codec: TextCodec,
}

/// The host side of a GPU load: non-expert weights, tokenizer, and where
/// the experts are read from.
pub struct GpuHost {
    model: Model,
    codec: TextCodec,
    source: Box<dyn ExpertSource>,
}

/// Reads the model in `dir` for the GPU: non-expert weights and tokenizer
/// now, experts later ([`GpuHost::upload`]) straight into pinned memory.
pub fn load_host(dir: &Path, random_weights: bool, settings: &OffloadSettings) -> anyhow::Result<GpuHost> {
    if settings.quantize.target != QuantTarget::None {
        anyhow::bail!("--device cuda computes with the checkpoint's bf16 or f32 weights: drop --quantize-experts");
    }
    let ctx = || format!("loading model from {}", dir.display());
    let (model, codec, source): (Model, TextCodec, Box<dyn ExpertSource>) = if random_weights {
        let m = moe_model::load_random(dir, 0).with_context(ctx)?;
        (m.model, m.codec, Box::new(MemoryExperts::new(m.experts.into_weights())))
    } else {
        let mut bar = crate::model_dir::Bar(None);
        let (model, codec) = moe_model::load_model_without_experts(dir, &mut bar).with_context(ctx)?;
        bar.finish();
        // each expert is read once, into pinned memory
        let disk = DiskExperts::open(dir, model.config(), DiskIo::Cached).with_context(ctx)?;
        (model, codec, Box::new(disk))
    };
    Ok(GpuHost { model, codec, source })
}

impl GpuHost {
    /// The tokenizer (to size the KV cache from a prompt before uploading).
    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// The model's configuration.
    pub fn config(&self) -> &moe_model::ModelConfig {
        self.model.config()
    }

    /// Uploads to GPU 0 with a device KV cache of `kv_blocks` blocks of
    /// `block_size` slots, experts staged into pinned memory and
    /// `--expert-cache` of them given device slots.
    pub fn upload(
        self,
        dir: &Path,
        settings: &OffloadSettings,
        (kv_blocks, block_size): (usize, usize),
    ) -> anyhow::Result<GpuServed> {
        let GpuHost { model, codec, source } = self;
        let cfg = model.config();
        let total = cfg.moe_layers().count() * cfg.moe.num_experts;
        // a byte budget counts device slots, which hold bf16 experts whatever the file holds
        let slot_bytes = model.gpu_plan(0, block_size, 0).context("--device cuda")?.slot_bytes;
        let slots = settings.budget.slots(total, slot_bytes).unwrap_or(total);
        let plan = model.gpu_plan(kv_blocks, block_size, slots).context("--device cuda")?;
        crate::memory::check_fits(
            plan.pinned_host as u64,
            "--device cuda: the experts, staged in pinned host memory,",
            "serve a smaller model",
        )?;
        let gpu = GpuContext::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
        tracing::info!(device = %gpu.info(), "GPU");
        fits_device(&plan, gpu.info().total_mem)?;
        let device = GpuModel::new(CudaDevice::new(gpu), &model, kv_blocks, block_size).context("--device cuda")?;
        let tier = GpuTierConfig {
            slots,
            policy: settings.policy,
            predictor: settings.predictor_kind(dir),
            depth: settings.prefetch.depth,
            min_precision: settings.prefetch.min_precision,
        };
        let experts =
            GpuExperts::new(device.gpu(), cfg, source.as_ref(), tier).context("--device cuda: expert tier")?;
        metrics::gauge!(moe_engine::metric_names::NON_EXPERT_BYTES).set(device.weight_bytes() as f64);
        tracing::info!(
            weights = %crate::memory::gib(device.weight_bytes() as u64),
            kv_cache = %crate::memory::gib(device.kv_bytes() as u64),
            expert_slots = slots,
            experts = total,
            "model on the GPU"
        );
        Ok(GpuServed { model, backend: GpuBackend::new(device, experts), codec })
    }
}

/// Device memory kept free for the step buffers, cuBLAS's workspace and the
/// driver: a fifteenth of the card.
const DEVICE_HEADROOM: f64 = 1.0 / 15.0;

/// A clear error when the plan does not fit a device of `total` bytes.
fn fits_device(plan: &moe_model::GpuPlan, total: usize) -> anyhow::Result<()> {
    let usable = (total as f64 * (1.0 - DEVICE_HEADROOM)) as u64;
    let need = plan.device_bytes() as u64;
    let gib = |b: usize| crate::memory::gib(b as u64);
    anyhow::ensure!(
        need <= usable,
        "--device cuda: the model needs {} on the GPU (weights {}, KV cache {}, {} expert slots of {}) but {} of \
         its {} are usable: lower --expert-cache or --kv-cache-tokens",
        gib(plan.device_bytes()),
        gib(plan.weights),
        gib(plan.kv),
        plan.slots,
        gib(plan.slot_bytes),
        crate::memory::gib(usable),
        gib(total)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_larger_than_the_card_names_the_flags_to_lower() {
        let plan = moe_model::GpuPlan { weights: 1 << 30, kv: 1 << 30, slots: 64, slot_bytes: 1 << 26, pinned_host: 0 };
        assert!(fits_device(&plan, 8 << 30).is_ok());
        let e = fits_device(&plan, 4 << 30).unwrap_err().to_string();
        assert!(e.contains("--expert-cache") && e.contains("64 expert slots"), "{e}");
    }
}

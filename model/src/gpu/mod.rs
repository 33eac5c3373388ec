//! The forward pass on an NVIDIA GPU (feature `cuda`).
//!
//! [`GpuModel`] holds the model's non-expert weights on the device (uploaded
//! once), the paged KV cache in device memory and the step's activations;
//! experts are reached through a [`GpuExpertTier`] (moe-offload's GPU tier:
//! expert slots in device memory filled from pinned host memory, decided by
//! the residency core). Per step: token ids, positions, cache rows and rotary
//! tables go up once ([`crate::StepLayout`]); each MoE layer's router logits
//! come down (routing runs on the host by the very rule the CPU path uses, so
//! both choose the same experts from the same logits and the tier learns the
//! routing before the experts run); logits come down for sampling.
//!
//! Precision: products take bf16 activations against bf16 weights with f32
//! accumulation (see `moe_kernels::cuda::gemm`); everything else is f32.
//! Greedy output matches the CPU path except where two candidates are within
//! that rounding (checked on a GPU by `scripts/gpu-check.sh`).
//!
//! Status: compiled and its host-side layout tested everywhere; run on a GPU
//! only by `scripts/gpu-check.sh`.

mod forward;
mod tier;
mod weights;

pub use forward::GpuModel;
pub use tier::GpuExpertTier;

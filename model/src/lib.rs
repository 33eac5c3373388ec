//! MoE language models: checkpoint loading, the forward pass, sampling and
//! tokenization.
//!
//! Owns: [`ModelConfig`] (a checkpoint's `config.json`, parsed once into a
//! typed description), [`Model`] (non-expert weights and the forward pass),
//! the [`ExpertProvider`] view through which every expert is reached,
//! [`KvCache`] (paged KV tensors addressed by block ids), [`Sampler`], and
//! [`TextCodec`] (tokenizer, chat template source, generation defaults).
//!
//! Not here: which sequences run together (`moe-scheduler`), which experts are
//! resident (the expert cache, later), wire formats (`moe-server`). The model
//! never owns the KV cache or the experts: both are passed into
//! [`Model::forward`], so the engine decides batching and residency.
//!
//! Checkpoints: HuggingFace directories (safetensors) and GGUF files
//! ([`gguf`]), both indexed under HuggingFace tensor names so one loader
//! serves both.
//!
//! With feature `cuda`, [`gpu`] runs the same forward pass on an NVIDIA GPU
//! (what it covers is decided on the host by [`Model::gpu_plan`]).
//!
//! Invariants: compute is f32; weights keep the checkpoint precision (f32,
//! bf16 or GGUF's quantized blocks; f16 is widened at load). The forward pass is deterministic and free
//! of IO, clocks and environment reads.

mod arch;
mod attention;
mod backend;
mod checkpoint;
mod config;
pub mod device;
mod error;
mod experts;
mod forward;
mod fp8;
pub mod gguf;
mod gpt_oss;
#[cfg(feature = "cuda")]
pub mod gpu;
mod gpu_plan;
mod kv_cache;
mod loader;
mod mla;
mod moe;
mod quantize;
pub mod random;
mod rope;
mod routing;
pub mod sampling;
mod step_layout;
mod tokenizer;
mod weights;

pub use backend::StepBackend;
pub use checkpoint::{Checkpoint, StoredType, TensorLocation};
pub use config::{
    Arch, AttentionConfig, ExpertAct, FfnKind, MlaConfig, ModelConfig, MoeConfig, QkNorm, RopeScaling, Routing, Yarn,
};
pub use error::ModelError;
pub use experts::{
    locate_experts, ExpertLocation, ExpertPlanner, ExpertProvider, ExpertWeights, ResidentExperts, StepToken,
};
pub use forward::{ForwardOutput, LogitRow, LogitsRequest, SeqChunk, Workspace};
pub use gpu_plan::GpuPlan;
pub use kv_cache::KvCache;
pub use loader::{
    load_model, load_model_without_experts, load_random, load_weights, read_config, LoadProgress, LoadedModel,
};
pub use mla::LatentPath;
pub use quantize::{quantize_weight, QuantScope, QuantTarget};
pub use sampling::{SampledToken, Sampler, SamplingParams};
pub use step_layout::{LayoutTooLarge, StepLayout};
pub use tokenizer::{GenerationDefaults, IncrementalDecoder, TextCodec};
pub use weights::Model;

/// Shorthand for results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

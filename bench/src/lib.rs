//! The benchmarks behind `moe-serve bench`, `bench-offload` and
//! `bench-regroup`, kept out of the server crate so that it holds only what
//! serves. Each runs the real engine (`moe_engine::EngineCore`) and returns
//! its figures and a markdown table; the binary prints them.
//!
//! Owns: [`throughput`] (prefill and decode tokens/s against the read
//! bandwidth bound, engine throughput at several batch sizes), [`offload`]
//! (expert-cache budgets x policies x predictors against Belady and the
//! oracle prefetcher, with greedy tokens checked identical to full
//! residency), [`regroup`] (distinct experts per micro-batch, fcfs against
//! regrouping). Timing uses the wall clock; nothing here is on the serving
//! path.

pub mod device_ops;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod offload;
pub mod regroup;
pub mod throughput;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The model failed (checkpoint, forward pass).
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    /// The engine refused a request or a configuration.
    #[error(transparent)]
    Engine(#[from] moe_engine::EngineError),
    /// The expert cache could not be set up.
    #[error(transparent)]
    Offload(#[from] moe_offload::OffloadError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

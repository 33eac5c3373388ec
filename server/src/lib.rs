//! The `moe-serve` binary's library: the front ends over the engine.
//!
//! Owns: `serve` (the OpenAI-compatible REST API in [`http`] and the gRPC
//! API in [`grpc`], over the continuous-batching engine of `moe-engine`),
//! [`frontend`] (what both protocols share: request rules, generation,
//! stop strings, the error mapping), `config` (flags, environment, TOML),
//! `generate` (stream one completion to stdout through the engine's step
//! loop) and `trace` (routing traces). Benchmarks live in `moe-bench`. This
//! crate is the only place that knows wire formats, the terminal and signals.

pub mod config;
pub mod device;
pub mod frontend;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod grpc;
pub mod http;
pub mod memory;
pub mod model_dir;
pub mod offload;
pub mod serve;
pub mod trace;

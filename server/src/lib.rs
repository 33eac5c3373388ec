//! The `moe-serve` binary's library: the front ends over the engine.
//!
//! Owns: `serve` (the OpenAI-compatible REST API in [`http`], over the
//! continuous-batching engine of `moe-engine`), `config` (flags, environment,
//! TOML), `generate` (stream one completion to stdout), `bench`
//! (prefill/decode throughput against the memory-bandwidth bound) and the
//! single-sequence [`session::Session`] the last two drive. This crate is the
//! only place that knows wire formats, the terminal and signals.

pub mod bench;
pub mod config;
pub mod device;
pub mod frontend;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod model_dir;
pub mod offload;
pub mod offload_bench;
pub mod regroup_bench;
pub mod serve;
pub mod session;
pub mod trace;

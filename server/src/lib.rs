//! The `moe-serve` binary's library: command-line front ends over the model.
//!
//! Owns: `generate` (stream a completion of one prompt to stdout), `bench`
//! (prefill/decode throughput against the memory-bandwidth bound), and the
//! single-sequence [`session::Session`] both drive. The REST and gRPC servers
//! over a continuous-batching engine come next; this crate stays the only
//! place that knows wire formats and the terminal.

pub mod bench;
pub mod generate;
pub mod model_dir;
pub mod session;

//! Math for the forward pass, knowing nothing of requests or checkpoints
//! (of the project's crates it uses only `moe-types`, for the GPU slot
//! table's keys).
//!
//! Owns: [`Weight`] (a row-major `[out, in]` matrix stored as f32 or bf16, the
//! layout of safetensors checkpoints), [`matmul::matmul_nt`] (activations times
//! a weight's transpose, multithreaded and SIMD), and the element-wise kernels
//! in [`ops`] (RMSNorm, rotary embeddings, SiLU-and-multiply, softmax, top-k).
//!
//! Invariants: activations are f32, row-major, contiguous; weights keep the
//! checkpoint's precision (bf16 stays 2 bytes per value, converted inside the
//! kernel), so decoding reads as few bytes as the checkpoint holds. No kernel
//! allocates on the decode hot path except thread-local scratch reused across
//! calls.
//!
//! With the `cuda` feature, [`cuda`] adds the GPU backend (cudarc, libraries
//! loaded at run time): NVRTC-compiled kernels mirroring these, cuBLAS
//! products and the expert-slot pool, whose bookkeeping is
//! `moe_types::SlotTable` (shared with the residency core, tested everywhere).

mod attend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod exp;
pub mod matmul;
pub mod ops;
pub mod quant;
mod simd;
mod tile;
mod weight;

pub use matmul::{batch_invariant, matmul_nt, matmul_nt_with, serial, set_batch_invariant, Kernel};
pub use quant::QuantFormat;
pub use weight::{QuantData, Weight, WeightData};

/// Errors raised by kernel entry points on inconsistent shapes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length does not match the shape it was given.
    #[error("{what}: expected {expected} elements, got {got}")]
    Shape {
        /// Which operand.
        what: &'static str,
        /// Elements implied by the shape.
        expected: usize,
        /// Elements present.
        got: usize,
    },
    /// A quantization name that is not one of [`QuantFormat::ALL`].
    #[error("unknown quantization `{name}` (expected one of q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, mxfp4)")]
    UnknownFormat {
        /// The name given.
        name: String,
    },
    /// A format this crate reads but cannot produce.
    #[error("no quantizer for {format} (quantizing supports q8_0 and q4_k)")]
    NoQuantizer {
        /// The format asked for.
        format: QuantFormat,
    },
    /// A quantized matrix whose rows are not whole blocks.
    #[error("{format} rows hold whole blocks of {block} values, but a row has {cols}")]
    PartialBlock {
        /// The format.
        format: QuantFormat,
        /// Its block length.
        block: usize,
        /// The row length.
        cols: usize,
    },
}

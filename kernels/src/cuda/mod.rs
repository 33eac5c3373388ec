//! The CUDA backend (feature `cuda`): a device context, kernels compiled at
//! run time with NVRTC from the source in `kernels.cu` (no nvcc at build
//! time; machine code for the device's architecture, PTX for the driver to
//! compile where that fails), cuBLAS products, the per-layer operations of
//! the forward pass, and the GPU expert-slot pool.
//!
//! Every CUDA library is loaded at run time (cudarc's `dynamic-loading`), so
//! this module builds on machines without a CUDA toolkit. cudarc's loaders
//! panic when a library is missing; every entry point here first checks that
//! the library is present and returns [`CudaError::MissingLibrary`] instead.
//!
//! Pointers: every `CudaSlice`/`CudaView` argument lives on the device;
//! `&[T]` arguments live on the host. Shapes are row-major like the CPU
//! kernels (`[rows, width]`), and each wrapper documents its own.
//!
//! Status: written and compiled here, **not yet run on a GPU** (the machines
//! this was written on have none). `scripts/gpu-check.sh` runs the
//! comparisons against the CPU kernels on a machine that has one.

mod context;
mod error;
pub mod expert_pool;
pub mod gemm;
pub mod layer_ops;
pub mod ops;

pub use context::{compile_ptx, DeviceInfo, GpuContext};
pub use error::{CudaError, CudaLibrary};

/// CUDA C source of every custom kernel, compiled by NVRTC when a
/// [`GpuContext`] is created.
pub const KERNELS_SRC: &str = include_str!("kernels.cu");

/// Names of the kernels in [`KERNELS_SRC`] that the context loads.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "embedding_f32",
    "embedding_bf16",
    "rms_norm",
    "rope_rotate_half",
    "silu_mul",
    "route_topk",
    "argmax_rows",
    "cast_f32_to_bf16",
    "gather_rows",
    "scatter_add_weighted",
    "kv_write",
    "paged_attention",
    "add_inplace",
    "add_bias_rows",
    "clamp_inplace",
    "rms_norm_segments",
    "rope_tables",
    "sigmoid_gate_add",
];

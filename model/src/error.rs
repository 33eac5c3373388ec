//! The error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error (part of the message, not a separate source).
        cause: std::io::Error,
    },
    /// `config.json` is not valid JSON or lacks a required field.
    #[error("malformed config {path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint's `model_type` is not one we implement.
    #[error("unsupported model_type {0:?} (supported: mixtral, qwen2_moe, qwen3_moe, olmoe)")]
    UnsupportedArch(String),
    /// A configuration value we do not implement.
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// A safetensors file is truncated or corrupt.
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        message: String,
    },
    /// A GGUF file is malformed or lacks what the model needs.
    #[error("GGUF file {path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    /// A tensor has the wrong shape for the config.
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape in the file.
        got: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor's dtype is not one we can load.
    #[error("tensor {name} has unsupported dtype {dtype}")]
    Dtype {
        /// Tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A forward-pass input is inconsistent (bad token id, too few KV blocks...).
    #[error("invalid forward input: {0}")]
    Input(String),
    /// An expert could not be made resident.
    #[error("expert {expert} of layer {layer} unavailable: {message}")]
    ExpertUnavailable {
        /// Layer index.
        layer: usize,
        /// Expert index.
        expert: usize,
        /// Why.
        message: String,
    },
    /// An expert tier's device or bookkeeping failed (a copy could not be
    /// queued, the residency core refused a report).
    #[error("expert tier: {0}")]
    ExpertTier(String),
    /// A kernel rejected its operands (an internal shape bug).
    #[error(transparent)]
    Kernel(#[from] moe_kernels::KernelError),
    /// The GPU backend failed (feature `cuda`): a driver, cuBLAS or pool error.
    #[cfg(feature = "cuda")]
    #[error("GPU: {0}")]
    Cuda(#[from] moe_kernels::cuda::CudaError),
}

#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for ModelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Cuda(e.into())
    }
}

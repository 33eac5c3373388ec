//! Errors of the CUDA backend.

use std::fmt;

/// A CUDA library loaded at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLibrary {
    /// The driver API (`libcuda.so`), installed with the NVIDIA driver.
    Driver,
    /// The run-time compiler (`libnvrtc.so`), part of the CUDA toolkit or runtime.
    Nvrtc,
    /// cuBLAS (`libcublas.so`), part of the CUDA toolkit or runtime.
    Cublas,
}

impl fmt::Display for CudaLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Driver => "no CUDA driver: libcuda.so could not be loaded (is an NVIDIA driver installed?)",
            Self::Nvrtc => "NVRTC (libnvrtc.so) could not be loaded: install the CUDA runtime compiler or add its directory to LD_LIBRARY_PATH",
            Self::Cublas => "cuBLAS (libcublas.so) could not be loaded: install cuBLAS or add its directory to LD_LIBRARY_PATH",
        })
    }
}

/// Errors raised by the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library is not installed (or not on the loader's path).
    #[error("{0}")]
    MissingLibrary(CudaLibrary),
    /// The driver refused a call (e.g. `CUDA_ERROR_NO_DEVICE`).
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC could not compile the kernels (the log is included).
    #[error("NVRTC failed to compile the kernels: {0}")]
    Compile(String),
    /// cuBLAS refused a call.
    #[error("cuBLAS error: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// A buffer is shorter than the shape it was given.
    #[error("{what}: expected at least {expected} elements, got {got}")]
    Shape {
        /// Which operand.
        what: &'static str,
        /// Elements implied by the shape.
        expected: usize,
        /// Elements present.
        got: usize,
    },
    /// A size does not fit the kernel's 32-bit index arithmetic.
    #[error("{0} is too large for a 32-bit kernel argument")]
    TooLarge(&'static str),
    /// A weight format the GPU backend has no kernel for.
    #[error("the CUDA backend computes with f32 and bf16 weights, not {0}")]
    Unsupported(&'static str),
    /// The expert-slot pool was asked for something it cannot do.
    #[error("expert pool: {0}")]
    Pool(String),
}

/// Checks that a buffer holds at least `expected` elements.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), CudaError> {
    if got >= expected {
        Ok(())
    } else {
        Err(CudaError::Shape { what, expected, got })
    }
}

/// Converts a size to a 32-bit kernel argument.
pub(crate) fn i32_arg(what: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::TooLarge(what))
}

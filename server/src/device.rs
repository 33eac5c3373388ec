//! `--device cpu|cuda` on `serve` and `generate`.
//!
//! CPU is the default and the only device the forward pass runs on today.
//! `cuda` is checked at start-up: built without the `cuda` feature it is a
//! clear error; with it, a missing driver, GPU, NVRTC or cuBLAS is a clear
//! error (moe-kernels guards every CUDA library before cudarc touches it, so
//! nothing panics); and with a working GPU the error says what is missing:
//! the kernels exist, the model forward pass on the GPU does not yet.

use serde::Deserialize;
use std::fmt;
use std::str::FromStr;

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU kernels (always available).
    #[default]
    Cpu,
    /// An NVIDIA GPU through the CUDA backend (feature `cuda`).
    Cuda,
}

/// A `--device` value that names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {0:?} (expected cpu or cuda)")]
pub struct UnknownDevice(pub String);

impl FromStr for Device {
    type Err = UnknownDevice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(UnknownDevice(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The error for `--device cuda` in a binary built without the feature.
pub const NO_CUDA_BUILD: &str =
    "--device cuda: this moe-serve was built without CUDA support; rebuild with --features cuda";

impl Device {
    /// Checks that the model can run on this device, before anything is
    /// loaded; `Ok` only for the CPU today (see the module docs).
    pub fn check(self) -> anyhow::Result<()> {
        match self {
            Self::Cpu => Ok(()),
            Self::Cuda => check_cuda(),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn check_cuda() -> anyhow::Result<()> {
    anyhow::bail!(NO_CUDA_BUILD)
}

#[cfg(feature = "cuda")]
fn check_cuda() -> anyhow::Result<()> {
    let gpu = moe_kernels::cuda::GpuContext::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    anyhow::bail!(
        "--device cuda: {} is usable and the CUDA kernels compiled, but the model forward pass does not run on \
         the GPU yet; use --device cpu",
        gpu.info()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
        assert!("gpu".parse::<Device>().unwrap_err().to_string().contains("expected cpu or cuda"));
        assert_eq!(Device::Cuda.to_string(), "cuda");
        assert!(Device::Cpu.check().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_rebuild() {
        let e = Device::Cuda.check().unwrap_err().to_string();
        assert!(e.contains("built without CUDA support; rebuild with --features cuda"), "{e}");
    }

    /// With the feature: no driver or no GPU is a clear error, never a panic;
    /// with a GPU the error says the forward pass is not on the GPU yet.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_with_the_feature_is_a_clear_error() {
        let e = Device::Cuda.check().unwrap_err().to_string();
        eprintln!("{e}");
        assert!(
            e.contains("no CUDA driver")
                || e.contains("CUDA_ERROR_NO_DEVICE")
                || e.contains("could not be loaded")
                || e.contains("forward pass does not run on the GPU yet"),
            "{e}"
        );
    }
}

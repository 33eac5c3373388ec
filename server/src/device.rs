//! `--device cpu|cuda` on `serve` and `generate`.
//!
//! CPU is the default. `cuda` runs the forward pass on GPU 0 (`crate::gpu`)
//! and is checked at start-up, before anything loads: built without the
//! `cuda` feature it is a clear error; with it, a missing driver or GPU is a
//! clear error (moe-kernels guards every CUDA library before cudarc touches
//! it, so nothing panics), and a missing NVRTC or cuBLAS, or a model whose
//! layers the GPU kernels do not cover, is one when the model loads.

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
    /// Checks that this device can run models, before anything is loaded
    /// (see the module docs).
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
    let info = moe_kernels::cuda::GpuContext::probe(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    tracing::info!(device = %info, "GPU found");
    Ok(())
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

    /// With the feature: no driver or no GPU is a clear error, never a
    /// panic; with a GPU the check passes.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_with_the_feature_is_checked() {
        match (Device::Cuda.check(), moe_kernels::cuda::GpuContext::probe(0)) {
            (Ok(()), Ok(info)) => eprintln!("GPU: {info}"),
            (Err(e), Err(_)) => {
                let e = e.to_string();
                eprintln!("{e}");
                assert!(
                    e.contains("no CUDA driver")
                        || e.contains("CUDA_ERROR_NO_DEVICE")
                        || e.contains("could not be loaded"),
                    "{e}"
                );
            }
            (got, probe) => panic!("check {got:?} disagrees with the probe {probe:?}"),
        }
    }
}

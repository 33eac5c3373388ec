//! `--expert-activations`: whether products with quantized experts that
//! their checkpoint marks for f32 activations (gpt-oss's MXFP4 from
//! transformers, exact against it) quantize the activations to int8 as
//! llama.cpp does, and the slow-tier wrapper that applies the choice to
//! experts read on demand.

use crate::{ExpertSource, OffloadError};
use moe_model::ExpertWeights;
use moe_types::{ExpertId, LayerId};
use std::str::FromStr;

/// How products with quantized experts that a checkpoint marks for f32
/// activations (gpt-oss's MXFP4 from transformers) treat the activations
/// (`--expert-activations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ExpertActivations {
    /// f32, as the checkpoint's reference computes (exact).
    F32,
    /// Quantized to int8 blocks, as llama.cpp computes (faster).
    Int8,
}

impl ExpertActivations {
    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
        }
    }
}

impl FromStr for ExpertActivations {
    type Err = OffloadError;

    fn from_str(s: &str) -> Result<Self, OffloadError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "int8" => Ok(Self::Int8),
            _ => Err(OffloadError::Config(format!("unknown expert activations {s:?}: expected f32 or int8"))),
        }
    }
}

moe_types::setting_from_str!(named ExpertActivations);

/// Experts of `inner` with int8 activation products (`--expert-activations
/// int8`: gpt-oss's MXFP4 experts computed as llama.cpp computes them).
pub struct Int8ActivationSource {
    inner: Box<dyn ExpertSource>,
}

impl Int8ActivationSource {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn ExpertSource>) -> Self {
        Self { inner }
    }
}

impl ExpertSource for Int8ActivationSource {
    fn load(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertWeights, OffloadError> {
        Ok(self.inner.load(layer, expert)?.with_int8_activations())
    }

    fn expert_bytes(&self) -> usize {
        self.inner.expert_bytes()
    }

    fn describe(&self) -> String {
        format!("{}, int8 activations", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for a in [ExpertActivations::F32, ExpertActivations::Int8] {
            assert_eq!(a.to_string().parse::<ExpertActivations>().expect("parse"), a);
        }
        assert!("fp16".parse::<ExpertActivations>().is_err());
    }
}

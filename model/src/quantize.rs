//! Quantizing a float checkpoint as it loads (`--quantize-experts`,
//! `--quantize all`), so any supported model gets 2-4x more experts into an
//! expert budget. The router and the norms stay as stored (as llama.cpp
//! keeps them); a matrix whose rows are not whole blocks of the chosen
//! format falls back to Q8_0 (32-value blocks), and one that fits neither
//! stays as stored.

use crate::experts::ExpertWeights;
use crate::weights::{Attention, FfnWeights, Model};
use crate::{ModelError, Result};
use moe_kernels::{QuantFormat, Weight};
use std::str::FromStr;

/// The format weights are quantized to at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum QuantTarget {
    /// Keep the checkpoint's precision.
    None,
    /// 8.5 bits per weight.
    Q8_0,
    /// 4.5 bits per weight (k-quant).
    Q4K,
}

impl QuantTarget {
    /// Every choice, in flag order.
    pub const ALL: [QuantTarget; 3] = [Self::None, Self::Q8_0, Self::Q4K];

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        }
    }

    /// The block format, if quantizing.
    pub fn format(self) -> Option<QuantFormat> {
        match self {
            Self::None => None,
            Self::Q8_0 => Some(QuantFormat::Q8_0),
            Self::Q4K => Some(QuantFormat::Q4K),
        }
    }
}

impl FromStr for QuantTarget {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ModelError::Unsupported(format!("quantization {s:?} (expected none, q8_0 or q4_k)")))
    }
}

moe_types::setting_from_str!(named QuantTarget);

/// Which weights `--quantize-experts`' format applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum QuantScope {
    /// The routed experts only.
    Experts,
    /// Experts, attention, dense and shared MLPs, embedding and output head.
    All,
}

impl QuantScope {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Experts => "experts",
            Self::All => "all",
        }
    }
}

impl FromStr for QuantScope {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "experts" => Ok(Self::Experts),
            "all" => Ok(Self::All),
            other => Err(ModelError::Unsupported(format!("quantize scope {other:?} (expected experts or all)"))),
        }
    }
}

moe_types::setting_from_str!(named QuantScope);

/// `w` in `format` (or Q8_0 when its rows are not whole blocks of
/// `format`); unchanged when it is already quantized or fits neither.
pub fn quantize_weight(w: &Weight, format: QuantFormat) -> Result<Weight> {
    if w.quant_format().is_some() {
        return Ok(w.clone());
    }
    let fits = |f: QuantFormat| w.cols().is_multiple_of(f.block_values());
    let chosen = if fits(format) {
        format
    } else if fits(QuantFormat::Q8_0) {
        QuantFormat::Q8_0
    } else {
        return Ok(w.clone());
    };
    Ok(w.quantize(chosen)?)
}

impl ExpertWeights {
    /// The same FFN with its matrices quantized ([`quantize_weight`]).
    pub fn quantized(&self, format: QuantFormat) -> Result<Self> {
        Ok(Self {
            gate_up: quantize_weight(&self.gate_up, format)?,
            down: quantize_weight(&self.down, format)?,
            bias: self.bias.clone(),
        })
    }
}

impl Model {
    /// Quantizes the non-expert matrices (`--quantize all`): attention,
    /// dense and shared MLPs, embedding and output head. Routers, the shared
    /// experts' gates and norms stay as stored.
    pub fn quantize_non_experts(&mut self, format: QuantFormat) -> Result<()> {
        self.embed = quantize_weight(&self.embed, format)?;
        if let Some(h) = &self.lm_head {
            self.lm_head = Some(quantize_weight(h, format)?);
        }
        for l in &mut self.layers {
            match &mut l.attn {
                Attention::Standard(a) => {
                    a.qkv = quantize_weight(&a.qkv, format)?;
                    a.o = quantize_weight(&a.o, format)?;
                }
                Attention::Latent(a) => {
                    for w in a.matrices_mut() {
                        *w = quantize_weight(w, format)?;
                    }
                }
            }
            match &mut l.ffn {
                FfnWeights::Dense(m) => *m = m.quantized(format)?,
                FfnWeights::Moe { shared: Some(s), .. } => s.mlp = s.mlp.quantized(format)?,
                FfnWeights::Moe { shared: None, .. } => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_fall_back_to_q8_0_on_short_rows() {
        assert_eq!("q4_k".parse::<QuantTarget>().unwrap(), QuantTarget::Q4K);
        assert!("q3_k".parse::<QuantTarget>().unwrap_err().to_string().contains("q8_0"));
        assert_eq!("all".parse::<QuantScope>().unwrap(), QuantScope::All);
        let w = Weight::from_f32(2, 128, (0..256).map(|i| i as f32 / 256.0).collect()).unwrap();
        assert_eq!(quantize_weight(&w, QuantFormat::Q4K).unwrap().quant_format(), Some(QuantFormat::Q8_0));
        let odd = Weight::from_f32(1, 20, vec![0.5; 20]).unwrap();
        assert_eq!(quantize_weight(&odd, QuantFormat::Q4K).unwrap().quant_format(), None);
    }
}

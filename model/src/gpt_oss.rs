//! gpt-oss experts as transformers stores them: per layer, merged tensors
//! `mlp.experts.gate_up_proj` `[experts, hidden, 2 * ffn]` (`x @ W`, gate and
//! up interleaved by column) and `down_proj` `[experts, ffn, hidden]`, with
//! biases; or, as released, in MXFP4: `*_blocks` `[experts, out, in / 32,
//! 16]` bytes of two e2m1 values each and `*_scales` `[experts, out, in / 32]`
//! e8m0 exponents. Both become the `[gate; up]` / `down` rows of outputs the
//! kernels compute with; MXFP4 stays 4.25 bits per weight (GGUF's block
//! layout, type 39), with f32 activations as transformers computes.

use crate::arch::LayerNames;
use crate::checkpoint::{Checkpoint, StoredType, TensorLocation};
use crate::experts::{ExpertBias, ExpertLocation, ExpertWeights};
use crate::{ModelConfig, ModelError, Result};
use moe_kernels::{QuantFormat, Weight, WeightData};

/// How a gpt-oss checkpoint stores its experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    /// MXFP4 blocks and scales (else float matrices).
    mxfp4: bool,
    hidden: usize,
    ffn: usize,
}

/// Where expert `e` of a gpt-oss layer (`names`: the layer's) lives: its
/// slices of the merged tensors, in the order [`assemble`] takes them
/// (MXFP4: gate/up blocks, scales, down blocks, scales; float: gate/up,
/// down; then the two biases).
pub(crate) fn locate(ck: &Checkpoint, names: &LayerNames, e: usize, cfg: &ModelConfig) -> Result<ExpertLocation> {
    let (n, h, f) = (cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_ffn);
    let p = |s: &str| names.get(&format!("mlp.experts.{s}"));
    let mxfp4 = ck.contains(&p("gate_up_proj_blocks"));
    let mut parts = Vec::with_capacity(6);
    if mxfp4 {
        for (name, rows, cols) in [("gate_up_proj", 2 * f, h), ("down_proj", h, f)] {
            if !cols.is_multiple_of(32) {
                return Err(ModelError::Unsupported(format!(
                    "{name}: MXFP4 rows of {cols} values (not whole blocks of 32)"
                )));
            }
            parts.push(ck.locate_slice(&p(&format!("{name}_blocks")), e, &[n, rows, cols / 32, 16])?);
            parts.push(ck.locate_slice(&p(&format!("{name}_scales")), e, &[n, rows, cols / 32])?);
        }
    } else {
        parts.push(ck.locate_slice(&p("gate_up_proj"), e, &[n, h, 2 * f])?);
        parts.push(ck.locate_slice(&p("down_proj"), e, &[n, f, h])?);
    }
    parts.push(ck.locate_slice(&p("gate_up_proj_bias"), e, &[n, 2 * f])?);
    parts.push(ck.locate_slice(&p("down_proj_bias"), e, &[n, h])?);
    Ok(ExpertLocation::gpt_oss(parts, Stored { mxfp4, hidden: h, ffn: f }))
}

/// Bytes in memory of an expert stored as `parts` describe.
pub(crate) fn resident_bytes(stored: Stored, parts: &[TensorLocation]) -> usize {
    let (h, f) = (stored.hidden, stored.ffn);
    let matrices: usize = match stored.mxfp4 {
        true => parts[..4].iter().map(|p| p.len).sum(), // 16 + 1 bytes a block either way
        false => parts[..2].iter().map(|p| if p.dtype == StoredType::F16 { 2 * p.len } else { p.len }).sum(),
    };
    matrices + 4 * (2 * f + h)
}

/// The expert from its parts' bytes: matrices as rows of outputs (float:
/// transposed; MXFP4: repacked, f32 activations), gate and up
/// de-interleaved into `[gate; up]`, biases widened to f32.
pub(crate) fn assemble(stored: Stored, parts: &[TensorLocation], bytes: &[&[u8]]) -> Result<ExpertWeights> {
    let (h, f) = (stored.hidden, stored.ffn);
    let (gate_up, down, rest) = if stored.mxfp4 {
        let q = |rows: usize, cols: usize, blocks: &[u8], scales: &[u8]| -> Result<Weight> {
            Ok(Weight::from_quant(rows, cols, QuantFormat::Mxfp4, repack_mxfp4(blocks, scales))?.with_f32_activations())
        };
        (q(2 * f, h, bytes[0], bytes[1])?, q(h, f, bytes[2], bytes[3])?, 4)
    } else {
        (transposed(&parts[0].to_weight(bytes[0])?)?, transposed(&parts[1].to_weight(bytes[1])?)?, 2)
    };
    let vector = |i: usize| -> Result<Vec<f32>> { Ok(parts[i].to_weight(bytes[i])?.to_f32()) };
    let gu_bias = vector(rest)?;
    // row 2j is gate j, 2j + 1 is up j: gates first, then ups
    let order: Vec<usize> = (0..f).map(|j| 2 * j).chain((0..f).map(|j| 2 * j + 1)).collect();
    Ok(ExpertWeights {
        gate_up: gate_up.select_rows(&order)?,
        down,
        bias: Some(ExpertBias { gate_up: order.iter().map(|&r| gu_bias[r]).collect(), down: vector(rest + 1)? }),
    })
}

/// transformers' MXFP4 blocks (byte `i` holds values `2i` (low nibble) and
/// `2i + 1`) with their scales, as GGUF blocks: the scale byte, then byte `i`
/// holding values `i` (low nibble) and `i + 16`. Values and scales are the
/// same e2m1 codes and e8m0 exponents, so dequantization gives the same
/// values (bit for bit, but for transformers' -0.0, which is +0.0 here).
fn repack_mxfp4(blocks: &[u8], scales: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(scales.len() * 17);
    for (b, &s) in blocks.chunks_exact(16).zip(scales) {
        let code = |j: usize| if j.is_multiple_of(2) { b[j / 2] & 0x0F } else { b[j / 2] >> 4 };
        out.push(s);
        out.extend((0..16).map(|i| code(i) | (code(i + 16) << 4)));
    }
    out
}

/// `w` transposed (float weights only: f32 or bf16, kept in their type).
pub(crate) fn transposed(w: &Weight) -> Result<Weight> {
    let (r, c) = (w.rows(), w.cols());
    let t = |i: usize| (i % r) * c + i / r; // element i of the result, row-major [c, r]
    Ok(match w.data() {
        WeightData::F32(v) => Weight::from_f32(c, r, (0..r * c).map(|i| v[t(i)]).collect())?,
        WeightData::Bf16(v) => Weight::from_bf16_bits(c, r, (0..r * c).map(|i| v[t(i)]).collect())?,
        WeightData::Quant(_) => return Err(ModelError::Unsupported("transposing a quantized matrix".into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repacked_blocks_dequantize_to_transformers_values() {
        // transformers: value 2i = lut[low(b_i)], 2i + 1 = lut[high(b_i)], times 2^(s - 127)
        const LUT: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];
        let blocks: Vec<u8> = (0..32u32).map(|i| (i * 37 + 11) as u8).collect();
        let scales = [120u8, 131];
        let mut got = vec![0f32; 64];
        QuantFormat::Mxfp4.dequantize(&repack_mxfp4(&blocks, &scales), &mut got);
        for (blk, (b, &s)) in blocks.chunks_exact(16).zip(&scales).enumerate() {
            for j in 0..32usize {
                let code = if j.is_multiple_of(2) { b[j / 2] & 0x0F } else { b[j / 2] >> 4 };
                let want = LUT[code as usize] * 2f32.powi(s as i32 - 127);
                // equal values; code 8 is -0.0 in transformers and +0.0 in GGUF's
                // integer table, a sign no product can see
                assert_eq!(got[blk * 32 + j], want, "block {blk} value {j}");
                if want != 0.0 {
                    assert_eq!(got[blk * 32 + j].to_bits(), want.to_bits(), "block {blk} value {j}");
                }
            }
        }
    }

    #[test]
    fn transposes_float_matrices() {
        let w = Weight::from_f32(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(transposed(&w).unwrap().to_f32(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}

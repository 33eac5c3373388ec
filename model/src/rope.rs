//! Rotary-embedding angles, computed as HuggingFace computes them: inverse
//! frequencies and `position * inv_freq` in f32, cosine and sine of that,
//! times the scaling's attention factor (YaRN; 1 otherwise).

use crate::config::{AttentionConfig, RopeScaling, Yarn};
use moe_kernels::ops;

/// Inverse frequencies of one head width.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplies every cosine and sine.
    scale: f32,
    /// Pairs are `(x0, x1), (x2, x3), ...` rather than `(x_j, x_j+half)`.
    interleaved: bool,
}

impl Rope {
    pub(crate) fn new(a: &AttentionConfig) -> Self {
        let d = a.rotary_dim;
        let base = a.rope_theta as f32;
        // base^(2j/d) in f32, as torch computes it
        let pos_freqs = (0..d / 2).map(|j| base.powf((2 * j) as f32 / d as f32));
        let (inv_freq, scale) = match a.rope_scaling {
            RopeScaling::None => (pos_freqs.map(|p| 1.0 / p).collect(), 1.0),
            RopeScaling::Linear { factor } => (pos_freqs.map(|p| 1.0 / p / factor as f32).collect(), 1.0),
            RopeScaling::Yarn(y) => (yarn_inv_freq(&y, a.rope_theta, d, pos_freqs), y.attention_factor as f32),
        };
        Self { inv_freq, scale, interleaved: a.rope_interleaved }
    }

    /// Rotates `x[offset..offset + 2 * half]` of every head of `x` (heads of
    /// `stride` values) by one position's `cos` and `sin`. Interleaved pairs
    /// come out de-interleaved (evens' results, then odds'), as DeepSeek-V3
    /// in transformers lays them out; queries and keys get the same order, so
    /// their dot products are unchanged.
    pub(crate) fn apply(&self, x: &mut [f32], stride: usize, offset: usize, cos: &[f32], sin: &[f32]) {
        let h = cos.len();
        for head in x.chunks_exact_mut(stride) {
            let r = &mut head[offset..offset + 2 * h];
            if self.interleaved {
                let mut buf = [0f32; 256];
                let mut heap = Vec::new();
                let tmp = if 2 * h <= buf.len() {
                    &mut buf[..2 * h]
                } else {
                    heap.resize(2 * h, 0.0);
                    &mut heap[..]
                };
                tmp.copy_from_slice(r);
                for j in 0..h {
                    r[j] = tmp[2 * j];
                    r[j + h] = tmp[2 * j + 1];
                }
            }
            ops::rope_rotate_half(r, cos, sin);
        }
    }

    /// Half the head width: the number of angles.
    pub(crate) fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Writes the cosines and sines of position `pos`.
    pub(crate) fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = (pos as f32 * f) as f64;
            *c = a.cos() as f32;
            *s = a.sin() as f32;
            if self.scale != 1.0 {
                *c *= self.scale;
                *s *= self.scale;
            }
        }
    }
}

/// YaRN's inverse frequencies (transformers' `_compute_yarn_parameters`):
/// dimensions below the ramp keep their frequency (extrapolation), those
/// above it are divided by the factor (interpolation), and those inside mix
/// the two linearly. The ramp's bounds are in f64 (Python floats), the
/// frequencies and the mix in f32 (torch); `pos_freqs` are `base^(2j/dim)`.
fn yarn_inv_freq(y: &Yarn, base: f64, dim: usize, pos_freqs: impl Iterator<Item = f32>) -> Vec<f32> {
    let correction_dim = |rotations: f64| {
        dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0) as f32, high.min(dim as f64 - 1.0) as f32);
    if low == high {
        high += 0.001; // as transformers avoids the singularity
    }
    pos_freqs
        .enumerate()
        .map(|(j, pos_freq)| {
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (y.factor as f32 * pos_freq);
            let ramp = ((j as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            interpolation * (1.0 - keep) + extrapolation * keep
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QkNorm;

    fn attention(scaling: RopeScaling) -> AttentionConfig {
        AttentionConfig {
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 32,
            rotary_dim: 32,
            rope_interleaved: false,
            softmax_scale: 32f32.powf(-0.5),
            mla: None,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: None,
            sliding_layers: None,
            sinks: false,
            rope_theta: 10000.0,
            rope_scaling: scaling,
        }
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let y = Yarn {
            factor: 4.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 0.1 * 4f64.ln() + 1.0,
            truncate: true,
        };
        let plain = Rope::new(&attention(RopeScaling::None));
        let yarn = Rope::new(&attention(RopeScaling::Yarn(y)));
        // for d = 32, base 1e4, 4096 positions the ramp runs over dims 5..12
        for j in 0..16 {
            let (p, q) = (plain.inv_freq[j], yarn.inv_freq[j]);
            if j <= 5 {
                assert_eq!(p, q, "dim {j} extrapolated");
            } else if j >= 12 {
                assert!((q - p / 4.0).abs() <= 1e-7 * p, "dim {j} interpolated: {q} vs {}", p / 4.0);
            } else {
                assert!(q < p && q > p / 4.0, "dim {j} mixed");
            }
        }
        let (mut c, mut s) = (vec![0.0; 16], vec![0.0; 16]);
        yarn.angles(0, &mut c, &mut s);
        assert!(c.iter().all(|&v| v == y.attention_factor as f32), "cos(0) scaled by the attention factor");
    }
}

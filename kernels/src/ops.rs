//! Element-wise and row-wise kernels. Rows are contiguous slices of length
//! `d`; a buffer holding several rows is processed row by row.

pub use crate::attend::{attend, KvRows};

/// RMSNorm of each `d`-wide row of `x`, scaled by `weight`, written to `out`:
/// `out = x / sqrt(mean(x²) + eps) * weight` (statistics in f32, as
/// HuggingFace computes them).
#[inline]
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// In-place RMSNorm of each `weight.len()`-wide row of `x`.
#[inline]
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for xr in x.chunks_exact_mut(d) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &w) in xr.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// Dot product of two equally long slices (SIMD when available).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::simd::dot_f32(a, b)
}

/// `a += b`, element-wise.
#[inline]
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// `a += s * b`, element-wise.
#[inline]
pub fn axpy(a: &mut [f32], s: f32, b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += s * y;
    }
}

/// SiLU(x) = x * sigmoid(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Logistic sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// For rows of `gate_up` laid out `[gate (i) | up (i)]`, writes
/// `silu(gate) * up` into the matching `i`-wide row of `out`.
#[inline]
pub fn silu_mul(gate_up: &[f32], i: usize, out: &mut [f32]) {
    crate::exp::silu_mul(gate_up, i, out)
}

/// Numerically stable in-place softmax of one row.
#[inline]
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = crate::exp::exp_shifted_inplace(x, max);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// gpt-oss's clamped SwiGLU over rows of `[gate (f); up (f)]`: the gate
/// clamped above at `limit`, the up to `[-limit, limit]`, then
/// `(up + 1) * gate * sigmoid(alpha * gate)` into rows of `f`.
pub fn clamped_swiglu(gate_up: &[f32], f: usize, alpha: f32, limit: f32, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        let (g, u) = gu.split_at(f);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let g = g.min(limit);
            let u = u.clamp(-limit, limit);
            *o = (u + 1.0) * (g * sigmoid(g * alpha));
        }
    }
}

/// Softmax of `x` with an extra logit `sink` in the denominator, dropped
/// from the result (attention sinks): `exp(x_i - m) / (sum_j exp(x_j - m) +
/// exp(sink - m))` with `m` the largest of `x` and `sink`.
#[inline]
pub fn softmax_with_sink(x: &mut [f32], sink: f32) {
    let max = x.iter().copied().fold(sink, f32::max);
    let sum = crate::exp::exp_shifted_inplace(x, max);
    let mut s = [sink];
    let sink_term = crate::exp::exp_shifted_inplace(&mut s, max);
    let inv = 1.0 / (sum + sink_term);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Indices of the `k` largest values of `x`, largest first; ties go to the
/// lower index (as `torch.topk` does on CPU for distinct values).
/// `out` is cleared and filled.
#[inline]
pub fn top_k(x: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    for (i, &v) in x.iter().enumerate() {
        let pos = out.iter().position(|&j| x[j] < v).unwrap_or(out.len());
        if pos < k {
            out.insert(pos, i);
            out.truncate(k);
        }
    }
}

/// Rotary position embedding in the "rotate half" convention used by
/// Mixtral, Qwen and OLMoE: within each head of width `2h`, element `j`
/// pairs with element `j + h`. `cos`/`sin` hold the `h` angles' cosines and
/// sines for this token's position. `x` holds whole heads.
#[inline]
pub fn rope_rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    for head in x.chunks_exact_mut(2 * h) {
        let (a, b) = head.split_at_mut(h);
        for j in 0..h {
            let (x1, x2) = (a[j], b[j]);
            a[j] = x1 * cos[j] - x2 * sin[j];
            b[j] = x2 * cos[j] + x1 * sin[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
        assert!(out[2].is_nan() || out[2] == 0.0); // 0/0 row with eps 0
    }

    #[test]
    fn top_k_orders_and_breaks_ties_low_first() {
        let mut out = Vec::new();
        top_k(&[0.1, 0.9, 0.5, 0.9, -1.0], 3, &mut out);
        assert_eq!(out, vec![1, 3, 2]);
        top_k(&[1.0, 2.0], 5, &mut out);
        assert_eq!(out, vec![1, 0]);
    }

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let mut x = [1000.0, 1000.0, 999.0];
        softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((x[0] - x[1]).abs() < 1e-7 && x[2] < x[0]);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut x = [1.0, 0.0, 0.0, 1.0];
        let (c, s) = (0.6f32, 0.8f32);
        rope_rotate_half(&mut x, &[c, 1.0], &[s, 0.0]);
        assert_eq!(x, [0.6, 0.0, 0.8, 1.0]);
    }

    #[test]
    fn silu_mul_uses_gate_then_up() {
        let gu = [0.0, 1.0, 5.0, 7.0];
        let mut out = [0.0; 2];
        silu_mul(&gu, 2, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - silu(1.0) * 7.0).abs() < 1e-6);
    }
}

//! Quantizing f32 rows (`--quantize-experts`): Q8_0 as ggml's reference
//! does it (bit-exact with `gguf.quants.Q8_0`), Q4_K with ggml's
//! weighted search for each sub-block's scale and min.

use super::blocks::scale_min_k4;
use super::QuantFormat;
use crate::KernelError;

/// Quantizes `values` (rows of `cols` values, row-major) to `format`.
/// Q8_0 and Q4_K have quantizers; the other formats are read-only.
pub fn quantize_rows(format: QuantFormat, values: &[f32], cols: usize) -> Result<Vec<u8>, KernelError> {
    let bv = format.block_values();
    if !cols.is_multiple_of(bv) {
        return Err(KernelError::PartialBlock { format, block: bv, cols });
    }
    let blocks = values.len() / bv;
    let mut out = vec![0u8; blocks * format.block_bytes()];
    let quant: fn(&[f32], &mut [u8]) = match format {
        QuantFormat::Q8_0 => q8_0,
        QuantFormat::Q4K => q4_k,
        other => return Err(KernelError::NoQuantizer { format: other }),
    };
    for (x, b) in values.chunks_exact(bv).zip(out.chunks_exact_mut(format.block_bytes())) {
        quant(x, b);
    }
    Ok(out)
}

fn put_f16(b: &mut [u8], v: f32) {
    b.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// `d = max|x| / 127`, `q = round(x / d)` (half away from zero).
fn q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    put_f16(&mut b[0..2], d);
    for (o, &v) in b[2..34].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Q4_K: each sub-block of 32 gets the scale and min that minimise the
/// weighted squared error over a small grid of candidate scales
/// (weights `sqrt(mean x²) + |x|`, as ggml's `make_qkx2_quants`); the
/// eight scales and mins are then quantized to 6 bits under f16
/// super-scales, and the values re-quantized against the stored scales.
fn q4_k(x: &[f32], b: &mut [u8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut levels = [0u8; 256];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let av = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|l| av + xs[l].abs());
        let (s, m) = fit_scale_min(
            xs.try_into().expect("32 values"),
            &w,
            15,
            (&mut levels[32 * j..32 * j + 32]).try_into().expect("32 levels"),
        );
        scales[j] = s;
        mins[j] = m;
    }
    let max_scale = scales.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = mins.iter().fold(0f32, |a, &v| a.max(v));
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
    }
    let packed = &mut b[4..16];
    for j in 0..4 {
        packed[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
        packed[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
        packed[j + 8] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4);
    }
    put_f16(&mut b[0..2], max_scale / 63.0);
    put_f16(&mut b[2..4], max_min / 63.0);
    // re-quantize against the scales as stored
    let d = super::blocks::f16_at(b, 0);
    let dmin = super::blocks::f16_at(b, 2);
    let (sc, m) = scale_min_k4(&b[4..16]);
    debug_assert_eq!((sc, m), (ls, lm));
    for j in 0..8 {
        let d1 = d * sc[j] as f32;
        if d1 == 0.0 {
            continue;
        }
        let dm = dmin * m[j] as f32;
        for l in 0..32 {
            levels[32 * j + l] = nearest_int((x[32 * j + l] + dm) / d1).clamp(0, 15) as u8;
        }
    }
    let qs = &mut b[16..144];
    for p in 0..4 {
        for l in 0..32 {
            qs[32 * p + l] = levels[64 * p + l] | (levels[64 * p + 32 + l] << 4);
        }
    }
}

/// `v` rounded to the nearest integer, ties to even, by ggml's float trick
/// (adding 1.5 · 2^23 leaves the integer in the low mantissa bits): no
/// library call, as `f32::round` is without SSE4.1 at compile time.
/// Exact for |v| < 2^22; larger values (only from degenerate blocks) are
/// clamped by every caller.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    if v.abs() >= 4_194_303.0 || v.is_nan() {
        return if v > 0.0 { i32::MAX } else { i32::MIN };
    }
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007F_FFFF) - 0x0040_0000
}

/// The scale `s` and (non-negative) min `m` with `x ≈ s * q - m`, `q` in
/// `0..=nmax`, minimising `Σ w (s q + (-m) - x)²` over 21 candidate
/// scales; writes the chosen levels.
fn fit_scale_min(x: &[f32; 32], w: &[f32; 32], nmax: u8, levels: &mut [u8; 32]) -> (f32, f32) {
    let nmax_f = nmax as f32;
    let mut lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    lo = lo.min(0.0);
    if hi <= lo {
        levels.fill(0);
        return (0.0, -lo);
    }
    let sum_w: f32 = w.iter().sum();
    let sum_x: f32 = w.iter().zip(x).map(|(w, x)| w * x).sum();
    let quantize = |iscale: f32, out: &mut [u8; 32]| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = nearest_int(iscale * (v - lo)).clamp(0, nmax as i32) as u8;
        }
    };
    let error = |s: f32, m: f32, l: &[u8]| -> f32 {
        x.iter().zip(w).zip(l).map(|((&v, &w), &q)| w * (s * q as f32 + m - v).powi(2)).sum()
    };
    let mut scale = (hi - lo) / nmax_f;
    let mut min = lo;
    quantize(nmax_f / (hi - lo), levels);
    let mut best = error(scale, min, levels);
    let mut aux = [0u8; 32];
    for step in 0..=20 {
        let iscale = (-1.0 + 0.1 * step as f32 + nmax_f) / (hi - lo);
        quantize(iscale, &mut aux);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for ((&q, &w), &v) in aux.iter().zip(w).zip(x) {
            let q = q as f32;
            sl += w * q;
            sl2 += w * q * q;
            sxl += w * q * v;
        }
        let det = sum_w * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut s = (sum_w * sxl - sum_x * sl) / det;
        let mut m = (sl2 * sum_x - sl * sxl) / det;
        if m > 0.0 {
            m = 0.0;
            s = sxl / sl2;
        }
        let e = error(s, m, &aux);
        if e < best {
            best = e;
            scale = s;
            min = m;
            levels.copy_from_slice(&aux);
        }
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                // roughly normal: sum of uniforms
                ((s % 1000) as f32 + ((s >> 10) % 1000) as f32 - 999.0) / 20_000.0
            })
            .collect()
    }

    fn rms_error(format: QuantFormat, x: &[f32]) -> f32 {
        let q = quantize_rows(format, x, x.len()).unwrap();
        let mut back = vec![0f32; x.len()];
        format.dequantize(&q, &mut back);
        let err: f32 = x.iter().zip(&back).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32;
        let sig: f32 = x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32;
        (err / sig).sqrt()
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        for (v, want) in [(0.4, 0), (0.5, 0), (1.5, 2), (2.5, 2), (-1.5, -2), (14.7, 15), (-0.6, -1), (3.0, 3)] {
            assert_eq!(nearest_int(v), want, "{v}");
        }
        assert_eq!(nearest_int(1e9), i32::MAX);
        assert_eq!(nearest_int(f32::NAN), i32::MIN);
    }

    #[test]
    fn round_trips_are_close() {
        let x = values(1024, 7);
        // relative RMS error: 8-bit ~0.5%, 4-bit k-quant a few percent
        assert!(rms_error(QuantFormat::Q8_0, &x) < 0.01);
        let e4 = rms_error(QuantFormat::Q4K, &x);
        assert!(e4 < 0.08, "q4_k relative error {e4}");
    }

    #[test]
    fn zero_and_constant_blocks_survive() {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
            let x = vec![0f32; 256];
            assert!(rms_error(format, &[x.clone(), vec![0.5; 256]].concat()).is_finite());
        }
    }

    #[test]
    fn partial_blocks_and_read_only_formats_are_errors() {
        assert!(matches!(quantize_rows(QuantFormat::Q4K, &[0.0; 64], 64), Err(KernelError::PartialBlock { .. })));
        assert!(matches!(quantize_rows(QuantFormat::Q6K, &[0.0; 256], 256), Err(KernelError::NoQuantizer { .. })));
    }
}

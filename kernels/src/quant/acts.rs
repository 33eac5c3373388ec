//! Activations quantized to int8 for products with quantized weights, as
//! llama.cpp quantizes them: `q = round(x · 127 / max|x|)` per block, the
//! scale `max|x| / 127` kept per block. Two block sizes:
//! - 32 values with the scale at f16 precision (llama.cpp's `Q8_0`), for
//!   the 32-value weight formats: `Σ w·x ≈ Σ_blocks dw·dx·Σ qw·qx`;
//! - 256 values with an f32 scale (llama.cpp's `Q8_K`), for the k-quants,
//!   whose products then accumulate in integers over a whole super-block.
//!
//! Sums of the int8 values are kept per 32 (for weights with mins).
//! Quantizing a row costs about as much as reading it once and adds an
//! error of at most half a step (`max|x| / 254`) per value.

/// Values per group (the unit of the sums, and the smaller block).
pub(crate) const QK: usize = 32;

/// `m` rows of `k` activations, quantized (`k` a multiple of `block`).
#[derive(Default)]
pub(crate) struct QuantizedActs {
    pub(crate) k: usize,
    /// Values per scale: [`QK`] or 256.
    pub(crate) block: usize,
    /// `[m, k]` int8 values.
    pub(crate) qs: Vec<i8>,
    /// `[m, k / block]` scales.
    pub(crate) d: Vec<f32>,
    /// `[m, k / QK]` sums of the int8 values (at most 32 · 127: i16).
    pub(crate) sums: Vec<i16>,
}

impl QuantizedActs {
    /// Quantizes `x` (`m` rows of `k`) in blocks of `block` values, reusing
    /// this value's buffers.
    pub(crate) fn fill(&mut self, x: &[f32], k: usize, block: usize) {
        debug_assert!(block == QK || block == 256);
        self.k = k;
        self.block = block;
        self.qs.resize(x.len(), 0);
        self.d.resize(x.len() / block, 0.0);
        self.sums.resize(x.len() / QK, 0);
        let half_scale = block == QK;
        for (b, xb) in x.chunks_exact(block).enumerate() {
            let amax = max_abs(xb);
            let d = amax / 127.0;
            self.d[b] = if half_scale { half::f16::from_f32(d).to_f32() } else { d };
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let qs = &mut self.qs[b * block..(b + 1) * block];
            let sums = &mut self.sums[b * block / QK..(b + 1) * block / QK];
            #[cfg(target_arch = "x86_64")]
            {
                if crate::simd::has_avx2_fma() {
                    // SAFETY: AVX2 checked; `qs` holds `xb.len()` values and
                    // `sums` one per 32.
                    unsafe { x86::quantize(xb, id, qs, sums) };
                    continue;
                }
            }
            for ((xg, qg), s) in xb.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(sums) {
                let mut sum = 0;
                for (q, &v) in qg.iter_mut().zip(xg) {
                    *q = (v * id).round_ties_even() as i8;
                    sum += *q as i16;
                }
                *s = sum;
            }
        }
    }
}

/// `max |x|` (the same value on every path: max is exact).
fn max_abs(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma() {
            // SAFETY: AVX2 checked.
            return unsafe { x86::max_abs(x) };
        }
    }
    x.iter().fold(0f32, |a, v| a.max(v.abs()))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::QK;
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX2; `x.len()` is a multiple of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max_abs(x: &[f32]) -> f32 {
        let sign_bit = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for c in x.chunks_exact(8) {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(c.as_ptr())));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)))
    }

    /// `qs = round(x * id)` (nearest even, the default rounding mode, as the
    /// portable path's `round_ties_even`) and the sum of each 32.
    ///
    /// # Safety
    /// Requires AVX2; `qs` holds `x.len()` values (a multiple of 32) and
    /// `sums` one per 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize(x: &[f32], id: f32, qs: &mut [i8], sums: &mut [i16]) {
        let id = _mm256_set1_ps(id);
        for (g, s) in sums.iter_mut().enumerate() {
            let p = x.as_ptr().add(g * QK);
            let i: [__m256i; 4] =
                std::array::from_fn(|j| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(8 * j)), id)));
            let t = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            let t4 = _mm_hadd_epi32(t4, t4);
            *s = _mm_cvtsi128_si32(_mm_hadd_epi32(t4, t4)) as i16;
            // pack i32 -> i16 -> i8; packs interleave 128-bit lanes, undone by
            // the final permute
            let q = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            let q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr().add(g * QK) as *mut __m256i, q);
        }
    }
}

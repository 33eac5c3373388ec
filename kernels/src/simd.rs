//! Dot products of an f32 activation row with one weight row, f32 or bf16,
//! using AVX2+FMA when the CPU has them and a portable loop otherwise.

use crate::weight::bf16_to_f32;

/// `sum(x[i] * w[i])` with w in f32.
pub(crate) fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time) and
            // both slices have the same length.
            return unsafe { avx2::dot_f32(x, w) };
        }
    }
    portable_dot(x, w, |v| v)
}

/// `sum(x[i] * w[i])` with w as raw bf16 bits.
pub(crate) fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time) and
            // both slices have the same length.
            return unsafe { avx2::dot_bf16(x, w) };
        }
    }
    portable_dot(x, w, bf16_to_f32)
}

/// Element types a weight row can hold.
pub(crate) trait WeightRow: Copy {
    /// One dot product.
    fn dot(x: &[f32], w: &[Self]) -> f32;
    /// One value, widened to f32.
    fn widen(self) -> f32;
    /// 8 values from `p`, widened to f32.
    ///
    /// # Safety
    /// Requires AVX2; `p` must be valid for reading 8 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightRow for f32 {
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        dot_f32(x, w)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightRow for u16 {
    fn dot(x: &[f32], w: &[u16]) -> f32 {
        dot_bf16(x, w)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        avx2::widen8(p)
    }
}

fn portable_dot<T: Copy>(x: &[f32], w: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, xt) = x.split_at(x.len() / 8 * 8);
    let (wc, wt) = w.split_at(xc.len());
    for (xs, ws) in xc.chunks_exact(8).zip(wc.chunks_exact(8)) {
        for ((a, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
            *a += xv * widen(wv);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (&xv, &wv) in xt.iter().zip(wt) {
        s += xv * widen(wv);
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    #[cfg(test)]
    if PORTABLE_ONLY.with(|p| p.get()) {
        return false;
    }
    // F16C (half-float conversion) came with or before AVX2 on every CPU
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// Whether the CPU has AVX-512 F and BW (besides AVX2, FMA and F16C).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512bw() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    if !has_avx2_fma() {
        return false;
    }
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// Whether the CPU has AVX-512 F and VL (besides AVX2, FMA and F16C): 32
/// vector registers for 8-lane arithmetic.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512vl() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    #[cfg(test)]
    if AVX2_ONLY.with(|p| p.get()) {
        return false;
    }
    if !has_avx2_fma() {
        return false;
    }
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl"))
}

#[cfg(test)]
thread_local! {
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static AVX2_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's tiles on their AVX2 builds, as on a CPU
/// without AVX-512 (tests of those paths on machines that have it).
#[cfg(test)]
pub(crate) fn avx2_only<R>(f: impl FnOnce() -> R) -> R {
    AVX2_ONLY.with(|p| p.set(true));
    let r = f();
    AVX2_ONLY.with(|p| p.set(false));
    r
}

/// Runs `f` with this thread's kernels on their portable paths, as on a CPU
/// without AVX2+FMA (tests of those paths on machines that have them).
#[cfg(test)]
pub(crate) fn portable<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    PORTABLE_ONLY.with(|p| p.set(true));
    let r = f();
    #[cfg(target_arch = "x86_64")]
    PORTABLE_ONLY.with(|p| p.set(false));
    r
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The little-endian f16 at `b[i..i + 2]`, widened in hardware (the
    /// `half` crate converts in software without compile-time F16C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One row against one weight row, four accumulators; `load` reads 8
    /// widened weights at an offset, `tail` one.
    #[inline(always)]
    unsafe fn dot_with(x: &[f32], load: impl Fn(usize) -> __m256, tail: impl Fn(usize) -> f32) -> f32 {
        let (n, xp) = (x.len(), x.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (whole loop): every load reads 8 values at offsets < n.
        while i + 32 <= n {
            for (l, acc) in a.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8 * l)), load(i + 8 * l), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), load(i), a[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        while i < n {
            s += *xp.add(i) * tail(i);
            i += 1;
        }
        s
    }

    /// # Safety
    /// Requires AVX2+FMA and `x.len() == w.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
        let wp = w.as_ptr();
        dot_with(x, |i| _mm256_loadu_ps(wp.add(i)), |i| *wp.add(i))
    }

    /// 8 bf16 values from `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 `u16`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn widen8(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    /// # Safety
    /// Requires AVX2+FMA and `x.len() == w.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
        let wp = w.as_ptr();
        dot_with(x, |i| widen8(wp.add(i)), |i| f32::from_bits((*wp.add(i) as u32) << 16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_dots_match_scalar() {
        for n in [1usize, 7, 8, 31, 32, 33, 100, 1024] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
            let w: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
            let wb: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let want: f64 = x.iter().zip(&w).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            assert!((dot_f32(&x, &w) as f64 - want).abs() < 1e-4, "f32 n={n}");
            // these w values are exact in bf16
            assert!((dot_bf16(&x, &wb) as f64 - want).abs() < 1e-4, "bf16 n={n}");
        }
    }
}

//! Vectorised `exp` for softmax, SiLU and sampling: eight lanes at a time
//! with AVX2+FMA (Cephes-style range reduction and a degree-6 polynomial,
//! within 2 ulp of `f32::exp` over the clamped range), scalar `f32::exp`
//! elsewhere.
//!
//! Inputs below -87.3 give 0 (as `f32::exp` underflows there too, up to
//! denormals); inputs above 88 are clamped there (about 1.65e38); NaN gives
//! NaN.

/// `x[i] = exp(x[i] - shift)` for every element; returns the sum.
pub fn exp_shifted_inplace(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { avx2::exp_shifted_inplace(x, shift) };
        }
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// For rows laid out `[gate (i) | up (i)]`, `out = silu(gate) * up` row by row.
pub(crate) fn silu_mul(gate_up: &[f32], i: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma() {
            for (gu, o) in gate_up.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
                let (g, u) = gu.split_at(i);
                // SAFETY: AVX2+FMA checked at run time; g, u and o all hold i values.
                unsafe { avx2::silu_mul_row(g, u, o) };
            }
            return;
        }
    }
    for (gu, o) in gate_up.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
        let (g, u) = gu.split_at(i);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = crate::ops::silu(g) * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::simd::avx2::hsum;
    use std::arch::x86_64::*;

    const LO: f32 = -87.3;
    const HI: f32 = 88.0;

    /// exp of 8 lanes; lanes below `LO` (and -inf) give 0, NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        let nan = _mm256_and_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), x);
        let under = _mm256_cmp_ps(x, _mm256_set1_ps(LO), _CMP_LT_OQ);
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        // x = n ln2 + r, |r| <= ln2 / 2
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n through the exponent bits (n is within [-126, 127])
        let pow2 =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
        _mm256_or_ps(_mm256_andnot_ps(under, _mm256_mul_ps(y, pow2)), nan)
    }

    /// # Safety
    /// Requires AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_inplace(x: &mut [f32], shift: f32) -> f32 {
        let (n, p) = (x.len(), x.as_mut_ptr());
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY (loop): each access covers 8 values at offsets < n.
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = hsum(acc);
        if i < n {
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..n - i].copy_from_slice(&x[i..]);
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), s)));
            x[i..].copy_from_slice(&out[..n - i]);
            sum += out[..n - i].iter().sum::<f32>();
        }
        sum
    }

    /// `o = g / (1 + exp(-g)) * u`.
    ///
    /// # Safety
    /// Requires AVX2+FMA and `g`, `u`, `o` of equal length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_row(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = o.len();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        // SAFETY (loop): each access covers 8 values at offsets < n of each slice.
        while i + 8 <= n {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))));
            i += 8;
        }
        for ((o, &g), &u) in o[i..].iter_mut().zip(&g[i..]).zip(&u[i..]) {
            *o = crate::ops::silu(g) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_exp() {
        let xs: Vec<f32> = (-1970..=1985).map(|i| i as f32 * 0.0443).chain([-1e30, -88.0, 0.0, 87.9]).collect();
        let mut v = xs.clone();
        exp_shifted_inplace(&mut v, 0.0);
        for (&x, &got) in xs.iter().zip(&v) {
            let want = x.exp();
            if x < -87.3 {
                assert!(got == 0.0 && want < 1.3e-38, "exp({x}) = {got}");
            } else {
                assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, want {want}");
            }
        }
        // the sum, as softmax uses it (inputs shifted to <= 0)
        let mut v: Vec<f32> = (0..1001).map(|i| -(i as f32) * 0.013).collect();
        let want: f64 = v.iter().map(|&x| (x as f64).exp()).sum();
        let sum = exp_shifted_inplace(&mut v, 0.0);
        assert!((sum as f64 - want).abs() <= 1e-5 * want, "{sum} vs {want}");
        let mut v = [f32::NEG_INFINITY, 1.0, 2.0, f32::NAN];
        exp_shifted_inplace(&mut v, 2.0);
        assert!(v[3].is_nan());
        let mut v = [f32::NEG_INFINITY, 1.0, 2.0];
        let s = exp_shifted_inplace(&mut v, 2.0);
        assert_eq!(v[0], 0.0);
        assert!((s - (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn portable_paths_match_vectorised() {
        let xs: Vec<f32> = (0..100).map(|i| i as f32 * -0.3).collect();
        let (mut a, mut b) = (xs.clone(), xs.clone());
        let sa = exp_shifted_inplace(&mut a, 1.0);
        let sb = crate::simd::portable(|| exp_shifted_inplace(&mut b, 1.0));
        assert!((sa - sb).abs() < 1e-5 * sb);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 3e-7 * y + 1e-38, "{x} vs {y}");
        }
        let gu: Vec<f32> = (0..40).map(|k| (k as f32 - 20.0) * 0.4).collect();
        let (mut o1, mut o2) = (vec![0.0; 20], vec![0.0; 20]);
        silu_mul(&gu, 10, &mut o1);
        crate::simd::portable(|| silu_mul(&gu, 10, &mut o2));
        for (x, y) in o1.iter().zip(&o2) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn silu_mul_matches_scalar() {
        let i = 21;
        let gu: Vec<f32> = (0..4 * i).map(|k| (k as f32 - 40.0) * 0.37).collect();
        let mut out = vec![0.0; 2 * i];
        silu_mul(&gu, i, &mut out);
        for (r, o) in out.chunks(i).enumerate() {
            for j in 0..i {
                let (g, u) = (gu[r * 2 * i + j], gu[r * 2 * i + i + j]);
                let want = crate::ops::silu(g) * u;
                assert!((o[j] - want).abs() <= 1e-6 * (1.0 + want.abs()), "{} vs {want}", o[j]);
            }
        }
    }
}

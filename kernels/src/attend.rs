//! Scaled dot-product attention of one token's query heads over cached key
//! and value rows. With AVX2+FMA and a head width that is a multiple of 8,
//! scores are computed 8 keys at a time (8 independent accumulators, one
//! transposing reduction) and the value sum keeps two accumulator sets in
//! registers; otherwise a portable loop.

/// The cached keys and values one KV head attends over.
#[derive(Clone, Copy, Debug)]
pub struct KvRows<'a> {
    /// Key cache, read at `rows[j]..rows[j] + head_dim`.
    pub keys: &'a [f32],
    /// Value cache, read at the same offsets.
    pub values: &'a [f32],
    /// Offsets of the visible positions' rows, in position order.
    pub rows: &'a [usize],
    /// Values per head.
    pub head_dim: usize,
}

/// One KV head's share of a token's attention: each of the query heads in
/// `q` (`group * d` values, `d = kv.head_dim`) attends over `kv`'s rows,
/// scores scaled by `scale` and softmax-weighted; head `h` writes
/// `out[h * d..(h + 1) * d]`. `scores` is scratch.
///
/// # Panics
/// If `q` is not whole heads of `d`, an offset in `kv.rows` leaves fewer
/// than `d` values in the keys or values, or `out` is shorter than `q`.
pub fn attend(q: &[f32], kv: KvRows<'_>, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let KvRows { keys: k, values: v, rows, head_dim: d } = kv;
    assert!(d > 0 && q.len().is_multiple_of(d), "attention query of {} values is not whole heads of {d}", q.len());
    assert!(out.len() >= q.len(), "attention output holds {} values, needs {}", out.len(), q.len());
    if let Some(&r) = rows.iter().max() {
        assert!(r + d <= k.len() && r + d <= v.len(), "attention row offset {r} out of range");
    }
    let n = rows.len();
    #[cfg(target_arch = "x86_64")]
    {
        let group = q.len() / d;
        if d.is_multiple_of(8) && matches!(group, 2 | 4 | 8) && crate::simd::has_avx2_fma() {
            scores.resize(group * n, 0.0);
            // SAFETY: AVX2+FMA checked at run time; every row offset plus d is
            // within k and v (asserted above), d is a multiple of 8, `q` holds
            // `group` heads, `scores` `group * n` values, `out` at least `q.len()`.
            unsafe {
                match group {
                    2 => avx2::scores_group::<2>(q, k, rows, scale, scores),
                    4 => avx2::scores_group::<4>(q, k, rows, scale, scores),
                    _ => avx2::scores_group::<8>(q, k, rows, scale, scores),
                }
                for h in scores.chunks_exact_mut(n.max(1)).take(group) {
                    crate::ops::softmax_inplace(h);
                }
                match group {
                    2 => avx2::weighted_group::<2>(scores, v, rows, &mut out[..q.len()]),
                    4 => avx2::weighted_group::<4>(scores, v, rows, &mut out[..q.len()]),
                    _ => avx2::weighted_group::<8>(scores, v, rows, &mut out[..q.len()]),
                }
            }
            return;
        }
    }
    scores.resize(n, 0.0);
    for (qh, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        #[cfg(target_arch = "x86_64")]
        {
            if d.is_multiple_of(8) && crate::simd::has_avx2_fma() {
                // SAFETY: AVX2+FMA checked at run time; every row offset plus d
                // is within k and v (asserted above), and d is a multiple of 8.
                unsafe {
                    avx2::scores(qh, k, rows, scale, scores);
                    crate::ops::softmax_inplace(scores);
                    avx2::weighted_sum(scores, v, rows, o);
                }
                continue;
            }
        }
        for (s, &r) in scores.iter_mut().zip(rows) {
            *s = dot(qh, &k[r..r + d]) * scale;
        }
        crate::ops::softmax_inplace(scores);
        weighted_sum(scores, v, rows, o);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `scores[j] = q · k[rows[j]..][..d] * scale`, 8 keys at a time.
    ///
    /// # Safety
    /// Requires AVX2+FMA, `q.len() % 8 == 0` and every `rows[j] + q.len() <= k.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], k: &[f32], rows: &[usize], scale: f32, scores: &mut [f32]) {
        let d = q.len();
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let sc = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 <= rows.len() {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut i = 0;
            while i < d {
                let qv = _mm256_loadu_ps(qp.add(i));
                for (a, &r) in acc.iter_mut().zip(&rows[j..j + 8]) {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add(r + i)), *a);
                }
                i += 8;
            }
            _mm256_storeu_ps(scores.as_mut_ptr().add(j), _mm256_mul_ps(reduce8(acc), sc));
            j += 8;
        }
        for (s, &r) in scores[j..].iter_mut().zip(&rows[j..]) {
            let mut a = _mm256_setzero_ps();
            let mut i = 0;
            while i < d {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(kp.add(r + i)), a);
                i += 8;
            }
            *s = _mm256_cvtss_f32(reduce8([a; 8])) * scale;
        }
    }

    /// Scores of the `G` query heads in `q` (`G * d` values) sharing one KV
    /// head, reading each key once for all of them: `8 / G` keys at a time,
    /// one accumulator per (head, key). `scores` is head-major, `G * n`.
    ///
    /// # Safety
    /// Requires AVX2+FMA, `d = q.len() / G` a multiple of 8, every
    /// `rows[j] + d <= k.len()` and `scores.len() == G * rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_group<const G: usize>(
        q: &[f32],
        k: &[f32],
        rows: &[usize],
        scale: f32,
        scores: &mut [f32],
    ) {
        let kb = 8 / G;
        let (d, n) = (q.len() / G, rows.len());
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let sc = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + kb <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut i = 0;
            while i < d {
                for jj in 0..kb {
                    let kv = _mm256_loadu_ps(kp.add(rows[j + jj] + i));
                    for h in 0..G {
                        let a = &mut acc[h * kb + jj];
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * d + i)), kv, *a);
                    }
                }
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(reduce8(acc), sc));
            for h in 0..G {
                scores[h * n + j..h * n + j + kb].copy_from_slice(&lanes[h * kb..(h + 1) * kb]);
            }
            j += kb;
        }
        for jj in j..n {
            for h in 0..G {
                let mut a = _mm256_setzero_ps();
                let mut i = 0;
                while i < d {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * d + i)), _mm256_loadu_ps(kp.add(rows[jj] + i)), a);
                    i += 8;
                }
                scores[h * n + jj] = _mm256_cvtss_f32(reduce8([a; 8])) * scale;
            }
        }
    }

    /// `o_h = sum_j p_h[j] * v[rows[j]..][..d]` for the `G` heads of a group,
    /// reading each value row once for all of them; `p` is head-major
    /// (`G * n`), `o` holds `G` heads of `d`.
    ///
    /// # Safety
    /// Requires AVX2+FMA, `d = o.len() / G` a multiple of 8, every
    /// `rows[j] + d <= v.len()` and `p.len() == G * rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_group<const G: usize>(p: &[f32], v: &[f32], rows: &[usize], o: &mut [f32]) {
        // 8 accumulators: `nv` vectors of lanes for each of the G heads
        let (d, n) = (o.len() / G, rows.len());
        let vp = v.as_ptr();
        let mut c = 0;
        while c < d {
            let nv = if c + 8 * (8 / G).min(4) <= d { (8 / G).min(4) } else { 1 };
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &r) in rows.iter().enumerate() {
                for l in 0..nv {
                    let vv = _mm256_loadu_ps(vp.add(r + c + 8 * l));
                    for h in 0..G {
                        let a = &mut acc[h * nv + l];
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(p[h * n + j]), vv, *a);
                    }
                }
            }
            for h in 0..G {
                for l in 0..nv {
                    _mm256_storeu_ps(o.as_mut_ptr().add(h * d + c + 8 * l), acc[h * nv + l]);
                }
            }
            c += 8 * nv;
        }
    }

    /// Lane `i` of the result is the sum of the 8 lanes of `v[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce8(v: [__m256; 8]) -> __m256 {
        let a = _mm256_hadd_ps(v[0], v[1]);
        let b = _mm256_hadd_ps(v[2], v[3]);
        let c = _mm256_hadd_ps(v[4], v[5]);
        let e = _mm256_hadd_ps(v[6], v[7]);
        // per 128-bit half: [v0 v1 v2 v3] partial sums
        let ab = _mm256_hadd_ps(a, b);
        let ce = _mm256_hadd_ps(c, e);
        let lo = _mm256_permute2f128_ps(ab, ce, 0x20);
        let hi = _mm256_permute2f128_ps(ab, ce, 0x31);
        _mm256_add_ps(lo, hi)
    }

    /// `o = sum_j p[j] * v[rows[j]..][..d]`, 32 lanes at a time with two
    /// accumulator sets (even and odd keys), then 8 at a time.
    ///
    /// # Safety
    /// Requires AVX2+FMA, `o.len() % 8 == 0` and every `rows[j] + o.len() <= v.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(p: &[f32], v: &[f32], rows: &[usize], o: &mut [f32]) {
        let d = o.len();
        let vp = v.as_ptr();
        let mut c = 0;
        while c < d {
            let lanes = if c + 32 <= d { 4 } else { 1 };
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            for (j, (&pj, &r)) in p.iter().zip(rows).enumerate() {
                let pv = _mm256_set1_ps(pj);
                let set = &mut acc[j & 1];
                for (l, a) in set.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vp.add(r + c + 8 * l)), *a);
                }
            }
            for (l, (a, b)) in acc[0].iter().zip(&acc[1]).enumerate().take(lanes) {
                _mm256_storeu_ps(o.as_mut_ptr().add(c + 8 * l), _mm256_add_ps(*a, *b));
            }
            c += 8 * lanes;
        }
    }
}

/// A dot product with 8 lane accumulators and a tree reduction (the same
/// order whatever the caller, so results are reproducible).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, at) = a.split_at(a.len() / 8 * 8);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let h = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    let mut s = (h[0] + h[2]) + (h[1] + h[3]);
    for (x, y) in at.iter().zip(bt) {
        s += x * y;
    }
    s
}

/// `o = sum_j p[j] * v[rows[j]..][..d]`, 32 output lanes at a time kept in
/// registers across all rows.
#[inline(always)]
fn weighted_sum(p: &[f32], v: &[f32], rows: &[usize], o: &mut [f32]) {
    let d = o.len();
    let mut c = 0;
    while c + 32 <= d {
        let mut acc = [0f32; 32];
        for (&pj, &r) in p.iter().zip(rows) {
            let vr = &v[r + c..r + c + 32];
            for l in 0..32 {
                acc[l] += pj * vr[l];
            }
        }
        o[c..c + 32].copy_from_slice(&acc);
        c += 32;
    }
    if c < d {
        let tail = &mut o[c..];
        tail.fill(0.0);
        for (&pj, &r) in p.iter().zip(rows) {
            for (x, &y) in tail.iter_mut().zip(&v[r + c..r + d]) {
                *x += pj * y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_heads_match_naive_attention() {
        for group in [2usize, 4, 8, 3] {
            check_group(group, &[8, 32, 40, 64, 7]);
        }
    }

    #[test]
    fn matches_naive_attention() {
        check_against_naive();
        crate::simd::portable(check_against_naive);
    }

    fn check_against_naive() {
        check_group(2, &[8, 32, 40, 64, 7]);
        check_group(1, &[8, 32, 40, 64, 7]);
    }

    fn check_group(group: usize, dims: &[usize]) {
        for &d in dims {
            let rows_n = 13;
            let k: Vec<f32> = (0..rows_n * d * 2).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.05).collect();
            let v: Vec<f32> = (0..rows_n * d * 2).map(|i| ((i * 53 % 29) as f32 - 14.0) * 0.07).collect();
            let q: Vec<f32> = (0..group * d).map(|i| ((i * 17 % 19) as f32 - 9.0) * 0.1).collect();
            // every other row of a 2-row-wide cache, at an offset
            let rows: Vec<usize> = (0..rows_n).map(|j| (2 * j) * d).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![0.0; group * d];
            let kv = KvRows { keys: &k, values: &v, rows: &rows, head_dim: d };
            attend(&q, kv, scale, &mut Vec::new(), &mut out);
            for h in 0..group {
                let qh = &q[h * d..(h + 1) * d];
                let s: Vec<f64> = rows
                    .iter()
                    .map(|&r| qh.iter().zip(&k[r..r + d]).map(|(a, b)| (*a * *b) as f64).sum::<f64>() * scale as f64)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..d {
                    let want: f64 = e.iter().zip(&rows).map(|(p, &r)| p / z * v[r + i] as f64).sum();
                    let got = out[h * d + i] as f64;
                    assert!((got - want).abs() < 1e-5, "d={d} h={h} i={i}: {got} vs {want}");
                }
            }
        }
    }
}

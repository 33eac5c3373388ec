//! Scaled dot-product attention of one token's query heads over cached key
//! and value rows. With AVX2+FMA and a head width that is a multiple of 8,
//! the query heads sharing a KV head (groups of 1, 2, 4 or 8) are served
//! from one read of each key and value row: scores 8 (head, key) pairs at a
//! time with one transposing reduction, the value sum with eight
//! accumulators in registers. Otherwise a portable loop.

/// The cached keys and values one KV head attends over.
#[derive(Clone, Copy, Debug)]
pub struct KvRows<'a> {
    /// Key cache, read at `rows[j]..rows[j] + head_dim`.
    pub keys: &'a [f32],
    /// Value cache, read at the same offsets.
    pub values: &'a [f32],
    /// Offsets of the visible positions' rows, in position order.
    pub rows: &'a [usize],
    /// Key values per head (the query's too).
    pub head_dim: usize,
    /// Values per head of the value rows (at most `head_dim`; latent
    /// attention reads the first `value_dim` values of its key rows).
    pub value_dim: usize,
}

/// One KV head's share of a token's attention: each of the query heads in
/// `q` (`group * d` values, `d = kv.head_dim`) attends over `kv`'s rows,
/// scores scaled by `scale` and softmax-weighted; head `h` writes
/// `out[h * dv..(h + 1) * dv]` (`dv = kv.value_dim`). With `sinks` (one logit per head of `q`), head
/// `h`'s sink logit joins its softmax's denominator and is then dropped
/// (gpt-oss), so the weights sum to less than one. `scores` is scratch.
///
/// # Panics
/// If `q` is not whole heads of `d`, `dv` is 0 or above `d`, an offset in
/// `kv.rows` leaves fewer than `d` keys or `dv` values, `out` is shorter
/// than `group * dv`, or
/// `sinks` does not hold one value per head.
pub fn attend(q: &[f32], kv: KvRows<'_>, scale: f32, sinks: Option<&[f32]>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let KvRows { keys: k, values: v, rows, head_dim: d, value_dim: dv } = kv;
    assert!(d > 0 && q.len().is_multiple_of(d), "attention query of {} values is not whole heads of {d}", q.len());
    assert!(dv > 0 && dv <= d, "attention value width {dv} is not in 1..={d}");
    let (n, group) = (rows.len(), q.len() / d);
    assert!(out.len() >= group * dv, "attention output holds {} values, needs {}", out.len(), group * dv);
    if let Some(s) = sinks {
        assert_eq!(s.len(), group, "one attention sink per query head");
    }
    if let Some(&r) = rows.iter().max() {
        assert!(r + d <= k.len() && r + dv <= v.len(), "attention row offset {r} out of range");
    }
    let out = &mut out[..group * dv];
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(8) && dv.is_multiple_of(8) && crate::simd::has_avx2_fma() {
            // SAFETY: AVX2+FMA checked at run time; every row offset plus d is
            // within k and plus dv within v (asserted above), d and dv are
            // multiples of 8, and each call gets whole heads of q and out with
            // scores sized to match.
            unsafe {
                match group {
                    2 => avx2::attend_group::<2>(q, k, v, rows, scale, sinks, scores, out),
                    4 => avx2::attend_group::<4>(q, k, v, rows, scale, sinks, scores, out),
                    8 => avx2::attend_group::<8>(q, k, v, rows, scale, sinks, scores, out),
                    // one head at a time (no group sharing for other sizes)
                    _ => {
                        for (h, (qh, oh)) in q.chunks_exact(d).zip(out.chunks_exact_mut(dv)).enumerate() {
                            let sink = sinks.map(|s| &s[h..h + 1]);
                            avx2::attend_group::<1>(qh, k, v, rows, scale, sink, scores, oh);
                        }
                    }
                }
            }
            return;
        }
    }
    scores.resize(n, 0.0);
    for (h, (qh, o)) in q.chunks_exact(d).zip(out.chunks_exact_mut(dv)).enumerate() {
        for (s, &r) in scores.iter_mut().zip(rows) {
            *s = crate::simd::dot_f32(qh, &k[r..r + d]) * scale;
        }
        softmax(scores, sinks.map(|s| s[h]));
        o.fill(0.0);
        for (&p, &r) in scores.iter().zip(rows) {
            crate::ops::axpy(o, p, &v[r..r + dv]);
        }
    }
}

/// Softmax of one head's scores, with its sink logit in the denominator.
fn softmax(scores: &mut [f32], sink: Option<f32>) {
    match sink {
        None => crate::ops::softmax_inplace(scores),
        Some(s) => crate::ops::softmax_with_sink(scores, s),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Attention of the `G` query heads in `q` sharing one KV head: scores,
    /// softmax per head, weighted values.
    ///
    /// # Safety
    /// Requires AVX2+FMA, `d = q.len() / G` and `dv = o.len() / G` multiples
    /// of 8, every `rows[j] + d` within `k` and `rows[j] + dv` within `v`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_group<const G: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rows: &[usize],
        scale: f32,
        sinks: Option<&[f32]>,
        scores: &mut Vec<f32>,
        o: &mut [f32],
    ) {
        let n = rows.len();
        scores.resize(G * n, 0.0);
        scores_group::<G>(q, k, rows, scale, scores);
        for (i, h) in scores.chunks_exact_mut(n.max(1)).take(G).enumerate() {
            super::softmax(h, sinks.map(|s| s[i]));
        }
        weighted_group::<G>(scores, v, rows, o);
    }

    /// Scores of the `G` query heads in `q` (`G * d` values) sharing one KV
    /// head, reading each key once for all of them: `8 / G` keys at a time,
    /// one accumulator per (head, key), one transposing reduction. `scores`
    /// is head-major, `G * n`.
    ///
    /// # Safety
    /// Requires AVX2+FMA, `d = q.len() / G` a multiple of 8, every
    /// `rows[j] + d <= k.len()` and `scores.len() == G * rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_group<const G: usize>(q: &[f32], k: &[f32], rows: &[usize], scale: f32, scores: &mut [f32]) {
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
                scores[h * n + jj] = crate::simd::avx2::hsum(a) * scale;
            }
        }
    }

    /// `o_h = sum_j p_h[j] * v[rows[j]..][..d]` for the `G` heads of a group,
    /// reading each value row once for all of them; `p` is head-major
    /// (`G * n`), `o` holds `G` heads of `d`. Eight accumulators: `nv`
    /// vectors of lanes per head, in `sets` sets that alternate over keys
    /// (two for a lone head, so eight FMA chains stay in flight).
    ///
    /// # Safety
    /// Requires AVX2+FMA, `d = o.len() / G` a multiple of 8, every
    /// `rows[j] + d <= v.len()` and `p.len() == G * rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_group<const G: usize>(p: &[f32], v: &[f32], rows: &[usize], o: &mut [f32]) {
        let (d, n) = (o.len() / G, rows.len());
        let vp = v.as_ptr();
        let wide = (8 / G).min(4);
        let mut c = 0;
        while c < d {
            let nv = if c + 8 * wide <= d { wide } else { 1 };
            let sets = (8 / (G * nv)).min(2);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &r) in rows.iter().enumerate() {
                let base = (j % sets) * G * nv;
                for l in 0..nv {
                    let vv = _mm256_loadu_ps(vp.add(r + c + 8 * l));
                    for h in 0..G {
                        let a = &mut acc[base + h * nv + l];
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(p[h * n + j]), vv, *a);
                    }
                }
            }
            for h in 0..G {
                for l in 0..nv {
                    let mut sum = acc[h * nv + l];
                    if sets == 2 {
                        sum = _mm256_add_ps(sum, acc[G * nv + h * nv + l]);
                    }
                    _mm256_storeu_ps(o.as_mut_ptr().add(h * d + c + 8 * l), sum);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_heads_match_naive_attention() {
        for group in [2usize, 4, 8, 3] {
            check_group(group, &[8, 32, 40, 64, 7], false, false);
            check_group(group, &[8, 32, 40, 64, 7], true, false);
        }
    }

    #[test]
    fn values_narrower_than_keys_read_a_prefix() {
        for group in [1usize, 2, 8, 3] {
            check_group(group, &[16, 40, 72, 7], false, true);
        }
        crate::simd::portable(|| check_group(2, &[16, 40, 7], false, true));
    }

    #[test]
    fn matches_naive_attention() {
        check_against_naive();
        crate::simd::portable(check_against_naive);
    }

    fn check_against_naive() {
        for sinks in [false, true] {
            check_group(2, &[8, 32, 40, 64, 7], sinks, false);
            check_group(1, &[8, 32, 40, 64, 7], sinks, false);
        }
    }

    /// Against an f64 softmax; with `sinks`, a sink logit per head (one of
    /// them far above the scores, so most of the weight goes to it); with
    /// `narrow`, values 8 narrower than keys (4 below 16).
    fn check_group(group: usize, dims: &[usize], sinks: bool, narrow: bool) {
        for &d in dims {
            let dv = match (narrow, d >= 16) {
                (false, _) => d,
                (true, true) => d - 8,
                (true, false) => d - 4,
            };
            let rows_n = 13;
            let k: Vec<f32> = (0..rows_n * d * 2).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.05).collect();
            let v: Vec<f32> = (0..rows_n * d * 2).map(|i| ((i * 53 % 29) as f32 - 14.0) * 0.07).collect();
            let q: Vec<f32> = (0..group * d).map(|i| ((i * 17 % 19) as f32 - 9.0) * 0.1).collect();
            // every other row of a 2-row-wide cache, at an offset
            let rows: Vec<usize> = (0..rows_n).map(|j| (2 * j) * d).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![0.0; group * dv];
            let kv = KvRows { keys: &k, values: &v, rows: &rows, head_dim: d, value_dim: dv };
            let sink: Vec<f32> = (0..group).map(|h| if h == 0 { 6.0 } else { 0.3 * h as f32 - 0.5 }).collect();
            attend(&q, kv, scale, sinks.then_some(&sink[..]), &mut Vec::new(), &mut out);
            for h in 0..group {
                let qh = &q[h * d..(h + 1) * d];
                let s: Vec<f64> = rows
                    .iter()
                    .map(|&r| qh.iter().zip(&k[r..r + d]).map(|(a, b)| (*a * *b) as f64).sum::<f64>() * scale as f64)
                    .collect();
                let sink_h = sinks.then(|| sink[h] as f64);
                let m = s.iter().cloned().chain(sink_h).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum::<f64>() + sink_h.map_or(0.0, |x| (x - m).exp());
                for i in 0..dv {
                    let want: f64 = e.iter().zip(&rows).map(|(p, &r)| p / z * v[r + i] as f64).sum();
                    let got = out[h * dv + i] as f64;
                    assert!((got - want).abs() < 1e-5, "d={d} h={h} i={i} sinks={sinks}: {got} vs {want}");
                }
            }
        }
    }
}

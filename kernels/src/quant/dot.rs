//! Integer dot products of a quantized weight row with quantized
//! activation rows ([`super::acts`]), one group of 32 values at a time:
//! `Σ_g dx_g · (s_lo·Σ_{16} qw·qx + s_hi·Σ_{16} qw·qx + min_g·Σ qx)`, where
//! a group's weight scales `s` (one per 16 values: Q6_K has two per group,
//! the others one) and `min` come from the weight format. The AVX2 path
//! multiplies 32 int8 pairs per `maddubs`; for the k-quants (activations
//! in 256-value blocks) it accumulates a whole super-block in integers,
//! the 6- and 8-bit sub-block scales applied by `madd`, before one float
//! multiply-add, as llama.cpp does. With AVX-512 (BW) the k-quants take
//! two sub-blocks (64 values) per instruction; their integer sums are the
//! AVX2 path's, so both give the same bits. The portable path computes the
//! same integer sums group by group (the f32 accumulation order differs).

use super::acts::{QuantizedActs, QK};
use super::blocks::{e8m0_half, f16_at, scale_min_k4, MXFP4_VALUES};
use super::QuantFormat;

/// The activation block size products with `format` weights use.
pub(crate) fn act_block(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K => 256,
        _ => QK,
    }
}

/// Products of weight rows `js` (row `j` is `w[j * row_bytes..][..row_bytes]`,
/// whole blocks of `format`, `a.k` values) with the `m` activation rows of
/// `a`: element `(i, j)` is written to `out[i * n + j]`. Each weight row is
/// unpacked once per tile of up to 8 activation rows; features are checked
/// once per call.
///
/// # Safety
/// `out` must be valid for writes of every `(i, j)` element, `i < m`, `j` in
/// `js`, with row stride `n`, and no other thread may write them meanwhile.
///
/// # Panics
/// If the activations were quantized for another format, hold fewer than
/// `m` rows, or `w` is shorter than the rows need.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_block(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    js: std::ops::Range<usize>,
    a: &QuantizedActs,
    m: usize,
    out: *mut f32,
    n: usize,
) {
    let groups = a.k / QK;
    assert!(format.int8_activations(), "{format} weights compute with f32 activations");
    assert!(a.block == act_block(format), "activations quantized for another format");
    assert!(m * groups <= a.sums.len(), "activation rows out of range");
    assert!(row_bytes >= a.k / format.block_values() * format.block_bytes(), "weight rows too short");
    assert!(js.end * row_bytes <= w.len(), "weight rows out of range");
    let blk = Block { format, w, row_bytes, a, m, out, n };
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512bw() && matches!(format, QuantFormat::Q4K | QuantFormat::Q6K) {
            // SAFETY: AVX-512 F/BW, AVX2, FMA and F16C checked; bounds checked
            // above, `out` as the caller promised.
            return unsafe { x86::block_512(&blk, js) };
        }
        if crate::simd::has_avx2_fma() {
            // SAFETY: AVX2, FMA and F16C checked; as above.
            return unsafe { x86::block_avx2(&blk, js) };
        }
    }
    for j in js {
        let wr = &w[j * row_bytes..(j + 1) * row_bytes];
        for i in 0..m {
            // SAFETY: as the caller promised.
            unsafe { *out.add(i * n + j) = portable(format, wr, a, i) };
        }
    }
}

/// The operands of one [`dot_block`] call.
struct Block<'a> {
    format: QuantFormat,
    w: &'a [u8],
    row_bytes: usize,
    a: &'a QuantizedActs,
    m: usize,
    out: *mut f32,
    n: usize,
}

/// `Σ w·x` of one weight row with one activation row (tests).
#[cfg(test)]
pub(crate) fn dot(format: QuantFormat, w: &[u8], a: &QuantizedActs, row: usize) -> f32 {
    let mut out = vec![0f32; a.sums.len() / (a.k / QK)];
    // SAFETY: `out` holds one value per activation row, one column.
    unsafe { dot_block(format, w, w.len(), 0..1, a, out.len(), out.as_mut_ptr(), 1) };
    out[row]
}

/// One group of 32 weights as integers with its scales and min.
struct Group {
    q: [i8; 32],
    /// Scale of values 0..16 and 16..32.
    scale: [f32; 2],
    /// Added per unit of the activations' sum (a weight's `+ min`).
    min: f32,
}

/// Group `g` of row `w` (portable unpacking, the reference for the AVX2 one).
fn group(format: QuantFormat, w: &[u8], g: usize) -> Group {
    let mut q = [0i8; 32];
    let nibbles = |b: &[u8], q: &mut [i8; 32], off: i8| {
        for l in 0..16 {
            q[l] = (b[l] & 0x0F) as i8 - off;
            q[l + 16] = (b[l] >> 4) as i8 - off;
        }
    };
    let fifth = |qh: &[u8], q: &mut [i8; 32]| {
        let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (l, v) in q.iter_mut().enumerate() {
            *v |= (((h >> l) & 1) << 4) as i8;
        }
    };
    let one = |s: f32| [s, s];
    match format {
        QuantFormat::Q8_0 => {
            let b = &w[g * 34..];
            for (v, &x) in q.iter_mut().zip(&b[2..34]) {
                *v = x as i8;
            }
            Group { q, scale: one(f16_at(b, 0)), min: 0.0 }
        }
        QuantFormat::Q4_0 => {
            let b = &w[g * 18..];
            nibbles(&b[2..18], &mut q, 8);
            Group { q, scale: one(f16_at(b, 0)), min: 0.0 }
        }
        QuantFormat::Q4_1 => {
            let b = &w[g * 20..];
            nibbles(&b[4..20], &mut q, 0);
            Group { q, scale: one(f16_at(b, 0)), min: f16_at(b, 2) }
        }
        QuantFormat::Q5_0 => {
            let b = &w[g * 22..];
            nibbles(&b[6..22], &mut q, 0);
            fifth(&b[2..6], &mut q);
            q.iter_mut().for_each(|v| *v -= 16);
            Group { q, scale: one(f16_at(b, 0)), min: 0.0 }
        }
        QuantFormat::Q5_1 => {
            let b = &w[g * 24..];
            nibbles(&b[8..24], &mut q, 0);
            fifth(&b[4..8], &mut q);
            Group { q, scale: one(f16_at(b, 0)), min: f16_at(b, 2) }
        }
        QuantFormat::Fp8E4m3 => unreachable!("fp8 weights compute with f32 activations (checked in dot_block)"),
        QuantFormat::Mxfp4 => {
            let b = &w[g * 17..];
            for l in 0..16 {
                q[l] = MXFP4_VALUES[(b[1 + l] & 0x0F) as usize];
                q[l + 16] = MXFP4_VALUES[(b[1 + l] >> 4) as usize];
            }
            Group { q, scale: one(e8m0_half(b[0])), min: 0.0 }
        }
        QuantFormat::Q4K | QuantFormat::Q5K => {
            let (bb, j) = (format.block_bytes(), g % 8);
            let b = &w[g / 8 * bb..(g / 8 + 1) * bb];
            let (sc, m) = scale_min_k4(&b[4..16]);
            let nib = if format == QuantFormat::Q4K { &b[16..144] } else { &b[48..176] };
            for (l, v) in q.iter_mut().enumerate() {
                *v = ((nib[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F) as i8;
                if format == QuantFormat::Q5K {
                    *v |= (((b[16 + l] >> j) & 1) << 4) as i8;
                }
            }
            Group { q, scale: one(f16_at(b, 0) * sc[j] as f32), min: -(f16_at(b, 2) * m[j] as f32) }
        }
        QuantFormat::Q6K => {
            let (b, h, s) = (&w[g / 8 * 210..(g / 8 + 1) * 210], (g % 8) / 4, g % 4);
            let (ql, qh) = (&b[64 * h + 32 * (s % 2)..], &b[128 + 32 * h..]);
            for (l, v) in q.iter_mut().enumerate() {
                let lo = (ql[l] >> (4 * (s / 2))) & 0x0F;
                let hi = (qh[l] >> (2 * s)) & 0x03;
                *v = (lo | (hi << 4)) as i8 - 32;
            }
            let d = f16_at(b, 208);
            let first = (128 * h + 32 * s) / 16;
            Group { q, scale: [d * b[192 + first] as i8 as f32, d * b[193 + first] as i8 as f32], min: 0.0 }
        }
    }
}

fn portable(format: QuantFormat, w: &[u8], a: &QuantizedActs, row: usize) -> f32 {
    let groups = a.k / QK;
    let qs = &a.qs[row * a.k..(row + 1) * a.k];
    let sums = &a.sums[row * groups..(row + 1) * groups];
    let mut total = 0f32;
    for (g, (x, &sum)) in qs.chunks_exact(QK).zip(sums).enumerate() {
        let dx = a.d[(row * a.k + g * QK) / a.block];
        let gr = group(format, w, g);
        let half = |r: std::ops::Range<usize>| r.map(|l| gr.q[l] as i32 * x[l] as i32).sum::<i32>() as f32;
        total += dx * (gr.scale[0] * half(0..16) + gr.scale[1] * half(16..32) + gr.min * sum as f32);
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::acts::{QuantizedActs, QK};
    use super::super::blocks::{e8m0_half, scale_min_k4, MXFP4_VALUES};
    use super::super::x86::{fifth_bits, join, nibbles16};
    use super::QuantFormat;
    use crate::simd::avx2::hsum;

    /// The little-endian f16 at `b[i..i + 2]`, widened by F16C (always
    /// inlined into the block functions, which enable F16C).
    #[inline(always)]
    unsafe fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([*b.get_unchecked(i), *b.get_unchecked(i + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
    use std::arch::x86_64::*;

    /// `Σ` over 32 int8 pairs, per 16-value half weighted by the i16 lanes
    /// of `scales`, as 8 i32 lanes (the sign trick: `|x| · (w · sign x)`).
    #[inline(always)]
    unsafe fn mul_sum(w: __m256i, x: __m256i, scales: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
        _mm256_madd_epi16(p, scales)
    }

    /// Eight bytes as eight i16 lanes.
    #[inline(always)]
    unsafe fn widen_u8x8(v: &[u8; 8]) -> __m128i {
        _mm_cvtepu8_epi16(_mm_loadl_epi64(v.as_ptr() as *const __m128i))
    }

    /// A shuffle that fills every i16 lane of a 128-bit lane with its i16
    /// lane `j` (of eight).
    #[inline(always)]
    unsafe fn pick_i16(j: usize) -> __m256i {
        let pair = (2 * j as i16) | ((2 * j as i16 + 1) << 8);
        _mm256_set1_epi16(pair)
    }

    /// `R` activation rows' accumulators: 8 f32 lanes of scaled integer
    /// sums and a scalar for the weights' mins.
    struct Acc<'a, const R: usize> {
        a: &'a QuantizedActs,
        rows: [usize; R],
        groups: usize,
        lanes: [__m256; R],
        mins: [f32; R],
        /// The k-quants' mins, four lanes per row.
        kmins: [__m128; R],
    }

    impl<'a, const R: usize> Acc<'a, R> {
        #[inline(always)]
        unsafe fn new(a: &'a QuantizedActs, rows: [usize; R]) -> Self {
            let zero = (_mm256_setzero_ps(), _mm_setzero_ps());
            Self { a, rows, groups: a.k / QK, lanes: [zero.0; R], mins: [0.0; R], kmins: [zero.1; R] }
        }

        /// Row `r`'s int8 activations of group `g`.
        #[inline(always)]
        unsafe fn x(&self, r: usize, g: usize) -> __m256i {
            _mm256_loadu_si256(self.a.qs.as_ptr().add((self.rows[r] * self.groups + g) * QK) as *const __m256i)
        }

        /// Adds super-block `sb` (256 values, activations in 256-blocks) of
        /// every row: integer sums `isum` (sub-block scales applied) times
        /// `d`, plus `dmin · Σ_j m_j · Σ qx_j` for the sub-block mins (`m16`:
        /// the eight mins as i16; `None` for formats without).
        #[inline(always)]
        unsafe fn superblock(&mut self, sb: usize, isum: [__m256i; R], d: f32, dmin: f32, m16: Option<__m128i>) {
            let per_row = self.groups / 8;
            for (r, isum) in isum.into_iter().enumerate() {
                let dx = *self.a.d.get_unchecked(self.rows[r] * per_row + sb);
                self.lanes[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * dx), self.lanes[r]);
                if let Some(m16) = m16 {
                    let sums = self.a.sums.as_ptr().add(self.rows[r] * self.groups + sb * 8);
                    let p = _mm_madd_epi16(m16, _mm_loadu_si128(sums as *const __m128i));
                    self.kmins[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(p), _mm_set1_ps(dmin * dx), self.kmins[r]);
                }
            }
        }

        /// The rows' totals.
        #[inline(always)]
        unsafe fn totals(&self) -> [f32; R] {
            let mut out = [0f32; R];
            for (r, o) in out.iter_mut().enumerate() {
                let k = self.kmins[r];
                let k = _mm_add_ps(k, _mm_movehl_ps(k, k));
                let k = _mm_add_ss(k, _mm_movehdup_ps(k));
                *o = hsum(self.lanes[r]) + (self.mins[r] + _mm_cvtss_f32(k));
            }
            out
        }

        /// Adds group `g` of weights `wv` (scales per half in `scales`,
        /// overall scale `dw`, `+ min` per weight) to every row.
        #[inline(always)]
        unsafe fn add(&mut self, g: usize, wv: __m256i, scales: __m256i, dw: f32, min: f32) {
            for r in 0..R {
                let bi = self.rows[r] * self.groups + g;
                let x = _mm256_loadu_si256(self.a.qs.as_ptr().add(bi * QK) as *const __m256i);
                let dx = *self.a.d.get_unchecked(bi);
                let p = _mm256_cvtepi32_ps(mul_sum(wv, x, scales));
                self.lanes[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * dx), self.lanes[r]);
                if min != 0.0 {
                    self.mins[r] += min * dx * *self.a.sums.get_unchecked(bi) as f32;
                }
            }
        }
    }

    /// Every weight row of `js` against every activation row of `b`, in tiles
    /// of 8, 4 and 1 activation rows.
    macro_rules! tiles {
        ($rows:ident, $b:expr, $js:expr) => {{
            let b = $b;
            for j in $js {
                let wr = &b.w[j * b.row_bytes..(j + 1) * b.row_bytes];
                let mut i = 0;
                while i + 8 <= b.m {
                    let v = $rows::<8>(b.format, wr, b.a, [i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6, i + 7]);
                    for (r, v) in v.into_iter().enumerate() {
                        *b.out.add((i + r) * b.n + j) = v;
                    }
                    i += 8;
                }
                while i + 4 <= b.m {
                    let v = $rows::<4>(b.format, wr, b.a, [i, i + 1, i + 2, i + 3]);
                    for (r, v) in v.into_iter().enumerate() {
                        *b.out.add((i + r) * b.n + j) = v;
                    }
                    i += 4;
                }
                for i in i..b.m {
                    *b.out.add(i * b.n + j) = $rows::<1>(b.format, wr, b.a, [i])[0];
                }
            }
        }};
    }

    /// [`super::dot_block`] on AVX2.
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C, and `dot_block`'s checks and contract.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_avx2(b: &super::Block<'_>, js: std::ops::Range<usize>) {
        tiles!(dot_rows, b, js)
    }

    /// [`super::dot_block`] with 512-bit products (Q4_K and Q6_K).
    ///
    /// # Safety
    /// Requires AVX-512 F and BW, AVX2, FMA and F16C; `b.format` is Q4_K or
    /// Q6_K; `dot_block`'s checks and contract.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn block_512(b: &super::Block<'_>, js: std::ops::Range<usize>) {
        tiles!(dot_rows_512, b, js)
    }

    /// `Σ w·x` of weight row `w` with activation rows `rows` of `a` (inlined
    /// into [`block_avx2`], whose features it needs).
    #[inline(always)]
    unsafe fn dot_rows<const R: usize>(format: QuantFormat, w: &[u8], a: &QuantizedActs, rows: [usize; R]) -> [f32; R] {
        let groups = a.k / QK;
        let mut acc = Acc::new(a, rows);
        let wp = w.as_ptr();
        let ones = _mm256_set1_epi16(1);
        match format {
            QuantFormat::Q8_0 => {
                for g in 0..groups {
                    let wv = _mm256_loadu_si256(wp.add(g * 34 + 2) as *const __m256i);
                    acc.add(g, wv, ones, f16_at(w, g * 34), 0.0);
                }
            }
            QuantFormat::Q4_0 => {
                for g in 0..groups {
                    let wv = _mm256_sub_epi8(nibbles16(wp.add(g * 18 + 2)), _mm256_set1_epi8(8));
                    acc.add(g, wv, ones, f16_at(w, g * 18), 0.0);
                }
            }
            QuantFormat::Q4_1 => {
                for g in 0..groups {
                    acc.add(g, nibbles16(wp.add(g * 20 + 4)), ones, f16_at(w, g * 20), f16_at(w, g * 20 + 2));
                }
            }
            QuantFormat::Q5_0 => {
                for g in 0..groups {
                    let b = wp.add(g * 22);
                    let wv = _mm256_or_si256(nibbles16(b.add(6)), fifth_bits(b.add(2)));
                    acc.add(g, _mm256_sub_epi8(wv, _mm256_set1_epi8(16)), ones, f16_at(w, g * 22), 0.0);
                }
            }
            QuantFormat::Q5_1 => {
                for g in 0..groups {
                    let b = wp.add(g * 24);
                    let wv = _mm256_or_si256(nibbles16(b.add(8)), fifth_bits(b.add(4)));
                    acc.add(g, wv, ones, f16_at(w, g * 24), f16_at(w, g * 24 + 2));
                }
            }
            QuantFormat::Fp8E4m3 => unreachable!("fp8 weights compute with f32 activations (checked in dot_block)"),
            QuantFormat::Mxfp4 => {
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(MXFP4_VALUES.as_ptr() as *const __m128i));
                for g in 0..groups {
                    let b = wp.add(g * 17);
                    acc.add(g, _mm256_shuffle_epi8(table, nibbles16(b.add(1))), ones, e8m0_half(*b), 0.0);
                }
            }
            QuantFormat::Q4K | QuantFormat::Q5K => {
                let bb = format.block_bytes();
                let five = format == QuantFormat::Q5K;
                let mask = _mm256_set1_epi8(0x0F);
                for sb in 0..groups / 8 {
                    let b = &w[sb * bb..(sb + 1) * bb];
                    let (sc, m) = scale_min_k4(&b[4..16]);
                    let sc16 = _mm256_broadcastsi128_si256(widen_u8x8(&sc));
                    let nib = b.as_ptr().add(if five { 48 } else { 16 });
                    let qh = _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i);
                    let mut isum = [_mm256_setzero_si256(); R];
                    for p in 0..4 {
                        let v = _mm256_loadu_si256(nib.add(32 * p) as *const __m256i);
                        for half in 0..2 {
                            let j = 2 * p + half;
                            let mut wv = if half == 0 { v } else { _mm256_srli_epi16(v, 4) };
                            wv = _mm256_and_si256(wv, mask);
                            if five {
                                let shifted = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32));
                                let bit = _mm256_and_si256(shifted, _mm256_set1_epi8(1));
                                wv = _mm256_or_si256(wv, _mm256_slli_epi16(bit, 4));
                            }
                            // unsigned weights: maddubs directly (at most 2·31·127)
                            let s16 = _mm256_shuffle_epi8(sc16, pick_i16(j));
                            for (r, acc_r) in isum.iter_mut().enumerate() {
                                let p16 = _mm256_maddubs_epi16(wv, acc.x(r, sb * 8 + j));
                                *acc_r = _mm256_add_epi32(*acc_r, _mm256_madd_epi16(p16, s16));
                            }
                        }
                    }
                    acc.superblock(sb, isum, f16_at(b, 0), -f16_at(b, 2), Some(widen_u8x8(&m)));
                }
            }
            QuantFormat::Q6K => {
                let (m4, m2, off) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03), _mm256_set1_epi8(32));
                for sb in 0..groups / 8 {
                    let b = &w[sb * 210..(sb + 1) * 210];
                    let mut isum = [_mm256_setzero_si256(); R];
                    for h in 0..2 {
                        let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
                        for s in 0..4 {
                            let mut lo = _mm256_loadu_si256(b.as_ptr().add(64 * h + 32 * (s % 2)) as *const __m256i);
                            if s >= 2 {
                                lo = _mm256_srli_epi16(lo, 4);
                            }
                            let lo = _mm256_and_si256(lo, m4);
                            let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s as i32)), m2);
                            let wv = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), off);
                            let first = (128 * h + 32 * s) / 16;
                            let scales = join(
                                _mm_set1_epi16(b[192 + first] as i8 as i16),
                                _mm_set1_epi16(b[193 + first] as i8 as i16),
                            );
                            for (r, acc_r) in isum.iter_mut().enumerate() {
                                *acc_r = _mm256_add_epi32(*acc_r, mul_sum(wv, acc.x(r, sb * 8 + 4 * h + s), scales));
                            }
                        }
                    }
                    acc.superblock(sb, isum, f16_at(b, 208), 0.0, None);
                }
            }
        }
        acc.totals()
    }

    /// The sum of a 512-bit vector's halves (16 i32 lanes to 8).
    #[inline(always)]
    unsafe fn halves(z: __m512i) -> __m256i {
        _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64::<1>(z))
    }

    /// [`halves`] of every row's sums.
    #[inline(always)]
    unsafe fn halves_all<const R: usize>(z: [__m512i; R]) -> [__m256i; R] {
        let mut out = [_mm256_setzero_si256(); R];
        for r in 0..R {
            out[r] = halves(z[r]);
        }
        out
    }

    /// Two 256-bit halves as one vector (`lo` first).
    #[inline(always)]
    unsafe fn join512(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    /// [`dot_rows`] for Q4_K and Q6_K with 512-bit integer products: each
    /// super-block's integer sums equal the AVX2 path's, so the results are
    /// the same bits.
    ///
    /// Inlined into [`block_512`], whose features it needs.
    #[inline(always)]
    unsafe fn dot_rows_512<const R: usize>(
        format: QuantFormat,
        w: &[u8],
        a: &QuantizedActs,
        rows: [usize; R],
    ) -> [f32; R] {
        let groups = a.k / QK;
        let mut acc = Acc::new(a, rows);
        // row r's 64 int8 activations of groups g and g + 1
        // (no closures here: they would not inherit the caller's features)
        macro_rules! x2 {
            ($r:expr, $g:expr) => {
                _mm512_loadu_si512(a.qs.as_ptr().add((rows[$r] * groups + $g) * QK) as *const _)
            };
        }
        if format == QuantFormat::Q4K {
            let mask = _mm256_set1_epi8(0x0F);
            for sb in 0..groups / 8 {
                let b = &w[sb * 144..(sb + 1) * 144];
                let (sc, m) = scale_min_k4(&b[4..16]);
                let sc16 = _mm512_broadcast_i32x4(widen_u8x8(&sc));
                let mut isum = [_mm512_setzero_si512(); R];
                for p in 0..4 {
                    let v = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * p) as *const __m256i);
                    let wv = join512(_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
                    let s16 = _mm512_shuffle_epi8(sc16, join512(pick_i16(2 * p), pick_i16(2 * p + 1)));
                    for (r, acc_r) in isum.iter_mut().enumerate() {
                        let p16 = _mm512_maddubs_epi16(wv, x2!(r, sb * 8 + 2 * p));
                        *acc_r = _mm512_add_epi32(*acc_r, _mm512_madd_epi16(p16, s16));
                    }
                }
                acc.superblock(sb, halves_all(isum), f16_at(b, 0), -f16_at(b, 2), Some(widen_u8x8(&m)));
            }
        } else {
            // Q6_K as unsigned 6-bit values: Σ sc·(q - 32)·x = Σ sc·q·x - 32·Σ sc·x
            let (m4, m2) = (_mm512_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
            let thirty_two = _mm512_set1_epi8(32);
            // i16 lane l takes scale l / 8 of four
            let spread = _mm512_set_epi64(
                0x0003_0003_0003_0003,
                0x0003_0003_0003_0003,
                0x0002_0002_0002_0002,
                0x0002_0002_0002_0002,
                0x0001_0001_0001_0001,
                0x0001_0001_0001_0001,
                0,
                0,
            );
            for sb in 0..groups / 8 {
                let b = &w[sb * 210..(sb + 1) * 210];
                let mut isum = [_mm512_setzero_si512(); R];
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(b.as_ptr().add(64 * h) as *const _);
                    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
                    for s in [0usize, 2] {
                        // groups s and s + 1: low nibbles of the 64 bytes, or high
                        let lo = if s == 0 { ql } else { _mm512_srli_epi16(ql, 4) };
                        let lo = _mm512_and_si512(lo, m4);
                        let hi_a = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s as i32)), m2);
                        let hi_b = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s as i32 + 2)), m2);
                        let q = _mm512_or_si512(lo, _mm512_slli_epi16(join512(hi_a, hi_b), 4));
                        let first = (128 * h + 32 * s) / 16;
                        let four = u32::from_le_bytes([b[192 + first], b[193 + first], b[194 + first], b[195 + first]]);
                        let sc4 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(four as i32));
                        let s16 = _mm512_permutexvar_epi16(spread, _mm512_castsi128_si512(sc4));
                        for (r, acc_r) in isum.iter_mut().enumerate() {
                            let x = x2!(r, sb * 8 + 4 * h + s);
                            let qx = _mm512_madd_epi16(_mm512_maddubs_epi16(q, x), s16);
                            let ox = _mm512_madd_epi16(_mm512_maddubs_epi16(thirty_two, x), s16);
                            *acc_r = _mm512_add_epi32(*acc_r, _mm512_sub_epi32(qx, ox));
                        }
                    }
                }
                acc.superblock(sb, halves_all(isum), f16_at(b, 208), 0.0, None);
            }
        }
        acc.totals()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::random_blocks;
    use super::*;

    #[test]
    fn integer_dots_match_dequantized_products() {
        for format in QuantFormat::ALL {
            for k in [256, 512, 1024] {
                let w = random_blocks(format, k / format.block_values(), k as u64 + 3);
                let mut wf = vec![0f32; k];
                format.dequantize(&w, &mut wf);
                let x: Vec<f32> = (0..2 * k).map(|i| ((i * 7919 % 97) as f32 / 97.0) - 0.5).collect();
                let mut a = QuantizedActs::default();
                a.fill(&x, k, act_block(format));
                // a row's result does not depend on the rows beside it
                let mut alone = QuantizedActs::default();
                alone.fill(&x[k..2 * k], k, act_block(format));
                assert_eq!(
                    dot(format, &w, &alone, 0).to_bits(),
                    dot(format, &w, &a, 1).to_bits(),
                    "{format}: row alone"
                );
                for row in 0..2 {
                    // the activations as quantized: the dot must equal the
                    // exact product of both dequantized operands
                    let xq: Vec<f64> =
                        (0..k).map(|t| a.d[(row * k + t) / a.block] as f64 * a.qs[row * k + t] as f64).collect();
                    let exact: f64 = xq.iter().zip(&wf).map(|(a, b)| a * *b as f64).sum();
                    let scale: f64 = xq.iter().zip(&wf).map(|(a, b)| (a * *b as f64).abs()).sum();
                    let fast = dot(format, &w, &a, row) as f64;
                    let slow = crate::simd::portable(|| dot(format, &w, &a, row)) as f64;
                    assert!((fast - exact).abs() <= 1e-5 * scale + 1e-7, "{format} k={k}: {fast} vs {exact}");
                    assert!((slow - exact).abs() <= 1e-5 * scale + 1e-7, "{format} k={k}: portable {slow} vs {exact}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_k_quant_dots_equal_the_avx2_ones_bit_for_bit() {
        if !crate::simd::has_avx512bw() {
            moe_types::testing::skip("quant::avx512_k_quant_dots", "no AVX-512 BW on this CPU");
            return;
        }
        for format in [QuantFormat::Q4K, QuantFormat::Q6K] {
            let k = 1024;
            let w = random_blocks(format, k / 256, 11);
            let x: Vec<f32> = (0..8 * k).map(|i| ((i * 7919 % 193) as f32 / 193.0) - 0.45).collect();
            let mut a = QuantizedActs::default();
            a.fill(&x, k, act_block(format));
            let (mut wide, mut narrow) = ([0f32; 8], [0f32; 8]);
            // SAFETY: both feature sets checked above; 8 rows, one column.
            unsafe {
                x86::block_512(
                    &Block { format, w: &w, row_bytes: w.len(), a: &a, m: 8, out: wide.as_mut_ptr(), n: 1 },
                    0..1,
                );
                x86::block_avx2(
                    &Block { format, w: &w, row_bytes: w.len(), a: &a, m: 8, out: narrow.as_mut_ptr(), n: 1 },
                    0..1,
                );
            }
            assert_eq!(wide.map(f32::to_bits), narrow.map(f32::to_bits), "{format}");
        }
    }

    #[test]
    fn simd_activation_quantization_equals_the_portable_one() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 104729 % 211) as f32 - 105.0) * 0.013).collect();
        let (mut fast, mut slow) = (QuantizedActs::default(), QuantizedActs::default());
        for block in [QK, 256] {
            fast.fill(&x, 512, block);
            crate::simd::portable(|| slow.fill(&x, 512, block));
            assert_eq!(fast.qs, slow.qs);
            assert_eq!(fast.sums, slow.sums);
            assert_eq!(fast.d, slow.d);
        }
    }
}

//! AVX2 dequantization, 8 values per instruction. Each value is the same
//! multiply (and subtract) as in [`super::blocks`], unfused, so results are
//! bit-identical to the portable path.

use super::blocks::{e8m0_half, scale_min_k4, E4M3_VALUES, MXFP4_VALUES};
use super::QuantFormat;
use crate::simd::avx2::f16_at;
use std::arch::x86_64::*;

/// # Safety
/// Requires AVX2, FMA and F16C; `bytes` holds whole blocks and `out` their values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(q: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    let (bb, bv) = (q.block_bytes(), q.block_values());
    macro_rules! each_block {
        ($f:ident) => {
            for (i, b) in bytes.chunks_exact(bb).enumerate() {
                // SAFETY: block i's values are out[i * bv..(i + 1) * bv], in
                // bounds as the caller promised.
                unsafe { $f(b, out.as_mut_ptr().add(i * bv)) };
            }
        };
    }
    match q {
        QuantFormat::Q8_0 => each_block!(q8_0),
        QuantFormat::Q4_0 => each_block!(q4_0),
        QuantFormat::Q4K => each_block!(q4_k),
        QuantFormat::Q5K => each_block!(q5_k),
        QuantFormat::Q6K => each_block!(q6_k),
        QuantFormat::Mxfp4 => each_block!(mxfp4),
        QuantFormat::Fp8E4m3 => each_block!(fp8_e4m3),
        QuantFormat::Q4_1 => each_block!(q4_1),
        QuantFormat::Q5_0 => each_block!(q5_0),
        QuantFormat::Q5_1 => each_block!(q5_1),
    }
}

/// Bytes 0..8 of `v` as unsigned, widened to 8 f32.
#[inline(always)]
unsafe fn u8x8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

/// Bytes 0..8 of `v` as signed, widened to 8 f32.
#[inline(always)]
unsafe fn i8x8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// Stores `d * q` for the 16 signed bytes of `v` at `out`.
#[inline(always)]
unsafe fn store_i8x16(v: __m128i, d: __m256, out: *mut f32) {
    _mm256_storeu_ps(out, _mm256_mul_ps(d, i8x8(v)));
    _mm256_storeu_ps(out.add(8), _mm256_mul_ps(d, i8x8(_mm_srli_si128(v, 8))));
}

/// Stores `d * q - m` for the 16 unsigned bytes of `v` at `out`.
#[inline(always)]
unsafe fn store_u8x16(v: __m128i, d: __m256, m: __m256, out: *mut f32) {
    _mm256_storeu_ps(out, _mm256_sub_ps(_mm256_mul_ps(d, u8x8(v)), m));
    _mm256_storeu_ps(out.add(8), _mm256_sub_ps(_mm256_mul_ps(d, u8x8(_mm_srli_si128(v, 8))), m));
}

#[inline(always)]
unsafe fn load16(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(b: &[u8], out: *mut f32) {
    let d = _mm256_set1_ps(f16_at(b, 0));
    let p = b.as_ptr().add(2);
    store_i8x16(load16(p), d, out);
    store_i8x16(load16(p.add(16)), d, out.add(16));
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0(b: &[u8], out: *mut f32) {
    let d = _mm256_set1_ps(f16_at(b, 0));
    let v = load16(b.as_ptr().add(2));
    let (mask, eight) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(8));
    store_i8x16(_mm_sub_epi8(_mm_and_si128(v, mask), eight), d, out);
    store_i8x16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight), d, out.add(16));
}

/// The 32 nibbles of sub-block `j` of a Q4_K/Q5_K block (`qs` its 128
/// nibble bytes), as two vectors of 16 bytes.
#[inline(always)]
unsafe fn nibbles(qs: *const u8, j: usize) -> [__m128i; 2] {
    let mask = _mm_set1_epi8(0x0F);
    let p = qs.add(32 * (j / 2));
    let (a, b) = (load16(p), load16(p.add(16)));
    if j.is_multiple_of(2) {
        [_mm_and_si128(a, mask), _mm_and_si128(b, mask)]
    } else {
        [_mm_and_si128(_mm_srli_epi16(a, 4), mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)]
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(b: &[u8], out: *mut f32) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = scale_min_k4(&b[4..16]);
    let qs = b.as_ptr().add(16);
    for j in 0..8 {
        let (d1, m1) = (_mm256_set1_ps(d * sc[j] as f32), _mm256_set1_ps(dmin * m[j] as f32));
        let [lo, hi] = nibbles(qs, j);
        store_u8x16(lo, d1, m1, out.add(32 * j));
        store_u8x16(hi, d1, m1, out.add(32 * j + 16));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k(b: &[u8], out: *mut f32) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = scale_min_k4(&b[4..16]);
    let qh = b.as_ptr().add(16);
    let qs = b.as_ptr().add(48);
    let (h0, h1) = (load16(qh), load16(qh.add(16)));
    let one = _mm_set1_epi8(1);
    // bit j of each byte moved to bit 4 (16-bit shifts: the mask keeps each
    // byte's own bit)
    let high = |h: __m128i, j: i32| {
        let bit = _mm_and_si128(_mm_srl_epi16(h, _mm_cvtsi32_si128(j)), one);
        _mm_slli_epi16(bit, 4)
    };
    for j in 0..8 {
        let (d1, m1) = (_mm256_set1_ps(d * sc[j] as f32), _mm256_set1_ps(dmin * m[j] as f32));
        let [lo, hi] = nibbles(qs, j);
        store_u8x16(_mm_or_si128(lo, high(h0, j as i32)), d1, m1, out.add(32 * j));
        store_u8x16(_mm_or_si128(hi, high(h1, j as i32)), d1, m1, out.add(32 * j + 16));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(b: &[u8], out: *mut f32) {
    let d = f16_at(b, 208);
    let (ql, qh, scales) = (b.as_ptr(), b.as_ptr().add(128), &b[192..208]);
    let (mask4, mask2, off) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(0x03), _mm_set1_epi8(32));
    for h in 0..2 {
        for s in 0..4 {
            // values 128h + 32s + (0..32)
            let lp = ql.add(64 * h + 32 * (s % 2));
            let hp = qh.add(32 * h);
            for half in 0..2 {
                let mut lo = load16(lp.add(16 * half));
                if s >= 2 {
                    lo = _mm_srli_epi16(lo, 4);
                }
                let lo = _mm_and_si128(lo, mask4);
                let hi =
                    _mm_and_si128(_mm_srl_epi16(load16(hp.add(16 * half)), _mm_cvtsi32_si128(2 * s as i32)), mask2);
                let q = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), off);
                let v = 128 * h + 32 * s + 16 * half;
                let dsc = _mm256_set1_ps(d * scales[v / 16] as i8 as f32);
                store_i8x16(q, dsc, out.add(v));
            }
        }
    }
}

/// Two 16-byte halves as one vector (`lo` first).
#[inline(always)]
pub(super) unsafe fn join(lo: __m128i, hi: __m128i) -> __m256i {
    _mm256_set_m128i(hi, lo)
}

/// The 32 nibbles of 16 bytes at `p`: low nibbles first.
#[inline(always)]
pub(super) unsafe fn nibbles16(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    join(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m))
}

/// Bit `i` of the little-endian u32 at `p` as 0x10 in byte `i`.
#[inline(always)]
pub(super) unsafe fn fifth_bits(p: *const u8) -> __m256i {
    let h = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(h as i32), shuf);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Stores `d * q + m` for the 32 unsigned bytes of `v` at `out`.
#[inline(always)]
unsafe fn store_u8x32_plus(v: __m256i, d: __m256, m: __m256, out: *mut f32) {
    let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)];
    for (h, x) in halves.into_iter().enumerate() {
        _mm256_storeu_ps(out.add(16 * h), _mm256_add_ps(_mm256_mul_ps(d, u8x8(x)), m));
        _mm256_storeu_ps(out.add(16 * h + 8), _mm256_add_ps(_mm256_mul_ps(d, u8x8(_mm_srli_si128(x, 8))), m));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1(b: &[u8], out: *mut f32) {
    let (d, m) = (_mm256_set1_ps(f16_at(b, 0)), _mm256_set1_ps(f16_at(b, 2)));
    store_u8x32_plus(nibbles16(b.as_ptr().add(4)), d, m, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0(b: &[u8], out: *mut f32) {
    let d = _mm256_set1_ps(f16_at(b, 0));
    let q = _mm256_or_si256(nibbles16(b.as_ptr().add(6)), fifth_bits(b.as_ptr().add(2)));
    let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
    store_i8x16(_mm256_castsi256_si128(q), d, out);
    store_i8x16(_mm256_extracti128_si256::<1>(q), d, out.add(16));
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1(b: &[u8], out: *mut f32) {
    let (d, m) = (_mm256_set1_ps(f16_at(b, 0)), _mm256_set1_ps(f16_at(b, 2)));
    let q = _mm256_or_si256(nibbles16(b.as_ptr().add(8)), fifth_bits(b.as_ptr().add(4)));
    store_u8x32_plus(q, d, m, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_e4m3(b: &[u8], out: *mut f32) {
    let d = _mm256_set1_ps(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let codes = b.as_ptr().add(4);
    for i in (0..128).step_by(8) {
        // widen 8 codes in registers: table lookups by gather (indices are
        // bytes, within the 256-entry table), then the scale
        let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.add(i) as *const __m128i));
        let v = _mm256_i32gather_ps::<4>(E4M3_VALUES.as_ptr(), idx);
        _mm256_storeu_ps(out.add(i), _mm256_mul_ps(v, d));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4(b: &[u8], out: *mut f32) {
    let d = _mm256_set1_ps(e8m0_half(b[0]));
    let table = _mm_loadu_si128(MXFP4_VALUES.as_ptr() as *const __m128i);
    let v = load16(b.as_ptr().add(1));
    let mask = _mm_set1_epi8(0x0F);
    store_i8x16(_mm_shuffle_epi8(table, _mm_and_si128(v, mask)), d, out);
    store_i8x16(_mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(v, 4), mask)), d, out.add(16));
}

//! Portable dequantization, block by block: the reference the SIMD paths
//! must equal bit for bit. Each value is computed with the operations of
//! `gguf.quants` (and ggml's `dequantize_row_*`), in their order.

use super::QuantFormat;

/// Widens whole blocks (lengths checked by the caller).
pub(super) fn dequantize(q: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    let f = match q {
        QuantFormat::Q8_0 => q8_0,
        QuantFormat::Q4_0 => q4_0,
        QuantFormat::Q4_1 => q4_1,
        QuantFormat::Q5_0 => q5_0,
        QuantFormat::Q5_1 => q5_1,
        QuantFormat::Q4K => q4_k,
        QuantFormat::Q5K => q5_k,
        QuantFormat::Q6K => q6_k,
        QuantFormat::Mxfp4 => mxfp4,
        QuantFormat::Fp8E4m3 => fp8_e4m3,
    };
    for (b, o) in bytes.chunks_exact(q.block_bytes()).zip(out.chunks_exact_mut(q.block_values())) {
        f(b, o);
    }
}

/// The little-endian f16 at `b[i..i + 2]`, widened (exact).
#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
        *l = d * ((q & 0x0F) as i32 - 8) as f32;
        *h = d * ((q >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..20]) {
        *l = d * (q & 0x0F) as f32 + m;
        *h = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: value `i` has the nibble of
/// byte `i % 16` (high when `i >= 16`) and bit `i` of the 32-bit `qh`.
#[inline(always)]
fn five_bit(qh: &[u8], qs: &[u8], i: usize) -> u8 {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let nib = (qs[i % 16] >> (4 * (i / 16))) & 0x0F;
    nib | ((((h >> i) & 1) as u8) << 4)
}

fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * (five_bit(&b[2..6], &b[6..22], i) as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * five_bit(&b[4..8], &b[8..24], i) as f32 + m;
    }
}

/// The 6-bit scales and mins of a Q4_K / Q5_K block's 8 sub-blocks, from
/// its 12 packed bytes.
#[inline(always)]
pub(super) fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    // four bytes at a time: scale j < 4 is the low 6 bits of byte j, scale
    // j + 4 the low nibble of byte j + 8 under the top 2 bits of byte j;
    // mins likewise from bytes 4..8 and the high nibbles of bytes 8..12
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (w0, w1, w2) = (word(0), word(4), word(8));
    let (low6, low4, top2) = (0x3F3F_3F3Fu32, 0x0F0F_0F0Fu32, 0x0303_0303u32);
    let sc_hi = (w2 & low4) | (((w0 >> 6) & top2) << 4);
    let m_hi = ((w2 >> 4) & low4) | (((w1 >> 6) & top2) << 4);
    let join = |lo: u32, hi: u32| ((lo as u64) | ((hi as u64) << 32)).to_le_bytes();
    (join(w0 & low6, sc_hi), join(w1 & low6, m_hi))
}

/// Q4_K: `d`, `dmin` (f16), 12 bytes of scales and mins, 128 bytes of
/// nibbles (32 bytes per pair of sub-blocks: low nibbles then high).
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for j in 0..8 {
        let (d1, m1) = (d * sc[j] as f32, dmin * m[j] as f32);
        let shift = 4 * (j % 2);
        let src = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        for (o, &q) in out[32 * j..32 * j + 32].iter_mut().zip(src) {
            *o = d1 * ((q >> shift) & 0x0F) as f32 - m1;
        }
    }
}

/// Q5_K: as Q4_K, with 32 bytes of high bits (bit `j` of byte `l` is the
/// fifth bit of sub-block `j`'s value `l`) before the nibbles.
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = scale_min_k4(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for j in 0..8 {
        let (d1, m1) = (d * sc[j] as f32, dmin * m[j] as f32);
        let shift = 4 * (j % 2);
        let src = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        for (l, o) in out[32 * j..32 * j + 32].iter_mut().enumerate() {
            let q = ((src[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            *o = d1 * q as f32 - m1;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8
/// scales (one per 16 values), `d` (f16). Per half of 128 values: value
/// `t` has the low nibble of `ql[t % 64]` (shifted by 4 when `t >= 64`)
/// and bits `2 * (t / 32)` of `qh[t % 32]`.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    for h in 0..2 {
        for t in 0..128 {
            let v = 128 * h + t;
            let lo = (ql[64 * h + t % 64] >> (4 * (t / 64))) & 0x0F;
            let hi = (qh[32 * h + t % 32] >> (2 * (t / 32))) & 0x03;
            let q = (lo | (hi << 4)) as i32 - 32;
            out[v] = (d * scales[v / 16] as i8 as f32) * q as f32;
        }
    }
}

/// e2m1 values, doubled (the e8m0 scale is halved to match).
pub(super) const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of `2^(e - 127)`, the scale the doubled e2m1 values use.
#[inline(always)]
pub(super) fn e8m0_half(e: u8) -> f32 {
    f32::from_bits(if e < 2 { 0x0020_0000u32 << e } else { ((e as u32) - 1) << 23 })
}

/// The value of each `float8_e4m3fn` code (NaN for 0x7F and 0xFF).
pub(super) static E4M3_VALUES: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut c = 0;
    while c < 256 {
        let (sign, exp, man) = ((c >> 7) as u32, ((c >> 3) & 0x0F) as u32, (c & 0x07) as u32);
        let bits = if exp == 15 && man == 7 {
            0x7FC0_0000
        } else if exp == 0 {
            if man == 0 {
                0
            } else {
                // man / 8 * 2^-6: normalise into an f32
                let lead = 31 - man.leading_zeros(); // highest set bit, 0..=2
                let e = lead + 127 - 9; // 2^(lead - 9)
                (e << 23) | ((man << (23 - lead)) & 0x007F_FFFF)
            }
        } else {
            ((exp + 120) << 23) | (man << 20)
        };
        t[c] = f32::from_bits(bits | (sign << 31));
        c += 1;
    }
    t
}

/// FP8: a little-endian f32 scale, then 128 e4m3 codes; each value is the
/// code's value times the scale (one f32 multiply, as a dequantize-then-
/// compute reference does).
fn fp8_e4m3(b: &[u8], out: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &c) in out.iter_mut().zip(&b[4..132]) {
        *o = E4M3_VALUES[c as usize] * d;
    }
}

/// MXFP4: one e8m0 byte, then 16 bytes: value `l` is the low nibble of
/// byte `l`, value `16 + l` the high one.
fn mxfp4(b: &[u8], out: &mut [f32]) {
    let d = e8m0_half(b[0]);
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[1..17]) {
        *l = d * MXFP4_VALUES[(q & 0x0F) as usize] as f32;
        *h = d * MXFP4_VALUES[(q >> 4) as usize] as f32;
    }
}

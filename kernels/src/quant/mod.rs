//! Block-quantized weights in GGUF's formats: the bytes of a row are
//! `cols / block_values` blocks back to back, each a few scales and packed
//! integers (ggml's layouts, so a GGUF tensor's bytes are used as stored).
//!
//! Dequantization is bit-exact against the `gguf` Python package's
//! reference (`gguf.quants`): every value is the same f32 multiply (and
//! subtract) in the same order, on the portable path and the AVX2 one
//! (which uses separate multiply and subtract, never a fused one).
//! Products with quantized weights: the activation rows are quantized to
//! int8 blocks ([`acts`]) and multiplied with integer dot products ([`dot`],
//! as llama.cpp does) for the k-quants at any row count and for the other
//! formats up to 32 rows; more rows of the other formats (prefill) widen
//! blocks of weight rows to f32 in thread-local scratch and run `gemm` on
//! them (`matmul::quant_blocked`), activations in f32 (measured faster
//! there: `examples/quant_bench.rs`).

pub(crate) mod acts;
mod blocks;
pub(crate) mod dot;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use quantize::quantize_rows;

/// A block-quantized format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 32 int8 values and one f16 scale: 8.5 bits per weight.
    Q8_0,
    /// 32 4-bit values (offset 8) and one f16 scale: 4.5 bits per weight.
    Q4_0,
    /// 32 4-bit values, an f16 scale and an f16 min: 5 bits per weight.
    Q4_1,
    /// 32 5-bit values (offset 16) and one f16 scale: 5.5 bits per weight
    /// (llama-quantize's fallback for rows too short for k-quants).
    Q5_0,
    /// 32 5-bit values, an f16 scale and an f16 min: 6 bits per weight.
    Q5_1,
    /// k-quant: 256 4-bit values in 8 sub-blocks, each with a 6-bit scale
    /// and min, under f16 super-scales: 4.5 bits per weight.
    Q4K,
    /// As `Q4K` with a fifth bit per value: 5.5 bits per weight.
    Q5K,
    /// k-quant: 256 6-bit values in 16 sub-blocks with int8 scales under
    /// one f16 scale: 6.5625 bits per weight.
    Q6K,
    /// OCP microscaling FP4: 32 e2m1 values and one e8m0 scale: 4.25 bits
    /// per weight (gpt-oss's experts).
    Mxfp4,
    /// FP8 (`float8_e4m3fn`) values with one f32 scale per 128: 8.25 bits
    /// per weight. Not a GGUF type: the layout of block-scaled FP8
    /// checkpoints (DeepSeek-V3, Kimi K2, GLM-4.5-FP8), whose 128x128
    /// blocks share a scale, with each row's 128-wide slice carrying it. A
    /// block is the f32 scale (little-endian), then 128 codes. Products keep
    /// f32 activations ([`Self::int8_activations`] is false).
    Fp8E4m3,
}

impl QuantFormat {
    /// Every format, in GGUF type order.
    pub const ALL: [QuantFormat; 9] =
        [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q5_1, Self::Q8_0, Self::Q4K, Self::Q5K, Self::Q6K, Self::Mxfp4];

    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Mxfp4 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            Self::Fp8E4m3 => 128,
        }
    }

    /// Whether products may quantize activation rows to int8 blocks (the
    /// integer dot products of [`dot`]); FP8 values are not integers.
    pub const fn int8_activations(self) -> bool {
        !matches!(self, Self::Fp8E4m3)
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Mxfp4 => 17,
            Self::Fp8E4m3 => 132,
        }
    }

    /// The lower-case name used in settings and messages (`q4_k`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::Mxfp4 => "mxfp4",
            Self::Fp8E4m3 => "fp8_e4m3",
        }
    }

    /// Bytes of one row of `cols` values; `None` unless `cols` is a whole
    /// number of blocks.
    pub const fn row_bytes(self, cols: usize) -> Option<usize> {
        if cols.is_multiple_of(self.block_values()) {
            Some(cols / self.block_values() * self.block_bytes())
        } else {
            None
        }
    }

    /// Widens whole blocks: `bytes` holds `n` blocks, `out` `n *
    /// block_values()` values.
    ///
    /// # Panics
    /// If the lengths disagree (a caller's bug: shapes are checked when a
    /// [`crate::Weight`] is built).
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let (bb, bv) = (self.block_bytes(), self.block_values());
        assert!(
            bytes.len().is_multiple_of(bb) && out.len() == bytes.len() / bb * bv,
            "{}: {} bytes do not hold {} values",
            self.name(),
            bytes.len(),
            out.len()
        );
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::has_avx2_fma() {
                // SAFETY: AVX2 is present (checked at run time); the lengths
                // were checked above.
                unsafe { x86::dequantize(self, bytes, out) };
                return;
            }
        }
        blocks::dequantize(self, bytes, out);
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = crate::KernelError;

    fn from_str(s: &str) -> Result<Self, crate::KernelError> {
        Self::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| crate::KernelError::UnknownFormat { name: s.to_string() })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Random blocks whose f16 scales are finite (so both paths can be
    /// compared bit for bit).
    pub(crate) fn random_blocks(q: QuantFormat, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut bytes: Vec<u8> = (0..n * q.block_bytes())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        let f16_at: &[usize] = match q {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q5_0 => &[0],
            QuantFormat::Q4_1 | QuantFormat::Q5_1 => &[0, 2],
            QuantFormat::Q4K | QuantFormat::Q5K => &[0, 2],
            QuantFormat::Q6K => &[208],
            QuantFormat::Mxfp4 | QuantFormat::Fp8E4m3 => &[],
        };
        for b in bytes.chunks_mut(q.block_bytes()) {
            if q == QuantFormat::Q8_0 {
                // valid files hold -127..=127 (the integer dot's sign trick
                // relies on it, as llama.cpp's does)
                b[2..34].iter_mut().filter(|v| **v == 0x80).for_each(|v| *v = 0x81);
            }
            if q == QuantFormat::Fp8E4m3 {
                // a finite f32 scale, and no NaN codes (0x7F, 0xFF)
                let scale = (b[0] as f32 - 128.0) / 3000.0;
                b[..4].copy_from_slice(&scale.to_le_bytes());
                b[4..].iter_mut().filter(|v| **v & 0x7F == 0x7F).for_each(|v| *v ^= 1);
            }
            if q == QuantFormat::Mxfp4 {
                // e8m0 scales near 2^-5 (and rarely the subnormal ones)
                b[0] = if b[0] < 4 { b[0] % 2 } else { 118 + b[0] % 12 };
            }
            for &o in f16_at {
                let v = half::f16::from_f32((b[o] as f32 - 128.0) / 3000.0).to_bits().to_le_bytes();
                b[o..o + 2].copy_from_slice(&v);
            }
        }
        bytes
    }

    #[test]
    fn simd_dequantization_is_bit_exact_with_the_portable_one() {
        for q in QuantFormat::ALL.into_iter().chain([QuantFormat::Fp8E4m3]) {
            for n in [1, 3, 8] {
                let bytes = random_blocks(q, n, n as u64 + 7);
                let mut fast = vec![0f32; n * q.block_values()];
                let mut slow = fast.clone();
                q.dequantize(&bytes, &mut fast);
                blocks::dequantize(q, &bytes, &mut slow);
                let fb: Vec<u32> = fast.iter().map(|v| v.to_bits()).collect();
                let sb: Vec<u32> = slow.iter().map(|v| v.to_bits()).collect();
                assert_eq!(fb, sb, "{q} with {n} blocks");
            }
        }
    }

    #[test]
    fn stacking_keeps_one_format_and_widens_mixed_ones_exactly() {
        let a = crate::Weight::from_quant(2, 256, QuantFormat::Q4K, random_blocks(QuantFormat::Q4K, 2, 1)).unwrap();
        let b = crate::Weight::from_quant(1, 256, QuantFormat::Q6K, random_blocks(QuantFormat::Q6K, 1, 2)).unwrap();
        let same = crate::Weight::concat_rows(&[a.clone(), a.clone()]).unwrap();
        assert_eq!(same.quant_format(), Some(QuantFormat::Q4K));
        assert_eq!(same.to_f32(), [a.to_f32(), a.to_f32()].concat());
        let bf = crate::Weight::from_bf16_bits(1, 256, vec![0x3F80; 256]).unwrap();
        for parts in [vec![a.clone(), b.clone()], vec![bf.clone(), a.clone()]] {
            let mixed = crate::Weight::concat_rows(&parts).unwrap();
            assert_eq!(mixed.quant_format(), None);
            assert!(matches!(mixed.data(), crate::WeightData::F32(_)));
            let want: Vec<f32> = parts.iter().flat_map(crate::Weight::to_f32).collect();
            assert_eq!(mixed.to_f32(), want);
        }
    }

    #[test]
    fn fp8_codes_are_e4m3fn_values_times_the_scale() {
        // sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
        // subnormal; 0x7F is NaN; 448 the largest
        let cases = [
            (0x00u8, 0.0f32),
            (0x38, 1.0),
            (0x40, 2.0),
            (0x3C, 1.5),
            (0xB8, -1.0),
            (0x7E, 448.0),
            (0x01, 1.0 / 512.0),
            (0x08, 1.0 / 64.0),
        ];
        let mut block = vec![0u8; 132];
        block[..4].copy_from_slice(&0.25f32.to_le_bytes());
        for (i, &(code, _)) in cases.iter().enumerate() {
            block[4 + i] = code;
        }
        let mut out = vec![0f32; 128];
        QuantFormat::Fp8E4m3.dequantize(&block, &mut out);
        for (i, &(code, value)) in cases.iter().enumerate() {
            assert_eq!(out[i], value * 0.25, "code {code:#04x}");
        }
    }

    #[test]
    fn names_parse_back() {
        for q in QuantFormat::ALL {
            assert_eq!(q.name().parse::<QuantFormat>(), Ok(q));
        }
        assert!("q3_k".parse::<QuantFormat>().unwrap_err().to_string().contains("q4_k"));
    }
}

//! Weight matrices in the checkpoint's precision.

use half::{bf16, f16};

/// Storage of a weight matrix's values.
#[derive(Clone, Debug)]
pub enum WeightData {
    /// 4 bytes per value.
    F32(Vec<f32>),
    /// 2 bytes per value, raw bf16 bits; widened to f32 inside the kernels.
    Bf16(Vec<u16>),
}

/// A row-major `[rows, cols]` matrix: `rows` output features, each a row of
/// `cols` input features (the `nn.Linear` / safetensors layout).
#[derive(Clone, Debug)]
pub struct Weight {
    rows: usize,
    cols: usize,
    data: WeightData,
}

impl Weight {
    /// Wraps f32 values; `values.len()` must be `rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self, crate::KernelError> {
        check_len("f32 weight", rows * cols, values.len())?;
        Ok(Self { rows, cols, data: WeightData::F32(values) })
    }

    /// Wraps raw bf16 bits; `bits.len()` must be `rows * cols`.
    pub fn from_bf16_bits(rows: usize, cols: usize, bits: Vec<u16>) -> Result<Self, crate::KernelError> {
        check_len("bf16 weight", rows * cols, bits.len())?;
        Ok(Self { rows, cols, data: WeightData::Bf16(bits) })
    }

    /// Converts f16 values to f32 storage (f16 is rare in MoE checkpoints;
    /// widening keeps one fast path per precision).
    pub fn from_f16_bits(rows: usize, cols: usize, bits: &[u16]) -> Result<Self, crate::KernelError> {
        let values = bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
        Self::from_f32(rows, cols, values)
    }

    /// Stacks matrices with the same column count on top of each other
    /// (e.g. q, k and v projections into one qkv matrix). All parts must
    /// share a precision.
    pub fn concat_rows(parts: &[Weight]) -> Result<Self, crate::KernelError> {
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows = parts.iter().map(|p| p.rows).sum();
        for p in parts {
            check_len("concatenated weight columns", cols, p.cols)?;
        }
        let data = match parts.first().map(|p| &p.data) {
            Some(WeightData::Bf16(_)) => {
                let mut out = Vec::with_capacity(rows * cols);
                for p in parts {
                    match &p.data {
                        WeightData::Bf16(v) => out.extend_from_slice(v),
                        WeightData::F32(v) => out.extend(v.iter().map(|&x| bf16::from_f32(x).to_bits())),
                    }
                }
                WeightData::Bf16(out)
            }
            _ => {
                let mut out = Vec::with_capacity(rows * cols);
                for p in parts {
                    match &p.data {
                        WeightData::F32(v) => out.extend_from_slice(v),
                        WeightData::Bf16(v) => out.extend(v.iter().map(|&b| bf16::from_bits(b).to_f32())),
                    }
                }
                WeightData::F32(out)
            }
        };
        Ok(Self { rows, cols, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored values.
    pub fn data(&self) -> &WeightData {
        &self.data
    }

    /// Bytes the values occupy (what one full read of the matrix costs).
    pub fn nbytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) => v.len() * 2,
        }
    }

    /// Writes row `r` widened to f32 into `out` (`out.len() == cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[range]),
            WeightData::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[range]) {
                    *o = bf16_to_f32(b);
                }
            }
        }
    }
}

/// Widens raw bf16 bits to f32 (exact).
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), crate::KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(crate::KernelError::Shape { what, expected, got })
    }
}

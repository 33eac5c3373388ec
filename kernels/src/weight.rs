//! Weight matrices in the checkpoint's precision.

use crate::quant::QuantFormat;
use half::{bf16, f16};

/// Storage of a weight matrix's values.
#[derive(Clone, Debug)]
pub enum WeightData {
    /// 4 bytes per value.
    F32(Vec<f32>),
    /// 2 bytes per value, raw bf16 bits; widened to f32 inside the kernels.
    Bf16(Vec<u16>),
    /// Block-quantized rows ([`crate::quant`]), widened inside the kernels.
    Quant(QuantData),
}

/// The bytes of a block-quantized matrix: each row is `cols /
/// format.block_values()` blocks.
#[derive(Clone, Debug)]
pub struct QuantData {
    format: QuantFormat,
    bytes: Vec<u8>,
    /// Products keep the activations in f32 at every row count (weights
    /// widened bit-exactly), for formats whose reference computes in float
    /// (gpt-oss's MXFP4 in transformers); otherwise few activation rows are
    /// quantized to int8 blocks as llama.cpp does.
    f32_acts: bool,
}

impl QuantData {
    /// The format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// The raw blocks, row after row.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether products keep f32 activations (see [`Weight::with_f32_activations`]).
    pub fn f32_activations(&self) -> bool {
        self.f32_acts
    }
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

    /// Wraps block-quantized rows: `bytes` must hold `rows` rows of `cols`
    /// values, `cols` a whole number of blocks.
    pub fn from_quant(
        rows: usize,
        cols: usize,
        format: QuantFormat,
        bytes: Vec<u8>,
    ) -> Result<Self, crate::KernelError> {
        let row = format.row_bytes(cols).ok_or(crate::KernelError::PartialBlock {
            format,
            block: format.block_values(),
            cols,
        })?;
        check_len("quantized weight bytes", rows * row, bytes.len())?;
        let f32_acts = !format.int8_activations();
        Ok(Self { rows, cols, data: WeightData::Quant(QuantData { format, bytes, f32_acts }) })
    }

    /// A quantized matrix whose products keep the activations in f32 at
    /// every row count (weights widened bit-exactly, then a float product):
    /// exact against a reference that dequantizes and computes in float,
    /// slower than the int8 path for few rows. No effect on float weights.
    pub fn with_f32_activations(mut self) -> Self {
        if let WeightData::Quant(q) = &mut self.data {
            q.f32_acts = true;
        }
        self
    }

    /// This matrix with products that quantize few activation rows to int8
    /// (the default for quantized weights; undoes [`Self::with_f32_activations`];
    /// no effect on formats without integer products, FP8).
    pub fn with_int8_activations(mut self) -> Self {
        if let WeightData::Quant(q) = &mut self.data {
            q.f32_acts = !q.format.int8_activations();
        }
        self
    }

    /// Quantizes this matrix to `format` (from its values widened to f32).
    pub fn quantize(&self, format: QuantFormat) -> Result<Self, crate::KernelError> {
        let values = self.to_f32();
        let bytes = crate::quant::quantize_rows(format, &values, self.cols)?;
        Self::from_quant(self.rows, self.cols, format, bytes)
    }

    /// Every value widened to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                self.row_to_f32(r, row);
            }
        }
        out
    }

    /// The matrix with rows in the order `order` (row `i` of the result is
    /// row `order[i]` of this one), in the same storage.
    pub fn select_rows(&self, order: &[usize]) -> Result<Self, crate::KernelError> {
        check_len("row order", self.rows, order.len())?;
        if let Some(&bad) = order.iter().find(|&&r| r >= self.rows) {
            return Err(crate::KernelError::Shape { what: "row index", expected: self.rows, got: bad });
        }
        let c = self.cols;
        let data = match &self.data {
            WeightData::F32(v) => {
                WeightData::F32(order.iter().flat_map(|&r| v[r * c..(r + 1) * c].iter().copied()).collect())
            }
            WeightData::Bf16(v) => {
                WeightData::Bf16(order.iter().flat_map(|&r| v[r * c..(r + 1) * c].iter().copied()).collect())
            }
            WeightData::Quant(q) => {
                let rb = q.bytes.len() / self.rows.max(1);
                let bytes = order.iter().flat_map(|&r| q.bytes[r * rb..(r + 1) * rb].iter().copied()).collect();
                WeightData::Quant(QuantData { format: q.format, bytes, f32_acts: q.f32_acts })
            }
        };
        Ok(Self { rows: self.rows, cols: self.cols, data })
    }

    /// Rows `range` as a matrix of their own, in the same storage.
    pub fn row_range(&self, range: std::ops::Range<usize>) -> Result<Self, crate::KernelError> {
        if range.start > range.end || range.end > self.rows {
            return Err(crate::KernelError::Shape { what: "row range end", expected: self.rows, got: range.end });
        }
        let (c, n) = (self.cols, range.len());
        let data = match &self.data {
            WeightData::F32(v) => WeightData::F32(v[range.start * c..range.end * c].to_vec()),
            WeightData::Bf16(v) => WeightData::Bf16(v[range.start * c..range.end * c].to_vec()),
            WeightData::Quant(q) => {
                let rb = q.bytes.len() / self.rows.max(1);
                let bytes = q.bytes[range.start * rb..range.end * rb].to_vec();
                WeightData::Quant(QuantData { format: q.format, bytes, f32_acts: q.f32_acts })
            }
        };
        Ok(Self { rows: n, cols: c, data })
    }

    /// The quantized format, if the matrix is quantized.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        match &self.data {
            WeightData::Quant(q) => Some(q.format),
            _ => None,
        }
    }

    /// Converts f16 values to f32 storage (f16 is rare in MoE checkpoints;
    /// widening keeps one fast path per precision).
    pub fn from_f16_bits(rows: usize, cols: usize, bits: &[u16]) -> Result<Self, crate::KernelError> {
        let values = bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
        Self::from_f32(rows, cols, values)
    }

    /// Stacks matrices with the same column count on top of each other
    /// (e.g. q, k and v projections into one qkv matrix). Quantized parts of
    /// one format stay quantized; quantized parts mixed with anything else
    /// are all widened to f32 (exact); float parts are stored in the first
    /// part's precision.
    pub fn concat_rows(parts: &[Weight]) -> Result<Self, crate::KernelError> {
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows = parts.iter().map(|p| p.rows).sum();
        for p in parts {
            check_len("concatenated weight columns", cols, p.cols)?;
        }
        let first_quant = parts.first().and_then(Weight::quant_format);
        if let Some(format) = first_quant.filter(|_| parts.iter().all(|p| p.quant_format() == first_quant)) {
            let bytes = parts
                .iter()
                .flat_map(|p| match &p.data {
                    WeightData::Quant(q) => q.bytes.iter().copied(),
                    _ => unreachable!("every part is quantized"),
                })
                .collect();
            let exact = parts.iter().all(|p| matches!(&p.data, WeightData::Quant(q) if q.f32_acts));
            let w = Self::from_quant(rows, cols, format, bytes)?;
            return Ok(if exact { w.with_f32_activations() } else { w });
        }
        let any_quant = parts.iter().any(|p| p.quant_format().is_some());
        let data = match parts.first().map(|p| &p.data) {
            _ if any_quant => WeightData::F32(parts.iter().flat_map(Weight::to_f32).collect()),
            Some(WeightData::Bf16(_)) => {
                let mut out = Vec::with_capacity(rows * cols);
                for p in parts {
                    match &p.data {
                        WeightData::Bf16(v) => out.extend_from_slice(v),
                        WeightData::F32(v) => out.extend(v.iter().map(|&x| bf16::from_f32(x).to_bits())),
                        WeightData::Quant(_) => unreachable!("quantized parts are widened above"),
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
                        WeightData::Quant(_) => unreachable!("quantized parts are widened above"),
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
            WeightData::Quant(q) => q.bytes.len(),
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
            WeightData::Quant(q) => {
                let rb = q.bytes.len() / self.rows.max(1);
                q.format.dequantize(&q.bytes[r * rb..(r + 1) * rb], out);
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

//! Block-scaled FP8 checkpoints (`quantization_config.quant_method =
//! "fp8"`, as DeepSeek-V3/R1, Kimi K2 and GLM-4.5-FP8 ship): a linear
//! layer's `weight` holds `float8_e4m3fn` codes `[rows, cols]` and
//! `weight_scale_inv` one f32 per 128x128 block, `[ceil(rows / 128),
//! ceil(cols / 128)]`; the value is `code * scale`.
//!
//! Matrices whose rows are whole blocks stay one byte per weight in memory
//! and in the expert cache ([`QuantFormat::Fp8E4m3`]: each row's 128-wide
//! slices carry their block's scale, computed with f32 activations); others
//! are widened to f32. Both give exactly the dequantized values.

use crate::{ModelError, Result};
use moe_kernels::{QuantFormat, Weight, WeightData};

/// The side of the square blocks sharing one scale.
pub(crate) const BLOCK: usize = 128;

/// The scale tensor of FP8 weight `name`.
pub(crate) fn scale_name(name: &str) -> String {
    format!("{name}_scale_inv")
}

/// The shape of the scales of a `[rows, cols]` FP8 matrix.
pub(crate) fn scale_shape(rows: usize, cols: usize) -> [usize; 2] {
    [rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)]
}

/// Bytes in memory of a `[rows, cols]` FP8 matrix ([`weight`]'s storage).
pub(crate) fn resident_bytes(rows: usize, cols: usize) -> usize {
    match QuantFormat::Fp8E4m3.row_bytes(cols) {
        Some(row) => rows * row,
        None => rows * cols * 4,
    }
}

/// The matrix of `codes` (`rows * cols` bytes) and its block `scales`
/// (row-major [`scale_shape`]).
pub(crate) fn weight(name: &str, rows: usize, cols: usize, codes: &[u8], scales: &[f32]) -> Result<Weight> {
    let [rb, cb] = scale_shape(rows, cols);
    if codes.len() != rows * cols || scales.len() != rb * cb {
        return Err(ModelError::Unsupported(format!(
            "{name}: {} FP8 codes and {} scales for a [{rows}, {cols}] matrix ({} and {} expected)",
            codes.len(),
            scales.len(),
            rows * cols,
            rb * cb
        )));
    }
    let scale = |r: usize, c: usize| scales[(r / BLOCK) * cb + c / BLOCK];
    if let Some(row_bytes) = QuantFormat::Fp8E4m3.row_bytes(cols) {
        let mut bytes = Vec::with_capacity(rows * row_bytes);
        for (r, row) in codes.chunks_exact(cols).enumerate() {
            for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                bytes.extend_from_slice(&scale(r, b * BLOCK).to_le_bytes());
                bytes.extend_from_slice(block);
            }
        }
        return Ok(Weight::from_quant(rows, cols, QuantFormat::Fp8E4m3, bytes)?);
    }
    // rows of partial blocks: widen, with the same one multiply per value
    let mut one = vec![0u8; QuantFormat::Fp8E4m3.block_bytes()];
    one[..4].copy_from_slice(&1f32.to_le_bytes());
    let mut unit = vec![0f32; BLOCK];
    let mut values = Vec::with_capacity(rows * cols);
    for (r, row) in codes.chunks_exact(cols.max(1)).enumerate() {
        for (b, part) in row.chunks(BLOCK).enumerate() {
            one[4..4 + part.len()].copy_from_slice(part);
            QuantFormat::Fp8E4m3.dequantize(&one, &mut unit);
            let s = scale(r, b * BLOCK);
            values.extend(unit[..part.len()].iter().map(|v| v * s));
        }
    }
    Ok(Weight::from_f32(rows, cols, values)?)
}

/// `w` transposed in FP8, when `w` is FP8 whose 128-row groups share each
/// block's scale (as [`weight`] builds them from 128x128 blocks) and whose
/// rows are whole blocks both ways: each block transposes into one block
/// with the same scale, so the values are exactly `w`'s. `None` otherwise.
pub(crate) fn transposed(w: &Weight) -> Result<Option<Weight>> {
    let WeightData::Quant(q) = w.data() else { return Ok(None) };
    let (rows, cols) = (w.rows(), w.cols());
    if q.format() != QuantFormat::Fp8E4m3 || !rows.is_multiple_of(BLOCK) || !cols.is_multiple_of(BLOCK) {
        return Ok(None);
    }
    let bb = QuantFormat::Fp8E4m3.block_bytes();
    let row_bytes = cols / BLOCK * bb;
    let bytes = q.bytes();
    let scale_at = |r: usize, cb: usize| &bytes[r * row_bytes + cb * bb..r * row_bytes + cb * bb + 4];
    // one scale per 128x128 block, or no transposition
    for r in 0..rows {
        for cb in 0..cols / BLOCK {
            if scale_at(r, cb) != scale_at(r - r % BLOCK, cb) {
                return Ok(None);
            }
        }
    }
    let out_row_bytes = rows / BLOCK * bb;
    let mut out = vec![0u8; cols * out_row_bytes];
    for c in 0..cols {
        for rb in 0..rows / BLOCK {
            let at = c * out_row_bytes + rb * bb;
            out[at..at + 4].copy_from_slice(scale_at(rb * BLOCK, c / BLOCK));
            for i in 0..BLOCK {
                let r = rb * BLOCK + i;
                out[at + 4 + i] = bytes[r * row_bytes + (c / BLOCK) * bb + 4 + c % BLOCK];
            }
        }
    }
    Ok(Some(Weight::from_quant(cols, rows, QuantFormat::Fp8E4m3, out)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes whose values are small integers: `code(v)` for v in -8..8.
    fn code(v: i32) -> u8 {
        // e4m3fn: 1 = 0x38, 2 = 0x40, 3 = 0x44, 4 = 0x48, 6 = 0x4C, ...
        let mag = match v.unsigned_abs() {
            0 => 0x00,
            1 => 0x38,
            2 => 0x40,
            3 => 0x44,
            4 => 0x48,
            5 => 0x4A,
            6 => 0x4C,
            _ => 0x4E, // 7
        };
        if v < 0 {
            mag | 0x80
        } else {
            mag
        }
    }

    fn check(rows: usize, cols: usize, quantized: bool) {
        let ints: Vec<i32> = (0..rows * cols).map(|i| (i * 7 % 15) as i32 - 7).collect();
        let codes: Vec<u8> = ints.iter().map(|&v| code(v)).collect();
        let [rb, cb] = scale_shape(rows, cols);
        let scales: Vec<f32> = (0..rb * cb).map(|i| 0.5 + i as f32 * 0.25).collect();
        let w = weight("t", rows, cols, &codes, &scales).unwrap();
        assert_eq!(w.quant_format().is_some(), quantized, "[{rows}, {cols}]");
        assert_eq!(w.nbytes(), resident_bytes(rows, cols));
        let got = w.to_f32();
        for r in 0..rows {
            for c in 0..cols {
                let want = ints[r * cols + c] as f32 * scales[(r / BLOCK) * cb + c / BLOCK];
                assert_eq!(got[r * cols + c], want, "[{rows}, {cols}] at ({r}, {c})");
            }
        }
    }

    #[test]
    fn every_value_is_its_code_times_its_blocks_scale() {
        check(130, 256, true); // whole blocks across, a partial block down
        check(3, 200, false); // a partial block across: widened
        check(1, 128, true);
    }

    #[test]
    fn whole_blocks_transpose_in_fp8_exactly() {
        let (rows, cols) = (256, 384);
        let codes: Vec<u8> = (0..rows * cols).map(|i| code((i * 7 % 15) as i32 - 7)).collect();
        let [rb, cb] = scale_shape(rows, cols);
        let scales: Vec<f32> = (0..rb * cb).map(|i| 0.5 + i as f32 * 0.25).collect();
        let w = weight("t", rows, cols, &codes, &scales).unwrap();
        let t = transposed(&w).unwrap().expect("whole blocks");
        assert_eq!(t.quant_format(), Some(QuantFormat::Fp8E4m3));
        assert_eq!((t.rows(), t.cols()), (cols, rows));
        let (a, b) = (w.to_f32(), t.to_f32());
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(b[c * rows + r], a[r * cols + c], "({r}, {c})");
            }
        }
        // no FP8 transpose: partial blocks; rows of one block with differing
        // scales; float weights
        assert!(transposed(&weight("t", 130, 256, &vec![0x38; 130 * 256], &[1.0; 4]).unwrap()).unwrap().is_none());
        let mut bytes = vec![0x38u8; 128 * 132];
        for (r, row) in bytes.chunks_exact_mut(132).enumerate() {
            row[..4].copy_from_slice(&(if r == 5 { 2.0f32 } else { 1.0 }).to_le_bytes());
        }
        let uneven = Weight::from_quant(128, 128, QuantFormat::Fp8E4m3, bytes).unwrap();
        assert!(transposed(&uneven).unwrap().is_none());
        assert!(transposed(&Weight::from_f32(rows, cols, w.to_f32()).unwrap()).unwrap().is_none());
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let e = weight("x.weight", 2, 128, &[0; 256], &[1.0, 2.0]).unwrap_err();
        assert!(e.to_string().contains("x.weight"), "{e}");
    }
}

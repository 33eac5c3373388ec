//! Register-tiled `out = x · Wᵀ` for activation rows side by side (decode
//! batches, expert groups, prefill), reading bf16 or f32 weight rows in
//! place: no widened copy of the weight, no packing.
//!
//! **An output element is the same sum, in the same order, whatever tile
//! computed it and whatever other rows share the call** (batch invariance:
//! a sequence's logits do not change with what else is in its step). The
//! order depends only on the weight's row length `k`:
//! - shorter than [`LONG_K`] ([`short_rows`]): one 8-lane accumulator per
//!   output, which lets tiles hold many outputs (6x4 with AVX-512 VL);
//! - [`LONG_K`] or longer ([`long_rows`]): four 8-lane accumulators per
//!   output, the order of [`crate::simd`]'s dot product, so a single row
//!   can be streamed through the dot product (one weight row read start to
//!   end: the fastest way to read a weight from DRAM) with the same bits.

mod long_rows;
mod short_rows;

use crate::matmul::Product;
use crate::simd::WeightRow;

/// Weight rows of at least this many values are summed in the dot
/// product's order, and a single activation row against them may stream
/// (measured with `LARGE=1 cargo run --release -p moe-kernels --example
/// matmul_bench`: streaming 1.5-2x the tiled kernel on a 65 MB output head
/// read from DRAM, equal on warm 1024-wide weights; shorter rows tile 2x
/// faster at 128-256).
pub(crate) const LONG_K: usize = 512;

/// Computes the product's output columns (weight rows) `cols`, writing only
/// those columns of `out`.
///
/// # Safety
/// `out` must be valid for writes of every `[i, j]` element, `i < m`,
/// `j` in `cols`, with row stride `n`; `x` holds `m * k` values and `w` at
/// least `cols.end * k`. No other thread may write those elements meanwhile.
pub(crate) unsafe fn tiled_cols<W: WeightRow>(p: &Product<'_, W>, cols: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        let long = p.k >= LONG_K;
        // short rows: below 12 rows the AVX2 tiles measured faster (few or
        // no 6-row tiles to fill)
        if crate::simd::has_avx512vl() && (long || p.m >= 12) {
            // SAFETY: AVX-512 F+VL (and AVX2+FMA) checked at run time; bounds
            // as the caller promised.
            unsafe {
                if long {
                    long_rows::avx2::tiled_cols_wide(p, cols)
                } else {
                    short_rows::avx2::tiled_cols_wide(p, cols)
                }
            }
            return;
        }
        if crate::simd::has_avx2_fma() {
            // SAFETY: AVX2+FMA checked at run time; bounds as the caller promised.
            unsafe {
                if long {
                    long_rows::avx2::tiled_cols(p, cols)
                } else {
                    short_rows::avx2::tiled_cols(p, cols)
                }
            }
            return;
        }
    }
    // portable: one dot product per element, the same order for every row
    // SAFETY: the same contract.
    unsafe { crate::matmul::dot_cols(p, cols) }
}

/// Bytes of activation rows a sweep keeps together: a block of `x` this
/// size stays in L2 while the weight rows pass over it.
const X_BLOCK_BYTES: usize = 256 << 10;

/// Calls `f` on consecutive blocks of the `m` activation rows of `k`
/// values, each about [`X_BLOCK_BYTES`] and a multiple of `unit` rows.
#[inline(always)]
fn row_blocks(m: usize, k: usize, unit: usize, mut f: impl FnMut(std::ops::Range<usize>)) {
    let per = (X_BLOCK_BYTES / (k * 4)).max(unit) / unit * unit;
    let mut i = 0;
    while i < m {
        let end = (i + per).min(m);
        f(i..end);
        i = end;
    }
}

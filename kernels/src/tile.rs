//! Register-tiled `out = x · Wᵀ` for a few activation rows (decode batches,
//! expert groups), reading bf16 or f32 weight rows in place: no widened
//! copy of the weight, no packing.
//!
//! Each tile keeps `MR` activation rows by `NR` weight rows of 8-lane
//! accumulators in registers and walks `k` once, so every weight vector
//! loaded (and widened) feeds `MR` multiply-adds and every activation vector
//! `NR`. Tiles are shaped so about eight accumulator chains hide the FMA
//! latency: 4x2, 3x3, 2x4 and 1x8 (rows x weight rows).
//!
//! An output element is the same sum, in the same order, whatever tile
//! computed it: a row's results do not depend on which other rows share the
//! call (batch-invariant). (`matmul` sends a single row against long weight
//! rows to the streaming path instead, whose order differs.)

use crate::matmul::Product;
use crate::simd::WeightRow;

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
        if crate::simd::has_avx2_fma() {
            // SAFETY: AVX2+FMA checked at run time; bounds as the caller promised.
            unsafe { avx2::tiled_cols(p, cols) };
            return;
        }
    }
    // SAFETY: the same contract.
    unsafe { crate::matmul::dot_cols(p, cols) }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::matmul::Product;
    use crate::simd::avx2::hsum;
    use crate::simd::WeightRow;
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX2+FMA, and the contract of [`super::tiled_cols`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiled_cols<W: WeightRow>(a: &Product<'_, W>, cols: std::ops::Range<usize>) {
        let m = a.m;
        let full = m / 4 * 4;
        sweep::<W, 4, 2>(a, 0..full, cols.clone());
        match m - full {
            3 => sweep::<W, 3, 3>(a, full..m, cols),
            2 => sweep::<W, 2, 4>(a, full..m, cols),
            1 => sweep::<W, 1, 8>(a, full..m, cols),
            _ => {}
        }
    }

    /// Rows `rows` (a multiple of `MR` long) against weight rows `cols`, `NR`
    /// weight rows at a time; weight rows are the outer loop, so a few stay
    /// in L1 while every activation row passes over them.
    #[inline(always)]
    unsafe fn sweep<W: WeightRow, const MR: usize, const NR: usize>(
        a: &Product<'_, W>,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let mut j = cols.start;
        while j + NR <= cols.end {
            // the first row group prefetches the next weight rows (single rows
            // come here only for short weight rows, see `matmul`); the other
            // groups find the current ones in cache
            if rows.start < rows.end {
                if MR > 1 {
                    tile::<W, MR, NR, true>(a, rows.start, j);
                } else {
                    tile::<W, MR, NR, false>(a, rows.start, j);
                }
            }
            let mut i = rows.start + MR;
            while i < rows.end {
                tile::<W, MR, NR, false>(a, i, j);
                i += MR;
            }
            j += NR;
        }
        while j < cols.end {
            let mut i = rows.start;
            while i < rows.end {
                tile::<W, MR, 1, false>(a, i, j);
                i += MR;
            }
            j += 1;
        }
    }

    /// Rows `i..i + MR` of x against weight rows `j..j + NR`.
    // accumulators are indexed [row][weight row] in lockstep with two operands
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<W: WeightRow, const MR: usize, const NR: usize, const PREFETCH: bool>(
        a: &Product<'_, W>,
        i: usize,
        j: usize,
    ) {
        let k = a.k;
        let k8 = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let x = a.x.as_ptr().add(i * k);
        let w = a.w.as_ptr().add(j * k);
        // software prefetch of the next tile's weight rows (the same columns,
        // NR rows further on): several rows read side by side defeat the
        // hardware prefetcher on weights that come from DRAM (measured: a
        // 65 MB output head at 4-8 rows, 1.4-1.5x faster)
        let line = 64 / std::mem::size_of::<W>();
        let ahead = NR * k;
        let mut p = 0;
        while p < k8 {
            if PREFETCH && p % line == 0 {
                for c in 0..NR {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * k + p + ahead) as *const i8);
                }
            }
            let mut xv = [_mm256_setzero_ps(); MR];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(r * k + p));
            }
            for c in 0..NR {
                let wv = W::load8(w.add(c * k + p));
                for r in 0..MR {
                    acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
                }
            }
            p += 8;
        }
        for r in 0..MR {
            for c in 0..NR {
                let mut s = hsum(acc[r][c]);
                for q in k8..k {
                    s += *x.add(r * k + q) * (*w.add(c * k + q)).widen();
                }
                *a.out.add((i + r) * a.n + j + c) = s;
            }
        }
    }
}

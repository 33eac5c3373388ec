//! Register-tiled `out = x · Wᵀ` for two or more activation rows (decode
//! batches, expert groups, prefill), reading bf16 or f32 weight rows in
//! place: no widened copy of the weight, no packing.
//!
//! **Every output element is the same sum in the same order, whatever tile
//! or kernel computed it**: the order of [`crate::simd`]'s dot product (four
//! 8-lane accumulators over 32-value chunks, the 8-value chunks after them
//! into the first, `(a0 + a1) + (a2 + a3)`, the lanes summed, then the
//! scalar tail in order). So a row's results never depend on which other
//! rows share the call, and a single row streamed through the dot product
//! gives the same bits (batch invariance: a sequence's logits do not change
//! with what else is in its step).
//!
//! Each tile keeps `MR` activation rows by `NR` weight rows of four
//! accumulators in registers and walks `k` once, so every weight vector
//! loaded (and widened) feeds `MR` multiply-adds. With AVX-512 VL the 32
//! vector registers hold 3x2 tiles (24 accumulators); with AVX2 only, 2x1.

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
        if crate::simd::has_avx512vl() {
            // SAFETY: AVX-512 F+VL (and AVX2+FMA) checked at run time; bounds
            // as the caller promised.
            unsafe { avx2::tiled_cols_wide(p, cols) };
            return;
        }
        if crate::simd::has_avx2_fma() {
            // SAFETY: AVX2+FMA checked at run time; bounds as the caller promised.
            unsafe { avx2::tiled_cols(p, cols) };
            return;
        }
    }
    // SAFETY: the same contract.
    unsafe { crate::matmul::dot_cols(p, cols) }
}

/// Activation rows a tile sweep keeps together: a block of this many bytes
/// of `x` stays in L2 while the weight rows pass over it.
const X_BLOCK_BYTES: usize = 256 << 10;

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
        blocks(a, |rows| sweep::<W, 2, 1>(a, rows, cols.clone()));
    }

    /// # Safety
    /// Requires AVX-512 F+VL, and the contract of [`super::tiled_cols`].
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn tiled_cols_wide<W: WeightRow>(a: &Product<'_, W>, cols: std::ops::Range<usize>) {
        blocks(a, |rows| sweep::<W, 3, 2>(a, rows, cols.clone()));
    }

    /// Calls `f` on consecutive blocks of activation rows, each small enough
    /// to stay in L2 while every weight row of the call passes over it.
    #[inline(always)]
    fn blocks<W>(a: &Product<'_, W>, mut f: impl FnMut(std::ops::Range<usize>)) {
        // a multiple of the 2- and 3-row tiles
        let per = (super::X_BLOCK_BYTES / (a.k * 4)).max(6) / 6 * 6;
        let mut i = 0;
        while i < a.m {
            let end = (i + per).min(a.m);
            f(i..end);
            i = end;
        }
    }

    /// Rows `rows` against weight rows `cols`, `NR` weight rows at a time
    /// and `MR` activation rows per tile (the last tile of each column group
    /// takes the rows left); weight rows are the outer loop, so a few stay in
    /// L1 while every activation row passes over them.
    #[inline(always)]
    unsafe fn sweep<W: WeightRow, const MR: usize, const NR: usize>(
        a: &Product<'_, W>,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let mut j = cols.start;
        while j < cols.end {
            if j + NR <= cols.end {
                group::<W, MR, NR>(a, rows.clone(), j);
                j += NR;
            } else {
                group::<W, MR, 1>(a, rows.clone(), j);
                j += 1;
            }
        }
    }

    /// Every row of `rows` against weight rows `j..j + NR`; the first tile
    /// prefetches the next weight rows, the others find these in cache.
    #[inline(always)]
    unsafe fn group<W: WeightRow, const MR: usize, const NR: usize>(
        a: &Product<'_, W>,
        rows: std::ops::Range<usize>,
        j: usize,
    ) {
        let mut i = rows.start;
        let mut first = true;
        while i + MR <= rows.end {
            if first {
                tile::<W, MR, NR, true>(a, i, j);
                first = false;
            } else {
                tile::<W, MR, NR, false>(a, i, j);
            }
            i += MR;
        }
        match rows.end - i {
            0 => {}
            1 => tile::<W, 1, NR, false>(a, i, j),
            2 => tile::<W, 2, NR, false>(a, i, j),
            3 => tile::<W, 3, NR, false>(a, i, j),
            4 => tile::<W, 4, NR, false>(a, i, j),
            _ => tile::<W, 5, NR, false>(a, i, j),
        }
    }

    /// Rows `i..i + MR` of x against weight rows `j..j + NR`, each element
    /// summed in the dot product's order (see the module doc).
    // accumulators are indexed [row][weight row][chain] in lockstep with the operands
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<W: WeightRow, const MR: usize, const NR: usize, const PREFETCH: bool>(
        a: &Product<'_, W>,
        i: usize,
        j: usize,
    ) {
        let k = a.k;
        let mut acc = [[[_mm256_setzero_ps(); 4]; NR]; MR];
        let x = a.x.as_ptr().add(i * k);
        let w = a.w.as_ptr().add(j * k);
        // software prefetch of the next tile's weight rows (NR rows further
        // on): several rows read side by side defeat the hardware prefetcher
        // on weights that come from DRAM
        let ahead = NR * k;
        let lines = (32 * std::mem::size_of::<W>()).div_ceil(64);
        let mut p = 0;
        while p + 32 <= k {
            if PREFETCH {
                for c in 0..NR {
                    for l in 0..lines {
                        _mm_prefetch::<_MM_HINT_T0>(
                            (w.wrapping_add(c * k + p + ahead) as *const i8).wrapping_add(64 * l),
                        );
                    }
                }
            }
            for l in 0..4 {
                let mut wv = [_mm256_setzero_ps(); NR];
                for c in 0..NR {
                    wv[c] = W::load8(w.add(c * k + p + 8 * l));
                }
                for r in 0..MR {
                    let xv = _mm256_loadu_ps(x.add(r * k + p + 8 * l));
                    for c in 0..NR {
                        acc[r][c][l] = _mm256_fmadd_ps(xv, wv[c], acc[r][c][l]);
                    }
                }
            }
            p += 32;
        }
        while p + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); NR];
            for c in 0..NR {
                wv[c] = W::load8(w.add(c * k + p));
            }
            for r in 0..MR {
                let xv = _mm256_loadu_ps(x.add(r * k + p));
                for c in 0..NR {
                    acc[r][c][0] = _mm256_fmadd_ps(xv, wv[c], acc[r][c][0]);
                }
            }
            p += 8;
        }
        for r in 0..MR {
            for c in 0..NR {
                let v = &acc[r][c];
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
                for q in p..k {
                    s += *x.add(r * k + q) * (*w.add(c * k + q)).widen();
                }
                *a.out.add((i + r) * a.n + j + c) = s;
            }
        }
    }
}

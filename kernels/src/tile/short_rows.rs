//! Tiles for weight rows shorter than [`super::LONG_K`]: one 8-lane
//! accumulator per output element, walked along `k` in order, the lanes
//! summed, then the scalar tail. Every tile shape gives the same sums.
//!
//! Each tile keeps `MR` activation rows by `NR` weight rows of accumulators
//! in registers and walks `k` once, so every weight vector loaded (and
//! widened) feeds `MR` multiply-adds and every activation vector `NR`.
//! Shapes hold enough chains to hide the FMA latency: with AVX2, 4x2, 3x3,
//! 2x4 and 1x8 (rows x weight rows); with AVX-512 VL's 32 registers, 6x4.

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use crate::matmul::Product;
    use crate::simd::avx2::hsum;
    use crate::simd::WeightRow;
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX2+FMA, and the contract of [`crate::tile::tiled_cols`].
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::tile) unsafe fn tiled_cols<W: WeightRow>(a: &Product<'_, W>, cols: std::ops::Range<usize>) {
        // a few rows directly: the blocking loop around them measured 13%
        // slower at one row
        if a.m <= 12 {
            small(a, 0..a.m, cols);
        } else {
            crate::tile::row_blocks(a.m, a.k, 12, |rows| small(a, rows, cols.clone()));
        }
    }

    /// # Safety
    /// Requires AVX-512 F+VL, and the contract of [`crate::tile::tiled_cols`].
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(in crate::tile) unsafe fn tiled_cols_wide<W: WeightRow>(a: &Product<'_, W>, cols: std::ops::Range<usize>) {
        crate::tile::row_blocks(a.m, a.k, 12, |rows| {
            let full = rows.start + rows.len() / 6 * 6;
            sweep::<W, 6, 4>(a, rows.start..full, cols.clone());
            small(a, full..rows.end, cols.clone());
        });
    }

    /// Rows `rows` in 4x2 tiles, the last 1-3 rows in 3x3, 2x4 or 1x8.
    #[inline(always)]
    unsafe fn small<W: WeightRow>(a: &Product<'_, W>, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
        let full = rows.start + rows.len() / 4 * 4;
        sweep::<W, 4, 2>(a, rows.start..full, cols.clone());
        match rows.end - full {
            3 => sweep::<W, 3, 3>(a, full..rows.end, cols),
            2 => sweep::<W, 2, 4>(a, full..rows.end, cols),
            1 => sweep::<W, 1, 8>(a, full..rows.end, cols),
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
            // the first row group prefetches the next weight rows (not for
            // single rows: short weight rows come from cache); the other groups
            // find the current ones in cache
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

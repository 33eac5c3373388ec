//! Tiles for weight rows of [`super::LONG_K`]+ values: every output element
//! summed in the order of [`crate::simd`]'s dot product (four 8-lane chains
//! over 32-value chunks, the 8-value chunks after them into the first,
//! `(a0 + a1) + (a2 + a3)`, the lanes summed, then the scalar tail), so the
//! streaming kernel (one dot product per output, the fastest way to read a
//! weight from DRAM for one row) gives the same bits as a tile.
//!
//! Each tile keeps `MR` activation rows by `NR` weight rows of four
//! accumulators in registers and walks `k` once, so every weight vector
//! loaded (and widened) feeds `MR` multiply-adds. With AVX-512 VL the 32
//! vector registers hold 3x2 tiles (24 accumulators); with AVX2 only, 2x1.

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
        crate::tile::row_blocks(a.m, a.k, 6, |rows| sweep::<W, 2, 1>(a, rows, cols.clone()));
    }

    /// # Safety
    /// Requires AVX-512 F+VL, and the contract of [`crate::tile::tiled_cols`].
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(in crate::tile) unsafe fn tiled_cols_wide<W: WeightRow>(a: &Product<'_, W>, cols: std::ops::Range<usize>) {
        crate::tile::row_blocks(a.m, a.k, 6, |rows| sweep::<W, 3, 2>(a, rows, cols.clone()));
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

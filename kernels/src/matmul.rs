//! `out = x · Wᵀ`: activations `[m, k]` times a `[n, k]` weight.
//!
//! **Batch-invariant by default**: a row's results are bit-identical
//! whatever other rows share the call, so a sequence's logits do not change
//! with what else runs in its step (seeded sampling repeats under load).
//! Every float product sums each element in one order ([`crate::tile`]), and
//! quantized weights take one path at every row count. The kernels below
//! differ only in speed:
//! - one row, or a few rows against a weight too big for the caches
//!   (decode on a large model), with weight rows of 512+ values: each weight
//!   row streamed once, in order, through the SIMD dot product
//!   ([`Kernel::Stream`]);
//! - otherwise the register-tiled kernels ([`crate::tile`]), bf16 widened in
//!   registers.
//!
//! [`set_batch_invariant`]`(false)` trades that for prefill speed: more than
//! `TILE_M` rows then go to the `gemm` crate ([`Kernel::Gemm`]; bf16 and
//! quantized weights widened block by block into thread-local scratch,
//! amortised over the `m` rows), whose summation order depends on the shape.

use crate::quant::acts::QuantizedActs;
use crate::quant::dot::dot_block;
use crate::simd::WeightRow;
use crate::tile::LONG_K;
use crate::weight::{bf16_to_f32, QuantData, Weight, WeightData};
use crate::KernelError;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MACS: usize = 1 << 19;
/// Weight rows widened per block on the bf16 gemm path.
const BF16_BLOCK_ROWS: usize = 64;

/// Whether [`Kernel::Auto`] keeps every row's result independent of its
/// batch (the default). One process-wide setting, made once at start-up.
static BATCH_INVARIANT: AtomicBool = AtomicBool::new(true);

/// Sets whether [`Kernel::Auto`] is batch-invariant (see the module doc).
pub fn set_batch_invariant(on: bool) {
    BATCH_INVARIANT.store(on, Ordering::Relaxed);
}

/// Whether [`Kernel::Auto`] is batch-invariant.
pub fn batch_invariant() -> bool {
    BATCH_INVARIANT.load(Ordering::Relaxed)
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Quantized activations of the integer path (taken out while in use).
    static ACTS: RefCell<QuantizedActs> = RefCell::new(QuantizedActs::default());
    /// Set while this thread runs one task of an outer parallel loop.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every product on this thread kept single-threaded (for
/// tasks of an outer parallel loop, e.g. experts run side by side).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let prev = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(prev));
    r
}

/// Which kernel computes a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// By the shape (see the module doc); batch-invariant unless
    /// [`set_batch_invariant`]`(false)`.
    Auto,
    /// The register-tiled kernel, whatever the row count (quantized
    /// weights: the integer path, or with f32 activations the tiled kernel
    /// over dequantized blocks).
    Tiled,
    /// The `gemm` crate (bf16 and quantized weights widened block by
    /// block), whatever the row count. Not batch-invariant.
    Gemm,
    /// One dot product per (row, weight row), each weight row read start to
    /// end: the fastest way to stream a large weight from DRAM for a few
    /// rows, where tiles (several weight rows side by side) read DRAM pages
    /// out of order. The same sums as [`Kernel::Tiled`]; weight rows shorter
    /// than `LONG_K` (512) values are tiled instead (their sums are in
    /// the tiles' order).
    Stream,
}

/// Computes `out[m, n] = x[m, k] · w[n, k]ᵀ`, overwriting `out`.
pub fn matmul_nt(x: &[f32], m: usize, w: &Weight, out: &mut [f32]) -> Result<(), KernelError> {
    matmul_nt_with(x, m, w, out, Kernel::Auto)
}

/// [`matmul_nt`] with the kernel chosen by the caller (benchmarks, tests).
pub fn matmul_nt_with(x: &[f32], m: usize, w: &Weight, out: &mut [f32], kernel: Kernel) -> Result<(), KernelError> {
    let (n, k) = (w.rows(), w.cols());
    if x.len() != m * k {
        return Err(KernelError::Shape { what: "matmul input", expected: m * k, got: x.len() });
    }
    if out.len() != m * n {
        return Err(KernelError::Shape { what: "matmul output", expected: m * n, got: out.len() });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // inside a pool task (e.g. experts run side by side) stay on this thread
    let parallel = m * n * k >= PARALLEL_MACS && rayon::current_num_threads() > 1 && !SERIAL.with(|s| s.get());
    let kernel = if kernel == Kernel::Auto { auto_kernel(m, w) } else { kernel };
    match (w.data(), kernel) {
        (WeightData::Quant(q), Kernel::Gemm) => quant_blocked(x, m, k, n, q, out, parallel, Widened::Gemm),
        (WeightData::Quant(q), _) if q.f32_activations() => quant_blocked(x, m, k, n, q, out, parallel, Widened::Tiled),
        (WeightData::Quant(q), _) => quant_int(x, m, k, n, q, out, parallel),
        // short rows are summed in the tiles' order, which a dot product lacks
        (WeightData::F32(v), Kernel::Stream) if k >= LONG_K => stream(x, m, v, k, out, parallel),
        (WeightData::Bf16(v), Kernel::Stream) if k >= LONG_K => stream(x, m, v, k, out, parallel),
        (WeightData::F32(v), Kernel::Gemm) => {
            let par = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
            // SAFETY: shapes were checked above; `v` is `[n, k]` row-major,
            // read as the `[k, n]` matrix Wᵀ (row stride 1, column stride k).
            unsafe { gemm_f32(GemmArgs { m, n, k, x, w: v, out: out.as_mut_ptr(), out_rs: n }, par) }
        }
        (WeightData::Bf16(bits), Kernel::Gemm) => bf16_blocked(x, m, k, n, bits, out, parallel),
        (WeightData::F32(v), _) => tiled(x, m, v, k, out, parallel),
        (WeightData::Bf16(v), _) => tiled(x, m, v, k, out, parallel),
    }
    Ok(())
}

/// The kernel [`Kernel::Auto`] picks for `m` rows against `w`.
fn auto_kernel(m: usize, w: &Weight) -> Kernel {
    let invariant = batch_invariant();
    match w.data() {
        // exact (f32 activations): dequantized blocks, tiled
        WeightData::Quant(q) if q.f32_activations() => {
            if invariant {
                Kernel::Tiled
            } else {
                Kernel::Gemm
            }
        }
        // k-quants: the integer path at every row count (measured faster than
        // widening plus gemm at 128 rows)
        WeightData::Quant(q) if crate::quant::dot::act_block(q.format()) == 256 => Kernel::Tiled,
        // the integer path, or (not invariant) widening plus gemm for many rows
        WeightData::Quant(_) => {
            if invariant || m <= TILE_M {
                Kernel::Tiled
            } else {
                Kernel::Gemm
            }
        }
        _ if m == 1 && w.cols() >= LONG_K => Kernel::Stream,
        _ if m <= STREAM_MAX_M && w.cols() >= LONG_K && w.nbytes() >= STREAM_MIN_BYTES => Kernel::Stream,
        _ if m <= TILE_M || invariant => Kernel::Tiled,
        _ => Kernel::Gemm,
    }
}

/// Up to this many rows, a weight of `STREAM_MIN_BYTES`+ streams: measured
/// with `LARGE=1 ROWS=1,2,4,8 cargo run --release -p moe-kernels --example
/// matmul_bench` on the 65 MB output head read from DRAM, streaming 2 rows
/// took 0.57x the tiled kernel's time, 4 rows 0.5-0.97x (runs vary), 8 rows
/// 1.26x.
const STREAM_MAX_M: usize = 4;
/// Weights of at least this many bytes (more than a core's L2) are assumed
/// to come from DRAM when a few rows meet them (a large model's experts and
/// output head at decode).
const STREAM_MIN_BYTES: usize = 2 << 20;

/// Without batch invariance, up to this many activation rows use the
/// register-tiled kernel (measured with `cargo run --release -p moe-kernels
/// --example matmul_bench`: faster than widening plus `gemm` up to 32 rows,
/// slower at 64).
const TILE_M: usize = 32;

/// The register-tiled path: output features (weight rows) split across
/// threads, each range computed by [`crate::tile::tiled_cols`].
fn tiled<W: WeightRow + Sync>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32], parallel: bool) {
    let n = w.len() / k;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let chunk = chunk_len(n).next_multiple_of(8);
    let run = |c: usize| {
        let ptr = out_ptr;
        let p = Product { x, m, k, w, n, out: ptr.0 };
        // SAFETY: task c writes only columns c * chunk..(c + 1) * chunk of
        // `out` ([m, n], checked by the caller); ranges are disjoint and `out`
        // outlives the loop.
        unsafe { crate::tile::tiled_cols(&p, c * chunk..((c + 1) * chunk).min(n)) };
    };
    let chunks = n.div_ceil(chunk);
    if parallel {
        (0..chunks).into_par_iter().for_each(run);
    } else {
        (0..chunks).for_each(run);
    }
}

/// The streaming path: one dot product per output, weight rows read in
/// order, output features split across threads.
fn stream<W: WeightRow + Sync>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32], parallel: bool) {
    let n = w.len() / k;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let chunk = chunk_len(n);
    let run = |c: usize| {
        let ptr = out_ptr;
        let p = Product { x, m, k, w, n, out: ptr.0 };
        // SAFETY: task c writes only columns c * chunk..(c + 1) * chunk of
        // `out` ([m, n], checked by the caller); ranges are disjoint and `out`
        // outlives the loop.
        unsafe { dot_cols(&p, c * chunk..((c + 1) * chunk).min(n)) };
    };
    let chunks = n.div_ceil(chunk);
    if parallel {
        (0..chunks).into_par_iter().for_each(run);
    } else {
        (0..chunks).for_each(run);
    }
}

/// The operands of `out[m, n] = x[m, k] · w[n, k]ᵀ`, as one parallel task
/// of a product sees them.
pub(crate) struct Product<'a, W> {
    /// `[m, k]` activations.
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    /// `[n, k]` weight rows.
    pub w: &'a [W],
    pub n: usize,
    /// `[m, n]` output, row stride `n`.
    pub out: *mut f32,
}

/// Output columns `cols` of the product, one dot product per element, each
/// weight row read once from start to end.
///
/// # Safety
/// `out` must be valid for writes of every `[i, j]` element, `i < m`,
/// `j` in `cols`, with row stride `n`, and no other thread may write those
/// elements meanwhile.
pub(crate) unsafe fn dot_cols<W: WeightRow>(p: &Product<'_, W>, cols: std::ops::Range<usize>) {
    let &Product { x, m, k, w, n, out } = p;
    for j in cols {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            // SAFETY: the caller guarantees `[i, j]` is writable and ours.
            unsafe { *out.add(i * n + j) = W::dot(&x[i * k..(i + 1) * k], wr) };
        }
    }
}

/// Output features per parallel task (tiled and streaming paths).
fn chunk_len(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // a few tasks per thread for balance, at least 16 rows each
    n.div_ceil(threads * 4).max(16)
}

/// bf16 weights on the gemm path: widen a block of rows, multiply, repeat.
fn bf16_blocked(x: &[f32], m: usize, k: usize, n: usize, bits: &[u16], out: &mut [f32], parallel: bool) {
    let out_ptr = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(BF16_BLOCK_ROWS);
    let run = |b: usize| {
        let r0 = b * BF16_BLOCK_ROWS;
        let rows = BF16_BLOCK_ROWS.min(n - r0);
        SCRATCH.with(|s| {
            let mut wf = s.borrow_mut();
            wf.resize(rows * k, 0.0);
            for (o, &b) in wf.iter_mut().zip(&bits[r0 * k..(r0 + rows) * k]) {
                *o = bf16_to_f32(b);
            }
            let ptr = out_ptr;
            // SAFETY: block b writes only columns r0..r0+rows of every output
            // row; blocks are disjoint, so no two tasks write the same element,
            // and `out` outlives the parallel loop.
            unsafe {
                gemm_f32(GemmArgs { m, n: rows, k, x, w: &wf, out: ptr.0.add(r0), out_rs: n }, gemm::Parallelism::None)
            }
        });
    };
    if parallel {
        (0..blocks).into_par_iter().for_each(run);
    } else {
        (0..blocks).for_each(run);
    }
}

/// What multiplies a block of dequantized weight rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Widened {
    /// The `gemm` crate (fastest for many rows, order depends on the shape).
    Gemm,
    /// The tiled kernel (batch-invariant).
    Tiled,
}

/// Quantized weights with f32 activations: a block of weight rows widened
/// to f32 in thread-local scratch (bit-exact dequantization), then `how`
/// multiplies every activation row with it.
#[allow(clippy::too_many_arguments)]
fn quant_blocked(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    q: &QuantData,
    out: &mut [f32],
    parallel: bool,
    how: Widened,
) {
    let row_bytes = q.bytes().len() / n;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(BF16_BLOCK_ROWS);
    let run = |b: usize| {
        let r0 = b * BF16_BLOCK_ROWS;
        let rows = BF16_BLOCK_ROWS.min(n - r0);
        SCRATCH.with(|s| {
            let mut wf = s.borrow_mut();
            wf.resize(rows * k, 0.0);
            q.format().dequantize(&q.bytes()[r0 * row_bytes..(r0 + rows) * row_bytes], &mut wf);
            let ptr = out_ptr;
            // SAFETY (both arms): block b writes only columns r0..r0+rows of
            // every output row (row stride n); blocks are disjoint and `out`
            // outlives the loop. `wf` holds the block's `rows` weight rows of
            // `k` values.
            match how {
                Widened::Gemm => unsafe {
                    gemm_f32(
                        GemmArgs { m, n: rows, k, x, w: &wf, out: ptr.0.add(r0), out_rs: n },
                        gemm::Parallelism::None,
                    )
                },
                Widened::Tiled => unsafe {
                    let p = Product { x, m, k, w: &wf[..], n, out: ptr.0.add(r0) };
                    crate::tile::tiled_cols(&p, 0..rows)
                },
            }
        });
    };
    if parallel {
        (0..blocks).into_par_iter().for_each(run);
    } else {
        (0..blocks).for_each(run);
    }
}

/// Quantized weights, few rows (k-quants: any): the activation rows
/// quantized once to int8 blocks, then integer dot products, weight rows
/// split across threads (each read once while every row passes over it).
/// A row's result does not depend on the other rows of the call.
fn quant_int(x: &[f32], m: usize, k: usize, n: usize, q: &QuantData, out: &mut [f32], parallel: bool) {
    // taken out of the thread-local, so a nested call cannot find it borrowed
    let mut acts = ACTS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    let (format, bytes) = (q.format(), q.bytes());
    acts.fill(x, k, crate::quant::dot::act_block(format));
    let row_bytes = bytes.len() / n;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let chunk = chunk_len(n);
    let acts_ref = &acts;
    let run = |c: usize| {
        let ptr = out_ptr;
        // SAFETY: task c writes only columns c * chunk..(c + 1) * chunk of
        // `out` ([m, n], checked by the caller); ranges are disjoint and `out`
        // outlives the loop.
        unsafe { dot_block(format, bytes, row_bytes, c * chunk..((c + 1) * chunk).min(n), acts_ref, m, ptr.0, n) };
    };
    let chunks = n.div_ceil(chunk);
    if parallel {
        (0..chunks).into_par_iter().for_each(run);
    } else {
        (0..chunks).for_each(run);
    }
    ACTS.with(|a| *a.borrow_mut() = acts);
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output regions to rayon tasks (see
// `bf16_blocked`).
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is never dereferenced concurrently
// at the same element.
unsafe impl Sync for SendPtr {}

struct GemmArgs<'a> {
    m: usize,
    n: usize,
    k: usize,
    x: &'a [f32],
    /// `[n, k]` row-major.
    w: &'a [f32],
    out: *mut f32,
    /// Row stride of `out` in elements.
    out_rs: usize,
}

/// # Safety
/// `out` must be valid for writes of an `[m, n]` block with row stride `out_rs`.
unsafe fn gemm_f32(a: GemmArgs<'_>, par: gemm::Parallelism) {
    gemm::gemm(
        a.m,
        a.n,
        a.k,
        a.out,
        1,
        a.out_rs as isize,
        false,
        a.x.as_ptr(),
        1,
        a.k as isize,
        a.w.as_ptr(),
        a.k as isize,
        1,
        0.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn check(m: usize, n: usize, k: usize) {
        check_kernels(m, n, k, &[Kernel::Auto, Kernel::Tiled, Kernel::Gemm, Kernel::Stream]);
    }

    fn check_kernels(m: usize, n: usize, k: usize, kernels: &[Kernel]) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 97) as f32 / 97.0) - 0.5).collect();
        let wv: Vec<f32> =
            (0..n * k).map(|i| bf16::from_f32(((i * 104729 % 89) as f32 / 89.0) - 0.5).to_f32()).collect();
        let want = reference(&x, m, &wv, n, k);
        let wf = Weight::from_f32(n, k, wv.clone()).unwrap();
        let wb = Weight::from_bf16_bits(n, k, wv.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()).unwrap();
        for w in [&wf, &wb] {
            for &kernel in kernels {
                let mut out = vec![f32::NAN; m * n];
                matmul_nt_with(&x, m, w, &mut out, kernel).unwrap();
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{kernel:?} m={m} n={n} k={k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn matches_reference_across_regimes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 300, 129),
            (2, 70, 64),
            (4, 513, 256),
            (5, 65, 33),
            (8, 67, 40),
            (16, 33, 128),
            (37, 200, 300),
            (64, 1, 8),
            (32, 77, 64),
            (33, 64, 24),
            (3, 9, 16),
            (7, 11, 17),
            (1, 40, 600),
            (2, 17, 520),
        ] {
            check(m, n, k);
        }
    }

    #[test]
    fn portable_tiled_path_matches_reference() {
        serial(|| {
            crate::simd::portable(|| {
                for &(m, n, k) in &[(1, 9, 17), (5, 33, 64), (32, 20, 40)] {
                    check_kernels(m, n, k, &[Kernel::Tiled]);
                }
            })
        });
    }

    /// Every batch-invariant kernel gives each row of a batch exactly the
    /// bits the row gets alone, for every weight type and tile shape.
    fn check_rows_alone(k: usize) {
        use crate::quant::QuantFormat;
        let n = 37;
        let vals: Vec<f32> =
            (0..n * k).map(|i| bf16::from_f32((i * 104729 % 89) as f32 / 89.0 - 0.5).to_f32()).collect();
        let mut weights = vec![
            Weight::from_f32(n, k, vals.clone()).unwrap(),
            Weight::from_bf16_bits(n, k, vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()).unwrap(),
        ];
        for format in QuantFormat::ALL {
            if k.is_multiple_of(format.block_values()) {
                let bytes = crate::quant::tests::random_blocks(format, n * k / format.block_values(), k as u64);
                let w = Weight::from_quant(n, k, format, bytes).unwrap();
                weights.push(w.clone().with_f32_activations());
                weights.push(w);
            }
        }
        let x: Vec<f32> = (0..70 * k).map(|i| ((i * 7919 % 101) as f32 / 101.0) - 0.5).collect();
        let mut alone = vec![0.0; n];
        for w in &weights {
            for m in [1, 2, 3, 4, 5, 6, 7, 8, 13, 32, 33, 64, 70] {
                for kernel in [Kernel::Auto, Kernel::Tiled, Kernel::Stream] {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_nt_with(&x[..m * k], m, w, &mut out, kernel).unwrap();
                    for i in 0..m {
                        matmul_nt_with(&x[i * k..(i + 1) * k], 1, w, &mut alone, Kernel::Auto).unwrap();
                        let same = out[i * n..(i + 1) * n].iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{:?} {kernel:?} k={k}: row {i} of {m} differs from the row alone",
                            w.quant_format()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        for k in [7, 40, 200, 256, 520, 1024] {
            check_rows_alone(k);
        }
    }

    #[test]
    fn avx2_rows_do_not_depend_on_the_batch() {
        crate::simd::avx2_only(|| serial(|| [40, 520].into_iter().for_each(check_rows_alone)));
    }

    #[test]
    fn portable_rows_do_not_depend_on_the_batch() {
        crate::simd::portable(|| serial(|| check_rows_alone(256)));
    }

    #[test]
    fn quantized_weights_match_their_dequantized_values() {
        use crate::quant::QuantFormat;
        for format in QuantFormat::ALL {
            for &(m, n, k) in &[(1, 20, 256), (3, 9, 512), (40, 70, 256), (33, 8, 768)] {
                let bytes = crate::quant::tests::random_blocks(format, n * k / format.block_values(), (m * n) as u64);
                let w = Weight::from_quant(n, k, format, bytes).unwrap();
                let wf = w.to_f32();
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 97) as f32 / 97.0) - 0.5).collect();
                let want = reference(&x, m, &wf, n, k);
                for kernel in [Kernel::Auto, Kernel::Tiled, Kernel::Gemm] {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_nt_with(&x, m, &w, &mut out, kernel).unwrap();
                    let scale = wf.iter().fold(0f32, |a, v| a.max(v.abs())) * k as f32;
                    for (idx, (a, b)) in out.iter().zip(&want).enumerate() {
                        // the integer path rounds activations (|x| <= 0.5) to
                        // 8-bit steps: at most half a step per value
                        let j = idx % n;
                        let w_abs: f32 = wf[j * k..(j + 1) * k].iter().map(|v| v.abs()).sum();
                        let act = if kernel == Kernel::Gemm && m > 0 { 0.0 } else { 0.5 / 254.0 * w_abs };
                        let tol = act * 1.01 + 1e-5 * scale;
                        assert!((a - b).abs() <= tol, "{format} {kernel:?} m={m} n={n} k={k}: {a} vs {b}");
                    }
                }
                // a row's product does not depend on its batch (tiled path)
                let mut all = vec![0.0; m.min(32) * n];
                matmul_nt_with(&x[..m.min(32) * k], m.min(32), &w, &mut all, Kernel::Tiled).unwrap();
                let mut alone = vec![0.0; n];
                matmul_nt_with(&x[..k], 1, &w, &mut alone, Kernel::Auto).unwrap();
                assert_eq!(&all[..n], &alone[..], "{format} batch invariance");
            }
        }
    }

    #[test]
    fn f32_activation_weights_compute_in_float_at_every_row_count() {
        use crate::quant::QuantFormat;
        for format in [QuantFormat::Mxfp4, QuantFormat::Fp8E4m3] {
            f32_activations_in_float(format);
        }
    }

    fn f32_activations_in_float(format: crate::quant::QuantFormat) {
        let (n, k) = (12, 256);
        let bytes = crate::quant::tests::random_blocks(format, n * k / format.block_values(), 5);
        // FP8 keeps f32 activations without being asked (and after int8 is)
        let w = match format.int8_activations() {
            true => Weight::from_quant(n, k, format, bytes).unwrap().with_f32_activations(),
            false => Weight::from_quant(n, k, format, bytes).unwrap().with_int8_activations(),
        };
        // kept through row selection and stacking
        let w = Weight::concat_rows(&[w.select_rows(&(0..n).rev().collect::<Vec<_>>()).unwrap(), w]).unwrap();
        let WeightData::Quant(q) = w.data() else { panic!("still quantized") };
        assert!(q.f32_activations());
        let wf = w.to_f32();
        for m in [1, 3, 40] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 97) as f32 / 97.0) - 0.5).collect();
            let want = reference(&x, m, &wf, 2 * n, k);
            let mut out = vec![f32::NAN; m * 2 * n];
            matmul_nt(&x, m, &w, &mut out).unwrap();
            let scale = wf.iter().fold(0f32, |a, v| a.max(v.abs())) * k as f32;
            for (a, b) in out.iter().zip(&want) {
                // float rounding only: far below an int8 step of the activations
                assert!((a - b).abs() <= 1e-6 * scale, "{format} m={m}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let w = Weight::from_f32(2, 3, vec![0.0; 6]).unwrap();
        let mut out = vec![0.0; 2];
        assert!(matmul_nt(&[0.0; 4], 1, &w, &mut out).is_err());
        assert!(matmul_nt(&[0.0; 3], 1, &w, &mut out[..1]).is_err());
    }
}

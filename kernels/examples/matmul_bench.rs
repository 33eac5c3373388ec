//! Side-by-side timing of the three CPU product kernels (gemm, tiled,
//! stream) on bf16 weights, at the shapes of the default model (or, with
//! `LARGE=1`, of the random-large model, whose 65 MB output head comes from
//! DRAM) and decode-sized row counts, run inside a rayon pool as the engine
//! runs them. Prints each kernel's best time of 5
//! and the ratio, measured in the same run; then the single-core FMA peak
//! (a register-only loop of independent multiply-adds), against which the
//! kernels' GFLOP/s can be read as a fraction of what the core can do.
//!
//! Weight rows shorter than 512 values never stream (their sums are in the
//! tiles' order; see `kernels/src/tile/mod.rs`): their stream column shows
//! `-`. `gemm` is what `--batch-invariant false` runs beyond 32 rows.
//!
//! `[LARGE=1] [ROWS=1,4,...] cargo run --release -p moe-kernels --example matmul_bench [-- THREADS]`

use moe_kernels::{matmul_nt_with, Kernel, Weight};
use std::time::Instant;

fn main() {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(run);
}

fn run() {
    let peak = fma_peak_gflops();
    println!("single-core FMA peak: {peak:.1} GFLOP/s (x86-64 AVX2+FMA register loop; 0 if unavailable)\n");
    println!("| n x k | rows | gemm us | tiled us | tiled GFLOP/s | gemm / tiled | stream us | stream / tiled |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (n, k) in shapes() {
        let bits = (0..n * k).map(|i| half::bf16::from_f32((i * 7919 % 97) as f32 / 97.0 - 0.5).to_bits()).collect();
        let w = Weight::from_bf16_bits(n, k, bits).expect("weight");
        let rows: Vec<usize> = match std::env::var("ROWS") {
            Ok(r) => r.split(',').map(|v| v.trim().parse().expect("ROWS: comma-separated row counts")).collect(),
            Err(_) => vec![1, 4, 8, 16, 32, 64],
        };
        for m in rows {
            let x: Vec<f32> = (0..m * k).map(|i| (i * 31 % 17) as f32 / 17.0 - 0.5).collect();
            let mut out = vec![0f32; m * n];
            let iters = (8_000_000 / (m * n * k)).max(3);
            let mut best = [f64::MAX; 3];
            for rep in 0..6 {
                for (b, kernel) in best.iter_mut().zip([Kernel::Gemm, Kernel::Tiled, Kernel::Stream]) {
                    let t = Instant::now();
                    for _ in 0..iters {
                        matmul_nt_with(&x, m, &w, &mut out, kernel).expect("shapes");
                    }
                    // the first round warms caches and the pool
                    if rep > 0 {
                        *b = b.min(t.elapsed().as_secs_f64() / iters as f64);
                    }
                }
            }
            let gflops = 2.0 * (m * n * k) as f64 / best[1] / 1e9;
            let stream = if k >= 512 {
                format!("{:.2} | {:.2}x", best[2] * 1e6, best[2] / best[1])
            } else {
                "- | -".to_string()
            };
            println!(
                "| {n} x {k} | {m} | {:.2} | {:.2} | {gflops:.1} | {:.2}x | {stream} |",
                best[0] * 1e6,
                best[1] * 1e6,
                best[0] / best[1],
            );
        }
    }
}

/// GFLOP/s of one core running 12 independent 8-lane FMA chains (best of 5).
fn fma_peak_gflops() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let iters = 20_000_000u64;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                // SAFETY: AVX2 and FMA were detected above.
                std::hint::black_box(unsafe { fma_loop(iters) });
                best = best.min(t.elapsed().as_secs_f64());
            }
            return (iters * 12 * 8 * 2) as f64 / best / 1e9;
        }
    }
    0.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    _mm256_cvtss_f32(s)
}

/// The default model's products, or with `LARGE=1` the random-large shape's
/// (gate+up, down and the output head).
fn shapes() -> Vec<(usize, usize)> {
    if std::env::var_os("LARGE").is_some() {
        vec![(5632, 1024), (1024, 2816), (32000, 1024)]
    } else {
        vec![(512, 128), (128, 256), (256, 128), (2048, 128)]
    }
}

//! Timing of products with quantized weights against bf16 at the expert
//! shapes of the 1.19B bench model: the integer path (`Kernel::Tiled`:
//! activations quantized to int8 blocks) and the widening path
//! (`Kernel::Gemm`: weight blocks widened to f32, then gemm), by row count.
//! Prints microseconds (best of 5) and the weight bytes streamed per second,
//! then how fast `Weight::quantize` (one thread) quantizes each matrix.
//!
//! `cargo run --release -p moe-kernels --example quant_bench [-- THREADS]`

use moe_kernels::{matmul_nt_with, Kernel, QuantFormat, Weight};
use std::time::Instant;

fn main() {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(run);
}

fn time(x: &[f32], m: usize, w: &Weight, out: &mut [f32], kernel: Kernel) -> f64 {
    let iters = (20_000_000 / (m * w.rows() * w.cols())).max(2);
    let mut best = f64::MAX;
    for rep in 0..6 {
        let t = Instant::now();
        for _ in 0..iters {
            matmul_nt_with(x, m, w, out, kernel).expect("shapes");
        }
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64() / iters as f64);
        }
    }
    best
}

fn run() {
    let mut quantize_rates = Vec::new();
    println!("| n x k | format | rows | int path us | GB/s | widen+gemm us | bf16 (auto) us |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (n, k) in [(5632, 1024), (1024, 2816)] {
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.1).collect();
        let bf16 = Weight::from_bf16_bits(n, k, values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect())
            .expect("weight");
        let f32w = Weight::from_f32(n, k, values).expect("weight");
        for format in [QuantFormat::Q8_0, QuantFormat::Q4K, QuantFormat::Q6K, QuantFormat::Q5_0] {
            let w = match format {
                QuantFormat::Q8_0 | QuantFormat::Q4K => {
                    let t = Instant::now();
                    let q = f32w.quantize(format).expect("quantize");
                    quantize_rates.push((n, k, format, (n * k) as f64 / t.elapsed().as_secs_f64() / 1e6));
                    q
                }
                // no quantizer: random blocks of the right size stand in
                other => {
                    let bytes = (0..n * k / other.block_values() * other.block_bytes()).map(|i| (i * 31 % 251) as u8);
                    let mut bytes: Vec<u8> = bytes.collect();
                    for b in bytes.chunks_mut(other.block_bytes()) {
                        let at = if other == QuantFormat::Q6K { 208 } else { 0 };
                        b[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                    }
                    Weight::from_quant(n, k, other, bytes).expect("weight")
                }
            };
            for m in [1usize, 4, 16, 32, 128] {
                let x: Vec<f32> = (0..m * k).map(|i| (i * 31 % 17) as f32 / 17.0 - 0.5).collect();
                let mut out = vec![0f32; m * n];
                let int = time(&x, m, &w, &mut out, Kernel::Tiled);
                let widen = time(&x, m, &w, &mut out, Kernel::Gemm);
                let b = time(&x, m, &bf16, &mut out, Kernel::Auto);
                println!(
                    "| {n} x {k} | {format} | {m} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    int * 1e6,
                    w.nbytes() as f64 / int / 1e9,
                    widen * 1e6,
                    b * 1e6
                );
            }
        }
    }
    // gpt-oss's MXFP4 experts from a transformers checkpoint keep f32
    // activations (exact: widened, then gemm) where GGUF's use the int8 path
    println!("\n| gpt-oss-20b expert 2880 x 2880, MXFP4 | rows | int8 path (GGUF) us | f32 activations (transformers checkpoint) us |");
    println!("|---|---:|---:|---:|");
    let (n, k) = (2880, 2880);
    let bytes = (0..n * k / 32 * 17).map(|i| if i % 17 == 0 { 120 } else { (i * 31 % 251) as u8 }).collect();
    let plain = Weight::from_quant(n, k, QuantFormat::Mxfp4, bytes).expect("weight");
    let exact = plain.clone().with_f32_activations();
    for m in [1usize, 4, 16] {
        let x: Vec<f32> = (0..m * k).map(|i| (i * 31 % 17) as f32 / 17.0 - 0.5).collect();
        let mut out = vec![0f32; m * n];
        let int = time(&x, m, &plain, &mut out, Kernel::Auto);
        let f32_acts = time(&x, m, &exact, &mut out, Kernel::Auto);
        println!("| | {m} | {:.1} | {:.1} |", int * 1e6, f32_acts * 1e6);
    }
    println!();
    for (n, k, format, rate) in quantize_rates {
        println!("quantizing {n} x {k} to {format}: {rate:.0} M values/s (one thread)");
    }
}

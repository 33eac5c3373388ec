//! GPU micro-benchmarks of the pieces that exist (run by scripts/gpu-check.sh):
//! pinned host-to-device bandwidth, expert-FFN products, attention decode,
//! and how much of an expert copy hides behind compute on the copy stream.
//! Prints to stdout; exits non-zero with the reason when there is no GPU.

use moe_kernels::cuda::expert_pool::{pinned_h2d_bandwidth, ExpertSlotPool, PoolShape};
use moe_kernels::cuda::gemm::{self, FfnScratch, GpuWeight, TokenGroup};
use moe_kernels::cuda::ops::{self, AttnMeta, AttnShape, QkvRows};
use moe_kernels::cuda::GpuContext;
use moe_kernels::Weight;
use moe_types::ExpertKey;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        println!("cuda_bench: {e}");
        std::process::exit(1);
    }
}

/// Mean milliseconds of `f` over `iters` runs after one warm-up, timed on the host
/// around a synchronised stream.
fn time_ms(g: &GpuContext, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    g.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    g.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

fn run() -> Res<()> {
    let g = GpuContext::new(0)?;
    println!("device: {}", g.info());

    // 1. host-to-device bandwidth from pinned memory
    let bw = pinned_h2d_bandwidth(&g, 256 << 20, 5)?;
    println!("pinned H2D copy, 256 MiB, best of 5: {bw:.1} GB/s");
    println!(
        "  reference peaks (nominal, per direction): PCIe 4.0 x16 31.5 GB/s, PCIe 5.0 x16 63 GB/s; \
         which link this card has is not queried"
    );

    // 2. expert FFN products (bf16 weights, f32 accumulate), an OLMoE-sized expert
    let (h, f) = (2048usize, 1024usize);
    let gu = Weight::from_bf16_bits(2 * f, h, vec![0x3c00; 2 * f * h])?;
    let gw = GpuWeight::upload(&g, &gu)?;
    for m in [1usize, 16, 256] {
        let x = g.stream().alloc_zeros::<f32>(m * h)?;
        let mut out = g.stream().alloc_zeros::<f32>(m * 2 * f)?;
        let mut scratch = g.stream().alloc_zeros::<u16>(m * h)?;
        let ms = time_ms(&g, 50, || Ok(gemm::matmul_nt(&g, &x, m, &gw, &mut scratch, &mut out)?))?;
        let bytes = (2 * f * h * 2) as f64;
        let flops = 2.0 * (m * 2 * f * h) as f64;
        println!(
            "matmul bf16 gate_up [{m} x {h}] x [{} x {h}]^T: {:.3} ms, {:.0} GB/s weight reads, {:.2} TFLOP/s",
            2 * f,
            ms,
            bytes / ms / 1e6,
            flops / ms / 1e9
        );
    }

    // 3. attention decode over the paged cache: 32 sequences at 4096 positions
    let (nh, nkv, d, bs, seqs, ctx) = (16usize, 8usize, 128usize, 16usize, 32usize, 4096usize);
    let blocks_per = ctx / bs;
    let kvw = nkv * d;
    let kc = g.stream().alloc_zeros::<f32>(seqs * ctx * kvw)?;
    let vc = g.stream().alloc_zeros::<f32>(seqs * ctx * kvw)?;
    let flat: Vec<i32> = (0..(seqs * blocks_per) as i32).collect();
    let offs: Vec<i32> = (0..seqs).map(|s| (s * blocks_per) as i32).collect();
    let pos: Vec<i32> = vec![ctx as i32 - 1; seqs];
    let (db, doff, dpos) = (g.stream().clone_htod(&flat)?, g.stream().clone_htod(&offs)?, g.stream().clone_htod(&pos)?);
    let stride = (nh + 2 * nkv) * d;
    let q = g.stream().alloc_zeros::<f32>(seqs * stride)?;
    let mut out = g.stream().alloc_zeros::<f32>(seqs * nh * d)?;
    let shape = AttnShape {
        n_tok: seqs,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        window: None,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let meta = AttnMeta { blocks: &db, block_off: &doff, pos: &dpos };
    let rows = QkvRows { qkv: &q, stride };
    let ms = time_ms(&g, 20, || Ok(ops::paged_attention(&g, &rows, shape, &meta, (&kc, &vc), &mut out)?))?;
    let kv_bytes = (2 * seqs * ctx * kvw * 4) as f64;
    println!(
        "paged attention decode, {seqs} seqs x {ctx} positions, {nh}/{nkv} heads x {d}: {ms:.3} ms, {:.0} GB/s KV reads \
         (f32 cache; the kernel is a straightforward one, not tuned)",
        kv_bytes / ms / 1e6
    );

    // 4. copy/compute overlap: expert loads on the copy stream while FFNs run on the compute stream
    let n_load = 8usize;
    let shape = PoolShape { hidden: h, ffn: f, layers: 1, experts: n_load + 1, slots: n_load + 1 };
    let mut pool = ExpertSlotPool::new(&g, shape)?;
    let resident = ExpertKey::new(0, n_load);
    pool.load(resident)?;
    pool.synchronize_copies()?;
    let t = 256usize;
    let x = g.stream().alloc_zeros::<f32>(t * h)?;
    let idx: Vec<i32> = (0..t as i32).collect();
    let (di, dw) = (g.stream().clone_htod(&idx)?, g.stream().clone_htod(&vec![1.0f32; t])?);
    let (di, dw) = (di.as_view(), dw.as_view());
    let group = TokenGroup { rows: &di, weights: &dw, len: t };
    let mut scratch = FfnScratch::new(&g, t, h, f)?;
    let mut y = g.stream().alloc_zeros::<f32>(t * h)?;
    let views = pool.views(resident)?;
    let ffn_iters = 40;
    let mut compute = |g: &GpuContext| -> Res<()> {
        for _ in 0..ffn_iters {
            gemm::expert_ffn(g, &x, &group, pool_matrices(shape, &views), &mut scratch, &mut y)?;
        }
        Ok(())
    };
    let t_compute = time_ms(&g, 1, || compute(&g))?;
    let keys: Vec<ExpertKey> = (0..n_load).map(|e| ExpertKey::new(0, e)).collect();
    let copy_all = |pool: &mut ExpertSlotPool| -> Res<()> {
        for &k in &keys {
            if pool.table().slot_of(k).is_some() {
                pool.evict(k)?;
            }
            pool.load(k)?;
        }
        Ok(())
    };
    copy_all(&mut pool)?;
    pool.synchronize_copies()?;
    let t0 = Instant::now();
    copy_all(&mut pool)?;
    pool.synchronize_copies()?;
    let t_copy = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    copy_all(&mut pool)?;
    let views = pool.views(resident)?;
    for _ in 0..ffn_iters {
        gemm::expert_ffn(&g, &x, &group, pool_matrices(shape, &views), &mut scratch, &mut y)?;
    }
    g.synchronize()?;
    pool.synchronize_copies()?;
    let t_both = t0.elapsed().as_secs_f64() * 1e3;
    let hidden = ((t_copy + t_compute - t_both) / t_copy.min(t_compute)).clamp(0.0, 1.0);
    let mb = (n_load * shape.slot_elems() * 2) as f64 / 1e6;
    println!(
        "overlap: {n_load} expert loads ({mb:.0} MB, {:.1} GB/s) {t_copy:.2} ms alone; {ffn_iters} expert FFNs over {t} \
         tokens {t_compute:.2} ms alone; both {t_both:.2} ms => {:.0}% of the shorter one hidden",
        mb / t_copy,
        hidden * 100.0
    );
    Ok(())
}

fn pool_matrices<'a>(
    shape: PoolShape,
    views: &'a (cudarc::driver::CudaView<'a, u16>, cudarc::driver::CudaView<'a, u16>),
) -> moe_kernels::cuda::gemm::ExpertMatrices<'a> {
    use moe_kernels::cuda::gemm::{Bf16Matrix, ExpertMatrices};
    ExpertMatrices {
        gate_up: Bf16Matrix { bits: &views.0, rows: 2 * shape.ffn, cols: shape.hidden },
        down: Bf16Matrix { bits: &views.1, rows: shape.hidden, cols: shape.ffn },
    }
}

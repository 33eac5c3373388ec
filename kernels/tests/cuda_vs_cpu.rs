//! Every CUDA kernel against its CPU counterpart (feature `cuda`).
//!
//! Without a usable GPU each test prints why it is skipped and passes, so
//! `cargo test --features cuda` passes on CPU-only machines; on a GPU
//! machine (`scripts/gpu-check.sh`) they are the real comparisons.
#![cfg(feature = "cuda")]

use cudarc::driver::CudaSlice;
use moe_kernels::cuda::expert_pool::{ExpertSlotPool, PoolShape};
use moe_kernels::cuda::gemm::{self, Bf16Matrix, ExpertMatrices, FfnScratch, GpuWeight, TokenGroup};
use moe_kernels::cuda::ops::{self, AttnMeta, AttnShape, QkvRows, RopeShape, Route, Scoring};
use moe_kernels::cuda::GpuContext;
use moe_kernels::{matmul_nt, ops as cpu, Weight};
use moe_types::ExpertKey;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// One context for the whole test binary (NVRTC compiles once); `None`
/// with the reason printed when there is no usable GPU.
fn gpu() -> Option<MutexGuard<'static, GpuContext>> {
    static GPU: OnceLock<Option<Mutex<GpuContext>>> = OnceLock::new();
    let g = GPU.get_or_init(|| match GpuContext::new(0) {
        Ok(g) => {
            eprintln!("running on {} ({})", g.info(), g.kernel_image());
            Some(Mutex::new(g))
        }
        Err(e) => {
            eprintln!("SKIPPED (no usable GPU): {e}");
            None
        }
    });
    let g = g.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
    g.cuda().bind_to_thread().expect("binding the CUDA context to this thread");
    Some(g)
}

macro_rules! gpu_or_skip {
    ($name:literal) => {
        match gpu() {
            Some(g) => g,
            None => {
                moe_types::testing::skip($name, "no usable GPU");
                return;
            }
        }
    };
}

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

fn up<T: cudarc::driver::DeviceRepr>(g: &GpuContext, v: &[T]) -> CudaSlice<T> {
    g.stream().clone_htod(v).unwrap()
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(g: &GpuContext, v: &CudaSlice<T>) -> Vec<T> {
    g.stream().clone_dtoh(v).unwrap()
}

fn zeros(g: &GpuContext, n: usize) -> CudaSlice<f32> {
    g.stream().alloc_zeros(n).unwrap()
}

/// `|a - b| <= tol * max(1, |b|)` everywhere.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0.0f32, 0usize);
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let e = (a - b).abs() / b.abs().max(1.0);
        // a NaN error is the worst and stays reported
        if !worst.0.is_nan() && (e.is_nan() || e > worst.0) {
            worst = (e, i);
        }
    }
    assert!(worst.0 <= tol, "{what}: error {} at {} (got {}, want {})", worst.0, worst.1, got[worst.1], want[worst.1]);
    eprintln!("{what}: max scaled error {:.2e}", worst.0);
}

#[test]
fn embedding_f32_and_bf16() {
    let g = gpu_or_skip!("embedding");
    let (vocab, h) = (50, 96);
    let vals = rand_vec(vocab * h, 1);
    let ids: Vec<u32> = vec![3, 0, 49, 3, 17];
    for w in
        [Weight::from_f32(vocab, h, vals.clone()).unwrap(), Weight::from_bf16_bits(vocab, h, bf16_bits(&vals)).unwrap()]
    {
        let gw = GpuWeight::upload(&g, &w).unwrap();
        let mut out = zeros(&g, ids.len() * h);
        ops::embedding(&g, &gw, &up(&g, &ids), ids.len(), &mut out).unwrap();
        let mut want = vec![0.0; ids.len() * h];
        for (i, &id) in ids.iter().enumerate() {
            w.row_to_f32(id as usize, &mut want[i * h..(i + 1) * h]);
        }
        assert_eq!(down(&g, &out), want, "embedding rows are copied exactly");
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let g = gpu_or_skip!("rms_norm");
    for (rows, d) in [(1, 64), (7, 1000), (3, 4096)] {
        let x = rand_vec(rows * d, 2);
        let w = rand_vec(d, 3);
        let mut out = zeros(&g, rows * d);
        ops::rms_norm(&g, &up(&g, &x), &up(&g, &w), (rows, 1e-6), &mut out).unwrap();
        let mut want = vec![0.0; rows * d];
        cpu::rms_norm(&x, &w, 1e-6, &mut want);
        assert_close("rms_norm", &down(&g, &out), &want, 1e-5);
    }
}

#[test]
fn rope_matches_cpu_inside_qkv_rows() {
    let g = gpu_or_skip!("rope");
    let (t, nh, nkv, d) = (5, 4, 2, 64);
    let half = d / 2;
    let stride = (nh + 2 * nkv) * d;
    let x = rand_vec(t * stride, 4);
    let pos: Vec<i32> = vec![0, 1, 7, 300, 4095];
    let inv_freq: Vec<f32> = (0..half).map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / d as f32)).collect();
    let mut dx = up(&g, &x);
    let (dp, df) = (up(&g, &pos), up(&g, &inv_freq));
    // q heads, then k heads (v untouched), as the forward pass rotates them
    ops::rope(&g, &mut dx, &dp, &df, RopeShape { n_tok: t, stride, col: 0, n_heads: nh, half }).unwrap();
    ops::rope(&g, &mut dx, &dp, &df, RopeShape { n_tok: t, stride, col: nh * d, n_heads: nkv, half }).unwrap();
    let mut want = x.clone();
    for (i, row) in want.chunks_exact_mut(stride).enumerate() {
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|&f| {
                let a = (pos[i] as f32 * f) as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        cpu::rope_rotate_half(&mut row[..(nh + nkv) * d], &cos, &sin);
    }
    assert_close("rope", &down(&g, &dx), &want, 1e-6);
}

#[test]
fn silu_mul_matches_cpu() {
    let g = gpu_or_skip!("silu_mul");
    let (rows, i) = (9, 700);
    let gu: Vec<f32> = rand_vec(rows * 2 * i, 5).iter().map(|v| v * 8.0).collect();
    let mut out = zeros(&g, rows * i);
    ops::silu_mul(&g, &up(&g, &gu), (rows, i), &mut out).unwrap();
    let mut want = vec![0.0; rows * i];
    cpu::silu_mul(&gu, i, &mut want);
    assert_close("silu_mul", &down(&g, &out), &want, 1e-6);
}

#[test]
fn routing_matches_cpu() {
    let g = gpu_or_skip!("route_topk");
    let (t, ne, k) = (33, 64, 6);
    let mut logits: Vec<f32> = rand_vec(t * ne, 6).iter().map(|v| v * 4.0).collect();
    logits[5] = logits[9]; // a tie in row 0
    for scoring in [Scoring::Softmax, Scoring::Sigmoid] {
        for renorm in [false, true] {
            let (mut ids, mut wts) = (g.stream().alloc_zeros::<i32>(t * k).unwrap(), zeros(&g, t * k));
            let r = Route { k, scoring, renorm };
            ops::route_topk(&g, &up(&g, &logits), (t, ne), r, (&mut ids, &mut wts)).unwrap();
            let (mut want_ids, mut want_w) = (Vec::new(), Vec::new());
            let mut top = Vec::new();
            for row in logits.chunks_exact(ne) {
                let mut p = row.to_vec();
                match scoring {
                    Scoring::Softmax => cpu::softmax_inplace(&mut p),
                    Scoring::Sigmoid => p.iter_mut().for_each(|v| *v = cpu::sigmoid(*v)),
                }
                cpu::top_k(&p, k, &mut top);
                let norm = if renorm { top.iter().map(|&e| p[e]).sum::<f32>() } else { 1.0 };
                want_ids.extend(top.iter().map(|&e| e as i32));
                want_w.extend(top.iter().map(|&e| p[e] / norm));
            }
            assert_eq!(down(&g, &ids), want_ids, "{scoring:?} renorm={renorm}: expert ids");
            assert_close("routing weights", &down(&g, &wts), &want_w, 1e-5);
        }
    }
}

#[test]
fn argmax_matches_cpu_with_ties() {
    let g = gpu_or_skip!("argmax");
    let (rows, n) = (4, 32_000);
    let mut x = rand_vec(rows * n, 7);
    x[n + 100] = 5.0;
    x[n + 20_000] = 5.0; // tie: the first wins
    x[3 * n + n - 1] = 9.0;
    let mut out = g.stream().alloc_zeros::<u32>(rows).unwrap();
    ops::argmax(&g, &up(&g, &x), (rows, n), &mut out).unwrap();
    let want: Vec<u32> = x
        .chunks_exact(n)
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect();
    assert_eq!(down(&g, &out), want);
    assert_eq!(want[1], 100);
}

#[test]
fn matmul_bf16_and_f32_match_cpu() {
    let g = gpu_or_skip!("matmul");
    let (n, k) = (384, 512);
    let wv = rand_vec(n * k, 8);
    for m in [1, 5, 37] {
        let x = rand_vec(m * k, 9 + m as u64);
        let mut scratch = g.stream().alloc_zeros::<u16>(m * k).unwrap();
        // bf16 weights: the GPU rounds activations to bf16 too; compare with the CPU product of rounded activations
        let w = Weight::from_bf16_bits(n, k, bf16_bits(&wv)).unwrap();
        let mut out = zeros(&g, m * n);
        gemm::matmul_nt(&g, &up(&g, &x), m, &GpuWeight::upload(&g, &w).unwrap(), &mut scratch, &mut out).unwrap();
        let mut want = vec![0.0; m * n];
        matmul_nt(&round_bf16(&x), m, &w, &mut want).unwrap();
        assert_close("matmul bf16", &down(&g, &out), &want, 1e-4);
        // f32 weights: plain f32 product
        let w = Weight::from_f32(n, k, wv.clone()).unwrap();
        gemm::matmul_nt(&g, &up(&g, &x), m, &GpuWeight::upload(&g, &w).unwrap(), &mut scratch, &mut out).unwrap();
        matmul_nt(&x, m, &w, &mut want).unwrap();
        assert_close("matmul f32", &down(&g, &out), &want, 1e-4);
    }
}

/// The CPU expert FFN with the GPU's roundings: x and the activation rounded to bf16.
fn cpu_ffn(x: &[f32], rows: &[usize], wts: &[f32], (gu, dn): (&Weight, &Weight), out: &mut [f32]) {
    let (h, f) = (gu.cols(), dn.cols());
    for (&r, &wt) in rows.iter().zip(wts) {
        let xr = round_bf16(&x[r * h..(r + 1) * h]);
        let mut a = vec![0.0; 2 * f];
        matmul_nt(&xr, 1, gu, &mut a).unwrap();
        let mut act = vec![0.0; f];
        cpu::silu_mul(&a, f, &mut act);
        let mut y = vec![0.0; h];
        matmul_nt(&round_bf16(&act), 1, dn, &mut y).unwrap();
        cpu::axpy(&mut out[r * h..(r + 1) * h], wt, &y);
    }
}

fn expert(h: usize, f: usize, seed: u64) -> (Weight, Weight) {
    let gu = Weight::from_bf16_bits(2 * f, h, bf16_bits(&rand_vec(2 * f * h, seed))).unwrap();
    let dn = Weight::from_bf16_bits(h, f, bf16_bits(&rand_vec(h * f, seed + 1))).unwrap();
    (gu, dn)
}

#[test]
fn expert_ffn_through_the_slot_pool_matches_cpu() {
    let g = gpu_or_skip!("expert pool");
    let (t, h, f) = (12, 256, 384);
    let shape = PoolShape { hidden: h, ffn: f, layers: 2, experts: 4, slots: 1 };
    let mut pool = ExpertSlotPool::new(&g, shape).unwrap();
    let (ka, kb) = (ExpertKey::new(0, 3), ExpertKey::new(1, 0));
    let (ea, eb) = (expert(h, f, 20), expert(h, f, 30));
    pool.stage(ka, &ea.0, &ea.1).unwrap();
    pool.stage(kb, &eb.0, &eb.1).unwrap();
    let x = rand_vec(t * h, 10);
    let dx = up(&g, &x);
    let mut scratch = FfnScratch::new(&g, t, h, f).unwrap();
    let mut out = zeros(&g, t * h);
    let mut want = vec![0.0; t * h];
    // expert A takes rows 1, 4, 11; then B (evicting A from the one slot) takes rows 4, 0
    for (key, e, rows, wts) in
        [(ka, &ea, vec![1usize, 4, 11], vec![0.5f32, 0.25, 1.0]), (kb, &eb, vec![4, 0], vec![0.75, 0.1])]
    {
        if pool.table().free_slots() == 0 {
            pool.evict(ka).unwrap();
        }
        pool.load(key).unwrap();
        pool.wait_ready(&g, key).unwrap();
        let (dr, dw) = (up(&g, &rows.iter().map(|&r| r as i32).collect::<Vec<_>>()), up(&g, &wts));
        let (dr, dw) = (dr.as_view(), dw.as_view());
        let group = TokenGroup { rows: &dr, weights: &dw, len: rows.len() };
        let views = pool.views(key).unwrap();
        gemm::expert_ffn(&g, &dx, &group, pool.matrices(&views), &mut scratch, &mut out).unwrap();
        cpu_ffn(&x, &rows, &wts, (&e.0, &e.1), &mut want);
    }
    g.synchronize().unwrap();
    assert!(pool.is_ready(kb).unwrap() && !pool.is_ready(ka).unwrap());
    assert_eq!(pool.bytes_loaded(), 2 * 2 * shape.slot_elems() as u64);
    let map = pool.device_map(&g).unwrap();
    let map = down(&g, map);
    assert_eq!(map.iter().filter(|&&s| s >= 0).count(), 1);
    assert_eq!(map[4], 0, "layer 1 expert 0 sits in slot 0");
    assert_close("expert ffn via pool", &down(&g, &out), &want, 2e-2);
}

#[test]
fn expert_ffn_from_resident_weights_matches_cpu() {
    let g = gpu_or_skip!("expert ffn");
    let (t, h, f) = (40, 128, 256);
    let e = expert(h, f, 40);
    let (gu, dn) = (GpuWeight::upload(&g, &e.0).unwrap(), GpuWeight::upload(&g, &e.1).unwrap());
    let (vg, vd) = (bits_of(&gu).as_view(), bits_of(&dn).as_view());
    let m = ExpertMatrices {
        gate_up: Bf16Matrix { bits: &vg, rows: 2 * f, cols: h },
        down: Bf16Matrix { bits: &vd, rows: h, cols: f },
    };
    let rows: Vec<usize> = (0..t).filter(|r| r % 3 != 1).collect();
    let wts: Vec<f32> = rows.iter().map(|&r| 0.1 + r as f32 / 100.0).collect();
    let x = rand_vec(t * h, 11);
    let (dr, dw) = (up(&g, &rows.iter().map(|&r| r as i32).collect::<Vec<_>>()), up(&g, &wts));
    let mut scratch = FfnScratch::new(&g, t, h, f).unwrap();
    let mut out = zeros(&g, t * h);
    gemm::expert_ffn(
        &g,
        &up(&g, &x),
        &TokenGroup { rows: &dr.as_view(), weights: &dw.as_view(), len: rows.len() },
        m,
        &mut scratch,
        &mut out,
    )
    .unwrap();
    let mut want = vec![0.0; t * h];
    cpu_ffn(&x, &rows, &wts, (&e.0, &e.1), &mut want);
    assert_close("expert ffn", &down(&g, &out), &want, 2e-2);
}

fn bits_of(w: &GpuWeight) -> &CudaSlice<u16> {
    match w.data() {
        gemm::GpuWeightData::Bf16(b) => b,
        gemm::GpuWeightData::F32(_) => panic!("bf16 expected"),
    }
}

/// Paged attention against the CPU algorithm of moe-model's `Model::attention`:
/// two sequences in scattered blocks, grouped-query heads, a prefill chunk
/// and a decode token in one step, with and without a sliding window.
#[test]
fn paged_attention_matches_cpu() {
    let g = gpu_or_skip!("paged attention");
    let (nh, nkv, d, bs) = (8, 2, 64, 4);
    let (qw, kvw) = (nh * d, nkv * d);
    let stride = qw + 2 * kvw;
    let num_blocks = 16;
    // sequence 0: 11 positions in blocks [5, 2, 9]; sequence 1: 14 positions in blocks [7, 1, 12, 3]
    let tables: Vec<Vec<i32>> = vec![vec![5, 2, 9], vec![7, 1, 12, 3]];
    let lens = [11usize, 14];
    let cache_rows = num_blocks * bs;
    let row_of = |s: usize, p: usize| tables[s][p / bs] as usize * bs + p % bs;
    // cache contents for every position but the step's own tokens
    let kc0 = rand_vec(cache_rows * kvw, 12);
    let vc0 = rand_vec(cache_rows * kvw, 13);
    // the step: sequence 0 prefills positions 8..11, sequence 1 decodes position 13
    let toks: Vec<(usize, usize)> = vec![(0, 8), (0, 9), (0, 10), (1, 13)];
    assert!(toks.iter().all(|&(s, p)| p < lens[s]));
    let qkv = rand_vec(toks.len() * stride, 14);
    let flat: Vec<i32> = tables.concat();
    let offs = [0i32, tables[0].len() as i32];
    let block_off: Vec<i32> = toks.iter().map(|&(s, _)| offs[s]).collect();
    let pos: Vec<i32> = toks.iter().map(|&(_, p)| p as i32).collect();
    let slots: Vec<i32> = toks.iter().map(|&(s, p)| row_of(s, p) as i32).collect();
    for window in [None, Some(5)] {
        let shape = AttnShape {
            n_tok: toks.len(),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            block_size: bs,
            window,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let (mut kc, mut vc) = (up(&g, &kc0), up(&g, &vc0));
        let dq = up(&g, &qkv);
        let rows = QkvRows { qkv: &dq, stride };
        ops::kv_write(&g, &rows, shape, &up(&g, &slots), (&mut kc, &mut vc)).unwrap();
        let (db, doff, dpos) = (up(&g, &flat), up(&g, &block_off), up(&g, &pos));
        let meta = AttnMeta { blocks: &db, block_off: &doff, pos: &dpos };
        let mut out = zeros(&g, toks.len() * qw);
        ops::paged_attention(&g, &rows, shape, &meta, (&kc, &vc), &mut out).unwrap();

        // CPU: write the step's keys/values, then attend as Model::attention does
        let (mut kh, mut vh) = (kc0.clone(), vc0.clone());
        for (i, &r) in slots.iter().enumerate() {
            let row = &qkv[i * stride..(i + 1) * stride];
            kh[r as usize * kvw..(r as usize + 1) * kvw].copy_from_slice(&row[qw..qw + kvw]);
            vh[r as usize * kvw..(r as usize + 1) * kvw].copy_from_slice(&row[qw + kvw..]);
        }
        assert_eq!(down(&g, &kc), kh, "kv_write keys");
        assert_eq!(down(&g, &vc), vh, "kv_write values");
        let mut want = vec![0.0; toks.len() * qw];
        let scale = 1.0 / (d as f32).sqrt();
        for (i, &(s, p)) in toks.iter().enumerate() {
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            for h in 0..nh {
                let off = (h / (nh / nkv)) * d;
                let q = &qkv[i * stride + h * d..i * stride + (h + 1) * d];
                let mut sc: Vec<f32> = (lo..=p)
                    .map(|j| cpu::dot(q, &kh[row_of(s, j) * kvw + off..row_of(s, j) * kvw + off + d]) * scale)
                    .collect();
                cpu::softmax_inplace(&mut sc);
                let o = &mut want[i * qw + h * d..i * qw + (h + 1) * d];
                for (pr, j) in sc.iter().zip(lo..=p) {
                    cpu::axpy(o, *pr, &vh[row_of(s, j) * kvw + off..row_of(s, j) * kvw + off + d]);
                }
            }
        }
        assert_close("paged attention", &down(&g, &out), &want, 1e-5);
    }
}

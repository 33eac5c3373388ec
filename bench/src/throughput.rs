//! `moe-serve bench`: prefill and decode throughput at batch 1, set against
//! the memory-bandwidth bound measured in the same run.
//!
//! Decoding one token reads every non-expert weight, the top-k experts of
//! every MoE layer, one embedding row and the output head, so tokens/s can
//! not exceed `read bandwidth / bytes per token`. The ratio printed is how
//! close the engine gets to that bound.

use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{ModelConfig, StepBackend};
use moe_types::SeqId;
use rayon::prelude::*;
use std::time::Instant;

/// The larger random-weight shape (1.19B parameters, bf16): hidden 1024,
/// 8 layers, 16 experts top-2, expert FFN 2816, 16 heads / 4 KV heads,
/// vocab 32000 -- the shape `shared/PERFORMANCE.md` measured llama.cpp on.
pub const LARGE_CONFIG: &str = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":1024,
 "num_hidden_layers":8,"num_attention_heads":16,"num_key_value_heads":4,"intermediate_size":2816,
 "num_local_experts":16,"num_experts_per_tok":2,"max_position_embeddings":4096,"rms_norm_eps":1e-5,
 "rope_theta":1000000.0,"eos_token_id":2,"bos_token_id":1}"#;

/// Benchmark sizes.
#[derive(Clone, Copy, Debug)]
pub struct BenchArgs {
    /// Prompt length for the prefill measurement.
    pub prompt_tokens: usize,
    /// Tokens decoded for the decode measurement.
    pub decode_tokens: usize,
    /// Repetitions; the best run is reported.
    pub repeats: usize,
}

/// One model's figures.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// Label.
    pub name: String,
    /// Total parameters' bytes (weights as stored).
    pub weight_bytes: usize,
    /// Prefill tokens per second.
    pub prefill_tps: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
    /// Weight bytes one decoded token reads.
    pub bytes_per_token: usize,
    /// Read bandwidth / bytes per token.
    pub bound_tps: f64,
}

/// Read bandwidth in bytes/s: all threads summing a 512 MiB buffer, best of 3.
pub fn read_bandwidth() -> f64 {
    let buf = vec![1.0f32; 128 << 20];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(|c| moe_kernels::ops::dot(c, c)).sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 4) as f64 / best
}

/// Prefill and decode one sequence at a time through `core` (greedy,
/// `args.repeats` times, best run kept): the prefill step (which also samples
/// the first token), then `args.decode_tokens` decode steps.
pub fn bench_model<E: StepBackend>(
    name: &str,
    core: &mut EngineCore<E>,
    expert_bytes: usize,
    args: BenchArgs,
    bandwidth: f64,
) -> crate::Result<BenchRow> {
    let cfg = core.model().config().clone();
    let prompt: Vec<u32> = (0..args.prompt_tokens).map(|i| (3 + (i * 7919) % (cfg.vocab_size - 3)) as u32).collect();
    let (mut prefill_best, mut decode_best) = (f64::MAX, f64::MAX);
    for rep in 0..args.repeats.max(1) {
        let req = GenerationRequest {
            prompt: prompt.clone(),
            sampling: moe_model::SamplingParams::default(),
            seed: 0,
            max_tokens: args.decode_tokens + 1,
            min_tokens: 0,
            ignore_eos: true,
        };
        core.add(SeqId(rep as u64), req)?;
        let t = Instant::now();
        core.step().map_err(|(_, e)| e)?;
        prefill_best = prefill_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            core.step().map_err(|(_, e)| e)?;
        }
        decode_best = decode_best.min(t.elapsed().as_secs_f64());
    }
    let model = core.model();
    let bytes_per_token = model.bytes_per_decoded_token(expert_bytes);
    Ok(BenchRow {
        name: name.to_string(),
        weight_bytes: model.nbytes() + expert_bytes * cfg.moe.num_experts * cfg.moe_layers().count(),
        prefill_tps: args.prompt_tokens as f64 / prefill_best,
        decode_tps: args.decode_tokens as f64 / decode_best,
        bytes_per_token,
        bound_tps: bandwidth / bytes_per_token as f64,
    })
}

/// Bytes of one expert of `cfg` at `bytes_per_value`.
pub fn expert_bytes(cfg: &ModelConfig, bytes_per_value: usize) -> usize {
    3 * cfg.hidden_size * cfg.moe.expert_ffn * bytes_per_value
}

/// The results as a markdown table.
pub fn render(rows: &[BenchRow], bandwidth: f64, args: BenchArgs) -> String {
    let mut s = format!(
        "read bandwidth: {:.1} GB/s ({} threads); prompt {} tokens, decode {} tokens, best of {}\n\n",
        bandwidth / 1e9,
        rayon::current_num_threads(),
        args.prompt_tokens,
        args.decode_tokens,
        args.repeats
    );
    s.push_str("| model | weights | prefill tok/s | decode tok/s | bytes/decoded token | bandwidth bound tok/s | decode / bound |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1} MB | {:.1} | {:.1} | {:.2} MB | {:.1} | {:.2} |\n",
            r.name,
            r.weight_bytes as f64 / 1e6,
            r.prefill_tps,
            r.decode_tps,
            r.bytes_per_token as f64 / 1e6,
            r.bound_tps,
            r.decode_tps / r.bound_tps
        ));
    }
    s
}

/// Engine-level decode throughput with `batch` concurrent greedy sequences
/// (no HTTP): generated tokens per second over the whole run.
pub fn engine_throughput<E: StepBackend>(
    core: &mut EngineCore<E>,
    batch: usize,
    max_tokens: usize,
) -> Result<f64, moe_engine::EngineError> {
    let vocab = core.model().config().vocab_size;
    for i in 0..batch {
        let prompt = (0..16).map(|j| (3 + (i * 131 + j * 7) % (vocab - 3)) as u32).collect();
        let req = GenerationRequest {
            prompt,
            sampling: moe_model::SamplingParams::default(),
            seed: i as u64,
            max_tokens,
            min_tokens: 0,
            ignore_eos: true,
        };
        core.add(SeqId(i as u64), req)?;
    }
    let t = Instant::now();
    let mut tokens = 0;
    while !core.is_idle() {
        tokens += core.step().map(|o| o.len()).unwrap_or(0);
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

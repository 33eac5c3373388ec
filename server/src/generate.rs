//! `moe-serve generate`: stream one completion to stdout.

use crate::offload::ServedModel;
use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{IncrementalDecoder, SamplingParams, StepBackend};
use moe_scheduler::SchedulerConfig;
use moe_types::SeqId;
use std::io::Write;

/// KV block size of the CLI's engine.
const BLOCK_SIZE: usize = 16;
/// The one sequence's id.
const SEQ: SeqId = SeqId(0);

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateArgs {
    /// Prompt text (the tokenizer adds bos).
    pub prompt: String,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// RNG seed.
    pub seed: u64,
    /// Generate `max_tokens` even past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Counts reported on stderr after generating.
#[derive(Clone, Debug)]
pub struct GenerateStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated: usize,
    /// From the call to the first generated token (prefill and first sample).
    pub first_token: std::time::Duration,
    /// From the first generated token to the last.
    pub decode: std::time::Duration,
    /// The expert cache's counters over the run, all layers summed (`None`
    /// without a budget).
    pub cache: Option<moe_offload::LayerStats>,
}

/// Generates through the engine's step loop (one request in an
/// [`EngineCore`]) and writes the text, as produced, to `out`. Generation
/// stops at `max_tokens`, an eos token or the end of the context.
pub fn generate(m: ServedModel, args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<GenerateStats> {
    let (prompt, blocks) = plan(&m.codec, m.model.config(), args)?;
    let sched = SchedulerConfig { max_num_seqs: 1, max_batched_tokens: prompt.len().max(1) };
    let eos = m.codec.eos_ids().to_vec();
    let core = EngineCore::new(m.model, m.experts, eos, sched, (blocks, BLOCK_SIZE));
    drive(core, &m.codec, prompt, args, out, |e| e.cache_stats().map(|s| s.total()))
}

/// [`generate`] on GPU 0 (`--device cuda`).
#[cfg(feature = "cuda")]
pub fn generate_gpu(
    host: crate::gpu::GpuHost,
    dir: &std::path::Path,
    settings: &crate::offload::OffloadSettings,
    args: &GenerateArgs,
    out: &mut dyn Write,
) -> anyhow::Result<GenerateStats> {
    let (prompt, blocks) = plan(host.codec(), host.config(), args)?;
    let served = host.upload(dir, settings, (blocks, BLOCK_SIZE))?;
    let sched = SchedulerConfig { max_num_seqs: 1, max_batched_tokens: prompt.len().max(1) };
    let eos = served.codec.eos_ids().to_vec();
    let core = EngineCore::new(served.model, served.backend, eos, sched, (blocks, BLOCK_SIZE));
    drive(core, &served.codec, prompt, args, out, |b| Some(b.experts().stats().total()))
}

/// The prompt's tokens and the KV blocks the generation needs.
fn plan(
    codec: &moe_model::TextCodec,
    cfg: &moe_model::ModelConfig,
    args: &GenerateArgs,
) -> anyhow::Result<(Vec<u32>, usize)> {
    let prompt = codec.encode(&args.prompt, true)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let ctx = cfg.max_position_embeddings;
    if prompt.len() >= ctx {
        anyhow::bail!("the prompt has {} tokens; the model's context is {ctx}", prompt.len());
    }
    let tokens = prompt.len() + args.max_tokens;
    Ok((prompt, tokens.min(ctx).div_ceil(BLOCK_SIZE)))
}

/// Runs one request through `core` to the end, writing text as it comes.
fn drive<E: StepBackend>(
    mut core: EngineCore<E>,
    codec: &moe_model::TextCodec,
    prompt: Vec<u32>,
    args: &GenerateArgs,
    out: &mut dyn Write,
    cache_stats: impl Fn(&E) -> Option<moe_offload::LayerStats>,
) -> anyhow::Result<GenerateStats> {
    let eos = codec.eos_ids().to_vec();
    let req = GenerationRequest {
        max_tokens: args.max_tokens.min(core.max_model_len() - prompt.len()),
        prompt,
        sampling: args.sampling.clone(),
        seed: args.seed,
        min_tokens: 0,
        ignore_eos: args.ignore_eos,
    };
    let prompt_tokens = req.prompt.len();
    let start = std::time::Instant::now();
    let mut first: Option<std::time::Instant> = None;
    core.add(SEQ, req)?;
    let mut dec = IncrementalDecoder::new();
    let mut generated = 0;
    while !core.is_idle() {
        for o in core.step().map_err(|(_, e)| e)? {
            generated += 1;
            first.get_or_insert_with(std::time::Instant::now);
            if eos.contains(&o.token.id) {
                continue;
            }
            let text = dec.push(codec, o.token.id)?;
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                core.abort(SEQ);
                return Err(e.into());
            }
        }
    }
    out.write_all(dec.finish(codec)?.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    let first = first.unwrap_or(start);
    let cache = cache_stats(core.experts());
    Ok(GenerateStats { prompt_tokens, generated, first_token: first - start, decode: first.elapsed(), cache })
}

//! `moe-serve generate`: stream one completion to stdout.

use crate::offload::ServedModel;
use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{IncrementalDecoder, SamplingParams};
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
    let prompt = m.codec.encode(&args.prompt, true)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let ctx = m.model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        anyhow::bail!("the prompt has {} tokens; the model's context is {ctx}", prompt.len());
    }
    let tokens = prompt.len() + args.max_tokens;
    let blocks = tokens.min(ctx).div_ceil(BLOCK_SIZE);
    let sched = SchedulerConfig { max_num_seqs: 1, max_batched_tokens: prompt.len().max(1) };
    let eos = m.codec.eos_ids().to_vec();
    let codec = m.codec;
    let mut core = EngineCore::new(m.model, m.experts, eos.clone(), sched, (blocks, BLOCK_SIZE));
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
            let text = dec.push(&codec, o.token.id)?;
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                core.abort(SEQ);
                return Err(e.into());
            }
        }
    }
    out.write_all(dec.finish(&codec)?.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    let first = first.unwrap_or(start);
    let cache = core.experts().cache_stats().map(|s| s.total());
    Ok(GenerateStats { prompt_tokens, generated, first_token: first - start, decode: first.elapsed(), cache })
}

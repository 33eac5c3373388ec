//! `moe-serve generate`: stream one completion to stdout.

use crate::offload::ServedModel;
use crate::session::{Limits, Session};
use moe_model::{IncrementalDecoder, Sampler, SamplingParams};
use std::io::Write;

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
}

/// Counts reported on stderr after generating.
#[derive(Clone, Copy, Debug)]
pub struct GenerateStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated: usize,
}

/// Generates and writes the text, as produced, to `out`.
pub fn generate(m: &ServedModel, args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<GenerateStats> {
    let prompt = m.codec.encode(&args.prompt, true)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let ctx = m.model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        anyhow::bail!("the prompt has {} tokens; the model's context is {ctx}", prompt.len());
    }
    let mut session = Session::new(&m.model, &m.experts, prompt.len() + args.max_tokens);
    let mut sampler = Sampler::new(args.sampling.clone(), args.seed, &prompt);
    let mut dec = IncrementalDecoder::new();
    let mut io_err = None;
    let eos = m.codec.eos_ids();
    let generated = session.generate(&prompt, &mut sampler, Limits { max_tokens: args.max_tokens, eos }, |id| {
        if eos.contains(&id) {
            return false;
        }
        let text = match dec.push(&m.codec, id) {
            Ok(t) => t,
            Err(e) => {
                io_err = Some(anyhow::Error::from(e));
                return false;
            }
        };
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            io_err = Some(e.into());
            return false;
        }
        true
    })?;
    if let Some(e) = io_err {
        return Err(e);
    }
    out.write_all(dec.finish(&m.codec)?.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(GenerateStats { prompt_tokens: prompt.len(), generated })
}

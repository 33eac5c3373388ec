//! Running the choices of one request on the engine and turning their
//! events into text pieces, shared by completions and chat completions.

use super::error::ApiError;
use super::harmony::{HarmonyRouter, Route};
use super::state::Ready;
use super::text::TextAssembler;
use moe_engine::metric_names as m;
use moe_engine::{EngineEvent, FinishReason, GenerationRequest, RequestStream};
use moe_model::{SampledToken, SamplingParams, TextCodec};
use moe_types::TokenId;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

/// What to run: prompts x `n` choices.
pub struct Job {
    /// Tokenized prompts.
    pub prompts: Vec<Vec<TokenId>>,
    /// Choices per prompt.
    pub n: usize,
    /// New tokens per choice.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Base seed (choice i uses seed + i).
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Suppress eos before this many tokens.
    pub min_tokens: usize,
    /// Ignore eos.
    pub ignore_eos: bool,
    /// Split harmony channels into reasoning and content (chat completions
    /// of a harmony model).
    pub harmony: Option<super::harmony::HarmonyTokens>,
}

impl Job {
    /// A job for `prompts` with validated parameters; `default_max_tokens`
    /// applies when the request set no limit. Without a seed, one is drawn.
    pub fn new(prompts: Vec<Vec<TokenId>>, p: &super::params::CommonParams, default_max_tokens: usize) -> Self {
        Self {
            prompts,
            n: p.n,
            max_tokens: p.max_tokens.unwrap_or(default_max_tokens),
            sampling: p.sampling.clone(),
            seed: p.seed.unwrap_or_else(rand::random),
            stop: p.stop.clone(),
            min_tokens: p.min_tokens,
            ignore_eos: p.ignore_eos,
            harmony: None,
        }
    }
}

/// One generated token as the client sees it.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Choice index.
    pub index: usize,
    /// Text to append (may be empty while a stop string or character is pending).
    pub text: String,
    /// Reasoning text to append (harmony models' non-final channels).
    pub reasoning: String,
    /// The token and its logprobs (when asked for).
    pub token: Option<SampledToken>,
    /// Set on the last piece of a choice.
    pub finish: Option<FinishReason>,
}

/// A running choice.
pub struct Choice {
    index: usize,
    stream: Option<RequestStream>,
    text: TextAssembler,
    /// Harmony: where each token goes, and the reasoning's own text.
    harmony: Option<(HarmonyRouter, TextAssembler)>,
    codec: Arc<TextCodec>,
    /// Tokens generated so far.
    pub tokens: usize,
    started: Instant,
    last: Option<Instant>,
    done: bool,
}

/// Submits every choice of `job`; nothing runs if any submission fails.
pub fn submit(ready: &Ready, job: Job, started: Instant) -> Result<Vec<Choice>, ApiError> {
    let mut choices = Vec::with_capacity(job.prompts.len() * job.n);
    for (p, prompt) in job.prompts.iter().enumerate() {
        metrics::counter!(m::PROMPT_TOKENS).increment(prompt.len() as u64);
        for i in 0..job.n {
            let req = GenerationRequest {
                prompt: prompt.clone(),
                sampling: job.sampling.clone(),
                seed: job.seed.wrapping_add(i as u64),
                max_tokens: job.max_tokens,
                min_tokens: job.min_tokens,
                ignore_eos: job.ignore_eos,
            };
            let stream = ready.engine.submit(req)?; // on error, earlier streams drop and abort
            choices.push(Choice {
                index: p * job.n + i,
                stream: Some(stream),
                text: TextAssembler::new(job.stop.clone()),
                harmony: job.harmony.map(|t| (HarmonyRouter::new(t), TextAssembler::new(Vec::new()))),
                codec: ready.codec.clone(),
                tokens: 0,
                started,
                last: None,
                done: false,
            });
        }
    }
    Ok(choices)
}

impl Choice {
    /// Choice index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The next piece; `None` once the choice has finished.
    pub async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        if self.done {
            return None;
        }
        let stream = self.stream.as_mut()?;
        let ev = stream.next().await;
        let piece = match ev {
            Some(EngineEvent::Token(tok)) => {
                let now = Instant::now();
                match self.last {
                    None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN).record((now - self.started).as_secs_f64()),
                    Some(t) => metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - t).as_secs_f64()),
                }
                self.last = Some(now);
                self.tokens += 1;
                metrics::counter!(m::GENERATED_TOKENS).increment(1);
                let route = match &mut self.harmony {
                    Some((router, _)) => router.push(&self.codec, tok.id),
                    None => Route::Content,
                };
                let pushed = match (route, &mut self.harmony) {
                    (Route::Content, _) => self.text.push(&self.codec, tok.id).map(|t| (t, String::new())),
                    (Route::Reasoning, Some((_, r))) => r.push(&self.codec, tok.id).map(|t| (String::new(), t)),
                    _ => Ok((String::new(), String::new())),
                };
                let (text, reasoning) = match pushed {
                    Ok(t) => t,
                    Err(e) => return Some(Err(self.fail(ApiError::internal(format!("detokenizing failed: {e}"))))),
                };
                let finish = self.text.stopped().then_some(FinishReason::Stop);
                Piece { index: self.index, text, reasoning, token: Some(tok), finish }
            }
            Some(EngineEvent::Finished(reason)) => {
                let reasoning = match &mut self.harmony {
                    Some((_, r)) => r.finish(&self.codec),
                    None => Ok(String::new()),
                };
                let (text, reasoning) = match self.text.finish(&self.codec).and_then(|t| Ok((t, reasoning?))) {
                    Ok(t) => t,
                    Err(e) => return Some(Err(self.fail(ApiError::internal(format!("detokenizing failed: {e}"))))),
                };
                Piece { index: self.index, text, reasoning, token: None, finish: Some(reason) }
            }
            // the engine's cause, mapped once (frontend/error.rs): a refused
            // request is a 400, an unreadable expert a 503, a failed step a 500
            Some(EngineEvent::Error(e)) => return Some(Err(self.fail(e.into()))),
            None => return Some(Err(self.fail(ApiError::unavailable("the engine stopped")))),
        };
        if piece.finish.is_some() {
            self.done = true;
            self.stream = None; // a stop string ends the sequence: abort it now
            metrics::histogram!(m::E2E_LATENCY).record(self.started.elapsed().as_secs_f64());
        }
        Some(Ok(piece))
    }

    fn fail(&mut self, e: ApiError) -> ApiError {
        self.done = true;
        self.stream = None;
        e
    }
}

/// Text of a single token, for logprobs.
pub fn token_text(codec: &TextCodec, id: TokenId) -> String {
    codec.decode(&[id], false).unwrap_or_default()
}

/// A finished choice.
pub struct Collected {
    /// Choice index.
    pub index: usize,
    /// Text, stop strings removed.
    pub text: String,
    /// Reasoning text (harmony models).
    pub reasoning: String,
    /// The tokens, with logprobs when asked for.
    pub tokens: Vec<SampledToken>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Runs every choice to the end.
pub async fn collect(choices: Vec<Choice>) -> Result<Vec<Collected>, ApiError> {
    let runs = choices.into_iter().map(|mut c| async move {
        let mut out = Collected {
            index: c.index(),
            text: String::new(),
            reasoning: String::new(),
            tokens: Vec::new(),
            finish: FinishReason::Length,
        };
        while let Some(p) = c.next().await {
            let p = p?;
            out.text.push_str(&p.text);
            out.reasoning.push_str(&p.reasoning);
            out.tokens.extend(p.token);
            if let Some(f) = p.finish {
                out.finish = f;
            }
        }
        Ok::<_, ApiError>(out)
    });
    let mut all = futures_util::future::try_join_all(runs).await?;
    all.sort_by_key(|c| c.index);
    Ok(all)
}

/// Rejects empty prompts and prompts over the limit.
pub fn check_prompt(p: Vec<TokenId>, max: usize) -> Result<Vec<TokenId>, ApiError> {
    if p.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if p.len() > max {
        return Err(too_long("prompt", p.len().to_string(), max));
    }
    Ok(p)
}

/// A list of token ids, each inside the vocabulary.
pub fn token_list(v: Option<Value>, param: &str, vocab: usize) -> Result<Option<Vec<TokenId>>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let Value::Array(a) = v else {
        return Err(ApiError::invalid(param, format!("`{param}` must be a list of token ids")));
    };
    a.into_iter()
        .map(|x| {
            let id =
                x.as_i64().ok_or_else(|| ApiError::invalid(param, format!("`{param}` holds {x}, not a token id")))?;
            super::params::token_id(param, id, vocab)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A prompt of `max` tokens that is longer than `max * PROBE_BYTES_PER_TOKEN`
/// bytes is first tokenized by a prefix of that length (tokens average 3-5
/// bytes; 16 leaves room for long runs of whitespace or digits).
const PROBE_BYTES_PER_TOKEN: usize = 16;

/// Runs tokenizer work off the async runtime, on the blocking pool, under one
/// of `Ready::tokenize_permits`: at most that many tokenizations (each
/// costing memory in proportion to its text) run at once, however many
/// requests arrive; the others queue for a permit.
pub async fn tokenize<T: Send + 'static>(
    r: &Ready,
    work: impl FnOnce(&TextCodec) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = r.tokenize_permits.clone().acquire_owned().await.map_err(|e| ApiError::internal(e.to_string()))?;
    let codec = r.codec.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work(&codec)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Tokenizes `text` (see [`tokenize`] for where it runs) and refuses it as
/// soon as it is known to exceed `max_tokens`; see [`encode_bounded`].
pub async fn encode(
    r: &Ready,
    text: String,
    add_special: bool,
    param: &'static str,
    max_tokens: usize,
) -> Result<Vec<TokenId>, ApiError> {
    tokenize(r, move |codec| encode_bounded(codec, &text, add_special, param, max_tokens)).await
}

/// Tokenizes `text` with a bounded cost: a text too long to fit at
/// [`PROBE_BYTES_PER_TOKEN`] bytes per token is first tokenized by its prefix
/// of that many bytes, and if the prefix alone has more than `max_tokens + 1`
/// tokens (one token may straddle the cut) the text is refused without
/// tokenizing the rest. Only a text whose tokens are unusually long is
/// tokenized in full. The error names `param` and carries
/// `context_length_exceeded`.
pub fn encode_bounded(
    codec: &TextCodec,
    text: &str,
    add_special: bool,
    param: &str,
    max_tokens: usize,
) -> Result<Vec<TokenId>, ApiError> {
    let probe = max_tokens.saturating_mul(PROBE_BYTES_PER_TOKEN);
    if text.len() > probe {
        let mut cut = probe;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let prefix = codec.encode(&text[..cut], add_special).map_err(|e| ApiError::invalid(param, e.to_string()))?;
        if prefix.len() > max_tokens + 1 {
            return Err(too_long(param, format!("more than {}", max_tokens + 1), max_tokens));
        }
    }
    let ids = codec.encode(text, add_special).map_err(|e| ApiError::invalid(param, e.to_string()))?;
    if ids.len() > max_tokens {
        return Err(too_long(param, ids.len().to_string(), max_tokens));
    }
    Ok(ids)
}

/// The error of a prompt over its token limit (`count` may be a bound).
pub fn too_long(param: &str, count: String, max: usize) -> ApiError {
    ApiError {
        code: Some("context_length_exceeded"),
        ..ApiError::invalid(param, format!("the prompt has {count} tokens; the limit is {max}"))
    }
}

/// Every choice's pieces, merged in arrival order. Dropping the stream drops
/// the choices, which aborts their sequences.
pub fn merge(
    choices: Vec<Choice>,
) -> futures_util::stream::SelectAll<futures_util::stream::BoxStream<'static, Result<Piece, ApiError>>> {
    use futures_util::StreamExt;
    futures_util::stream::select_all(
        choices
            .into_iter()
            .map(|c| futures_util::stream::unfold(c, |mut c| async move { c.next().await.map(|p| (p, c)) }).boxed()),
    )
}

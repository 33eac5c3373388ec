//! `POST /v1/completions`.

use super::fields::{read_common, Fields};
use super::sse::{self, StreamFormat};
use super::{new_id, parse_body, unix_now, AppState, Ready};
use crate::frontend::error::ApiError;
use crate::frontend::generation::{self, check_prompt, collect, token_list, token_text, Job, Piece};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moe_model::SampledToken;
use moe_types::TokenId;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

pub(super) async fn handle(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let r = state.ready()?;
    let mut f = Fields::new(parse_body(body)?)?;
    let (mut raw, opts) = read_common(&mut f, &["max_tokens"])?;
    let prompt = f.take("prompt").ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required"))?;
    let echo = f.bool("echo")?.unwrap_or(false);
    raw.logprobs = f.int("logprobs")?.map(|n| ("logprobs", n));
    f.finish()?;
    let common = raw.validate(&(&state.cfg).into(), r.engine_vocab)?;
    let logprobs = common.sampling.logprobs;
    state.check_model(&r, common.model.as_deref())?;
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid("echo", "`echo` together with `logprobs` (prompt logprobs) is not supported"));
    }
    let prompts = prompts(&r, prompt, state.cfg.max_prompt_tokens).await?;
    let echoes: Vec<String> =
        if echo { prompts.iter().map(|p| r.codec.decode(p, true).unwrap_or_default()).collect() } else { Vec::new() };
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum::<usize>() * common.n;
    let job = Job::new(prompts, &common, 16);
    let n = common.n;
    tracing::debug!(user = common.user.as_deref().unwrap_or(""), choices = job.prompts.len() * n, "completion");
    let choices = generation::submit(&r, job, started)?;
    let (id, created, model) = (new_id("cmpl"), unix_now(), r.model_name.clone());
    if opts.stream {
        let codec = r.codec.clone();
        let (id2, model2) = (id.clone(), model.clone());
        let prelude = echoes
            .iter()
            .enumerate()
            .flat_map(|(p, text)| (0..n).map(move |i| (p * n + i, text.clone())))
            .map(|(index, text)| chunk(&id, created, &model, index, &text, Value::Null, None))
            .collect();
        let piece = Box::new(move |p: &Piece| {
            let lp = match (&p.token, logprobs) {
                (Some(t), Some(_)) => completion_logprobs(&codec, std::slice::from_ref(t), 0),
                _ => Value::Null,
            };
            chunk(&id2, created, &model2, p.index, &p.text, lp, p.finish)
        });
        let usage = opts.include_usage.then(|| {
            let (id, model) = (id.clone(), model.clone());
            Box::new(move |completion: usize| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage(prompt_tokens, completion)})
            }) as Box<dyn Fn(usize) -> Value + Send>
        });
        return Ok(sse::respond(choices, StreamFormat { prelude, piece, usage }));
    }
    let results = collect(choices).await?;
    let mut completion_tokens = 0;
    let out: Vec<Value> = results
        .into_iter()
        .map(|c| {
            completion_tokens += c.tokens.len();
            let echo_text = echoes.get(c.index / n).cloned().unwrap_or_default();
            let lp = if logprobs.is_some() {
                completion_logprobs(&r.codec, &c.tokens, echo_text.len())
            } else {
                Value::Null
            };
            json!({"index": c.index, "text": echo_text + &c.text, "logprobs": lp, "finish_reason": super::finish_reason(c.finish)})
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": out, "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

fn chunk(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
    text: &str,
    logprobs: Value,
    finish: Option<moe_engine::FinishReason>,
) -> Value {
    json!({"id": id, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish.map(super::finish_reason)}]})
}

pub(super) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The legacy completions logprobs object.
fn completion_logprobs(codec: &moe_model::TextCodec, tokens: &[SampledToken], offset0: usize) -> Value {
    let mut offset = offset0;
    let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let text = token_text(codec, t.id);
        offs.push(offset);
        offset += text.len();
        toks.push(text);
        lps.push(t.logprob);
        let top: serde_json::Map<String, Value> =
            t.top.iter().map(|&(id, lp)| (token_text(codec, id), json!(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

/// The prompt forms: a string, a list of strings, token ids, or lists of ids.
async fn prompts(r: &Ready, v: Value, max_prompt: usize) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let texts: Vec<String> = match v {
        Value::String(s) => vec![s],
        Value::Array(a) if a.is_empty() => return Err(ApiError::invalid("prompt", "`prompt` must not be empty")),
        Value::Array(a) if a.iter().all(Value::is_string) => {
            a.into_iter().filter_map(|x| x.as_str().map(str::to_string)).collect()
        }
        Value::Array(a) if a.iter().all(Value::is_array) => {
            let mut out = Vec::new();
            for x in a {
                out.push(check_prompt(token_list(Some(x), "prompt", r.engine_vocab)?.unwrap_or_default(), max_prompt)?);
            }
            return Ok(out);
        }
        v @ Value::Array(_) => {
            return Ok(vec![check_prompt(
                token_list(Some(v), "prompt", r.engine_vocab)?.unwrap_or_default(),
                max_prompt,
            )?]);
        }
        _ => return Err(ApiError::invalid("prompt", "`prompt` must be a string, a list of strings, or token ids")),
    };
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        out.push(check_prompt(generation::encode(r, t, true, "prompt", max_prompt).await?, max_prompt)?);
    }
    Ok(out)
}

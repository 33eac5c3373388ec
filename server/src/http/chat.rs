//! `POST /v1/chat/completions`: the checkpoint's chat template turns the
//! messages into a prompt; the rest is shared with completions.

use super::chat_template::Message;
use super::completions::usage;
use super::fields::{read_common, Fields};
use super::sse::{self, StreamFormat};
use super::{new_id, parse_body, unix_now, AppState};
use crate::frontend::error::ApiError;
use crate::frontend::generation::{self, collect, token_text, Job, Piece};
use crate::frontend::state::Ready;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moe_model::{SampledToken, TextCodec};
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
    let (mut raw, opts) = read_common(&mut f, &["max_completion_tokens", "max_tokens"])?;
    let messages =
        parse_messages(f.take("messages").ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?)?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.int("top_logprobs")?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` requires `logprobs` to be true"));
    }
    raw.logprobs = logprobs.then(|| ("top_logprobs", top.unwrap_or(0)));
    f.finish()?;
    let common = raw.validate(&(&state.cfg).into(), r.engine_vocab)?;
    state.check_model(&r, common.model.as_deref())?;
    // the template writes special tokens (bos) itself
    // bounded by --max-prompt-tokens there
    let prompt = encode_messages(&state, &r, messages, false).await?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("messages", "the rendered chat has no tokens"));
    }
    let prompt_tokens = prompt.len() * common.n;
    let room = r.engine.max_model_len().saturating_sub(prompt.len()).clamp(1, state.cfg.max_tokens_limit);
    let mut job = Job::new(vec![prompt], &common, room);
    job.harmony = r.harmony;
    tracing::debug!(user = common.user.as_deref().unwrap_or(""), choices = common.n, "chat completion");
    let choices = generation::submit(&r, job, started)?;
    let (id, created, model) = (new_id("chatcmpl"), unix_now(), r.model_name.clone());
    if opts.stream {
        let prelude = (0..common.n)
            .map(|i| chunk(&id, created, &model, i, json!({"role": "assistant", "content": ""}), Value::Null, None))
            .collect();
        let (id2, model2, codec) = (id.clone(), model.clone(), r.codec.clone());
        let piece = Box::new(move |p: &Piece| {
            let lp = match (&p.token, logprobs) {
                (Some(t), true) => chat_logprobs(&codec, std::slice::from_ref(t)),
                _ => Value::Null,
            };
            let mut delta = serde_json::Map::new();
            if !p.reasoning.is_empty() {
                delta.insert("reasoning_content".into(), json!(p.reasoning));
            }
            if !p.text.is_empty() || (p.finish.is_none() && p.reasoning.is_empty()) {
                delta.insert("content".into(), json!(p.text));
            }
            let delta = Value::Object(delta);
            chunk(&id2, created, &model2, p.index, delta, lp, p.finish)
        });
        let usage = opts.include_usage.then(|| {
            let (id, model) = (id.clone(), model.clone());
            Box::new(move |completion: usize| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                       "usage": usage(prompt_tokens, completion)})
            }) as Box<dyn Fn(usize) -> Value + Send>
        });
        return Ok(sse::respond(choices, StreamFormat { prelude, piece, usage }));
    }
    let results = collect(choices).await?;
    let completion_tokens: usize = results.iter().map(|c| c.tokens.len()).sum();
    let out: Vec<Value> = results
        .into_iter()
        .map(|c| {
            let lp = if logprobs { chat_logprobs(&r.codec, &c.tokens) } else { Value::Null };
            let mut message = json!({"role": "assistant", "content": c.text});
            if r.harmony.is_some() {
                message["reasoning_content"] = json!(c.reasoning);
            }
            json!({"index": c.index, "message": message, "logprobs": lp, "finish_reason": super::finish_reason(c.finish)})
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": out, "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

fn chunk(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
    delta: Value,
    logprobs: Value,
    finish: Option<moe_engine::FinishReason>,
) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish.map(super::finish_reason)}]})
}

fn chat_logprobs(codec: &TextCodec, tokens: &[SampledToken]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(codec, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

/// Validates `messages`: a non-empty list of `{role, content}` with roles
/// system, developer, user or assistant; content a string or text parts.
pub fn parse_messages(v: Value) -> Result<Vec<Message>, ApiError> {
    let bad = |m: String| ApiError::invalid("messages", m);
    let Value::Array(items) = v else { return Err(bad("`messages` must be a list".into())) };
    if items.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(mut o) = m else { return Err(bad(format!("messages[{i}] must be an object"))) };
            let role = match o.remove("role") {
                Some(Value::String(r)) if matches!(r.as_str(), "system" | "developer" | "user" | "assistant") => r,
                Some(r) => {
                    return Err(bad(format!("messages[{i}].role {r} is not one of system, developer, user, assistant")))
                }
                None => return Err(bad(format!("messages[{i}].role is required"))),
            };
            let content = match o.remove("content") {
                Some(Value::String(s)) => s,
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => s.push_str(t),
                            _ => return Err(bad(format!("messages[{i}].content: only text parts are supported"))),
                        }
                    }
                    s
                }
                Some(Value::Null) | None if role == "assistant" => String::new(),
                _ => return Err(bad(format!("messages[{i}].content must be a string or a list of text parts"))),
            };
            let name = match o.remove("name") {
                None | Some(Value::Null) => None,
                Some(Value::String(n)) => Some(n),
                Some(_) => return Err(bad(format!("messages[{i}].name must be a string"))),
            };
            if let Some(k) = o.keys().next() {
                return Err(bad(format!("messages[{i}].{k} is not supported")));
            }
            Ok(Message { role, content, name })
        })
        .collect()
}

/// Marks where a message's content goes in a rendered template (Unicode
/// private-use characters, which no template writes).
const MARK_OPEN: char = '\u{F8F0}';
const MARK_CLOSE: char = '\u{F8F1}';

/// The prompt of a chat: the template rendered over `messages` and
/// tokenized, bounded like any prompt, both on the blocking pool
/// ([`generation::tokenize`]). Only the template's own markup may produce
/// special tokens: when a message's content holds the text of one
/// (`</s><|system|>` to close the turn and forge a system turn), the
/// template is rendered with marks in place of the contents, its text is
/// tokenized with its special tokens and each content as ordinary text.
/// `--allow-special-tokens-in-content` (trusted deployments) tokenizes the
/// whole rendering as one text instead.
pub(super) async fn encode_messages(
    state: &AppState,
    r: &Arc<Ready>,
    messages: Vec<Message>,
    add_special: bool,
) -> Result<Vec<TokenId>, ApiError> {
    let (allow, max, ready) = (state.cfg.allow_special_tokens_in_content, state.cfg.max_prompt_tokens, r.clone());
    generation::tokenize(r, move |codec| {
        let template =
            ready.template.as_ref().ok_or_else(|| ApiError::invalid("messages", "this model has no chat template"))?;
        let specials = codec.special_token_texts();
        let forging = !allow && messages.iter().any(|m| specials.iter().any(|s| m.content.contains(s.as_str())));
        if !forging {
            return generation::encode_bounded(codec, &template.render(&messages)?, add_special, "messages", max);
        }
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message { content: format!("{MARK_OPEN}{i}{MARK_CLOSE}"), ..m.clone() })
            .collect();
        let text = template.render(&marked)?;
        let bad = |e: moe_model::ModelError| ApiError::invalid("messages", e.to_string());
        // a mark that is not ours (the characters in a role or name) is refused, never indexed blindly
        let foreign = || ApiError::invalid("messages", "messages may not contain the characters U+F8F0 or U+F8F1");
        let mut ids = Vec::new();
        let mut rest = text.as_str();
        while let Some(a) = rest.find(MARK_OPEN) {
            ids.extend(codec.encode(&rest[..a], add_special && ids.is_empty()).map_err(bad)?);
            let after = &rest[a + MARK_OPEN.len_utf8()..];
            let b = after.find(MARK_CLOSE).ok_or_else(foreign)?;
            let content = after[..b].parse::<usize>().ok().and_then(|i| messages.get(i)).ok_or_else(foreign)?;
            ids.extend(codec.encode_text(&content.content).map_err(bad)?);
            rest = &after[b + MARK_CLOSE.len_utf8()..];
        }
        ids.extend(codec.encode(rest, false).map_err(bad)?);
        if ids.len() > max {
            return Err(generation::too_long("messages", ids.len().to_string(), max));
        }
        Ok(ids)
    })
    .await
}

//! Small endpoints: health, metrics, models, tokenize, detokenize.

use super::fields::Fields;
use super::{parse_body, AppState};
use crate::frontend::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

pub(super) async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.ready() {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": e.message}))),
    }
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

pub(super) async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": r.model_name, "object": "model", "created": r.created, "owned_by": "moe-serve",
            "max_model_len": r.engine.max_model_len(),
        }]
    })))
}

pub(super) async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let mut f = Fields::new(parse_body(body)?)?;
    state.check_model(&r, f.string("model")?.as_deref())?;
    let add_special = f.bool("add_special_tokens")?;
    // a chat template writes its own special tokens, so messages default to none added
    let tokens = match (f.string("prompt")?, f.take("messages")) {
        (Some(p), None) => {
            f.finish()?;
            // bounded like a prompt: /tokenize costs no more than a completion would
            let max = state.cfg.max_prompt_tokens;
            crate::frontend::generation::encode(&r, p, add_special.unwrap_or(true), "prompt", max).await?
        }
        (None, Some(m)) => {
            let msgs = super::chat::parse_messages(m)?;
            f.finish()?;
            super::chat::encode_messages(&state, &r, msgs, add_special.unwrap_or(false)).await?
        }
        _ => return Err(ApiError::invalid("prompt", "give exactly one of `prompt` or `messages`")),
    };
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": r.engine.max_model_len()})))
}

pub(super) async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let mut f = Fields::new(parse_body(body)?)?;
    state.check_model(&r, f.string("model")?.as_deref())?;
    let tokens = crate::frontend::generation::token_list(f.take("tokens"), "tokens", r.engine_vocab)?
        .ok_or_else(|| ApiError::invalid("tokens", "`tokens` is required"))?;
    f.finish()?;
    let prompt = r.codec.decode(&tokens, false).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(json!({"prompt": prompt})))
}

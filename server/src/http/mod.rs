//! The OpenAI-compatible REST API (axum). Translates between JSON and the
//! engine; validation, tokenization, stop strings and error mapping happen
//! here and nowhere else.

mod chat;
mod chat_template;
mod completions;
pub mod fields;
pub mod listener;
mod misc;
mod sse;

pub use chat::parse_messages;
pub use chat_template::{ChatTemplate, Message};

use crate::frontend::error::ApiError;
pub use crate::frontend::state::{AppState, Ready};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The finish reason on the REST wire, the one mapping: OpenAI's `stop` for
/// an eos token and for a stop string, `length` for the token or context limit.
pub(crate) fn finish_reason(f: moe_engine::FinishReason) -> &'static str {
    match f {
        moe_engine::FinishReason::Eos | moe_engine::FinishReason::Stop => "stop",
        moe_engine::FinishReason::Length => "length",
    }
}

/// The router with every endpoint, auth and request metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/models", get(misc::models))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    // /health and /metrics are open unless configured otherwise (`--public-health false`,
    // `--public-metrics false`); then the API key guards them like the API
    let guard = |r: Router<Arc<AppState>>, public: bool| {
        if public {
            r
        } else {
            r.route_layer(middleware::from_fn_with_state(state.clone(), auth))
        }
    };
    let health = guard(Router::new().route("/health", get(misc::health)), state.cfg.public_health);
    let metrics = guard(Router::new().route("/metrics", get(misc::metrics)), state.cfg.public_metrics);
    Router::new()
        .merge(api)
        .merge(health)
        .merge(metrics)
        .fallback(|| async {
            ApiError {
                status: axum::http::StatusCode::NOT_FOUND,
                message: "Not found.".into(),
                param: None,
                code: None,
            }
        })
        .layer(middleware::from_fn(count_requests))
        .layer(middleware::map_response(|mut r: Response| async move {
            crate::frontend::error::add_status_headers(&mut r);
            r
        }))
        .with_state(state)
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.cfg.api_key {
        let given = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !crate::frontend::auth::authorized(given, key) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn count_requests(req: Request, next: Next) -> Response {
    let endpoint: &'static str = match req.uri().path() {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    };
    let resp = next.run(req).await;
    metrics::counter!(moe_engine::metric_names::REQUESTS, "endpoint" => endpoint, "status" => resp.status().as_u16().to_string(), "protocol" => "http")
        .increment(1);
    resp
}

/// Reads a JSON body within the size limit: 413 above it, 400 if malformed.
pub fn parse_body(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Value, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError { status: r.status(), message: "The request body is too large.".into(), param: None, code: None }
        } else if timed_out(&r) {
            ApiError {
                status: axum::http::StatusCode::REQUEST_TIMEOUT,
                message: "The request body arrived too slowly (--body-timeout-secs).".into(),
                param: None,
                code: None,
            }
        } else {
            ApiError::bad_request(format!("Could not read the request body: {r}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

/// Whether reading the body failed on the body-read timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = x.source();
    }
    false
}

/// Unix time now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A short random-looking id (request counter mixed with the clock).
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("{prefix}-{:016x}", (t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17))
}

//! A request body as the REST handlers read it: JSON parsing, field reading
//! (leftover fields rejected) and `RawParams::validate` against the default
//! limits. The first byte picks the endpoint (completions or chat); the rest
//! is the body. Accepted requests must satisfy every limit; rejected ones must
//! map to a 4xx HTTP response and a gRPC status without panicking.

#![no_main]

use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use moe_server::config::{ServeArgs, ServeConfig};
use moe_server::frontend::error::ApiError;
use moe_server::frontend::params::CommonParams;
use moe_server::http::fields::{read_common, Fields};
use moe_server::http::{parse_body, parse_messages};
use std::sync::OnceLock;

/// The built-in model's vocabulary size (any positive value would do).
const VOCAB: usize = 2048;

fn config() -> &'static ServeConfig {
    static CFG: OnceLock<ServeConfig> = OnceLock::new();
    CFG.get_or_init(|| ServeArgs::default().resolve().expect("default config"))
}

/// The completions handler's reading order, up to validation.
fn completions(body: &[u8]) -> Result<CommonParams, ApiError> {
    let mut f = Fields::new(parse_body(Ok(axum::body::Bytes::copy_from_slice(body)))?)?;
    let (mut raw, _opts) = read_common(&mut f, &["max_tokens"])?;
    let _prompt = f.take("prompt").ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required"))?;
    let _echo = f.bool("echo")?.unwrap_or(false);
    raw.logprobs = f.int("logprobs")?.map(|n| ("logprobs", n));
    f.finish()?;
    raw.validate(config(), VOCAB)
}

/// The chat handler's reading order, up to validation.
fn chat(body: &[u8]) -> Result<CommonParams, ApiError> {
    let mut f = Fields::new(parse_body(Ok(axum::body::Bytes::copy_from_slice(body)))?)?;
    let (mut raw, _opts) = read_common(&mut f, &["max_completion_tokens", "max_tokens"])?;
    let messages =
        parse_messages(f.take("messages").ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?)?;
    assert!(!messages.is_empty());
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.int("top_logprobs")?;
    raw.logprobs = logprobs.then(|| ("top_logprobs", top.unwrap_or(0)));
    f.finish()?;
    raw.validate(config(), VOCAB)
}

fn check_accepted(p: &CommonParams) {
    let cfg = config();
    assert!((1..=cfg.max_n).contains(&p.n), "n {}", p.n);
    assert!(p.max_tokens.is_none_or(|m| (1..=cfg.max_tokens_limit).contains(&m)));
    assert!(p.min_tokens <= cfg.max_tokens_limit);
    assert!(p.stop.len() <= cfg.max_stop && p.stop.iter().all(|s| !s.is_empty()));
    let s = &p.sampling;
    assert!(s.logit_bias.len() <= cfg.max_logit_bias);
    assert!(s.logit_bias.iter().all(|&(id, b)| (id as usize) < VOCAB && (-100.0..=100.0).contains(&b)));
    assert!((0.0..=2.0).contains(&s.temperature), "temperature {}", s.temperature);
    assert!(s.top_p > 0.0 && s.top_p <= 1.0, "top_p {}", s.top_p);
    assert!((0.0..=1.0).contains(&s.min_p));
    assert!((-2.0..=2.0).contains(&s.presence_penalty) && (-2.0..=2.0).contains(&s.frequency_penalty));
    assert!((0.01..=10.0).contains(&s.repetition_penalty));
    assert!(s.logprobs.is_none_or(|n| n <= 20));
}

fn check_rejected(e: ApiError) {
    assert!(e.status.is_client_error(), "a bad body gave {}: {}", e.status, e.message);
    assert!(!e.message.is_empty());
    let _ = e.body();
    let status: tonic::Status = e.clone().into();
    assert_ne!(status.code(), tonic::Code::Internal, "{}", e.message);
    let resp = e.into_response();
    assert!(resp.status().is_client_error());
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let result = if which & 1 == 0 { completions(body) } else { chat(body) };
    match result {
        Ok(p) => check_accepted(&p),
        Err(e) => check_rejected(e),
    }
});

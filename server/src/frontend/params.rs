//! Validation shared by every protocol: a request's generation parameters,
//! as delivered (types checked by the protocol layer), become
//! [`CommonParams`] here, with the same ranges, limits and messages for REST
//! and gRPC. Every error names its field.

use super::error::ApiError;
use crate::config::ServeConfig;
use moe_model::SamplingParams;
use moe_types::TokenId;

/// Largest `logprobs` / `top_logprobs`.
pub const MAX_LOGPROBS: i64 = 20;

/// Longest stop string, in bytes. Text that could still become a stop string is held back and
/// re-checked at every token, so the cost per token grows with the longest stop string.
pub const MAX_STOP_BYTES: usize = 1024;

/// Generation parameters as received: types checked, values not yet.
#[derive(Debug, Default, Clone)]
pub struct RawParams {
    /// Model name asked for.
    pub model: Option<String>,
    /// New-token limit and the name of the field that carried it.
    pub max_tokens: Option<(&'static str, i64)>,
    /// Choices per prompt.
    pub n: Option<i64>,
    /// Temperature.
    pub temperature: Option<f64>,
    /// Nucleus threshold.
    pub top_p: Option<f64>,
    /// Top-k (0 or -1: off).
    pub top_k: Option<i64>,
    /// Min-p.
    pub min_p: Option<f64>,
    /// Presence penalty.
    pub presence_penalty: Option<f64>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f64>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f64>,
    /// (token id, bias) pairs.
    pub logit_bias: Vec<(i64, f64)>,
    /// Seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Ignore eos.
    pub ignore_eos: bool,
    /// Minimum new tokens before eos may end a choice.
    pub min_tokens: Option<i64>,
    /// End-user id.
    pub user: Option<String>,
    /// Top-alternative count for logprobs and the field that carried it.
    pub logprobs: Option<(&'static str, i64)>,
}

/// Validated parameters shared by completions, chat and gRPC.
#[derive(Debug, Clone)]
pub struct CommonParams {
    /// The model asked for.
    pub model: Option<String>,
    /// New-token limit, if given.
    pub max_tokens: Option<usize>,
    /// Choices per prompt.
    pub n: usize,
    /// Sampling, logprobs included.
    pub sampling: SamplingParams,
    /// Seed, if given.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep going past eos.
    pub ignore_eos: bool,
    /// Suppress eos before this many tokens.
    pub min_tokens: usize,
    /// End-user id (logged with the request).
    pub user: Option<String>,
}

/// The limits a request is checked against: the server's settings, or the
/// CLI's (which has no server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most stop strings.
    pub max_stop: usize,
    /// Most `logit_bias` entries.
    pub max_logit_bias: usize,
}

impl From<&ServeConfig> for RequestLimits {
    fn from(c: &ServeConfig) -> Self {
        Self { max_tokens: c.max_tokens_limit, max_n: c.max_n, max_stop: c.max_stop, max_logit_bias: c.max_logit_bias }
    }
}

/// The one out-of-vocabulary rule: `id` (from field `param`) must be a token
/// id of a vocabulary of `vocab` tokens.
pub fn token_id(param: &str, id: i64, vocab: usize) -> Result<TokenId, ApiError> {
    if id < 0 || id as u64 >= vocab as u64 {
        return Err(ApiError::invalid(
            param,
            format!("token id {id} in `{param}` is outside the vocabulary ({vocab})"),
        ));
    }
    Ok(id as TokenId)
}

fn range_f(param: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {x}")))
        }
        v => Ok(v.map(|x| x as f32)),
    }
}

fn range_i(param: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {x}")))
        }
        v => Ok(v),
    }
}

impl RawParams {
    /// Applies ranges and the server's limits.
    pub fn validate(self, limits: &RequestLimits, vocab: usize) -> Result<CommonParams, ApiError> {
        let cfg = limits;
        let max_tokens = match self.max_tokens {
            Some((name, v)) => range_i(name, Some(v), 1, cfg.max_tokens as i64)?.map(|v| v as usize),
            None => None,
        };
        let n = range_i("n", self.n, 1, cfg.max_n as i64)?.unwrap_or(1) as usize;
        let top_p = range_f("top_p", self.top_p, 0.0, 1.0)?;
        if top_p == Some(0.0) {
            return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0"));
        }
        if self.stop.len() > cfg.max_stop {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {} stop strings are allowed, got {}", cfg.max_stop, self.stop.len()),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!("stop strings must be at most {MAX_STOP_BYTES} bytes, got one of {}", long.len()),
            ));
        }
        if self.logit_bias.len() > cfg.max_logit_bias {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("at most {} logit_bias entries are allowed", cfg.max_logit_bias),
            ));
        }
        let logit_bias = self
            .logit_bias
            .iter()
            .map(|&(id, b)| {
                let id = token_id("logit_bias", id, vocab)?;
                if !(-100.0..=100.0).contains(&b) {
                    return Err(ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias for {id} must be between -100 and 100"),
                    ));
                }
                Ok((id, b as f32))
            })
            .collect::<Result<_, _>>()?;
        let logprobs = match self.logprobs {
            Some((name, v)) => range_i(name, Some(v), 0, MAX_LOGPROBS)?.map(|v| v as usize),
            None => None,
        };
        let sampling = SamplingParams {
            temperature: range_f("temperature", self.temperature, 0.0, 2.0)?.unwrap_or(1.0),
            top_p: top_p.unwrap_or(1.0),
            top_k: range_i("top_k", self.top_k, -1, i32::MAX as i64)?.map_or(0, |k| k.max(0) as usize),
            min_p: range_f("min_p", self.min_p, 0.0, 1.0)?.unwrap_or(0.0),
            presence_penalty: range_f("presence_penalty", self.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0),
            frequency_penalty: range_f("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0),
            repetition_penalty: range_f("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?.unwrap_or(1.0),
            logit_bias,
            logprobs,
        };
        Ok(CommonParams {
            model: self.model,
            max_tokens,
            n,
            sampling,
            seed: self.seed.map(|s| s as u64),
            stop: self.stop,
            ignore_eos: self.ignore_eos,
            min_tokens: range_i("min_tokens", self.min_tokens, 0, cfg.max_tokens as i64)?.unwrap_or(0) as usize,
            user: self.user,
        })
    }
}

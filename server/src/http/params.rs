//! Parsing request bodies into validated parameters ("parse, don't
//! validate"). Every field is read once by name, so every error names its
//! field, and any field left over is rejected rather than ignored.

use super::error::ApiError;
use crate::config::ServeConfig;
use moe_model::SamplingParams;
use serde_json::{Map, Value};

/// The fields of a JSON object body, consumed one by one.
pub struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    /// Requires a JSON object.
    pub fn new(body: Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Self { map }),
            _ => Err(ApiError::bad_request("The request body must be a JSON object.")),
        }
    }

    /// Removes a field; JSON `null` counts as absent.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// A number within `lo..=hi`.
    pub fn f32_in(&mut self, key: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a number")))? as f32;
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(key, format!("`{key}` must be between {lo} and {hi}, got {x}")));
                }
                Ok(Some(x))
            }
        }
    }

    /// An integer within `lo..=hi`.
    pub fn int_in(&mut self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => {
                let x = v
                    .as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                    .ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be an integer")))?;
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(key, format!("`{key}` must be between {lo} and {hi}, got {x}")));
                }
                Ok(Some(x))
            }
        }
    }

    /// A boolean.
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(ApiError::invalid(key, format!("`{key}` must be a boolean"))),
        }
    }

    /// A string.
    pub fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(key, format!("`{key}` must be a string"))),
        }
    }

    /// Rejects any field not consumed.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.map.into_iter().find(|(_, v)| !v.is_null()) {
            None => Ok(()),
            Some((k, _)) => Err(ApiError::invalid(&k, format!("Unsupported parameter: `{k}`."))),
        }
    }
}

/// Parameters shared by completions and chat completions.
#[derive(Debug, Clone)]
pub struct CommonParams {
    /// The model asked for.
    pub model: Option<String>,
    /// New-token limit, if given.
    pub max_tokens: Option<usize>,
    /// Choices per prompt.
    pub n: usize,
    /// Stream SSE chunks.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Sampling (logprobs filled in by the endpoint).
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

impl CommonParams {
    /// Reads the shared fields; `max_tokens_keys` lists the accepted names
    /// of the token limit, first wins.
    pub fn parse(f: &mut Fields, cfg: &ServeConfig, max_tokens_keys: &[&str]) -> Result<Self, ApiError> {
        let model = f.string("model")?;
        let mut max_tokens = None;
        for k in max_tokens_keys {
            if let Some(v) = f.int_in(k, 1, cfg.max_tokens_limit as i64)? {
                max_tokens.get_or_insert(v as usize);
            }
        }
        let n = f.int_in("n", 1, cfg.max_n as i64)?.unwrap_or(1) as usize;
        let stream = f.bool("stream")?.unwrap_or(false);
        let include_usage = match f.take("stream_options") {
            None => false,
            Some(Value::Object(mut o)) => {
                if !stream {
                    return Err(ApiError::invalid(
                        "stream_options",
                        "`stream_options` is only allowed when `stream` is true",
                    ));
                }
                let v = match o.remove("include_usage") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => b,
                    Some(_) => return Err(ApiError::invalid("stream_options", "`include_usage` must be a boolean")),
                };
                if let Some(k) = o.keys().next() {
                    return Err(ApiError::invalid("stream_options", format!("Unsupported stream option: `{k}`.")));
                }
                v
            }
            Some(_) => return Err(ApiError::invalid("stream_options", "`stream_options` must be an object")),
        };
        let temperature = f.f32_in("temperature", 0.0, 2.0)?;
        let top_p = f.f32_in("top_p", 0.0, 1.0)?;
        if top_p == Some(0.0) {
            return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0"));
        }
        let top_k = f.int_in("top_k", -1, i32::MAX as i64)?.map(|k| k.max(0) as usize).unwrap_or(0);
        let sampling = SamplingParams {
            temperature: temperature.unwrap_or(1.0),
            top_p: top_p.unwrap_or(1.0),
            top_k,
            min_p: f.f32_in("min_p", 0.0, 1.0)?.unwrap_or(0.0),
            presence_penalty: f.f32_in("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
            frequency_penalty: f.f32_in("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
            repetition_penalty: f.f32_in("repetition_penalty", 0.01, 10.0)?.unwrap_or(1.0),
            logit_bias: parse_logit_bias(f.take("logit_bias"), cfg.max_logit_bias)?,
            logprobs: None,
        };
        let seed = f.int_in("seed", i64::MIN, i64::MAX)?.map(|s| s as u64);
        let stop = parse_stop(f.take("stop"), cfg.max_stop)?;
        let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
        let min_tokens = f.int_in("min_tokens", 0, cfg.max_tokens_limit as i64)?.unwrap_or(0) as usize;
        let user = f.string("user")?;
        Ok(Self { model, max_tokens, n, stream, include_usage, sampling, seed, stop, ignore_eos, min_tokens, user })
    }
}

fn parse_stop(v: Option<Value>, max: usize) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|x| match x {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid("stop", "`stop` must be a string or a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or a list of strings")),
    };
    if list.len() > max {
        return Err(ApiError::invalid("stop", format!("at most {max} stop strings are allowed, got {}", list.len())));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(list)
}

fn parse_logit_bias(v: Option<Value>, max: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let Value::Object(m) = v else {
        return Err(ApiError::invalid("logit_bias", "`logit_bias` must be an object mapping token ids to numbers"));
    };
    if m.len() > max {
        return Err(ApiError::invalid("logit_bias", format!("at most {max} logit_bias entries are allowed")));
    }
    m.into_iter()
        .map(|(k, v)| {
            let id: u32 = k
                .parse()
                .map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias key {k:?} is not a token id")))?;
            let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                ApiError::invalid("logit_bias", format!("logit_bias for {k} must be between -100 and 100"))
            })?;
            Ok((id, b as f32))
        })
        .collect()
}

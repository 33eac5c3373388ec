//! Reading a JSON body field by field: each getter checks the JSON type and
//! names the field in its error; fields left over are rejected, never ignored.

use crate::frontend::error::ApiError;
use crate::frontend::params::RawParams;
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

    /// A number.
    pub fn number(&mut self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a number"))),
        }
    }

    /// An integer.
    pub fn int(&mut self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be an integer"))),
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

/// Stream options of an OpenAI request.
pub struct StreamOpts {
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Reads the fields completions and chat share; `max_tokens_keys` lists the
/// accepted names of the token limit, first wins.
pub fn read_common(f: &mut Fields, max_tokens_keys: &[&'static str]) -> Result<(RawParams, StreamOpts), ApiError> {
    let mut max_tokens = None;
    for &k in max_tokens_keys {
        if let Some(v) = f.int(k)? {
            max_tokens.get_or_insert((k, v));
        }
    }
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
    let raw = RawParams {
        model: f.string("model")?,
        max_tokens,
        n: f.int("n")?,
        temperature: f.number("temperature")?,
        top_p: f.number("top_p")?,
        top_k: f.int("top_k")?,
        min_p: f.number("min_p")?,
        presence_penalty: f.number("presence_penalty")?,
        frequency_penalty: f.number("frequency_penalty")?,
        repetition_penalty: f.number("repetition_penalty")?,
        logit_bias: read_logit_bias(f.take("logit_bias"))?,
        seed: f.int("seed")?,
        stop: read_stop(f.take("stop"))?,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        min_tokens: f.int("min_tokens")?,
        user: f.string("user")?,
        logprobs: None,
    };
    Ok((raw, StreamOpts { stream, include_usage }))
}

fn read_stop(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("stop", "`stop` must be a string or a list of strings");
    match v {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(a)) => {
            a.into_iter().map(|x| if let Value::String(s) = x { Ok(s) } else { Err(bad()) }).collect()
        }
        Some(_) => Err(bad()),
    }
}

fn read_logit_bias(v: Option<Value>) -> Result<Vec<(i64, f64)>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let Value::Object(m) = v else {
        return Err(ApiError::invalid("logit_bias", "`logit_bias` must be an object mapping token ids to numbers"));
    };
    m.into_iter()
        .map(|(k, v)| {
            let id = k
                .parse()
                .map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias key {k:?} is not a token id")))?;
            let b = v
                .as_f64()
                .ok_or_else(|| ApiError::invalid("logit_bias", format!("logit_bias for {k} must be a number")))?;
            Ok((id, b))
        })
        .collect()
}

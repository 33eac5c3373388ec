//! Between protobuf messages and the front end's types.

use crate::frontend::error::ApiError;
use crate::frontend::generation::token_text;
use crate::frontend::params::RawParams;
use moe_engine::FinishReason;
use moe_model::{SampledToken, TextCodec};
use moe_proto::v1 as pb;
use std::time::Duration;

/// The generation parameters of a request, for shared validation.
pub fn raw_params(r: &pb::GenerateRequest) -> RawParams {
    RawParams {
        model: Some(r.model.clone()).filter(|m| !m.is_empty()),
        max_tokens: r.max_tokens.map(|v| ("max_tokens", v as i64)),
        n: r.n.map(i64::from),
        temperature: r.temperature.map(f64::from),
        top_p: r.top_p.map(f64::from),
        top_k: r.top_k.map(i64::from),
        min_p: r.min_p.map(f64::from),
        presence_penalty: r.presence_penalty.map(f64::from),
        frequency_penalty: r.frequency_penalty.map(f64::from),
        repetition_penalty: r.repetition_penalty.map(f64::from),
        logit_bias: r.logit_bias.iter().map(|(&k, &v)| (i64::from(k), f64::from(v))).collect(),
        seed: r.seed,
        stop: r.stop.clone(),
        ignore_eos: r.ignore_eos,
        min_tokens: r.min_tokens.map(i64::from),
        user: Some(r.user.clone()).filter(|u| !u.is_empty()),
        logprobs: r.logprobs.map(|v| ("logprobs", v as i64)),
    }
}

/// A token's logprob message.
pub fn logprob(codec: &TextCodec, t: &SampledToken) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: t.id,
        text: token_text(codec, t.id),
        logprob: t.logprob,
        top: t
            .top
            .iter()
            .map(|&(id, lp)| pb::TokenLogprob {
                token_id: id,
                text: token_text(codec, id),
                logprob: lp,
                top: Vec::new(),
            })
            .collect(),
    }
}

/// The finish reason on the gRPC wire (the one mapping; eos and a stop
/// string are both `STOP`, as in OpenAI's API).
pub fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Eos | FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

/// The client's deadline from the `grpc-timeout` header ("<digits><unit>",
/// unit one of H M S m u n).
pub fn deadline(meta: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = meta.get("grpc-timeout") else { return Ok(None) };
    let s = v.to_str().map_err(|_| ApiError::bad_request("malformed grpc-timeout"))?;
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| ApiError::bad_request(format!("malformed grpc-timeout {s:?}")))?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(ApiError::bad_request(format!("malformed grpc-timeout {s:?}"))),
    };
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(deadline(&m).unwrap(), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(deadline(&m).unwrap(), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(deadline(&m).unwrap(), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert!(deadline(&m).is_err());
    }
}

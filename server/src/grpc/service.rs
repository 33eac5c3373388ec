//! `moe.v1.Generation` over the shared front end.

use super::convert;
use crate::frontend::error::ApiError;
use crate::frontend::generation::{self, check_prompt, collect, merge, Choice, Job};
use crate::frontend::params::token_id;
use crate::frontend::state::{AppState, Ready};
use futures_util::stream::{BoxStream, StreamExt};
use moe_engine::metric_names as m;
use moe_proto::v1 as pb;
use moe_proto::v1::generation_server::Generation;
use moe_types::TokenId;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// The service; cheap to clone.
pub struct GenerationApi {
    state: Arc<AppState>,
}

impl GenerationApi {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn ready(&self, model: &str) -> Result<Arc<Ready>, ApiError> {
        let r = self.state.ready()?;
        self.state.check_model(&r, Some(model).filter(|m| !m.is_empty()))?;
        Ok(r)
    }

    /// Validates and submits a generation request.
    async fn start(&self, req: &pb::GenerateRequest) -> Result<Started, ApiError> {
        let started = Instant::now();
        let r = self.ready(&req.model)?;
        let common = convert::raw_params(req).validate(&(&self.state.cfg).into(), r.engine_vocab)?;
        let max_prompt = self.state.cfg.max_prompt_tokens;
        let prompt = match &req.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => {
                check_prompt(generation::encode(&r, t.clone(), true, "text", max_prompt).await?, max_prompt)?
            }
            Some(pb::generate_request::Prompt::TokenIds(ids)) => {
                check_prompt(token_ids(&ids.ids, r.engine_vocab)?, max_prompt)?
            }
            None => return Err(ApiError::invalid("prompt", "set `text` or `token_ids`")),
        };
        let prompt_tokens = prompt.len() * common.n;
        let logprobs = common.sampling.logprobs.is_some();
        let job = Job::new(vec![prompt], &common, 16);
        tracing::debug!(user = common.user.as_deref().unwrap_or(""), choices = common.n, "grpc generate");
        let choices = generation::submit(&r, job, started)?;
        Ok(Started { ready: r, choices, prompt_tokens, logprobs, id: crate::http::new_id("gen") })
    }
}

struct Started {
    ready: Arc<Ready>,
    choices: Vec<Choice>,
    prompt_tokens: usize,
    logprobs: bool,
    id: String,
}

fn usage(prompt: usize, completion: usize) -> pb::Usage {
    pb::Usage {
        prompt_tokens: prompt as u32,
        completion_tokens: completion as u32,
        total_tokens: (prompt + completion) as u32,
    }
}

/// Counts a finished call by method and status code.
fn record<T>(method: &'static str, r: Result<T, Status>) -> Result<T, Status> {
    let code = match &r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    metrics::counter!(m::REQUESTS, "endpoint" => method, "status" => format!("{code:?}"), "protocol" => "grpc")
        .increment(1);
    r
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the deadline passed; generation was stopped")
}

#[tonic::async_trait]
impl Generation for GenerationApi {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let run = async {
            let deadline = convert::deadline(request.metadata())?;
            let s = self.start(request.get_ref()).await?;
            let work = collect(s.choices);
            // answer a little before tonic's own timer (which reports CANCELLED)
            let results = match deadline.map(|d| d.saturating_sub((d / 10).min(std::time::Duration::from_millis(20)))) {
                Some(d) => tokio::time::timeout(d, work).await.map_err(|_| deadline_exceeded())??,
                None => work.await?,
            };
            let completion: usize = results.iter().map(|c| c.tokens.len()).sum();
            let codec = &s.ready.codec;
            let choices = results
                .into_iter()
                .map(|c| pb::Choice {
                    index: c.index as u32,
                    text: c.text,
                    token_ids: c.tokens.iter().map(|t| t.id).collect(),
                    logprobs: if s.logprobs {
                        c.tokens.iter().map(|t| convert::logprob(codec, t)).collect()
                    } else {
                        Vec::new()
                    },
                    finish_reason: convert::finish_reason(c.finish) as i32,
                })
                .collect();
            let response = pb::GenerateResponse {
                id: s.id,
                model: s.ready.model_name.clone(),
                choices,
                usage: Some(usage(s.prompt_tokens, completion)),
            };
            bounded(response, self.state.cfg.max_body_bytes)
        };
        record("Generate", run.await.map(Response::new))
    }

    type GenerateStreamStream = BoxStream<'static, Result<pb::GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let run = async {
            let deadline = convert::deadline(request.metadata())?.map(|d| tokio::time::Instant::now() + d);
            let include_usage = request.get_ref().include_usage;
            let s = self.start(request.get_ref()).await?;
            let state = StreamState {
                pieces: merge(s.choices),
                pending: std::collections::VecDeque::new(),
                codec: s.ready.codec.clone(),
                logprobs: s.logprobs,
                id: s.id,
                prompt_tokens: s.prompt_tokens,
                completion: 0,
                include_usage,
                deadline,
                done: false,
                outcome: None,
            };
            Ok::<_, Status>(futures_util::stream::unfold(state, next_message).boxed())
        };
        // a started stream is counted when it ends (see StreamState's Drop)
        match run.await {
            Ok(stream) => Ok(Response::new(stream)),
            Err(e) => record("GenerateStream", Err(e)),
        }
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let run = async {
            let req = request.into_inner();
            let r = self.ready(&req.model)?;
            let max = self.state.cfg.max_prompt_tokens;
            let ids = generation::encode(&r, req.text, req.add_special_tokens, "text", max).await?;
            let response = pb::TokenizeResponse { token_ids: ids, max_model_len: r.engine.max_model_len() as u32 };
            bounded(response, self.state.cfg.max_body_bytes)
        };
        record("Tokenize", run.await.map(Response::new))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let run = async {
            let req = request.into_inner();
            let r = self.ready(&req.model)?;
            token_ids(&req.token_ids, r.engine_vocab)?;
            let text =
                r.codec.decode(&req.token_ids, false).map_err(|e| ApiError::invalid("token_ids", e.to_string()))?;
            bounded(pb::DetokenizeResponse { text }, self.state.cfg.max_body_bytes)
        };
        record("Detokenize", run.await.map(Response::new))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let run = async {
            let r = self.ready("")?;
            Ok::<_, Status>(pb::ListModelsResponse { models: vec![model_info(&r)] })
        };
        record("ListModels", run.await.map(Response::new))
    }

    async fn model_info(&self, request: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        let run = async {
            let r = self.ready(&request.get_ref().model)?;
            Ok::<_, Status>(model_info(&r))
        };
        record("ModelInfo", run.await.map(Response::new))
    }
}

/// Refuses a response larger than the message-size setting, the bound
/// requests have (`--max-body-bytes`), with OUT_OF_RANGE as for a request
/// over it; clients' default receive limits are no larger.
fn bounded<T: prost::Message>(msg: T, limit: usize) -> Result<T, Status> {
    let n = msg.encoded_len();
    if n > limit {
        return Err(Status::out_of_range(format!(
            "the response would be {n} bytes, over the {limit}-byte message limit (--max-body-bytes); ask for less"
        )));
    }
    Ok(msg)
}

/// `token_ids` checked against the vocabulary (the one rule, `params::token_id`).
fn token_ids(ids: &[u32], vocab: usize) -> Result<Vec<TokenId>, ApiError> {
    ids.iter().map(|&t| token_id("token_ids", t as i64, vocab)).collect()
}

fn model_info(r: &Ready) -> pb::ModelInfo {
    let c = &r.model_config;
    pb::ModelInfo {
        name: r.model_name.clone(),
        architecture: c.arch.name().to_string(),
        num_layers: c.num_layers() as u32,
        num_moe_layers: c.moe_layers().count() as u32,
        num_experts: c.moe.num_experts as u32,
        top_k: c.moe.top_k as u32,
        context_length: r.engine.max_model_len() as u32,
        vocab_size: c.vocab_size as u32,
        hidden_size: c.hidden_size as u32,
    }
}

struct StreamState {
    pieces: futures_util::stream::SelectAll<BoxStream<'static, Result<generation::Piece, ApiError>>>,
    pending: std::collections::VecDeque<pb::generate_stream_response::Event>,
    codec: Arc<moe_model::TextCodec>,
    logprobs: bool,
    id: String,
    prompt_tokens: usize,
    completion: usize,
    include_usage: bool,
    deadline: Option<tokio::time::Instant>,
    done: bool,
    /// How the stream ended; none yet means the client went away.
    outcome: Option<tonic::Code>,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        let code = self.outcome.unwrap_or(tonic::Code::Cancelled);
        metrics::counter!(m::REQUESTS, "endpoint" => "GenerateStream", "status" => format!("{code:?}"), "protocol" => "grpc").increment(1);
    }
}

/// The next stream message: queued events first, then the next piece, then
/// usage. Dropping the stream (cancel) drops the choices and aborts them.
async fn next_message(mut s: StreamState) -> Option<(Result<pb::GenerateStreamResponse, Status>, StreamState)> {
    use pb::generate_stream_response::Event;
    loop {
        if let Some(ev) = s.pending.pop_front() {
            let msg = pb::GenerateStreamResponse { id: s.id.clone(), event: Some(ev) };
            return Some((Ok(msg), s));
        }
        if s.done {
            return None;
        }
        let next = match s.deadline {
            Some(d) => match tokio::time::timeout_at(d, s.pieces.next()).await {
                Ok(p) => p,
                Err(_) => {
                    s.done = true;
                    s.outcome = Some(tonic::Code::DeadlineExceeded);
                    s.pieces = futures_util::stream::select_all(Vec::new()); // abort every choice now
                    return Some((Err(deadline_exceeded()), s));
                }
            },
            None => s.pieces.next().await,
        };
        match next {
            Some(Ok(p)) => {
                if let Some(t) = &p.token {
                    s.completion += 1;
                    let logprob = s.logprobs.then(|| convert::logprob(&s.codec, t));
                    let text = if p.finish.is_some() { String::new() } else { p.text.clone() };
                    s.pending.push_back(Event::Token(pb::TokenEvent {
                        index: p.index as u32,
                        token_id: t.id,
                        text,
                        logprob,
                    }));
                }
                if let Some(f) = p.finish {
                    let text = if p.token.is_some() { p.text } else { p.text.clone() };
                    s.pending.push_back(Event::Finish(pb::FinishEvent {
                        index: p.index as u32,
                        text,
                        finish_reason: convert::finish_reason(f) as i32,
                    }));
                }
            }
            Some(Err(e)) => {
                s.done = true;
                let status: Status = e.into();
                s.outcome = Some(status.code());
                return Some((Err(status), s));
            }
            None => {
                s.done = true;
                s.outcome = Some(tonic::Code::Ok);
                if s.include_usage {
                    s.pending.push_back(Event::Usage(usage(s.prompt_tokens, s.completion)));
                }
            }
        }
    }
}

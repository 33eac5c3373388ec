//! The engine: one thread that owns the model, the experts, the KV cache and
//! the scheduler, and turns requests into token events.
//!
//! Owns: [`EngineCore`] (a deterministic step function: schedule, forward,
//! sample, update -- testable without threads) and [`EngineHandle`] (the
//! thread around it, fed through a bounded channel; each request gets a
//! bounded stream of [`EngineEvent`]s back, and dropping the stream aborts
//! the request and frees its KV blocks).
//!
//! Not here: tokenization, stop strings, wire formats (the server does
//! those). Invariant: all mutable serving state lives on the engine thread;
//! other threads only send messages or read atomic gauges.

mod core;
mod handle;
pub mod metric_names;

pub use crate::core::{EngineCore, StepOutput};
pub use handle::{spawn_engine, EngineHandle, EngineLimits, EngineStats, RequestStream, TraceSink};

use moe_model::{SampledToken, SamplingParams};
use moe_types::TokenId;

/// A validated generation request, in tokens.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<TokenId>,
    /// How to choose tokens.
    pub sampling: SamplingParams,
    /// RNG seed.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Eos is suppressed until this many tokens were generated.
    pub min_tokens: usize,
    /// Keep generating past eos.
    pub ignore_eos: bool,
}

/// Why a sequence ended: one type from the engine to every wire format
/// (REST and gRPC each map it once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An eos token was generated.
    Eos,
    /// `max_tokens` or the context length was reached.
    Length,
    /// A stop string matched (decided by the front end, which detokenizes;
    /// the engine itself never reports it).
    Stop,
}

/// What a request's stream carries.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// A generated token (eos included, when it ends the sequence).
    Token(SampledToken),
    /// The sequence ended; no more events follow.
    Finished(FinishReason),
    /// The sequence failed; no more events follow.
    Error(EngineError),
}

/// Why a request was not accepted, or why its sequence failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// Too many requests in flight.
    #[error("the server is at capacity ({0} requests in flight); retry later")]
    QueueFull(usize),
    /// The engine is shutting down or gone.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The prompt and `max_tokens` exceed the context.
    #[error("this request needs {needed} tokens (prompt {prompt} + max_tokens {max_tokens}) but the context length is {limit}")]
    ContextLength {
        /// prompt + max_tokens.
        needed: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// The request is malformed (empty prompt, bad token id).
    #[error("{0}")]
    Invalid(String),
    /// A scheduler setting that cannot work (micro-batching).
    #[error(transparent)]
    Scheduler(#[from] moe_scheduler::SchedulerError),
    /// A step could not get an expert's weights (the slow tier is unreadable
    /// now); the sequence failed, a retry may succeed.
    #[error("expert {expert} of layer {layer} is unavailable: {message}")]
    ExpertUnavailable {
        /// Decoder layer.
        layer: usize,
        /// Expert index.
        expert: usize,
        /// Why (the file and the IO error).
        message: String,
    },
    /// The forward step failed for another reason (a bug or a corrupt model).
    #[error("the forward step failed: {0}")]
    Step(String),
}

impl From<&moe_model::ModelError> for EngineError {
    /// The cause of a failed step, as each of its sequences reports it.
    fn from(e: &moe_model::ModelError) -> Self {
        match e {
            moe_model::ModelError::ExpertUnavailable { layer, expert, message } => {
                Self::ExpertUnavailable { layer: *layer, expert: *expert, message: message.clone() }
            }
            other => Self::Step(other.to_string()),
        }
    }
}

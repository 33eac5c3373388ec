//! State shared by the HTTP and gRPC servers: configuration, the loaded
//! model (once ready), the metrics handle, the shutdown flag.

use super::error::ApiError;
use crate::config::ServeConfig;
use crate::http::ChatTemplate;
use metrics_exporter_prometheus::PrometheusHandle;
use moe_engine::EngineHandle;
use moe_model::TextCodec;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Everything handlers need once the model is loaded.
pub struct Ready {
    /// The engine.
    pub engine: EngineHandle,
    /// Tokenizer and special tokens.
    pub codec: Arc<TextCodec>,
    /// The compiled chat template, if the checkpoint has one.
    pub template: Option<ChatTemplate>,
    /// Name clients use.
    pub model_name: String,
    /// Unix time the model was loaded.
    pub created: u64,
    /// Model vocabulary size.
    pub engine_vocab: usize,
    /// The harmony markup, when the tokenizer has it (gpt-oss): chat
    /// completions then split reasoning from the answer.
    pub harmony: Option<super::harmony::HarmonyTokens>,
    /// The model's configuration.
    pub model_config: moe_model::ModelConfig,
    /// Bounds how many tokenizations run at once (each costs memory in
    /// proportion to its text), whatever the number of requests arriving.
    pub tokenize_permits: Arc<tokio::sync::Semaphore>,
}

/// Shared state of the HTTP server.
pub struct AppState {
    /// Resolved configuration.
    pub cfg: ServeConfig,
    ready: OnceLock<Arc<Ready>>,
    pub(crate) metrics: PrometheusHandle,
    shutting_down: AtomicBool,
}

impl AppState {
    /// State for a server whose model is not loaded yet.
    pub fn new(cfg: ServeConfig, metrics: PrometheusHandle) -> Arc<Self> {
        Arc::new(Self { cfg, ready: OnceLock::new(), metrics, shutting_down: AtomicBool::new(false) })
    }

    /// Marks the model loaded; `/health` turns 200.
    pub fn set_ready(&self, ready: Ready) {
        let _ = self.ready.set(Arc::new(ready));
    }

    /// Stops admitting requests (503) while in-flight ones finish.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        if let Some(r) = self.ready.get() {
            r.engine.close();
        }
    }

    /// The grace period is over: every stream still running ends now with
    /// an error event saying so (SSE: an error chunk and a clean end; gRPC:
    /// UNAVAILABLE), instead of being cut off when the process exits.
    pub fn cut_streams(&self) {
        if let Some(r) = self.ready.get() {
            r.engine.cut_all();
        }
    }

    /// The loaded model, or 503.
    pub fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ApiError::unavailable("The server is shutting down."));
        }
        self.ready.get().cloned().ok_or_else(|| ApiError::unavailable("The model is still loading."))
    }

    /// Resolves the `model` field: absent means the served model.
    pub fn check_model(&self, ready: &Ready, asked: Option<&str>) -> Result<(), ApiError> {
        match asked {
            Some(name) if name != ready.model_name => Err(ApiError::model_not_found(name)),
            _ => Ok(()),
        }
    }
}

impl AppState {
    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Requests the engine has not finished (0 before the model is loaded).
    pub fn in_flight(&self) -> usize {
        self.ready.get().map_or(0, |r| r.engine.stats().in_flight.load(Ordering::Acquire))
    }
}

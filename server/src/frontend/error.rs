//! The one mapping from failures to OpenAI-style HTTP errors:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moe_engine::EngineError;
use serde_json::json;

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The offending request field, if any.
    pub param: Option<String>,
    /// Machine-readable code, if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 naming a request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param.to_string()), code: None }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: None, code: None }
    }

    /// 404 for a model we do not serve.
    pub fn model_not_found(name: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{name}` does not exist."),
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 503: loading or shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), param: None, code: None }
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Missing or invalid API key (send `Authorization: Bearer <key>`).".into(),
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 500 (a bug or a failed computation; never for bad input).
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), param: None, code: None }
    }

    /// The OpenAI `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 408 | 413 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_exceeded",
            503 => "service_unavailable",
            _ => "internal_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::QueueFull(_) => {
                Self { status: StatusCode::TOO_MANY_REQUESTS, message, param: None, code: None }
            }
            EngineError::ShuttingDown => Self::unavailable(message),
            EngineError::ContextLength { .. } => Self {
                status: StatusCode::BAD_REQUEST,
                message,
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            },
            EngineError::Invalid(_) => Self::invalid("prompt", message),
            EngineError::Scheduler(_) => Self::internal(message),
            EngineError::ExpertUnavailable { .. } => Self::unavailable(format!("generation failed: {message}")),
            EngineError::Step(_) => Self::internal(format!("generation failed: {message}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        r.extensions_mut().insert(self);
        r
    }
}

/// The headers a status promises: `WWW-Authenticate: Bearer` on 401 (RFC
/// 7235), `Retry-After` (seconds) on 429 and 503.
pub fn add_status_headers(r: &mut Response) {
    use axum::http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
    match r.status() {
        StatusCode::UNAUTHORIZED => {
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        _ => {}
    }
}

/// What `Retry-After` asks of a client refused for load or unavailability.
pub const RETRY_AFTER_SECS: &str = "1";

impl From<ApiError> for tonic::Status {
    /// The gRPC side of the one error mapping: the field, when known, leads
    /// the message of INVALID_ARGUMENT.
    fn from(e: ApiError) -> Self {
        let msg = match &e.param {
            Some(p) => format!("{p}: {}", e.message),
            None => e.message.clone(),
        };
        match e.status.as_u16() {
            400 => tonic::Status::invalid_argument(msg),
            401 => tonic::Status::unauthenticated(msg),
            404 => tonic::Status::not_found(msg),
            413 | 429 => tonic::Status::resource_exhausted(msg),
            503 => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

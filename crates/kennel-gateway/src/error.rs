//! The one error type at the gateway's HTTP edge. Each error knows its status and renders
//! itself in the client's API format (OpenAI or Anthropic), so SDKs surface the message.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API a client speaks; errors and stream error events are shaped accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFormat {
    Openai,
    Anthropic,
}

impl ApiFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiFormat::Openai => "openai",
            ApiFormat::Anthropic => "anthropic",
        }
    }

    /// A JSON error body in this format.
    pub fn error_body(self, kind: &str, message: &str) -> serde_json::Value {
        match self {
            ApiFormat::Openai => {
                json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
            }
            ApiFormat::Anthropic => {
                json!({"type": "error", "error": {"type": kind, "message": message}})
            }
        }
    }

    /// The SSE event that ends a broken stream cleanly, in this format.
    pub fn stream_error_event(self, message: &str) -> String {
        match self {
            ApiFormat::Openai => format!(
                "data: {}\n\n",
                self.error_body("upstream_stream_error", message)
            ),
            ApiFormat::Anthropic => format!(
                "event: error\ndata: {}\n\n",
                self.error_body("api_error", message)
            ),
        }
    }
}

/// An error answered by the gateway itself (not an upstream's response passed through).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GatewayError {
    pub status: StatusCode,
    /// Machine-readable kind (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    pub message: String,
    pub format: ApiFormat,
    /// Seconds after which a rate-limited client may retry.
    pub retry_after: Option<u64>,
}

impl GatewayError {
    pub fn new(
        format: ApiFormat,
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        GatewayError {
            status,
            kind,
            message: message.into(),
            format,
            retry_after: None,
        }
    }

    pub fn bad_request(format: ApiFormat, message: impl Into<String>) -> Self {
        Self::new(
            format,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message,
        )
    }

    pub fn status_code(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let body = self.format.error_body(self.kind, &self.message).to_string();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = s.to_string().parse() {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

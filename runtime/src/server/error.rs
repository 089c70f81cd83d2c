//! Errors in each provider's JSON shape.
//!
//! OpenAI clients read `{"error": {"message","type","param","code"}}`;
//! Anthropic clients read `{"type":"error","error":{"type","message"}}`. The
//! official SDKs turn these into typed exceptions by status code, so the
//! status matters as much as the body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Which provider's conventions a response follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub flavor: Flavor,
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one (OpenAI's `param`).
    pub param: Option<String>,
    /// A machine-readable code (OpenAI's `code`), e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(flavor: Flavor, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            flavor,
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn bad_request(flavor: Flavor, message: impl Into<String>) -> Self {
        Self::new(flavor, StatusCode::BAD_REQUEST, message)
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The error `type` string each provider uses for this status.
    fn kind(&self) -> &'static str {
        match (self.flavor, self.status.as_u16()) {
            (Flavor::OpenAi, 400 | 404 | 413 | 422) => "invalid_request_error",
            (Flavor::OpenAi, 401) => "authentication_error",
            (Flavor::OpenAi, 429) => "rate_limit_error",
            (Flavor::OpenAi, _) => "server_error",
            (Flavor::Anthropic, 400 | 422) => "invalid_request_error",
            (Flavor::Anthropic, 401) => "authentication_error",
            (Flavor::Anthropic, 404) => "not_found_error",
            (Flavor::Anthropic, 413) => "request_too_large",
            (Flavor::Anthropic, 429) => "rate_limit_error",
            (Flavor::Anthropic, 529 | 503) => "overloaded_error",
            (Flavor::Anthropic, _) => "api_error",
        }
    }

    /// The JSON body, also used as the payload of an SSE `error` event.
    pub fn body(&self) -> serde_json::Value {
        match self.flavor {
            Flavor::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }}),
            Flavor::Anthropic => {
                json!({"type": "error", "error": {"type": self.kind(), "message": self.message}})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        resp.extensions_mut()
            .insert(super::access::ErrorNote(self.message.clone()));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue drains one generation at a time; clients (the
            // official SDKs, Claude Code) wait this long before retrying.
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

/// Parses a request body, naming the field at fault in the error
/// (`messages[0].content`), as the providers do.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    flavor: Flavor,
    bytes: &[u8],
) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            flavor,
            "request body is empty; expected a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let what = if inner.is_syntax() || inner.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        if path.is_empty() || path == "." {
            ApiError::bad_request(flavor, format!("{what}: {inner}"))
        } else {
            ApiError::bad_request(flavor, format!("{what} at `{path}`: {inner}")).param(path)
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(flavor, format!("malformed JSON: {e}")))?;
    Ok(value)
}

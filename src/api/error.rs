//! The API's errors: each one a status and a JSON body that names the problem.
//!
//! Body: `{"error": {"code": "unknown_queue", "message": "…", …details}}`. `code` is stable
//! (clients branch on it); `message` is for people.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::broker::BrokerError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields of the error object (`known` queues, `byte` of a JSON error, …).
    pub details: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.details.insert(key.to_string(), value.into());
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_task", message)
    }

    /// Malformed JSON in `text`, with the byte offset, line and column of the problem.
    pub fn bad_json(what: &str, text: &str, e: &serde_json::Error) -> ApiError {
        let byte = crate::submission::byte_offset(text, e.line(), e.column());
        ApiError::bad_request(
            "bad_json",
            format!(
                "malformed JSON in {what} at byte {byte} (line {}, column {}): {}",
                e.line(),
                e.column(),
                crate::submission::strip_position(&e.to_string())
            ),
        )
        .with("byte", byte)
        .with("line", e.line())
        .with("column", e.column())
    }

    pub fn draining() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the daemon is shutting down and accepts no requests; retry against another node or after it restarts",
        )
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> ApiError {
        let (status, code) = match &e {
            BrokerError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            BrokerError::NotFound(_) => (StatusCode::NOT_FOUND, "task_not_found"),
            BrokerError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            BrokerError::LeaseLost(_) => (StatusCode::CONFLICT, "conflict"),
            BrokerError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "broker_error"),
            BrokerError::Full(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_full"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut obj = Map::new();
        obj.insert("code".into(), Value::from(self.code));
        obj.insert("message".into(), Value::from(self.message));
        obj.extend(self.details);
        let mut resp = (self.status, axum::Json(json!({ "error": obj }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"taskd\""),
            );
        }
        resp
    }
}

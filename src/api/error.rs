//! The API's errors: each one a status and a JSON body that names the problem.
//!
//! Body: `{"error": {"code": "unknown_queue", "message": "…", …details}}`. `code` is stable
//! (clients branch on it); `message` is for people.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::broker::BrokerError;

/// The body of every error answer (the OpenAPI document's `Error`).
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject {
    pub code: &'static str,
    pub message: String,
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

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
    pub fn bad_json(what: &str, text: &str, error: &serde_json::Error) -> ApiError {
        let byte = crate::submission::byte_offset(text, error.line(), error.column());
        ApiError::bad_request(
            "bad_json",
            format!(
                "malformed JSON in {what} at byte {byte} (line {}, column {}): {}",
                error.line(),
                error.column(),
                crate::submission::strip_position(&error.to_string())
            ),
        )
        .with("byte", byte)
        .with("line", error.line())
        .with("column", error.column())
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
    fn from(error: BrokerError) -> ApiError {
        let (status, code) = match &error {
            BrokerError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            BrokerError::NotFound(_) => (StatusCode::NOT_FOUND, "task_not_found"),
            BrokerError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            BrokerError::LeaseLost(_) => (StatusCode::CONFLICT, "conflict"),
            BrokerError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "broker_error"),
            BrokerError::Full(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_full"),
        };
        ApiError::new(status, code, error.to_string())
    }
}

impl ApiError {
    pub fn body(self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"taskd\""),
            );
        }
        resp
    }
}

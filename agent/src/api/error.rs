//! The one mapping from error codes to HTTP statuses and error bodies.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use vibstage_protocol::ErrorCode;
use vibstage_protocol::api::{ErrorBody, ErrorDetail};

use crate::agent::AgentError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: Option<StatusCode>,
    detail: ErrorDetail,
}

impl ApiError {
    /// An error whose HTTP status follows from its code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: None,
            detail: ErrorDetail::new(code, message),
        }
    }

    /// An error with an explicit HTTP status (413, 415, 405 …).
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: Some(status),
            detail: ErrorDetail::new(code, message),
        }
    }
}

/// The HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Busy => StatusCode::CONFLICT,
        ErrorCode::SignatureInvalid
        | ErrorCode::UntrustedKey
        | ErrorCode::ImageExpired
        | ErrorCode::RollbackRefused
        | ErrorCode::AcceptanceTooLow
        | ErrorCode::Incompatible => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ChecksumMismatch | ErrorCode::SizeMismatch | ErrorCode::DepotUnreachable => {
            StatusCode::BAD_GATEWAY
        }
        ErrorCode::InsufficientSpace => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        Self {
            status: None,
            detail: e.0,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| status_of(self.detail.code));
        (status, Json(ErrorBody { error: self.detail })).into_response()
    }
}

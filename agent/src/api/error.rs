//! The one mapping from errors to SPEC error codes, HTTP statuses and error bodies (Firecracker's
//! `VmmActionError` turned into a response in one function): [`detail_of`] chooses the code of
//! every lifecycle error, [`status_of`] the status of every code. Nothing below the API chooses
//! either; a failed task records what [`detail_of`] says (the agent is handed it at start-up).

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use vibstage_protocol::ErrorCode;
use vibstage_protocol::api::{ErrorBody, ErrorDetail};

use crate::agent::LifecycleError;
use crate::fetch::FetchError;
use crate::install::InstallError;
use crate::remediate::RemediateError;
use crate::stage::StageError;
use crate::store::StoreError;

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

/// The SPEC error code and message of a lifecycle error: the one place codes are chosen.
pub fn detail_of(e: &LifecycleError) -> ErrorDetail {
    fn store(e: &StoreError) -> ErrorCode {
        match e {
            StoreError::Checksum { .. } => ErrorCode::ChecksumMismatch,
            StoreError::Size { .. } => ErrorCode::SizeMismatch,
            StoreError::NoSpace { .. } => ErrorCode::InsufficientSpace,
            _ => ErrorCode::Internal,
        }
    }
    fn fetch(e: &FetchError) -> ErrorCode {
        match e {
            FetchError::BadDepot { .. } => ErrorCode::BadRequest,
            FetchError::Unreachable { .. } => ErrorCode::DepotUnreachable,
            FetchError::Store(e) => store(e),
            // The bytes do not match their descriptor (issue 14).
            FetchError::NotTheVib { .. } => ErrorCode::ChecksumMismatch,
            // The code every depot agrees on, else `depot_unreachable`.
            FetchError::EveryDepot { failures } => {
                let mut codes = failures.iter().map(|(_, e)| fetch(e));
                match codes.next() {
                    Some(first) if codes.all(|c| c == first) => first,
                    _ => ErrorCode::DepotUnreachable,
                }
            }
        }
    }
    fn stage(e: &StageError) -> ErrorCode {
        match e {
            StageError::NoSpace { .. } => ErrorCode::InsufficientSpace,
            StageError::Fetch { source, .. } => fetch(source),
            StageError::Depot(source) => fetch(source),
            StageError::Store(e) => store(e),
            StageError::Incomplete { .. } => ErrorCode::Internal,
        }
    }
    let code = match e {
        LifecycleError::Verify(e) => e.code(),
        LifecycleError::Stage(e) => stage(e),
        LifecycleError::Store(e) => store(e),
        LifecycleError::Fetch(e) => fetch(e),
        LifecycleError::Remediate(e) => match e {
            RemediateError::Stage(e) => stage(e),
            RemediateError::Store(e) => store(e),
            // SPEC behaviour since the first remediation: a stage that could not fetch
            // everything is reported as the depot's failure.
            RemediateError::Incomplete { .. } => ErrorCode::DepotUnreachable,
            RemediateError::Maintenance(_) => ErrorCode::MaintenanceFailed,
            RemediateError::Install(InstallError::Failed(_)) => ErrorCode::InstallFailed,
            RemediateError::Install(InstallError::Task(_))
            | RemediateError::SaveState(_)
            | RemediateError::RecordVanished { .. }
            | RemediateError::Record { .. } => ErrorCode::Internal,
        },
        LifecycleError::Busy { .. } | LifecycleError::BusyStaging { .. } => ErrorCode::Busy,
        LifecycleError::NotStaged(_) => ErrorCode::NotFound,
        LifecycleError::Incompatible { .. } => ErrorCode::Incompatible,
        LifecycleError::DepotCount { .. } => ErrorCode::BadRequest,
        LifecycleError::SaveState(_) | LifecycleError::Interrupted { .. } => ErrorCode::Internal,
    };
    ErrorDetail::new(code, e.to_string())
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        Self {
            status: None,
            detail: detail_of(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| status_of(self.detail.code));
        (status, Json(ErrorBody { error: self.detail })).into_response()
    }
}

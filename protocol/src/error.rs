//! Error codes of SPEC §5 and the verification error that maps onto them.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::types::{AcceptanceLevel, KeyId, Name};

/// The machine-readable error codes of the API (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    SignatureInvalid,
    UntrustedKey,
    ImageExpired,
    RollbackRefused,
    AcceptanceTooLow,
    Incompatible,
    ChecksumMismatch,
    SizeMismatch,
    DepotUnreachable,
    InsufficientSpace,
    Busy,
    NotFound,
    Cancelled,
    MaintenanceFailed,
    InstallFailed,
    Internal,
}

impl ErrorCode {
    /// The snake_case spelling used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::SignatureInvalid => "signature_invalid",
            ErrorCode::UntrustedKey => "untrusted_key",
            ErrorCode::ImageExpired => "image_expired",
            ErrorCode::RollbackRefused => "rollback_refused",
            ErrorCode::AcceptanceTooLow => "acceptance_too_low",
            ErrorCode::Incompatible => "incompatible",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::SizeMismatch => "size_mismatch",
            ErrorCode::DepotUnreachable => "depot_unreachable",
            ErrorCode::InsufficientSpace => "insufficient_space",
            ErrorCode::Busy => "busy",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::MaintenanceFailed => "maintenance_failed",
            ErrorCode::InstallFailed => "install_failed",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which kind of document was being verified, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocKind {
    /// An image envelope.
    Image,
    /// A VIB descriptor envelope.
    Vib,
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DocKind::Image => "image",
            DocKind::Vib => "VIB descriptor",
        })
    }
}

/// Why signed content was refused. Each variant maps to exactly one [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The envelope says it carries something else.
    #[error("{doc} envelope has payloadType {found:?}, expected {expected:?}")]
    WrongPayloadType {
        /// What was being verified.
        doc: DocKind,
        /// The payload type required.
        expected: &'static str,
        /// The payload type found.
        found: String,
    },
    /// No signature is by a key trusted for this kind of document.
    #[error("{doc} is not signed by any key trusted to sign it (signed by: {keyids})")]
    UntrustedKey {
        /// What was being verified.
        doc: DocKind,
        /// The key ids that did sign, comma-separated (or "nobody").
        keyids: String,
    },
    /// A trusted key's signature does not verify.
    #[error("{doc} signature by key {keyid} does not verify")]
    SignatureInvalid {
        /// What was being verified.
        doc: DocKind,
        /// The key whose signature failed.
        keyid: KeyId,
    },
    /// Too few distinct trusted keys signed.
    #[error("{doc} is signed by {found} distinct trusted key(s), {needed} required")]
    ThresholdNotMet {
        /// What was being verified.
        doc: DocKind,
        /// Distinct trusted keys whose signatures verified.
        found: usize,
        /// Distinct keys required.
        needed: usize,
    },
    /// The payload is not a valid document of its type.
    #[error("{doc} payload is malformed: {detail}")]
    Malformed {
        /// What was being verified.
        doc: DocKind,
        /// What is wrong.
        detail: String,
    },
    /// The image has expired.
    #[error("image {name} expired at {expires}")]
    Expired {
        /// Image name.
        name: Name,
        /// When it expired.
        expires: OffsetDateTime,
    },
    /// The image is older than one already accepted under the same name.
    #[error("image {name} serial {serial} is below serial {highest} already accepted")]
    Rollback {
        /// Image name.
        name: Name,
        /// The serial offered.
        serial: u64,
        /// The highest serial accepted before.
        highest: u64,
    },
    /// The descriptor claims a level its signer may not vouch for.
    #[error("VIB {vib} claims acceptance {level}, but its signer(s) may only sign up to {max}")]
    SignerLevel {
        /// VIB name.
        vib: Name,
        /// The level claimed.
        level: AcceptanceLevel,
        /// The highest level any verifying signer may sign.
        max: AcceptanceLevel,
    },
    /// The VIB is below the host's acceptance level.
    #[error("VIB {vib} has acceptance {level}, below the host's level {host}")]
    AcceptanceTooLow {
        /// VIB name.
        vib: Name,
        /// The VIB's level.
        level: AcceptanceLevel,
        /// The host's level.
        host: AcceptanceLevel,
    },
}

impl VerifyError {
    /// The API error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            VerifyError::WrongPayloadType { .. } | VerifyError::Malformed { .. } => {
                ErrorCode::BadRequest
            }
            VerifyError::UntrustedKey { .. }
            | VerifyError::SignerLevel { .. }
            | VerifyError::ThresholdNotMet { .. } => ErrorCode::UntrustedKey,
            VerifyError::SignatureInvalid { .. } => ErrorCode::SignatureInvalid,
            VerifyError::Expired { .. } => ErrorCode::ImageExpired,
            VerifyError::Rollback { .. } => ErrorCode::RollbackRefused,
            VerifyError::AcceptanceTooLow { .. } => ErrorCode::AcceptanceTooLow,
        }
    }
}

/// `text` without Rust's " (os error N)" suffix: an operator reads the system's words, the number
/// adds nothing.
pub fn without_os_error(text: String) -> String {
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}

/// An error and its causes, outermost first, joined with ": ", each [`without_os_error`]: the
/// one way the agent's logs and the controller's messages show an error chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = Some(e);
    while let Some(inner) = cur {
        parts.push(without_os_error(inner.to_string()));
        cur = inner.source();
    }
    parts.join(": ")
}

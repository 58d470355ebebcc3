//! vibstage protocol: the names, documents and wire types of SPEC §1, §2 and §5, and the
//! verification rule that decides whether an agent accepts an image.
//!
//! This crate does no I/O: it parses, signs and verifies bytes that its callers read and write.
//! Everything a peer sends is parsed into validated types ([`Digest`], [`AcceptanceLevel`],
//! [`Name`], …) so that code further in never sees an unchecked string.

pub mod api;
pub mod config;
pub mod dsse;
pub mod error;
pub mod keys;
pub mod model;
pub mod trust;
pub mod types;
pub mod version;

pub use dsse::{Envelope, Signature};
pub use error::{ErrorCode, VerifyError};
pub use model::{Component, Image, VibDescriptor, VibKind, VibTarget};
pub use trust::{KeyRole, TrustStore, TrustedKey, VerifiedImage, VerifiedVib, verify_image};
pub use types::{AcceptanceLevel, Digest, HostId, ImageDigest, KeyId, Name};
pub use version::Version;

/// DSSE payload type of a signed VIB descriptor.
pub const VIB_PAYLOAD_TYPE: &str = "application/vnd.vibstage.vib+json";
/// DSSE payload type of a signed image.
pub const IMAGE_PAYLOAD_TYPE: &str = "application/vnd.vibstage.image+json";

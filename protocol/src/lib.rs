//! vibstage protocol: the names, documents and wire types of SPEC §1, §2 and §5, and the
//! verification rule that decides whether an agent accepts an image.
//!
//! This crate does no I/O: it parses, signs and verifies bytes that its callers read and write.
//! Everything a peer sends is parsed into validated types ([`Digest`], [`AcceptanceLevel`],
//! [`Name`], …) so that code further in never sees an unchecked string.

/// `as_str()` for a fieldless wire enum: the name serde writes (`snake_case`), without going
/// through serde. `protocol/src/api.rs`'s tests check the two agree for every variant.
macro_rules! wire_names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The name on the wire, as serde writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }
    };
}

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

//! Real ESXi content: `.vib` archives and offline bundles (issue 14).
//!
//! A `.vib` is an `ar` archive whose first member is `descriptor.xml` (what the VIB declares about
//! itself: name, version, vendor, acceptance level, maintenance and live-install flags, and the
//! checksums of every payload), then `sig.pkcs7` (empty for unsigned community VIBs), then the
//! payload members. An offline bundle is a zip: `index.xml` → `vendor-index.xml` →
//! `metadata.zip` (bulletins naming components, VIB descriptors, base images, add-ons), with the
//! VIBs under `vib20/<name>/`.
//!
//! - [`reader::read_vib`] streams a `.vib` once: it parses the ar container and the descriptor,
//!   checks every payload's size and every declared checksum (of the bytes as stored and, for
//!   `verify-process="gunzip"`, of the decompressed bytes, with bounded expansion), and hashes
//!   the whole file, which is what the vibstage descriptor then signs.
//! - [`bundle::Bundle`] reads an offline bundle's metadata and hands out its VIBs.
//! - [`sniff::PrefixCheck`] is the agent's side: while a blob streams in, it looks at the first
//!   ar member only (a few KiB) and checks that the VIB names itself as its signed vibstage
//!   descriptor does. Payload checksums are not checked again there: they were checked at
//!   import and are bound by the whole-file sha256 that the vendor key signs.
//!
//! Every refusal is a [`VibError`] that names the member, payload or entry and what is wrong.
//! Every size and count that comes from the input is bounded by [`Limits`]. This module depends
//! only on the protocol crate and the format crates (quick-xml, zip, flate2, sha1/sha2), so the
//! fuzz crate compiles it as it is.

pub mod ar;
pub mod bundle;
pub mod descriptor;
pub mod reader;
pub mod sniff;
pub mod xml;

pub use bundle::Bundle;
pub use descriptor::{Payload, VibXml};
pub use reader::{Vib, read_descriptor, read_vib};
pub use sniff::{PrefixCheck, VibIdentity};

/// Bounds on what a VIB or bundle may make the reader do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `descriptor.xml` (also the most the agent buffers per download to check it).
    pub max_descriptor: u64,
    /// Largest `sig.pkcs7`.
    pub max_signature: u64,
    /// Most ar members in one VIB.
    pub max_members: usize,
    /// Largest whole `.vib` file.
    pub max_vib_bytes: u64,
    /// Most bytes a gunzipped payload (or a zip entry) may expand to per stored byte.
    pub max_ratio: u64,
    /// Most bytes one gunzipped payload may expand to, whatever its ratio.
    pub max_expanded: u64,
    /// Most entries in a bundle (or its metadata.zip).
    pub max_entries: usize,
    /// Largest metadata.zip read into memory from a bundle.
    pub max_metadata: u64,
    /// Largest XML document of a bundle (`index.xml`, a vendor index, a bulletin or VIB record):
    /// real ones are a few KiB, and a parsed document takes several times its size.
    pub max_xml: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_descriptor: 1 << 20,
            max_signature: 1 << 20,
            max_members: 1024,
            max_vib_bytes: 64 << 30,
            max_ratio: 200,
            max_expanded: 64 << 30,
            max_entries: 100_000,
            max_metadata: 64 << 20,
            max_xml: 4 << 20,
        }
    }
}

/// Why a VIB or bundle was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VibError {
    /// The file does not start with `!<arch>\n`.
    #[error("not a VIB: not an ar archive (it does not start with \"!<arch>\\n\")")]
    NotAr,
    /// The ar container is malformed (bad header, truncated member).
    #[error("malformed ar archive at byte {offset}: {detail}")]
    Ar {
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A member or entry name could act as a path or is otherwise unusable.
    #[error("refusing member name {name:?}: {reason}")]
    BadName {
        /// The name as found (cut to 80 characters).
        name: String,
        /// What is wrong, in words for the operator (the message ends with it).
        reason: &'static str,
    },
    /// Two members or entries have the same name.
    #[error("duplicate member {name:?}")]
    Duplicate {
        /// The name.
        name: String,
    },
    /// The first member is not `descriptor.xml`.
    #[error("descriptor.xml missing: the first ar member is {first:?}")]
    DescriptorMissing {
        /// What the first member was ("" for an empty archive).
        first: String,
    },
    /// `descriptor.xml` is not a usable VIB descriptor.
    #[error("malformed descriptor.xml: {0}")]
    Descriptor(String),
    /// A payload the descriptor declares is not in the archive.
    #[error("payload {name:?} declared in descriptor.xml is missing from the archive")]
    PayloadMissing {
        /// The payload name.
        name: String,
    },
    /// A member is neither the descriptor, the signature nor a declared payload.
    #[error("member {name:?} is not a payload that descriptor.xml declares")]
    Undeclared {
        /// The member name.
        name: String,
    },
    /// A payload's size differs from the declared one.
    #[error("payload {name:?} is {actual} bytes, descriptor.xml declares {declared}")]
    Size {
        /// The payload.
        name: String,
        /// Declared size.
        declared: u64,
        /// Size in the archive.
        actual: u64,
    },
    /// A payload's checksum differs from the declared one.
    #[error(
        "payload {name:?}: {algorithm} checksum of its {which} bytes is {actual}, descriptor.xml declares {declared}"
    )]
    Checksum {
        /// The payload.
        name: String,
        /// `stored` or `gunzipped`.
        which: &'static str,
        /// `sha-256`, `sha-1`, …
        algorithm: String,
        /// Declared hex.
        declared: String,
        /// Computed hex.
        actual: String,
    },
    /// A checksum type or verify process the reader cannot check.
    #[error("payload {name:?}: cannot check {what} {value:?}")]
    Unsupported {
        /// The payload.
        name: String,
        /// `checksum type` or `verify-process`.
        what: &'static str,
        /// The declared value.
        value: String,
    },
    /// A gunzip check failed: not gzip data, or it expands past the bounds (a zip bomb).
    #[error("payload {name:?}: {detail}")]
    Gunzip {
        /// The payload.
        name: String,
        /// What happened.
        detail: String,
    },
    /// A size or count bound was passed.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large or too many.
        what: String,
        /// The bound.
        limit: u64,
    },
    /// The offline bundle is malformed (zip, index, metadata).
    #[error("malformed offline bundle: {0}")]
    Bundle(String),
    /// Reading the input failed.
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks an ar member or zip path component: no path separators, no `..`, nothing hidden,
/// printable ASCII only, at most 255 bytes.
pub fn check_member_name(name: &str) -> Result<(), VibError> {
    let bad = |reason| VibError::BadName {
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err(bad("path traversal (..)"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(bad("path separators are not allowed"));
    }
    if name.starts_with('.') {
        return Err(bad("hidden names are not allowed"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("only printable ASCII without spaces is allowed"));
    }
    Ok(())
}

/// Checks a zip entry path: relative, components checked by [`check_member_name`].
pub fn check_entry_path(path: &str) -> Result<(), VibError> {
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err(VibError::BadName {
            name: path.chars().take(80).collect(),
            reason: "absolute paths and backslashes are not allowed",
        });
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    for part in trimmed.split('/') {
        check_member_name(part).map_err(|e| match e {
            VibError::BadName { reason, .. } => VibError::BadName {
                name: path.chars().take(80).collect(),
                reason,
            },
            other => other,
        })?;
    }
    Ok(())
}

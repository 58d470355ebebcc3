//! Validated newtypes. Each is built only through `FromStr`/`TryFrom` (and serde, which goes
//! through them), so holding one means the value was checked: a [`Digest`] is exactly 64
//! lowercase hex digits, a [`Name`] can never act as a path, and so on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Why a string was refused as one of the validated types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct ParseError {
    /// Which type was being parsed ("digest", "name", …).
    pub what: &'static str,
    /// The refused input, cut to 80 characters so an error never echoes a huge value.
    pub value: String,
    /// What was wrong with it.
    pub reason: &'static str,
}

impl ParseError {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        let value = value.chars().take(80).collect();
        Self {
            what,
            value,
            reason,
        }
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A sha256 digest, written as exactly 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The sha256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps a finished hash.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-digit lowercase hex form (also what `Display` prints).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.len() != 64 {
            return Err(ParseError::new("digest", s, "expected 64 hex digits"));
        }
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ParseError::new(
                "digest",
                s,
                "expected lowercase hex digits only",
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| ParseError::new("digest", s, "expected lowercase hex digits only"))?;
        Ok(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}
serde_via_str!(Digest);

/// The name of an image: `sha256:<hex>` of its envelope's decoded payload bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageDigest(Digest);

impl ImageDigest {
    /// The image named by `digest` (the sha256 of its payload bytes).
    pub fn new(digest: Digest) -> Self {
        ImageDigest(digest)
    }

    /// The image of these payload bytes.
    pub fn of_payload(payload: &[u8]) -> Self {
        ImageDigest(Digest::of(payload))
    }

    /// The sha256 itself.
    pub fn digest(&self) -> Digest {
        self.0
    }

    /// The hex part alone, used for file names on disk.
    pub fn hex(&self) -> String {
        self.0.to_hex()
    }
}

impl FromStr for ImageDigest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ParseError::new("image digest", s, "expected sha256:<64 hex digits>"))?;
        hex.parse()
            .map(Self)
            .map_err(|_| ParseError::new("image digest", s, "expected sha256:<64 hex digits>"))
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageDigest({self})")
    }
}
serde_via_str!(ImageDigest);

/// A key id: hex sha256 of the raw 32-byte ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Digest);

impl KeyId {
    /// The key id of a raw ed25519 public key.
    pub fn of_public_key(raw: &[u8; 32]) -> Self {
        Self(Digest::of(raw))
    }
}

impl FromStr for KeyId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        s.parse()
            .map(Self)
            .map_err(|_| ParseError::new("key id", s, "expected 64 lowercase hex digits"))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}
serde_via_str!(KeyId);

/// Acceptance level of a VIB or host, from lowest to highest (the derived order is the trust order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum AcceptanceLevel {
    /// Community supported: lowest trust.
    Community,
    /// Partner supported: the default host level.
    #[default]
    Partner,
    /// VMware accepted.
    Accepted,
    /// VMware certified: highest trust.
    Certified,
}

impl AcceptanceLevel {
    /// Every level, lowest first.
    pub const ALL: [AcceptanceLevel; 4] = [
        AcceptanceLevel::Community,
        AcceptanceLevel::Partner,
        AcceptanceLevel::Accepted,
        AcceptanceLevel::Certified,
    ];

    /// The spelling used in documents and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AcceptanceLevel::Community => "community",
            AcceptanceLevel::Partner => "partner",
            AcceptanceLevel::Accepted => "accepted",
            AcceptanceLevel::Certified => "certified",
        }
    }
}

impl FromStr for AcceptanceLevel {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| {
                ParseError::new(
                    "acceptance level",
                    s,
                    "expected certified, accepted, partner or community",
                )
            })
    }
}

impl fmt::Display for AcceptanceLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
serde_via_str!(AcceptanceLevel);

fn check_name(what: &'static str, s: &str, max: usize) -> Result<(), ParseError> {
    if s.is_empty() {
        return Err(ParseError::new(what, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(ParseError::new(what, s, "too long"));
    }
    if s == "." || s == ".." {
        return Err(ParseError::new(what, s, "must not be . or .."));
    }
    if s.starts_with('-') || s.starts_with('.') {
        return Err(ParseError::new(what, s, "must not start with '-' or '.'"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    {
        return Err(ParseError::new(
            what,
            s,
            "only ASCII letters, digits, '.', '_', '-' and '+' are allowed",
        ));
    }
    Ok(())
}

/// The name of an image, component or VIB: 1–128 characters of `[A-Za-z0-9._+-]`, not starting
/// with `.` or `-`. Such a name can be used in a file name without ever acting as a path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        check_name("name", s, 128)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({:?})", self.0)
    }
}
serde_via_str!(Name);

/// A host's identity as reported in status (a hostname-like label, 1–253 characters).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HostId(String);

impl HostId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        check_name("host id", s, 253)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId({:?})", self.0)
    }
}
serde_via_str!(HostId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_requires_64_lowercase_hex() {
        let ok = "a".repeat(64);
        assert_eq!(ok.parse::<Digest>().map(|d| d.to_hex()), Ok(ok.clone()));
        assert!("A".repeat(64).parse::<Digest>().is_err());
        assert!("a".repeat(63).parse::<Digest>().is_err());
        assert!("g".repeat(64).parse::<Digest>().is_err());
        assert!(format!("../{}", "a".repeat(61)).parse::<Digest>().is_err());
    }

    #[test]
    fn image_digest_round_trips_with_prefix() {
        let d = Digest::of(b"x");
        let s = ImageDigest(d).to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(s.parse::<ImageDigest>(), Ok(ImageDigest(d)));
        assert!(d.to_hex().parse::<ImageDigest>().is_err());
    }

    #[test]
    fn acceptance_levels_are_ordered() {
        use AcceptanceLevel::*;
        assert!(Community < Partner && Partner < Accepted && Accepted < Certified);
        assert_eq!("accepted".parse(), Ok(Accepted));
        assert!("Accepted".parse::<AcceptanceLevel>().is_err());
    }

    #[test]
    fn names_cannot_be_paths() {
        for bad in [
            "", ".", "..", "../x", "a/b", "/abs", "-rf", ".hidden", "a b", "é",
        ] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?} accepted");
        }
        for good in ["esx-base", "ESXi", "8.0.2-0.20", "a_b+c"] {
            assert!(good.parse::<Name>().is_ok(), "{good:?} refused");
        }
    }
}

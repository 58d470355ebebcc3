//! The trust store and the acceptance rule of SPEC §2, as pure functions.
//!
//! [`verify_image`] is the single place that decides whether an agent accepts an image: given the
//! trust store, the host's acceptance level, the current time and the highest serial already
//! accepted for the image's name, it returns the verified image or the precise refusal.
//! Signatures are checked before a payload is parsed, so no untrusted bytes reach serde.

use std::collections::{BTreeSet, HashSet};

use ed25519_dalek::VerifyingKey;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::dsse::{Envelope, key_id, signature_verifies_over};
use crate::error::{DocKind, VerifyError};
use crate::model::{Image, VibDescriptor, check_text};
use crate::types::{AcceptanceLevel, Digest, ImageDigest, KeyId, Name};
use crate::{IMAGE_PAYLOAD_TYPE, VIB_PAYLOAD_TYPE};

/// What a trusted key may sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    /// May sign images.
    Image,
    /// May sign VIB descriptors of levels up to `max_acceptance`.
    Vib {
        /// The highest acceptance level this key vouches for.
        max_acceptance: AcceptanceLevel,
    },
}

/// A public key with its role.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    /// hex sha256 of the raw public key.
    pub id: KeyId,
    /// The key itself.
    pub key: VerifyingKey,
    /// What it may sign.
    pub role: KeyRole,
    /// Where the key came from (its file), named in refusals so that an operator can tell which
    /// configured key a bare key id is; empty when unknown.
    pub label: String,
}

impl TrustedKey {
    /// A trusted key with its id computed from the key.
    pub fn new(key: VerifyingKey, role: KeyRole) -> Self {
        Self {
            id: key_id(&key),
            key,
            role,
            label: String::new(),
        }
    }

    /// The same key, labelled with where it came from (a file name).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// "`label` (role `image`)", or the key id when unlabelled.
    fn describe(&self) -> String {
        let role = match self.role {
            KeyRole::Image => "image".to_owned(),
            KeyRole::Vib { max_acceptance } => {
                format!("vib, up to {}", max_acceptance.as_str())
            }
        };
        if self.label.is_empty() {
            format!("key {} (role {role})", self.id)
        } else {
            format!("{} (role {role})", self.label)
        }
    }
}

/// The keys an agent trusts, and how many distinct ones must sign each document.
#[derive(Clone, Debug)]
pub struct TrustStore {
    keys: Vec<TrustedKey>,
    threshold: usize,
}

impl TrustStore {
    /// A store requiring one trusted signature per document.
    pub fn new(keys: Vec<TrustedKey>) -> Self {
        Self { keys, threshold: 1 }
    }

    /// Requires `n` (at least 1) distinct trusted keys per document.
    pub fn with_threshold(mut self, n: usize) -> Self {
        self.threshold = n.max(1);
        self
    }

    /// The keys.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }
}

/// An image that passed every check, with its descriptors parsed.
#[derive(Clone, Debug)]
pub struct VerifiedImage {
    /// `sha256:` of the payload bytes: the image's name in the API and on disk.
    pub digest: ImageDigest,
    /// The image payload.
    pub image: Image,
    /// Every VIB of every component, in image order.
    pub vibs: Vec<VerifiedVib>,
    /// The signed envelope it was verified from, kept with it: what the agent stores and
    /// resumes from is what was verified, and the two never travel apart.
    pub envelope: Envelope,
}

/// A VIB descriptor whose signature was verified.
#[derive(Clone, Debug)]
pub struct VerifiedVib {
    /// The descriptor.
    pub descriptor: VibDescriptor,
    /// Keys whose signatures verified (for reports).
    pub signers: Vec<KeyId>,
}

/// Checks an envelope's type and signatures; returns the keys (of `role_ok`) whose signatures
/// verified. Several signatures by one key count once.
///
/// The cost is bounded whatever the envelope holds: at most [`Envelope::MAX_SIGNATURES`]
/// signatures, the PAE built once, each key id tried once (a second signature naming a key
/// already tried is skipped, so the expensive check runs at most once per trusted key), and the
/// loop ends as soon as `enough` says the keys found settle the outcome.
fn verify_envelope<'a>(
    env: &Envelope,
    doc: DocKind,
    payload_type: &'static str,
    store: &'a TrustStore,
    role_ok: impl Fn(&KeyRole) -> bool,
    enough: impl Fn(&[&TrustedKey]) -> bool,
) -> Result<Vec<&'a TrustedKey>, VerifyError> {
    if env.payload_type != payload_type {
        return Err(VerifyError::WrongPayloadType {
            doc,
            expected: payload_type,
            found: env.payload_type.chars().take(80).collect(),
        });
    }
    if env.signatures.len() > Envelope::MAX_SIGNATURES {
        return Err(VerifyError::Malformed {
            doc,
            detail: format!(
                "the envelope carries {} signatures; at most {} are accepted",
                env.signatures.len(),
                Envelope::MAX_SIGNATURES
            ),
        });
    }
    let pae = env.pae();
    let mut tried: HashSet<KeyId> = HashSet::new();
    let mut good: Vec<&TrustedKey> = Vec::new();
    let mut bad: Option<KeyId> = None;
    for sig in &env.signatures {
        if enough(&good) {
            break;
        }
        if !tried.insert(sig.keyid) {
            continue;
        }
        for key in store
            .keys
            .iter()
            .filter(|k| k.id == sig.keyid && role_ok(&k.role))
        {
            if signature_verifies_over(&pae, sig, &key.key) {
                if !good.iter().any(|g| g.id == key.id) {
                    good.push(key);
                }
            } else {
                bad.get_or_insert(sig.keyid);
            }
        }
    }
    if good.len() >= store.threshold {
        return Ok(good);
    }
    if let Some(keyid) = bad {
        return Err(VerifyError::SignatureInvalid { doc, keyid });
    }
    if !good.is_empty() {
        return Err(VerifyError::ThresholdNotMet {
            doc,
            found: good.len(),
            needed: store.threshold,
        });
    }
    // Name each signer the store knows in another role by its file and role: "signed by
    // 3fa2…" alone does not tell the operator that the vendor key signed the image.
    let signers: BTreeSet<String> = env
        .signatures
        .iter()
        .map(|s| {
            let known: Vec<String> = store
                .keys
                .iter()
                .filter(|k| k.id == s.keyid)
                .map(TrustedKey::describe)
                .collect();
            if known.is_empty() {
                format!("{} (not in the trust store)", s.keyid)
            } else {
                format!(
                    "{}, which is {}, not a key trusted for this",
                    s.keyid,
                    known.join(" and ")
                )
            }
        })
        .collect();
    Err(VerifyError::UntrustedKey {
        doc,
        keyids: if signers.is_empty() {
            "nobody".into()
        } else {
            signers.into_iter().collect::<Vec<_>>().join(", ")
        },
    })
}

fn parse<T: DeserializeOwned>(doc: DocKind, bytes: &[u8]) -> Result<T, VerifyError> {
    serde_json::from_slice(bytes).map_err(|e| VerifyError::Malformed {
        doc,
        detail: e.to_string(),
    })
}

/// Verifies one VIB descriptor envelope: signed by a `vib` key whose `max_acceptance` covers the
/// level the descriptor claims.
pub fn verify_vib(env: &Envelope, store: &TrustStore) -> Result<VerifiedVib, VerifyError> {
    // Before the payload is parsed its level is unknown, so the search stops early only once
    // enough keys trusted up to `certified` (which cover any level) have signed.
    let signers = verify_envelope(
        env,
        DocKind::Vib,
        VIB_PAYLOAD_TYPE,
        store,
        |r| matches!(r, KeyRole::Vib { .. }),
        |good| {
            good.iter()
                .filter(|k| {
                    k.role
                        == KeyRole::Vib {
                            max_acceptance: AcceptanceLevel::Certified,
                        }
                })
                .count()
                >= store.threshold
        },
    )?;
    let descriptor: VibDescriptor = parse(DocKind::Vib, &env.payload)?;
    descriptor
        .validate()
        .map_err(|detail| VerifyError::Malformed {
            doc: DocKind::Vib,
            detail,
        })?;
    let covering: Vec<KeyId> = signers
        .iter()
        .filter(|k| matches!(k.role, KeyRole::Vib { max_acceptance } if max_acceptance >= descriptor.acceptance))
        .map(|k| k.id)
        .collect();
    if covering.len() < store.threshold {
        let max = signers
            .iter()
            .filter_map(|k| match k.role {
                KeyRole::Vib { max_acceptance } => Some(max_acceptance),
                KeyRole::Image => None,
            })
            .max()
            .unwrap_or(AcceptanceLevel::Community);
        return Err(VerifyError::SignerLevel {
            vib: descriptor.name,
            level: descriptor.acceptance,
            max,
        });
    }
    Ok(VerifiedVib {
        descriptor,
        signers: covering,
    })
}

/// Verifies an image and all its descriptors, except the host's acceptance level
/// (see [`check_host_acceptance`]): compliance reports an image below the host's level as
/// `incompatible` rather than refusing to look at it.
///
/// `highest_serial` is the highest serial already accepted for this image's name, if any.
pub fn verify_image_content(
    env: &Envelope,
    store: &TrustStore,
    now: OffsetDateTime,
    highest_serial: impl FnOnce(&Name) -> Option<u64>,
) -> Result<VerifiedImage, VerifyError> {
    verify_envelope(
        env,
        DocKind::Image,
        IMAGE_PAYLOAD_TYPE,
        store,
        |r| *r == KeyRole::Image,
        |good| good.len() >= store.threshold,
    )?;
    let image: Image = parse(DocKind::Image, &env.payload)?;
    let malformed = |detail: String| VerifyError::Malformed {
        doc: DocKind::Image,
        detail,
    };
    check_text("base_image", image.base_image.as_str(), 64).map_err(malformed)?;
    if now >= image.expires {
        return Err(VerifyError::Expired {
            name: image.name,
            expires: image.expires,
        });
    }
    if let Some(highest) = highest_serial(&image.name)
        && image.serial < highest
    {
        return Err(VerifyError::Rollback {
            name: image.name,
            serial: image.serial,
            highest,
        });
    }

    let mut components = HashSet::new();
    let mut vib_names = HashSet::new();
    let mut sizes: std::collections::HashMap<Digest, u64> = std::collections::HashMap::new();
    let mut vibs = Vec::new();
    for component in &image.components {
        check_text("component version", component.version.as_str(), 64).map_err(malformed)?;
        if !components.insert(&component.name) {
            return Err(malformed(format!(
                "component {} is listed twice",
                component.name
            )));
        }
        if component.vibs.is_empty() {
            return Err(malformed(format!(
                "component {} has no VIBs",
                component.name
            )));
        }
        for vib_env in &component.vibs {
            let vib = verify_vib(vib_env, store)?;
            let d = &vib.descriptor;
            if d.component != component.name || d.component_version != component.version {
                return Err(malformed(format!(
                    "VIB {} belongs to component {} {}, but is listed under {} {}",
                    d.name, d.component, d.component_version, component.name, component.version
                )));
            }
            if !vib_names.insert((d.name.clone(), d.target)) {
                return Err(malformed(format!("VIB {} is listed twice", d.name)));
            }
            // One blob, one size: two descriptors of the same bytes that disagree on their
            // length cannot both be right, and staging could satisfy only one of them.
            if let Some(other) = sizes.insert(d.sha256, d.size)
                && other != d.size
            {
                return Err(malformed(format!(
                    "VIB {} declares sha256:{} with {} bytes, another VIB of the image the same bytes with {other}",
                    d.name, d.sha256, d.size
                )));
            }
            vibs.push(vib);
        }
    }
    Ok(VerifiedImage {
        digest: ImageDigest::of_payload(&env.payload),
        image,
        vibs,
        envelope: env.clone(),
    })
}

/// Refuses an image that carries a VIB below the host's acceptance level.
pub fn check_host_acceptance(
    image: &VerifiedImage,
    host: AcceptanceLevel,
) -> Result<(), VerifyError> {
    match image.vibs.iter().find(|v| v.descriptor.acceptance < host) {
        Some(v) => Err(VerifyError::AcceptanceTooLow {
            vib: v.descriptor.name.clone(),
            level: v.descriptor.acceptance,
            host,
        }),
        None => Ok(()),
    }
}

/// The whole acceptance rule of SPEC §2: signatures, roles, expiry, rollback, signer levels and
/// the host's acceptance level.
pub fn verify_image(
    env: &Envelope,
    store: &TrustStore,
    host_level: AcceptanceLevel,
    now: OffsetDateTime,
    highest_serial: impl FnOnce(&Name) -> Option<u64>,
) -> Result<VerifiedImage, VerifyError> {
    let image = verify_image_content(env, store, now, highest_serial)?;
    check_host_acceptance(&image, host_level)?;
    Ok(image)
}

//! `vibstagectl image create` and `image verify`: signed images built from a depot's descriptors,
//! and the agent's acceptance rule run offline.
//!
//! `create` reads `descriptors/*.json` of a depot, picks the descriptors of each requested
//! `--component C=V`, and writes `images/<name>.json`: the DSSE envelope of an [`Image`] that
//! carries those descriptor envelopes inline (SPEC §2). Signing an image vouches for what it
//! carries, so with `--vib-key` every selected descriptor must carry a verifying signature by one
//! of those keys (issue 18); without it `create` warns that it signs over descriptors it did not
//! verify, and names any that are unsigned. Unparseable descriptors are skipped with a warning.
//!
//! `verify` runs [`vibstage_protocol::verify_image`] exactly as an agent would, with the given
//! image keys, VIB keys trusted up to `certified`, the given host acceptance level, the current
//! time and no rollback history, and reports what it verified. A refusal prints
//! `error: <code>: <message>` and exits 1.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::VerifyingKey;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use vibstage_protocol::dsse::key_id;
use vibstage_protocol::version::Version;
use vibstage_protocol::{
    AcceptanceLevel, Component, Digest, Envelope, ErrorCode, IMAGE_PAYLOAD_TYPE, Image,
    ImageDigest, KeyId, KeyRole, Name, TrustStore, TrustedKey, VIB_PAYLOAD_TYPE, VerifiedImage,
    VibDescriptor, verify_image,
};

use crate::error::{CliError, io_message};
use crate::files::{Existing, ensure_dir, write_file};
use crate::publish::depot::{DIR_MODE, FILE_MODE};

/// How long an image is valid when `--expires` is not given.
pub const DEFAULT_LIFETIME_DAYS: i64 = 30;

/// A `--component C=V` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentRef {
    /// Component name.
    pub name: Name,
    /// Component version.
    pub version: Version,
}

impl FromStr for ComponentRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, version) = s
            .split_once('=')
            .ok_or_else(|| format!("expected COMPONENT=VERSION, got {s:?}"))?;
        let name = name.parse::<Name>().map_err(|e| e.to_string())?;
        check_text("component version", version)?;
        Ok(Self {
            name,
            version: Version(version.to_owned()),
        })
    }
}

/// Refuses what an agent would refuse in a version string: empty, over 64 bytes, control
/// characters.
fn check_text(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > 64 {
        return Err(format!("{what} is longer than 64 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

pub(crate) fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.to_offset(UtcOffset::UTC))
        .map_err(|e| format!("expected an RFC 3339 time such as 2027-01-01T00:00:00Z: {e}"))
}

/// What `image create` builds.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Image name.
    pub name: Name,
    /// Serial.
    pub serial: u64,
    /// Expiry.
    pub expires: OffsetDateTime,
    /// Base image version.
    pub base_image: Version,
    /// Components, in image order.
    pub components: Vec<ComponentRef>,
}

/// An image written to a depot.
#[derive(Debug, Clone)]
pub struct CreatedImage {
    /// `images/<name>.json`.
    pub path: PathBuf,
    /// `sha256:` of the payload.
    pub digest: ImageDigest,
    /// The payload.
    pub image: Image,
}

/// A descriptor envelope found in the depot, with its parsed (unverified) content.
struct Found {
    path: PathBuf,
    envelope: Envelope,
    descriptor: VibDescriptor,
}

/// Reads every parseable descriptor envelope of a depot, warning about the rest.
fn read_descriptors(dir: &Path, warn: &mut dyn FnMut(String)) -> Result<Vec<Found>, CliError> {
    let entries = fs::read_dir(dir)
        .map_err(|e| CliError::config("depot descriptors", dir, io_message(&e)))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CliError::io("list", dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let parsed = fs::read(&path)
            .map_err(|e| io_message(&e))
            .and_then(|bytes| {
                serde_json::from_slice::<Envelope>(&bytes)
                    .map_err(|e| format!("not a DSSE envelope: {e}"))
            })
            .and_then(|envelope| {
                if envelope.payload_type != VIB_PAYLOAD_TYPE {
                    return Err(format!("payloadType is {:?}", envelope.payload_type));
                }
                let descriptor = serde_json::from_slice::<VibDescriptor>(&envelope.payload)
                    .map_err(|e| format!("not a VIB descriptor: {e}"))?;
                Ok((envelope, descriptor))
            });
        match parsed {
            Ok((envelope, descriptor)) => found.push(Found {
                path,
                envelope,
                descriptor,
            }),
            Err(why) => warn(format!("skipping {}: {why}", path.display())),
        }
    }
    // Directory order is arbitrary; images should not be.
    found.sort_by(|a, b| {
        (
            &a.descriptor.name,
            a.descriptor.target.as_str(),
            a.descriptor.sha256,
        )
            .cmp(&(
                &b.descriptor.name,
                b.descriptor.target.as_str(),
                b.descriptor.sha256,
            ))
    });
    Ok(found)
}

/// Refuses a descriptor that no key of `vib_keys` signed (when keys are given); warns about an
/// unsigned one otherwise.
fn check_descriptor(
    f: &Found,
    vib_keys: &[VerifyingKey],
    warn: &mut dyn FnMut(String),
) -> Result<(), CliError> {
    let what = format!("descriptor {} ({})", f.path.display(), f.descriptor.name);
    if vib_keys.is_empty() {
        if f.envelope.signatures.is_empty() {
            warn(format!(
                "{what} is unsigned; agents will refuse an image carrying it"
            ));
        }
        return Ok(());
    }
    let mut claimed = false;
    for sig in &f.envelope.signatures {
        for k in vib_keys {
            if key_id(k) == sig.keyid {
                if f.envelope.signature_verifies(sig, k) {
                    return Ok(());
                }
                claimed = true;
            }
        }
    }
    Err(CliError::Failed {
        code: if claimed {
            ErrorCode::SignatureInvalid
        } else {
            ErrorCode::UntrustedKey
        },
        message: if claimed {
            format!(
                "{what}: its signature by a --vib-key does not verify; not signing an image over it"
            )
        } else {
            format!("{what} is not signed by any --vib-key; not signing an image over it")
        },
    })
}

/// Builds, signs and writes `images/<name>.json` from the depot's descriptors. With `vib_keys`,
/// every descriptor must be signed by one of them; without, a warning says nothing was verified.
/// Warnings (skipped files, unsigned descriptors, an expiry not in the future) go to `warn`, for
/// the caller to show.
pub fn create(
    depot: &Path,
    key: &ed25519_dalek::SigningKey,
    spec: &ImageSpec,
    vib_keys: &[VerifyingKey],
    now: OffsetDateTime,
    warn: &mut dyn FnMut(String),
) -> Result<CreatedImage, CliError> {
    check_text("--base-image", spec.base_image.as_str()).map_err(CliError::Usage)?;
    for (i, c) in spec.components.iter().enumerate() {
        if spec.components[..i].iter().any(|o| o.name == c.name) {
            return Err(CliError::Usage(format!(
                "component {} is given twice; an image holds one version of each component",
                c.name
            )));
        }
    }
    let found = read_descriptors(&depot.join("descriptors"), warn)?;

    let mut components = Vec::new();
    for want in &spec.components {
        let selected: Vec<&Found> = found
            .iter()
            .filter(|f| {
                f.descriptor.component == want.name
                    && f.descriptor.component_version == want.version
            })
            .collect();
        if selected.is_empty() {
            return Err(CliError::Usage(format!(
                "no descriptor in {} belongs to component {} {}",
                depot.join("descriptors").display(),
                want.name,
                want.version
            )));
        }
        // An agent refuses an image listing a VIB name twice for one target.
        let mut seen: BTreeMap<(&Name, &str), &Path> = BTreeMap::new();
        for f in &selected {
            let k = (&f.descriptor.name, f.descriptor.target.as_str());
            if let Some(other) = seen.insert(k, &f.path) {
                return Err(CliError::Usage(format!(
                    "component {} {} has two VIBs named {} for target {}: {} and {}; remove one",
                    want.name,
                    want.version,
                    f.descriptor.name,
                    k.1,
                    other.display(),
                    f.path.display()
                )));
            }
        }
        for f in &selected {
            check_descriptor(f, vib_keys, warn)?;
        }
        components.push(Component {
            name: want.name.clone(),
            version: want.version.clone(),
            vibs: selected.iter().map(|f| f.envelope.clone()).collect(),
        });
    }
    if vib_keys.is_empty() {
        warn(format!(
            "the descriptors of image {} were not verified (no --vib-key given); \
             its signature vouches for them anyway",
            spec.name
        ));
    }
    if spec.expires <= now {
        warn(format!(
            "image {} expires at {}, which is not in the future; agents will refuse it",
            spec.name,
            rfc3339(spec.expires)
        ));
    }

    let image = Image {
        name: spec.name.clone(),
        serial: spec.serial,
        expires: spec.expires,
        base_image: spec.base_image.clone(),
        components,
    };
    let path = depot.join("images").join(format!("{}.json", image.name));
    let payload =
        serde_json::to_vec(&image).map_err(|e| CliError::io("encode image", &path, e.into()))?;
    let digest = ImageDigest(Digest::of(&payload));
    let envelope = Envelope::sign(IMAGE_PAYLOAD_TYPE, payload, key);
    let mut json = serde_json::to_vec_pretty(&envelope)
        .map_err(|e| CliError::io("encode image", &path, e.into()))?;
    json.push(b'\n');
    ensure_dir(depot, DIR_MODE)?;
    ensure_dir(&depot.join("images"), DIR_MODE)?;
    write_file(&path, &json, FILE_MODE, Existing::Replace)?;
    Ok(CreatedImage {
        path,
        digest,
        image,
    })
}

/// An image that passed verification, with the keys that signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The verified image and its VIBs.
    pub image: VerifiedImage,
    /// Image keys whose signatures verified.
    pub signers: Vec<KeyId>,
    /// The host acceptance level it was checked against.
    pub acceptance: AcceptanceLevel,
}

fn bad_request(message: String) -> CliError {
    CliError::Failed {
        code: ErrorCode::BadRequest,
        message,
    }
}

/// Parses a signed image file, telling the usual wrong files apart (issue 17, item 10): a `.vib`
/// (an ar archive), an offline bundle (zip), other binary data, or JSON that is not an envelope.
pub fn parse_image_file(file: &Path, bytes: &[u8]) -> Result<Envelope, String> {
    let what = if bytes.starts_with(b"!<arch>\n") {
        Some("a VIB file (an ar archive)")
    } else if bytes.starts_with(b"PK\x03\x04") {
        Some("a zip archive (an offline bundle?)")
    } else if std::str::from_utf8(bytes).is_err() {
        Some("binary data")
    } else {
        None
    };
    let hint = "--image takes a signed image, the JSON file `vibstagectl image create` writes \
                as DEPOT/images/NAME.json";
    if let Some(what) = what {
        return Err(format!(
            "{} is {what}, not a signed image; {hint}",
            file.display()
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "{} is not a signed image (a DSSE envelope: {e}); {hint}",
            file.display()
        )
    })
}

/// Verifies the image in `file` as an agent trusting `image_keys` for images and `vib_keys` for
/// descriptors up to `certified` would, at `host` acceptance level and time `now`.
pub fn verify(
    file: &Path,
    image_keys: &[VerifyingKey],
    vib_keys: &[VerifyingKey],
    host: AcceptanceLevel,
    now: OffsetDateTime,
) -> Result<Verified, CliError> {
    verify_labelled(file, image_keys, vib_keys, &[], host, now)
}

/// [`verify`], naming the keys in refusals by `labels` (image keys first, then vib keys).
pub fn verify_labelled(
    file: &Path,
    image_keys: &[VerifyingKey],
    vib_keys: &[VerifyingKey],
    labels: &[String],
    host: AcceptanceLevel,
    now: OffsetDateTime,
) -> Result<Verified, CliError> {
    let bytes = fs::read(file).map_err(|e| {
        bad_request(format!(
            "failed to read image {}: {}",
            file.display(),
            io_message(&e)
        ))
    })?;
    let envelope: Envelope = parse_image_file(file, &bytes).map_err(bad_request)?;
    let keys = image_keys
        .iter()
        .map(|k| TrustedKey::new(*k, KeyRole::Image))
        .chain(vib_keys.iter().map(|k| {
            TrustedKey::new(
                *k,
                KeyRole::Vib {
                    max_acceptance: AcceptanceLevel::Certified,
                },
            )
        }))
        .zip(labels.iter().map(Some).chain(std::iter::repeat(None)))
        .map(|(k, label)| match label {
            Some(l) => k.with_label(l.clone()),
            None => k,
        })
        .collect();
    let store = TrustStore::new(keys);
    let image =
        verify_image(&envelope, &store, host, now, |_| None).map_err(|e| CliError::Failed {
            code: e.code(),
            message: format!("{}: {e}", file.display()),
        })?;
    let mut signers: Vec<KeyId> = Vec::new();
    for sig in &envelope.signatures {
        for k in image_keys {
            let id = key_id(k);
            if id == sig.keyid && envelope.signature_verifies(sig, k) && !signers.contains(&id) {
                signers.push(id);
            }
        }
    }
    Ok(Verified {
        image,
        signers,
        acceptance: host,
    })
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub(crate) fn join_ids(ids: &[KeyId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The JSON report of a verified image.
pub fn verified_json(v: &Verified) -> serde_json::Value {
    let image = &v.image.image;
    let components: Vec<serde_json::Value> = image
        .components
        .iter()
        .map(|c| {
            let vibs: Vec<serde_json::Value> = v
                .image
                .vibs
                .iter()
                .filter(|vib| vib.descriptor.component == c.name)
                .map(|vib| {
                    let mut value =
                        serde_json::to_value(&vib.descriptor).unwrap_or(serde_json::Value::Null);
                    if let Some(obj) = value.as_object_mut() {
                        obj.insert("signers".into(), serde_json::json!(vib.signers));
                    }
                    value
                })
                .collect();
            serde_json::json!({"name": c.name, "version": c.version, "vibs": vibs})
        })
        .collect();
    serde_json::json!({
        "verified": true,
        "name": image.name,
        "serial": image.serial,
        "digest": v.image.digest,
        "expires": rfc3339(image.expires),
        "base_image": image.base_image,
        "acceptance": v.acceptance,
        "signers": v.signers,
        "components": components,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::depot::{VibSpec, add};
    use ed25519_dalek::SigningKey;
    use time::Duration;
    use vibstage_protocol::{VibKind, VibTarget};

    fn spec(component: &str, acceptance: AcceptanceLevel) -> VibSpec {
        VibSpec {
            component: component.parse().expect("name"),
            component_version: Version("1.0".into()),
            vendor: "acme".into(),
            acceptance,
            kind: VibKind::Software,
            target: VibTarget::Host,
            version: None,
            maintenance_mode: true,
            reboot_required: true,
        }
    }

    #[test]
    fn create_then_verify_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let depot = dir.path().join("depot");
        let vib_key = SigningKey::from_bytes(&[1; 32]);
        let image_key = SigningKey::from_bytes(&[2; 32]);
        for (name, component) in [("a", "A"), ("b", "A"), ("c", "B")] {
            let file = dir.path().join(format!("{name}.vib"));
            fs::write(&file, name).expect("write");
            add(
                &depot,
                &vib_key,
                &spec(component, AcceptanceLevel::Partner),
                None,
                &[file],
            )
            .expect("add");
        }
        fs::write(depot.join("descriptors").join("junk.json"), "{").expect("junk");
        let now = OffsetDateTime::now_utc();
        let image_spec = ImageSpec {
            name: "img".parse().expect("name"),
            serial: 3,
            expires: now + Duration::days(1),
            base_image: Version("1.0".into()),
            components: vec!["B=1.0".parse().expect("c"), "A=1.0".parse().expect("c")],
        };
        let created = create(
            &depot,
            &image_key,
            &image_spec,
            &[vib_key.verifying_key()],
            now,
            &mut |_| {},
        )
        .expect("create");
        // A descriptor by another key is refused when --vib-key is given, accepted without.
        let e = create(
            &depot,
            &image_key,
            &image_spec,
            &[image_key.verifying_key()],
            now,
            &mut |_| {},
        )
        .expect_err("foreign descriptors");
        assert!(matches!(
            e,
            CliError::Failed {
                code: ErrorCode::UntrustedKey,
                ..
            }
        ));
        assert_eq!(created.image.components[0].name.as_str(), "B");
        assert_eq!(created.image.components[1].vibs.len(), 2);

        let v = verify(
            &created.path,
            &[image_key.verifying_key()],
            &[vib_key.verifying_key()],
            AcceptanceLevel::Partner,
            now,
        )
        .expect("verify");
        assert_eq!(v.image.digest, created.digest);
        assert_eq!(v.signers, [key_id(&image_key.verifying_key())]);
        assert_eq!(v.image.vibs.len(), 3);
        let json = verified_json(&v);
        assert_eq!(json["components"][1]["vibs"][1]["name"], "b");

        let e = verify(
            &created.path,
            &[vib_key.verifying_key()],
            &[vib_key.verifying_key()],
            AcceptanceLevel::Partner,
            now,
        )
        .expect_err("wrong role");
        assert!(matches!(
            e,
            CliError::Failed {
                code: ErrorCode::UntrustedKey,
                ..
            }
        ));

        let missing = ImageSpec {
            components: vec!["Z=1.0".parse().expect("c")],
            ..image_spec
        };
        assert_eq!(
            create(&depot, &image_key, &missing, &[], now, &mut |_| {})
                .expect_err("missing")
                .exit_code(),
            2
        );
    }

    #[test]
    fn component_arguments_are_checked() {
        assert!("ESXi=8.0".parse::<ComponentRef>().is_ok());
        assert!("ESXi".parse::<ComponentRef>().is_err());
        assert!("ESXi=".parse::<ComponentRef>().is_err());
        assert!("../x=1".parse::<ComponentRef>().is_err());
    }

    #[test]
    fn unreadable_input_is_bad_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("img.json");
        fs::write(&file, "not json").expect("write");
        let e = verify(
            &file,
            &[],
            &[],
            AcceptanceLevel::Partner,
            OffsetDateTime::now_utc(),
        )
        .expect_err("bad");
        assert!(matches!(
            e,
            CliError::Failed {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
        assert_eq!(e.exit_code(), 1);
    }
}

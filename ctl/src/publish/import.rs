//! `vibstagectl depot import`: real ESXi content into a depot (issue 14, SPEC §3).
//!
//! Each argument is a `.vib` (an ar archive) or an offline bundle (a zip), told apart by their
//! first bytes. The import runs in two phases so that a refusal writes nothing at all:
//!
//! 1. Check: every VIB is streamed once through [`vibstage::vib::read_vib`] (ar container,
//!    `descriptor.xml`, every payload checksum), bundles are checked against their metadata,
//!    and every vibstage descriptor is derived and validated — name, version, vendor and
//!    acceptance from the VIB, component from the bundle's bulletins (a lone `.vib` is its own
//!    component: its name and version), `kind` firmware when the VIB is tagged `firmware`,
//!    `target` dpu when every platform it declares is `esxio` (ESXi on DPUs), `maintenance_mode`
//!    from `system-requires`, `reboot_required` unless live install is allowed. A VIB declaring
//!    an acceptance level above `--max-acceptance` (what the signing key is trusted for) is
//!    refused.
//! 2. Write: each blob is copied to a temporary file in `vibs/` while hashed, and must hash to
//!    what phase 1 checked (a file changed in between is refused); only when all are copied are
//!    they renamed into place and the descriptors written. Blobs and descriptors already there
//!    byte for byte are left alone, so importing twice changes nothing.

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};
use vibstage_protocol::version::Version;
use vibstage_protocol::{
    AcceptanceLevel, Digest, Envelope, ErrorCode, Name, VIB_PAYLOAD_TYPE, VibDescriptor, VibKind,
    VibTarget,
};

use crate::error::{CliError, io_message};
use crate::files::{Existing, ensure_dir, sync_dir, write_file};
use crate::publish::depot::{DIR_MODE, FILE_MODE};
use vibstage::vib::{Bundle, Limits, Vib, VibError, read_vib};

/// What happened to one VIB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Blob and descriptor written.
    Imported,
    /// Both were already in the depot, byte for byte.
    AlreadyPresent,
    /// The blob was there; its descriptor was (re)written.
    DescriptorUpdated,
}

impl Outcome {
    /// The word printed for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Imported => "imported",
            Outcome::AlreadyPresent => "already present",
            Outcome::DescriptorUpdated => "descriptor updated",
        }
    }
}

/// One VIB imported.
#[derive(Debug, Clone)]
pub struct ImportedVib {
    /// Where it came from: `FILE.vib` or `BUNDLE.zip!vib20/…`.
    pub source: String,
    /// Its real VIB ID (`vendor_type_name_version`).
    pub vib_id: String,
    /// The signed vibstage descriptor.
    pub descriptor: VibDescriptor,
    /// What was done.
    pub outcome: Outcome,
}

/// Where a planned VIB's bytes are.
enum From {
    File(PathBuf),
    Entry(usize, String),
}

struct Planned {
    from: From,
    source: String,
    vib_id: String,
    descriptor: VibDescriptor,
}

fn refused(source: &str, e: &VibError) -> CliError {
    let code = match e {
        VibError::Checksum { .. } => ErrorCode::ChecksumMismatch,
        VibError::Size { .. } => ErrorCode::SizeMismatch,
        _ => ErrorCode::BadRequest,
    };
    CliError::Failed {
        code,
        message: format!("{source}: {e}; nothing was imported"),
    }
}

fn bad(source: &str, message: String) -> CliError {
    CliError::Failed {
        code: ErrorCode::BadRequest,
        message: format!("{source}: {message}; nothing was imported"),
    }
}

/// The vibstage descriptor of a checked VIB.
fn derive(
    source: &str,
    vib: &Vib,
    component: Option<(String, String)>,
    bundle_platforms: &[String],
    max: AcceptanceLevel,
) -> Result<VibDescriptor, CliError> {
    let x = &vib.xml;
    if x.acceptance > max {
        return Err(bad(
            source,
            format!(
                "VIB {} declares acceptance level {}, above what the signing key may sign \
                 (--max-acceptance {max}); pass --max-acceptance {} if the agents trust this key that far",
                x.id(),
                x.acceptance,
                x.acceptance
            ),
        ));
    }
    let name: Name = x.name.parse().map_err(|e| {
        bad(
            source,
            format!("VIB name {:?} cannot be a vibstage name: {e}", x.name),
        )
    })?;
    let (component, component_version) = component.unwrap_or((x.name.clone(), x.version.clone()));
    let component: Name = component.parse().map_err(|e| {
        bad(
            source,
            format!("component name {component:?} cannot be a vibstage name: {e}"),
        )
    })?;
    let platforms = if x.platforms.is_empty() {
        bundle_platforms
    } else {
        &x.platforms
    };
    let descriptor = VibDescriptor {
        name,
        version: Version(x.version.clone()),
        vendor: x.vendor.clone(),
        component,
        component_version: Version(component_version),
        acceptance: x.acceptance,
        kind: if x
            .software_tags
            .iter()
            .any(|t| t.eq_ignore_ascii_case("firmware"))
        {
            VibKind::Firmware
        } else {
            VibKind::Software
        },
        target: if !platforms.is_empty()
            && platforms.iter().all(|p| p.eq_ignore_ascii_case("esxio"))
        {
            VibTarget::Dpu
        } else {
            VibTarget::Host
        },
        sha256: vib.sha256,
        size: vib.size,
        maintenance_mode: x.maintenance_mode,
        reboot_required: !x.live_install_allowed,
    };
    descriptor
        .validate()
        .map_err(|e| bad(source, format!("VIB {}: {e}", x.id())))?;
    Ok(descriptor)
}

fn open(path: &Path) -> Result<File, CliError> {
    File::open(path).map_err(|e| CliError::config("VIB or bundle", path, io_message(&e)))
}

/// Copies `r` into a temporary file in `vibs`, hashing it.
fn copy_to_temp(
    vibs: &Path,
    mut r: impl Read,
) -> Result<(tempfile::NamedTempFile, Digest, u64), CliError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(vibs)
        .map_err(|e| CliError::io("create a temporary file in", vibs, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CliError::io("copy", vibs, e)),
        };
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .map_err(|e| CliError::io("write", tmp.path().to_owned(), e))?;
        size += n as u64;
    }
    tmp.as_file()
        .set_permissions(Permissions::from_mode(FILE_MODE))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| CliError::io("write", tmp.path().to_owned(), e))?;
    Ok((tmp, Digest::from_bytes(hasher.finalize().into()), size))
}

/// Imports `files` into `depot`, signing with `key`; see the module documentation.
pub fn import(
    depot: &Path,
    key: &SigningKey,
    max_acceptance: AcceptanceLevel,
    files: &[PathBuf],
) -> Result<Vec<ImportedVib>, CliError> {
    let limits = Limits::default();
    let mut bundles: Vec<(PathBuf, Bundle<File>)> = Vec::new();
    let mut planned: Vec<Planned> = Vec::new();
    for path in files {
        let mut file = open(path)?;
        let mut head = [0u8; 8];
        let n = file
            .read(&mut head)
            .map_err(|e| CliError::config("VIB or bundle", path, io_message(&e)))?;
        drop(file);
        let shown = path.display().to_string();
        if head[..n] == *vibstage::vib::ar::MAGIC {
            let vib = read_vib(io::BufReader::new(open(path)?), &limits)
                .map_err(|e| refused(&shown, &e))?;
            let descriptor = derive(&shown, &vib, None, &[], max_acceptance)?;
            planned.push(Planned {
                from: From::File(path.clone()),
                source: shown,
                vib_id: vib.xml.id(),
                descriptor,
            });
        } else if head[..n.min(4)] == *b"PK\x03\x04" {
            let mut bundle = Bundle::open(open(path)?, &limits).map_err(|e| refused(&shown, &e))?;
            let index = bundles.len();
            for entry in bundle.vib_paths.clone() {
                let source = format!("{shown}!{entry}");
                let vib = bundle.read_vib(&entry).map_err(|e| refused(&source, &e))?;
                let found = bundle
                    .component_of(&vib.xml.id())
                    .map_err(|e| refused(&source, &e))?;
                let (component, platforms) = match found {
                    Some((c, p)) => (Some((c.name, c.version)), p),
                    None => (None, Vec::new()),
                };
                let descriptor = derive(&source, &vib, component, &platforms, max_acceptance)?;
                planned.push(Planned {
                    from: From::Entry(index, entry),
                    source,
                    vib_id: vib.xml.id(),
                    descriptor,
                });
            }
            bundles.push((path.clone(), bundle));
        } else {
            return Err(bad(
                &shown,
                "neither a .vib (ar archive) nor an offline bundle (zip)".into(),
            ));
        }
    }

    let vibs = depot.join("vibs");
    let descriptors = depot.join("descriptors");
    for dir in [depot, &vibs, &descriptors] {
        ensure_dir(dir, DIR_MODE)?;
    }
    // Copy every blob not yet there; rename nothing until all are copied and checked.
    let mut copies = Vec::new();
    for p in &planned {
        let dest = vibs.join(p.descriptor.sha256.to_hex());
        let present = vibstage::store::hash_file(&dest).is_ok_and(|d| d == p.descriptor.sha256);
        if present || copies.iter().any(|(d, _)| *d == dest) {
            continue;
        }
        let (tmp, digest, size) = match &p.from {
            From::File(path) => copy_to_temp(&vibs, open(path)?)?,
            From::Entry(i, entry) => {
                let (bundle_path, bundle) = &mut bundles[*i];
                let reader = bundle
                    .entry(entry)
                    .map_err(|e| refused(&bundle_path.display().to_string(), &e))?;
                copy_to_temp(&vibs, reader)?
            }
        };
        if digest != p.descriptor.sha256 || size != p.descriptor.size {
            return Err(bad(&p.source, "changed while it was being imported".into()));
        }
        copies.push((dest, tmp));
    }
    let copied: Vec<PathBuf> = copies.iter().map(|(d, _)| d.clone()).collect();
    for (dest, tmp) in copies {
        tmp.persist(&dest)
            .map_err(|e| CliError::io("write", &dest, e.error))?;
    }
    sync_dir(&vibs)?;

    let mut out = Vec::new();
    for p in planned {
        let payload = serde_json::to_vec(&p.descriptor)
            .map_err(|e| CliError::io("encode descriptor of", &p.source, e.into()))?;
        let envelope = Envelope::sign(VIB_PAYLOAD_TYPE, payload, key);
        let mut json = serde_json::to_vec_pretty(&envelope)
            .map_err(|e| CliError::io("encode descriptor of", &p.source, e.into()))?;
        json.push(b'\n');
        let path = descriptors.join(format!("{}.json", p.descriptor.sha256.to_hex()));
        let blob_new = copied.contains(&vibs.join(p.descriptor.sha256.to_hex()));
        let outcome = if fs::read(&path).is_ok_and(|old| old == json) {
            if blob_new {
                Outcome::Imported
            } else {
                Outcome::AlreadyPresent
            }
        } else {
            write_file(&path, &json, FILE_MODE, Existing::Replace)?;
            if blob_new {
                Outcome::Imported
            } else {
                Outcome::DescriptorUpdated
            }
        };
        out.push(ImportedVib {
            source: p.source,
            vib_id: p.vib_id,
            descriptor: p.descriptor,
            outcome,
        });
    }
    Ok(out)
}

/// The base image version (if the bundle has one) and the `(component, version)` pairs.
pub type ImageParts = (Option<String>, Vec<(String, String)>);

/// What `image create --from-bundle` takes from a bundle: the base image version (when the
/// bundle carries a base image; the highest if several) and the components of the base image
/// and of the selected add-ons (all add-ons when `addons` is empty; an add-on's component
/// version wins over the base image's). A bundle without a base image contributes the
/// components of its bulletins.
pub fn image_parts(bundle_path: &Path, addons: &[String]) -> Result<ImageParts, CliError> {
    let shown = bundle_path.display().to_string();
    let bundle = Bundle::open(open(bundle_path)?, &Limits::default())
        .map_err(|e| CliError::config("offline bundle", bundle_path, e))?;
    for want in addons {
        if !bundle.addons.iter().any(|a| a.name == *want) {
            let known: Vec<&str> = bundle.addons.iter().map(|a| a.name.as_str()).collect();
            return Err(CliError::Usage(format!(
                "{shown} has no add-on {want:?} (it has: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    let mut components: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, version: &str| match components.iter_mut().find(|(n, _)| n == name) {
        Some(c) => c.1 = version.to_owned(),
        None => components.push((name.to_owned(), version.to_owned())),
    };
    let base = bundle
        .base_images
        .iter()
        .max_by(|a, b| Version(a.version.clone()).cmp(&Version(b.version.clone())));
    if let Some(b) = base {
        for c in &b.components {
            put(&c.name, &c.version);
        }
    } else {
        let mut seen: Vec<(String, String)> = Vec::new();
        for c in bundle.bulletins.iter().filter_map(|b| b.component.as_ref()) {
            if let Some((_, v)) = seen.iter().find(|(n, _)| *n == c.name)
                && *v != c.version
            {
                return Err(CliError::Usage(format!(
                    "{shown} holds component {} in versions {v} and {}; choose one with --component",
                    c.name, c.version
                )));
            }
            seen.push((c.name.clone(), c.version.clone()));
            put(&c.name, &c.version);
        }
    }
    for a in bundle
        .addons
        .iter()
        .filter(|a| addons.is_empty() || addons.contains(&a.name))
    {
        for c in &a.components {
            put(&c.name, &c.version);
        }
    }
    Ok((base.map(|b| b.version.clone()), components))
}

//! `vibstagectl depot add`: put VIB files into a depot directory with their signed descriptors.
//!
//! The depot is the static tree of SPEC §1: `vibs/<sha256 hex>` holds the bytes,
//! `descriptors/<sha256 hex>.json` the DSSE envelope of the VIB descriptor, `images/<name>.json`
//! the images (see `image create`). Directories are made 0755 and files 0644 so that any static
//! web server can serve the tree as it is.
//!
//! Each file is streamed once through sha256 into a temporary file next to its destination,
//! fsynced and renamed into `vibs/`; a blob already present with the same digest is left alone
//! (and the copy dropped), so adding the same file twice is harmless. All arguments and names are
//! checked before anything is written.

use std::fs::{self, File, Permissions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};
use vibstage_protocol::version::Version;
use vibstage_protocol::{
    AcceptanceLevel, Digest, Envelope, Name, VIB_PAYLOAD_TYPE, VibDescriptor, VibKind, VibTarget,
};

use crate::error::{CliError, io_message};
use crate::files::{Existing, ensure_dir, sync_dir, write_file};

/// Mode of depot directories: readable and searchable by the web server.
pub(crate) const DIR_MODE: u32 = 0o755;
/// Mode of depot files: readable by the web server.
pub(crate) const FILE_MODE: u32 = 0o644;

/// The descriptor fields shared by every file of one `depot add`.
#[derive(Debug, Clone)]
pub struct VibSpec {
    /// Component name.
    pub component: Name,
    /// Component version.
    pub component_version: Version,
    /// Vendor.
    pub vendor: String,
    /// Acceptance level claimed.
    pub acceptance: AcceptanceLevel,
    /// Software or firmware.
    pub kind: VibKind,
    /// Host or DPU.
    pub target: VibTarget,
    /// VIB version (defaults to the component version).
    pub version: Option<Version>,
    /// Whether installing needs maintenance mode.
    pub maintenance_mode: bool,
    /// Whether installing needs a reboot.
    pub reboot_required: bool,
}

impl VibSpec {
    fn descriptor(&self, name: Name, sha256: Digest, size: u64) -> VibDescriptor {
        VibDescriptor {
            name,
            version: self
                .version
                .clone()
                .unwrap_or_else(|| self.component_version.clone()),
            vendor: self.vendor.clone(),
            component: self.component.clone(),
            component_version: self.component_version.clone(),
            acceptance: self.acceptance,
            kind: self.kind,
            target: self.target,
            sha256,
            size,
            maintenance_mode: self.maintenance_mode,
            reboot_required: self.reboot_required,
        }
    }
}

/// One file added to the depot.
#[derive(Debug, Clone)]
pub struct AddedVib {
    /// The signed descriptor's content.
    pub descriptor: VibDescriptor,
    /// `vibs/<hex>` in the depot.
    pub blob: PathBuf,
    /// `descriptors/<hex>.json` in the depot.
    pub descriptor_path: PathBuf,
    /// The blob was already in the depot (with the same digest) and was not copied again.
    pub already_present: bool,
}

/// The VIB name for `file`: `name` if given, else the file name without its extension.
fn vib_name(file: &Path, name: Option<&Name>) -> Result<Name, CliError> {
    if let Some(name) = name {
        return Ok(name.clone());
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).ok_or_else(|| {
        CliError::Usage(format!(
            "cannot derive a VIB name from {}; pass --name",
            file.display()
        ))
    })?;
    stem.parse().map_err(|e| {
        CliError::Usage(format!(
            "cannot use the name of {} as a VIB name ({e}); pass --name",
            file.display()
        ))
    })
}

/// A writer that hashes what it passes on.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 and length of a file already on disk (which may be a symbolic link), streamed.
fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    vibstage::store::hash_reader(File::open(path)?, 1 << 16)
}

/// Streams `file` into `vibs/` under its digest. Returns the digest, size and whether an
/// identical blob was already there.
fn store_blob(vibs: &Path, file: &Path) -> Result<(Digest, u64, bool), CliError> {
    let source =
        File::open(file).map_err(|e| CliError::config("VIB file", file, io_message(&e)))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(vibs)
        .map_err(|e| CliError::io("create a temporary file in", vibs, e))?;
    let mut writer = HashingWriter {
        inner: tmp,
        hasher: Sha256::new(),
    };
    let size = io::copy(&mut BufReader::with_capacity(1 << 16, source), &mut writer)
        .map_err(|e| CliError::io("copy", file, e))?;
    let HashingWriter { inner: tmp, hasher } = writer;
    let digest = Digest::from_bytes(hasher.finalize().into());
    let dest = vibs.join(digest.to_hex());

    if let Ok((existing, existing_size)) = hash_file(&dest)
        && existing == digest
        && existing_size == size
    {
        return Ok((digest, size, true));
    }
    tmp.as_file()
        .set_permissions(Permissions::from_mode(FILE_MODE))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| CliError::io("write", &dest, e))?;
    tmp.persist(&dest)
        .map_err(|e| CliError::io("write", &dest, e.error))?;
    sync_dir(vibs)?;
    Ok((digest, size, false))
}

/// Adds `files` to the depot at `depot`, signing each descriptor with `key`. Every name and
/// descriptor field is checked before the first byte is written. A file already in the depot
/// under another descriptor is refused (see [`add_with`]).
pub fn add(
    depot: &Path,
    key: &SigningKey,
    spec: &VibSpec,
    name: Option<&Name>,
    files: &[PathBuf],
) -> Result<Vec<AddedVib>, CliError> {
    add_with(depot, key, spec, name, files, false)
}

/// The descriptor the depot already holds for `digest`, if any (and if it reads as one).
fn existing_descriptor(descriptors: &Path, digest: &Digest) -> Option<VibDescriptor> {
    let path = descriptors.join(format!("{}.json", digest.to_hex()));
    let env: Envelope = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    serde_json::from_slice(&env.payload).ok()
}

/// What differs between two descriptors of the same bytes, as `field old -> new` items.
fn differences(old: &VibDescriptor, new: &VibDescriptor) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["descriptor".into()];
    };
    a.iter()
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, v)| {
            let new = b.get(k.as_str()).cloned().unwrap_or_default();
            format!("{k} {v} -> {new}")
        })
        .collect()
}

/// [`add`], and with `replace` a file already in the depot under another descriptor gets the
/// new one (`depot add --replace`). Without it that is refused, naming the existing descriptor:
/// the descriptor is signed and images built before carry it, so silently relabelling the bytes
/// would break them (issue 17, item 2). The same file added again with the same fields is
/// harmless.
pub fn add_with(
    depot: &Path,
    key: &SigningKey,
    spec: &VibSpec,
    name: Option<&Name>,
    files: &[PathBuf],
    replace: bool,
) -> Result<Vec<AddedVib>, CliError> {
    if name.is_some() && files.len() > 1 {
        return Err(CliError::Usage(
            "--name applies to a single FILE; name several files by their file names".into(),
        ));
    }
    let mut planned: Vec<(Name, &PathBuf)> = Vec::new();
    for file in files {
        let meta =
            fs::metadata(file).map_err(|e| CliError::config("VIB file", file, io_message(&e)))?;
        if !meta.is_file() {
            return Err(CliError::config("VIB file", file, "not a regular file"));
        }
        let vib = vib_name(file, name)?;
        if let Some((_, other)) = planned.iter().find(|(n, _)| *n == vib) {
            return Err(CliError::Usage(format!(
                "{} and {} would both be VIB {vib} of component {}",
                other.display(),
                file.display(),
                spec.component
            )));
        }
        // The digest and size do not matter for the text checks.
        spec.descriptor(vib.clone(), Digest::of(b""), 0)
            .validate()
            .map_err(|e| CliError::Usage(format!("VIB {vib} from {}: {e}", file.display())))?;
        if !replace {
            let descriptors = depot.join("descriptors");
            let (digest, size) =
                hash_file(file).map_err(|e| CliError::config("VIB file", file, io_message(&e)))?;
            if let Some(old) = existing_descriptor(&descriptors, &digest) {
                let new = spec.descriptor(vib.clone(), digest, size);
                let changed = differences(&old, &new);
                if !changed.is_empty() {
                    return Err(CliError::Usage(format!(
                        "{} is already in the depot as VIB {} {} of component {} {} (vendor {}, kind {}): {}; \
                         images built from that descriptor would no longer match it. Pass --replace to \
                         rewrite it anyway ({} differs)",
                        file.display(),
                        old.name,
                        old.version,
                        old.component,
                        old.component_version,
                        old.vendor,
                        old.kind.as_str(),
                        descriptors
                            .join(format!("{}.json", digest.to_hex()))
                            .display(),
                        changed.join(", ")
                    )));
                }
            }
        }
        planned.push((vib, file));
    }

    let vibs = depot.join("vibs");
    let descriptors = depot.join("descriptors");
    for dir in [depot, &vibs, &descriptors] {
        ensure_dir(dir, DIR_MODE)?;
    }

    let mut added = Vec::new();
    for (vib, file) in planned {
        let (digest, size, already_present) = store_blob(&vibs, file)?;
        let descriptor = spec.descriptor(vib, digest, size);
        let payload = serde_json::to_vec(&descriptor)
            .map_err(|e| CliError::io("encode descriptor of", file, e.into()))?;
        let envelope = Envelope::sign(VIB_PAYLOAD_TYPE, payload, key);
        let mut json = serde_json::to_vec_pretty(&envelope)
            .map_err(|e| CliError::io("encode descriptor of", file, e.into()))?;
        json.push(b'\n');
        let descriptor_path = descriptors.join(format!("{}.json", digest.to_hex()));
        write_file(&descriptor_path, &json, FILE_MODE, Existing::Replace)?;
        added.push(AddedVib {
            descriptor,
            blob: vibs.join(digest.to_hex()),
            descriptor_path,
            already_present,
        });
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vibstage_protocol::dsse::key_id;

    fn spec() -> VibSpec {
        VibSpec {
            component: "ESXi".parse().expect("name"),
            component_version: Version("8.0.2-0.20".into()),
            vendor: "acme".into(),
            acceptance: AcceptanceLevel::Partner,
            kind: VibKind::Software,
            target: VibTarget::Host,
            version: None,
            maintenance_mode: true,
            reboot_required: true,
        }
    }

    #[test]
    fn adds_by_digest_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("esx-base.vib");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&file, &bytes).expect("write");
        let depot = dir.path().join("depot");
        let key = SigningKey::from_bytes(&[7; 32]);

        let first = add(&depot, &key, &spec(), None, std::slice::from_ref(&file)).expect("add");
        let d = &first[0].descriptor;
        assert_eq!(d.name.as_str(), "esx-base");
        assert_eq!(d.version.as_str(), "8.0.2-0.20");
        assert_eq!(d.sha256, Digest::of(&bytes));
        assert_eq!(d.size, bytes.len() as u64);
        assert!(!first[0].already_present);
        assert_eq!(fs::read(&first[0].blob).expect("blob"), bytes);

        let env: Envelope =
            serde_json::from_slice(&fs::read(&first[0].descriptor_path).expect("read"))
                .expect("envelope");
        assert_eq!(env.signatures[0].keyid, key_id(&key.verifying_key()));
        assert!(env.signature_verifies(&env.signatures[0], &key.verifying_key()));

        let second = add(&depot, &key, &spec(), None, &[file]).expect("again");
        assert!(second[0].already_present);
        let leftovers = fs::read_dir(depot.join("vibs"))
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn relabelling_a_vib_in_the_depot_needs_replace() {
        // Issue 17, item 2: the same bytes added again under another component must not
        // rewrite the signed descriptor that images already carry.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bios.vib");
        fs::write(&file, b"firmware bytes").expect("write");
        let depot = dir.path().join("depot");
        let key = SigningKey::from_bytes(&[7; 32]);
        let first = add(&depot, &key, &spec(), None, std::slice::from_ref(&file)).expect("add");
        let before = fs::read(&first[0].descriptor_path).expect("descriptor");
        let mut other = spec();
        other.component = "BIOS".parse().expect("name");
        other.vendor = "dell".into();
        let e = add(&depot, &key, &other, None, std::slice::from_ref(&file)).expect_err("relabel");
        let text = e.to_string();
        assert_eq!(e.exit_code(), 2);
        assert!(text.contains("component ESXi"), "{text}");
        assert!(text.contains("--replace"), "{text}");
        assert!(
            text.contains(&first[0].descriptor_path.display().to_string()),
            "{text}"
        );
        assert_eq!(
            fs::read(&first[0].descriptor_path).expect("descriptor"),
            before
        );
        // The same fields again: harmless.
        add(&depot, &key, &spec(), None, std::slice::from_ref(&file)).expect("same again");
        // --replace rewrites it.
        let replaced = add_with(&depot, &key, &other, None, &[file], true).expect("replace");
        assert_eq!(replaced[0].descriptor.component.as_str(), "BIOS");
    }

    #[test]
    fn checks_everything_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("ok.vib");
        let bad = dir.path().join("bad name.vib");
        fs::write(&good, b"a").expect("write");
        fs::write(&bad, b"b").expect("write");
        let depot = dir.path().join("depot");
        let key = SigningKey::from_bytes(&[7; 32]);
        let e = add(&depot, &key, &spec(), None, &[good.clone(), bad]).expect_err("bad name");
        assert!(e.to_string().contains("bad name.vib"), "{e}");
        assert!(!depot.exists());

        let mut empty_vendor = spec();
        empty_vendor.vendor.clear();
        assert!(
            add(
                &depot,
                &key,
                &empty_vendor,
                None,
                std::slice::from_ref(&good)
            )
            .is_err()
        );
        let missing = dir.path().join("missing.vib");
        let e = add(&depot, &key, &spec(), None, &[missing]).expect_err("missing");
        assert_eq!(e.exit_code(), 2);
        assert!(!depot.exists());
    }
}

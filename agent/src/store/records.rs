//! Staged image records (`images/<digest>.json`), written after all their blobs are in.

use super::*;

/// One VIB of a staged image record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVib {
    /// VIB name.
    pub name: Name,
    /// Component it belongs to.
    pub component: Name,
    /// Software or firmware.
    pub kind: VibKind,
    /// Host or dpu.
    pub target: VibTarget,
    /// Blob digest.
    pub sha256: Digest,
    /// Blob size.
    pub size: u64,
}

/// A staged image, as recorded in `images/<digest>.json` once all its blobs are in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image.
    pub image: ImageRef,
    /// The signed image, kept so that remediation can work from the store alone.
    pub envelope: Envelope,
    /// The VIBs staged for it (software, staged firmware and dpu VIBs).
    pub vibs: Vec<StagedVib>,
    /// Firmware outcome.
    pub firmware: FirmwareState,
    /// DPU outcome.
    pub dpu: DpuState,
    /// Notifications of the staging (why firmware was not staged, …).
    pub notifications: Vec<Notification>,
    /// When staging finished.
    #[serde(with = "time::serde::rfc3339")]
    pub staged_at: OffsetDateTime,
}

impl ImageRecord {
    /// Total bytes of the record's blobs.
    pub fn bytes(&self) -> u64 {
        self.vibs
            .iter()
            .fold(0u64, |acc, v| acc.saturating_add(v.size))
    }
}

impl Store {
    /// Writes an image record atomically. Call only once all its blobs are committed.
    pub fn write_record(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.image.digest);
        fsutil::write_json(&path, record)
            .map_err(|e| StoreError::io("write", &path, e, || "image record".into()))
    }

    /// All image records, sorted by staging time (oldest first). Unparseable records are moved
    /// aside (`.broken`) and reported through `quarantined`.
    pub fn records(&self, quarantined: &mut Vec<PathBuf>) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.image_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            // Scratch removed under the agent: nothing is staged there any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            other => other.map_err(|e| StoreError::io("list", &dir, e, String::new))?,
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e, String::new))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(digest) = name
                .strip_suffix(".json")
                .and_then(|d| d.parse::<ImageDigest>().ok())
            else {
                continue;
            };
            // Something else than a file of the agent's (a symlink, a directory, a hard link)
            // is no record: moved aside, never followed, and the agent still starts.
            if !fs::symlink_metadata(&path).is_ok_and(|m| own_single_file(&m)) {
                let aside = path.with_extension("json.broken");
                let _ = fs::rename(&path, &aside);
                quarantined.push(aside);
                continue;
            }
            match fsutil::read_json::<ImageRecord>(&path) {
                Ok(Loaded::Ok(r)) if r.image.digest == digest => out.push(r),
                Ok(Loaded::Ok(_)) => {
                    let aside = path.with_extension("json.broken");
                    let _ = fs::rename(&path, &aside);
                    quarantined.push(aside);
                }
                Ok(Loaded::Quarantined(aside, _)) => quarantined.push(aside),
                Ok(Loaded::Missing) => {}
                Err(e) => return Err(StoreError::io("read", &path, e, String::new)),
            }
        }
        out.sort_by_key(|r| r.staged_at);
        Ok(out)
    }

    /// The record of one image, if staged here.
    pub fn record(&self, digest: &ImageDigest) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(digest);
        match fsutil::read_json::<ImageRecord>(&path) {
            Ok(Loaded::Ok(r)) => Ok(Some(r)),
            Ok(_) => Ok(None),
            Err(e) => Err(StoreError::io("read", &path, e, String::new)),
        }
    }

    /// Removes an image record, then every blob no remaining record needs. Returns whether the
    /// record existed.
    pub fn remove_image(&self, digest: &ImageDigest) -> Result<bool, StoreError> {
        let path = self.record_path(digest);
        let existed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io("remove", &path, e, String::new)),
        };
        if existed {
            fsutil::fsync_dir(&self.image_dir())
                .map_err(|e| StoreError::io("fsync", &self.image_dir(), e, String::new))?;
            // Only a removed record can leave blobs unreferenced: a deletion that removed
            // nothing must not collect anything (issue 11, item 1).
            self.collect_garbage(&BTreeSet::new())?;
        }
        Ok(existed)
    }
}

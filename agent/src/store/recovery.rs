//! Start-up recovery: partial downloads kept for resumption, strays removed, optionally every
//! blob re-hashed (scrub), unreadable records moved aside.

use super::*;

/// What start-up recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Partial downloads kept for resumption.
    pub partials_kept: usize,
    /// Stray files removed (temporary files, unknown names).
    pub strays_removed: Vec<PathBuf>,
    /// Blobs removed because their bytes were wrong (scrub) or their size was off.
    pub blobs_removed: Vec<Digest>,
    /// Permission fixes made.
    pub fixed: Vec<String>,
    /// Image records that could not be parsed and were moved aside.
    pub records_quarantined: Vec<PathBuf>,
}

impl Store {
    /// Start-up recovery: removes stray files, tightens modes, and with `scrub` re-hashes every
    /// blob, removing any whose bytes are wrong. Partial downloads are kept for resumption unless
    /// `max_partial_age` has passed since they were last written.
    pub fn recover(
        &self,
        scrub: bool,
        max_partial_age: std::time::Duration,
    ) -> Result<Recovery, StoreError> {
        let mut rec = Recovery::default();
        let ingest = self.ingest_dir();
        for entry in
            fs::read_dir(&ingest).map_err(|e| StoreError::io("list", &ingest, e, String::new))?
        {
            let entry = entry.map_err(|e| StoreError::io("list", &ingest, e, String::new))?;
            let path = entry.path();
            let name = entry.file_name();
            let valid = name
                .to_str()
                .and_then(|n| n.strip_suffix(".partial"))
                .is_some_and(|d| d.parse::<Digest>().is_ok());
            let old = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_partial_age);
            let own = fs::symlink_metadata(&path).is_ok_and(|m| own_single_file(&m));
            if valid && !old && own {
                rec.partials_kept += 1;
            } else {
                remove_entry(&path);
                rec.strays_removed.push(path);
            }
        }
        let blobs = self.blob_dir();
        for entry in
            fs::read_dir(&blobs).map_err(|e| StoreError::io("list", &blobs, e, String::new))?
        {
            let entry = entry.map_err(|e| StoreError::io("list", &blobs, e, String::new))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| StoreError::io("stat", &path, e, String::new))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                remove_entry(&path);
                rec.strays_removed.push(path);
                continue;
            };
            // A hard link here would make the chmod below change a file elsewhere.
            if !own_single_file(&meta) {
                remove_entry(&path);
                rec.blobs_removed.push(digest);
                continue;
            }
            if meta.mode() & 0o7777 != 0o400 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o400))
                    .map_err(|e| StoreError::io("chmod", &path, e, String::new))?;
                rec.fixed.push(format!(
                    "{}: mode {:o} set to 400",
                    path.display(),
                    meta.mode() & 0o7777
                ));
            }
            if scrub
                && hash_file(&path).map_err(|e| StoreError::io("read", &path, e, String::new))?
                    != digest
            {
                fs::remove_file(&path)
                    .map_err(|e| StoreError::io("remove", &path, e, String::new))?;
                rec.blobs_removed.push(digest);
            }
        }
        self.records(&mut rec.records_quarantined)?;
        Ok(rec)
    }
}

//! Garbage collection: blobs that no staged image record references are removed.

use super::*;

impl Store {
    /// Deletes blobs that no record references and that are not in `keep`.
    pub fn collect_garbage(&self, keep: &BTreeSet<Digest>) -> Result<Vec<Digest>, StoreError> {
        let mut referenced: BTreeSet<Digest> = keep.clone();
        for r in self.records(&mut Vec::new())? {
            referenced.extend(r.vibs.iter().map(|v| v.sha256));
        }
        let mut removed = Vec::new();
        for digest in self.blob_digests()? {
            if !referenced.contains(&digest) {
                let p = self.blob_path(&digest);
                fs::remove_file(&p).map_err(|e| StoreError::io("remove", &p, e, String::new))?;
                removed.push(digest);
            }
        }
        if !removed.is_empty() {
            fsutil::fsync_dir(&self.blob_dir())
                .map_err(|e| StoreError::io("fsync", &self.blob_dir(), e, String::new))?;
        }
        Ok(removed)
    }

    pub(super) fn blob_digests(&self) -> Result<Vec<Digest>, StoreError> {
        let dir = self.blob_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e, String::new))? {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e, String::new))?;
            if let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Which of a record's blobs are missing (absent or of the wrong size).
    pub fn missing_blobs(&self, record: &ImageRecord) -> Vec<Digest> {
        record
            .vibs
            .iter()
            .filter(|v| !self.has_blob(&v.sha256, v.size))
            .map(|v| v.sha256)
            .collect()
    }
}

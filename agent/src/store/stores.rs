//! The stores staging may use: `scratch.path`, and the volatile fallback (`scratch.volatile_path`)
//! if one is configured.

use super::*;

/// The stores staging may use: scratch, and the volatile fallback if configured.
#[derive(Debug)]
pub struct Stores {
    /// `scratch.path`: survives reboots.
    pub persistent: Store,
    /// `scratch.volatile_path`, if set.
    pub volatile: Option<Store>,
    /// Free space always left on a filesystem.
    pub reserve_bytes: u64,
}

impl Stores {
    /// Both stores, persistent first, with their persistence flag.
    pub fn all(&self) -> impl Iterator<Item = (&Store, bool)> {
        std::iter::once((&self.persistent, true)).chain(self.volatile.iter().map(|s| (s, false)))
    }

    /// The store holding an image's record, if any.
    pub fn find(
        &self,
        digest: &ImageDigest,
    ) -> Result<Option<(&Store, bool, ImageRecord)>, StoreError> {
        for (store, persistent) in self.all() {
            if let Some(r) = store.record(digest)? {
                return Ok(Some((store, persistent, r)));
            }
        }
        Ok(None)
    }

    /// Deletes an image's staged content wherever it is. Returns whether there was any.
    pub fn remove(&self, digest: &ImageDigest) -> Result<bool, StoreError> {
        let mut any = false;
        for (store, _) in self.all() {
            any |= store.remove_image(digest)?;
        }
        Ok(any)
    }
}

//! Free space of a store's filesystem.

use super::*;

/// Free space of the store's filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// Filesystem size.
    pub total: u64,
    /// Bytes available to the agent.
    pub free: u64,
}

impl Store {
    /// Size and free space of the store's filesystem (statvfs).
    pub fn space(&self) -> Result<Space, StoreError> {
        space_of(&self.root)
    }
}

/// statvfs of a path: total size and space available to unprivileged writers.
pub fn space_of(path: &Path) -> Result<Space, StoreError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| StoreError::io("statvfs", path, io::Error::from(e), String::new))?;
    let frsize = st.fragment_size() as u64;
    Ok(Space {
        total: st.blocks() as u64 * frsize,
        free: st.blocks_available() as u64 * frsize,
    })
}

//! The benchmark's environment types: the binaries under test, a signed image in the depot, and
//! [`Env`] itself (built by `setup`). Below `setup` and `agent`, so that neither imports the
//! other's world.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use vibstage_protocol::Digest;

use crate::nginx::Nginx;
use crate::{BenchError, Result};

/// The binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `vibstaged`.
    pub vibstaged: PathBuf,
    /// `vibstagectl`.
    pub vibstagectl: PathBuf,
}

impl Bins {
    /// Finds both in `dir`, or next to this executable (`target/<profile>/`, where cargo puts
    /// every binary of the workspace).
    pub fn find(dir: Option<&Path>) -> Result<Bins> {
        let dir = match dir {
            Some(d) => d.to_owned(),
            None => {
                let exe =
                    std::env::current_exe().map_err(BenchError::io("find this executable"))?;
                let mut dir = exe.parent().map(Path::to_owned).unwrap_or_default();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir
            }
        };
        let find = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(BenchError::Setup(format!(
                    "{} not found: build it first (`cargo build --release -p vibstage -p vibstage-ctl --bins`, \
                     or without --release for a debug bench), or pass --bin-dir",
                    p.display()
                )))
            }
        };
        Ok(Bins {
            vibstaged: find("vibstaged")?,
            vibstagectl: find("vibstagectl")?,
        })
    }
}

/// A signed image written into the depot.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// `images/<name>.json` in the depot.
    pub path: PathBuf,
    /// The envelope, as JSON (the body of a stage request).
    pub envelope: serde_json::Value,
    /// Its VIBs: depot file, digest, size.
    pub vibs: Vec<(PathBuf, Digest, u64)>,
}

impl ImageFile {
    /// Total bytes of its VIBs.
    pub fn bytes(&self) -> u64 {
        self.vibs.iter().map(|v| v.2).sum()
    }

    /// The depot URLs of its VIBs.
    pub fn urls(&self, depot: &str) -> Vec<String> {
        self.vibs
            .iter()
            .map(|(_, d, _)| format!("{depot}vibs/{}", d.to_hex()))
            .collect()
    }
}

/// Everything the figures share.
#[derive(Debug)]
pub struct Env {
    /// The work directory (a `TempDir` unless `--dir` or `--keep`).
    pub(crate) _temp: Option<tempfile::TempDir>,
    /// Its path.
    pub dir: PathBuf,
    /// The binaries under test.
    pub bins: Bins,
    /// Signs images.
    pub image_key: SigningKey,
    /// Signs VIB descriptors.
    pub vendor_key: SigningKey,
    /// `ca.pem`, `client.pem`, `client.key` (vibstagectl's `--tls-dir`).
    pub tls_dir: PathBuf,
    /// The depot directory.
    pub depot_dir: PathBuf,
    /// nginx serving the depot.
    pub nginx: Nginx,
    /// The file nginx serves as `/v1/status` on its mTLS port (P6 writes a real status into it).
    pub status_file: PathBuf,
    /// The OCI distribution tree nginx serves under `/v2/` (P1's containerd peer).
    pub oci_dir: PathBuf,
    /// Keep agents' directories (their logs) for inspection.
    pub(crate) keep: bool,
    /// Images already in the depot, by name, so that figures sharing one build it once.
    pub(crate) images: RefCell<HashMap<String, ImageFile>>,
}

//! The agent's persisted state in `state_dir` (root 0700): compliance, rollback serials, the
//! installed image and maintenance mode. Replaced atomically on every change; a corrupt file is
//! moved aside and the state rebuilt from what is on disk (the store's records).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vibstage_protocol::api::{ComplianceReport, ImageRef};
use vibstage_protocol::{Digest, ImageDigest, Name, Version};

use crate::fsutil::{self, Loaded};

/// What is installed on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstalledImage {
    /// The image.
    pub image: ImageRef,
    /// Its base image version.
    pub base_image: Version,
    /// Installed components and their versions.
    pub components: BTreeMap<Name, Version>,
    /// Installed VIB blobs.
    pub vibs: BTreeSet<Digest>,
}

/// Everything the agent must remember across restarts (besides tasks and staged content).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The last compliance report, if any.
    pub compliance: Option<ComplianceReport>,
    /// Highest serial accepted per image name (rollback protection).
    pub serials: BTreeMap<Name, u64>,
    /// The installed image; `None` on a host never remediated.
    pub installed: Option<InstalledImage>,
    /// Whether an install is waiting for a reboot.
    pub reboot_required: bool,
    /// True exactly while the host is in maintenance mode.
    pub maintenance_active: bool,
    /// Images whose last stage or remediation failed (for status), by digest.
    pub last_failure: Option<ImageDigest>,
}

impl State {
    /// Raises the rollback serials to at least those of `images` (staged or installed images,
    /// which were accepted), so that rollback protection survives a lost or corrupt state file.
    /// Returns whether anything changed.
    pub fn remember_serials<'a>(&mut self, images: impl IntoIterator<Item = &'a ImageRef>) -> bool {
        let mut changed = false;
        for image in images {
            let serial = self.serials.entry(image.name.clone()).or_insert(0);
            if *serial < image.serial {
                *serial = image.serial;
                changed = true;
            }
        }
        changed
    }

    /// The installed VIB digests (empty when nothing is installed).
    pub fn installed_vibs(&self) -> BTreeSet<Digest> {
        self.installed
            .as_ref()
            .map(|i| i.vibs.clone())
            .unwrap_or_default()
    }
}

/// The state file.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `state_dir/state.json`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("state.json"),
        }
    }

    /// Loads the state; a corrupt file is moved aside (`.broken`) and a fresh state returned
    /// with the reason.
    pub fn load(&self) -> std::io::Result<(State, Option<String>)> {
        Ok(match fsutil::read_json::<State>(&self.path)? {
            Loaded::Ok(s) => (s, None),
            Loaded::Missing => (State::default(), None),
            Loaded::Quarantined(aside, why) => (
                State::default(),
                Some(format!(
                    "state file was corrupt ({why}); moved to {} and state rebuilt",
                    aside.display()
                )),
            ),
        })
    }

    /// Replaces the state file atomically.
    pub fn save(&self, state: &State) -> std::io::Result<()> {
        fsutil::write_json(&self.path, state)
    }
}

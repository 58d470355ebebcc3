//! Remediation (SPEC §6 R2, R6, R7, R8, R10; §4 `[maintenance]`, `[install]`): stage whatever is
//! missing (firmware included), and only then enter maintenance mode, install, and leave
//! maintenance mode.
//!
//! Crash safety: maintenance mode is persisted as soon as it is entered and cleared only after the
//! exit command succeeded, so a restarted agent reports it truthfully and leaves it only through
//! the exit command. Installing is [`crate::install`]'s (the command, or the built-in installer
//! whose bank switch is atomic); the commands around it are [`crate::hook`]'s.

use std::collections::BTreeSet;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use vibstage_protocol::api::{Impact, Notification};
use vibstage_protocol::{Digest, ImageDigest, VerifiedImage};

use crate::agent::lock;
use crate::config::Config;
use crate::fetch::DepotUrl;
use crate::hook;
use crate::install::{self, InstallError};
use crate::stage::{HostPolicy, StageError, StageProgress, Stager, parts_of};
use crate::state::{State, StateFile};
use crate::store::StoreError;

/// Why a remediation step failed (staging and the store have their own errors). Each message
/// names the step and, for a command, the program and what it did.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemediateError {
    /// Staging what was missing failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The store failed (finding the staged record, removing it after the install).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state file could not record the maintenance mode.
    #[error("failed to save agent state: {0}")]
    SaveState(#[source] io::Error),
    /// The staged image's record was gone right after staging it.
    #[error("staged image record vanished")]
    RecordVanished {
        /// The image.
        image: ImageDigest,
    },
    /// Staging ended without everything the image needs, so maintenance mode was not entered.
    #[error("not everything could be staged, so maintenance mode was not entered: {why}")]
    Incomplete {
        /// The staging notifications, joined.
        why: String,
    },
    /// `maintenance.enter` or `maintenance.exit` failed, could not run or timed out.
    #[error("{0}")]
    Maintenance(String),
    /// The installer (command or built-in) failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The image was installed but the state file could not record it.
    #[error("image {image} was installed, but failed to save agent state: {source}")]
    Record {
        /// The installed image.
        image: ImageDigest,
        /// Why the save failed.
        #[source]
        source: io::Error,
    },
}

/// One remediation of one image: what it works with, borrowed from the agent for the task's
/// length. The agent builds it (after reading what its state says) and runs it in the task.
pub struct Remediation<'a> {
    /// `[maintenance]` and `[install]` settings, `agent.state_dir` for the built-in installer.
    pub config: &'a Config,
    /// Stages what is missing, and through its stores finds and removes the staged image.
    pub stager: &'a Stager,
    /// The agent's state: maintenance mode and the installed image are recorded in it as soon
    /// as they change, so that a restarted agent reports them truthfully.
    pub state: &'a Mutex<State>,
    /// Where `state` is persisted.
    pub state_file: &'a StateFile,
    /// What the host is; its firmware vendors are widened to the image's (R6).
    pub policy: HostPolicy,
    /// Called with each step's name as it starts (the task shows it).
    pub step: &'a (dyn Fn(&str) + Send + Sync),
}

/// What the agent's state said when the remediation was asked for.
#[derive(Debug)]
pub struct Before {
    /// An earlier remediation of this image installed it and was cut short before it left
    /// maintenance mode: only its last steps remain.
    pub finishing: bool,
    /// The VIBs installed now (not staged again).
    pub installed_vibs: BTreeSet<Digest>,
    /// What installing the image implies (R8): a reboot is recorded as required.
    pub impact: Impact,
}

impl Remediation<'_> {
    /// Runs the remediation: stage what is missing, enter maintenance mode, install, exit
    /// maintenance mode, remove the staged content. Returns the notifications to report.
    pub async fn run(
        &self,
        image: &VerifiedImage,
        depots: &[DepotUrl],
        progress: &StageProgress,
        before: Before,
    ) -> Result<Vec<Notification>, RemediateError> {
        let step = self.step;
        let Before {
            finishing,
            installed_vibs,
            impact,
        } = before;
        if finishing {
            step("exiting maintenance mode");
            self.maintenance(false).await?;
            self.stager.stores().remove(&image.digest)?;
            return Ok(Vec::new());
        }

        // R2, R10: stage whatever is missing; R6: now including firmware of any vendor.
        step("staging");
        let mut policy = self.policy.clone();
        policy.firmware_vendors = image
            .vibs
            .iter()
            .map(|v| v.descriptor.vendor.clone())
            .collect();
        self.stager
            .stage(image, depots, &installed_vibs, &policy, progress)
            .await?;
        let stores = self.stager.stores();
        let Some((store, _, record)) = stores.find(&image.digest)? else {
            return Err(RemediateError::RecordVanished {
                image: image.digest,
            });
        };
        let parts = parts_of(&record, store);
        if !parts.staged {
            let why: Vec<&str> = record
                .notifications
                .iter()
                .map(|n| n.message.as_str())
                .collect();
            return Err(RemediateError::Incomplete {
                why: why.join("; "),
            });
        }

        // R7: maintenance mode only now that staging is complete (and only once: a host left in
        // maintenance mode by an interrupted remediation is already there).
        step("entering maintenance mode");
        if !lock(self.state).maintenance_active
            && let Err(e) = self.maintenance(true).await
        {
            // Undo whatever part of the entry happened.
            let _ = self.maintenance(false).await;
            return Err(e);
        }

        step("installing");
        let installed =
            install::install(self.config, self.policy.has_dpus, image, &record, store).await;
        // Whatever happens from here on, maintenance mode is left through the exit command:
        // a failure to record the install must not keep the host out of service (issue 11,
        // item 3). The memory state says what the installer did; if the state file cannot be
        // written, the next save writes it, and the built-in installer's bank (what start-up
        // reads) already says the same.
        let recorded = match &installed {
            Ok(new) => {
                let mut state = lock(self.state);
                state.installed = Some(new.clone());
                state.reboot_required = impact == Impact::Reboot;
                self.state_file
                    .save(&state)
                    .map_err(|source| RemediateError::Record {
                        image: image.digest,
                        source,
                    })
            }
            Err(_) => Ok(()),
        };

        step("exiting maintenance mode");
        let exited = self.maintenance(false).await;
        installed?;
        recorded?;
        exited?;

        // After a successful remediation the image's staged content is removed.
        stores.remove(&image.digest)?;
        Ok(record
            .notifications
            .into_iter()
            .filter(|n| !n.code.starts_with("firmware_staging"))
            .collect())
    }

    /// Runs the `maintenance.enter` (or `exit`) command, then records the new mode.
    async fn maintenance(&self, enter: bool) -> Result<(), RemediateError> {
        let m = &self.config.maintenance;
        let (what, argv) = if enter {
            ("maintenance.enter", &m.enter)
        } else {
            ("maintenance.exit", &m.exit)
        };
        let timeout = Duration::from_secs(m.timeout_secs);
        if enter {
            // Recorded before the hook runs: an agent killed while `enter` runs (the hook may
            // finish without it) must come back knowing the host may be in maintenance mode,
            // and leave it only through `exit`. A failed `enter` is undone by the caller, which
            // runs `exit` and records the mode as left.
            self.set_maintenance(true)?;
            return hook::run(what, argv, &[], timeout)
                .await
                .map_err(RemediateError::Maintenance);
        }
        hook::run(what, argv, &[], timeout)
            .await
            .map_err(RemediateError::Maintenance)?;
        self.set_maintenance(false)
    }

    /// Records maintenance mode. Entering is recorded on disk before the hook runs (if that
    /// fails, the hook does not run and nothing changes); leaving is recorded after the exit
    /// hook ran, in memory whatever the disk does, since the host did leave it.
    fn set_maintenance(&self, active: bool) -> Result<(), RemediateError> {
        let mut state = lock(self.state);
        if active {
            let mut next = state.clone();
            next.maintenance_active = true;
            self.state_file
                .save(&next)
                .map_err(RemediateError::SaveState)?;
            *state = next;
            Ok(())
        } else {
            state.maintenance_active = false;
            self.state_file
                .save(&state)
                .map_err(RemediateError::SaveState)
        }
    }
}

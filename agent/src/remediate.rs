//! Remediation (SPEC §6 R2, R6, R7, R8, R10; §4 `[maintenance]`, `[install]`): stage whatever is
//! missing (firmware included), and only then enter maintenance mode, install, and leave
//! maintenance mode.
//!
//! Crash safety: maintenance mode is persisted as soon as it is entered and cleared only after the
//! exit command succeeded, so a restarted agent reports it truthfully and leaves it only through
//! the exit command. Installing is [`crate::install`]'s (the command, or the built-in installer
//! whose bank switch is atomic); the commands around it are [`crate::hook`]'s.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use vibstage_protocol::api::{Impact, Notification};
use vibstage_protocol::{Envelope, ImageDigest, VerifiedImage};

use crate::agent::{Agent, LifecycleError, lock};
use crate::hook;
use crate::install::{self, InstallError};
use crate::stage::{StageProgress, parts_of};

/// Why a remediation step failed (staging and the store have their own errors). Each message
/// names the step and, for a command, the program and what it did.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemediateError {
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

impl Agent {
    /// The remediation task's body.
    pub(crate) async fn run_remediation(
        self: &Arc<Self>,
        task_id: &str,
        env: &Envelope,
        image: &VerifiedImage,
        depots: &[reqwest::Url],
        progress: &StageProgress,
    ) -> Result<Vec<Notification>, LifecycleError> {
        let step = |s: &str| {
            tracing::info!(task = task_id, step = s, "remediation");
            self.tasks.update(task_id, |t| t.step = Some(s.to_owned()));
        };
        // An earlier remediation installed this image and was cut short (the agent killed)
        // before it left maintenance mode: only its last steps remain.
        let finishing = {
            let state = lock(&self.state);
            state.maintenance_active
                && state
                    .installed
                    .as_ref()
                    .is_some_and(|i| i.image.digest == image.digest)
        };
        if finishing {
            step("exiting maintenance mode");
            self.maintenance(false).await?;
            self.stager.stores().remove(&image.digest)?;
            return Ok(Vec::new());
        }
        let (installed_vibs, impact) = {
            let state = lock(&self.state);
            (state.installed_vibs(), self.evaluate(image, &state).impact)
        };

        // R2, R10: stage whatever is missing; R6: now including firmware of any vendor.
        step("staging");
        let mut policy = self.host_policy();
        policy.firmware_vendors = image
            .vibs
            .iter()
            .map(|v| v.descriptor.vendor.clone())
            .collect();
        self.stager
            .stage(env, image, depots, &installed_vibs, &policy, progress)
            .await?;
        let stores = self.stager.stores();
        let Some((store, _, record)) = stores.find(&image.digest)? else {
            return Err(RemediateError::RecordVanished {
                image: image.digest,
            }
            .into());
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
            }
            .into());
        }

        // R7: maintenance mode only now that staging is complete (and only once: a host left in
        // maintenance mode by an interrupted remediation is already there).
        step("entering maintenance mode");
        if !lock(&self.state).maintenance_active
            && let Err(e) = self.maintenance(true).await
        {
            // Undo whatever part of the entry happened.
            let _ = self.maintenance(false).await;
            return Err(e);
        }

        step("installing");
        let installed = install::install(
            &self.config,
            self.host_policy().has_dpus,
            image,
            &record,
            store,
        )
        .await
        .map_err(RemediateError::from);
        // Whatever happens from here on, maintenance mode is left through the exit command:
        // a failure to record the install must not keep the host out of service (issue 11,
        // item 3). The memory state says what the installer did; if the state file cannot be
        // written, the next save writes it, and the built-in installer's bank (what start-up
        // reads) already says the same.
        let recorded = match &installed {
            Ok(new) => {
                let mut state = lock(&self.state);
                state.installed = Some(new.clone());
                state.reboot_required = impact == Impact::Reboot;
                self.state_file.save(&state).map_err(|source| {
                    LifecycleError::from(RemediateError::Record {
                        image: image.digest,
                        source,
                    })
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
    async fn maintenance(&self, enter: bool) -> Result<(), LifecycleError> {
        let m = &self.config.maintenance;
        let (what, argv) = if enter {
            ("maintenance.enter", &m.enter)
        } else {
            ("maintenance.exit", &m.exit)
        };
        let timeout = Duration::from_secs(m.timeout_secs);
        hook::run(what, argv, &[], timeout)
            .await
            .map_err(RemediateError::Maintenance)?;
        let mut state = lock(&self.state);
        state.maintenance_active = enter;
        self.save(&state)
    }
}

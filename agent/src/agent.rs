//! The agent: verified operations over the store, the state and the task list. The API calls
//! these methods; they know nothing of HTTP.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use time::OffsetDateTime;
use vibstage_protocol::api::{
    ComplianceReport, ComplianceStatus, ComplianceSummary, DpuState, ErrorDetail, FirmwareState,
    HostStatus, ImageRef, InstalledSummary, MaintenanceSummary, Notification, ScratchSummary,
    SoftwareState, StagedImage, StagingState, StagingSummary, Task, TaskKind, TaskState,
};
use vibstage_protocol::trust::verify_image_content;
use vibstage_protocol::{
    Envelope, ImageDigest, TrustStore, VerifiedImage, VerifyError, verify_image,
};

use vibstage_protocol::api::DepotList;

use crate::compliance;
use crate::config::Config;
use crate::fetch::{DepotUrl, FetchError};
use crate::metrics::Metrics;
use crate::remediate::{Before, RemediateError, Remediation};
use crate::stage::{HostPolicy, StageError, StageProgress, Stager, parts_of};
use crate::state::{State, StateFile};
use crate::store::StoreError;
use crate::tasks::{TaskRequest, Tasks};

/// Why a lifecycle operation (check, stage, remediate, a deletion of staged content, status) was
/// refused or failed: each subsystem's own error, wrapped as it is (its `source()` chain kept),
/// or a refusal of the lifecycle itself. Which SPEC error code and HTTP status each one is gets
/// decided at the API edge, in one place (`api::error::detail_of`), which the agent is handed at
/// start-up to record a failed task's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// The image or a descriptor was refused.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Staging failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The content store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A depot of the request is unusable.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A remediation step failed.
    #[error(transparent)]
    Remediate(#[from] RemediateError),
    /// Another stage or remediation is running (for another image, or the other operation on
    /// this one).
    #[error("task {task} is running for {what}")]
    Busy {
        /// The running task.
        task: String,
        /// What it runs for, in words.
        what: &'static str,
    },
    /// Staged content cannot be deleted while a lifecycle task runs (issue 11, item 1).
    #[error(
        "task {task} is staging or remediating image {image}; staged content can be deleted once it ends"
    )]
    BusyStaging {
        /// The running task.
        task: String,
        /// Its image.
        image: ImageDigest,
    },
    /// No staged image has this digest.
    #[error("no staged image {0}")]
    NotStaged(ImageDigest),
    /// The image cannot run on this host.
    #[error("image {image} is incompatible with this host: {why}")]
    Incompatible {
        /// The image's name.
        image: vibstage_protocol::Name,
        /// The compliance notifications that say why.
        why: String,
    },
    /// A request names no depot, or more than [`DepotList::MAX`].
    #[error(
        "a request names 1 to {} depots; this one names {count}",
        DepotList::MAX
    )]
    DepotCount {
        /// How many it names.
        count: usize,
    },
    /// The state file could not be written.
    #[error("failed to save agent state: {0}")]
    SaveState(#[source] std::io::Error),
    /// The agent stopped while the task ran, and the task cannot be resumed.
    #[error("the agent stopped while this task was running (step: {step})")]
    Interrupted {
        /// The step it was at.
        step: String,
    },
}

/// Turns a lifecycle error into the error a task records (code and message): the API's mapping,
/// handed to [`Agent::new`] so that this layer does not choose codes.
pub type Describe = fn(&LifecycleError) -> ErrorDetail;

/// What a stage or remediate request led to.
#[derive(Debug)]
pub enum Started {
    /// A new task (202).
    New(Task),
    /// The running task for the same image (202).
    Joined(Task),
    /// Nothing to do: the host is compliant (200, R12).
    NothingToDo(Vec<Notification>),
}

#[derive(Debug, Clone)]
pub(crate) struct Running {
    task_id: String,
    digest: ImageDigest,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    host_id: String,
    config: Config,
    trust: RwLock<Arc<TrustStore>>,
    stager: Stager,
    state: Mutex<State>,
    state_file: StateFile,
    tasks: Tasks,
    metrics: Metrics,
    running: Mutex<Option<Running>>,
    jobs: Mutex<tokio::task::JoinSet<()>>,
    /// Bounds how many requests verify signatures at once (one per core): verification is the
    /// one expensive thing an authenticated client can make the agent do per request.
    verification_slots: tokio::sync::Semaphore,
    /// The API's mapping of an error to the code and message a failed task records.
    describe: Describe,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an agent is assembled from at start-up (see `daemon::run`).
#[derive(Debug)]
pub struct Parts {
    /// Reported in status.
    pub host_id: String,
    /// The configuration read at start (SIGHUP changes only the trust store and `[depot]`).
    pub config: Config,
    /// The keys images and descriptors are verified against.
    pub trust: TrustStore,
    /// Stages content into the stores.
    pub stager: Stager,
    /// The state loaded from `state_dir`.
    pub state: State,
    /// The task list loaded from `state_dir`.
    pub tasks: Tasks,
    /// The counters `/metrics` shows.
    pub metrics: Metrics,
    /// The API's mapping of errors to what a failed task records.
    pub describe: Describe,
}

impl Agent {
    /// Assembles an agent from its parts.
    pub fn new(parts: Parts) -> Arc<Self> {
        let Parts {
            host_id,
            config,
            trust,
            stager,
            state,
            tasks,
            metrics,
            describe,
        } = parts;
        let state_file = StateFile::new(&config.agent.state_dir);
        Arc::new(Agent {
            host_id,
            config,
            trust: RwLock::new(Arc::new(trust)),
            stager,
            state: Mutex::new(state),
            state_file,
            tasks,
            metrics,
            running: Mutex::new(None),
            jobs: Mutex::new(tokio::task::JoinSet::new()),
            verification_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
            describe,
        })
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The task list.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// The counters `/metrics` renders (verification failures, downloads, tasks).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Permits for signature verification (see `api::handlers::off_worker`).
    pub fn verification_slots(&self) -> &tokio::sync::Semaphore {
        &self.verification_slots
    }

    /// The stager (and through it the stores and depot client).
    pub fn stager(&self) -> &Stager {
        &self.stager
    }

    /// Replaces the trust store (SIGHUP).
    pub fn set_trust(&self, trust: TrustStore) {
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(trust);
    }

    fn trust(&self) -> Arc<TrustStore> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn host_policy(&self) -> HostPolicy {
        HostPolicy {
            has_dpus: !self.config.host.dpus.is_empty(),
            firmware_vendors: self.config.host.firmware_staging_vendors.clone(),
        }
    }

    /// Saves `next` and only then makes it the state: a request refused because its state
    /// could not be saved changes nothing, not even in memory (issue 12: a refused check still
    /// showed its image in status, and a refused stage still raised the rollback serial).
    fn commit(&self, state: &mut State, next: State) -> Result<(), LifecycleError> {
        self.save(&next)?;
        *state = next;
        Ok(())
    }

    fn save(&self, state: &State) -> Result<(), LifecycleError> {
        self.state_file
            .save(state)
            .map_err(LifecycleError::SaveState)
    }

    /// Verifies an image; `for_install` adds the host's acceptance level.
    fn verify(&self, env: &Envelope, for_install: bool) -> Result<VerifiedImage, LifecycleError> {
        let trust = self.trust();
        let now = OffsetDateTime::now_utc();
        let serials = lock(&self.state).serials.clone();
        let highest = |name: &vibstage_protocol::Name| serials.get(name).copied();
        let result = if for_install {
            verify_image(
                env,
                &trust,
                self.config.agent.acceptance_level,
                now,
                highest,
            )
        } else {
            verify_image_content(env, &trust, now, highest)
        };
        result.map_err(|e| {
            self.metrics.verification_failed(e.code());
            e.into()
        })
    }

    fn fully_staged(&self, digest: &ImageDigest) -> bool {
        matches!(self.stager.stores().find(digest), Ok(Some((store, _, record))) if parts_of(&record, store).staged)
    }

    fn evaluate(&self, image: &VerifiedImage, state: &State) -> ComplianceReport {
        compliance::evaluate(
            image,
            state.installed.as_ref(),
            self.config.agent.acceptance_level,
            self.host_policy().has_dpus,
            self.fully_staged(&image.digest),
        )
    }

    /// `POST /v1/compliance/check`.
    pub fn check(&self, env: &Envelope) -> Result<ComplianceReport, LifecycleError> {
        let image = self.verify(env, false)?;
        let mut state = lock(&self.state);
        let report = self.evaluate(&image, &state);
        let mut next = state.clone();
        next.compliance = Some(report.clone());
        self.commit(&mut state, next)?;
        Ok(report)
    }

    /// `POST /v1/stage` (`kind` = stage) and `POST /v1/remediate` (`kind` = remediate):
    /// verifies the image, applies R12, and starts (or joins) the task.
    pub fn start(
        self: &Arc<Self>,
        kind: TaskKind,
        env: Envelope,
        depots: DepotList,
    ) -> Result<Started, LifecycleError> {
        let image = self.verify(&env, true)?;
        let urls = self.depot_urls(&depots)?;
        let mut running = lock(&self.running);
        if let Some(r) = running.as_ref() {
            if r.digest == image.digest
                && let Some(task) = self.tasks.get(&r.task_id)
                && task.kind == kind
            {
                return Ok(Started::Joined(task));
            }
            let what = if r.digest == image.digest {
                "a different operation on this image (wait for it to end)"
            } else {
                "another image"
            };
            return Err(LifecycleError::Busy {
                task: r.task_id.clone(),
                what,
            });
        }
        let image_ref = ImageRef {
            name: image.image.name.clone(),
            serial: image.image.serial,
            digest: image.digest,
        };
        {
            let mut state = lock(&self.state);
            let mut next = state.clone();
            // R12: a compliance check first when compliance is unknown for this image; it is
            // re-evaluated in any case since staged content may have changed since.
            let report = self.evaluate(&image, &next);
            next.compliance = Some(report.clone());
            match report.status {
                // A remediation cut short after installing this image, before leaving
                // maintenance mode, still has work to do: it falls through and finishes.
                ComplianceStatus::Compliant
                    if !(kind == TaskKind::Remediate && next.maintenance_active) =>
                {
                    self.commit(&mut state, next)?;
                    return Ok(Started::NothingToDo(vec![Notification {
                        code: "already_compliant".into(),
                        message: format!(
                            "host already runs image {} (serial {}); nothing to do",
                            image_ref.name, image_ref.serial
                        ),
                        retriable: false,
                    }]));
                }
                ComplianceStatus::Incompatible => {
                    self.commit(&mut state, next)?;
                    let why = report
                        .notifications
                        .iter()
                        .map(|n| n.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(LifecycleError::Incompatible {
                        image: image_ref.name,
                        why,
                    });
                }
                _ => {}
            }
            let serial = next.serials.entry(image.image.name.clone()).or_insert(0);
            *serial = (*serial).max(image.image.serial);
            self.commit(&mut state, next)?;
        }
        let progress = Arc::new(StageProgress::default());
        let task = self.tasks.create(
            kind,
            Some(image_ref),
            Some(TaskRequest {
                image: env.clone(),
                depot: depots,
            }),
            Some(progress.clone()),
        );
        *running = Some(Running {
            task_id: task.id.clone(),
            digest: image.digest,
        });
        drop(running);
        self.spawn_job(kind, task.id.clone(), image, urls, progress);
        Ok(Started::New(task))
    }

    /// The depots of a request, each parsed and checked (https unless `depot.allow_http`): one
    /// to [`DepotList::MAX`] of them.
    fn depot_urls(&self, depots: &DepotList) -> Result<Vec<DepotUrl>, LifecycleError> {
        let urls = depots.urls();
        if urls.is_empty() || urls.len() > DepotList::MAX {
            return Err(LifecycleError::DepotCount { count: urls.len() });
        }
        urls.iter()
            .map(|url| {
                self.stager
                    .fetcher()
                    .depot_url(url)
                    .map_err(LifecycleError::from)
            })
            .collect()
    }

    fn spawn_job(
        self: &Arc<Self>,
        kind: TaskKind,
        task_id: String,
        image: VerifiedImage,
        depots: Vec<DepotUrl>,
        progress: Arc<StageProgress>,
    ) {
        let agent = self.clone();
        lock(&self.jobs).spawn(async move {
            let result = if kind == TaskKind::Remediate {
                let before = {
                    let state = lock(&agent.state);
                    Before {
                        finishing: state.maintenance_active
                            && state
                                .installed
                                .as_ref()
                                .is_some_and(|i| i.image.digest == image.digest),
                        installed_vibs: state.installed_vibs(),
                        impact: agent.evaluate(&image, &state).impact,
                    }
                };
                let step = |s: &str| {
                    tracing::info!(task = %task_id, step = s, "remediation");
                    agent.tasks.update(&task_id, |t| t.step = Some(s.to_owned()));
                };
                Remediation {
                    config: &agent.config,
                    stager: &agent.stager,
                    state: &agent.state,
                    state_file: &agent.state_file,
                    policy: agent.host_policy(),
                    step: &step,
                }
                .run(&image, &depots, &progress, before)
                .await
                .map_err(LifecycleError::from)
            } else {
                let installed = lock(&agent.state).installed_vibs();
                agent
                    .stager
                    .stage(&image, &depots, &installed, &agent.host_policy(), &progress)
                    .await
                    .map(|outcome| {
                        tracing::info!(image = %image.digest, downloaded = outcome.downloaded, location = %outcome.location.display(), "staged");
                        outcome.record.notifications
                    })
                    .map_err(LifecycleError::from)
            };
            let result = result.map_err(|e| (agent.describe)(&e));
            let mut state = lock(&agent.state);
            let outcome = match result {
                Ok(notes) => {
                    state.last_failure = None;
                    Ok(notes)
                }
                Err(e) => {
                    tracing::warn!(image = %image.digest, error = %format_args!("{}: {}", e.code, e.message), ?kind, "task failed");
                    state.last_failure = Some(image.digest);
                    Err(e)
                }
            };
            let report = agent.evaluate(&image, &state);
            state.compliance = Some(report);
            if let Err(e) = agent.save(&state) {
                tracing::error!(error = %e, "failed to save state after a task");
            }
            drop(state);
            // The task ends and stops being the running one at the same moment (lock order:
            // running, then tasks, as in `start`): a client that saw it succeed must not read a
            // status still saying "staging", nor get 409 busy for its next request.
            let mut running = lock(&agent.running);
            agent.tasks.finish(&task_id, outcome);
            *running = None;
        });
    }

    /// Resumes or fails the tasks that were running when the agent last stopped.
    pub fn resume_interrupted(self: &Arc<Self>, interrupted: crate::tasks::Interrupted) {
        for (task, request) in interrupted {
            let resumable = task.kind == TaskKind::Stage && lock(&self.running).is_none();
            let verified = match (&request, resumable) {
                (Some(req), true) => self.verify(&req.image, true).and_then(|v| {
                    // The depots are checked again: the configuration may have changed.
                    Ok((v, self.depot_urls(&req.depot)?))
                }),
                _ => Err(LifecycleError::Interrupted {
                    step: task.step.as_deref().unwrap_or("starting").to_owned(),
                }),
            };
            match verified {
                Ok((image, urls)) => {
                    tracing::info!(task = %task.id, image = %image.digest, "resuming interrupted staging");
                    let progress = Arc::new(StageProgress::default());
                    self.tasks.resume(&task.id, progress.clone());
                    *lock(&self.running) = Some(Running {
                        task_id: task.id.clone(),
                        digest: image.digest,
                    });
                    self.spawn_job(TaskKind::Stage, task.id, image, urls, progress);
                }
                Err(e) => {
                    let e = (self.describe)(&e);
                    tracing::warn!(task = %task.id, error = %format_args!("{}: {}", e.code, e.message), "interrupted task failed");
                    self.tasks.finish(&task.id, Err(e));
                }
            }
        }
    }

    /// Stops running jobs (at shutdown). Partial downloads are flushed as their futures drop and
    /// are resumed on the next start.
    pub async fn stop_jobs(&self) {
        let mut jobs = std::mem::take(&mut *lock(&self.jobs));
        jobs.abort_all();
        while jobs.join_next().await.is_some() {}
    }

    /// `GET /v1/staged`.
    pub fn staged(&self) -> Result<Vec<StagedImage>, LifecycleError> {
        let mut out = Vec::new();
        for (store, persistent) in self.stager.stores().all() {
            for record in store.records(&mut Vec::new())? {
                let parts = parts_of(&record, store);
                out.push(StagedImage {
                    bytes: record.bytes(),
                    vibs: record.vibs.len(),
                    image: record.image,
                    state: parts.state,
                    persistent,
                    location: store.root().display().to_string(),
                    staged_at: record.staged_at,
                });
            }
        }
        Ok(out)
    }

    /// `DELETE /v1/staged/{digest}`.
    pub fn delete_staged(&self, digest: &ImageDigest) -> Result<(), LifecycleError> {
        // Refused while any lifecycle task runs, not only one for this image: a running stage
        // writes its image record last, so until then its committed blobs are unreferenced and
        // the garbage collection of a deletion would take them (issue 11, item 1). The `running`
        // lock is held for the whole deletion, so no task can start halfway through it.
        let running = lock(&self.running);
        if let Some(r) = running.as_ref() {
            return Err(LifecycleError::BusyStaging {
                task: r.task_id.clone(),
                image: r.digest,
            });
        }
        if !self.stager.stores().remove(digest)? {
            return Err(LifecycleError::NotStaged(*digest));
        }
        // Compliance `staged` promised content that is now gone: re-evaluate, so that a
        // controller gating remediation on it does not see a host that is ready (issue 17,
        // item 1). The image is not installed (else it would be `compliant`), so it is
        // `non_compliant` again until it is staged anew.
        let mut state = lock(&self.state);
        if let Some(report) = state.compliance.as_mut()
            && report.status == ComplianceStatus::Staged
            && report
                .image
                .as_ref()
                .is_none_or(|i| !self.fully_staged(&i.digest))
        {
            report.status = ComplianceStatus::NonCompliant;
            report.checked_at = Some(OffsetDateTime::now_utc());
            self.save(&state)?;
        }
        Ok(())
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<HostStatus, LifecycleError> {
        let state = lock(&self.state).clone();
        let running = lock(&self.running).clone();
        let stores = self.stager.stores();
        let mut compliance = match &state.compliance {
            Some(r) => ComplianceSummary {
                status: r.status,
                image: r.image.clone(),
                checked_at: r.checked_at,
                notifications: r.notifications.clone(),
            },
            None => ComplianceSummary {
                status: ComplianceStatus::Unknown,
                image: None,
                checked_at: None,
                notifications: Vec::new(),
            },
        };
        // `staged` is a claim about what is on disk now, not when the report was made: content
        // deleted since, or lost with the volatile path in a reboot, is no longer staged, and
        // content staged since is (issue 12: status said `staged` after a DELETE).
        // The image of interest: the one last checked, else the newest staged one.
        let digest = match compliance.image.as_ref() {
            Some(i) => Some(i.digest),
            None => self
                .staged()?
                .into_iter()
                .max_by_key(|s| s.staged_at)
                .map(|s| s.image.digest),
        };
        let mut staging = StagingSummary {
            state: StagingState::None,
            staged: false,
            software: SoftwareState::Missing,
            firmware: FirmwareState::Missing,
            dpu: DpuState::Missing,
            persistent: true,
            location: stores.persistent.root().display().to_string(),
            bytes: 0,
        };
        let mut notifications = compliance.notifications.clone();
        // Whether the checked image is completely staged, from the same reading of its record
        // as the staging part of this answer, so the two never disagree.
        let mut staged_now = false;
        if let Some(digest) = digest {
            if let Some((store, persistent, record)) = stores.find(&digest)? {
                let parts = parts_of(&record, store);
                staged_now = parts.staged;
                staging = StagingSummary {
                    state: parts.state,
                    staged: parts.staged,
                    software: parts.software,
                    firmware: parts.firmware,
                    dpu: parts.dpu,
                    persistent,
                    location: store.root().display().to_string(),
                    bytes: record.bytes(),
                };
                for n in record.notifications {
                    if !notifications.contains(&n) {
                        notifications.push(n);
                    }
                }
            }
            if running.as_ref().is_some_and(|r| r.digest == digest) {
                staging.state = StagingState::Staging;
                staging.software = SoftwareState::Staging;
            } else if state.last_failure == Some(digest) && staging.state != StagingState::Staged {
                staging.state = StagingState::Failed;
                staging.software = SoftwareState::Failed;
            }
        }
        // R8's `staged` holds only while the content is there (a scrub, a deletion or a reboot
        // that wiped the volatile path may have taken part of it), and content staged since the
        // last check makes a non-compliant host `staged`: status says what is on disk now.
        if compliance.image.is_some() {
            compliance.status = match compliance.status {
                ComplianceStatus::Staged if !staged_now => ComplianceStatus::NonCompliant,
                ComplianceStatus::NonCompliant if staged_now => ComplianceStatus::Staged,
                other => other,
            };
        }
        if compliance.status == ComplianceStatus::Compliant && staging.state == StagingState::None {
            // Nothing is needed, so everything needed is staged (R5, vacuously): a controller
            // that gates remediation on `staged` sees a host it may remediate (a no-op).
            staging.staged = true;
            staging.software = SoftwareState::Staged;
            staging.firmware = FirmwareState::NotApplicable;
            staging.dpu = DpuState::NotApplicable;
        }
        // Status must answer even when scratch is gone or unreadable: it is how the operator
        // finds out.
        let space = stores.persistent.space().unwrap_or_else(|e| {
            notifications.push(Notification {
                code: "scratch_unavailable".into(),
                message: e.to_string(),
                retriable: true,
            });
            crate::store::Space { total: 0, free: 0 }
        });
        Ok(HostStatus {
            host_id: self.host_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            compliance: ComplianceSummary {
                notifications,
                ..compliance
            },
            staging,
            maintenance: MaintenanceSummary {
                active: state.maintenance_active,
            },
            installed: InstalledSummary {
                image: state.installed.as_ref().map(|i| i.image.clone()),
                reboot_required: state.reboot_required,
            },
            scratch: ScratchSummary {
                path: stores.persistent.root().display().to_string(),
                total_bytes: space.total,
                free_bytes: space.free,
            },
            running_task: running.map(|r| r.task_id),
        })
    }

    /// Total bytes of staged blobs (for metrics).
    pub fn staged_bytes(&self) -> u64 {
        self.staged()
            .map(|s| s.iter().fold(0u64, |acc, i| acc.saturating_add(i.bytes)))
            .unwrap_or(0)
    }

    /// Tasks by kind and state (for metrics).
    pub fn task_counts(&self) -> std::collections::HashMap<(TaskKind, TaskState), u64> {
        let mut counts = std::collections::HashMap::new();
        for t in self.tasks.list() {
            *counts.entry((t.kind, t.state)).or_insert(0) += 1;
        }
        counts
    }
}

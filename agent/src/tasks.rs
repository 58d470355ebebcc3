//! Tasks: stage, remediate and check operations with ids, progress and long-poll.
//!
//! The list is persisted in `state_dir/tasks.json` on every state change (not on every progress
//! tick), so a restarted agent still lists recent tasks. A task found `queued` or `running` at
//! start-up was interrupted by the agent's death; the agent resumes it or fails it, never leaves
//! it running forever.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use vibstage_protocol::Envelope;
use vibstage_protocol::api::{
    DepotList, DepotServed, ErrorDetail, ImageRef, Notification, Progress, Task, TaskKind,
    TaskState,
};

use crate::fsutil::{self, Loaded};
use crate::stage::StageProgress;

/// How many finished tasks are kept.
const KEEP: usize = 100;

/// What a lifecycle task needs to be resumed after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRequest {
    /// The signed image.
    pub image: Envelope,
    /// The depot URLs (one, or several tried in order; older task files hold one string).
    pub depot: DepotList,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    task: Task,
    #[serde(default)]
    request: Option<TaskRequest>,
    #[serde(skip)]
    live: Option<Arc<StageProgress>>,
}

/// Tasks that were queued or running when the agent stopped, with their requests.
pub type Interrupted = Vec<(Task, Option<TaskRequest>)>;

/// The task list.
#[derive(Debug)]
pub struct Tasks {
    path: PathBuf,
    entries: Mutex<Vec<Entry>>,
    changed: watch::Sender<u64>,
}

fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // A failing OS RNG would be remarkable; fall back to time, ids only need to be unique.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (OffsetDateTime::now_utc().unix_timestamp_nanos() as u64).to_be_bytes();
    }
    hex::encode(bytes)
}

impl Tasks {
    /// Loads `state_dir/tasks.json`. Returns the list and the tasks that were interrupted
    /// (queued or running) when the agent last stopped, with their requests.
    pub fn load(state_dir: &Path) -> std::io::Result<(Tasks, Interrupted, Option<String>)> {
        let path = state_dir.join("tasks.json");
        let (entries, warning) = match fsutil::read_json::<Vec<Entry>>(&path)? {
            Loaded::Ok(e) => (e, None),
            Loaded::Missing => (Vec::new(), None),
            Loaded::Quarantined(aside, why) => (
                Vec::new(),
                Some(format!(
                    "task list was corrupt ({why}); moved to {}",
                    aside.display()
                )),
            ),
        };
        let interrupted = entries
            .iter()
            .filter(|e| !e.task.state.is_final())
            .map(|e| (e.task.clone(), e.request.clone()))
            .collect();
        let (changed, _) = watch::channel(0);
        Ok((
            Tasks {
                path,
                entries: Mutex::new(entries),
                changed,
            },
            interrupted,
            warning,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, entries: &[Entry]) {
        if let Err(e) = fsutil::write_json(&self.path, &entries) {
            tracing::error!(path = %self.path.display(), error = %e, "failed to persist the task list");
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Creates a task in state `running`.
    pub fn create(
        &self,
        kind: TaskKind,
        image: Option<ImageRef>,
        request: Option<TaskRequest>,
        live: Option<Arc<StageProgress>>,
    ) -> Task {
        let now = OffsetDateTime::now_utc();
        let task = Task {
            id: new_id(),
            kind,
            state: TaskState::Running,
            progress: Progress::default(),
            error: None,
            created_at: now,
            updated_at: now,
            image,
            bytes_downloaded: 0,
            notifications: Vec::new(),
            step: None,
            depots: Vec::new(),
        };
        let mut entries = self.lock();
        entries.insert(
            0,
            Entry {
                task: task.clone(),
                request,
                live,
            },
        );
        let mut finished = 0;
        entries.retain(|e| {
            if e.task.state.is_final() {
                finished += 1;
                finished <= KEEP
            } else {
                true
            }
        });
        self.persist(&entries);
        task
    }

    /// Re-registers an interrupted task as running again (resumption after a restart).
    pub fn resume(&self, id: &str, live: Arc<StageProgress>) {
        self.update(id, |t| {
            t.state = TaskState::Running;
            t.step = Some("resumed after agent restart".into());
        });
        if let Some(e) = self.lock().iter_mut().find(|e| e.task.id == id) {
            e.live = Some(live);
        }
    }

    /// Changes a task and persists the list.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Task)) {
        let mut entries = self.lock();
        if let Some(e) = entries.iter_mut().find(|e| e.task.id == id) {
            snapshot_progress(e);
            f(&mut e.task);
            e.task.updated_at = OffsetDateTime::now_utc();
            if e.task.state.is_final() {
                e.live = None;
                e.request = None;
            }
        }
        self.persist(&entries);
    }

    /// Ends a task.
    pub fn finish(&self, id: &str, result: Result<Vec<Notification>, ErrorDetail>) {
        self.update(id, |t| match result {
            Ok(notes) => {
                t.state = TaskState::Succeeded;
                t.notifications.extend(notes);
                t.step = None;
            }
            Err(e) => {
                t.state = TaskState::Failed;
                t.error = Some(e);
            }
        });
    }

    /// One task, with live progress.
    pub fn get(&self, id: &str) -> Option<Task> {
        let mut entries = self.lock();
        entries.iter_mut().find(|e| e.task.id == id).map(|e| {
            snapshot_progress(e);
            e.task.clone()
        })
    }

    /// Every task, newest first.
    pub fn list(&self) -> Vec<Task> {
        let mut entries = self.lock();
        entries
            .iter_mut()
            .map(|e| {
                snapshot_progress(e);
                e.task.clone()
            })
            .collect()
    }

    /// Waits until the task ends or `wait` passes; returns it.
    pub async fn wait(&self, id: &str, wait: Duration) -> Option<Task> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let task = self.get(id)?;
            if task.state.is_final() {
                return Some(task);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.get(id);
            }
        }
    }
}

fn snapshot_progress(e: &mut Entry) {
    if let Some(p) = &e.live {
        e.task.progress = Progress {
            bytes_done: p.done.load(Ordering::Relaxed),
            bytes_total: p.total.load(Ordering::Relaxed),
        };
        e.task.bytes_downloaded = p.downloaded.load(Ordering::Relaxed);
        if let Some(depots) = p.depots.get() {
            e.task.depots = depots
                .iter()
                .map(|d| DepotServed {
                    url: d.url.clone(),
                    blobs: d.blobs.load(Ordering::Relaxed),
                    bytes: d.bytes.load(Ordering::Relaxed),
                    failures: d.failures.load(Ordering::Relaxed),
                })
                .collect();
        }
    }
}

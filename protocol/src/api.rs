//! Request and response bodies of the HTTP API (SPEC §5).
//!
//! Requests are parsed strictly (`deny_unknown_fields`); responses are parsed leniently by
//! clients, since the SPEC lets the agent add fields.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::dsse::Envelope;
use crate::error::ErrorCode;
use crate::types::{ImageDigest, Name};
use crate::version::Version;

/// `POST /v1/compliance/check` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The desired image.
    pub image: Envelope,
}

/// `POST /v1/stage` and `POST /v1/remediate` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRequest {
    /// The desired image.
    pub image: Envelope,
    /// Base URL of the depot to fetch VIBs from, or several tried in order for each blob.
    pub depot: DepotList,
}

/// The depots of a request: one URL (`"depot": "URL"`) or several (`"depot": ["URL", ...]`),
/// tried in order for each blob (SPEC §5). The agent accepts 1 to [`DepotList::MAX`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a depot URL or a list of depot URLs")]
pub enum DepotList {
    /// One depot (the form every older client sends).
    One(String),
    /// Several, in the order they are tried.
    Many(Vec<String>),
}

impl DepotList {
    /// Most depots one request may name.
    pub const MAX: usize = 8;

    /// The URLs, in order.
    pub fn urls(&self) -> &[String] {
        match self {
            DepotList::One(url) => std::slice::from_ref(url),
            DepotList::Many(urls) => urls,
        }
    }
}

impl From<String> for DepotList {
    fn from(url: String) -> Self {
        DepotList::One(url)
    }
}

impl From<&str> for DepotList {
    fn from(url: &str) -> Self {
        DepotList::One(url.to_owned())
    }
}

impl From<Vec<String>> for DepotList {
    fn from(urls: Vec<String>) -> Self {
        match <[String; 1]>::try_from(urls) {
            Ok([one]) => DepotList::One(one),
            Err(urls) => DepotList::Many(urls),
        }
    }
}

/// What one depot served during a task (the URL without userinfo).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepotServed {
    /// The depot's base URL, as it may be shown.
    pub url: String,
    /// Blobs whose download it completed.
    pub blobs: u64,
    /// Body bytes received from it (including attempts that failed).
    pub bytes: u64,
    /// Attempts on it that failed.
    pub failures: u64,
}

/// The error body every non-2xx answer carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error: code, human message, structured details.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What failed, on what.
    pub message: String,
    /// Extra structured facts (may be empty).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl ErrorDetail {
    /// An error with no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Default::default(),
        }
    }
}

/// Something the operator should know that did not fail the operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Machine-readable code, e.g. `firmware_staging_unsupported`.
    pub code: String,
    /// Human explanation.
    pub message: String,
    /// Whether trying again may help.
    #[serde(default)]
    pub retriable: bool,
}

/// An image named by name, serial and digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Image name.
    pub name: Name,
    /// Image serial.
    pub serial: u64,
    /// Image digest.
    pub digest: ImageDigest,
}

/// Compliance of a host against an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ComplianceStatus {
    /// The host runs the image.
    Compliant,
    /// The host needs changes, none of them forbidden.
    NonCompliant,
    /// The image would downgrade the host or is below its acceptance level.
    Incompatible,
    /// Never checked, or checked against another image.
    Unknown,
    /// Staging succeeded and remediation has not (R8).
    Staged,
}

/// What remediating would cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    /// Nothing to do.
    None,
    /// Install needs maintenance mode.
    MaintenanceMode,
    /// Install needs maintenance mode and a reboot.
    Reboot,
}

/// How one component differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Not installed; the image adds it.
    Add,
    /// Installed older.
    Upgrade,
    /// Installed newer.
    Downgrade,
    /// Installed; the image drops it.
    Remove,
}

/// One component difference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentDiff {
    /// Component name.
    pub component: Name,
    /// Installed version, if any.
    pub installed: Option<Version>,
    /// Desired version, if any.
    pub desired: Option<Version>,
    /// The change.
    pub change: Change,
}

/// The answer of a compliance check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComplianceReport {
    /// Overall status.
    pub status: ComplianceStatus,
    /// The image checked against.
    pub image: Option<ImageRef>,
    /// What remediating would cost.
    pub impact: Impact,
    /// Per-component differences (only components that differ).
    #[serde(default)]
    pub components: Vec<ComponentDiff>,
    /// Notifications.
    #[serde(default)]
    pub notifications: Vec<Notification>,
    /// When the check ran.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub checked_at: Option<OffsetDateTime>,
}

/// Staging state of the host's current image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum StagingState {
    None,
    Staging,
    Staged,
    Partial,
    Failed,
}

/// Software part of staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum SoftwareState {
    Staged,
    Missing,
    Staging,
    Failed,
}

/// Firmware part of staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum FirmwareState {
    Staged,
    NotSupported,
    Failed,
    NotApplicable,
    Missing,
}

/// DPU part of staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum DpuState {
    Staged,
    Missing,
    NotApplicable,
}

/// Compliance as shown in status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComplianceSummary {
    /// Status.
    pub status: ComplianceStatus,
    /// The image last checked against.
    pub image: Option<ImageRef>,
    /// When.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub checked_at: Option<OffsetDateTime>,
    /// Notifications of the last check or stage.
    #[serde(default)]
    pub notifications: Vec<Notification>,
}

/// Staging as shown in status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagingSummary {
    /// Overall state.
    pub state: StagingState,
    /// R5: true only when every software and firmware VIB the image needs is staged.
    pub staged: bool,
    /// Software part.
    pub software: SoftwareState,
    /// Firmware part.
    pub firmware: FirmwareState,
    /// DPU part.
    pub dpu: DpuState,
    /// Whether the content survives a reboot (scratch) or not (volatile path).
    pub persistent: bool,
    /// Where it is.
    pub location: String,
    /// Bytes staged for the image.
    pub bytes: u64,
}

/// Maintenance mode as shown in status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceSummary {
    /// True exactly while the host is in maintenance mode.
    pub active: bool,
}

/// The installed image as shown in status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledSummary {
    /// Installed image, or null if never remediated.
    pub image: Option<ImageRef>,
    /// Whether an install is waiting for a reboot.
    pub reboot_required: bool,
}

/// Scratch space as shown in status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchSummary {
    /// The scratch path.
    pub path: String,
    /// Filesystem size.
    pub total_bytes: u64,
    /// Free bytes available to the agent.
    pub free_bytes: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Host id.
    pub host_id: String,
    /// Agent version.
    pub agent_version: String,
    /// Compliance.
    pub compliance: ComplianceSummary,
    /// Staging.
    pub staging: StagingSummary,
    /// Maintenance mode.
    pub maintenance: MaintenanceSummary,
    /// Installed image.
    pub installed: InstalledSummary,
    /// Scratch space.
    pub scratch: ScratchSummary,
    /// The lifecycle task running now, if any.
    #[serde(default)]
    pub running_task: Option<String>,
}

/// Kind of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum TaskKind {
    Stage,
    Remediate,
    Check,
}

/// State of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    /// Whether the task has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// Byte progress of a task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes verified so far (including ones already staged).
    pub bytes_done: u64,
    /// Bytes the task needs in all.
    pub bytes_total: u64,
}

/// A task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    pub id: String,
    /// What it does.
    pub kind: TaskKind,
    /// Where it is.
    pub state: TaskState,
    /// Byte progress.
    pub progress: Progress,
    /// Why it failed.
    pub error: Option<ErrorDetail>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The image it works on.
    #[serde(default)]
    pub image: Option<ImageRef>,
    /// Bytes actually downloaded from the depot (the rest were already staged).
    #[serde(default)]
    pub bytes_downloaded: u64,
    /// Notifications raised by the task.
    #[serde(default)]
    pub notifications: Vec<Notification>,
    /// The current step, in words.
    #[serde(default)]
    pub step: Option<String>,
    /// Which depot served what, in the order the request named them (stage and remediate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depots: Vec<DepotServed>,
}

/// `POST /v1/stage` and `POST /v1/remediate` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskResponse {
    /// The task started or joined; null when there was nothing to do.
    pub task: Option<Task>,
    /// Why there was nothing to do.
    #[serde(default)]
    pub notifications: Vec<Notification>,
}

/// `GET /v1/tasks`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskList {
    /// Newest first.
    pub tasks: Vec<Task>,
}

/// One staged image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagedImage {
    /// The image.
    pub image: ImageRef,
    /// `staged` when every recorded blob is present, `partial` otherwise.
    pub state: StagingState,
    /// Whether it survives a reboot.
    pub persistent: bool,
    /// Where it is.
    pub location: String,
    /// Bytes of its blobs.
    pub bytes: u64,
    /// Number of VIBs staged.
    pub vibs: usize,
    /// When staging finished.
    #[serde(with = "time::serde::rfc3339")]
    pub staged_at: OffsetDateTime,
}

/// `GET /v1/staged`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedList {
    /// Staged images.
    pub staged: Vec<StagedImage>,
}

wire_names!(ComplianceStatus { Compliant => "compliant", NonCompliant => "non_compliant", Incompatible => "incompatible", Unknown => "unknown", Staged => "staged" });
wire_names!(Impact { None => "none", MaintenanceMode => "maintenance_mode", Reboot => "reboot" });
wire_names!(Change { Add => "add", Upgrade => "upgrade", Downgrade => "downgrade", Remove => "remove" });
wire_names!(StagingState { None => "none", Staging => "staging", Staged => "staged", Partial => "partial", Failed => "failed" });
wire_names!(SoftwareState { Staged => "staged", Missing => "missing", Staging => "staging", Failed => "failed" });
wire_names!(FirmwareState { Staged => "staged", NotSupported => "not_supported", Failed => "failed", NotApplicable => "not_applicable", Missing => "missing" });
wire_names!(DpuState { Staged => "staged", Missing => "missing", NotApplicable => "not_applicable" });
wire_names!(TaskKind { Stage => "stage", Remediate => "remediate", Check => "check" });
wire_names!(TaskState { Queued => "queued", Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled" });

#[cfg(test)]
mod wire_name_tests {
    use super::*;
    use crate::{VibKind, VibTarget};

    fn serde_name<T: Serialize>(v: T) -> String {
        serde_json::to_value(v)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// `as_str` is what serde writes, for every variant of every wire enum that has one.
    #[test]
    fn as_str_agrees_with_serde() {
        macro_rules! check {
            ($($v:expr),+ $(,)?) => { $(assert_eq!($v.as_str(), serde_name($v), "{:?}", $v);)+ };
        }
        use ComplianceStatus as C;
        check!(
            C::Compliant,
            C::NonCompliant,
            C::Incompatible,
            C::Unknown,
            C::Staged
        );
        check!(Impact::None, Impact::MaintenanceMode, Impact::Reboot);
        check!(
            Change::Add,
            Change::Upgrade,
            Change::Downgrade,
            Change::Remove
        );
        use StagingState as S;
        check!(S::None, S::Staging, S::Staged, S::Partial, S::Failed);
        use SoftwareState as W;
        check!(W::Staged, W::Missing, W::Staging, W::Failed);
        use FirmwareState as F;
        check!(
            F::Staged,
            F::NotSupported,
            F::Failed,
            F::NotApplicable,
            F::Missing
        );
        check!(DpuState::Staged, DpuState::Missing, DpuState::NotApplicable);
        check!(TaskKind::Stage, TaskKind::Remediate, TaskKind::Check);
        use TaskState as T;
        check!(T::Queued, T::Running, T::Succeeded, T::Failed, T::Cancelled);
        check!(
            VibKind::Software,
            VibKind::Firmware,
            VibTarget::Host,
            VibTarget::Dpu
        );
    }
}

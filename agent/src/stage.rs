//! Staging (SPEC §6 R1, R4, R5, R6, R9): turns a verified image and a depot URL into staged
//! content in a store.
//!
//! What is fetched: every VIB the image needs that is not installed; `host` VIBs always, `dpu`
//! VIBs only on a host with DPUs; firmware only from vendors the host names. Each blob is fetched
//! once however many VIBs share it, never if the store already has it, and up to `concurrency` at
//! a time. The image record is written only after every blob it lists is committed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt as _;
use time::OffsetDateTime;
use vibstage_protocol::api::{
    DpuState, FirmwareState, ImageRef, Notification, SoftwareState, StagingState,
};
use vibstage_protocol::{Digest, ImageDigest, VerifiedImage, VibDescriptor, VibKind, VibTarget};

use crate::fetch::{DepotCounter, DepotUrl, FetchError, Fetcher, redact};
use crate::store::{ImageRecord, StagedVib, Store, StoreError, Stores};
use crate::vib::VibIdentity;

/// Errors of a staging run.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Neither scratch nor the volatile path has room.
    #[error("insufficient space: staging needs {needed} more bytes; {detail}")]
    NoSpace {
        /// Bytes still to download.
        needed: u64,
        /// Where was looked, with its free space.
        detail: String,
    },
    /// A software VIB could not be fetched.
    #[error("failed to stage VIB {vib} (sha256:{digest}): {source}")]
    Fetch {
        /// The VIB.
        vib: String,
        /// Its blob.
        digest: Digest,
        /// The underlying error: what the OS or library said, kept as `source()`.
        #[source]
        source: Box<FetchError>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The depot URL is unusable.
    #[error(transparent)]
    Depot(FetchError),
    /// Blobs the run committed were gone when it ended (removed under it): it must not report
    /// success (issue 11, item 1).
    #[error(
        "staging of {image} ended with {} of its blobs missing from {store} (removed while it ran): {}",
        missing.len(),
        missing.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>().join(", ")
    )]
    Incomplete {
        /// The image.
        image: ImageDigest,
        /// The store.
        store: PathBuf,
        /// The blobs not there.
        missing: Vec<Digest>,
    },
}

/// The VIB a descriptor names, as a real VIB's own `descriptor.xml` must name it (issue 14).
fn identity(d: &VibDescriptor) -> VibIdentity {
    VibIdentity {
        name: d.name.to_string(),
        version: d.version.as_str().to_owned(),
        vendor: d.vendor.clone(),
        acceptance: d.acceptance,
    }
}

/// What the host is (SPEC §4 `[host]`), as staging needs it.
#[derive(Clone, Debug, Default)]
pub struct HostPolicy {
    /// The host has DPUs, so dpu VIBs are staged too.
    pub has_dpus: bool,
    /// Hardware vendors whose firmware can be staged.
    pub firmware_vendors: Vec<String>,
}

/// Why a VIB of the image is or is not fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Fetch it.
    Fetch,
    /// Already installed.
    Installed,
    /// A dpu VIB on a host without DPUs.
    NotApplicable,
    /// Firmware of a vendor the host cannot stage.
    FirmwareUnsupported,
}

/// Decides, for each VIB of `image`, whether staging fetches it.
pub fn plan<'a>(
    image: &'a VerifiedImage,
    installed: &BTreeSet<Digest>,
    host: &HostPolicy,
) -> Vec<(&'a VibDescriptor, Disposition)> {
    image
        .vibs
        .iter()
        .map(|v| {
            let d = &v.descriptor;
            let disposition = if d.target == VibTarget::Dpu && !host.has_dpus {
                Disposition::NotApplicable
            } else if installed.contains(&d.sha256) {
                Disposition::Installed
            } else if d.kind == VibKind::Firmware && !host.firmware_vendors.contains(&d.vendor) {
                Disposition::FirmwareUnsupported
            } else {
                Disposition::Fetch
            };
            (d, disposition)
        })
        .collect()
}

/// Progress of a staging run, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct StageProgress {
    /// Bytes of needed blobs held (already staged or downloaded).
    pub done: AtomicU64,
    /// Bytes of all needed blobs.
    pub total: AtomicU64,
    /// Bytes downloaded by this run.
    pub downloaded: AtomicU64,
    /// What each depot of the request served, in the request's order (set when staging starts).
    pub depots: std::sync::OnceLock<Vec<DepotCounter>>,
}

/// The result of a successful staging run.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    /// The record written.
    pub record: ImageRecord,
    /// Where.
    pub location: PathBuf,
    /// Whether it survives reboots.
    pub persistent: bool,
    /// Bytes downloaded by this run.
    pub downloaded: u64,
}

/// The staging parts of status, derived from a record and what is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingParts {
    /// Overall.
    pub state: StagingState,
    /// R5.
    pub staged: bool,
    /// Software.
    pub software: SoftwareState,
    /// Firmware.
    pub firmware: FirmwareState,
    /// DPU.
    pub dpu: DpuState,
}

/// Status parts of a staged image: `partial` when a blob it lists is missing (R5, R10).
pub fn parts_of(record: &ImageRecord, store: &Store) -> StagingParts {
    let missing: BTreeSet<Digest> = store.missing_blobs(record).into_iter().collect();
    let lost = |pred: &dyn Fn(&StagedVib) -> bool| {
        record
            .vibs
            .iter()
            .any(|v| pred(v) && missing.contains(&v.sha256))
    };
    let software = if lost(&|v| v.kind == VibKind::Software) {
        SoftwareState::Missing
    } else {
        SoftwareState::Staged
    };
    let firmware = match record.firmware {
        FirmwareState::Staged if lost(&|v| v.kind == VibKind::Firmware) => FirmwareState::Missing,
        other => other,
    };
    let dpu = match record.dpu {
        DpuState::Staged if lost(&|v| v.target == VibTarget::Dpu) => DpuState::Missing,
        other => other,
    };
    let staged = software == SoftwareState::Staged
        && matches!(
            firmware,
            FirmwareState::Staged | FirmwareState::NotApplicable
        );
    StagingParts {
        state: if missing.is_empty() {
            StagingState::Staged
        } else {
            StagingState::Partial
        },
        staged,
        software,
        firmware,
        dpu,
    }
}

/// The refusal of an image whose VIB sizes add up to more than a `u64` holds.
fn too_big(wanted: &BTreeMap<Digest, &VibDescriptor>) -> StageError {
    StageError::NoSpace {
        needed: u64::MAX,
        detail: format!(
            "the {} VIBs to stage declare more than {} bytes in total; no filesystem holds that",
            wanted.len(),
            u64::MAX
        ),
    }
}

/// Stages images into the stores.
#[derive(Clone, Debug)]
pub struct Stager {
    stores: Arc<Stores>,
    /// Replaced on SIGHUP when `[depot]` changes; a running stage keeps the client it began with.
    fetcher: Arc<std::sync::RwLock<Fetcher>>,
    concurrency: usize,
}

impl Stager {
    /// A stager over `stores`, fetching with `fetcher`, `concurrency` downloads at once.
    pub fn new(stores: Arc<Stores>, fetcher: Fetcher, concurrency: usize) -> Self {
        Self {
            stores,
            fetcher: Arc::new(std::sync::RwLock::new(fetcher)),
            concurrency: concurrency.max(1),
        }
    }

    /// The stores.
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// The depot client (a cheap clone of the current one).
    pub fn fetcher(&self) -> Fetcher {
        self.fetcher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the depot client (SIGHUP with a changed `[depot]`); stages already running
    /// finish with the old one.
    pub fn set_fetcher(&self, fetcher: Fetcher) {
        *self.fetcher.write().unwrap_or_else(|p| p.into_inner()) = fetcher;
    }

    /// Picks where to stage `wanted` (R9): scratch if it has room after its reserve, otherwise
    /// the volatile path, otherwise `insufficient_space`.
    fn choose_store(
        &self,
        wanted: &BTreeMap<Digest, &VibDescriptor>,
    ) -> Result<(&Store, bool), StageError> {
        let mut detail = Vec::new();
        let mut needed_first = None;
        for (store, persistent) in self.stores.all() {
            // Sizes come from signed but remote descriptors: added with checks, so that two
            // of 2^63 bytes cannot wrap to "nothing needed" (issue 11, item 7).
            let needed = wanted
                .iter()
                .try_fold(0u64, |acc, (d, v)| {
                    acc.checked_add(v.size - store.bytes_held(d, v.size))
                })
                .ok_or_else(|| too_big(wanted))?;
            needed_first.get_or_insert(needed);
            let space = store.space()?;
            let usable = space.free.saturating_sub(self.stores.reserve_bytes);
            if needed <= usable {
                return Ok((store, persistent));
            }
            detail.push(format!(
                "{} has {} bytes free and keeps {} in reserve",
                store.root().display(),
                space.free,
                self.stores.reserve_bytes
            ));
        }
        if self.stores.volatile.is_none() {
            detail.push("no volatile_path is configured".into());
        }
        Err(StageError::NoSpace {
            needed: needed_first.unwrap_or(0),
            detail: detail.join("; "),
        })
    }

    /// Stages `image` from `depots` (tried in order for each blob). Blobs already held are not fetched again, so calling this
    /// after an interrupted run resumes it.
    pub async fn stage(
        &self,
        image: &VerifiedImage,
        depots: &[DepotUrl],
        installed: &BTreeSet<Digest>,
        host: &HostPolicy,
        progress: &StageProgress,
    ) -> Result<StageOutcome, StageError> {
        let fetcher = self.fetcher();
        let served = progress.depots.get_or_init(|| {
            depots
                .iter()
                .map(|d| DepotCounter {
                    url: redact(d).to_string(),
                    ..DepotCounter::default()
                })
                .collect()
        });
        for (store, _) in self.stores.all() {
            store.ensure_layout()?;
        }
        let mut plan = plan(image, installed, host);
        // Firmware of a vendor the host cannot stage that a remediation already fetched is
        // staged: staging the image again keeps it rather than dropping it from the record and
        // the staged mark (issue 12).
        for (d, disposition) in &mut plan {
            if *disposition == Disposition::FirmwareUnsupported
                && self
                    .stores
                    .all()
                    .any(|(s, _)| s.has_blob(&d.sha256, d.size))
            {
                *disposition = Disposition::Fetch;
            }
        }
        let mut wanted: BTreeMap<Digest, &VibDescriptor> = BTreeMap::new();
        for (d, disposition) in &plan {
            if *disposition == Disposition::Fetch {
                wanted.entry(d.sha256).or_insert(d);
            }
        }
        let total = wanted
            .values()
            .try_fold(0u64, |acc, v| acc.checked_add(v.size))
            .ok_or_else(|| too_big(&wanted))?;
        let (store, persistent) = self.choose_store(&wanted)?;
        progress.total.store(total, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);

        let results: Vec<(Digest, Result<(), FetchError>)> = futures_util::stream::iter(
            wanted
                .iter()
                .map(|(d, v)| (*d, v.size, identity(v)))
                .collect::<Vec<_>>(),
        )
        .map(|(digest, size, identity)| {
            let served = served.as_slice();
            let fetcher = &fetcher;
            async move {
                let last = AtomicU64::new(0);
                let report = |offset: u64| {
                    let prev = last.swap(offset, Ordering::Relaxed);
                    if offset >= prev {
                        progress.done.fetch_add(offset - prev, Ordering::Relaxed);
                        progress
                            .downloaded
                            .fetch_add(offset - prev, Ordering::Relaxed);
                    } else {
                        progress.done.fetch_sub(prev - offset, Ordering::Relaxed);
                    }
                };
                let result = if store.has_blob(&digest, size) {
                    progress.done.fetch_add(size, Ordering::Relaxed);
                    Ok(())
                } else {
                    // Bytes already in a partial file count as done, not as downloaded.
                    let held = store.bytes_held(&digest, size);
                    last.store(held, Ordering::Relaxed);
                    progress.done.fetch_add(held, Ordering::Relaxed);
                    fetcher
                        .fetch_blob(
                            depots,
                            digest,
                            size,
                            Some(&identity),
                            store,
                            &report,
                            served,
                        )
                        .await
                        .map(drop)
                };
                (digest, result)
            }
        })
        .buffer_unordered(self.concurrency)
        .collect()
        .await;
        let failed: BTreeMap<Digest, FetchError> = results
            .into_iter()
            .filter_map(|(d, r)| r.err().map(|e| (d, e)))
            .collect();

        let mut notifications = Vec::new();
        let mut vibs = Vec::new();
        let mut firmware_unsupported = Vec::new();
        let mut firmware_failed = Vec::new();
        let mut has_firmware = false;
        let (mut has_dpu, mut dpu_ok) = (false, true);
        for (d, disposition) in &plan {
            has_firmware |= d.kind == VibKind::Firmware;
            if d.target == VibTarget::Dpu && host.has_dpus {
                has_dpu = true;
            }
            match disposition {
                Disposition::FirmwareUnsupported => firmware_unsupported.push(d),
                Disposition::Fetch => match failed.get(&d.sha256) {
                    None => vibs.push(StagedVib {
                        name: d.name.clone(),
                        component: d.component.clone(),
                        kind: d.kind,
                        target: d.target,
                        sha256: d.sha256,
                        size: d.size,
                    }),
                    Some(err) if d.kind == VibKind::Firmware => {
                        dpu_ok &= d.target != VibTarget::Dpu;
                        firmware_failed.push((d, err));
                    }
                    Some(_) => {
                        let Some((digest, source)) =
                            failed.into_iter().find(|(k, _)| *k == d.sha256)
                        else {
                            unreachable!("the failure was just looked up")
                        };
                        return Err(StageError::Fetch {
                            vib: d.name.to_string(),
                            digest,
                            source: Box::new(source),
                        });
                    }
                },
                Disposition::Installed | Disposition::NotApplicable => {}
            }
        }
        let firmware = if !has_firmware {
            FirmwareState::NotApplicable
        } else if !firmware_failed.is_empty() {
            FirmwareState::Failed
        } else if !firmware_unsupported.is_empty() {
            FirmwareState::NotSupported
        } else {
            FirmwareState::Staged
        };
        if !firmware_unsupported.is_empty() {
            let vendors: BTreeSet<&str> = firmware_unsupported
                .iter()
                .map(|d| d.vendor.as_str())
                .collect();
            notifications.push(Notification {
                code: "firmware_staging_unsupported".into(),
                message: format!(
                    "firmware of vendor(s) {} cannot be staged on this host (not in host.firmware_staging_vendors): {}; remediation will fetch and install it",
                    vendors.into_iter().collect::<Vec<_>>().join(", "),
                    firmware_unsupported.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
                retriable: false,
            });
        }
        for (d, err) in &firmware_failed {
            notifications.push(Notification {
                code: "firmware_staging_failed".into(),
                message: format!(
                    "firmware VIB {} could not be staged: {err}; remediation will fetch it again",
                    d.name
                ),
                retriable: true,
            });
        }
        let dpu = match (has_dpu, dpu_ok) {
            (false, _) => DpuState::NotApplicable,
            (true, true) => DpuState::Staged,
            (true, false) => DpuState::Missing,
        };
        let record = ImageRecord {
            image: ImageRef {
                name: image.image.name.clone(),
                serial: image.image.serial,
                digest: image.digest,
            },
            envelope: image.envelope.clone(),
            vibs,
            firmware,
            dpu,
            notifications,
            staged_at: OffsetDateTime::now_utc(),
        };
        // The record is the claim "all of this is staged": it is written only if it is true,
        // and checked again once older images (and their garbage) are gone.
        let complete = |record: &ImageRecord| -> Result<(), StageError> {
            let missing = store.missing_blobs(record);
            if missing.is_empty() {
                return Ok(());
            }
            Err(StageError::Incomplete {
                image: record.image.digest,
                store: store.root().to_owned(),
                missing,
            })
        };
        complete(&record)?;
        store.write_record(&record)?;
        // A newer image staged later replaces an older staged one.
        for (other, _) in self.stores.all() {
            for old in other.records(&mut Vec::new())? {
                if old.image.digest != image.digest {
                    other.remove_image(&old.image.digest)?;
                }
            }
            if !std::ptr::eq(other, store) {
                other.remove_image(&image.digest)?;
            }
        }
        complete(&record)?;
        Ok(StageOutcome {
            record,
            location: store.root().to_owned(),
            persistent,
            downloaded: progress.downloaded.load(Ordering::Relaxed),
        })
    }
}

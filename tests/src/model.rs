//! A reference model of what SPEC.md promises about one host's lifecycle (issue 12), in pure
//! Rust without I/O: which images are staged and where, what is installed, compliance per image,
//! maintenance mode, the running task, rollback serials, and what survives a reboot.
//!
//! The universe is small and fixed: seven VIBs and four images ([`Img`]) that share VIBs, carry
//! firmware of a vendor the host can stage (`dell`) and of one it cannot (`hpe`), a DPU VIB, and
//! serials that grow per image name plus one older serial (rollback). The model answers, for a
//! request or for the end of a task, what the agent must do; `tests/tests/lifecycle_model.rs`
//! drives a real `vibstaged` and compares.
//!
//! What is persistent and what is not: serials, the installed image, maintenance mode, the last
//! compliance check and the task list live in the state directory; staged content lives in
//! scratch (persistent) or in the volatile path (lost on reboot, SPEC R9).

use std::collections::{BTreeMap, BTreeSet};

/// One VIB of the universe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Vib {
    /// ESXi 8.0.2-1, software.
    Base1,
    /// ESXi 8.0.2-1, software.
    Ui1,
    /// ESXi 8.0.2-2, software.
    Base2,
    /// Tools 1.0, software, in every image.
    Tools,
    /// BIOS 2.1, firmware of `dell` (a vendor the host can stage).
    Bios,
    /// NIC 1.0, firmware of `hpe` (a vendor the host cannot stage).
    Nic,
    /// DPU 1.0, software for the DPU.
    Dpu,
}

impl Vib {
    /// Every VIB.
    pub const ALL: [Vib; 7] = [
        Vib::Base1,
        Vib::Ui1,
        Vib::Base2,
        Vib::Tools,
        Vib::Bios,
        Vib::Nic,
        Vib::Dpu,
    ];

    /// Firmware?
    pub fn firmware(self) -> bool {
        matches!(self, Vib::Bios | Vib::Nic)
    }

    /// A DPU VIB?
    pub fn dpu(self) -> bool {
        self == Vib::Dpu
    }

    /// Firmware of a vendor the host names in `firmware_staging_vendors`?
    pub fn firmware_stageable(self) -> bool {
        self == Vib::Bios
    }

    /// Its size in bytes.
    pub fn size(self) -> usize {
        match self {
            Vib::Base1 => 300_007,
            Vib::Ui1 => 120_011,
            Vib::Base2 => 310_019,
            Vib::Tools => 100_003,
            Vib::Bios => 80_021,
            Vib::Nic => 70_001,
            Vib::Dpu => 90_011,
        }
    }

    /// Its component and component version.
    pub fn component(self) -> (&'static str, &'static str) {
        match self {
            Vib::Base1 | Vib::Ui1 => ("ESXi", "8.0.2-1"),
            Vib::Base2 => ("ESXi", "8.0.2-2"),
            Vib::Tools => ("Tools", "1.0"),
            Vib::Bios => ("BIOS", "2.1"),
            Vib::Nic => ("NIC", "1.0"),
            Vib::Dpu => ("DPU", "1.0"),
        }
    }
}

/// One image of the universe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Img {
    /// `esx` serial 1: ESXi 8.0.2-1 and Tools (older than `Base`: rollback once `Base` is seen).
    Old,
    /// `esx` serial 2: ESXi 8.0.2-1, Tools, BIOS (dell firmware), DPU.
    Base,
    /// `esx` serial 3: ESXi 8.0.2-2, Tools, NIC (hpe firmware), DPU.
    Next,
    /// `lab` serial 1: ESXi 8.0.2-2, Tools, BIOS; another name, so its own serials.
    Lab,
}

impl Img {
    /// Every image.
    pub const ALL: [Img; 4] = [Img::Old, Img::Base, Img::Next, Img::Lab];

    /// Image name.
    pub fn name(self) -> &'static str {
        match self {
            Img::Lab => "lab",
            _ => "esx",
        }
    }

    /// Serial.
    pub fn serial(self) -> u64 {
        match self {
            Img::Old | Img::Lab => 1,
            Img::Base => 2,
            Img::Next => 3,
        }
    }

    /// Its VIBs.
    pub fn vibs(self) -> &'static [Vib] {
        match self {
            Img::Old => &[Vib::Base1, Vib::Ui1, Vib::Tools],
            Img::Base => &[Vib::Base1, Vib::Ui1, Vib::Tools, Vib::Bios, Vib::Dpu],
            Img::Next => &[Vib::Base2, Vib::Tools, Vib::Nic, Vib::Dpu],
            Img::Lab => &[Vib::Base2, Vib::Tools, Vib::Bios],
        }
    }

    /// Its components (`NAME=VERSION`), as `image create` takes them.
    pub fn components(self) -> Vec<String> {
        let mut out: Vec<String> = self
            .vibs()
            .iter()
            .map(|v| {
                let (c, ver) = v.component();
                format!("{c}={ver}")
            })
            .collect();
        out.dedup();
        out
    }

    fn component_map(self) -> BTreeMap<&'static str, &'static str> {
        self.vibs().iter().map(|v| v.component()).collect()
    }
}

/// Compares versions as SPEC §2 says: segment by segment, split on `.` and `-`, numbers as
/// numbers.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let seg = |s: &str| -> Vec<u64> {
        s.split(['.', '-'])
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    seg(a).cmp(&seg(b))
}

/// What the host is (one per case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// `host.dpus` is not empty.
    pub dpus: bool,
    /// No `install.command`: the built-in installer (banks under `state_dir/bootbank`).
    pub builtin_installer: bool,
    /// A `scratch.volatile_path` is configured.
    pub volatile: bool,
}

/// The firmware part of a staged record (SPEC §5 `staging.firmware`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Every firmware VIB staged (or installed).
    Staged,
    /// Firmware of a vendor the host cannot stage.
    NotSupported,
    /// A firmware download failed.
    Failed,
    /// The image has no firmware.
    NotApplicable,
}

impl Firmware {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Staged => "staged",
            Firmware::NotSupported => "not_supported",
            Firmware::Failed => "failed",
            Firmware::NotApplicable => "not_applicable",
        }
    }
}

/// A staged image record as the model expects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Which image.
    pub img: Img,
    /// In scratch (true) or the volatile path.
    pub persistent: bool,
    /// The blobs it lists.
    pub vibs: BTreeSet<Vib>,
    /// Its firmware state.
    pub firmware: Firmware,
}

impl Staged {
    /// The R5 mark, when every blob it lists is present.
    pub fn mark(&self) -> bool {
        matches!(self.firmware, Firmware::Staged | Firmware::NotApplicable)
    }
}

/// Compliance status (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compliance {
    /// Runs the image.
    Compliant,
    /// Does not, nothing staged.
    NonCompliant,
    /// Would downgrade.
    Incompatible,
    /// Does not, but everything is staged (R5/R8).
    Staged,
}

impl Compliance {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Compliance::Compliant => "compliant",
            Compliance::NonCompliant => "non_compliant",
            Compliance::Incompatible => "incompatible",
            Compliance::Staged => "staged",
        }
    }
}

/// The lifecycle operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/stage`.
    Stage,
    /// `POST /v1/remediate`.
    Remediate,
}

/// The world around the agent that the test switches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Env {
    /// Every VIB download answers 503.
    pub depot_down: bool,
    /// Firmware VIB downloads answer 503.
    pub firmware_down: bool,
    /// Scratch has no room for anything an image needs.
    pub scratch_full: bool,
    /// The state directory is read-only.
    pub state_ro: bool,
    /// The trust store's image key was replaced by another (and reloaded).
    pub trust_changed: bool,
    /// `maintenance.enter` fails.
    pub enter_fails: bool,
    /// `maintenance.exit` fails.
    pub exit_fails: bool,
    /// `install.command` fails.
    pub install_fails: bool,
    /// `install.command` outlives `maintenance.timeout_secs`.
    pub install_hangs: bool,
}

/// What a request is answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 202 with a new task.
    NewTask,
    /// 202 with the running task.
    Joined,
    /// 200, task null (already compliant).
    NothingToDo,
    /// An error with this code.
    Refused(&'static str),
}

/// How a task ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `succeeded`.
    Succeeded,
    /// `failed` with this code.
    Failed(&'static str),
}

/// The running lifecycle task as the model knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Task id (from the agent).
    pub id: String,
    /// Stage or remediate.
    pub kind: Kind,
    /// For which image.
    pub img: Img,
    /// Something happened while it ran (a fault switched, the agent killed during a
    /// remediation) after which more than one end is allowed.
    pub uncertain: bool,
}

/// Free bytes a full scratch keeps at every step (the test tops its filler up to this): room
/// for records and the lock, not for any VIB.
pub const SCRATCH_ROOM: u64 = 48 << 10;

/// The model of one host.
#[derive(Clone, Debug)]
pub struct Model {
    /// What the host is.
    pub host: Host,
    /// The switches of the world around it.
    pub env: Env,
    /// Highest serial accepted per image name (persistent).
    pub serials: BTreeMap<&'static str, u64>,
    /// The installed image (persistent).
    pub installed: Option<Img>,
    /// Maintenance mode (persistent).
    pub maintenance: bool,
    /// The staged record (at most one: a newer image staged replaces an older one).
    pub staged: Option<Staged>,
    /// Blobs present, per store: [scratch, volatile].
    pub blobs: [BTreeSet<Vib>; 2],
    /// Bytes of partial downloads per store, as observed before a request (they count as held
    /// when staging decides where the image fits).
    pub partials: [BTreeMap<Vib, u64>; 2],
    /// The image of the last compliance evaluation (persistent).
    pub checked: Option<Img>,
    /// The running task.
    pub running: Option<Running>,
    /// Finished tasks and how they ended.
    pub finished: BTreeMap<String, Outcome>,
}

impl Model {
    /// A fresh host.
    pub fn new(host: Host) -> Self {
        Self {
            host,
            env: Env::default(),
            serials: BTreeMap::new(),
            installed: None,
            maintenance: false,
            staged: None,
            blobs: [BTreeSet::new(), BTreeSet::new()],
            partials: [BTreeMap::new(), BTreeMap::new()],
            checked: None,
            running: None,
            finished: BTreeMap::new(),
        }
    }

    /// VIBs of `img` that apply to this host (host VIBs; DPU VIBs only with DPUs).
    pub fn applicable(&self, img: Img) -> BTreeSet<Vib> {
        img.vibs()
            .iter()
            .copied()
            .filter(|v| !v.dpu() || self.host.dpus)
            .collect()
    }

    /// VIBs the installed image put on the host.
    pub fn installed_vibs(&self) -> BTreeSet<Vib> {
        self.installed
            .map(|i| self.applicable(i))
            .unwrap_or_default()
    }

    /// The refusal of an image by signature checks (`check` too), if any.
    pub fn verify(&self, img: Img) -> Option<&'static str> {
        if self.env.trust_changed {
            return Some("untrusted_key");
        }
        if self
            .serials
            .get(img.name())
            .is_some_and(|s| *s > img.serial())
        {
            return Some("rollback_refused");
        }
        None
    }

    /// Whether `img` is completely staged (the R5 mark, blobs present).
    pub fn fully_staged(&self, img: Img) -> bool {
        self.staged.as_ref().is_some_and(|s| {
            s.img == img && s.mark() && s.vibs.is_subset(&self.blobs[usize::from(!s.persistent)])
        })
    }

    /// Compliance of the host against `img`.
    pub fn compliance(&self, img: Img) -> Compliance {
        let Some(installed) = self.installed else {
            return if self.fully_staged(img) {
                Compliance::Staged
            } else {
                Compliance::NonCompliant
            };
        };
        let have = installed.component_map();
        let want = img.component_map();
        let mut diff = false;
        for (c, v) in &want {
            match have.get(c) {
                None => diff = true,
                Some(h) => match version_cmp(h, v) {
                    std::cmp::Ordering::Greater => return Compliance::Incompatible,
                    std::cmp::Ordering::Less => diff = true,
                    std::cmp::Ordering::Equal => {}
                },
            }
        }
        diff |= have.keys().any(|c| !want.contains_key(c));
        let new_vibs = !self.applicable(img).is_subset(&self.installed_vibs());
        if installed == img || (!diff && !new_vibs) {
            Compliance::Compliant
        } else if self.fully_staged(img) {
            Compliance::Staged
        } else {
            Compliance::NonCompliant
        }
    }

    /// The answer to `POST /v1/compliance/check` for `img`: a status, or a refusal. Applies it.
    pub fn check(&mut self, img: Img) -> Result<Compliance, &'static str> {
        if let Some(code) = self.verify(img) {
            return Err(code);
        }
        if self.env.state_ro {
            return Err("internal");
        }
        self.checked = Some(img);
        Ok(self.compliance(img))
    }

    /// The answer to a stage or remediate request, assuming no task is running. Applies what the
    /// request changes (serials, compliance; not the task, whose id comes from the agent: see
    /// [`Model::started`]).
    pub fn request(&mut self, kind: Kind, img: Img) -> Answer {
        if let Some(code) = self.verify(img) {
            return Answer::Refused(code);
        }
        if let Some(r) = &self.running {
            return if r.img == img && r.kind == kind {
                Answer::Joined
            } else {
                Answer::Refused("busy")
            };
        }
        if self.env.state_ro {
            return Answer::Refused("internal");
        }
        self.checked = Some(img);
        match self.compliance(img) {
            Compliance::Compliant if !(kind == Kind::Remediate && self.maintenance) => {
                return Answer::NothingToDo;
            }
            Compliance::Incompatible => return Answer::Refused("incompatible"),
            _ => {}
        }
        let serial = self.serials.entry(img.name()).or_insert(0);
        *serial = (*serial).max(img.serial());
        Answer::NewTask
    }

    /// Records the task the agent started for a [`Answer::NewTask`].
    pub fn started(&mut self, id: String, kind: Kind, img: Img) {
        self.running = Some(Running {
            id,
            kind,
            img,
            uncertain: false,
        });
    }

    /// `DELETE /v1/staged/{digest of img}`, assuming no task runs: 200 (true) or 404 (false).
    pub fn delete(&mut self, img: Img) -> bool {
        match &self.staged {
            Some(s) if s.img == img => {
                let store = usize::from(!s.persistent);
                self.staged = None;
                // The record is removed, then every blob no record lists.
                self.blobs[store].clear();
                true
            }
            _ => false,
        }
    }

    /// Removes `img`'s record wherever it is (with the garbage it leaves).
    fn remove_record(&mut self, img: Img) {
        if self.staged.as_ref().is_some_and(|s| s.img == img) {
            self.delete(img);
        }
    }

    /// Runs the staging part of a task for `img` to its end: `all_firmware` for remediation
    /// (R6: it fetches firmware of any vendor). Returns the error code on failure.
    fn stage(&mut self, img: Img, all_firmware: bool) -> Result<Staged, &'static str> {
        let installed = self.installed_vibs();
        let plan: Vec<Vib> = self
            .applicable(img)
            .into_iter()
            .filter(|v| !installed.contains(v))
            .collect();
        let fetch: BTreeSet<Vib> = plan
            .iter()
            .copied()
            .filter(|v| {
                !v.firmware()
                    || all_firmware
                    || v.firmware_stageable()
                    // Already fetched by a remediation: kept.
                    || self.blobs.iter().any(|b| b.contains(v))
            })
            .collect();
        let unsupported = plan.len() > fetch.len();
        // R9: scratch if it has room for what it lacks, else the volatile path.
        let needed = |store: usize| -> u64 {
            fetch
                .iter()
                .filter(|v| !self.blobs[store].contains(v))
                .map(|v| {
                    let held = self.partials[store].get(v).copied().unwrap_or(0);
                    (v.size() as u64).saturating_sub(held)
                })
                .sum()
        };
        let store = if !self.env.scratch_full || needed(0) <= SCRATCH_ROOM {
            0
        } else if self.host.volatile {
            1
        } else {
            return Err("insufficient_space");
        };
        let mut got = BTreeSet::new();
        let mut firmware_failed = false;
        for v in &fetch {
            let down = self.env.depot_down || (v.firmware() && self.env.firmware_down);
            if self.blobs[store].contains(v) || !down {
                got.insert(*v);
            } else if v.firmware() {
                firmware_failed = true;
            } else {
                // Blobs fetched before the failure stay for the next run.
                self.blobs[store].extend(got.iter().copied());
                return Err("depot_unreachable");
            }
        }
        self.blobs[store].extend(got.iter().copied());
        let has_firmware = img.vibs().iter().any(|v| v.firmware());
        let firmware = if !has_firmware {
            Firmware::NotApplicable
        } else if firmware_failed {
            Firmware::Failed
        } else if unsupported {
            Firmware::NotSupported
        } else {
            Firmware::Staged
        };
        let record = Staged {
            img,
            persistent: store == 0,
            vibs: got,
            firmware,
        };
        // A newer image staged later replaces an older staged one: every other record goes,
        // with the blobs only it listed.
        if let Some(old) = self.staged.take() {
            let old_store = usize::from(!old.persistent);
            // Rewriting the same image's record in the same store removes nothing; any other
            // record is removed, and its store's unreferenced blobs (also those of earlier
            // failed runs) are collected.
            if !(old.img == img && old_store == store) {
                self.blobs[old_store].clear();
            }
        }
        self.blobs[store].extend(record.vibs.iter().copied());
        self.staged = Some(record.clone());
        Ok(record)
    }

    /// Runs the running task to its end (as if nothing interrupted it) and applies it.
    pub fn finish(&mut self) -> Option<(String, Outcome)> {
        let r = self.running.take()?;
        let result = match r.kind {
            Kind::Stage => self.stage(r.img, false).map(drop),
            Kind::Remediate => self.remediate(r.img),
        };
        self.checked = Some(r.img);
        let outcome = match result {
            Ok(()) => Outcome::Succeeded,
            Err(code) => Outcome::Failed(code),
        };
        self.finished.insert(r.id.clone(), outcome.clone());
        Some((r.id, outcome))
    }

    /// The remediation body.
    fn remediate(&mut self, img: Img) -> Result<(), &'static str> {
        if self.maintenance && self.installed == Some(img) {
            if self.env.exit_fails {
                return Err("maintenance_failed");
            }
            self.maintenance = false;
            self.remove_record(img);
            return Ok(());
        }
        let record = self.stage(img, true)?;
        if !record.mark() {
            return Err("depot_unreachable");
        }
        if !self.maintenance {
            if self.env.enter_fails {
                // The agent undoes a partial entry with the exit command; the mode stays off.
                return Err("maintenance_failed");
            }
            self.maintenance = true;
        }
        let installed =
            if !self.host.builtin_installer && (self.env.install_fails || self.env.install_hangs) {
                Err("install_failed")
            } else {
                self.installed = Some(img);
                Ok(())
            };
        if !self.env.exit_fails {
            self.maintenance = false;
        }
        installed?;
        if self.env.exit_fails {
            return Err("maintenance_failed");
        }
        self.remove_record(img);
        Ok(())
    }

    /// The agent was stopped (SIGKILL or SIGTERM) and started again; `reboot` also lost the
    /// volatile path. Returns false when what happened is no longer one state but a set (a
    /// remediation cut short), so the caller must resync from what it observes.
    pub fn restarted(&mut self, reboot: bool) -> bool {
        if reboot {
            self.blobs[1].clear();
            if self.staged.as_ref().is_some_and(|s| !s.persistent) {
                self.staged = None;
            }
        }
        // Start-up removes the installed image's staged content.
        if let Some(i) = self.installed {
            self.remove_record(i);
        }
        match &mut self.running {
            Some(r) if r.kind == Kind::Remediate => {
                r.uncertain = true;
                false
            }
            Some(r) if self.env.trust_changed => {
                // The resumed staging verifies its image again, against the new keys, and
                // fails, keeping the blobs committed before the stop; unless it had ended before.
                r.uncertain = true;
                false
            }
            _ => true,
        }
    }

    /// What status must say about compliance when the model is certain: the last checked image
    /// and its status now.
    pub fn status_compliance(&self) -> Option<(Img, Compliance)> {
        self.checked.map(|i| (i, self.compliance(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            dpus: true,
            builtin_installer: true,
            volatile: true,
        }
    }

    #[test]
    fn staging_then_remediation_installs_and_unstages() {
        let mut m = Model::new(host());
        assert_eq!(m.request(Kind::Stage, Img::Base), Answer::NewTask);
        m.started("t1".into(), Kind::Stage, Img::Base);
        assert_eq!(m.finish(), Some(("t1".into(), Outcome::Succeeded)));
        assert_eq!(m.compliance(Img::Base), Compliance::Staged);
        assert_eq!(m.request(Kind::Remediate, Img::Base), Answer::NewTask);
        m.started("t2".into(), Kind::Remediate, Img::Base);
        assert_eq!(m.finish(), Some(("t2".into(), Outcome::Succeeded)));
        assert_eq!(m.compliance(Img::Base), Compliance::Compliant);
        assert!(m.staged.is_none() && m.blobs[0].is_empty());
        assert_eq!(m.verify(Img::Old), Some("rollback_refused"));
        assert_eq!(m.request(Kind::Stage, Img::Base), Answer::NothingToDo);
    }

    #[test]
    fn unstageable_firmware_keeps_the_mark_false_and_downgrades_are_incompatible() {
        let mut m = Model::new(host());
        assert_eq!(m.request(Kind::Stage, Img::Next), Answer::NewTask);
        m.started("t1".into(), Kind::Stage, Img::Next);
        m.finish();
        let s = m.staged.clone().expect("staged");
        assert_eq!(s.firmware, Firmware::NotSupported);
        assert_eq!(m.compliance(Img::Next), Compliance::NonCompliant);
        m.installed = Some(Img::Lab);
        assert_eq!(m.compliance(Img::Base), Compliance::Incompatible);
    }
}

//! CPU weights the way systemd applies a unit's `CPUWeight=`: a cgroup per unit. The bench does
//! not run under systemd, so P8 makes the groups itself: one with the packaged unit's weight
//! for the agent (and one for the bench's own depot), one with systemd's default weight for the
//! workload, siblings under the root. On cgroup v2 the weight is `cpu.weight`; on cgroup v1 it
//! is `cpu.shares`, which systemd sets to `CPUWeight × 1024 / 100`.
//!
//! Weights only compare siblings, and only while the CPU is contended; processes left in the
//! root group (other users' jobs) compete as systemd's own slices would.

use std::path::{Path, PathBuf};

use crate::{BenchError, Result};

/// systemd's default `CPUWeight=`.
pub const DEFAULT_WEIGHT: u64 = 100;

/// A cgroup with a CPU weight; removed (its processes moved back to the root) when dropped.
#[derive(Debug)]
pub struct CpuGroup {
    dir: PathBuf,
    root: PathBuf,
    /// What the weight was written as, for the report (`cpu.weight 20`, `cpu.shares 204`).
    pub setting: String,
}

impl CpuGroup {
    /// A new group `name` with `CPUWeight=weight`, or `None` where no writable CPU controller
    /// is mounted (then the caller falls back to nice values).
    pub fn create(name: &str, weight: u64) -> Option<CpuGroup> {
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_has_cpu = std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        let (root, file, value) = if v2_has_cpu {
            // The root must hand the cpu controller down to its children.
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+cpu");
            (v2.to_owned(), "cpu.weight", weight)
        } else {
            let v1 = v2.join("cpu");
            if !v1.join("cpu.shares").is_file() {
                return None;
            }
            (v1, "cpu.shares", (weight * 1024 / 100).max(2))
        };
        let dir = root.join(name);
        if !dir.is_dir() && std::fs::create_dir(&dir).is_err() {
            return None;
        }
        let group = CpuGroup {
            dir,
            root,
            setting: format!("{file} {value}"),
        };
        std::fs::write(group.dir.join(file), value.to_string())
            .ok()
            .map(|()| group)
    }

    /// `cgroup.procs` of the group: a process writing its pid there moves in, and what it forks
    /// afterwards starts there.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn adopt(&self, pid: u32) -> Result<()> {
        std::fs::write(self.procs(), pid.to_string()).map_err(BenchError::io(format!(
            "move process {pid} into {}",
            self.dir.display()
        )))
    }
}

impl CpuGroup {
    /// Moves process `pid` back to the root group.
    pub fn release(&self, pid: u32) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), pid.to_string());
    }
}

/// The packaged unit's `CPUWeight=` (`systemd/vibstaged.service`, read at build time so the two
/// cannot drift apart).
pub fn unit_cpu_weight() -> u64 {
    include_str!("../../systemd/vibstaged.service")
        .lines()
        .find_map(|l| l.trim().strip_prefix("CPUWeight="))
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(DEFAULT_WEIGHT)
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.procs()).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

//! What the benchmark reads about a process or a directory from the kernel: memory and CPU time
//! from `/proc/<pid>/`, and bytes on disk under a directory. No benchmark types, so every module
//! can use it.

use std::path::Path;

use crate::{BenchError, Result};

/// Memory of a process, from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set now (`VmRSS`).
    pub rss: u64,
    /// Peak resident set since start (`VmHWM`).
    pub peak: u64,
}

/// `VmRSS` and `VmHWM` of process `pid`.
pub fn memory_of(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(BenchError::io(format!("read {path}")))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    })
}

/// CPU time (user + system, seconds) used so far by process `pid` and its reaped children;
/// 0 if it cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (`state`).
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17, i.e. 11..=14 after `state`.
    let ticks: u64 = f.get(11..15).map_or(0, |v| v.iter().sum());
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1);
    ticks as f64 / hz as f64
}

/// Bytes under `dir` (recursively), for what a killed agent holds on disk.
pub fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(std::result::Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

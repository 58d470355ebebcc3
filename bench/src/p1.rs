//! P1 throughput and P2 memory.
//!
//! Each round, in this order, with `sync` between steps so that no step pays for another's dirty
//! pages:
//! 1. a fresh `vibstaged` (empty scratch) stages the 8-VIB image from nginx; timed from the
//!    stage request to the task's success (which includes verifying the image, hashing, fsync of
//!    every blob and of the directories). Its `VmRSS` a moment after start is P2 idle, its
//!    `VmHWM` at the end P2 peak.
//! 2. the operator's way: for each VIB one after another, `curl` it to a file, `openssl dgst
//!    -sha256` the file (and check the digest), `sync FILE` (fsync, as the agent does per blob).
//! 3. the limits: `curl` of all VIBs to `/dev/null` on one connection (HTTPS alone), `openssl
//!    dgst -sha256` of the depot's files (hashing alone, page cache), `dd conv=fsync` of the same
//!    number of bytes (writing alone).
//! 4. the peers a user would pick instead: containerd (`ctr content fetch` of an OCI image whose
//!    layers are the same VIBs, from the same nginx, [`crate::containerd`]) and `aria2c -j4` with
//!    a sha-256 per file, then `sync` of the files ([`crate::aria2`]). A peer that cannot be
//!    installed is a row saying so, not a failed run.
//!
//! Every tool runs through the measuring wrapper ([`tools::measured`]): its wall time, CPU
//! seconds and peak RSS. vibstaged's and containerd's CPU come from `/proc/<pid>/stat` (the
//! daemon's delta over the run), their peak RSS from `VmHWM` (containerd's reset before each run).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent::AgentSetup;
use crate::containerd;
use crate::env::{Env, ImageFile};
use crate::report::{self, Met, Row, median};
use crate::tools::Cost;
use crate::{BenchError, Result, Sizes, aria2, say, tools};

/// Bytes in a GiB, for CPU-seconds per GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// What P1 measured.
#[derive(Debug)]
pub struct P1 {
    /// The rows of P1 and P2.
    pub rows: Vec<Row>,
    /// vibstage's median staging rate, bytes per second (P5's reference).
    pub rate: f64,
}

/// The P1 image (8 VIBs of the configured size).
pub fn image(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<ImageFile> {
    env.image("bench-p1", sizes.p1_vibs, sizes.p1_vib_size, log)
}

/// One staging by a fresh agent.
struct Staged {
    /// Seconds from the stage request to the task's success, vibstaged's CPU seconds over them
    /// and its peak RSS at the end (`VmHWM`).
    cost: Cost,
    /// RSS a moment after start.
    idle: u64,
    /// CPU seconds of nginx during the staging.
    nginx_cpu: f64,
}

fn stage_once(env: &Env, image: &ImageFile, name: &str) -> Result<Staged> {
    let mut agent = env.agent(name, AgentSetup::default())?;
    agent.start()?;
    std::thread::sleep(Duration::from_millis(300));
    let idle = agent.memory()?.rss;
    let cpu = (agent.cpu(), env.nginx.cpu());
    let start = Instant::now();
    let id = agent.stage(image, &env.depot_url())?;
    let task = agent.wait_task(&id)?;
    let took = start.elapsed().as_secs_f64();
    let cpu = (agent.cpu() - cpu.0, env.nginx.cpu() - cpu.1);
    let peak = agent.memory()?.peak;
    let downloaded = task["bytes_downloaded"].as_u64().unwrap_or(0);
    if downloaded != image.bytes() {
        return Err(BenchError::Run(format!(
            "{name} downloaded {downloaded} bytes of an image of {}",
            image.bytes()
        )));
    }
    agent.stop();
    env.discard(&agent);
    tools::settle();
    Ok(Staged {
        cost: Cost {
            wall: took,
            cpu: cpu.0,
            peak,
        },
        idle,
        nginx_cpu: cpu.1,
    })
}

/// The operator's script: curl, openssl dgst, sync FILE, one VIB after another. Its time is the
/// sum of the tools' times (spawn to exit).
fn baseline_once(env: &Env, image: &ImageFile, dir: &Path) -> Result<Cost> {
    std::fs::create_dir_all(dir).map_err(BenchError::io("create baseline dir"))?;
    let ca = env.ca_pem();
    let urls = image.urls(&env.depot_url());
    let mut cost = Cost::default();
    for (i, ((_, digest, _), url)) in image.vibs.iter().zip(&urls).enumerate() {
        let file = dir.join(format!("vib-{i}"));
        let (c, _) = tools::measured(&tools::curl(
            &ca,
            std::slice::from_ref(url),
            std::slice::from_ref(&file),
        ))?;
        cost = cost.then(c);
        let (c, out) =
            tools::measured(Command::new("openssl").args(["dgst", "-sha256"]).arg(&file))?;
        cost = cost.then(c);
        if tools::parse_dgst(&out.stdout).as_deref() != Some(digest.to_hex().as_str()) {
            return Err(BenchError::Run(format!(
                "baseline: {} does not hash to {digest}",
                file.display()
            )));
        }
        cost = cost.then(tools::measured(Command::new("sync").arg(&file))?.0);
    }
    let _ = std::fs::remove_dir_all(dir);
    tools::settle();
    Ok(cost)
}

/// The medians of each field of `costs`.
fn median_cost(costs: &[Cost]) -> Cost {
    let field = |f: fn(&Cost) -> f64| median(&costs.iter().map(f).collect::<Vec<_>>());
    Cost {
        wall: field(|c| c.wall),
        cpu: field(|c| c.cpu),
        peak: field(|c| c.peak as f64) as u64,
    }
}

/// `1.87 s (547 MiB/s)`: the time and the rate of the image's bytes.
fn with_rate(bytes: f64, t: f64) -> String {
    format!("{} ({})", report::secs(t), report::rate(bytes, t))
}

/// A table cell: time and rate, CPU seconds and peak RSS.
fn cell(bytes: f64, c: &Cost) -> String {
    format!(
        "{}, {:.2} CPU-s, {}",
        with_rate(bytes, c.wall),
        c.cpu,
        report::mib(c.peak as f64)
    )
}

/// One line of the per-round log: time, CPU and peak of a tool.
fn logged(name: &str, c: &Cost) -> String {
    format!(
        "{name} {:.2} s ({:.2} CPU-s, {})",
        c.wall,
        c.cpu,
        report::mib(c.peak as f64)
    )
}

/// A peer's row: vibstage against it, or why it is not available.
fn peer_row(
    bytes: f64,
    label: &str,
    ours: &Cost,
    theirs: std::result::Result<&[Cost], &String>,
) -> Row {
    match theirs {
        Ok(runs) => {
            let theirs = median_cost(runs);
            let ratio = ours.wall / theirs.wall.max(1e-9);
            Row::new(
                "P1",
                label,
                cell(bytes, ours),
                cell(bytes, &theirs),
                report::ratio(ratio),
                "≤ 1×",
                Met::from(ratio <= 1.0),
            )
        }
        Err(reason) => {
            let reason: String = reason.chars().take(160).collect();
            Row::new(
                "P1",
                format!("{label}: not available: {reason}"),
                "",
                "",
                "",
                "",
                Met::Info,
            )
        }
    }
}

/// Runs P1 (and P2, measured during P1).
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<P1> {
    let image = image(env, sizes, log)?;
    let bytes = image.bytes() as f64;
    let ca = env.ca_pem();
    let urls = image.urls(&env.depot_url());
    let blobs: Vec<PathBuf> = image.vibs.iter().map(|v| v.0.clone()).collect();
    let scratch = env.dir.join("p1-baseline");
    let containerd_peer = containerd::Peer::start(env, &image, log).map_err(|e| e.to_string());
    if let Err(e) = &containerd_peer {
        say(log, format!("P1 peer containerd not available: {e}"));
    }
    let aria2_peer = aria2::Peer::start(env, &image, log).map_err(|e| e.to_string());
    if let Err(e) = &aria2_peer {
        say(log, format!("P1 peer aria2c not available: {e}"));
    }
    // Warm the page cache and nginx once so that run 1 is like the others.
    tools::timed(&mut tools::curl(
        &ca,
        &urls,
        &vec!["/dev/null".into(); urls.len()],
    ))?;

    let (mut ours, mut idle, mut peak) = (Vec::new(), Vec::new(), Vec::new());
    let (mut base, mut null, mut sha, mut dd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ctd, mut aria) = (Vec::new(), Vec::new());
    for run in 0..sizes.p1_runs {
        let staged = stage_once(env, &image, &format!("p1-{run}"))?;
        ours.push(staged.cost);
        idle.push(staged.idle as f64);
        peak.push(staged.cost.peak as f64);
        base.push(baseline_once(env, &image, &scratch)?);
        null.push(
            tools::measured(&tools::curl(
                &ca,
                &urls,
                &vec!["/dev/null".into(); urls.len()],
            ))?
            .0,
        );
        let mut dgst = Command::new("openssl");
        dgst.args(["dgst", "-sha256"]).args(&blobs);
        sha.push(tools::measured(&dgst)?.0);
        std::fs::create_dir_all(&scratch).map_err(BenchError::io("create baseline dir"))?;
        let dd_file = scratch.join("dd");
        let mut write = Command::new("dd");
        write
            .arg("if=/dev/zero")
            .arg(format!("of={}", dd_file.display()))
            .arg("bs=1M")
            .arg(format!("count={}", image.bytes().div_ceil(1 << 20)))
            .arg("conv=fsync");
        dd.push(tools::measured(&write)?.0);
        let _ = std::fs::remove_dir_all(&scratch);
        tools::settle();
        let mut peers = Vec::new();
        if let Ok(peer) = &containerd_peer {
            let r = peer.run_once(env)?;
            peers.push(format!(
                "{} [{}; nginx {:.2} CPU-s]",
                logged("containerd", &r.cost),
                r.detail,
                r.nginx_cpu
            ));
            ctd.push(r.cost);
        }
        if let Ok(peer) = &aria2_peer {
            let r = peer.run_once(env, &image)?;
            peers.push(format!(
                "{} [{}; nginx {:.2} CPU-s]",
                logged("aria2c+sync", &r.cost),
                r.detail,
                r.nginx_cpu
            ));
            aria.push(r.cost);
        }
        say(
            log,
            format!(
                "P1 run {}: {} [nginx {:.2} CPU-s], {}, {}, {}, {}{}{}; P2 idle {}, peak {}",
                run + 1,
                logged("vibstage", &ours[run]),
                staged.nginx_cpu,
                logged("curl+dgst+sync", &base[run]),
                logged("https→null", &null[run]),
                logged("sha256", &sha[run]),
                logged("dd", &dd[run]),
                if peers.is_empty() { "" } else { ", " },
                peers.join(", "),
                report::mib(idle[run]),
                report::mib(peak[run]),
            ),
        );
    }
    let (ours, base, null) = (median_cost(&ours), median_cost(&base), median_cost(&null));
    let (sha, dd) = (median_cost(&sha), median_cost(&dd));
    let peak = peak.iter().copied().fold(0.0, f64::max);
    let idle = median(&idle);
    let size = report::mib(bytes);
    let n = image.vibs.len();
    let rows = vec![
        Row::new(
            "P1",
            format!("stage {size} of {n} VIBs vs curl + openssl dgst + sync"),
            cell(bytes, &ours),
            cell(bytes, &base),
            report::ratio(ours.wall / base.wall),
            "≤ 0.65×",
            Met::from(ours.wall / base.wall <= 0.65),
        ),
        Row::new(
            "P1",
            "stage vs HTTPS to /dev/null (curl)",
            cell(bytes, &ours),
            cell(bytes, &null),
            report::ratio(ours.wall / null.wall),
            "≤ 1.25×",
            Met::from(ours.wall / null.wall <= 1.25),
        ),
        Row::new(
            "P1",
            "vibstaged CPU per GiB staged vs sha256 alone (openssl dgst)",
            format!("{:.2} CPU-s/GiB", ours.cpu * GIB / bytes as f64),
            format!("{:.2} CPU-s/GiB", sha.cpu * GIB / bytes as f64),
            report::ratio(ours.cpu / sha.cpu.max(1e-9)),
            "≤ 1.0 CPU-s/GiB",
            Met::from(ours.cpu * GIB / bytes as f64 <= 1.0),
        ),
        peer_row(
            bytes,
            "vs containerd `ctr content fetch` (sha256 checked, fsync per blob; no signatures)",
            &ours,
            containerd_peer.as_ref().map(|_| ctd.as_slice()),
        ),
        peer_row(
            bytes,
            "vs aria2c -j4 --checksum=sha-256 + sync (checks by re-reading, fsyncs; no signatures)",
            &ours,
            aria2_peer.as_ref().map(|_| aria.as_slice()),
        ),
        Row::new(
            "P1",
            "limit: sha256 of the same bytes (openssl dgst)",
            "",
            cell(bytes, &sha),
            "",
            "",
            Met::Info,
        ),
        Row::new(
            "P1",
            "limit: fsync'd write of the same bytes (dd conv=fsync)",
            "",
            cell(bytes, &dd),
            "",
            "",
            Met::Info,
        ),
        Row::new(
            "P2",
            "peak RSS of vibstaged during P1 (VmHWM, max of runs)",
            report::mib(peak),
            "",
            "",
            "≤ 32 MiB",
            Met::from(peak <= 32.0 * 1048576.0),
        ),
        Row::new(
            "P2",
            "idle RSS of vibstaged after start (VmRSS)",
            report::mib(idle),
            "",
            "",
            "≤ 12 MiB",
            Met::from(idle <= 12.0 * 1048576.0),
        ),
    ];
    Ok(P1 {
        rows,
        rate: bytes / ours.wall.max(1e-9),
    })
}

/// P5's reference when P1 did not run: one staging of the P1 image; bytes per second.
pub fn probe_rate(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<f64> {
    let image = image(env, sizes, log)?;
    let t = stage_once(env, &image, "p1-probe")?.cost.wall;
    say(
        log,
        format!("P1 path probe: {}", report::rate(image.bytes() as f64, t)),
    );
    Ok(image.bytes() as f64 / t.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_row_compares_medians_or_says_why_it_is_missing() {
        let ours = Cost {
            wall: 1.0,
            cpu: 1.5,
            peak: 1 << 20,
        };
        let runs = [2.0, 4.0, 100.0].map(|wall| Cost {
            wall,
            cpu: 3.0,
            peak: 2 << 20,
        });
        let row = peer_row(1024.0, "vs x", &ours, Ok(&runs));
        assert_eq!(row.ratio, "0.25×");
        assert_eq!(row.met, Met::Yes);
        assert!(
            row.baseline.contains("3.00 CPU-s, 2.0 MiB"),
            "{}",
            row.baseline
        );
        let reason = "apt-get install -y -q --no-install-recommends x failed".to_owned();
        let row = peer_row(1024.0, "vs x", &ours, Err(&reason));
        assert_eq!(row.measure, format!("vs x: not available: {reason}"));
        assert_eq!((row.vibstage.as_str(), row.met), ("-", Met::Info));
    }
}

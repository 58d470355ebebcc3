//! P1 throughput and P2 memory.
//!
//! Each run, in this order, with `sync` between steps so that no step pays for another's dirty
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

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent::AgentSetup;
use crate::env::{Env, ImageFile};
use crate::report::{self, Met, Row, median};
use crate::{BenchError, Result, Sizes, say, tools};

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
    /// Seconds from the stage request to the task's success.
    took: f64,
    /// RSS a moment after start.
    idle: u64,
    /// Peak RSS at the end.
    peak: u64,
    /// CPU seconds of vibstaged and of nginx during the staging.
    cpu: (f64, f64),
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
        took,
        idle,
        peak,
        cpu,
    })
}

/// The operator's script: curl, openssl dgst, sync FILE, one VIB after another.
fn baseline_once(env: &Env, image: &ImageFile, dir: &std::path::Path) -> Result<f64> {
    std::fs::create_dir_all(dir).map_err(BenchError::io("create baseline dir"))?;
    let ca = env.ca_pem();
    let urls = image.urls(&env.depot_url());
    let start = Instant::now();
    for (i, ((_, digest, _), url)) in image.vibs.iter().zip(&urls).enumerate() {
        let file = dir.join(format!("vib-{i}"));
        tools::timed(&mut tools::curl(
            &ca,
            std::slice::from_ref(url),
            std::slice::from_ref(&file),
        ))?;
        let (_, out) = tools::timed(Command::new("openssl").args(["dgst", "-sha256"]).arg(&file))?;
        if tools::parse_dgst(&out.stdout).as_deref() != Some(digest.to_hex().as_str()) {
            return Err(BenchError::Run(format!(
                "baseline: {} does not hash to {digest}",
                file.display()
            )));
        }
        tools::timed(Command::new("sync").arg(&file))?;
    }
    let took = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(dir);
    tools::settle();
    Ok(took)
}

/// Runs P1 (and P2, measured during P1).
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<P1> {
    let image = image(env, sizes, log)?;
    let bytes = image.bytes() as f64;
    let ca = env.ca_pem();
    let urls = image.urls(&env.depot_url());
    let blobs: Vec<PathBuf> = image.vibs.iter().map(|v| v.0.clone()).collect();
    let scratch = env.dir.join("p1-baseline");
    // Warm the page cache and nginx once so that run 1 is like the others.
    tools::timed(&mut tools::curl(
        &ca,
        &urls,
        &vec!["/dev/null".into(); urls.len()],
    ))?;

    let (mut ours, mut idle, mut peak) = (Vec::new(), Vec::new(), Vec::new());
    let (mut base, mut null, mut sha, mut dd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..sizes.p1_runs {
        let staged = stage_once(env, &image, &format!("p1-{run}"))?;
        ours.push(staged.took);
        idle.push(staged.idle as f64);
        peak.push(staged.peak as f64);
        base.push(baseline_once(env, &image, &scratch)?);
        let (t, _) = tools::timed(&mut tools::curl(
            &ca,
            &urls,
            &vec!["/dev/null".into(); urls.len()],
        ))?;
        null.push(t);
        let (t, _) = tools::timed(
            Command::new("openssl")
                .args(["dgst", "-sha256"])
                .args(&blobs),
        )?;
        sha.push(t);
        std::fs::create_dir_all(&scratch).map_err(BenchError::io("create baseline dir"))?;
        let dd_file = scratch.join("dd");
        let (t, _) = tools::timed(
            Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", dd_file.display()))
                .arg("bs=1M")
                .arg(format!("count={}", image.bytes().div_ceil(1 << 20)))
                .arg("conv=fsync"),
        )?;
        dd.push(t);
        let _ = std::fs::remove_dir_all(&scratch);
        tools::settle();
        say(
            log,
            format!(
                "P1 run {}: vibstage {:.2} s, curl+dgst+sync {:.2} s, https→null {:.2} s, \
                 sha256 {:.2} s, dd {:.2} s; P2 idle {}, peak {}; CPU while staging: \
                 vibstaged {:.2} s, nginx {:.2} s",
                run + 1,
                ours[run],
                base[run],
                null[run],
                sha[run],
                dd[run],
                report::mib(idle[run]),
                report::mib(peak[run]),
                staged.cpu.0,
                staged.cpu.1,
            ),
        );
    }
    let (ours, base, null) = (median(&ours), median(&base), median(&null));
    let (sha, dd) = (median(&sha), median(&dd));
    let peak = peak.iter().copied().fold(0.0, f64::max);
    let idle = median(&idle);
    let size = report::mib(bytes);
    let n = image.vibs.len();
    let with_rate = |t: f64| format!("{} ({})", report::secs(t), report::rate(bytes, t));
    let rows = vec![
        Row::new(
            "P1",
            format!("stage {size} of {n} VIBs vs curl + openssl dgst + sync"),
            with_rate(ours),
            with_rate(base),
            report::ratio(ours / base),
            "≤ 0.65×",
            Met::from(ours / base <= 0.65),
        ),
        Row::new(
            "P1",
            "stage vs HTTPS to /dev/null (curl)",
            with_rate(ours),
            with_rate(null),
            report::ratio(ours / null),
            "≤ 1.6×",
            Met::from(ours / null <= 1.6),
        ),
        Row::new(
            "P1",
            "limit: sha256 of the same bytes (openssl dgst)",
            "",
            with_rate(sha),
            "",
            "",
            Met::Info,
        ),
        Row::new(
            "P1",
            "limit: fsync'd write of the same bytes (dd conv=fsync)",
            "",
            with_rate(dd),
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
        rate: bytes / ours.max(1e-9),
    })
}

/// P5's reference when P1 did not run: one staging of the P1 image; bytes per second.
pub fn probe_rate(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<f64> {
    let image = image(env, sizes, log)?;
    let t = stage_once(env, &image, "p1-probe")?.took;
    say(
        log,
        format!("P1 path probe: {}", report::rate(image.bytes() as f64, t)),
    );
    Ok(image.bytes() as f64 / t.max(1e-9))
}

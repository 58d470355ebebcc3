//! P8 polite staging (issue 16, part 3): staging runs beside the host's workloads and must not
//! steal them. A CPU-bound workload (one `openssl dgst -sha256` of zeros per core) and a
//! disk-bound one (`dd … conv=fdatasync`) are timed alone and while an agent stages the P1 image
//! with the packaged unit's priorities (`Nice=10`, best-effort I/O priority 7, applied here with
//! `nice` and `ionice` since the bench does not run under systemd); the figure is the share of
//! its throughput the workload keeps (goal ≥ 90 %). Then `depot.max_bytes_per_sec` is checked:
//! the P1 image staged under a limit of a tenth of the measured P1 rate, the rate it got against
//! the limit (goal within ±5 %). The bench's own depot (nginx, on this machine) is given the
//! agent's nice value while a workload is timed: a real host's depot is elsewhere.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::agent::AgentSetup;
use crate::cgroup::{CpuGroup, DEFAULT_WEIGHT, unit_cpu_weight};
use crate::env::{Env, ImageFile};
use crate::report::{self, Met, Row, median};
use crate::{BenchError, Result, Sizes, p1, say, tools};

/// A workload: a command line per process, all run at once; its figure is their wall time.
struct Workload {
    name: &'static str,
    commands: Vec<Command>,
}

/// `script` run by `sh`, first moving itself into `group` (so that everything it starts runs
/// there from its first instruction).
fn shell(script: &str, group: Option<&CpuGroup>) -> Command {
    let mut c = Command::new("sh");
    let enter = group.map_or(String::new(), |g| {
        format!("echo $$ > '{}' && ", g.procs().display())
    });
    c.arg("-c").arg(format!("{enter}{script}"));
    c
}

fn cpu_workload(bytes: u64, group: Option<&CpuGroup>) -> Workload {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let commands = (0..cores)
        .map(|_| {
            shell(
                &format!("head -c {bytes} /dev/zero | openssl dgst -sha256"),
                group,
            )
        })
        .collect();
    Workload {
        name: "CPU-bound workload (one sha256 of zeros per core)",
        commands,
    }
}

fn disk_workload(env: &Env, mib: u64, group: Option<&CpuGroup>) -> Workload {
    let c = shell(
        &format!(
            "exec dd if=/dev/zero of='{}' bs=1M count={mib} conv=fdatasync",
            env.dir.join("p8-dd").display()
        ),
        group,
    );
    Workload {
        name: "disk-bound workload (dd with fdatasync)",
        commands: vec![c],
    }
}

/// Runs every process of the workload at once; seconds until the last one ends.
fn run_workload(w: &mut Workload) -> Result<f64> {
    let start = Instant::now();
    let mut children = Vec::new();
    for c in &mut w.commands {
        children.push(
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(BenchError::io(format!("start {}", w.name)))?,
        );
    }
    for mut child in children {
        let status = child
            .wait()
            .map_err(BenchError::io(format!("wait for {}", w.name)))?;
        if !status.success() {
            return Err(BenchError::Run(format!("{} failed ({status})", w.name)));
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The cgroups of a host run by systemd: the agent's unit with its `CPUWeight=`, the depot with
/// the same weight (it stands for a depot elsewhere), the workload with the default weight.
struct Groups {
    agent: CpuGroup,
    depot: CpuGroup,
    work: CpuGroup,
}

impl Groups {
    fn create() -> Option<Groups> {
        let weight = unit_cpu_weight();
        Some(Groups {
            agent: CpuGroup::create("vibstage-bench-agent", weight)?,
            depot: CpuGroup::create("vibstage-bench-depot", weight)?,
            work: CpuGroup::create("vibstage-bench-workload", DEFAULT_WEIGHT)?,
        })
    }
}

/// The workload's time while an agent (with the unit's priorities) stages `image`; also
/// whether the staging was still running when the workload ended (else the figure is partly
/// of a workload alone).
fn during_staging(
    env: &Env,
    image: &ImageFile,
    w: &mut Workload,
    name: &str,
    groups: Option<&Groups>,
) -> Result<(f64, bool)> {
    let mut agent = env.agent(
        name,
        AgentSetup {
            unit_priority: true,
            ..AgentSetup::default()
        },
    )?;
    agent.start()?;
    // The bench's depot runs on this machine; a real host's does not: it gets the agent's
    // priority so that the workload competes with the agent alone.
    env.nginx.renice(10);
    if let Some(g) = groups {
        if let Some(pid) = agent.pid() {
            g.agent.adopt(pid)?;
        }
        for pid in env.nginx.pids() {
            g.depot.adopt(pid)?;
        }
    }
    let id = agent.stage(image, &env.depot_url())?;
    let took = run_workload(w);
    env.nginx.renice(0);
    if let Some(g) = groups {
        for pid in env.nginx.pids() {
            g.depot.release(pid);
        }
    }
    let took = took?;
    let overlapped = matches!(
        agent.task(&id, None)?["state"].as_str(),
        Some("queued" | "running")
    );
    agent.wait_task(&id)?;
    agent.stop();
    env.discard(&agent);
    let _ = std::fs::remove_file(env.dir.join("p8-dd"));
    tools::settle();
    Ok((took, overlapped))
}

/// Runs P8.
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<Vec<Row>> {
    let image = p1::image(env, sizes, log)?;
    let (cpu_bytes, dd_mib) = if sizes.quick {
        (64 << 20, 16)
    } else {
        (1 << 30, 512)
    };
    let groups = Groups::create();
    let how = match &groups {
        Some(g) => format!(
            "CPUWeight={} as a cgroup ({}) and nice 10",
            unit_cpu_weight(),
            g.agent.setting
        ),
        None => "nice 10 (no writable cgroup CPU controller)".to_owned(),
    };
    say(log, format!("P8: the agent runs with {how}"));
    let work = groups.as_ref().map(|g| &g.work);
    let mut rows = Vec::new();
    for mut workload in [
        cpu_workload(cpu_bytes, work),
        disk_workload(env, dd_mib, work),
    ] {
        let (mut alone, mut during, mut overlap) = (Vec::new(), Vec::new(), 0);
        for run in 0..sizes.p1_runs {
            let a = run_workload(&mut workload)?;
            let _ = std::fs::remove_file(env.dir.join("p8-dd"));
            tools::settle();
            let (d, overlapped) = during_staging(
                env,
                &image,
                &mut workload,
                &format!("p8-{run}"),
                groups.as_ref(),
            )?;
            overlap += usize::from(overlapped);
            say(
                log,
                format!(
                    "P8 run {}: {}: alone {}, while staging {} ({})",
                    run + 1,
                    workload.name,
                    report::secs(a),
                    report::secs(d),
                    if overlapped {
                        "staging outlasted it"
                    } else {
                        "staging ended first"
                    }
                ),
            );
            alone.push(a);
            during.push(d);
        }
        let kept = median(&alone) / median(&during).max(1e-9);
        rows.push(Row::new(
            "P8",
            format!(
                "{} keeps, while staging with {how} ({overlap}/{} runs overlapped whole)",
                workload.name, sizes.p1_runs
            ),
            format!("{:.0} %", kept * 100.0),
            report::secs(median(&alone)),
            format!("{kept:.2}×"),
            "≥ 90 %",
            Met::from(kept >= 0.90),
        ));
    }

    // The rate limit: a tenth of what the image stages at unlimited, from one probe.
    let rate = p1::probe_rate(env, sizes, log)?;
    let limit = ((rate / 10.0) as u64).max(64 << 10);
    let mut got = Vec::new();
    for run in 0..sizes.p1_runs {
        let mut agent = env.agent(
            &format!("p8-rate-{run}"),
            AgentSetup {
                max_bytes_per_sec: Some(limit),
                ..AgentSetup::default()
            },
        )?;
        agent.start()?;
        let start = Instant::now();
        let id = agent.stage(&image, &env.depot_url())?;
        agent.wait_task(&id)?;
        let took = start.elapsed().as_secs_f64();
        agent.stop();
        env.discard(&agent);
        tools::settle();
        let r = image.bytes() as f64 / took;
        say(
            log,
            format!(
                "P8 rate run {}: {} in {} = {}/s under a limit of {}/s",
                run + 1,
                report::mib(image.bytes() as f64),
                report::secs(took),
                report::mib(r),
                report::mib(limit as f64)
            ),
        );
        got.push(r);
    }
    let ratio = median(&got) / limit as f64;
    rows.push(Row::new(
        "P8",
        format!(
            "depot.max_bytes_per_sec = {}/s holds",
            report::mib(limit as f64)
        ),
        format!("{}/s", report::mib(median(&got))),
        format!("{}/s", report::mib(limit as f64)),
        format!("{ratio:.3}×"),
        "0.95–1.05×",
        Met::from((0.95..=1.05).contains(&ratio)),
    ));
    Ok(rows)
}

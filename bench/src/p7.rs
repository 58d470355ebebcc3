//! P7 fleet (issue 15): one `vibstagectl` and N real `vibstaged` processes on this machine, each
//! with its own scratch, state, socket, mTLS port and server certificate (one CA), driven the way
//! an operator drives a fleet: `--hosts FILE stage --wait`, then `status`, `check` and
//! `remediate --parallel 50 --max-failures 5` with a few agents whose maintenance hook fails,
//! then `stage` and `status` again with 1 % of the hosts down and with 5 % down or refusing the
//! controller.
//!
//! The controller runs under `prlimit --nofile=N:`, N half the number of hosts (at most a login
//! shell's 1,024), so that the product, not the bench, has to make room for a connection per
//! host. While it runs, its
//! `VmHWM` and open descriptors are sampled every 10 ms from `/proc`; its CPU time is the
//! children's rusage around it. The agents count TLS handshakes and requests themselves
//! (`vibstage_tls_handshakes_total`, `vibstage_http_requests_total`), read over their sockets
//! before and after.
//!
//! Every host's result is checked, and every exit code: a figure whose fleet is wrong is an
//! error, not a row. The reference for the staging wall time is the byte bound: N × the image
//! at the staging rate P1 measured in this run.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use time::OffsetDateTime;
use vibstage_ctl::pki::{DevCa, issue_server};

use crate::agent::{Agent, AgentSetup};
use crate::env::{Env, ImageFile};
use crate::report::{self, Met, Row};
use crate::{BenchError, Result, Sizes, say, tools};

/// `remediate --parallel` and `--max-failures` of the issue.
const REMEDIATE_PARALLEL: usize = 50;
const MAX_FAILURES: usize = 5;

/// What one `vibstagectl` run cost and said.
struct Run {
    /// Unix time of the start.
    began: f64,
    wall: f64,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Peak resident set (`VmHWM`), bytes.
    peak_rss: u64,
    /// Most open descriptors seen.
    peak_fds: usize,
    /// User + system CPU seconds.
    cpu: f64,
}

impl Run {
    fn json(&self, what: &str) -> Result<serde_json::Map<String, Value>> {
        match serde_json::from_str(&self.stdout) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(BenchError::Run(format!(
                "P7 {what}: vibstagectl printed no JSON object (exit {:?}): {}\n{}",
                self.code,
                excerpt(&self.stdout),
                excerpt(&self.stderr)
            ))),
        }
    }

    fn expect_code(&self, what: &str, code: i32) -> Result<()> {
        if self.code == Some(code) {
            return Ok(());
        }
        Err(BenchError::Run(format!(
            "P7 {what}: vibstagectl exited {:?}, expected {code}:\n{}\n{}",
            self.code,
            excerpt(&self.stdout),
            excerpt(&self.stderr)
        )))
    }
}

fn excerpt(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 40 {
        return text.to_owned();
    }
    format!(
        "{}\n… ({} lines) …\n{}",
        lines[..20].join("\n"),
        lines.len() - 30,
        lines[lines.len() - 10..].join("\n")
    )
}

/// The controller as the operator runs it, against the hosts in `hosts`.
fn controller(env: &Env, hosts: &Hosts, json: bool, args: &[&str]) -> Result<Run> {
    let mut cmd = Command::new(tools::need("prlimit", "util-linux")?);
    cmd.arg(format!("--nofile={}:", hosts.soft_nofile))
        .arg(&env.bins.vibstagectl)
        .arg("--tls-dir")
        .arg(&env.tls_dir)
        .arg("--hosts")
        .arg(&hosts.path);
    if json {
        cmd.arg("--json");
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let before = children_cpu();
    let began = unix_now();
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(BenchError::io("start vibstagectl under prlimit"))?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut peak_rss, mut peak_fds) = (0u64, 0usize);
            while !done.load(Ordering::Relaxed) {
                if let Ok(m) = crate::procfs::memory_of(pid) {
                    peak_rss = peak_rss.max(m.peak);
                }
                if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    peak_fds = peak_fds.max(fds.count());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (peak_rss, peak_fds)
        })
    };
    let out = child.wait_with_output();
    let wall = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (peak_rss, peak_fds) = sampler.join().unwrap_or_default();
    let out = out.map_err(BenchError::io("wait for vibstagectl"))?;
    Ok(Run {
        began,
        wall,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        peak_rss,
        peak_fds,
        cpu: children_cpu() - before,
    })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// User + system CPU seconds of every reaped child so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// What an agent counted: completed TLS handshakes, and API requests (but `/metrics`).
#[derive(Clone, Copy, Default)]
struct Counters {
    handshakes: u64,
    requests: u64,
}

fn counters(agent: &Agent) -> Result<Counters> {
    let reply = agent.request("GET", "/metrics", None)?;
    let text = String::from_utf8_lossy(&reply.body);
    let mut c = Counters::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: u64 = value.parse().unwrap_or(0);
        if name == "vibstage_tls_handshakes_total{result=\"completed\"}" {
            c.handshakes += value;
        } else if name.starts_with("vibstage_http_requests_total{") && !name.contains("/metrics") {
            c.requests += value;
        }
    }
    Ok(c)
}

fn all_counters(agents: &[Agent]) -> Result<Vec<Counters>> {
    agents.iter().map(counters).collect()
}

/// Per-host differences of two counter snapshots: (total, max) of handshakes and of requests.
fn spent(before: &[Counters], after: &[Counters]) -> ((u64, u64), (u64, u64)) {
    let d: Vec<(u64, u64)> = before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            (
                a.handshakes.saturating_sub(b.handshakes),
                a.requests.saturating_sub(b.requests),
            )
        })
        .collect();
    let sum_max = |f: fn(&(u64, u64)) -> u64| {
        (
            d.iter().map(f).sum(),
            d.iter().map(f).max().unwrap_or_default(),
        )
    };
    (sum_max(|x| x.0), sum_max(|x| x.1))
}

/// Proportional set size (`Pss` of `/proc/<pid>/smaps_rollup`), bytes: the agent's share of
/// pages it shares with the others (the binary's text), so that N of them add up to the truth.
fn pss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The host's `--json` entry of a run.
fn entry<'a>(report: &'a serde_json::Map<String, Value>, agent: &Agent) -> &'a Value {
    agent
        .addr()
        .and_then(|a| report.get(&a))
        .unwrap_or(&Value::Null)
}

/// The hosts whose entry is not `ok`, by name, with their entries.
fn check_hosts(
    what: &str,
    report: &serde_json::Map<String, Value>,
    agents: &[Agent],
    mut ok: impl FnMut(usize, &Value) -> bool,
) -> Result<()> {
    if report.len() != agents.len() {
        return Err(BenchError::Run(format!(
            "P7 {what}: {} hosts in the report of {} hosts",
            report.len(),
            agents.len()
        )));
    }
    let wrong: Vec<String> = agents
        .iter()
        .enumerate()
        .filter(|(i, a)| !ok(*i, entry(report, a)))
        .take(5)
        .map(|(_, a)| format!("{}: {}", a.name, entry(report, a)))
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(BenchError::Run(format!(
            "P7 {what}: hosts with a wrong result:\n{}",
            wrong.join("\n")
        )))
    }
}

fn succeeded(v: &Value) -> bool {
    v["state"] == "succeeded" && v.get("error").is_none_or(Value::is_null)
}

fn unreachable_or_refused(v: &Value) -> bool {
    matches!(
        v["error"]["code"].as_str(),
        Some("unreachable" | "forbidden")
    )
}

/// Where a fleet's staging time went, from the tasks' own timestamps: seconds after `began`
/// at which the first and the last task was created (the controller's requests reaching the
/// hosts), the median task duration, and when the last task ended.
fn timeline(report: &serde_json::Map<String, Value>, began: f64) -> String {
    let at = |v: &Value, field: &str| {
        v[field]
            .as_str()
            .and_then(|t| {
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| t.unix_timestamp_nanos() as f64 / 1e9 - began)
    };
    let mut created = Vec::new();
    let mut ended = Vec::new();
    let mut took = Vec::new();
    for v in report.values() {
        if let (Some(c), Some(e)) = (at(v, "created_at"), at(v, "updated_at")) {
            created.push(c);
            ended.push(e);
            took.push(e - c);
        }
    }
    if took.is_empty() {
        return "no task timestamps".into();
    }
    let max = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    format!(
        "tasks created from {} to {} after the start, median task {} (longest {}), last ended \
         after {}",
        report::secs(min(&created)),
        report::secs(max(&created)),
        report::secs(crate::report::median(&took)),
        report::secs(max(&took)),
        report::secs(max(&ended)),
    )
}

/// The fleet as the controller is given it.
struct Hosts {
    /// The hosts file: one `127.0.0.1:PORT` a line.
    path: PathBuf,
    /// The controller's soft limit on open files: half a descriptor per host (at most a login
    /// shell's 1,024), so that the controller has to raise it to keep a connection per host.
    soft_nofile: u64,
}

/// Writes the hosts file.
fn hosts_file(env: &Env, name: &str, agents: &[Agent]) -> Result<Hosts> {
    let path = env.dir.join(name);
    let list: Vec<String> = agents.iter().filter_map(Agent::addr).collect();
    std::fs::write(&path, list.join("\n") + "\n")
        .map_err(BenchError::io(format!("write {}", path.display())))?;
    let soft_nofile = (list.len() as u64 / 2).clamp(16, 1024);
    Ok(Hosts { path, soft_nofile })
}

/// Starts `n` agents with their own certificates; the ones in `failing` get a maintenance
/// `enter` hook that fails.
fn start_agents(env: &Env, n: usize, failing: &[usize], log: &mut dyn Write) -> Result<Vec<Agent>> {
    let read = |f: &str| {
        std::fs::read_to_string(env.tls_dir.join(f))
            .map_err(BenchError::io(format!("read {f} of the bench CA")))
    };
    let ca = DevCa::from_pem(&read("ca.pem")?, &read("ca.key")?)
        .map_err(|e| BenchError::Setup(format!("the bench CA: {e}")))?;
    let now = OffsetDateTime::now_utc();
    let (from, to) = (
        now - time::Duration::hours(1),
        now + time::Duration::days(7),
    );
    let started = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("p7-{i:04}");
        let tls = env.dir.join("agents-tls").join(&name);
        std::fs::create_dir_all(&tls).map_err(BenchError::io("create agent tls dir"))?;
        let cert = issue_server(&ca, "127.0.0.1", from, to)
            .map_err(|e| BenchError::Setup(format!("server certificate of {name}: {e}")))?;
        let (pem, key) = (tls.join("agent.pem"), tls.join("agent.key"));
        std::fs::write(&pem, &cert.cert_pem).map_err(BenchError::io("write agent.pem"))?;
        std::fs::write(&key, &cert.key_pem).map_err(BenchError::io("write agent.key"))?;
        let setup = AgentSetup {
            tcp: true,
            server_cert: Some((pem, key)),
            maintenance_enter: if failing.contains(&i) {
                vec!["/bin/false".into()]
            } else {
                Vec::new()
            },
            ..AgentSetup::default()
        };
        agents.push(env.agent(&name, setup)?);
    }
    for a in &mut agents {
        a.spawn()?;
    }
    for a in &mut agents {
        a.wait_ready(Duration::from_secs(300))?;
    }
    say(
        log,
        format!(
            "P7: {n} agents with their own certificates ready in {}",
            report::secs(started.elapsed().as_secs_f64())
        ),
    );
    Ok(agents)
}

/// `stage --wait` of `image` on `hosts`: the run, with its report checked against `expect`.
fn stage(
    env: &Env,
    hosts: &Hosts,
    image: &ImageFile,
    agents: &[Agent],
    code: i32,
    expect: impl FnMut(usize, &Value) -> bool,
    what: &str,
) -> Result<(Run, String, f64)> {
    let image_path = image.path.to_string_lossy();
    let depot = env.depot_url();
    let cpu = |agents: &[Agent]| agents.iter().map(Agent::cpu).sum::<f64>() + env.nginx.cpu();
    let cpu_before = cpu(agents);
    let run = controller(
        env,
        hosts,
        true,
        &["stage", "--image", &image_path, "--depot", &depot, "--wait"],
    )?;
    // Hosts first: a wrong host names itself; a wrong exit code alone does not.
    let report = run.json(what)?;
    check_hosts(what, &report, agents, expect)?;
    run.expect_code(what, code)?;
    let fleet_cpu = cpu(agents) - cpu_before;
    let timeline = format!(
        "{}; CPU of the agents and nginx {fleet_cpu:.2} s",
        timeline(&report, run.began),
    );
    Ok((run, timeline, fleet_cpu))
}

/// `stage --wait` of a new `image` while the hosts in `out` are down or refuse the controller,
/// then `status`: both exit 3, the report names exactly those hosts, every other host stages.
fn degraded_run(
    env: &Env,
    hosts: &Hosts,
    agents: &[Agent],
    image: &ImageFile,
    out: &[usize],
    what: &str,
) -> Result<(Run, String, Run)> {
    let (run, timeline, _) = stage(
        env,
        hosts,
        image,
        agents,
        3,
        |i, v| {
            if out.contains(&i) {
                unreachable_or_refused(v)
            } else {
                succeeded(v)
            }
        },
        &format!("stage with {what}"),
    )?;
    let status = controller(env, hosts, false, &["status"])?;
    status.expect_code(&format!("status with {what}"), 3)?;
    Ok((run, timeline, status))
}

/// Runs P7 against `p1_rate` (bytes per second through the P1 path).
pub fn run(env: &Env, sizes: &Sizes, p1_rate: f64, log: &mut dyn Write) -> Result<Vec<Row>> {
    let n = sizes.p7_agents;
    // Spread over the fleet, so that `--parallel 50` meets them in different batches.
    let failing: Vec<usize> = (0..sizes.p7_failing)
        .map(|k| (k * n) / sizes.p7_failing.max(1) + 1)
        .collect();
    let mut agents = start_agents(env, n, &failing, log)?;
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
    let idle_rss: u64 = pids
        .iter()
        .map(|p| crate::procfs::memory_of(*p).map_or(0, |m| m.rss))
        .sum();
    let idle_pss: u64 = pids.iter().map(|p| pss_of(*p)).sum();
    let hosts = hosts_file(env, "p7-hosts", &agents)?;

    // 1. The whole fleet stages, a new image each run (every agent downloads everything).
    let mut walls = Vec::new();
    let mut floors = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1.0, |c| c.get() as f64);
    let mut runs = Vec::new();
    for run in 0..sizes.p7_runs.max(1) {
        let image = env.image(
            &format!("bench-p7-a{run}"),
            sizes.p7_vibs,
            sizes.p7_vib_size,
            log,
        )?;
        tools::settle();
        let before = all_counters(&agents)?;
        let (staged, timeline, fleet_cpu) = stage(
            env,
            &hosts,
            &image,
            &agents,
            0,
            |_, v| succeeded(v) && v["bytes_downloaded"].as_u64() == Some(image.bytes()),
            "stage",
        )?;
        let after = all_counters(&agents)?;
        let ((handshakes, max_handshakes), (requests, max_requests)) = spent(&before, &after);
        say(
            log,
            format!(
                "P7 stage run {}: {n} agents × {} in {} (byte bound {}), controller peak RSS {}, \
                 CPU {:.2} s, at most {} open descriptors; agents counted {handshakes} TLS \
                 handshakes (at most {max_handshakes} on one host) and {requests} requests (at \
                 most {max_requests} on one host); {timeline}",
                run + 1,
                report::mib(image.bytes() as f64),
                report::secs(staged.wall),
                report::secs(image.bytes() as f64 * n as f64 / p1_rate.max(1.0)),
                report::mib(staged.peak_rss as f64),
                staged.cpu,
                staged.peak_fds,
            ),
        );
        walls.push(staged.wall);
        floors.push((fleet_cpu + staged.cpu) / cores);
        runs.push((
            staged,
            image,
            (handshakes, max_handshakes),
            (requests, max_requests),
        ));
    }
    // The last run's costs are reported (the controller and counters of every run are alike).
    let Some((staged, image, (handshakes, max_handshakes), (requests, max_requests))) = runs.pop()
    else {
        return Err(BenchError::Run("P7: no staging run".into()));
    };
    let bytes = image.bytes() * n as u64;
    let once = bytes as f64 / p1_rate.max(1.0);
    let wall = crate::report::median(&walls);
    let floor = crate::report::median(&floors);

    // 2. What the fleet says about itself: status and a compliance check.
    let status = controller(env, &hosts, false, &["status"])?;
    status.expect_code("status", 0)?;
    say(
        log,
        format!(
            "P7 status ({}):\n{}",
            report::secs(status.wall),
            status.stdout.trim_end()
        ),
    );
    let image_path = image.path.to_string_lossy().into_owned();
    let check = controller(env, &hosts, true, &["check", "--image", &image_path])?;
    check_hosts("check", &check.json("check")?, &agents, |_, v| {
        v["compliance"]["status"] == "staged" || v["status"] == "staged"
    })?;
    check.expect_code("check", 0)?;

    // 3. Remediation in batches of 50, a few hosts failing to enter maintenance mode.
    let depot = env.depot_url();
    let parallel = REMEDIATE_PARALLEL.to_string();
    let max_failures = MAX_FAILURES.to_string();
    let remediate = controller(
        env,
        &hosts,
        true,
        &[
            "remediate",
            "--image",
            &image_path,
            "--depot",
            &depot,
            "--wait",
            "--parallel",
            &parallel,
            "--max-failures",
            &max_failures,
        ],
    )?;
    check_hosts(
        "remediate",
        &remediate.json("remediate")?,
        &agents,
        |i, v| {
            if failing.contains(&i) {
                v["state"] == "failed"
            } else {
                succeeded(v)
            }
        },
    )?;
    remediate.expect_code("remediate", 1)?;
    say(
        log,
        format!(
            "P7 remediate --parallel {REMEDIATE_PARALLEL} --max-failures {MAX_FAILURES}: {} \
             ({} hosts failing, as arranged), controller peak RSS {}",
            report::secs(remediate.wall),
            failing.len(),
            report::mib(remediate.peak_rss as f64)
        ),
    );

    // 4. 1 % of the hosts down: stage a new image; status.
    let down: Vec<usize> = (0..n).filter(|i| i % 100 == 50).collect();
    let down = if down.is_empty() { vec![n / 2] } else { down };
    for &i in &down {
        agents[i].kill9();
    }
    let image_b = env.image("bench-p7-b", sizes.p7_vibs, sizes.p7_vib_size, log)?;
    let (degraded, degraded_timeline, status_down) =
        degraded_run(env, &hosts, &agents, &image_b, &down, "1 % down")?;
    say(
        log,
        format!(
            "P7 stage with {} of {n} hosts down: exit 3 in {} ({degraded_timeline}); status:\n{}\n{}",
            down.len(),
            report::secs(degraded.wall),
            status_down.stdout.trim_end(),
            status_down.stderr.trim_end()
        ),
    );

    // 5. 5 % down or refusing: the 1 % stay down, 4 % now refuse this controller.
    let refusing: Vec<usize> = (0..n).filter(|i| i % 25 == 10).collect();
    let refusing = if refusing.is_empty() {
        vec![n / 2 + 1]
    } else {
        refusing
    };
    for &i in &refusing {
        agents[i].reconfigure(|c| c.tls.operators = vec!["another-controller".into()])?;
    }
    // SIGHUP is asynchronous: wait until each refusing agent has logged its new allow-lists.
    for &i in &refusing {
        agents[i].wait_log("allow-lists reloaded", Duration::from_secs(30))?;
    }
    let out: Vec<usize> = down.iter().chain(&refusing).copied().collect();
    let image_c = env.image("bench-p7-c", sizes.p7_vibs, sizes.p7_vib_size, log)?;
    let (worse, worse_timeline, summary) =
        degraded_run(env, &hosts, &agents, &image_c, &out, "5 % down or refusing")?;
    say(
        log,
        format!(
            "P7 stage with {} down and {} refusing of {n}: exit 3 in {} ({worse_timeline}); status:\n{}\n{}",
            down.len(),
            refusing.len(),
            report::secs(worse.wall),
            summary.stdout.trim_end(),
            summary.stderr.trim_end()
        ),
    );

    for a in &mut agents {
        a.stop();
        env.discard(a);
    }
    let _ = std::fs::remove_dir_all(env.dir.join("agents-tls"));

    let peak_rss = [&staged, &status, &check, &remediate, &degraded, &worse]
        .iter()
        .map(|r| r.peak_rss)
        .max()
        .unwrap_or_default();
    Ok(vec![
        Row::new(
            "P7",
            format!(
                "one vibstagectl stages {n} agents × {} vs the same {} once at the P1 rate (median \
                 of {} runs)",
                report::mib(image.bytes() as f64),
                report::mib(bytes as f64),
                walls.len()
            ),
            report::secs(wall),
            report::secs(once),
            report::ratio(wall / once),
            "≤ 1.5×",
            Met::from(wall / once <= 1.5),
        ),
        Row::new(
            "P7",
            format!(
                "the same vs what its CPU takes here: CPU of the agents, nginx and the \
                 controller while staging / {cores} cores"
            ),
            report::secs(wall),
            report::secs(floor),
            report::ratio(wall / floor),
            "-",
            Met::Info,
        ),
        Row::new(
            "P7",
            format!(
                "controller peak RSS over stage, status, check, remediate and the degraded runs \
                 ({n} hosts; CPU of the stage {:.2} s, at most {} open descriptors under a soft \
                 limit of {})",
                staged.cpu, staged.peak_fds, hosts.soft_nofile
            ),
            report::mib(peak_rss as f64),
            "-",
            "-",
            "≤ 200 MiB",
            Met::from(peak_rss <= 200 << 20),
        ),
        Row::new(
            "P7",
            format!(
                "TLS handshakes and requests per host while staging (total {handshakes} and \
                 {requests}; at most {max_handshakes} and {max_requests} on one host)"
            ),
            format!(
                "{:.2} and {:.2}",
                handshakes as f64 / n as f64,
                requests as f64 / n as f64
            ),
            "-",
            "-",
            "no polling storm",
            Met::Info,
        ),
        Row::new(
            "P7",
            format!("idle memory of the {n} agents (sum of VmRSS; of Pss)"),
            format!(
                "{} ({})",
                report::mib(idle_rss as f64),
                report::mib(idle_pss as f64)
            ),
            "-",
            "-",
            "-",
            Met::Info,
        ),
        Row::new(
            "P7",
            format!(
                "exit codes: remediate with {} failing hosts; stage with {} % down; with {} % \
                 down or refusing",
                failing.len(),
                down.len() * 100 / n,
                (down.len() + refusing.len()) * 100 / n
            ),
            format!(
                "{}, {}, {}",
                code_word(remediate.code),
                code_word(degraded.code),
                code_word(worse.code)
            ),
            "1, 3, 3",
            "-",
            "every host right",
            Met::Yes,
        ),
    ])
}

fn code_word(code: Option<i32>) -> String {
    code.map_or_else(|| "signal".into(), |c| c.to_string())
}

//! P5 fan-out: one `vibstagectl stage --wait` over mTLS to N local agents (separate `vibstaged`
//! processes, each with its own scratch, state, socket and port), each staging the same image
//! from nginx. Each run stages a new image (new bytes), so every agent downloads everything.
//!
//! The reference is the time the same bytes (N × the image) take once through the P1 path:
//! their total divided by the staging rate P1 measured in this run.

use std::io::Write;
use std::process::Command;

use crate::agent::{Agent, AgentSetup};
use crate::env::Env;
use crate::report::{self, Met, Row, median};
use crate::{BenchError, Result, Sizes, say, tools};

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs P5 against `p1_rate` (bytes per second through the P1 path).
pub fn run(env: &Env, sizes: &Sizes, p1_rate: f64, log: &mut dyn Write) -> Result<Vec<Row>> {
    let n = sizes.p5_agents;
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| {
            env.agent(
                &format!("p5-{i:03}"),
                AgentSetup {
                    tcp: true,
                    ..AgentSetup::default()
                },
            )
        })
        .collect::<Result<_>>()?;
    for a in &mut agents {
        a.spawn()?;
    }
    for a in &mut agents {
        a.wait_ready(std::time::Duration::from_secs(120))?;
    }
    let hosts = env.dir.join("p5-hosts");
    let list: Vec<String> = agents.iter().filter_map(Agent::addr).collect();
    std::fs::write(&hosts, list.join("\n") + "\n").map_err(BenchError::io("write p5-hosts"))?;
    say(log, format!("P5: {n} agents ready"));

    let mut walls = Vec::new();
    let mut bytes = 0;
    for run in 0..sizes.p5_runs {
        let image = env.image(
            &format!("bench-p5-{run}"),
            sizes.p5_vibs,
            sizes.p5_vib_size,
            log,
        )?;
        bytes = image.bytes() * n as u64;
        tools::settle();
        env.nginx.clear_log();
        let began = unix_now();
        let (wall, out) = tools::timed(
            Command::new(&env.bins.vibstagectl)
                .arg("--json")
                .arg("--tls-dir")
                .arg(&env.tls_dir)
                .arg("--hosts")
                .arg(&hosts)
                .arg("stage")
                .arg("--image")
                .arg(&image.path)
                .arg("--depot")
                .arg(env.depot_url())
                .arg("--wait"),
        )?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            BenchError::Run(format!(
                "P5: vibstagectl printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })?;
        let ok = list
            .iter()
            .filter(|a| report[a.as_str()]["state"] == "succeeded")
            .count();
        if ok != n {
            return Err(BenchError::Run(format!(
                "P5: {ok} of {n} agents staged: {report}"
            )));
        }
        let accesses: Vec<_> = env
            .nginx
            .accesses()
            .into_iter()
            .filter(|a| a.uri.starts_with("/vibs/"))
            .collect();
        let served: u64 = accesses.iter().map(|a| a.bytes).sum();
        let first = accesses.iter().map(|a| a.start()).fold(f64::MAX, f64::min);
        let last = accesses.iter().map(|a| a.end).fold(0.0, f64::max);
        tools::settle();
        say(
            log,
            format!(
                "P5 run {}: {n} agents × {} staged in {} (nginx sent {}: first request after \
                 {}, last answer {} before the end)",
                run + 1,
                report::mib(image.bytes() as f64),
                report::secs(wall),
                report::mib(served as f64),
                report::secs(first - began),
                report::secs(began + wall - last),
            ),
        );
        walls.push(wall);
    }
    for a in &mut agents {
        a.stop();
        env.discard(a);
    }
    let wall = median(&walls);
    let once = bytes as f64 / p1_rate.max(1.0);
    Ok(vec![Row::new(
        "P5",
        format!(
            "one vibstagectl stages {n} agents × {} vs the same {} once at the P1 rate",
            report::mib(sizes.p5_vibs as f64 * sizes.p5_vib_size as f64),
            report::mib(bytes as f64)
        ),
        report::secs(wall),
        report::secs(once),
        report::ratio(wall / once),
        "≤ 1.5×",
        Met::from(wall / once <= 1.5),
    )])
}

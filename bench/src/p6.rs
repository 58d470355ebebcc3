//! P6 API: `GET /v1/status` from the [`loadgen`](crate::loadgen::run) over mTLS keep-alive
//! connections to an agent that has an 8-VIB image staged, against nginx serving a copy of that
//! very status answer as a static file behind mutual TLS with the same CA (the cost of TLS and
//! HTTP alone, without computing the status). Requests per second are measured in a closed loop
//! (as fast as answered); the p99 at the target rate, paced (5,000 req/s in the full run).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use crate::agent::AgentSetup;
use crate::env::Env;
use crate::loadgen::{self, Load, Shape};
use crate::report::{self, Met, Row, median};
use crate::{BenchError, Result, Sizes, say};

/// Runs P6.
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<Vec<Row>> {
    let image = env.image("bench-p6", 8, 1 << 20, log)?;
    let mut agent = env.agent(
        "p6",
        AgentSetup {
            tcp: true,
            ..AgentSetup::default()
        },
    )?;
    agent.start()?;
    let id = agent.stage(&image, &env.depot_url())?;
    agent.wait_task(&id)?;
    let status = agent.request("GET", "/v1/status", None)?;
    std::fs::write(&env.status_file, &status.body).map_err(BenchError::io("write status.json"))?;

    let parse = |a: String| {
        a.parse::<SocketAddr>()
            .map_err(|e| BenchError::Setup(format!("address {a}: {e}")))
    };
    let ours_addr = parse(agent.addr().unwrap_or_default())?;
    let nginx_addr = parse(format!("127.0.0.1:{}", env.nginx.mtls_port))?;
    let config = loadgen::client_config(
        &env.tls_dir.join("ca.pem"),
        &env.tls_dir.join("client.pem"),
        &env.tls_dir.join("client.key"),
    )?;
    let conns = sizes.p6_connections;
    let window = Duration::from_secs_f64(sizes.p6_secs);
    let shape = |rate| Shape {
        connections: conns,
        rate,
        warmup: window / 5,
        window,
    };
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let (mut ours_paced, mut base_paced) = (Vec::new(), Vec::new());
    let line = |l: &Load| {
        format!(
            "{:.0} req/s p50 {} p99 {} ({} errors)",
            l.rps(),
            report::secs(l.latency(50.0)),
            report::secs(l.latency(99.0)),
            l.errors
        )
    };
    for run in 0..sizes.p6_runs {
        for (rate, ours, base) in [
            (None, &mut ours, &mut base),
            (Some(sizes.p6_rate), &mut ours_paced, &mut base_paced),
        ] {
            let a = loadgen::run(ours_addr, "/v1/status", config.clone(), shape(rate))?;
            let b = loadgen::run(nginx_addr, "/v1/status", config.clone(), shape(rate))?;
            say(
                log,
                format!(
                    "P6 run {} {}: vibstaged {}; nginx {}",
                    run + 1,
                    match rate {
                        None => "closed loop".to_owned(),
                        Some(r) => format!("paced at {r:.0} req/s"),
                    },
                    line(&a),
                    line(&b)
                ),
            );
            if a.errors > 0 || a.requests == 0 {
                return Err(BenchError::Run(format!(
                    "P6: {} of the agent's answers were errors ({} good)",
                    a.errors, a.requests
                )));
            }
            ours.push(a);
            base.push(b);
        }
    }
    agent.stop();
    env.discard(&agent);
    let med =
        |loads: &[Load], f: &dyn Fn(&Load) -> f64| median(&loads.iter().map(f).collect::<Vec<_>>());
    let (rps, base_rps) = (med(&ours, &Load::rps), med(&base, &Load::rps));
    let p99 = |l: &Load| l.latency(99.0);
    let (lat, base_lat) = (med(&ours_paced, &p99), med(&base_paced, &p99));
    let rate = sizes.p6_rate;
    Ok(vec![
        Row::new(
            "P6",
            format!(
                "GET /v1/status over mTLS keep-alive, {conns} connections, closed loop: req/s vs \
                 nginx serving a copy"
            ),
            format!("{rps:.0} req/s"),
            format!("{base_rps:.0} req/s"),
            report::ratio(rps / base_rps.max(1e-9)),
            "≥ 5,000 req/s",
            Met::from(rps >= 5000.0),
        ),
        Row::new(
            "P6",
            format!("p99 latency of the same, paced at {rate:.0} req/s"),
            report::secs(lat),
            report::secs(base_lat),
            report::ratio(lat / base_lat.max(1e-9)),
            "≤ 5 ms",
            Met::from(lat <= 0.005),
        ),
    ])
}

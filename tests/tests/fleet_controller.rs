//! Issue 15: what a thousand hosts need of the controller, tested with fake agents so that each
//! failure can be arranged (the 1,000-agent run itself is bench figure P7, and its 50-agent
//! version runs in `cargo test` through the bench's quick mode).
//!
//! - a connection per host: `vibstagectl` raises its soft limit on open files when the hosts do
//!   not fit under it, and says so when even the hard limit is too low;
//! - a host whose TLS handshake was cut (an agent that missed its handshake deadline while busy)
//!   is tried again, twice, a second and then two apart, before it counts as unreachable;
//! - a refused connection (nothing listens) or a server certificate from another CA is not tried
//!   again;
//! - hosts that take a request and never answer hold no slot the other hosts need, and with
//!   `--parallel N` the controller keeps about N connections, not one per host it finished.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use vibstage_e2e::fake_agent::status as fake_status;
use vibstage_e2e::terminal::{screen_lines, through_a_terminal};
use vibstage_e2e::{Answer, FakeAgent, World, vibstagectl};

fn fake(world: &World, name: &str, cut: u64, answer: Answer) -> FakeAgent {
    FakeAgent::start_cutting(
        &world.ca,
        &world.dir.path().join(format!("fake-{name}")),
        cut,
        move |_| answer.clone(),
    )
}

/// `vibstagectl --json --tls-dir … --host …(each) ARGS`, under `prlimit` if `nofile` is given.
fn ctl(world: &World, hosts: &[String], nofile: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = match nofile {
        Some(limit) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={limit}")).arg(vibstagectl());
            c
        }
        None => Command::new(vibstagectl()),
    };
    cmd.arg("--json").arg("--tls-dir").arg(&world.tls_dir);
    for h in hosts {
        cmd.arg("--host").arg(h);
    }
    cmd.args(args).output().expect("run vibstagectl")
}

fn report(out: &Output) -> serde_json::Map<String, Value> {
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Object(m)) => m,
        _ => panic!(
            "no JSON report: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn a_host_whose_first_handshakes_were_cut_is_tried_again_issue15() {
    let world = World::new();
    let host = fake(&world, "busy", 2, Answer::Json(200, fake_status("busy")));
    let out = ctl(&world, &[host.addr()], None, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(host.connections(), 3, "two cut, the third served");
    assert_eq!(host.count("GET", "/v1/status"), 1);
    assert_eq!(report(&out)[&host.addr()]["host_id"], "busy");
}

#[test]
fn a_host_that_keeps_cutting_handshakes_is_unreachable_after_three_tries_issue15() {
    let world = World::new();
    let host = fake(
        &world,
        "gone",
        u64::MAX,
        Answer::Json(200, fake_status("gone")),
    );
    let started = Instant::now();
    let out = ctl(&world, &[host.addr()], None, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(host.connections(), 3, "one try and two more");
    // The retries wait 1 s and then 2 s: they are spaced, not a tight loop.
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(report(&out)[&host.addr()]["error"]["code"], "unreachable");
}

#[test]
fn a_refused_connection_is_not_tried_again_issue15() {
    let world = World::new();
    // A port nothing listens on: bound and closed again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let host = format!("127.0.0.1:{port}");
    let out = ctl(&world, std::slice::from_ref(&host), None, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    let message = report(&out)[&host]["error"]["message"].to_string();
    assert!(message.contains("Connection refused"), "{message}");
}

/// Hosts that take the request and never answer, so the controller holds a connection to each
/// until `--timeout`.
fn hanging_hosts(world: &World, n: usize) -> (Vec<FakeAgent>, Vec<String>) {
    let fakes: Vec<FakeAgent> = (0..n)
        .map(|i| fake(world, &format!("hang{i}"), 0, Answer::Hang))
        .collect();
    let addrs = fakes.iter().map(FakeAgent::addr).collect();
    (fakes, addrs)
}

#[test]
fn the_controller_makes_room_for_a_connection_per_host_issue15() {
    let world = World::new();
    let (fakes, addrs) = hanging_hosts(&world, 40);
    // A soft limit of 24 open files cannot hold 40 connections; the hard limit can.
    let out = ctl(
        &world,
        &addrs,
        Some("24:4096"),
        &["--timeout", "3s", "status"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let report = report(&out);
    for a in &addrs {
        assert!(
            report[a]["timed_out"]["started"] == true,
            "{a}: {} ({stderr})",
            report[a]
        );
    }
    // Every host got its request: none failed to connect for want of a descriptor.
    for f in &fakes {
        assert_eq!(f.count("GET", "/v1/status"), 1);
    }
}

#[test]
fn too_low_a_hard_limit_on_open_files_is_named_with_what_to_do_issue15() {
    let world = World::new();
    let (_fakes, addrs) = hanging_hosts(&world, 40);
    let out = ctl(
        &world,
        &addrs,
        Some("24:32"),
        &["--timeout", "2s", "status"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "warning: 40 hosts at once need about 72 open files, but at most 32 may be open"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("pass --parallel 1"), "{stderr}");
}

#[test]
fn agents_count_their_tls_handshakes_issue15() {
    let world = World::new();
    let mut agent = world.agent("counted", vibstage_e2e::AgentOptions::default());
    agent.start();
    for _ in 0..2 {
        let out = ctl(&world, &[agent.addr()], None, &["status"]);
        assert_eq!(out.status.code(), Some(0));
    }
    // A peer that connects and says nothing: its handshake fails when it hangs up.
    drop(std::net::TcpStream::connect(agent.addr()).expect("connect"));
    // `failed` is counted when the agent sees the hang-up: wait for it; the rest are settled.
    let count = |result: &str, at_least: u64| {
        let line = format!("vibstage_tls_handshakes_total{{result=\"{result}\"}} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = agent.request("GET", "/metrics", None).body;
            let n: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {line:?} in:\n{text}"));
            if n >= at_least || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(count("failed", 1), 1);
    assert_eq!(count("completed", 0), 2, "one connection per command");
    assert_eq!(count("turned_away", 0), 0);
}

/// On a terminal, a fleet draws one bar, the total, counting the hosts done; a host's bar would
/// not fit a terminal a thousand times. Its hosts report progress every few seconds for that
/// bar, not every second.
#[test]
fn a_fleet_on_a_terminal_draws_only_the_total_issue15() {
    let world = World::new();
    let fakes: Vec<FakeAgent> = (0..12)
        .map(|i| {
            fake_scripted(&world, &format!("t{i}"), |r| match r.method.as_str() {
                "POST" => Answer::Json(
                    202,
                    serde_json::json!({"task": vibstage_e2e::fake_agent::task("t1", "running", (0, 1000), None)}),
                ),
                _ => Answer::Json(
                    200,
                    vibstage_e2e::fake_agent::task("t1", "succeeded", (1000, 1000), None),
                ),
            })
        })
        .collect();
    let mut args = vec!["--tls-dir".to_owned(), world.tls_dir.display().to_string()];
    for f in &fakes {
        args.extend(["--host".to_owned(), f.addr()]);
    }
    let image = world.dir.path().join("image.json");
    std::fs::write(
        &image,
        r#"{"payloadType":"x","payload":"","signatures":[]}"#,
    )
    .expect("image");
    args.extend(
        [
            "stage",
            "--image",
            image.to_str().expect("utf8"),
            "--depot",
            "https://127.0.0.1:1/",
            "--wait",
        ]
        .map(str::to_owned),
    );
    let (code, raw) = through_a_terminal(world.dir.path(), &args);
    let lines = screen_lines(&raw);
    let shown = lines.join("\n");
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        lines.iter().any(|l| l.contains("total 12/12 done")),
        "{shown}"
    );
    for f in &fakes {
        assert!(
            !lines.iter().any(|l| l.trim_start().starts_with(&f.addr())),
            "a line for {}: {shown}",
            f.addr()
        );
        let polls: Vec<String> = f
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET")
            .map(|r| r.query)
            .collect();
        assert_eq!(polls, ["wait=5"], "{}", f.addr());
    }
    assert!(shown.contains("summary: 12 hosts: 12 ok"), "{shown}");
}

fn fake_scripted(
    world: &World,
    name: &str,
    script: impl Fn(&vibstage_e2e::Seen) -> Answer + Send + Sync + 'static,
) -> FakeAgent {
    FakeAgent::start(
        &world.ca,
        &world.dir.path().join(format!("fake-{name}")),
        script,
    )
}

#[test]
fn a_server_certificate_from_another_ca_is_not_tried_again_issue15() {
    let world = World::new();
    let other = vibstage_ctl::pki::DevCa::generate(vibstage_ctl::pki::Validity::standard(
        time::OffsetDateTime::now_utc(),
    ))
    .expect("another CA");
    let host = FakeAgent::start(&other, &world.dir.path().join("fake-other"), |_| {
        Answer::Json(200, fake_status("other"))
    });
    let out = ctl(&world, &[host.addr()], None, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(host.connections(), 1, "a refused certificate is final");
    let message = report(&out)[&host.addr()]["error"]["message"].to_string();
    assert!(message.contains("certificate"), "{message}");
}

#[test]
fn hosts_that_never_answer_do_not_hold_back_the_others_issue15() {
    let world = World::new();
    // More silent hosts than the controller sets up connections at once, listed first.
    let (_hung, mut addrs) = hanging_hosts(&world, 70);
    let good: Vec<FakeAgent> = (0..5)
        .map(|i| {
            fake(
                &world,
                &format!("good{i}"),
                0,
                Answer::Json(200, fake_status("good")),
            )
        })
        .collect();
    addrs.extend(good.iter().map(FakeAgent::addr));
    let out = ctl(&world, &addrs, None, &["--timeout", "8s", "status"]);
    assert_eq!(out.status.code(), Some(1), "the silent hosts time out");
    let report = report(&out);
    for g in &good {
        assert_eq!(
            report[&g.addr()]["host_id"],
            "good",
            "{}",
            report[&g.addr()]
        );
    }
}

#[test]
fn with_parallel_the_controller_keeps_only_that_many_connections_issue15() {
    let world = World::new();
    let hosts: Vec<FakeAgent> = (0..60)
        .map(|i| {
            fake(
                &world,
                &format!("p{i}"),
                0,
                Answer::Json(200, fake_status("p")),
            )
        })
        .collect();
    let addrs: Vec<String> = hosts.iter().map(FakeAgent::addr).collect();
    // 48 open files hold 8 connections and the rest, not 60 connections kept for reuse.
    let out = ctl(
        &world,
        &addrs,
        Some("48:48"),
        &["--parallel", "8", "status"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(report(&out).len(), 60);
}

#[test]
fn task_lists_of_many_hosts_are_printed_whole_issue15() {
    let world = World::new();
    let hosts: Vec<FakeAgent> = (0..12)
        .map(|i| {
            let task = vibstage_e2e::fake_agent::task(&format!("t{i}"), "succeeded", (1, 1), None);
            fake(
                &world,
                &format!("l{i}"),
                0,
                Answer::Json(200, serde_json::json!({"tasks": [task]})),
            )
        })
        .collect();
    let mut cmd = Command::new(vibstagectl());
    cmd.arg("--tls-dir").arg(&world.tls_dir);
    for h in &hosts {
        cmd.arg("--host").arg(h.addr());
    }
    let out = cmd.arg("tasks").output().expect("run vibstagectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // More than 10 hosts, all well: still a line for each host's task, the list being the answer.
    for (i, h) in hosts.iter().enumerate() {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{}: ", h.addr())) && l.contains(&format!("t{i}"))),
            "no task line for {}: {stdout}",
            h.addr()
        );
    }
}

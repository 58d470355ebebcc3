//! Connection slots under abuse (issue 11, item 5): one unauthenticated peer, or one client
//! allowed to read, must not be able to hold the agent's connections for everyone else.
//!
//! Before the fix every accepted TCP connection took one of 512 slots for up to the 10 s
//! handshake timeout, so about 50 new connections a second that never start TLS kept every slot
//! busy and real mTLS clients timed out for as long as it lasted. Now handshakes have their own
//! small pool with a 3 s timeout and a per-source cap, and authenticated connections their own
//! slots. The flood comes from 127.0.0.2 (the whole of 127/8 is loopback on Linux) so that its
//! per-source cap is not the real client's, which connects from 127.0.0.1.
//!
//! Timings are measured and printed; the only timing asserted is the requirement itself (every
//! answer within 1 s while the flood lasts), which a normal answer meets with a large margin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vibstage_e2e::agent::{tls_client, tls_request};
use vibstage_e2e::{AgentOptions, Fault, VibFile, World};

fn client_config(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    tls_client(
        &dir.join("ca.pem"),
        Some((&dir.join("client.pem"), &dir.join("client.key"))),
    )
}

/// Opens TCP connections from 127.0.0.2 to `target` at about `per_sec` a second until `stop`,
/// and keeps every one of them open without ever sending a byte; returns how many it opened.
fn flood(target: SocketAddr, per_sec: u32, stop: Arc<AtomicBool>, opened: Arc<AtomicUsize>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut held = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec);
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                continue;
            };
            if socket.bind("127.0.0.2:0".parse().expect("addr")).is_err() {
                continue;
            }
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(500), socket.connect(target)).await
            {
                held.push(stream);
                opened.fetch_add(1, Ordering::SeqCst);
            }
        }
        drop(held);
    });
}

#[test]
fn a_flood_of_connections_that_never_start_tls_does_not_starve_real_clients() {
    let world = World::new();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let target: SocketAddr = agent.addr().parse().expect("addr");
    let config = client_config(&world.tls_dir);

    // 100 a second for 12 s: 1 200 connections, more than twice the 512 slots the old code
    // had, each of which it held for 10 s.
    let flood_for = Duration::from_secs(12);
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flooder = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || flood(target, 100, stop, opened))
    };

    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    while started.elapsed() < flood_for {
        let t = Instant::now();
        let reply = tls_request(config.clone(), &agent.addr(), "GET", "/v1/status", None);
        let took = t.elapsed();
        match reply {
            Ok(r) if r.status == 200 && took < Duration::from_secs(1) => latencies.push(took),
            Ok(r) => failures.push(format!(
                "at {:?}: status {} after {took:?}",
                started.elapsed(),
                r.status
            )),
            Err(e) => failures.push(format!("at {:?}: {e} after {took:?}", started.elapsed())),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    flooder.join().expect("flooder");

    latencies.sort();
    let opened = opened.load(Ordering::SeqCst);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "flood: {opened} connections from 127.0.0.2 in {flood_for:?}; real client: {} answers, \
         p50 {:?}, p90 {:?}, max {:?}; {} failures",
        latencies.len(),
        pick(0.5),
        pick(0.9),
        pick(1.0),
        failures.len()
    );
    assert!(opened >= 600, "the flood opened only {opened} connections");
    assert!(
        failures.is_empty(),
        "real client not answered within 1 s during the flood:\n{}\nlog:\n{}",
        failures.join("\n"),
        agent.log_text()
    );
    assert!(latencies.len() >= 20, "only {} answers", latencies.len());
}

#[test]
fn long_polls_by_a_reader_cannot_hold_every_connection() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 200_000)]);
    let auditor = world.client_tls_dir(
        "auditor-tls",
        "auditor",
        time::Duration::hours(-1),
        time::Duration::days(1),
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            readers: vec!["auditor".into()],
            timeout_secs: Some(120),
            retries: Some(0),
            ..AgentOptions::default()
        },
    );
    agent.start();

    // A stage that stays running: the depot stalls every VIB download for two minutes.
    world.depot.fault(
        vibstage_e2e::ANY_PATH,
        Fault::Stall {
            after: 1000,
            for_: Duration::from_secs(120),
        },
        usize::MAX,
    );
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let started = agent.stage(&image, &world.depot.url());
    assert_eq!(started.status, 202, "{}", started.body);
    let id = started.json["task"]["id"]
        .as_str()
        .expect("task id")
        .to_owned();

    // The reader asks for 40 five-minute long-polls, one connection every 100 ms (a burst of more
    // than 8 handshakes at once from one address would meet the per-source handshake cap).
    let polls = 40;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = client_config(&auditor);
    for _ in 0..polls {
        let (tx, reader, addr, path) = (
            tx.clone(),
            reader.clone(),
            agent.addr(),
            format!("/v1/tasks/{id}?wait=300"),
        );
        std::thread::spawn(move || {
            let t = Instant::now();
            let reply = tls_request(reader, &addr, "GET", &path, None);
            let _ = tx.send((reply.map_err(|e| e.to_string()), t.elapsed()));
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(tx);

    // All but the few a client may hold are answered at once, with the task as it is.
    let held = vibstage::api::LONG_POLLS_PER_CLIENT;
    let mut answered = Vec::new();
    for _ in 0..polls - held {
        let (reply, took) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a long-poll over the cap was held instead of answered");
        let reply = reply.expect("long-poll over the cap");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json["id"], id.as_str());
        assert_eq!(reply.json["state"], "running", "{}", reply.body);
        answered.push(took);
    }
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "more than {held} long-polls ended early: the held ones should still wait"
    );

    // The operator still gets answers, quickly, beside the held long-polls.
    let operator = client_config(&world.tls_dir);
    let t = Instant::now();
    let status = tls_request(operator, &agent.addr(), "GET", "/v1/status", None).expect("status");
    assert_eq!(status.status, 200);
    answered.sort();
    eprintln!(
        "{} of {polls} long-polls answered at once (slowest {:?}), {held} held; operator status in {:?}",
        answered.len(),
        answered.last().copied().unwrap_or_default(),
        t.elapsed()
    );
}

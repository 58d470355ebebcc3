//! The daemon's API end to end (issue 4): real `vibstaged` processes, real mTLS, real signals.

use std::time::Duration;

use serde_json::{Value, json};
use time::Duration as TimeDelta;
use vibstage_e2e::agent::{tls_client, tls_request};
use vibstage_e2e::{AgentOptions, Depot, Fault, VibFile, World};

fn staged_world() -> World {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 200_000),
        VibFile::software("esx-ui", 100_000),
    ]);
    world
}

fn client_config(dir: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    tls_client(
        &dir.join("ca.pem"),
        Some((&dir.join("client.pem"), &dir.join("client.key"))),
    )
}

#[test]
fn mtls_refuses_missing_foreign_and_expired_client_certificates() {
    let world = staged_world();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let addr = agent.addr();
    let ca = world.tls_dir.join("ca.pem");

    // The controller certificate works.
    let ok = tls_request(
        client_config(&world.tls_dir),
        &addr,
        "GET",
        "/v1/status",
        None,
    )
    .expect("controller request");
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json["host_id"], "esx-01");

    // No certificate: the handshake fails.
    assert!(tls_request(tls_client(&ca, None), &addr, "GET", "/v1/status", None).is_err());

    // A certificate from another CA.
    let other = World::new();
    let foreign = other.client_tls_dir(
        "foreign",
        "controller",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let foreign_cfg = tls_client(
        &ca,
        Some((&foreign.join("client.pem"), &foreign.join("client.key"))),
    );
    assert!(tls_request(foreign_cfg, &addr, "GET", "/v1/status", None).is_err());

    // An expired certificate from the right CA.
    let expired = world.client_tls_dir(
        "expired",
        "controller",
        -TimeDelta::days(10),
        -TimeDelta::days(1),
    );
    assert!(tls_request(client_config(&expired), &addr, "GET", "/v1/status", None).is_err());

    // The agent still serves.
    let again = tls_request(
        client_config(&world.tls_dir),
        &addr,
        "GET",
        "/healthz",
        None,
    )
    .expect("still serving");
    assert_eq!(again.status, 200);
}

#[test]
fn readers_may_read_but_not_stage_and_unlisted_clients_may_do_nothing() {
    let world = staged_world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            operators: vec!["controller".into()],
            readers: vec!["auditor".into()],
            ..Default::default()
        },
    );
    agent.start();
    let auditor = world.client_tls_dir(
        "auditor",
        "auditor",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let stranger = world.client_tls_dir(
        "stranger",
        "stranger",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let body = json!({"image": image, "depot": world.depot.url()});

    let read = tls_request(
        client_config(&auditor),
        &agent.addr(),
        "GET",
        "/v1/status",
        None,
    )
    .expect("read");
    assert_eq!(read.status, 200);
    let stage = tls_request(
        client_config(&auditor),
        &agent.addr(),
        "POST",
        "/v1/stage",
        Some(&body),
    )
    .expect("stage");
    assert_eq!(stage.status, 403, "{}", stage.body);
    assert_eq!(stage.json["error"]["code"], "forbidden");
    let nobody = tls_request(
        client_config(&stranger),
        &agent.addr(),
        "GET",
        "/v1/status",
        None,
    )
    .expect("stranger");
    assert_eq!(nobody.status, 403);
    assert_eq!(nobody.json["error"]["code"], "forbidden");
    assert!(agent.blobs().is_empty());

    // The operator may stage over mTLS.
    let op = tls_request(
        client_config(&world.tls_dir),
        &agent.addr(),
        "POST",
        "/v1/stage",
        Some(&body),
    )
    .expect("operator");
    assert_eq!(op.status, 202, "{}", op.body);
}

#[test]
fn a_non_root_process_on_the_socket_gets_403() {
    let world = staged_world();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let mode = std::fs::metadata(&agent.socket).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.expect("socket"), 0o600);

    // The socket's mode already keeps others out; open it up to prove SO_PEERCRED is checked too.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        let mut dir = agent.socket.parent().map(std::path::Path::to_path_buf);
        while let Some(d) = dir {
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
            dir = d.parent().map(std::path::Path::to_path_buf);
        }
    }
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-s",
            "-i",
            "--unix-socket",
        ])
        .arg(&agent.socket)
        .arg("http://agent/v1/status")
        .output()
        .expect("setpriv");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 403"),
        "stdout: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\"forbidden\""), "{text}");
    // Root on the same socket is served.
    assert_eq!(agent.request("GET", "/v1/status", None).status, 200);
}

#[test]
fn firmware_of_an_unlisted_vendor_leaves_staged_false_with_a_notification() {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 100_000),
        VibFile::firmware("bios", "dell", 50_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20", "BIOS=2.1"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    let status = agent.status();
    assert_eq!(status["staging"]["staged"], false, "{status}");
    assert_eq!(status["staging"]["software"], "staged");
    assert_eq!(status["staging"]["firmware"], "not_supported");
    let notes = status["compliance"]["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        notes
            .iter()
            .any(|n| n["code"] == "firmware_staging_unsupported"),
        "{status}"
    );
    assert_eq!(agent.blobs().len(), 1, "firmware not downloaded");

    // A host that lists the vendor stages it and is staged.
    let mut other = world.agent(
        "esx-02",
        AgentOptions {
            firmware_vendors: vec!["dell".into()],
            ..Default::default()
        },
    );
    other.start();
    assert_eq!(
        other.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    let status = other.status();
    assert_eq!(status["staging"]["staged"], true, "{status}");
    assert_eq!(status["staging"]["firmware"], "staged");
}

#[test]
fn dpu_vibs_are_staged_only_on_hosts_with_dpus() {
    let world = World::new();
    let digests = world.add_vibs(&[
        VibFile::software("esx-base", 100_000),
        VibFile::dpu("dpu-os", 80_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20", "DPU=1.0"]);
    let dpu_path = Depot::vib_path(&digests[1]);

    let mut plain = world.agent("plain", AgentOptions::default());
    plain.start();
    assert_eq!(
        plain.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    assert_eq!(
        world.depot.count(&dpu_path),
        0,
        "no dpu download on a host without DPUs"
    );
    let status = plain.status();
    assert_eq!(status["staging"]["dpu"], "not_applicable");
    assert_eq!(status["staging"]["staged"], true);

    let mut with_dpu = world.agent(
        "dpu-host",
        AgentOptions {
            dpus: vec!["dpu0".into()],
            ..Default::default()
        },
    );
    with_dpu.start();
    assert_eq!(
        with_dpu.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    assert_eq!(world.depot.count(&dpu_path), 1);
    assert_eq!(with_dpu.status()["staging"]["dpu"], "staged");
    assert_eq!(with_dpu.blobs().len(), 2);
}

#[test]
fn unknown_compliance_is_checked_first_and_a_second_image_gets_busy() {
    let world = World::new();
    let digests = world.add_vibs(&[VibFile::software("esx-base", 400_000)]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let other_image = world.image("esx-other", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    assert_eq!(agent.status()["compliance"]["status"], "unknown");

    // Hold the download so the task stays running.
    world.depot.fault(
        &Depot::vib_path(&digests[0]),
        Fault::Stall {
            after: 1000,
            for_: Duration::from_secs(3),
        },
        1,
    );
    let first = agent.stage(&image, &world.depot.url());
    assert_eq!(first.status, 202, "{}", first.body);
    let status = agent.status();
    assert_eq!(
        status["compliance"]["status"], "non_compliant",
        "check ran first: {status}"
    );
    assert!(status["compliance"]["checked_at"].is_string());
    assert_eq!(status["staging"]["state"], "staging");

    let busy = agent.stage(&other_image, &world.depot.url());
    assert_eq!(busy.status, 409, "{}", busy.body);
    assert_eq!(busy.json["error"]["code"], "busy");

    // The same image joins the running task.
    let joined = agent.stage(&image, &world.depot.url());
    assert_eq!(joined.status, 202);
    assert_eq!(joined.json["task"]["id"], first.json["task"]["id"]);

    let id = first.json["task"]["id"].as_str().expect("id");
    assert_eq!(agent.wait_task(id, 60)["state"], "succeeded");
    assert_eq!(agent.status()["compliance"]["status"], "staged");
}

fn expect_error(reply: &vibstage_e2e::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.json["error"]["code"], code, "{}", reply.body);
    assert!(reply.json["error"]["message"].is_string(), "{}", reply.body);
}

#[test]
fn bad_inputs_get_precise_errors_and_write_nothing() {
    let world = staged_world();
    let image = world.image("esx-8.0u2", 5, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let url = world.depot.url();
    let raw = |method: &str, path: &str, body: &str, ctype: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
        vibstage_e2e::agent::http_exchange(&mut s, method, path, Some(body), ctype)
            .expect("exchange")
    };

    expect_error(
        &raw("POST", "/v1/stage", "{\"image\": ", "application/json"),
        400,
        "bad_request",
    );
    expect_error(
        &raw("POST", "/v1/stage", "[1,2]", "application/json"),
        400,
        "bad_request",
    );
    let unknown = json!({"image": image, "depot": url, "force": true}).to_string();
    expect_error(
        &raw("POST", "/v1/stage", &unknown, "application/json"),
        400,
        "bad_request",
    );
    let wrong_type = json!({"image": image, "depot": 7}).to_string();
    expect_error(
        &raw("POST", "/v1/stage", &wrong_type, "application/json"),
        400,
        "bad_request",
    );
    let dup = format!(
        "{{\"depot\": \"{url}\", \"depot\": \"{url}\", \"image\": {}}}",
        json!(image)
    );
    expect_error(
        &raw("POST", "/v1/stage", &dup, "application/json"),
        400,
        "bad_request",
    );
    let good = json!({"image": image, "depot": url}).to_string();
    expect_error(
        &raw("POST", "/v1/stage", &good, "text/plain"),
        415,
        "bad_request",
    );
    let huge = format!("{{\"depot\": \"{}\"}}", "x".repeat(5 << 20));
    expect_error(
        &raw("POST", "/v1/stage", &huge, "application/json"),
        413,
        "bad_request",
    );
    expect_error(&agent.request("GET", "/v1/nope", None), 404, "not_found");
    expect_error(
        &agent.request("DELETE", "/v1/status", None),
        405,
        "bad_request",
    );
    expect_error(
        &agent.request("GET", "/v1/tasks/nope", None),
        404,
        "not_found",
    );
    expect_error(
        &agent.request("DELETE", "/v1/staged/sha256:zz", None),
        400,
        "bad_request",
    );
    let missing = format!("/v1/staged/sha256:{}", "0".repeat(64));
    expect_error(&agent.request("DELETE", &missing, None), 404, "not_found");
    expect_error(&agent.stage(&image, "ftp://depot/"), 400, "bad_request");
    expect_error(
        &agent.stage(&image, "http://127.0.0.1:1/"),
        400,
        "bad_request",
    );

    // Signed content refusals.
    let mut tampered = image.clone();
    let text = String::from_utf8(tampered.payload.clone()).expect("utf8");
    tampered.payload = text
        .replacen("\"serial\":5", "\"serial\":6", 1)
        .into_bytes();
    expect_error(&agent.stage(&tampered, &url), 422, "signature_invalid");
    let mut unsigned = image.clone();
    unsigned.signatures.clear();
    expect_error(&agent.stage(&unsigned, &url), 422, "untrusted_key");
    let expired = world.image_expiring(
        "esx-8.0u2",
        5,
        &["ESXi=8.0.2-0.20"],
        time::OffsetDateTime::now_utc() - TimeDelta::minutes(1),
    );
    expect_error(&agent.stage(&expired, &url), 422, "image_expired");
    let check = agent.request(
        "POST",
        "/v1/compliance/check",
        Some(&json!({"image": expired})),
    );
    expect_error(&check, 422, "image_expired");
    assert!(
        agent.blobs().is_empty(),
        "nothing written before any accepted request"
    );

    // Rollback: once serial 5 is accepted, serial 4 is refused, even after a restart.
    assert_eq!(agent.stage_and_wait(&image, &url)["state"], "succeeded");
    agent.kill9();
    agent.start();
    let older = world.image("esx-8.0u2", 4, &["ESXi=8.0.2-0.20"]);
    expect_error(&agent.stage(&older, &url), 422, "rollback_refused");
    expect_error(
        &agent.request(
            "POST",
            "/v1/compliance/check",
            Some(&json!({"image": older})),
        ),
        422,
        "rollback_refused",
    );
    // The agent still serves and its metrics count the refusals.
    let metrics = agent.request("GET", "/metrics", None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("vibstage_verification_failures_total{code=\"rollback_refused\"}"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("vibstage_http_requests_total{"),
        "{}",
        metrics.body
    );
    let staged: Value = agent.request("GET", "/v1/staged", None).json;
    assert_eq!(staged["staged"].as_array().map(Vec::len), Some(1));
}

#[test]
fn sighup_reloads_allow_lists_and_keeps_old_tls_when_new_files_are_broken() {
    let world = staged_world();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let auditor = world.client_tls_dir(
        "auditor",
        "auditor",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let body = json!({"image": image, "depot": world.depot.url()});

    // Make "auditor" a reader and break the server key: allow-lists change, TLS stays.
    let config = std::fs::read_to_string(&agent.config).expect("config");
    let config = config.replace("readers = []", "readers = [\"auditor\"]");
    std::fs::write(&agent.config, config).expect("write config");
    std::fs::write(agent.home.join("agent.key"), "not a key").expect("break key");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = tls_request(
            client_config(&auditor),
            &agent.addr(),
            "POST",
            "/v1/stage",
            Some(&body),
        )
        .expect("TLS still works with the old certificate");
        if r.status == 403 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent.log_text().contains("TLS not reloaded"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn sd_notify_ready_watchdog_and_stopping_reach_the_notify_socket() {
    let world = staged_world();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    let path = world.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    agent.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    agent.start();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = socket.recv(&mut buf).expect("notification");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let (status, _) = agent.terminate(Duration::from_secs(10));
    assert!(status.success());
    loop {
        let n = socket.recv(&mut buf).expect("STOPPING");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
}

/// Issue 11: the agent answered 413 before reading an oversized body and closed the connection
/// with the rest of the body unread, so the client often got "Connection reset by peer" instead
/// of the answer. The agent now half-closes and drains (lingering close): the client's whole
/// write succeeds and it reads the 413 with its error body, every time, on both listeners.
#[test]
fn an_oversized_body_gets_its_413_answer_not_a_connection_reset() {
    let world = staged_world();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    // 6 MiB: 2 MiB more than the limit, far more than the socket buffers hold.
    let body = json!({"depot": "x".repeat(6 << 20)});
    let text = body.to_string();
    let config = client_config(&world.tls_dir);
    for round in 0..5 {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
        let local = vibstage_e2e::agent::http_exchange(
            &mut s,
            "POST",
            "/v1/stage",
            Some(&text),
            "application/json",
        )
        .unwrap_or_else(|e| panic!("round {round}, unix socket: {e}"));
        expect_error(&local, 413, "bad_request");
        let remote = tls_request(
            config.clone(),
            &agent.addr(),
            "POST",
            "/v1/stage",
            Some(&body),
        )
        .unwrap_or_else(|e| panic!("round {round}, mTLS: {e}"));
        expect_error(&remote, 413, "bad_request");
    }
    // The agent still serves.
    assert_eq!(agent.request("GET", "/healthz", None).status, 200);
}

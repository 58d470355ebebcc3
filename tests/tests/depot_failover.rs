//! Several depots per request, tried in order for each blob (issue 15, part 3; SPEC §5): a blob
//! that fails on one depot (refused, wrong bytes, stall) goes on with the next from the bytes
//! already verified; the task says which depot served what; when every depot fails the error
//! names each one.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use vibstage_e2e::{AgentOptions, AgentProc, Depot, Fault, VibFile, World, vibstagectl};

/// A loopback URL nothing listens on (the port was free a moment ago).
fn refusing_depot() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    format!("https://127.0.0.1:{port}/")
}

fn stage(agent: &AgentProc, image: &vibstage_protocol::Envelope, depot: Value) -> Value {
    let r = agent.request(
        "POST",
        "/v1/stage",
        Some(&json!({"image": image, "depot": depot})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json["task"]["id"].as_str().expect("task id").to_owned();
    agent.wait_task(&id, 120)
}

fn world_with(vibs: &[VibFile]) -> (World, Vec<String>, vibstage_protocol::Envelope) {
    let world = World::new();
    let digests = world.add_vibs(vibs);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    (world, digests, image)
}

fn all_blobs_staged(agent: &AgentProc, digests: &[String]) {
    let mut on_disk: Vec<String> = agent
        .blobs()
        .into_iter()
        .map(|(d, ok)| {
            assert!(ok, "blob {d} holds wrong bytes");
            d
        })
        .collect();
    on_disk.sort();
    let mut wanted = digests.to_vec();
    wanted.sort();
    assert_eq!(on_disk, wanted);
}

#[test]
fn first_depot_refusing_connections_the_next_serves_every_blob_and_the_cli_takes_several() {
    let (world, digests, image) = world_with(&[
        VibFile::software("esx-base", 150_000),
        VibFile::software("esx-ui", 90_000),
    ]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let down = refusing_depot();
    let out = Command::new(vibstagectl())
        .arg("--socket")
        .arg(&agent.socket)
        .arg("--json")
        .args(["stage", "--wait", "--image"])
        .arg(world.depot_dir.join("images/esx-8.0u2.json"))
        .args(["--depot", &down, "--depot", &world.depot.url()])
        .output()
        .expect("vibstagectl");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = image;
    let task = &agent.request("GET", "/v1/tasks", None).json["tasks"][0];
    assert_eq!(task["state"], "succeeded", "{task}");
    let depots = task["depots"].as_array().expect("depots in the task");
    assert_eq!(depots.len(), 2, "{task}");
    assert_eq!(depots[0]["url"], down.as_str());
    assert_eq!(depots[0]["blobs"], 0, "{task}");
    assert!(depots[0]["failures"].as_u64() >= Some(2), "{task}");
    assert_eq!(depots[1]["blobs"], 2, "{task}");
    assert_eq!(depots[1]["bytes"], 240_000, "{task}");
    all_blobs_staged(&agent, &digests);
}

#[test]
fn first_depot_serving_wrong_bytes_fails_over_and_nothing_wrong_is_kept() {
    let (world, digests, image) = world_with(&[VibFile::software("esx-base", 120_000)]);
    // Two servers over the same depot tree; the first flips a byte of the VIB every time.
    let corrupt = Depot::start(&world.depot_dir, &world.depot_pki);
    let path = Depot::vib_path(&digests[0]);
    corrupt.fault(&path, Fault::Corrupt { offset: 5_000 }, usize::MAX);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let task = stage(&agent, &image, json!([corrupt.url(), world.depot.url()]));
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(
        corrupt.count(&path),
        1,
        "the corrupting depot is not asked twice in a row"
    );
    assert_eq!(world.depot.count(&path), 1);
    // After the mismatch nothing of the wrong bytes was kept: the second depot served it all.
    let served = world.depot.requests();
    assert_eq!(served[0].range, None, "{served:?}");
    assert_eq!(task["depots"][0]["failures"], 1, "{task}");
    assert_eq!(task["depots"][1]["blobs"], 1, "{task}");
    all_blobs_staged(&agent, &digests);
}

#[test]
fn first_depot_stalling_mid_blob_resumes_on_the_next_from_the_verified_bytes() {
    let (world, digests, image) = world_with(&[VibFile::software("esx-base", 400_000)]);
    let stalling = Depot::start(&world.depot_dir, &world.depot_pki);
    let path = Depot::vib_path(&digests[0]);
    stalling.fault(
        &path,
        Fault::Stall {
            after: 150_000,
            for_: Duration::from_secs(30),
        },
        usize::MAX,
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            timeout_secs: Some(2),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let task = stage(&agent, &image, json!([stalling.url(), world.depot.url()]));
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(stalling.count(&path), 1);
    let served = world.depot.requests();
    assert_eq!(served.len(), 1, "{served:?}");
    let range = served[0]
        .range
        .clone()
        .expect("the next depot was asked for the rest");
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("odd range {range}"));
    assert!(
        from > 0 && from <= 150_000,
        "resumed from {from}, not from what the first depot delivered"
    );
    assert_eq!(
        served[0].body_bytes_sent,
        400_000 - from,
        "only the missing bytes came from the next depot"
    );
    all_blobs_staged(&agent, &digests);
}

#[test]
fn every_depot_failing_is_depot_unreachable_naming_each() {
    let (world, digests, image) = world_with(&[VibFile::software("esx-base", 50_000)]);
    let missing = Depot::start(&world.depot_dir, &world.depot_pki);
    missing.fault(
        &Depot::vib_path(&digests[0]),
        Fault::Status(503),
        usize::MAX,
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            retries: Some(1),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let down = refusing_depot();
    let task = stage(&agent, &image, json!([down, missing.url()]));
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["error"]["code"], "depot_unreachable", "{task}");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    for url in [down.as_str(), missing.url().as_str()] {
        assert!(message.contains(url), "{url} is not named: {message}");
    }
    assert!(message.contains("503"), "{message}");
    // Two rounds (retries = 1) over both depots, no more.
    assert_eq!(missing.count(&Depot::vib_path(&digests[0])), 2);
    assert!(agent.blobs().is_empty());
}

#[test]
fn more_than_eight_depots_or_none_are_refused() {
    let (world, _digests, image) = world_with(&[VibFile::software("esx-base", 10_000)]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    for depot in [json!(vec![world.depot.url(); 9]), json!([])] {
        let r = agent.request(
            "POST",
            "/v1/stage",
            Some(&json!({"image": image, "depot": depot})),
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json["error"]["code"], "bad_request", "{}", r.body);
    }
    let r = agent.request(
        "POST",
        "/v1/stage",
        Some(&json!({"image": image, "depot": 7})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("a depot URL or a list of depot URLs"),
        "{}",
        r.body
    );
}

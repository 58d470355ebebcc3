//! Crashes and stops while staging (issue 3, "Must show"; SPEC §3 signals, §7 on-disk invariants).
//!
//! A real `vibstaged` is killed with SIGKILL at several points of a staging run — right after the
//! request, mid-download with a partial file on disk, after some blobs are committed, during its
//! own start-up — and started again. After every kill no file under `blobs/` holds wrong bytes and
//! every partial download is a prefix of the VIB; after the restart the interrupted task resumes
//! by itself and ends `succeeded`, partial downloads continue with a Range request from where the
//! file ends, and committed blobs are never requested again. SIGTERM makes the agent exit 0
//! within 10 s, and a second agent on the same scratch directory is refused.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vibstage_e2e::{AgentOptions, AgentProc, Depot, Fault, RequestLog, VibFile, World};
use vibstage_protocol::Envelope;

const MIB: usize = 1 << 20;

/// Polls `cond` every 20 ms for up to `secs`; panics with `what` if it never holds.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts staging and returns the task id (the request must be accepted with 202).
fn start_stage(agent: &AgentProc, image: &Envelope, depot: &str) -> String {
    let r = agent.stage(image, depot);
    assert_eq!(r.status, 202, "stage: {}", r.body);
    r.json["task"]["id"].as_str().expect("task id").to_owned()
}

/// Length of the partial download of `hex`, if there is one.
fn partial_len(agent: &AgentProc, hex: &str) -> Option<u64> {
    let path = agent.scratch.join("ingest").join(format!("{hex}.partial"));
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// The invariants that must hold whenever the agent is down: every file under `blobs/` hashes to
/// its name and is one of `hexes`, and every partial download is a prefix of its VIB. Returns
/// the committed blobs.
fn check_store(agent: &AgentProc, depot_dir: &Path, hexes: &[String]) -> BTreeSet<String> {
    let blobs = agent.blobs();
    for (name, ok) in &blobs {
        assert!(ok, "blob {name} holds wrong bytes");
        assert!(hexes.contains(name), "unexpected blob {name}");
    }
    let ingest = agent.scratch.join("ingest");
    for entry in std::fs::read_dir(&ingest).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_suffix(".partial") else {
            continue;
        };
        let part = std::fs::read(entry.path()).expect("read partial");
        let full = std::fs::read(depot_dir.join("vibs").join(hex)).expect("depot vib");
        assert!(
            part.len() <= full.len() && part[..] == full[..part.len()],
            "partial download {name} ({} bytes) is not a prefix of the VIB",
            part.len()
        );
    }
    blobs.into_iter().map(|(name, _)| name).collect()
}

/// The task `id` as listed by `GET /v1/tasks`.
fn listed_task(agent: &AgentProc, id: &str) -> Value {
    let r = agent.request("GET", "/v1/tasks", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("task {id} not listed after the restart: {}", r.body))
}

/// After a restart: the interrupted task resumes by itself, ends `succeeded`, and the host is
/// staged with every VIB byte for byte the depot's.
fn assert_resumed_and_staged(agent: &AgentProc, world: &World, id: &str, hexes: &[String]) {
    let task = agent.wait_task(id, 60);
    assert_eq!(
        task["state"],
        "succeeded",
        "{task}\nlog:\n{}",
        agent.log_text()
    );
    assert_eq!(listed_task(agent, id)["state"], "succeeded");
    let blobs = agent.blobs();
    let expected: Vec<(String, bool)> = {
        let mut v: Vec<(String, bool)> = hexes.iter().map(|h| (h.clone(), true)).collect();
        v.sort();
        v
    };
    assert_eq!(blobs, expected);
    for hex in hexes {
        let blob = std::fs::read(agent.scratch.join("blobs/sha256").join(hex)).expect("blob");
        let depot = std::fs::read(world.depot_dir.join("vibs").join(hex)).expect("depot vib");
        assert!(blob == depot, "blob {hex} differs from the depot's");
    }
    let status = agent.status();
    assert_eq!(status["staging"]["state"], "staged", "{status}");
    assert_eq!(status["staging"]["staged"], true, "{status}");
}

fn requests_for(world: &World, hex: &str) -> Vec<RequestLog> {
    let path = Depot::vib_path(hex);
    world
        .depot
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

#[test]
fn killed_mid_download_resumes_the_partial_file_and_never_refetches_committed_blobs() {
    let world = World::new();
    let big = 6 * MIB;
    let hexes = world.add_vibs(&[
        VibFile::software("esx-base", big),
        VibFile::software("esx-ui", 300_001),
        VibFile::software("vsan", 500_002),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    // The big VIB stops after 2 MiB, long enough for the kill to land mid-download.
    world.depot.fault(
        &Depot::vib_path(&hexes[0]),
        Fault::Stall {
            after: 2 * MIB as u64,
            for_: Duration::from_secs(30),
        },
        1,
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            timeout_secs: Some(20),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let id = start_stage(&agent, &image, &world.depot.url());
    wait_until(15, "the small blobs and 1 MiB of the big one", || {
        agent.blobs().len() == 2 && partial_len(&agent, &hexes[0]).unwrap_or(0) >= MIB as u64
    });
    agent.kill9();

    let committed = check_store(&agent, &world.depot_dir, &hexes);
    assert_eq!(
        committed,
        hexes[1..].iter().cloned().collect(),
        "small blobs committed"
    );
    let held = partial_len(&agent, &hexes[0]).expect("partial download kept");
    assert!(held >= MIB as u64);

    world.depot.clear_faults();
    world.depot.clear_log();
    agent.start();
    assert_resumed_and_staged(&agent, &world, &id, &hexes);

    // Only the missing part of the big VIB came from the depot.
    for hex in &hexes[1..] {
        assert_eq!(
            requests_for(&world, hex),
            vec![],
            "committed blob {hex} requested again"
        );
    }
    let log = requests_for(&world, &hexes[0]);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].range, Some(format!("bytes={held}-")), "{log:?}");
    assert_eq!(log[0].status, 206, "{log:?}");
    assert_eq!(world.depot.bytes_served(), big as u64 - held);
}

#[test]
fn killed_right_after_the_request_resumes_the_task_at_restart() {
    let world = World::new();
    let hexes = world.add_vibs(&[
        VibFile::software("esx-base", 2 * MIB),
        VibFile::software("esx-ui", 700_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let id = start_stage(&agent, &image, &world.depot.url());
    agent.kill9();
    check_store(&agent, &world.depot_dir, &hexes);

    agent.start();
    assert_resumed_and_staged(&agent, &world, &id, &hexes);
}

#[test]
fn killed_again_and_again_never_leaves_a_wrong_blob_and_never_refetches_a_committed_one() {
    let world = World::new();
    let sizes = [1_500_001, 1_200_007, 900_001, 2 * MIB + 3];
    let vibs: Vec<VibFile> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| VibFile::software(&format!("vib-{i}"), size))
        .collect();
    let hexes = world.add_vibs(&vibs);
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    // Every download trickles, so kills land while bytes are being written.
    world.depot.fault(
        vibstage_e2e::ANY_PATH,
        Fault::SlowDrip {
            bytes_per_sec: MIB as u64,
        },
        usize::MAX,
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            timeout_secs: Some(10),
            concurrency: Some(2),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let id = start_stage(&agent, &image, &world.depot.url());

    // Kill points, in ms after the agent (re)started: some during start-up itself.
    let delays = [250, 0, 500, 30, 700, 400, 900];
    let mut committed: BTreeSet<String> = BTreeSet::new();
    let mut held: Vec<(String, u64)> = Vec::new();
    for (round, delay) in delays.into_iter().enumerate() {
        if round > 0 {
            world.depot.clear_log();
            agent.spawn();
        }
        std::thread::sleep(Duration::from_millis(delay));
        agent.kill9();

        // What this run fetched: never a blob committed before it, and partial downloads
        // resumed exactly from where their file ended.
        for hex in &committed {
            assert_eq!(
                requests_for(&world, hex),
                vec![],
                "round {round}: committed blob {hex} requested again"
            );
        }
        for (hex, len) in &held {
            if let Some(first) = requests_for(&world, hex).first() {
                let expected = (*len > 0).then(|| format!("bytes={len}-"));
                assert_eq!(first.range, expected, "round {round}: resume of {hex}");
            }
        }
        committed = check_store(&agent, &world.depot_dir, &hexes);
        held = hexes
            .iter()
            .filter(|h| !committed.contains(*h))
            .filter_map(|h| partial_len(&agent, h).map(|len| (h.clone(), len)))
            .collect();
        let partials: Vec<u64> = held.iter().map(|(_, len)| *len).collect();
        eprintln!(
            "round {round}: killed after {delay} ms; {} blobs committed, partial downloads {partials:?}",
            committed.len()
        );
    }

    world.depot.clear_faults();
    world.depot.clear_log();
    agent.start();
    assert_resumed_and_staged(&agent, &world, &id, &hexes);
    for hex in &committed {
        assert_eq!(
            requests_for(&world, hex),
            vec![],
            "committed blob {hex} requested again"
        );
    }
    let held_bytes: u64 = held.iter().map(|(_, len)| len).sum();
    let committed_bytes: u64 = hexes
        .iter()
        .zip(sizes)
        .filter(|(h, _)| committed.contains(*h))
        .map(|(_, s)| s as u64)
        .sum();
    assert_eq!(
        world.depot.bytes_served(),
        total - committed_bytes - held_bytes
    );
}

#[test]
fn sigterm_during_staging_exits_0_within_10_s_and_the_stage_completes_after_restart() {
    let world = World::new();
    let hexes = world.add_vibs(&[
        VibFile::software("esx-base", 4 * MIB),
        VibFile::software("esx-ui", 400_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    world.depot.fault(
        &Depot::vib_path(&hexes[0]),
        Fault::Stall {
            after: MIB as u64,
            for_: Duration::from_secs(30),
        },
        1,
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            timeout_secs: Some(20),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let id = start_stage(&agent, &image, &world.depot.url());
    wait_until(15, "the download to stall mid-way", || {
        requests_for(&world, &hexes[0])
            .first()
            .is_some_and(|r| r.body_bytes_sent >= MIB as u64)
            && agent.blobs().len() == 1
    });

    let (status, took) = agent.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status} after {took:?}\nlog:\n{}",
        agent.log_text()
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    check_store(&agent, &world.depot_dir, &hexes);
    let held = partial_len(&agent, &hexes[0]).unwrap_or(0);
    eprintln!("SIGTERM: exited after {took:?}, partial download of {held} bytes kept");

    world.depot.clear_faults();
    world.depot.clear_log();
    agent.start();
    assert_resumed_and_staged(&agent, &world, &id, &hexes);
    assert_eq!(
        requests_for(&world, &hexes[1]),
        vec![],
        "committed blob requested again"
    );
    let log = requests_for(&world, &hexes[0]);
    assert_eq!(log.len(), 1, "{log:?}");
    let expected = (held > 0).then(|| format!("bytes={held}-"));
    assert_eq!(log[0].range, expected, "{log:?}");
}

#[test]
fn a_second_agent_on_the_same_scratch_directory_is_refused() {
    let world = World::new();
    let mut first = world.agent("esx-01", AgentOptions::default());
    first.start();
    let mut second = world.agent(
        "esx-02",
        AgentOptions {
            scratch: Some(first.scratch.clone()),
            ..AgentOptions::default()
        },
    );
    second.spawn();
    let status = second
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("second agent kept running\nlog:\n{}", second.log_text()));
    assert!(!status.success(), "second agent exited with {status}");
    assert!(
        second.log_text().contains("locked"),
        "the refusal does not say the scratch is locked:\n{}",
        second.log_text()
    );
    // The first agent is untouched.
    assert_eq!(first.request("GET", "/healthz", None).status, 200);
}

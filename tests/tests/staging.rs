//! Staging end to end (issue 3): a real `vibstaged` process stages from a real HTTPS depot.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use vibstage_e2e::{AgentOptions, VibFile, World};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

#[test]
fn stages_bytes_equal_to_the_depot_with_root_only_modes_and_restaging_downloads_nothing() {
    let world = World::new();
    let digests = world.add_vibs(&[
        VibFile::software("esx-base", 3 << 20),
        VibFile::software("esx-ui", 700_000),
        VibFile::software("vsan", 1_500_001),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();

    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(
        task["progress"]["bytes_done"],
        task["progress"]["bytes_total"]
    );

    for d in &digests {
        let blob = agent.scratch.join("blobs/sha256").join(d);
        let depot = world.depot_dir.join("vibs").join(d);
        assert_eq!(
            std::fs::read(&blob).expect("blob"),
            std::fs::read(&depot).expect("depot")
        );
        assert_eq!(mode(&blob), 0o400);
        assert_eq!(std::fs::metadata(&blob).expect("meta").uid(), 0);
    }
    for dir in ["", "blobs", "blobs/sha256", "ingest", "images"] {
        assert_eq!(mode(&agent.scratch.join(dir)), 0o700, "{dir}");
    }
    assert_eq!(mode(&agent.state_dir), 0o700);
    let status = agent.status();
    assert_eq!(status["staging"]["state"], "staged", "{status}");
    assert_eq!(status["staging"]["staged"], true);
    assert_eq!(status["staging"]["persistent"], true);
    assert_eq!(status["staging"]["bytes"], (3 << 20) + 700_000 + 1_500_001);

    // Staging the same image again fetches nothing from the depot.
    world.depot.clear_log();
    let r = agent.stage(&image, &world.depot.url());
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
    if r.status == 202 {
        let id = r.json["task"]["id"].as_str().expect("id");
        assert_eq!(agent.wait_task(id, 60)["state"], "succeeded");
    }
    assert_eq!(
        world.depot.bytes_served(),
        0,
        "{:?}",
        world.depot.requests()
    );
}

#[test]
fn scrub_at_start_removes_a_blob_with_wrong_bytes_and_restaging_fetches_only_it() {
    let world = World::new();
    let digests = world.add_vibs(&[
        VibFile::software("esx-base", 500_000),
        VibFile::software("esx-ui", 300_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    assert_eq!(
        agent.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    agent.kill9();

    // Bit rot: same size, one byte different. Without --scrub only sizes are checked.
    let victim = agent.scratch.join("blobs/sha256").join(&digests[0]);
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut bytes = std::fs::read(&victim).expect("read");
    bytes[1234] ^= 0xff;
    std::fs::write(&victim, bytes).expect("write");
    agent.args = vec!["--scrub".into()];
    agent.start();
    assert!(!victim.exists(), "scrub removed the corrupt blob");
    assert!(agent.blobs().iter().all(|(_, ok)| *ok));
    let status = agent.status();
    assert_eq!(status["staging"]["state"], "partial", "{status}");
    assert_eq!(status["staging"]["staged"], false);
    assert!(
        agent
            .log_text()
            .contains("removed a blob whose bytes were wrong")
    );

    world.depot.clear_log();
    assert_eq!(
        agent.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    let requests = world.depot.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].path, vibstage_e2e::Depot::vib_path(&digests[0]));
}

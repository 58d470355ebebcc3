//! Regression tests for the defects an outside review found in the agent (issue 11), each named
//! after the failure it prevents and each failing on the code before its fix. The interop and
//! denial-of-service items live beside the tests of their area (`packaging.rs`, `cli_tools.rs`,
//! `hostile_{tls,socket,http,content}.rs`, `api.rs`); RELIABILITY.md lists every one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use vibstage_e2e::agent::blobs_in;
use vibstage_e2e::{AgentOptions, AgentProc, Depot, Fault, VibFile, World};
use vibstage_protocol::{
    AcceptanceLevel, Component, Digest, Envelope, Image, VibDescriptor, VibKind, VibTarget,
};

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

fn started_task(reply: &vibstage_e2e::Reply) -> String {
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.json["task"]["id"]
        .as_str()
        .expect("task id")
        .to_owned()
}

/// Waits until `pred` holds, polling; panics with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- item 1 -------------------------------------------------------------------------------

#[test]
fn delete_during_staging_never_wipes_the_running_stage() {
    let world = World::new();
    let digests = world.add_vibs(&[
        VibFile::software("esx-base", 200_000),
        VibFile::software("esx-ui", 300_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    // One VIB arrives at once, the other stalls halfway for 3 s: the first is committed (and,
    // before the fix, unreferenced) while the stage still runs.
    let slow = Depot::vib_path(&digests[1]);
    world.depot.fault(
        &slow,
        Fault::Stall {
            after: 100_000,
            for_: Duration::from_secs(3),
        },
        1,
    );
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let task = started_task(&agent.stage(&image, &world.depot.url()));
    wait_until(
        Duration::from_secs(20),
        "the first blob to be committed",
        || !agent.blobs().is_empty(),
    );
    let unknown = format!("sha256:{}", "ab".repeat(32));
    for digest in [
        unknown.as_str(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let r = agent.request("DELETE", &format!("/v1/staged/{digest}"), None);
        assert_eq!(r.status, 409, "DELETE during staging: {}", r.body);
        assert_eq!(r.json["error"]["code"], "busy", "{}", r.body);
    }
    assert_eq!(agent.blobs().len(), 1, "the committed blob is still there");
    let done = agent.wait_task(&task, 60);
    assert_eq!(done["state"], "succeeded", "{done}");
    let staged = agent.request("GET", "/v1/staged", None).json;
    assert_eq!(staged["staged"][0]["state"], "staged", "{staged}");
    let mut on_disk: Vec<String> = agent.blobs().into_iter().map(|(d, _)| d).collect();
    on_disk.sort();
    let mut wanted = digests.clone();
    wanted.sort();
    assert_eq!(on_disk, wanted);
    // Once nothing runs, an unknown digest is a plain 404 and deletes nothing.
    let r = agent.request("DELETE", &format!("/v1/staged/{unknown}"), None);
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(agent.blobs().len(), 2);
}

// ---- item 2 -------------------------------------------------------------------------------

fn remediate(agent: &AgentProc, image: &Envelope, depot: &str) -> Value {
    let r = agent.request(
        "POST",
        "/v1/remediate",
        Some(&json!({"image": image, "depot": depot})),
    );
    let id = started_task(&r);
    agent.wait_task(&id, 120)
}

/// The files of `bootbank/current` (manifest excluded), each checked to hash to the digest its
/// name ends in; returns those digests.
fn bank_digests(state_dir: &Path) -> Vec<String> {
    let current = state_dir.join("bootbank/current");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&current).expect("bank") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "manifest.json" {
            continue;
        }
        let hex = name
            .strip_suffix(".vib")
            .and_then(|n| n.rsplit_once('-'))
            .map(|(_, h)| h.to_owned())
            .unwrap_or_else(|| panic!("unexpected file {name} in the bank"));
        assert_eq!(sha256_hex(&entry.path()), hex, "{name} holds other bytes");
        out.push(hex);
    }
    out.sort();
    out
}

fn manifest_digests(state_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(state_dir.join("bootbank/current/manifest.json"))
        .expect("manifest");
    let manifest: Value = serde_json::from_str(&text).expect("manifest json");
    let mut out: Vec<String> = manifest["vibs"]
        .as_array()
        .expect("vibs")
        .iter()
        .map(|v| v.as_str().expect("digest").to_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn upgrade_with_the_built_in_installer_keeps_every_unchanged_vib_in_the_new_bank() {
    let world = World::new();
    let base = world.add_vibs(&[
        VibFile::software("esx-base", 120_000),
        VibFile::software("esx-ui", 80_000),
    ]);
    let tools = world.add_vibs(&[VibFile {
        component: "Tools".into(),
        version: "1.0".into(),
        ..VibFile::software("vmtools", 60_000)
    }]);
    let a = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let b = world.image("esx-8.0u2", 2, &["ESXi=8.0.2-0.20", "Tools=1.0"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();

    let done = remediate(&agent, &a, &world.depot.url());
    assert_eq!(done["state"], "succeeded", "{done}");
    let mut want_a = base.clone();
    want_a.sort();
    assert_eq!(bank_digests(&agent.state_dir), want_a);

    world.depot.clear_log();
    let done = remediate(&agent, &b, &world.depot.url());
    assert_eq!(done["state"], "succeeded", "{done}");
    // Only the new VIB came from the depot; the others were carried over from the old bank.
    assert_eq!(world.depot.count(&Depot::vib_path(&tools[0])), 1);
    for d in &base {
        assert_eq!(
            world.depot.count(&Depot::vib_path(d)),
            0,
            "{d} fetched again"
        );
    }
    let mut want_b: Vec<String> = base.iter().chain(&tools).cloned().collect();
    want_b.sort();
    assert_eq!(
        bank_digests(&agent.state_dir),
        want_b,
        "files of the new bank"
    );
    let in_manifest: Vec<String> = manifest_digests(&agent.state_dir);
    assert_eq!(in_manifest, want_b, "manifest of the new bank");
    let status = agent.status();
    assert_eq!(status["compliance"]["status"], "compliant", "{status}");
    // Exactly one bank is left, and after a restart the same image is installed.
    let banks = std::fs::read_dir(agent.state_dir.join("bootbank"))
        .expect("bootbank")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bank-"))
        .count();
    assert_eq!(banks, 1);
    agent.terminate(Duration::from_secs(10));
    agent.start();
    assert_eq!(
        agent.status()["installed"]["image"]["serial"],
        2,
        "installed after a restart"
    );
}

// ---- item 3 -------------------------------------------------------------------------------

#[test]
fn failed_state_save_after_install_still_leaves_maintenance_mode() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let log = world.dir.path().join("hooks.log");
    let mut agent = world.agent("esx-01", AgentOptions::default());
    let state = agent.state_dir.display().to_string();
    // The installer succeeds, then leaves the state directory read-only (a read-only bind
    // mount over it): the agent's save of the installed image fails.
    let extra = format!(
        r#"
[maintenance]
enter = ["sh", "-c", "echo enter >> {log}"]
exit = ["sh", "-c", "echo exit >> {log}"]
timeout_secs = 20

[install]
command = ["sh", "-c", "echo install >> {log} && mount --bind {state} {state} && mount -o remount,bind,ro {state}", "install"]
"#,
        log = log.display(),
    );
    agent.merge_config(&extra);
    agent.start();
    let done = remediate(&agent, &image, &world.depot.url());
    let unmount = Command::new("umount")
        .arg("-l")
        .arg(&agent.state_dir)
        .status()
        .expect("umount");
    assert!(unmount.success(), "the install hook did not mount");

    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "internal", "{done}");
    let message = done["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("was installed") && message.contains("failed to save"),
        "{message}"
    );
    let hooks = std::fs::read_to_string(&log).expect("hooks log");
    assert_eq!(
        hooks.lines().collect::<Vec<_>>(),
        ["enter", "install", "exit"],
        "maintenance mode must be left through the exit hook"
    );
    let status = agent.status();
    assert_eq!(status["maintenance"]["active"], false, "{status}");
    assert_eq!(status["installed"]["image"]["serial"], 1, "{status}");
    // The state directory is writable again: the next save writes what memory holds, so the
    // file agrees with it about what is installed and about maintenance mode.
    let r = agent.request(
        "POST",
        "/v1/compliance/check",
        Some(&json!({"image": image})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json["status"], "compliant", "{}", r.body);
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(agent.state_dir.join("state.json")).expect("state"),
    )
    .expect("state json");
    assert_eq!(saved["maintenance_active"], false, "{saved}");
    assert_eq!(saved["installed"]["image"]["serial"], 1, "{saved}");
}

// ---- item 4 -------------------------------------------------------------------------------

fn refused_start(agent: &mut AgentProc) -> String {
    agent.spawn();
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the agent started\nlog:\n{}", agent.log_text()));
    assert!(!status.success(), "exit status {status}");
    agent.log_text()
}

#[test]
fn planted_symlinks_in_a_state_dir_others_could_write_are_never_followed() {
    let world = World::new();
    let victim = world.dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut agent = world.agent("esx-01", AgentOptions::default());
    // A state directory someone made world-writable, with links planted where the agent
    // writes: its temporary file and its state file.
    std::fs::create_dir_all(&agent.state_dir).expect("state");
    std::fs::set_permissions(&agent.state_dir, std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    std::os::unix::fs::symlink(&victim, agent.state_dir.join(".state.json.tmp")).expect("plant");
    std::os::unix::fs::symlink(&victim, agent.state_dir.join("tasks.json")).expect("plant");
    let log = refused_start(&mut agent);
    let state = agent.state_dir.display().to_string();
    assert!(
        log.contains(&state) && log.contains("writable by group or others"),
        "the refusal names the path and what is wrong:\n{log}"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    let mode = std::fs::metadata(&victim)
        .expect("victim")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644, "the victim's mode was changed");
    let dir_mode = std::fs::metadata(&agent.state_dir)
        .expect("state")
        .permissions()
        .mode();
    assert_eq!(
        dir_mode & 0o7777,
        0o777,
        "the directory was 'fixed' instead of refused"
    );
}

#[test]
fn a_lock_symlink_planted_in_scratch_is_refused_not_followed() {
    let world = World::new();
    let victim = world.dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut agent = world.agent("esx-01", AgentOptions::default());
    std::fs::create_dir_all(&agent.scratch).expect("scratch");
    std::fs::set_permissions(&agent.scratch, std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    std::os::unix::fs::symlink(&victim, agent.scratch.join("lock")).expect("plant");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&agent.scratch.join("lock").display().to_string()) && log.contains("symlink"),
        "{log}"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    let mode = std::fs::metadata(&victim)
        .expect("victim")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
}

#[test]
fn scratch_under_a_parent_owned_by_another_user_is_refused() {
    let world = World::new();
    let parent = world.dir.path().join("user-owned");
    std::fs::create_dir_all(&parent).expect("parent");
    nix::unistd::chown(&parent, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            scratch: Some(parent.join("scratch")),
            ..AgentOptions::default()
        },
    );
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&parent.display().to_string()) && log.contains("owned by uid 65534"),
        "{log}"
    );
    assert!(!parent.join("scratch").exists(), "nothing created under it");
}

// ---- item 7 -------------------------------------------------------------------------------

/// An image of one component whose VIB descriptors (signed by the world's vendor key) declare
/// the given sizes; the bytes behind them do not matter, nothing may be fetched.
fn image_declaring(world: &World, sizes: &[u64]) -> Envelope {
    let vibs = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let descriptor = VibDescriptor {
                name: format!("huge-{i}").parse().expect("name"),
                version: "1.0".into(),
                vendor: "acme".into(),
                component: "Huge".parse().expect("name"),
                component_version: "1.0".into(),
                acceptance: AcceptanceLevel::Partner,
                kind: VibKind::Software,
                target: VibTarget::Host,
                sha256: Digest::of(format!("huge-{i}").as_bytes()),
                size,
                maintenance_mode: true,
                reboot_required: true,
            };
            Envelope::sign(
                vibstage_protocol::VIB_PAYLOAD_TYPE,
                serde_json::to_vec(&descriptor).expect("json"),
                &world.vendor_key,
            )
        })
        .collect();
    let image = Image {
        name: "huge".parse().expect("name"),
        serial: 1,
        expires: OffsetDateTime::now_utc() + time::Duration::days(1),
        base_image: "8.0.2-0.20".into(),
        components: vec![Component {
            name: "Huge".parse().expect("name"),
            version: "1.0".into(),
            vibs,
        }],
    };
    Envelope::sign(
        vibstage_protocol::IMAGE_PAYLOAD_TYPE,
        serde_json::to_vec(&image).expect("json"),
        &world.image_key,
    )
}

#[test]
fn declared_sizes_that_overflow_when_added_are_refused_before_any_byte_is_written() {
    let world = World::new();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    for sizes in [
        vec![1u64 << 63, 1u64 << 63],
        vec![u64::MAX, 1],
        vec![1u64 << 63],
    ] {
        world.depot.clear_log();
        let image = image_declaring(&world, &sizes);
        let r = agent.stage(&image, &world.depot.url());
        let error = if r.status == 202 {
            let id = r.json["task"]["id"].as_str().expect("id").to_owned();
            let done = agent.wait_task(&id, 30);
            assert_eq!(done["state"], "failed", "{sizes:?}: {done}");
            done["error"].clone()
        } else {
            r.json["error"].clone()
        };
        assert_eq!(error["code"], "insufficient_space", "{sizes:?}: {error}");
        assert!(
            world.depot.requests().is_empty(),
            "{sizes:?}: the depot was asked"
        );
        assert!(blobs_in(&agent.scratch).is_empty());
        for store in [agent.scratch.clone(), agent.home.join("volatile")] {
            let ingest = std::fs::read_dir(store.join("ingest")).map_or(0, |d| d.count());
            assert_eq!(
                ingest,
                0,
                "{sizes:?}: a partial file in {}",
                store.display()
            );
        }
    }
}

// ---- item 8 -------------------------------------------------------------------------------

#[test]
fn depot_password_never_reaches_tasks_or_logs() {
    let world = World::new();
    let digests = world.add_vibs(&[VibFile::software("esx-base", 50_000)]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    world.depot.fault(
        &Depot::vib_path(&digests[0]),
        Fault::Status(503),
        usize::MAX,
    );
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            retries: Some(1),
            readers: vec!["reader".into()],
            ..AgentOptions::default()
        },
    );
    agent.start();
    let depot = world
        .depot
        .url()
        .replacen("https://", "https://ops:s3cret-pw@", 1);
    let id = started_task(&agent.stage(&image, &depot));
    let done = agent.wait_task(&id, 60);
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "depot_unreachable", "{done}");
    let tasks = agent.request("GET", "/v1/tasks", None).body;
    let status = agent.request("GET", "/v1/status", None).body;
    let metrics = agent.request("GET", "/metrics", None).body;
    // A refused URL (http is off) is echoed in the refusal: without the password too.
    let refused = agent.stage(&image, "http://ops:s3cret-pw@127.0.0.1:9/");
    assert_eq!(refused.status, 400, "{}", refused.body);
    for (what, text) in [
        ("task", done.to_string()),
        ("task list", tasks),
        ("status", status),
        ("metrics", metrics),
        ("refusal", refused.body),
        ("log", agent.log_text()),
    ] {
        assert!(
            !text.contains("s3cret-pw"),
            "the password is in the {what}:\n{text}"
        );
    }
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(
                &world
                    .depot
                    .url()
                    .trim_end_matches('/')
                    .replace("https://", "")
            ),
        "the message still names the depot: {done}"
    );
}

// ---- a second outside review (black-box, after issues 11–18) --------------------------------

/// A started-then-stopped agent, so that its store's layout exists to plant things in.
fn agent_with_layout(world: &World, opts: AgentOptions) -> AgentProc {
    let mut agent = world.agent("esx-01", opts);
    agent.start();
    agent.terminate(Duration::from_secs(10));
    agent
}

#[test]
fn a_hard_link_planted_as_a_partial_download_never_writes_the_file_it_links_to() {
    let world = World::new();
    let digests = world.add_vibs(&[
        VibFile::software("esx-base", 300_000),
        VibFile::software("esx-ui", 50_000),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = agent_with_layout(&world, AgentOptions::default());
    let victim = world.dir.path().join("victim.conf");
    std::fs::write(&victim, b"root's precious config").expect("victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let ingest = agent.scratch.join("ingest");
    std::fs::hard_link(&victim, ingest.join(format!("{}.partial", digests[0]))).expect("link");
    // And a directory where the other VIB's partial would go.
    std::fs::create_dir(ingest.join(format!("{}.partial", digests[1]))).expect("dir");
    agent.start();
    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"root's precious config"
    );
    let meta = std::fs::metadata(&victim).expect("victim");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o644,
        "the victim was chmodded"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&meta),
        1,
        "still linked from scratch"
    );
    for (name, ok) in agent.blobs() {
        assert!(ok, "blob {name} holds wrong bytes");
    }
}

#[test]
fn a_symlink_planted_as_an_image_record_does_not_keep_the_agent_from_starting() {
    let world = World::new();
    let mut agent = agent_with_layout(&world, AgentOptions::default());
    let record = agent
        .scratch
        .join(format!("images/sha256:{}.json", "ab".repeat(32)));
    std::os::unix::fs::symlink("/etc/passwd", &record).expect("plant");
    agent.start();
    assert_eq!(agent.request("GET", "/v1/staged", None).status, 200);
    assert!(
        std::fs::symlink_metadata(&record).is_err(),
        "the link is still where a record belongs"
    );
}

#[test]
fn killed_while_entering_maintenance_mode_the_agent_knows_it_may_be_in_it() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 50_000)]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let log = world.dir.path().join("hooks.log");
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            extra: format!(
                r#"
[maintenance]
enter = ["sh", "-c", "echo enter-start >> {log}; sleep 2; echo enter-done >> {log}"]
exit = ["sh", "-c", "echo exit >> {log}"]
timeout_secs = 20
"#,
                log = log.display()
            ),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let r = agent.request(
        "POST",
        "/v1/remediate",
        Some(&json!({"image": image, "depot": world.depot.url()})),
    );
    started_task(&r);
    wait_until(Duration::from_secs(30), "the enter hook to start", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("enter-start"))
    });
    agent.kill9();
    agent.start();
    let status = agent.status();
    assert_eq!(
        status["maintenance"]["active"], true,
        "the enter hook may have finished without the agent: {status}"
    );
    let done = remediate(&agent, &image, &world.depot.url());
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(agent.status()["maintenance"]["active"], false);
    let hooks = std::fs::read_to_string(&log).expect("log");
    assert_eq!(hooks.lines().last(), Some("exit"), "{hooks}");
}

fn check_config(agent: &AgentProc) -> (bool, String) {
    let out = std::process::Command::new(vibstage_e2e::vibstaged())
        .arg("--config")
        .arg(&agent.config)
        .arg("--check-config")
        .output()
        .expect("vibstaged");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_refuses_what_could_never_work_and_never_reads_for_ever() {
    let world = World::new();
    let agent = world.agent("esx-01", AgentOptions::default());
    let original = std::fs::read_to_string(&agent.config).expect("config");
    let image_pub = world.dir.path().join("image.pub").display().to_string();
    let big = world.dir.path().join("big.pub");
    std::fs::write(&big, vec![b'A'; 2 << 20]).expect("big");
    for (change, expect) in [
        (
            original.replace(&image_pub, "/dev/zero"),
            "not a regular file",
        ),
        (
            original.replace(&image_pub, &big.display().to_string()),
            "larger than",
        ),
        (
            original.replace("threshold = 1\n", "threshold = 2\n"),
            "trust.threshold",
        ),
        (
            original.replace(
                &format!(
                    "volatile_path = \"{}\"",
                    agent.home.join("volatile").display()
                ),
                &format!("volatile_path = \"{}\"", agent.scratch.display()),
            ),
            "scratch.volatile_path",
        ),
    ] {
        assert_ne!(change, original, "the change did not apply");
        std::fs::write(&agent.config, &change).expect("config");
        let (ok, stderr) = check_config(&agent);
        assert!(!ok && stderr.contains(expect), "{expect}: {stderr}");
    }
}

#[test]
fn a_socket_directory_others_can_write_is_refused() {
    let world = World::new();
    let mut agent = world.agent("esx-01", AgentOptions::default());
    let shared = world.dir.path().join("run-shared");
    std::fs::create_dir(&shared).expect("dir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let config = std::fs::read_to_string(&agent.config)
        .expect("config")
        .replace(
            &agent.socket.display().to_string(),
            &shared.join("api.sock").display().to_string(),
        );
    std::fs::write(&agent.config, config).expect("config");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&shared.display().to_string()) && log.contains("writable by group or others"),
        "{log}"
    );
}

//! Filesystem and clock faults (issue 8; SPEC §2 expiry and rollback, §7, R9, R11).
//!
//! - ENOSPC mid-write on a tmpfs is `space.rs` (issue 3):
//!   `disk_filling_up_mid_download_is_insufficient_space_and_keeps_earlier_staged_content`.
//! - Read-only scratch (a bind mount of it over itself, made read-only under the running agent,
//!   which `remount,ro` of a filesystem with files open for writing cannot): staging fails with a
//!   clear `internal` error naming the file and the cause, the agent keeps serving, and staging
//!   works again once the filesystem is writable; an agent started on read-only scratch refuses to
//!   start and says why.
//! - Read-only state directory (a read-only bind mount over it): requests that must persist state
//!   are refused with `internal`, nothing else breaks, and it recovers when writable.
//! - The scratch directory removed under a running agent: errors are reported, the agent does not
//!   crash, and staging works again once it is re-created (by the agent itself) or after a restart.
//! - A corrupt or empty state file and task file: moved aside as `.broken`, the state rebuilt from
//!   disk: staged content still listed, and rollback protection kept from what is staged.
//! - The clock passing an image's `expires` while it is staged (an expiry a few seconds ahead,
//!   not a changed system clock): staging, remediation and checks then refuse it with
//!   `image_expired`, also for a task resumed after a restart.
//!
//! Mounting needs root (CI runs as root); without it those tests are skipped with a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vibstage_e2e::{AgentOptions, AgentProc, Depot, Fault, VibFile, World};

/// A read-only bind mount made by the test, lazily unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn run(args: &[&str], dir: &Path) -> Option<()> {
        let out = Command::new("mount")
            .args(args)
            .arg(dir)
            .output()
            .expect("run mount");
        if out.status.success() {
            return Some(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root ({})", stderr.trim());
            return None;
        }
        panic!("mount {args:?} {} failed as root: {stderr}", dir.display());
    }

    /// A read-only bind mount of `dir` over itself.
    fn read_only_bind(dir: &Path) -> Option<Mount> {
        let src = dir.display().to_string();
        Mount::run(&["--bind", &src], dir)?;
        let mount = Mount {
            dir: dir.to_owned(),
        };
        Mount::run(&["-o", "remount,bind,ro"], dir)?;
        Some(mount)
    }

    fn remount(&self, opts: &str) {
        Mount::run(&["-o", opts], &self.dir).expect("remount");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn world() -> World {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 300_000),
        VibFile::software("esx-ui", 200_000),
    ]);
    world
}

fn start_stage(agent: &AgentProc, image: &vibstage_protocol::Envelope, depot: &str) -> String {
    let r = agent.stage(image, depot);
    assert_eq!(r.status, 202, "stage: {}", r.body);
    r.json["task"]["id"].as_str().expect("task id").to_owned()
}

fn expect_error(reply: &vibstage_e2e::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.json["error"]["code"], code, "{}", reply.body);
}

fn healthy(agent: &AgentProc) {
    assert_eq!(agent.request("GET", "/healthz", None).status, 200);
}

#[test]
fn read_only_scratch_fails_staging_clearly_and_recovers_when_writable() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            volatile: Some(String::new()),
            ..AgentOptions::default()
        },
    );
    agent.start();
    // Bound after the agent opened its lock file: the bind mount has no writers, so it can be
    // made read-only under the running agent.
    let Some(mount) = Mount::read_only_bind(&agent.scratch) else {
        return;
    };

    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["error"]["code"], "internal", "{task}");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Read-only file system") && message.contains("/ingest/"),
        "the error names the file and the cause: {message}"
    );
    let status = agent.status();
    assert_eq!(status["staging"]["state"], "failed", "{status}");
    assert_eq!(status["staging"]["staged"], false, "{status}");
    assert!(agent.blobs().is_empty());
    healthy(&agent);

    mount.remount("remount,bind,rw");
    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(agent.blobs().len(), 2);
    assert!(agent.blobs().iter().all(|(_, ok)| *ok));

    // An agent cannot start on read-only scratch, and says why.
    agent.kill9();
    mount.remount("remount,bind,ro");
    agent.spawn();
    let exit = agent
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("agent started on read-only scratch\n{}", agent.log_text()));
    assert!(!exit.success(), "{exit}");
    let log = agent.log_text();
    assert!(
        log.contains("cannot open the staging store") && log.contains("Read-only file system"),
        "{log}"
    );
    // Writable again: it starts, and what was staged is still there.
    mount.remount("remount,bind,rw");
    agent.start();
    assert_eq!(agent.status()["staging"]["staged"], true);
}

#[test]
fn read_only_state_directory_refuses_what_must_be_persisted_and_recovers() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    let Some(mount) = Mount::read_only_bind(&agent.state_dir) else {
        return;
    };
    let refused = agent.stage(&image, &world.depot.url());
    expect_error(&refused, 500, "internal");
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("failed to save agent state") && m.contains("Read-only")),
        "{}",
        refused.body
    );
    let check = agent.request(
        "POST",
        "/v1/compliance/check",
        Some(&json!({"image": image})),
    );
    expect_error(&check, 500, "internal");
    assert!(
        agent.blobs().is_empty(),
        "nothing staged without persisted state"
    );
    assert_eq!(agent.request("GET", "/v1/status", None).status, 200);
    healthy(&agent);

    mount.remount("remount,bind,rw");
    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    drop(mount);
    // What was persisted survives a restart.
    agent.kill9();
    agent.start();
    assert_eq!(agent.status()["staging"]["staged"], true);
}

#[test]
fn scratch_removed_under_a_running_agent_is_reported_and_staging_recovers() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    assert_eq!(
        agent.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    std::fs::remove_dir_all(&agent.scratch).expect("rm scratch");

    // Status still answers, and says what is wrong.
    let status = agent.request("GET", "/v1/status", None);
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.json["staging"]["staged"], false, "{}", status.body);
    let notes = status.json["compliance"]["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        notes.iter().any(|n| n["code"] == "scratch_unavailable"
            && n["message"]
                .as_str()
                .is_some_and(|m| m.contains("No such file"))),
        "{}",
        status.body
    );
    // Nothing is staged any more, and the list says so.
    let staged = agent.request("GET", "/v1/staged", None);
    assert_eq!(staged.status, 200, "{}", staged.body);
    assert_eq!(staged.json["staged"], json!([]));
    for path in ["/metrics", "/v1/tasks", "/healthz"] {
        assert_eq!(agent.request("GET", path, None).status, 200, "{path}");
    }

    // Staging re-creates the layout (0700) and its lock, and works without a restart.
    let newer = world.image("esx-8.0u2", 2, &["ESXi=8.0.2-0.20"]);
    let task = agent.stage_and_wait(&newer, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}\n{}", agent.log_text());
    assert_eq!(agent.blobs().len(), 2);
    assert!(agent.blobs().iter().all(|(_, ok)| *ok));
    assert_eq!(agent.status()["staging"]["staged"], true);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&agent.scratch)
            .expect("scratch")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    // The re-created directory is locked again: a second agent is refused.
    let mut second = world.agent(
        "esx-02",
        AgentOptions {
            scratch: Some(agent.scratch.clone()),
            ..AgentOptions::default()
        },
    );
    second.spawn();
    let exit = second
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("second agent runs on the same scratch"));
    assert!(!exit.success());
    assert!(
        second.log_text().contains("locked"),
        "{}",
        second.log_text()
    );

    // Removed while the agent is down: a restart starts from an empty store.
    agent.kill9();
    std::fs::remove_dir_all(&agent.scratch).expect("rm scratch");
    agent.start();
    assert_eq!(
        agent.request("GET", "/v1/staged", None).json["staged"],
        json!([])
    );
    let newest = world.image("esx-8.0u2", 3, &["ESXi=8.0.2-0.20"]);
    assert_eq!(
        agent.stage_and_wait(&newest, &world.depot.url())["state"],
        "succeeded"
    );
}

/// Stages serial 5, kills the agent, replaces `file` in the state directory with `content`, and
/// restarts: the file is moved aside, staged content is still listed.
fn restart_with_broken(file: &str, content: &[u8]) -> (World, AgentProc) {
    let world = world();
    let image = world.image("esx-8.0u2", 5, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    assert_eq!(
        agent.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    agent.kill9();
    std::fs::write(agent.state_dir.join(file), content).expect("break file");
    agent.start();
    let aside = agent.state_dir.join(format!("{file}.broken"));
    assert_eq!(
        std::fs::read(&aside).unwrap_or_else(|e| panic!("{}: {e}", aside.display())),
        content,
        "the broken file is kept aside for the operator"
    );
    assert!(
        agent.log_text().contains("corrupt"),
        "the log says what happened:\n{}",
        agent.log_text()
    );
    let staged = agent.request("GET", "/v1/staged", None);
    assert_eq!(staged.status, 200);
    assert_eq!(
        staged.json["staged"].as_array().map(Vec::len),
        Some(1),
        "staged content still listed: {}",
        staged.body
    );
    assert_eq!(agent.status()["staging"]["staged"], true);
    (world, agent)
}

#[test]
fn corrupt_state_file_keeps_rollback_protection_from_staged_records() {
    let (world, agent) = restart_with_broken("state.json", b"{\"serials\": {\"esx-8.0u2\": ");
    let older = world.image("esx-8.0u2", 4, &["ESXi=8.0.2-0.20"]);
    expect_error(
        &agent.stage(&older, &world.depot.url()),
        422,
        "rollback_refused",
    );
    // The state file is whole again.
    let text = std::fs::read_to_string(agent.state_dir.join("state.json")).expect("state");
    assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
}

#[test]
fn empty_state_file_keeps_rollback_protection_from_staged_records() {
    let (world, agent) = restart_with_broken("state.json", b"");
    let older = world.image("esx-8.0u2", 4, &["ESXi=8.0.2-0.20"]);
    expect_error(
        &agent.stage(&older, &world.depot.url()),
        422,
        "rollback_refused",
    );
    let same = world.image("esx-8.0u2", 5, &["ESXi=8.0.2-0.20"]);
    let r = agent.stage(&same, &world.depot.url());
    assert!(r.status == 202 || r.status == 200, "{}", r.body);
}

#[test]
fn corrupt_task_file_is_moved_aside_and_work_continues() {
    let (world, agent) = restart_with_broken("tasks.json", b"[{\"task\": 7}");
    let tasks = agent.request("GET", "/v1/tasks", None);
    assert_eq!(tasks.status, 200);
    assert_eq!(tasks.json["tasks"], json!([]));
    let newer = world.image("esx-8.0u2", 6, &["ESXi=8.0.2-0.20"]);
    assert_eq!(
        agent.stage_and_wait(&newer, &world.depot.url())["state"],
        "succeeded"
    );
    let text = std::fs::read_to_string(agent.state_dir.join("tasks.json")).expect("tasks");
    assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
}

/// Waits until the wall clock is past `t` (the condition is the clock itself, not a guess).
fn wait_past(t: time::OffsetDateTime) {
    while time::OffsetDateTime::now_utc() <= t {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_image_that_expires_while_staged_is_refused_with_image_expired() {
    let world = World::new();
    let hexes = world.add_vibs(&[
        VibFile::software("esx-base", 300_000),
        VibFile {
            component: "Tools".into(),
            version: "1.0".into(),
            ..VibFile::software("tools", 400_000)
        },
    ]);
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(10);
    let image = world.image_expiring("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"], expires);
    let other = world.image_expiring("tools", 1, &["Tools=1.0"], expires);
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            timeout_secs: Some(30),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let url = world.depot.url();
    assert_eq!(agent.stage_and_wait(&image, &url)["state"], "succeeded");

    // A second image is being staged when the agent dies; it expires before the restart.
    world.depot.fault(
        &Depot::vib_path(&hexes[1]),
        Fault::Stall {
            after: 100_000,
            for_: Duration::from_secs(60),
        },
        1,
    );
    let id = start_stage(&agent, &other, &url);
    let deadline = Instant::now() + Duration::from_secs(20);
    while world.depot.count(&Depot::vib_path(&hexes[1])) == 0 {
        assert!(Instant::now() < deadline, "download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill9();
    wait_past(expires);
    agent.start();
    let task = agent.wait_task(&id, 30);
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["error"]["code"], "image_expired", "{task}");

    // The staged image is still listed, but nothing more is done with it.
    let staged = agent.request("GET", "/v1/staged", None).json;
    assert_eq!(
        staged["staged"].as_array().map(Vec::len),
        Some(1),
        "{staged}"
    );
    expect_error(&agent.stage(&image, &url), 422, "image_expired");
    let remediate = agent.request(
        "POST",
        "/v1/remediate",
        Some(&json!({"image": image, "depot": url})),
    );
    expect_error(&remediate, 422, "image_expired");
    let check = agent.request(
        "POST",
        "/v1/compliance/check",
        Some(&json!({"image": image})),
    );
    expect_error(&check, 422, "image_expired");
    let status = agent.status();
    assert_eq!(status["maintenance"]["active"], false, "{status}");
    assert!(status["installed"]["image"].is_null(), "{status}");
}

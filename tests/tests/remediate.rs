//! Remediation end to end (issue 5): hooks prove the order of events; failures leave the truth.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vibstage_e2e::{AgentOptions, AgentProc, Depot, VibFile, World};

fn world() -> World {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 300_000),
        VibFile::software("esx-ui", 100_000),
        VibFile::firmware("bios", "dell", 50_000),
    ]);
    world
}

/// Hooks that append to `log`: enter/exit write their name and how many blobs are staged,
/// install writes the VIB paths it was given (and fails while `fail` exists).
fn hooks(world: &World, log: &Path, fail: &Path, install_sleep: u32) -> String {
    let scratch_count = "$(ls SCRATCH/blobs/sha256 | wc -l)";
    let _ = world;
    format!(
        r#"
[maintenance]
enter = ["sh", "-c", "echo enter {scratch_count} >> {log}"]
exit = ["sh", "-c", "echo exit >> {log}"]
timeout_secs = 20

[install]
command = ["sh", "-c", "sleep {install_sleep}; test ! -e {fail} || exit 3; echo install $# >> {log}", "install"]
"#,
        log = log.display(),
        fail = fail.display(),
    )
}

fn agent_with_hooks(
    world: &World,
    name: &str,
    install_sleep: u32,
    opts: AgentOptions,
) -> (AgentProc, std::path::PathBuf, std::path::PathBuf) {
    let log = world.dir.path().join(format!("{name}-hooks.log"));
    let fail = world.dir.path().join(format!("{name}-fail"));
    let mut extra = hooks(world, &log, &fail, install_sleep);
    let agent = world.agent(
        name,
        AgentOptions {
            extra: String::new(),
            ..opts
        },
    );
    extra = extra.replace("SCRATCH", &agent.scratch.display().to_string());
    agent.merge_config(&extra);
    (agent, log, fail)
}

fn remediate(
    agent: &AgentProc,
    image: &vibstage_protocol::Envelope,
    depot: &str,
) -> serde_json::Value {
    let r = agent.request(
        "POST",
        "/v1/remediate",
        Some(&json!({"image": image, "depot": depot})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json["task"]["id"].as_str().expect("id").to_owned();
    agent.wait_task(&id, 120)
}

#[test]
fn full_remediation_orders_staging_enter_install_exit_and_ends_compliant() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20", "BIOS=2.1"]);
    let (mut agent, log, _fail) = agent_with_hooks(&world, "esx-01", 0, AgentOptions::default());
    agent.start();
    let task = remediate(&agent, &image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}\n{}", agent.log_text());
    // Firmware of an unlisted vendor was fetched by remediation itself (R6): 3 blobs staged
    // before enter; install got the 3 VIB paths; exit came last.
    let events = std::fs::read_to_string(&log).expect("hook log");
    assert_eq!(
        events.lines().collect::<Vec<_>>(),
        ["enter 3", "install 3", "exit"],
        "{events}"
    );
    let status = agent.status();
    assert_eq!(status["compliance"]["status"], "compliant", "{status}");
    assert_eq!(status["maintenance"]["active"], false);
    assert_eq!(
        status["installed"]["image"]["digest"],
        task["image"]["digest"]
    );
    assert_eq!(status["installed"]["reboot_required"], true);
    // Nothing is needed any more: nothing staged, nothing missing.
    assert_eq!(status["staging"]["state"], "none", "{status}");
    assert_eq!(status["staging"]["staged"], true);
    assert_eq!(status["staging"]["software"], "staged");
    assert_eq!(status["staging"]["bytes"], 0);
    let staged = agent.request("GET", "/v1/staged", None).json;
    assert_eq!(
        staged["staged"].as_array().map(Vec::len),
        Some(0),
        "staged content removed: {staged}"
    );

    // R12: staging a compliant host changes nothing.
    world.depot.clear_log();
    let again = agent.stage(&image, &world.depot.url());
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.json["task"].is_null());
    assert_eq!(again.json["notifications"][0]["code"], "already_compliant");
    assert_eq!(world.depot.bytes_served(), 0);

    // The installed image survives a restart.
    agent.kill9();
    agent.start();
    assert_eq!(
        agent.status()["installed"]["image"]["digest"],
        task["image"]["digest"]
    );
}

#[test]
fn builtin_installer_switches_banks_and_deleted_staged_content_is_staged_again() {
    let world = world();
    let digests = world.add_vibs(&[]);
    assert!(digests.is_empty());
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    assert_eq!(
        agent.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );

    // Delete it with `DELETE /v1/staged/{digest}`: remediation stages it again (R10).
    let digest = agent.status()["compliance"]["image"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let del = agent.request("DELETE", &format!("/v1/staged/{digest}"), None);
    assert_eq!(del.status, 200, "{}", del.body);
    assert!(agent.blobs().is_empty());
    world.depot.clear_log();
    let task = remediate(&agent, &image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(
        world
            .depot
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .count(),
        2,
        "both VIBs fetched again"
    );
    let manifest = agent.state_dir.join("bootbank/current/manifest.json");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("manifest")).expect("json");
    assert_eq!(m["image"]["digest"], digest.as_str());
    assert_eq!(
        std::fs::read_dir(agent.state_dir.join("bootbank/current"))
            .expect("bank")
            .count(),
        3
    );
}

#[test]
fn a_blob_removed_by_hand_is_reported_partial_and_staged_again() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent("esx-01", AgentOptions::default());
    agent.start();
    assert_eq!(
        agent.stage_and_wait(&image, &world.depot.url())["state"],
        "succeeded"
    );
    let (victim, _) = agent.blobs().into_iter().next().expect("a blob");
    std::fs::remove_file(agent.scratch.join("blobs/sha256").join(&victim)).expect("rm");
    let status = agent.status();
    assert_eq!(status["staging"]["state"], "partial", "{status}");
    assert_eq!(status["staging"]["staged"], false);
    world.depot.clear_log();
    assert_eq!(
        remediate(&agent, &image, &world.depot.url())["state"],
        "succeeded"
    );
    assert_eq!(world.depot.count(&Depot::vib_path(&victim)), 1);
}

#[test]
fn failed_install_and_failed_enter_leave_staged_content_and_compliance_staged() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let (mut agent, log, fail) = agent_with_hooks(&world, "esx-01", 0, AgentOptions::default());
    agent.start();
    std::fs::write(&fail, "").expect("fail flag");
    let task = remediate(&agent, &image, &world.depot.url());
    assert_eq!(task["state"], "failed");
    assert_eq!(task["error"]["code"], "install_failed", "{task}");
    let status = agent.status();
    assert_eq!(status["compliance"]["status"], "staged", "R8: {status}");
    assert_eq!(status["maintenance"]["active"], false);
    assert!(status["installed"]["image"].is_null());
    assert_eq!(agent.blobs().len(), 2, "staged content kept");
    let events = std::fs::read_to_string(&log).expect("log");
    assert_eq!(
        events.lines().collect::<Vec<_>>(),
        ["enter 2", "exit"],
        "{events}"
    );

    // The next remediation succeeds without downloading again.
    std::fs::remove_file(&fail).expect("unfail");
    world.depot.clear_log();
    assert_eq!(
        remediate(&agent, &image, &world.depot.url())["state"],
        "succeeded"
    );
    assert_eq!(world.depot.bytes_served(), 0);

    // A failing enter command.
    let (mut other, _, _) = agent_with_hooks(&world, "esx-02", 0, AgentOptions::default());
    let config = std::fs::read_to_string(&other.config).expect("config");
    std::fs::write(
        &other.config,
        config.replacen(
            "enter = [\"sh\", \"-c\", \"",
            "enter = [\"sh\", \"-c\", \"exit 4; ",
            1,
        ),
    )
    .expect("config");
    other.start();
    let task = remediate(&other, &image, &world.depot.url());
    assert_eq!(task["error"]["code"], "maintenance_failed", "{task}");
    let status = other.status();
    assert_eq!(status["compliance"]["status"], "staged");
    assert_eq!(status["maintenance"]["active"], false);
}

#[test]
fn sigkill_during_install_then_restart_reports_maintenance_and_next_remediation_completes() {
    let world = world();
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let (mut agent, log, _) = agent_with_hooks(&world, "esx-01", 3, AgentOptions::default());
    agent.start();
    let r = agent.request(
        "POST",
        "/v1/remediate",
        Some(&json!({"image": image, "depot": world.depot.url()})),
    );
    assert_eq!(r.status, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("enter")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never entered maintenance"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    agent.kill9();
    agent.start();
    let status = agent.status();
    assert_eq!(
        status["maintenance"]["active"], true,
        "still in maintenance after the crash: {status}"
    );
    assert!(
        status["installed"]["image"].is_null(),
        "old image (none) still installed"
    );
    let id = r.json["task"]["id"].as_str().expect("id");
    let task = agent.wait_task(id, 10);
    assert_eq!(task["state"], "failed", "{task}");
    assert!(
        task["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("installing"),
        "{task}"
    );

    let task = remediate(&agent, &image, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    let status = agent.status();
    assert_eq!(status["maintenance"]["active"], false);
    assert_eq!(status["compliance"]["status"], "compliant");
    let events = std::fs::read_to_string(&log).expect("log");
    // The first installer outlived the killed agent (as it would without systemd's cgroup kill);
    // maintenance mode was entered once and left once, through the exit command, at the end.
    let lines: Vec<&str> = events.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("enter")).count(),
        1,
        "{events}"
    );
    assert_eq!(
        lines.iter().filter(|l| **l == "exit").count(),
        1,
        "{events}"
    );
    assert_eq!(lines.last(), Some(&"exit"), "{events}");
}

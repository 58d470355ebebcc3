//! `vibstagectl` as a controller (issue 4): real agents over mTLS, exit codes of SPEC §3.

use std::process::{Command, Output};

use serde_json::Value;
use vibstage_e2e::{AgentOptions, AgentProc, VibFile, World, vibstagectl};

fn ctl(world: &World, agents: &[&AgentProc], args: &[&str]) -> Output {
    let mut cmd = Command::new(vibstagectl());
    cmd.arg("--tls-dir").arg(&world.tls_dir);
    for a in agents {
        cmd.arg("--host").arg(a.addr());
    }
    cmd.args(args).output().expect("run vibstagectl")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn controller_checks_stages_two_agents_which_stay_staged_across_restarts() {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 1 << 20),
        VibFile::software("esx-ui", 300_000),
    ]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let image = world.depot_dir.join("images/esx-8.0u2.json");
    let image = image.to_str().expect("utf8");
    let url = world.depot.url();
    let mut a = world.agent("esx-01", AgentOptions::default());
    let mut b = world.agent("esx-02", AgentOptions::default());
    a.start();
    b.start();

    let out = ctl(&world, &[&a, &b], &["--json", "check", "--image", image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_of(&out);
    for agent in [&a, &b] {
        assert_eq!(report[agent.addr()]["status"], "non_compliant", "{report}");
        assert_eq!(report[agent.addr()]["components"][0]["change"], "add");
        assert_eq!(report[agent.addr()]["impact"], "reboot");
    }

    let out = ctl(
        &world,
        &[&a, &b],
        &["stage", "--image", image, "--depot", &url, "--wait"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("succeeded").count(), 2, "{text}");

    let out = ctl(&world, &[&a, &b], &["--json", "status"]);
    let status = json_of(&out);
    for agent in [&a, &b] {
        let s = &status[agent.addr()];
        assert_eq!(s["staging"]["staged"], true, "{s}");
        assert_eq!(s["staging"]["persistent"], true);
        assert_eq!(s["staging"]["bytes"], (1 << 20) + 300_000);
        assert_eq!(s["compliance"]["status"], "staged");
    }

    for agent in [&mut a, &mut b] {
        let (code, took) = agent.terminate(std::time::Duration::from_secs(10));
        assert!(code.success(), "exit {code:?} after {took:?}");
        agent.start();
    }
    let status = json_of(&ctl(&world, &[&a, &b], &["--json", "status"]));
    for agent in [&a, &b] {
        assert_eq!(status[agent.addr()]["staging"]["staged"], true, "{status}");
    }

    world.depot.clear_log();
    let out = ctl(
        &world,
        &[&a, &b],
        &[
            "--json", "stage", "--image", image, "--depot", &url, "--wait",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(world.depot.bytes_served(), 0, "nothing downloaded again");
    let tasks = json_of(&out);
    for agent in [&a, &b] {
        assert_eq!(tasks[agent.addr()]["bytes_downloaded"], 0, "{tasks}");
    }

    // `staged` and `staged rm` through the controller.
    let listed = json_of(&ctl(&world, &[&a], &["--json", "staged"]));
    let digest = listed[a.addr()]["staged"][0]["image"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let out = ctl(&world, &[&a], &["staged", "rm", &digest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(a.blobs().is_empty());
    let out = ctl(&world, &[&a], &["staged", "rm", &digest]);
    assert_eq!(out.status.code(), Some(1), "deleting twice: not found");
}

#[test]
fn exit_codes_follow_the_spec() {
    let world = World::new();
    let digests = world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let image = world.depot_dir.join("images/esx-8.0u2.json");
    let image = image.to_str().expect("utf8");
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();

    // Usage errors: 2.
    let out = Command::new(vibstagectl())
        .args(["stage", "--image"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(vibstagectl())
        .args(["--host", "x", "status"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "--host without --tls-dir");

    // An unreachable host: 3 (the reachable one still answers).
    let dead = "127.0.0.1:1";
    let out = Command::new(vibstagectl())
        .arg("--tls-dir")
        .arg(&world.tls_dir)
        .args(["--host", &a.addr(), "--host", dead, "status"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("esx-01") && text.contains(dead), "{text}");

    // A refused client (another CA's certificate): 3.
    let other = World::new();
    let out = Command::new(vibstagectl())
        .arg("--tls-dir")
        .arg(&other.tls_dir)
        .args(["--host", &a.addr(), "status"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));

    // The operation failing on the host: 1.
    std::fs::remove_file(world.depot_dir.join("vibs").join(&digests[0])).expect("rm");
    let out = ctl(
        &world,
        &[&a],
        &[
            "stage",
            "--image",
            image,
            "--depot",
            &world.depot.url(),
            "--wait",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("depot_unreachable"));

    // The local socket works without any flag but --socket.
    let out = Command::new(vibstagectl())
        .arg("--socket")
        .arg(&a.socket)
        .args(["--json", "tasks"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let tasks = json_of(&out);
    assert_eq!(
        tasks[a.socket.display().to_string()]["tasks"][0]["state"],
        "failed"
    );
}

#[test]
fn remediate_rolls_out_one_host_at_a_time_and_stops_after_max_failures() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let image = world.depot_dir.join("images/esx-8.0u2.json");
    let image = image.to_str().expect("utf8");
    let failing = AgentOptions {
        extra: "[install]\ncommand = [\"false\"]\n".into(),
        ..Default::default()
    };
    let mut bad = world.agent("bad", failing);
    let mut good = world.agent("good", AgentOptions::default());
    bad.start();
    good.start();
    let out = ctl(
        &world,
        &[&bad, &good],
        &[
            "remediate",
            "--image",
            image,
            "--depot",
            &world.depot.url(),
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("install_failed"), "{text}");
    assert!(
        text.contains("skipped"),
        "the second host is not touched: {text}"
    );
    assert!(good.status()["installed"]["image"].is_null());

    // With a higher budget the good host is remediated.
    let out = ctl(
        &world,
        &[&bad, &good],
        &[
            "remediate",
            "--image",
            image,
            "--depot",
            &world.depot.url(),
            "--wait",
            "--max-failures",
            "2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(good.status()["compliance"]["status"], "compliant");
}

//! Issue 17, "the first hour": what a new operator meets — correctness of `staged rm`, errors that
//! say what to do, readable screens.

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

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

/// Item 1: deleting staged content re-evaluates compliance; a host whose staged image is gone is
/// not `staged` any more.
#[test]
fn staged_rm_makes_compliance_non_compliant_again() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    let env = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();
    let task = a.stage_and_wait(&env, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    let s = a.status();
    assert_eq!(s["compliance"]["status"], "staged", "{s}");
    let digest = s["compliance"]["image"]["digest"].as_str().expect("digest").to_owned();

    let out = ctl(&world, &[&a], &["staged", "rm", &digest]);
    assert!(out.status.success(), "{}", text(&out));
    let s = a.status();
    assert_eq!(s["compliance"]["status"], "non_compliant", "{s}");
    assert_eq!(s["staging"]["staged"], false, "{s}");
    // And it stays so across a restart (the re-evaluation is persisted).
    a.terminate(std::time::Duration::from_secs(10));
    a.start();
    let s = json_of(&ctl(&world, &[&a], &["--json", "status"]));
    assert_eq!(s[a.addr()]["compliance"]["status"], "non_compliant", "{s}");
}

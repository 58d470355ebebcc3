//! `vibstagectl demo` (issue 6): the real binary runs the whole flow with a real `vibstaged`, a
//! real HTTPS depot and real files, tells it as a story, and stops its agent on every path.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vibstage_e2e::{vibstagectl, vibstaged};

fn run(exe: &Path, args: &[&str]) -> Output {
    Command::new(exe)
        .args(args)
        .output()
        .expect("run vibstagectl demo")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of `step` in the story (`NN/13 step  ...`).
fn line<'a>(story: &'a str, step: &str) -> &'a str {
    story
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(step))
        .unwrap_or_else(|| panic!("no line for step {step} in:\n{story}"))
}

/// The pids named `(pid N)` in the story.
fn pids(story: &str) -> Vec<i32> {
    story
        .match_indices("(pid ")
        .filter_map(|(i, m)| {
            story[i + m.len()..]
                .split(')')
                .next()
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// Whether a process with this pid still exists (and is not a zombie of ours).
fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn demo_runs_the_whole_flow_and_tells_it_step_by_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo_dir = dir.path().join("demo");
    let out = run(
        &vibstagectl(),
        &["demo", "--dir", demo_dir.to_str().expect("utf8")],
    );
    let (story, stderr) = text(&out);
    assert!(
        out.status.success(),
        "exit {:?}\n{story}\n{stderr}",
        out.status
    );
    for step in [
        "keys",
        "certs",
        "depot",
        "image",
        "serve",
        "agent",
        "check",
        "stage",
        "status",
        "restart",
        "survive",
        "remediate",
        "result",
    ] {
        line(&story, step);
    }
    assert!(line(&story, "check").contains("non_compliant"), "{story}");
    assert!(line(&story, "check").contains("impact reboot"), "{story}");
    assert!(line(&story, "stage").contains("succeeded"), "{story}");
    // Regression (issue 6): right after a stage task succeeded, status said `software staging`
    // because the task was marked finished before it stopped being the running one.
    let status = line(&story, "status");
    assert!(
        status.contains("staged=true (software staged, firmware staged, dpu staged)"),
        "{story}"
    );
    assert!(status.contains("persistent"), "{story}");
    assert!(
        line(&story, "restart").contains("stopped cleanly (exit 0)"),
        "{story}"
    );
    assert!(line(&story, "survive").contains("staged=true"), "{story}");
    let remediate = line(&story, "remediate");
    assert!(
        remediate.contains("succeeded")
            && remediate.contains("entered maintenance mode")
            && remediate.contains("left maintenance mode"),
        "{story}"
    );
    let result = line(&story, "result");
    assert!(
        result.contains("compliant with esx-8.0u2 #1 installed")
            && result.contains("staged content removed"),
        "{story}"
    );
    assert!(story.contains("demo passed"), "{story}");

    // The agent was stopped, and --dir is kept with what the demo made.
    let pids = pids(&story);
    assert_eq!(pids.len(), 3, "two agents and the stopped one: {story}");
    for pid in pids {
        assert!(!alive(pid), "vibstaged pid {pid} still running");
    }
    for kept in [
        "keys/image.pub",
        "tls/ca.pem",
        "depot/images/esx-8.0u2.json",
        "agent/agent.toml",
        "agent/agent.log",
        "agent/state/bootbank",
    ] {
        assert!(demo_dir.join(kept).exists(), "{kept} missing");
    }
    let log = std::fs::read_to_string(demo_dir.join("agent/agent.log")).expect("log");
    assert_eq!(log.matches("vibstaged ready").count(), 2, "{log}");
    assert_eq!(log.matches("stopped").count(), 2, "{log}");
    // Regression (issue 6): vibstaged wrote colour escape codes into files and the journal.
    assert!(
        !log.contains('\x1b'),
        "escape codes in the agent log:\n{log}"
    );
}

#[test]
fn demo_refuses_a_folder_that_is_not_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("precious"), b"keep me").expect("write");
    let out = run(
        &vibstagectl(),
        &["demo", "--dir", dir.path().to_str().expect("utf8")],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not empty"), "{stderr}");
    assert_eq!(
        std::fs::read(dir.path().join("precious")).expect("kept"),
        b"keep me"
    );
}

/// A copy of vibstagectl next to a `vibstaged` wrapper that takes firmware staging away from
/// the host before it starts the real agent: staging then succeeds with `staged=false` (R6), so
/// the demo must fail at its `status` step while the agent runs, and still stop it.
fn sabotaged_demo(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let ctl = bin.join("vibstagectl");
    // A hard link keeps current_exe() in this folder; copy when it cannot be made.
    if std::fs::hard_link(vibstagectl(), &ctl).is_err() {
        std::fs::copy(vibstagectl(), &ctl).expect("copy vibstagectl");
    }
    let wrapper = bin.join("vibstaged");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             sed -i 's/^firmware_staging_vendors = .*/firmware_staging_vendors = []/' \"$2\"\n\
             exec '{}' \"$@\"\n",
            vibstaged().display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    ctl
}

#[test]
fn a_step_that_fails_is_named_the_exit_is_1_and_the_agent_is_stopped() {
    // In the target directory, so that the hard link to vibstagectl can be made.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let ctl = sabotaged_demo(dir.path());
    let demo_dir = dir.path().join("demo");
    let out = run(&ctl, &["demo", "--dir", demo_dir.to_str().expect("utf8")]);
    let (story, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{story}\n{stderr}");
    assert!(
        story.contains("demo FAILED at step status: staged is false"),
        "{story}"
    );
    assert!(story.contains("firmware not_supported"), "{story}");
    assert!(stderr.contains("demo step status failed"), "{stderr}");
    assert!(
        !story.contains("restart"),
        "went on after a failure: {story}"
    );
    let pids = pids(&story);
    assert_eq!(pids.len(), 1, "{story}");
    assert!(!alive(pids[0]), "vibstaged left running after a failure");
    let log = std::fs::read_to_string(demo_dir.join("agent/agent.log")).expect("log kept");
    assert!(log.contains("stopped"), "{log}");
}

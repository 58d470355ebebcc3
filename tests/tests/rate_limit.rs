//! `depot.max_bytes_per_sec` (SPEC §4; issue 16, part 3): one download budget for the whole
//! agent. Only the lower bound is asserted (a busy machine can only make staging slower); how
//! closely the limit holds is a benchmark figure, not a test.

use std::process::Command;
use std::time::{Duration, Instant};

use vibstage_e2e::{AgentOptions, VibFile, World, vibstaged};

#[test]
fn staging_never_goes_faster_than_the_configured_rate() {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 1 << 20),
        VibFile::software("esx-ui", 1 << 20),
    ]);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            extra: String::new(),
            ..AgentOptions::default()
        },
    );
    agent.merge_config("[depot]\nmax_bytes_per_sec = 524288\n");
    agent.start();
    let start = Instant::now();
    let task = agent.stage_and_wait(&image, &world.depot.url());
    let took = start.elapsed();
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["bytes_downloaded"], 2 << 20, "{task}");
    // 2 MiB at 512 KiB/s is 4 s, less the 100 ms burst an idle agent may take at once; both
    // downloads ran together and shared the one budget.
    assert!(
        took >= Duration::from_millis(3_900),
        "2 MiB staged in {took:?} under a 512 KiB/s limit"
    );
}

#[test]
fn a_rate_limit_too_low_to_stage_anything_is_refused_by_check_config() {
    let world = World::new();
    let agent = world.agent("esx-01", AgentOptions::default());
    agent.merge_config("[depot]\nmax_bytes_per_sec = 1000\n");
    let out = Command::new(vibstaged())
        .arg("--config")
        .arg(&agent.config)
        .arg("--check-config")
        .output()
        .expect("vibstaged");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("depot.max_bytes_per_sec") && stderr.contains("65536"),
        "{stderr}"
    );
}

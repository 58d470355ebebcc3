//! The benchmark harness in quick mode (issue 7), so that it cannot rot: every figure runs end to
//! end against nginx and real `vibstaged` processes with small sizes. Nothing about time is
//! asserted; only that each figure produced its row. P1 has six rows whether or not its peers
//! (containerd, aria2c) could be installed: a peer that is not available is a row saying why,
//! which this test prints so that a CI log shows it.

use std::process::Command;

#[test]
fn bench_quick_runs_every_figure_and_prints_the_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_vibstage-bench"))
        .args(["all", "--quick"])
        .output()
        .expect("run vibstage-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vibstage-bench all --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let header = stdout
        .lines()
        .find(|l| l.starts_with("| figure"))
        .unwrap_or_else(|| panic!("no table in:\n{stdout}\n{stderr}"));
    for column in ["vibstage", "baseline", "ratio", "target", "met?"] {
        assert!(header.contains(column), "{header}");
    }
    for (figure, rows) in [
        ("P1", 7),
        ("P2", 2),
        ("P3", 1),
        ("P4", 2),
        ("P5", 1),
        ("P6", 2),
        ("P7", 6),
        ("P8", 3),
        ("S1", 2),
    ] {
        let found = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {figure} ")))
            .count();
        assert_eq!(found, rows, "rows of {figure} in:\n{stdout}\n{stderr}");
    }
    for line in stdout.lines().filter(|l| l.contains("not available")) {
        eprintln!("peer skipped: {line}");
    }
}

#[test]
fn bench_refuses_an_unknown_figure_with_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vibstage-bench"))
        .arg("p9")
        .output()
        .expect("run vibstage-bench");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown figure \"p9\""), "{stderr}");
}

//! The installed controller starts and keeps the exit-code contract of SPEC §3 at the process edge:
//! `--version` succeeds, anything clap refuses exits 2. (This test also makes `cargo test` build
//! `vibstagectl`, which the end-to-end suite in `tests/` drives.)

use std::process::{Command, Output};

fn vibstagectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vibstagectl"))
        .args(args)
        .output()
        .expect("failed to start vibstagectl")
}

#[test]
fn vibstagectl_prints_its_version() {
    let out = vibstagectl(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vibstagectl {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn vibstagectl_usage_errors_exit_2() {
    for args in [
        &["bogus"][..],
        &[],
        &["image", "verify"],
        &["depot", "add", "--depot", "d"],
        &["keygen", "--out", "k", "--parallel", "0"],
    ] {
        let out = vibstagectl(args);
        assert_eq!(out.status.code(), Some(2), "vibstagectl {args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "vibstagectl {args:?} said nothing");
    }
}

//! The installed daemon keeps the exit-code contract of SPEC §3 at the process edge: `--version`
//! succeeds, anything clap refuses exits 2. (This test also makes `cargo test` build `vibstaged`,
//! which the end-to-end suite in `tests/` drives; `ctl/tests/binaries.rs` does the same for
//! `vibstagectl`.)

use std::process::{Command, Output};

fn vibstaged(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vibstaged"))
        .args(args)
        .output()
        .expect("failed to start vibstaged")
}

#[test]
fn vibstaged_prints_its_version() {
    let out = vibstaged(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vibstaged {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn vibstaged_usage_errors_exit_2() {
    for args in [&["bogus"][..], &["--config"], &["--log-format", "xml"]] {
        let out = vibstaged(args);
        assert_eq!(out.status.code(), Some(2), "vibstaged {args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "vibstaged {args:?} said nothing");
    }
}

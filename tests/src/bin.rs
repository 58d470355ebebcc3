//! Locating the real `vibstaged` and `vibstagectl` binaries.
//!
//! Integration tests run from `target/<profile>/deps/`, and cargo puts the
//! workspace's binaries one level up, in `target/<profile>/`. Cargo only exports
//! `CARGO_BIN_EXE_<name>` for binaries of the test's own package, which these are
//! not, so we find them next to the test executable. They must have been built:
//! `cargo test --workspace` builds them before it runs any test.

use std::path::PathBuf;

/// Path of the workspace binary `name` (e.g. `"vibstaged"`) in `target/<profile>/`.
///
/// Panics with a hint if the binary has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe of the test binary");
    let mut dir = exe
        .parent()
        .expect("test binary lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: build it with `cargo test --workspace` \
         (or `cargo build -p vibstage -p vibstage-ctl`)",
        path.display()
    );
    path
}

/// Path of the agent daemon, `vibstaged`.
pub fn vibstaged() -> PathBuf {
    bin("vibstaged")
}

/// Path of the controller tool, `vibstagectl`.
pub fn vibstagectl() -> PathBuf {
    bin("vibstagectl")
}

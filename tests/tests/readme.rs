//! The README's walk-through, run as written (issue 17, item 3): every ```sh block between
//! `<!-- walk-through:begin -->` and `<!-- walk-through:end -->`, in order, in one bash, with
//! only what must differ in a test replaced: the `cargo build` line (the test's own binaries are
//! used instead of `target/release`), the folder `/tmp/vs` (a temporary one) and the ports 8080
//! and 9443 (free ones, since tests run side by side). It must reach a staged host, then a
//! remediated one over mutual TLS.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vibstage_e2e::vibstagectl;

const BEGIN: &str = "<!-- walk-through:begin -->";
const END: &str = "<!-- walk-through:end -->";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repo")
}

/// The walk-through's shell blocks, in order.
fn walk_through_commands(readme: &str) -> String {
    let start = readme
        .find(BEGIN)
        .expect("README has the walk-through's begin marker");
    let end = readme
        .find(END)
        .expect("README has the walk-through's end marker");
    let mut script = String::new();
    let mut in_sh = false;
    for line in readme[start..end].lines() {
        if in_sh {
            if line.trim_end() == "```" {
                in_sh = false;
            } else {
                script.push_str(line);
                script.push('\n');
            }
        } else if line.trim_end() == "```sh" {
            in_sh = true;
        }
    }
    assert!(!in_sh, "an unclosed ```sh block in the walk-through");
    script
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `status` table's rows for `host`, split into columns.
fn rows<'a>(out: &'a str, host: &str) -> Vec<Vec<&'a str>> {
    out.lines()
        .filter(|l| l.starts_with(&format!("{host} ")))
        .map(|l| l.split_whitespace().collect())
        .collect()
}

#[test]
fn readme_walk_through_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let commands = walk_through_commands(&readme);
    for needed in [
        "export PATH=\"$PWD/target/release:$PATH\"",
        "/tmp/vs",
        "8080",
        "9443",
    ] {
        assert!(
            commands.contains(needed),
            "the walk-through no longer has {needed:?}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("vs");
    let bins = vibstagectl()
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let (depot_port, agent_port) = (free_port().to_string(), free_port().to_string());
    let script: String = commands
        .lines()
        .filter(|l| !l.starts_with("cargo "))
        .map(|l| {
            format!("{l}\n")
                .replace("$PWD/target/release", &bins)
                .replace("/tmp/vs", &folder.display().to_string())
                .replace("8080", &depot_port)
                .replace("9443", &agent_port)
        })
        .collect();
    let script =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}");

    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let log = std::fs::read_to_string(folder.join("agent.log")).unwrap_or_default();
    let context = format!("script:\n{script}\nstdout:\n{out}\nstderr:\n{err}\nagent.log:\n{log}");
    assert!(
        status.success(),
        "the walk-through failed ({status}):\n{context}"
    );

    // Staged over the socket: the R5 mark, firmware included.
    let local = rows(&out, "vibstaged.sock");
    assert!(
        local
            .iter()
            .any(|r| r.get(1..4) == Some(&["staged", "true", "staged"][..])),
        "never staged=true:\n{context}"
    );
    assert!(!out.contains("firmware_staging_unsupported"), "{context}");
    // Over mutual TLS: staged, then remediated.
    let remote: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("localhost:"))
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| r.len() > 3 && !r[0].ends_with(':'))
        .collect();
    assert_eq!(remote.len(), 2, "two status rows over mTLS:\n{context}");
    assert_eq!(remote[0][1..3], ["staged", "true"], "{context}");
    assert_eq!(remote[1][1], "compliant", "{context}");
    assert!(out.contains(": succeeded task "), "{context}");
}

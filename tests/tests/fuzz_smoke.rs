//! Fuzzing in the default test suite (issue 8).
//!
//! 1. `seed_corpora_pass_the_fuzz_entry_points`: every file of the seed corpora in
//!    `fuzz/seeds/<target>/` goes through the very functions the cargo-fuzz targets call
//!    (`fuzz/src/entries.rs`, included below).
//!    This always runs, needs no extra tool, and replays any crash input added to the seeds.
//! 2. `cargo_fuzz_short_run`: builds the cargo-fuzz targets and runs each for a few seconds
//!    (`VIBSTAGE_FUZZ_SECS`, default 5) with libFuzzer and AddressSanitizer, on the stable
//!    toolchain with `RUSTC_BOOTSTRAP=1` (cargo-fuzz needs `-Z` flags). cargo-fuzz is taken from
//!    `PATH`, else installed from crates.io into `target/fuzz-tools` (about a minute, once); the
//!    build goes to `target/fuzz` (about 1.5 minutes on 2 cores from clean, seconds after).
//!    `VIBSTAGE_SKIP_CARGO_FUZZ=1` skips this part (e.g. offline), saying so.
//!
//! The long run is in RELIABILITY.md. `VIBSTAGE_REGEN_FUZZ_SEEDS=1` rewrites the seed corpora
//! from the protocol fixtures and the samples below.

use std::path::{Path, PathBuf};
use std::process::Command;

use vibstage::vib;

#[path = "../../fuzz/src/entries.rs"]
mod entries;

const TARGETS: [&str; 4] = ["envelope", "request_body", "config", "vib_reader"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn seeds_dir(target: &str) -> PathBuf {
    root().join("fuzz/seeds").join(target)
}

fn run_entry(target: &str, data: &[u8]) {
    match target {
        "envelope" => entries::envelope(data),
        "request_body" => entries::request_body(data),
        "config" => entries::config(data),
        "vib_reader" => entries::vib_reader(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// The seed corpora: protocol fixtures in each envelope mode, request bodies and configs.
fn generated_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let data = root().join("protocol/tests/data");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&data)
        .expect("protocol fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    fixtures.sort();
    let mut valid = String::new();
    for path in &fixtures {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("fixture name")
            .to_owned();
        let text = std::fs::read(path).expect("fixture");
        if name == "valid-image" {
            valid = String::from_utf8(text.clone()).expect("utf8");
        }
        out.push((
            "envelope",
            format!("env-{name}"),
            [&[0u8][..], &text].concat(),
        ));
        if let Ok(env) = serde_json::from_slice::<vibstage_protocol::Envelope>(&text) {
            out.push((
                "envelope",
                format!("payload-{name}"),
                [&[1u8][..], &env.payload].concat(),
            ));
        }
    }
    let env: vibstage_protocol::Envelope = serde_json::from_str(&valid).expect("valid image");
    let image: serde_json::Value = serde_json::from_slice(&env.payload).expect("payload");
    let vib: vibstage_protocol::Envelope =
        serde_json::from_value(image["components"][0]["vibs"][0].clone()).expect("vib");
    out.push((
        "envelope",
        "vib-esx-base".into(),
        [&[2u8][..], &vib.payload].concat(),
    ));

    let depot = "https://depot.example:8443/esx/";
    let bodies = [
        (
            "stage",
            format!(r#"{{"image": {valid}, "depot": "{depot}"}}"#),
        ),
        ("check", format!(r#"{{"image": {valid}}}"#)),
        (
            "unknown-field",
            format!(r#"{{"image": {valid}, "depot": "{depot}", "force": true}}"#),
        ),
        (
            "duplicate-key",
            format!(r#"{{"depot": "a", "depot": "{depot}", "image": {valid}}}"#),
        ),
        ("wrong-type", format!(r#"{{"image": {valid}, "depot": 7}}"#)),
        (
            "image-not-object",
            r#"{"image": "x", "depot": "https://d/"}"#.to_owned(),
        ),
        ("truncated", format!(r#"{{"image": {valid}"#)),
        ("array", "[1, 2, 3]".to_owned()),
    ];
    for (name, body) in bodies {
        out.push(("request_body", name.into(), body.into_bytes()));
    }

    let full = r#"[agent]
host_id = "esx-01"
acceptance_level = "partner"
state_dir = "/var/lib/vibstage"

[scratch]
path = "/scratch/vibstage"
volatile_path = "/run/vibstage/stage"
reserve_bytes = 268435456
concurrency = 4

[listen]
tcp = "0.0.0.0:9443"
socket = "/run/vibstage/vibstaged.sock"

[tls]
cert = "/etc/vibstage/tls/agent.pem"
key = "/etc/vibstage/tls/agent.key"
client_ca = "/etc/vibstage/tls/controller-ca.pem"
operators = ["controller"]
readers = ["auditor"]

[[trust.keys]]
file = "/etc/vibstage/keys/image.pub"
role = "image"
[[trust.keys]]
file = "/etc/vibstage/keys/vendor.pub"
role = "vib"
max_acceptance = "partner"

[depot]
allow_http = false
ca = ""
timeout_secs = 30
retries = 5

[host]
dpus = ["dpu0"]
firmware_staging_vendors = ["dell"]

[maintenance]
enter = ["/usr/bin/enter-mm"]
exit = ["/usr/bin/exit-mm"]
timeout_secs = 600

[install]
command = []
"#;
    let configs = [
        ("full", full.to_owned()),
        ("empty", String::new()),
        ("unknown-key", "[scratch]\nconcurency = 3\n".to_owned()),
        (
            "relative-state-dir",
            "[agent]\nstate_dir = \"rel\"\n".to_owned(),
        ),
        (
            "bad-level",
            "[agent]\nacceptance_level = \"gold\"\n".to_owned(),
        ),
        (
            "zero-concurrency",
            "[scratch]\nconcurrency = 0\n".to_owned(),
        ),
        ("bad-listen", "[listen]\ntcp = \"nope\"\n".to_owned()),
        (
            "image-key-with-level",
            "[[trust.keys]]\nfile = \"/k\"\nrole = \"image\"\nmax_acceptance = \"partner\"\n"
                .to_owned(),
        ),
        ("empty-command", "[install]\ncommand = [\"\"]\n".to_owned()),
    ];
    for (name, text) in configs {
        out.push(("config", name.into(), text.into_bytes()));
    }

    // Real VIBs and bundles from the tests' builder, valid and broken (issue 14).
    use vibstage_e2e::vibs::{BundleBuild, ComponentBuild, VibBuild};
    let vib = VibBuild::new("acme", "esx-base", "8.0.2-0.20", 3000);
    let bytes = vib.build();
    let mut tampered = bytes.clone();
    let at = tampered.len() - 20;
    tampered[at] ^= 1;
    let bundle = BundleBuild {
        vendor: "acme".into(),
        components: vec![ComponentBuild {
            name: "ESXi".into(),
            version: "8.0.2-0.20".into(),
            vibs: vec![vib.clone()],
        }],
        ..BundleBuild::default()
    }
    .build();
    for (mode, name, data) in [
        (0u8, "vib-valid", &bytes),
        (0, "vib-tampered-payload", &tampered),
        (1, "bundle-valid", &bundle),
        (2, "prefix-valid", &bytes),
    ] {
        out.push(("vib_reader", name.into(), [&[mode][..], data].concat()));
    }
    out
}

#[test]
fn seed_corpora_pass_the_fuzz_entry_points() {
    if std::env::var_os("VIBSTAGE_REGEN_FUZZ_SEEDS").is_some() {
        for target in TARGETS {
            let _ = std::fs::remove_dir_all(seeds_dir(target));
            std::fs::create_dir_all(seeds_dir(target)).expect("seeds dir");
        }
        for (target, name, bytes) in generated_seeds() {
            std::fs::write(seeds_dir(target).join(name), bytes).expect("write seed");
        }
    }
    for target in TARGETS {
        let dir = seeds_dir(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "empty seed corpus {}", dir.display());
        for file in &files {
            let data = std::fs::read(file).expect("seed");
            run_entry(target, &data);
            // Every prefix too: truncated inputs are the commonest hostile ones.
            for cut in (0..data.len()).step_by(data.len() / 64 + 1) {
                run_entry(target, &data[..cut]);
            }
        }
        eprintln!("{target}: {} seed inputs passed", files.len());
    }
    // The generated seeds still pass (they are what the checked-in corpora were made from).
    for (target, _, bytes) in generated_seeds() {
        run_entry(target, &bytes);
    }
}

/// Finds cargo-fuzz on PATH, or installs it into `target/fuzz-tools`.
fn cargo_fuzz() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if Command::new(&cargo)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let which = Command::new("sh")
            .args(["-c", "command -v cargo-fuzz"])
            .output()
            .expect("sh");
        let path = String::from_utf8_lossy(&which.stdout).trim().to_owned();
        if !path.is_empty() {
            return PathBuf::from(path);
        }
    }
    let tools = root().join("target/fuzz-tools");
    let bin = tools.join("bin/cargo-fuzz");
    if bin.is_file() {
        return bin;
    }
    eprintln!("installing cargo-fuzz into {}", tools.display());
    let status = Command::new(&cargo)
        .args(["install", "--locked", "cargo-fuzz", "--root"])
        .arg(&tools)
        .status()
        .expect("run cargo install");
    assert!(
        status.success(),
        "cargo install cargo-fuzz failed ({status}); set VIBSTAGE_SKIP_CARGO_FUZZ=1 to skip the \
         cargo-fuzz run (the seed corpora still run in seed_corpora_pass_the_fuzz_entry_points)"
    );
    bin
}

#[test]
fn cargo_fuzz_short_run() {
    if std::env::var_os("VIBSTAGE_SKIP_CARGO_FUZZ").is_some() {
        eprintln!("skipped: VIBSTAGE_SKIP_CARGO_FUZZ is set");
        return;
    }
    let secs: u64 = std::env::var("VIBSTAGE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let fuzz = cargo_fuzz();
    let fuzz_dir = root().join("fuzz");
    let target_dir = root().join("target/fuzz");
    let work = tempfile::tempdir().expect("tempdir");
    let fuzz_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&fuzz);
        cmd.arg("fuzz")
            .args(args)
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS");
        cmd
    };
    let built = fuzz_cmd(&["build", "--target-dir"])
        .arg(&target_dir)
        .status()
        .expect("run cargo fuzz build");
    assert!(built.success(), "cargo fuzz build failed ({built})");
    for target in TARGETS {
        let corpus = work.path().join(target);
        std::fs::create_dir_all(&corpus).expect("corpus");
        // Crash inputs outlive the test: target/fuzz/artifacts/<target>/.
        let artifacts = target_dir.join("artifacts").join(target);
        std::fs::create_dir_all(&artifacts).expect("artifacts");
        let out = fuzz_cmd(&["run", target, "--target-dir"])
            .arg(&target_dir)
            .arg(&corpus)
            .arg(seeds_dir(target))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .output()
            .expect("run cargo fuzz run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let done = stderr
            .lines()
            .filter(|l| l.starts_with("Done ") || l.starts_with("stat::number_of_executed_units"))
            .collect::<Vec<_>>()
            .join("; ");
        assert!(
            out.status.success(),
            "fuzz target {target} failed ({}); crash inputs in {}:\n{}",
            out.status,
            artifacts.display(),
            stderr
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        eprintln!("fuzz target {target}: {done}");
    }
}

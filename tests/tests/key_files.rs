//! Key and certificate files as other tools read them (issue 11, items 9, 11 and 12).
//!
//! Every private key vibstagectl writes (`keygen`, `certs init`, `demo`) must load in OpenSSL
//! 3.0 (`openssl pkey`) and, where it is installed, Python `cryptography`: PKCS#8 v1, not v2.
//! Development certificates live at most 397 days, backdating included, unless `--days` says
//! otherwise. `vibstaged --check-config` refuses a weak trust key and says so when a trust key
//! file holds more than one key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vibstage_e2e::{AgentOptions, World, vibstagectl, vibstaged};

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every file under `dir` whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Whether a Python with `cryptography` is on the machine.
fn python_cryptography() -> bool {
    Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Loads a private key with OpenSSL (and Python `cryptography` when present).
fn assert_private_key_loads(key: &Path, python: bool) {
    let openssl = Command::new("openssl")
        .args(["pkey", "-noout", "-in", s(key)])
        .output()
        .expect("openssl on PATH");
    ok(&openssl, &format!("openssl pkey -in {}", key.display()));
    if python {
        let script = "import sys\nfrom cryptography.hazmat.primitives.serialization import load_pem_private_key\nload_pem_private_key(open(sys.argv[1], 'rb').read(), password=None)\n";
        let py = Command::new("python3")
            .args(["-c", script, s(key)])
            .output()
            .expect("python3");
        ok(&py, &format!("python cryptography on {}", key.display()));
    }
}

#[test]
fn every_private_key_vibstagectl_writes_loads_in_openssl_and_python_cryptography() {
    let dir = tempfile::tempdir().expect("tempdir");
    let python = python_cryptography();
    let ctl = vibstagectl();

    let prefix = dir.path().join("keys/image");
    ok(&run(&ctl, &["keygen", "--out", s(&prefix)]), "keygen");
    let certs = dir.path().join("certs");
    ok(
        &run(
            &ctl,
            &["certs", "init", "--dir", s(&certs), "--host", "esx1"],
        ),
        "certs init",
    );
    let demo = dir.path().join("demo");
    ok(&run(&ctl, &["demo", "--dir", s(&demo)]), "demo");

    let keys = files_ending(dir.path(), ".key");
    for expected in [
        "keys/image.key",
        "certs/ca.key",
        "certs/esx1.key",
        "certs/client.key",
    ] {
        assert!(
            keys.contains(&dir.path().join(expected)),
            "{expected} missing from {keys:?}"
        );
    }
    let demo_keys = keys.iter().filter(|k| k.starts_with(&demo)).count();
    assert!(demo_keys >= 4, "demo wrote only {demo_keys} keys: {keys:?}");
    for key in &keys {
        assert_private_key_loads(key, python);
    }
    for public in files_ending(dir.path(), ".pub") {
        let out = Command::new("openssl")
            .args(["pkey", "-pubin", "-noout", "-in", s(&public)])
            .output()
            .expect("openssl");
        ok(
            &out,
            &format!("openssl pkey -pubin -in {}", public.display()),
        );
    }
    eprintln!(
        "{} private keys loaded by openssl{}",
        keys.len(),
        if python {
            " and python cryptography"
        } else {
            ""
        }
    );
}

/// `notBefore` and `notAfter` of a certificate, as `openssl x509` prints them.
fn dates(cert: &Path) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-startdate", "-enddate", "-in", s(cert)])
        .output()
        .expect("openssl");
    ok(&out, "openssl x509");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let format = time::format_description::parse_borrowed::<2>(
        "[month repr:short] [day padding:space] [hour]:[minute]:[second] [year] GMT",
    )
    .expect("format");
    let field = |name: &str| {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        time::PrimitiveDateTime::parse(line.trim(), &format)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .assume_utc()
    };
    (field("notBefore="), field("notAfter="))
}

#[test]
fn development_certificates_live_at_most_397_days_backdate_included() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = vibstagectl();
    let default = dir.path().join("default");
    ok(
        &run(
            &ctl,
            &["certs", "init", "--dir", s(&default), "--host", "esx1"],
        ),
        "certs init",
    );
    let now = time::OffsetDateTime::now_utc();
    for name in ["ca.pem", "esx1.pem", "client.pem"] {
        let (from, to) = dates(&default.join(name));
        let life = to - from;
        eprintln!("{name}: {from} .. {to} ({life})");
        assert!(life <= time::Duration::days(397), "{name} lives {life}");
        assert!(from <= now, "{name} starts in the future: {from}");
        assert!(to >= now + time::Duration::days(396), "{name} ends at {to}");
    }

    let short = dir.path().join("short");
    ok(
        &run(
            &ctl,
            &[
                "certs",
                "init",
                "--dir",
                s(&short),
                "--host",
                "esx1",
                "--days",
                "30",
            ],
        ),
        "certs init --days 30",
    );
    let (from, to) = dates(&short.join("esx1.pem"));
    assert_eq!(to - from, time::Duration::days(30));
}

/// Runs `vibstaged --check-config` on an agent whose image trust key file holds `pem`.
fn check_config_with_image_key(pem: &str) -> Output {
    let world = World::new();
    let agent = world.agent("esx-01", AgentOptions::default());
    std::fs::write(world.dir.path().join("image.pub"), pem).expect("write key");
    run(
        &vibstaged(),
        &["--config", s(&agent.config), "--check-config"],
    )
}

fn public_pem(seed: u8) -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    vibstage_protocol::dsse::verifying_key_to_pem(&key.verifying_key()).expect("pem")
}

#[test]
fn check_config_refuses_a_weak_trust_key() {
    // The identity point, a small-order key: its "signatures" verify for many messages.
    let weak = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n-----END PUBLIC KEY-----\n";
    let out = check_config_with_image_key(weak);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "accepted a weak key: {stderr}");
    assert!(stderr.contains("weak"), "{stderr}");
    assert!(stderr.contains("image.pub"), "{stderr}");

    // A good key still passes.
    let out = check_config_with_image_key(&public_pem(1));
    ok(&out, "check-config with a good key");
}

#[test]
fn check_config_says_a_trust_key_file_holds_more_than_one_key() {
    let out = check_config_with_image_key(&format!("{}{}", public_pem(1), public_pem(2)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("2 PEM blocks"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("base64"), "{stderr}");
}

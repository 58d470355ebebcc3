//! End-to-end tests of the offline `vibstagectl` tools (issue 2, item 3), driving the real binary:
//! `keygen`, `depot add`, `image create`, `image verify` and `certs init`.
//!
//! Each test builds its own depot in its own temporary directory: an image key, two vendor keys,
//! software and firmware components for host and DPU targets from several vendors, and a signed
//! image. The refusals are one test each, named after the failure, and check both the exit code
//! and the SPEC error code on stderr.
//!
//! The binary is `target/<profile>/vibstagectl`, built by `cargo build -p vibstage -p vibstage-ctl` or by
//! `cargo test --workspace` (the agent package's own integration test makes cargo build it).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};
use vibstage_ctl::pki::{self, DevCa};
use vibstage_protocol::dsse::signing_key_from_pem;
use vibstage_protocol::{Envelope, IMAGE_PAYLOAD_TYPE, Image};

/// The real `vibstagectl`, next to this test's `deps/` directory.
fn vibstagectl() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is not in target/<profile>/deps/");
    let bin = profile_dir.join("vibstagectl");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p vibstage -p vibstage-ctl` \
         (`cargo test --workspace` builds it too)",
        bin.display()
    );
    bin
}

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn ctl<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let out = Command::new(vibstagectl())
        .args(args)
        .output()
        .expect("failed to start vibstagectl");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs and requires success; returns stdout.
fn ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let run = ctl(args);
    assert_eq!(run.code, Some(0), "vibstagectl {args:?} failed: {run:?}");
    run.stdout
}

/// Runs and requires exit `code` with `needle` on stderr.
fn fails<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], code: i32, needle: &str) -> Run {
    let run = ctl(args);
    assert_eq!(run.code, Some(code), "vibstagectl {args:?}: {run:?}");
    assert!(
        run.stderr.contains(needle),
        "vibstagectl {args:?}: stderr lacks {needle:?}: {run:?}"
    );
    run
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn s(p: &Path) -> String {
    p.to_str().expect("temp paths are UTF-8").to_owned()
}

/// One VIB file of the fixture and how it is added.
struct VibFile {
    file: &'static str,
    name: &'static str,
    component: &'static str,
    component_version: &'static str,
    vendor: &'static str,
    acceptance: &'static str,
    kind: &'static str,
    target: &'static str,
    version: Option<&'static str>,
    /// Signed by the hardware vendor key rather than the software vendor key.
    hw_key: bool,
    size: usize,
}

const VIBS: [VibFile; 5] = [
    VibFile {
        file: "esx-base.vib",
        name: "esx-base",
        component: "ESXi",
        component_version: "8.0.2-0.20",
        vendor: "acme",
        acceptance: "partner",
        kind: "software",
        target: "host",
        version: None,
        hw_key: false,
        size: 300_000,
    },
    VibFile {
        file: "esx-ui.vib",
        name: "esx-ui",
        component: "ESXi",
        component_version: "8.0.2-0.20",
        vendor: "acme",
        acceptance: "accepted",
        kind: "software",
        target: "host",
        version: None,
        hw_key: false,
        size: 12_345,
    },
    VibFile {
        file: "dpu-os.vib",
        name: "dpu-os",
        component: "DPU-OS",
        component_version: "1.2",
        vendor: "pensando",
        acceptance: "certified",
        kind: "software",
        target: "dpu",
        version: Some("1.2.7"),
        hw_key: false,
        size: 4_096,
    },
    VibFile {
        file: "bmc-fw.bin",
        name: "bmc-fw",
        component: "Firmware",
        component_version: "2.1",
        vendor: "dell",
        acceptance: "accepted",
        kind: "firmware",
        target: "host",
        version: Some("2.1.0-7"),
        hw_key: true,
        size: 65_537,
    },
    VibFile {
        file: "nic-fw.bin",
        name: "nic-fw",
        component: "Firmware",
        component_version: "2.1",
        vendor: "intel",
        acceptance: "partner",
        kind: "firmware",
        target: "dpu",
        version: None,
        hw_key: true,
        size: 1,
    },
];

/// A depot with signed descriptors and an image, in a temporary directory.
struct Fixture {
    dir: tempfile::TempDir,
    depot: PathBuf,
    image: PathBuf,
    /// `sha256:<hex>` printed by `image create`.
    digest: String,
    /// Key id printed by `keygen` for the image key.
    image_key_id: String,
    /// Key ids of the two vendor keys.
    vendor_key_ids: [String; 2],
    /// sha256 hex of each VIB file, in `VIBS` order.
    shas: Vec<String>,
}

impl Fixture {
    fn key(&self, name: &str, ext: &str) -> String {
        s(&self.dir.path().join("keys").join(format!("{name}.{ext}")))
    }

    fn new() -> Self {
        Self::with_expiry(None)
    }

    fn with_expiry(expires: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        let keygen = |name: &str| -> String {
            let out = ok(&["keygen", "--out", &s(&keys.join(name))]);
            let id = out.trim().to_owned();
            assert_eq!(id.len(), 64, "keygen printed {out:?}");
            id
        };
        let image_key_id = keygen("image");
        let vendor_key_ids = [keygen("acme"), keygen("hw")];
        keygen("other");

        let depot = dir.path().join("depot");
        let mut shas = Vec::new();
        for (i, v) in VIBS.iter().enumerate() {
            let file = dir.path().join(v.file);
            let bytes: Vec<u8> = (0..v.size).map(|n| (n * 7 + i) as u8).collect();
            fs::write(&file, &bytes).expect("write vib");
            let sha = hex::encode(Sha256::digest(&bytes));
            let key = keys.join(if v.hw_key { "hw.key" } else { "acme.key" });
            let mut args = vec![
                "depot".to_owned(),
                "add".into(),
                "--depot".into(),
                s(&depot),
                "--key".into(),
                s(&key),
                "--component".into(),
                v.component.into(),
                "--component-version".into(),
                v.component_version.into(),
                "--vendor".into(),
                v.vendor.into(),
                "--acceptance".into(),
                v.acceptance.into(),
                "--kind".into(),
                v.kind.into(),
                "--target".into(),
                v.target.into(),
            ];
            if let Some(version) = v.version {
                args.extend(["--version".into(), version.into()]);
            }
            args.push(s(&file));
            let out = ok(&args);
            assert_eq!(
                out.trim(),
                format!("{} {sha} {}", v.name, v.size),
                "depot add output"
            );
            shas.push(sha);
        }

        let mut args = vec![
            "image".to_owned(),
            "create".into(),
            "--depot".into(),
            s(&depot),
            "--key".into(),
            s(&keys.join("image.key")),
            "--name".into(),
            "esx-8.0u2".into(),
            "--serial".into(),
            "7".into(),
            "--base-image".into(),
            "8.0.2-0.20".into(),
            "--component".into(),
            "ESXi=8.0.2-0.20".into(),
            "--component".into(),
            "DPU-OS=1.2".into(),
            "--component".into(),
            "Firmware=2.1".into(),
        ];
        if let Some(expires) = expires {
            args.extend(["--expires".into(), expires.into()]);
        }
        let digest = ok(&args).trim().to_owned();
        assert!(
            digest.starts_with("sha256:"),
            "image create printed {digest:?}"
        );
        let image = depot.join("images").join("esx-8.0u2.json");
        Self {
            dir,
            depot,
            image,
            digest,
            image_key_id,
            vendor_key_ids,
            shas,
        }
    }

    /// `image verify` arguments trusting the fixture's image key and both vendor keys.
    fn verify_args(&self, file: &Path) -> Vec<String> {
        vec![
            "image".into(),
            "verify".into(),
            "--image-key".into(),
            self.key("image", "pub"),
            "--vib-key".into(),
            self.key("acme", "pub"),
            "--vib-key".into(),
            self.key("hw", "pub"),
            s(file),
        ]
    }

    fn envelope(&self) -> Envelope {
        serde_json::from_slice(&fs::read(&self.image).expect("read image")).expect("envelope")
    }

    /// Writes `env` next to the image and returns its path.
    fn write_variant(&self, name: &str, env: &Envelope) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, serde_json::to_vec(env).expect("encode")).expect("write");
        path
    }
}

/// Changes one character in the middle of a base64 string to another base64 digit: still valid
/// base64, different bytes.
fn flip_base64(text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let flipped: String = chars.into_iter().collect();
    assert!(STANDARD.decode(&flipped).is_ok());
    flipped
}

#[test]
fn round_trip_verifies_and_names_every_vib() {
    let fx = Fixture::new();
    let out = ok(&fx.verify_args(&fx.image));
    assert!(out.contains("verified image esx-8.0u2 serial 7"), "{out}");
    assert!(out.contains(&fx.digest), "{out}");
    assert!(out.contains(&fx.image_key_id), "{out}");
    for (v, sha) in VIBS.iter().zip(&fx.shas) {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{} ", v.name)))
            .unwrap_or_else(|| panic!("no line for {}: {out}", v.name));
        for part in [
            v.version.unwrap_or(v.component_version),
            v.kind,
            v.target,
            v.acceptance,
            &v.size.to_string(),
            sha,
            v.vendor,
        ] {
            assert!(line.contains(part), "{part:?} missing from {line:?}");
        }
        let signer = &fx.vendor_key_ids[usize::from(v.hw_key)];
        assert!(line.contains(signer.as_str()), "{line}");
    }

    // The printed digest is sha256 of the envelope's decoded payload.
    let env = fx.envelope();
    assert_eq!(
        fx.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&env.payload)))
    );
    let image: Image = serde_json::from_slice(&env.payload).expect("image payload");
    assert_eq!(image.serial, 7);
    let names: Vec<&str> = image.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["ESXi", "DPU-OS", "Firmware"]);
    // Default expiry: 30 days, whole seconds.
    let in_30_days = OffsetDateTime::now_utc() + Duration::days(30);
    assert!((image.expires - in_30_days).abs() < Duration::minutes(5));
    assert_eq!(image.expires.nanosecond(), 0);

    // --json: the same facts, machine-readable.
    let mut args = fx.verify_args(&fx.image);
    args.push("--json".into());
    let json: serde_json::Value = serde_json::from_str(&ok(&args)).expect("json output");
    assert_eq!(json["digest"], fx.digest.as_str());
    assert_eq!(json["serial"], 7);
    assert_eq!(json["signers"][0], fx.image_key_id.as_str());
    let vibs: Vec<&serde_json::Value> = json["components"]
        .as_array()
        .expect("components")
        .iter()
        .flat_map(|c| c["vibs"].as_array().expect("vibs"))
        .collect();
    assert_eq!(vibs.len(), VIBS.len());
    for (v, sha) in VIBS.iter().zip(&fx.shas) {
        let found = vibs
            .iter()
            .find(|j| j["name"] == v.name)
            .unwrap_or_else(|| panic!("{} missing from {json}", v.name));
        assert_eq!(found["sha256"], sha.as_str());
        assert_eq!(found["size"], v.size);
        assert_eq!(found["kind"], v.kind);
        assert_eq!(found["target"], v.target);
    }
}

#[test]
fn depot_layout_is_servable_as_is() {
    let fx = Fixture::new();
    for sub in ["", "vibs", "descriptors", "images"] {
        assert_eq!(mode(&fx.depot.join(sub)), 0o755, "depot/{sub}");
    }
    let list = |sub: &str| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(fx.depot.join(sub))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let mut shas = fx.shas.clone();
    shas.sort();
    assert_eq!(list("vibs"), shas);
    let descriptors: Vec<String> = shas.iter().map(|s| format!("{s}.json")).collect();
    assert_eq!(list("descriptors"), descriptors);
    assert_eq!(list("images"), ["esx-8.0u2.json"]);
    for sub in ["vibs", "descriptors", "images"] {
        for name in list(sub) {
            let path = fx.depot.join(sub).join(&name);
            assert_eq!(mode(&path), 0o644, "{}", path.display());
        }
    }
    // vibs/<sha> holds exactly the bytes.
    for sha in &fx.shas {
        let bytes = fs::read(fx.depot.join("vibs").join(sha)).expect("blob");
        assert_eq!(&hex::encode(Sha256::digest(&bytes)), sha);
    }
    // Adding the same file again is harmless and prints the same line.
    let again = ok(&[
        "depot",
        "add",
        "--depot",
        &s(&fx.depot),
        "--key",
        &fx.key("acme", "key"),
        "--component",
        "ESXi",
        "--component-version",
        "8.0.2-0.20",
        "--vendor",
        "acme",
        "--acceptance",
        "partner",
        &s(&fx.dir.path().join("esx-base.vib")),
    ]);
    assert_eq!(again.trim(), format!("esx-base {} 300000", fx.shas[0]));
    assert_eq!(list("vibs").len(), VIBS.len());
}

#[test]
fn key_files_are_private_and_never_overwritten() {
    let fx = Fixture::new();
    for name in ["image", "acme", "hw", "other"] {
        assert_eq!(mode(Path::new(&fx.key(name, "key"))), 0o600, "{name}.key");
        assert_eq!(mode(Path::new(&fx.key(name, "pub"))), 0o644, "{name}.pub");
    }
    let before = fs::read(fx.key("image", "key")).expect("read");
    let prefix = fx.dir.path().join("keys").join("image");
    fails(&["keygen", "--out", &s(&prefix)], 2, "already exists");
    assert_eq!(fs::read(fx.key("image", "key")).expect("read"), before);
}

#[test]
fn tampered_descriptor_is_signature_invalid() {
    let fx = Fixture::new();
    let env = fx.envelope();
    let mut image: serde_json::Value = serde_json::from_slice(&env.payload).expect("payload");
    let vib = &mut image["components"][0]["vibs"][0]["payload"];
    *vib = flip_base64(vib.as_str().expect("vib payload")).into();
    let tampered = serde_json::to_vec(&image).expect("encode");

    // As found on disk: the image's own signature no longer covers its payload.
    let mut unsigned = env.clone();
    unsigned.payload = tampered.clone();
    let path = fx.write_variant("tampered-descriptor.json", &unsigned);
    fails(&fx.verify_args(&path), 1, "signature_invalid");

    // Re-signed by the image key: the descriptor's own signature is what fails.
    let image_key =
        signing_key_from_pem(&fs::read_to_string(fx.key("image", "key")).expect("read image key"))
            .expect("image key");
    let resigned = Envelope::sign(IMAGE_PAYLOAD_TYPE, tampered, &image_key);
    let path = fx.write_variant("tampered-descriptor-resigned.json", &resigned);
    let run = fails(&fx.verify_args(&path), 1, "error: signature_invalid:");
    assert!(run.stderr.contains("VIB descriptor"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[test]
fn tampered_image_payload_is_signature_invalid() {
    let fx = Fixture::new();
    let text = fs::read_to_string(&fx.image).expect("read");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let payload = &mut json["payload"];
    *payload = flip_base64(payload.as_str().expect("payload")).into();
    let path = fx.dir.path().join("tampered-image.json");
    fs::write(&path, serde_json::to_vec(&json).expect("encode")).expect("write");
    let run = fails(&fx.verify_args(&path), 1, "error: signature_invalid:");
    assert!(run.stderr.contains("image signature"), "{run:?}");
}

#[test]
fn wrong_keys_are_untrusted() {
    let fx = Fixture::new();
    let image = s(&fx.image);
    // An unrelated key as the image key.
    fails(
        &[
            "image",
            "verify",
            "--image-key",
            &fx.key("other", "pub"),
            "--vib-key",
            &fx.key("acme", "pub"),
            "--vib-key",
            &fx.key("hw", "pub"),
            &image,
        ],
        1,
        "untrusted_key",
    );
    // A vendor key only as an image key: it did not sign the image, and a vib key may not.
    fails(
        &[
            "image",
            "verify",
            "--image-key",
            &fx.key("acme", "pub"),
            "--vib-key",
            &fx.key("hw", "pub"),
            &image,
        ],
        1,
        "untrusted_key",
    );
    // The image key as a VIB key and the vendor keys as image keys: roles matter.
    fails(
        &[
            "image",
            "verify",
            "--image-key",
            &fx.key("acme", "pub"),
            "--image-key",
            &fx.key("hw", "pub"),
            "--vib-key",
            &fx.key("image", "pub"),
            &image,
        ],
        1,
        "untrusted_key",
    );
    // One vendor key missing: the firmware descriptors are untrusted.
    fails(
        &[
            "image",
            "verify",
            "--image-key",
            &fx.key("image", "pub"),
            "--vib-key",
            &fx.key("acme", "pub"),
            &image,
        ],
        1,
        "untrusted_key",
    );
}

#[test]
fn certified_host_refuses_partner_vibs() {
    let fx = Fixture::new();
    let mut args = fx.verify_args(&fx.image);
    args.splice(2..2, ["--acceptance".to_owned(), "certified".to_owned()]);
    let run = fails(&args, 1, "acceptance_too_low");
    assert!(run.stderr.contains("certified"), "{run:?}");
    // At community level everything passes.
    let mut args = fx.verify_args(&fx.image);
    args.splice(2..2, ["--acceptance".to_owned(), "community".to_owned()]);
    ok(&args);
}

#[test]
fn expired_image_is_refused() {
    let fx = Fixture::with_expiry(Some("2020-01-01T00:00:00Z"));
    let image: Image = serde_json::from_slice(&fx.envelope().payload).expect("payload");
    assert_eq!(image.expires.unix_timestamp(), 1_577_836_800);
    fails(&fx.verify_args(&fx.image), 1, "image_expired");
}

#[test]
fn bad_inputs_exit_with_the_right_codes() {
    let fx = Fixture::new();
    // Not JSON, or JSON that is not an envelope: bad_request, exit 1.
    let garbage = fx.dir.path().join("garbage.json");
    fs::write(&garbage, "hello").expect("write");
    fails(&fx.verify_args(&garbage), 1, "bad_request");
    let not_envelope = fx.dir.path().join("not-envelope.json");
    fs::write(&not_envelope, r#"{"payload": 1}"#).expect("write");
    fails(&fx.verify_args(&not_envelope), 1, "bad_request");
    let missing = fx.dir.path().join("missing.json");
    fails(&fx.verify_args(&missing), 1, "bad_request");

    // A missing key file is a config error, exit 2, naming the file.
    let absent = s(&fx.dir.path().join("keys").join("absent.pub"));
    fails(
        &[
            "image",
            "verify",
            "--image-key",
            &absent,
            "--vib-key",
            &fx.key("acme", "pub"),
            &s(&fx.image),
        ],
        2,
        &format!("failed to read public key {absent}: No such file or directory"),
    );
    // A public key where a private key belongs.
    fails(
        &[
            "image",
            "create",
            "--depot",
            &s(&fx.depot),
            "--key",
            &fx.key("image", "pub"),
            "--name",
            "x",
            "--serial",
            "1",
            "--base-image",
            "1",
            "--component",
            "ESXi=8.0.2-0.20",
        ],
        2,
        "image.pub",
    );
    // A component with no descriptors.
    fails(
        &[
            "image",
            "create",
            "--depot",
            &s(&fx.depot),
            "--key",
            &fx.key("image", "key"),
            "--name",
            "x",
            "--serial",
            "1",
            "--base-image",
            "1",
            "--component",
            "ESXi=9.9",
        ],
        2,
        "ESXi 9.9",
    );
    // A file whose name is not a valid VIB name.
    let odd = fx.dir.path().join("bad name.vib");
    fs::write(&odd, "x").expect("write");
    fails(
        &[
            "depot",
            "add",
            "--depot",
            &s(&fx.depot),
            "--key",
            &fx.key("acme", "key"),
            "--component",
            "ESXi",
            "--component-version",
            "1",
            "--vendor",
            "acme",
            "--acceptance",
            "partner",
            &s(&odd),
        ],
        2,
        "bad name.vib",
    );
}

// --- certs init -----------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("open certificate")
        .collect::<Result<_, _>>()
        .expect("parse certificate")
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("parse key")
}

fn key_from_pem(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("parse key")
}

fn cert_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    vec![CertificateDer::from_pem_slice(pem.as_bytes()).expect("parse certificate")]
}

/// A full in-memory TLS handshake: a server with `server` requiring a client certificate from
/// `ca`, a client trusting `ca` that asks for `name` and presents `client`.
fn handshake(
    ca: &Path,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    name: &str,
) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca) {
        roots.add(c).expect("CA certificate");
    }
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .expect("client verifier");
    let server_config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.0, server.1)?;
    let client_config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(client.0, client.1)?;
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    let mut c = ClientConnection::new(Arc::new(client_config), server_name)?;
    let mut s = ServerConnection::new(Arc::new(server_config))?;
    loop {
        let mut moved = false;
        while c.wants_write() {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client write");
            s.read_tls(&mut buf.as_slice()).expect("server read");
            s.process_new_packets()?;
            moved = true;
        }
        while s.wants_write() {
            let mut buf = Vec::new();
            s.write_tls(&mut buf).expect("server write");
            c.read_tls(&mut buf.as_slice()).expect("client read");
            c.process_new_packets()?;
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    assert!(s.peer_certificates().is_some_and(|p| !p.is_empty()));
    Ok(())
}

/// The handshake failed because a peer's certificate was refused (not for some other reason).
fn assert_cert_refused(result: Result<(), rustls::Error>, what: &str) {
    match result {
        Err(rustls::Error::InvalidCertificate(_)) => {}
        other => panic!("{what}: expected a refused certificate, got {other:?}"),
    }
}

#[test]
fn certs_init_material_loads_and_makes_mutual_tls_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let out = ok(&[
        "certs",
        "init",
        "--dir",
        &s(&tls),
        "--host",
        "esx1",
        "--host",
        "10.0.0.7",
    ]);
    assert!(out.contains("esx1") && out.contains("10.0.0.7"), "{out}");
    for name in ["ca", "esx1", "10.0.0.7", "client"] {
        let pem = tls.join(format!("{name}.pem"));
        let key_path = tls.join(format!("{name}.key"));
        assert_eq!(certs(&pem).len(), 1, "{name}.pem");
        key(&key_path);
        assert_eq!(mode(&key_path), 0o600, "{name}.key");
        assert_eq!(mode(&pem), 0o644, "{name}.pem");
    }
    let ca = tls.join("ca.pem");
    let server = || (certs(&tls.join("esx1.pem")), key(&tls.join("esx1.key")));
    let client = || (certs(&tls.join("client.pem")), key(&tls.join("client.key")));

    // The host certificate is good for its name and the loopback names; not for another host.
    for name in ["esx1", "localhost", "127.0.0.1", "::1"] {
        handshake(&ca, server(), client(), name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let ip_server = (
        certs(&tls.join("10.0.0.7.pem")),
        key(&tls.join("10.0.0.7.key")),
    );
    handshake(&ca, ip_server, client(), "10.0.0.7").expect("IP SAN");
    assert_cert_refused(
        handshake(&ca, server(), client(), "esx2"),
        "wrong host name",
    );
    // A server certificate is not a client certificate.
    assert_cert_refused(
        handshake(&ca, server(), server(), "esx1"),
        "server certificate as client",
    );

    // The CA on disk can issue more: a "reader" client is accepted, an expired one refused.
    let dev_ca = DevCa::from_pem(
        &fs::read_to_string(&ca).expect("ca.pem"),
        &fs::read_to_string(tls.join("ca.key")).expect("ca.key"),
    )
    .expect("load CA");
    let now = OffsetDateTime::now_utc();
    let reader = pki::issue_client(
        &dev_ca,
        "reader",
        now - Duration::hours(1),
        now + Duration::days(1),
    )
    .expect("reader");
    handshake(
        &ca,
        server(),
        (
            cert_from_pem(&reader.cert_pem),
            key_from_pem(&reader.key_pem),
        ),
        "esx1",
    )
    .expect("reader certificate");
    let expired = pki::issue_client(
        &dev_ca,
        "controller",
        now - Duration::days(2),
        now - Duration::days(1),
    )
    .expect("expired");
    assert_cert_refused(
        handshake(
            &ca,
            server(),
            (
                cert_from_pem(&expired.cert_pem),
                key_from_pem(&expired.key_pem),
            ),
            "esx1",
        ),
        "expired client certificate",
    );
    // A client certificate from another CA is refused.
    let other = DevCa::generate(pki::Validity::standard(now)).expect("other CA");
    let stranger = pki::issue_client(
        &other,
        "controller",
        now - Duration::hours(1),
        now + Duration::days(1),
    )
    .expect("stranger");
    assert_cert_refused(
        handshake(
            &ca,
            server(),
            (
                cert_from_pem(&stranger.cert_pem),
                key_from_pem(&stranger.key_pem),
            ),
            "esx1",
        ),
        "client certificate from another CA",
    );

    // Running it again keeps everything and only adds the new host.
    let ca_before = fs::read(&ca).expect("read");
    let out = ok(&[
        "certs",
        "init",
        "--dir",
        &s(&tls),
        "--host",
        "esx1",
        "--host",
        "esx2",
    ]);
    assert!(out.contains("created server esx2"), "{out}");
    assert_eq!(fs::read(&ca).expect("read"), ca_before);
    let esx2 = (certs(&tls.join("esx2.pem")), key(&tls.join("esx2.key")));
    handshake(&ca, esx2, client(), "esx2").expect("new host chains to the same CA");
}

//! Fuzzing entry points for vibstage (issue 8), one per cargo-fuzz target in `fuzz_targets/`.
//!
//! Each function takes arbitrary bytes and feeds them to the code that parses what the outside
//! world sends: DSSE envelopes and their verification (`envelope`), API request bodies
//! (`request_body`) and `agent.toml` (`config`). A panic is a bug. Besides "does not panic", each
//! checks the promises the product makes about what it accepts (an accepted image was signed by
//! the trusted image key, is not expired, not rolled back, not below the host's level; an
//! accepted request round-trips; an accepted config is valid), so a fuzzer finds wrong
//! acceptances too.
//!
//! The same functions run over the seed corpora (`fuzz/seeds/<target>/`) in the default test
//! suite (`tests/tests/fuzz_smoke.rs` includes this file as a module), so this file uses only
//! crates that both the fuzz crate and the test crate depend on, and no `unwrap`. The config
//! parser is the protocol crate's (`vibstage_protocol::config`), the very one the agent uses.
//!
//! The trust store and clock are those of the protocol crate's fixtures
//! (`protocol/tests/rules.rs`): image key `[1; 32]`, a partner vib key `[2; 32]`, a certified vib
//! key `[3; 32]`, now = 2026-06-01, highest accepted serial 7, host level partner. So the
//! protocol fixtures are meaningful seeds.

use std::path::Path;
use std::sync::LazyLock;

use super::vib::{Bundle, Limits, PrefixCheck, VibIdentity, read_vib, sniff::Verdict};
use vibstage_protocol::config::Config;

use ed25519_dalek::SigningKey;
use time::OffsetDateTime;
use time::macros::datetime;
use vibstage_protocol::api::{CheckRequest, StageRequest};
use vibstage_protocol::trust::verify_vib;
use vibstage_protocol::{
    AcceptanceLevel, Digest, Envelope, IMAGE_PAYLOAD_TYPE, ImageDigest, KeyRole, TrustStore,
    TrustedKey, VIB_PAYLOAD_TYPE, verify_image,
};

/// The fuzzing clock.
pub const NOW: OffsetDateTime = datetime!(2026-06-01 00:00 UTC);
/// Highest serial already accepted for every image name.
pub const HIGHEST_SERIAL: u64 = 7;

/// The key that signs images.
pub fn image_key() -> &'static SigningKey {
    static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[1; 32]));
    &KEY
}

/// A vib key trusted up to `partner`.
pub fn partner_key() -> &'static SigningKey {
    static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[2; 32]));
    &KEY
}

/// A vib key trusted up to `certified`.
pub fn certified_key() -> &'static SigningKey {
    static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[3; 32]));
    &KEY
}

/// The trust store of the protocol fixtures (built once: deriving keys is slow).
pub fn trust_store() -> &'static TrustStore {
    static STORE: LazyLock<TrustStore> = LazyLock::new(build_trust_store);
    &STORE
}

fn build_trust_store() -> TrustStore {
    TrustStore::new(vec![
        TrustedKey::new(image_key().verifying_key(), KeyRole::Image),
        TrustedKey::new(
            partner_key().verifying_key(),
            KeyRole::Vib {
                max_acceptance: AcceptanceLevel::Partner,
            },
        ),
        TrustedKey::new(
            certified_key().verifying_key(),
            KeyRole::Vib {
                max_acceptance: AcceptanceLevel::Certified,
            },
        ),
    ])
}

/// Envelope parsing and verification. The first byte picks what the rest is:
/// - `0`: an image envelope as JSON (parsed strictly, then verified as an agent would);
/// - `1`: an image *payload*, signed here with the trusted image key, so the fuzzer reaches the
///   payload parser and the rules behind the signature check;
/// - `2`: a VIB descriptor payload, signed here with the partner vib key, then verified.
///
/// Any other first byte is taken modulo 3.
pub fn envelope(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let store = trust_store();
    match mode % 3 {
        0 => {
            let Ok(env) = serde_json::from_slice::<Envelope>(rest) else {
                return;
            };
            // What parses serialises back to the same envelope.
            let again = serde_json::to_vec(&env).map(|b| serde_json::from_slice::<Envelope>(&b));
            assert!(
                matches!(&again, Ok(Ok(e)) if *e == env),
                "envelope does not round-trip: {again:?}"
            );
            check_image(&env, store);
        }
        1 => {
            let env = Envelope::sign(IMAGE_PAYLOAD_TYPE, rest.to_vec(), image_key());
            check_image(&env, store);
        }
        _ => {
            let env = Envelope::sign(VIB_PAYLOAD_TYPE, rest.to_vec(), partner_key());
            match verify_vib(&env, store) {
                Ok(v) => {
                    assert!(v.descriptor.acceptance <= AcceptanceLevel::Partner);
                    assert!(!v.signers.is_empty());
                    assert!(v.descriptor.validate().is_ok());
                }
                Err(e) => {
                    let _ = (e.code(), e.to_string());
                }
            }
        }
    }
}

/// Verifies `env` as an agent of level partner would, and checks what an acceptance promises.
fn check_image(env: &Envelope, store: &TrustStore) {
    match verify_image(env, store, AcceptanceLevel::Partner, NOW, |_| {
        Some(HIGHEST_SERIAL)
    }) {
        Ok(v) => {
            assert_eq!(env.payload_type, IMAGE_PAYLOAD_TYPE);
            assert_eq!(v.digest, ImageDigest::of_payload(&env.payload));
            assert!(v.image.expires > NOW, "expired image accepted");
            assert!(v.image.serial >= HIGHEST_SERIAL, "rollback accepted");
            let image_id = vibstage_protocol::dsse::key_id(&image_key().verifying_key());
            assert!(
                env.signatures.iter().any(|s| s.keyid == image_id
                    && env.signature_verifies(s, &image_key().verifying_key())),
                "accepted without a valid image-key signature"
            );
            let listed: usize = v.image.components.iter().map(|c| c.vibs.len()).sum();
            assert_eq!(listed, v.vibs.len());
            for vib in &v.vibs {
                assert!(vib.descriptor.acceptance >= AcceptanceLevel::Partner);
                assert!(!vib.signers.is_empty());
            }
        }
        Err(e) => {
            let _ = (e.code(), e.to_string());
        }
    }
}

/// API request bodies (`POST /v1/stage`, `/v1/remediate`, `/v1/compliance/check`), parsed the
/// way the API parses them (`serde_json::from_slice`, unknown fields refused). What parses must
/// round-trip, and an image in it must survive verification without a panic.
pub fn request_body(data: &[u8]) {
    let store = trust_store();
    if let Ok(req) = serde_json::from_slice::<StageRequest>(data) {
        let again = serde_json::to_vec(&req).map(|b| serde_json::from_slice::<StageRequest>(&b));
        assert!(
            matches!(&again, Ok(Ok(r)) if r.image == req.image && r.depot == req.depot),
            "stage request does not round-trip: {again:?}"
        );
        check_image(&req.image, store);
    }
    if let Ok(req) = serde_json::from_slice::<CheckRequest>(data) {
        let again = serde_json::to_vec(&req).map(|b| serde_json::from_slice::<CheckRequest>(&b));
        assert!(
            matches!(&again, Ok(Ok(r)) if r.image == req.image),
            "check request does not round-trip: {again:?}"
        );
        check_image(&req.image, store);
    }
}

/// `agent.toml`: parsed and validated by `vibstage_protocol::config::Config::parse`. An accepted
/// configuration must satisfy what validation promises; a refused one must say why.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/fuzz/agent.toml")) {
        Ok(c) => {
            assert!(c.agent.state_dir.is_absolute());
            assert!(c.scratch.path.is_absolute());
            assert!((1..=64).contains(&c.scratch.concurrency));
            assert!(c.depot.timeout_secs >= 1);
            assert!(c.trust.threshold >= 1);
            assert!(c.volatile_path().is_none_or(Path::is_absolute));
        }
        Err(e) => {
            assert!(e.to_string().contains("/fuzz/agent.toml"), "{e}");
        }
    }
}

/// Real VIBs and offline bundles (issue 14): the agent's `vib` reader. The first byte picks:
/// - `0`: a `.vib` through `read_vib` — an accepted VIB's sha256 and size are those of the input,
///   and every payload it declares was present;
/// - `1`: an offline bundle through `Bundle::open`, then every VIB in it;
/// - `2`: the agent's prefix check, fed all at once and byte by byte: both give the same verdict,
///   and it agrees with `read_vib` about the identity of a VIB that reads.
///
/// Small limits keep each run fast: decompression bombs hit them rather than the fuzzer's
/// memory limit.
pub fn vib_reader(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_vib_bytes: 1 << 20,
        max_expanded: 4 << 20,
        max_metadata: 1 << 20,
        max_xml: 256 << 10,
        max_entries: 256,
        ..Limits::default()
    };
    match mode % 3 {
        0 => {
            if let Ok(vib) = read_vib(rest, &limits) {
                assert_eq!(vib.sha256, Digest::of(rest));
                assert_eq!(vib.size, rest.len() as u64);
                assert!(vib.xml.payloads.iter().all(|p| {
                    p.checksums
                        .iter()
                        .any(|c| c.algorithm == "sha-256" && c.verify_process.is_none())
                }));
            }
        }
        1 => {
            if let Ok(mut bundle) = Bundle::open(std::io::Cursor::new(rest), &limits) {
                for path in bundle.vib_paths.clone() {
                    assert!(path.starts_with("vib20/") && !path.contains(".."));
                    if let Ok(vib) = bundle.read_vib(&path) {
                        let _ = bundle.component_of(&vib.xml.id());
                    }
                }
            }
        }
        _ => {
            let read = read_vib(rest, &limits).ok();
            let expected = read.as_ref().map_or_else(
                || VibIdentity {
                    name: "x".into(),
                    version: "1".into(),
                    vendor: "v".into(),
                    acceptance: AcceptanceLevel::Partner,
                },
                |v| VibIdentity::of(&v.xml),
            );
            let mut whole = PrefixCheck::new(expected.clone(), &limits);
            let a = whole.feed(rest).and_then(|_| whole.finish());
            let mut each = PrefixCheck::new(expected, &limits);
            let mut b = Ok(Verdict::Pending);
            for byte in rest.iter().take(1 << 16) {
                b = each.feed(std::slice::from_ref(byte));
                if b.is_err() {
                    break;
                }
            }
            if rest.len() <= 1 << 16 {
                if b.is_ok() {
                    b = each.finish();
                }
                assert_eq!(a.as_ref().ok(), b.as_ref().ok(), "verdicts differ");
            }
            if read.is_some() {
                assert_eq!(
                    a.ok(),
                    Some(Verdict::Matches),
                    "a VIB that reads must match itself"
                );
            }
        }
    }
}

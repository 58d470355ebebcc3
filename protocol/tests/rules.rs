//! The acceptance rule of SPEC §2, one fixture per refusal.
//!
//! Each fixture in `tests/data/` is an image envelope named after the failure it causes. They are
//! generated deterministically (fixed keys, ed25519 is deterministic) by [`fixtures`]; run with
//! `VIBSTAGE_REGEN_FIXTURES=1` to rewrite them after a deliberate format change.

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use time::OffsetDateTime;
use time::macros::datetime;
use vibstage_protocol::dsse::key_id;
use vibstage_protocol::{
    AcceptanceLevel, Component, Digest, Envelope, ErrorCode, IMAGE_PAYLOAD_TYPE, Image, KeyRole,
    TrustStore, TrustedKey, VIB_PAYLOAD_TYPE, VibDescriptor, VibKind, VibTarget, verify_image,
};

const NOW: OffsetDateTime = datetime!(2026-06-01 00:00 UTC);
const HIGHEST_SERIAL: u64 = 7;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}
fn image_key() -> SigningKey {
    key(1)
}
fn partner_key() -> SigningKey {
    key(2)
}
fn certified_key() -> SigningKey {
    key(3)
}
fn unknown_key() -> SigningKey {
    key(9)
}

fn store() -> TrustStore {
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

fn descriptor(name: &str, acceptance: AcceptanceLevel) -> VibDescriptor {
    VibDescriptor {
        name: name.parse().expect("name"),
        version: "8.0.2-0.20".into(),
        vendor: "acme".into(),
        component: "ESXi".parse().expect("name"),
        component_version: "8.0.2-0.20".into(),
        acceptance,
        kind: VibKind::Software,
        target: VibTarget::Host,
        sha256: Digest::of(name.as_bytes()),
        size: name.len() as u64,
        maintenance_mode: true,
        reboot_required: true,
    }
}

fn sign_json<T: serde::Serialize>(ty: &str, value: &T, key: &SigningKey) -> Envelope {
    Envelope::sign(ty, serde_json::to_vec(value).expect("json"), key)
}

fn vib(d: &VibDescriptor) -> Envelope {
    sign_json(VIB_PAYLOAD_TYPE, d, &partner_key())
}

fn image_with(vibs: Vec<Envelope>, serial: u64, expires: OffsetDateTime) -> Image {
    Image {
        name: "esx-8.0u2".parse().expect("name"),
        serial,
        expires,
        base_image: "8.0.2-0.20".into(),
        components: vec![Component {
            name: "ESXi".parse().expect("name"),
            version: "8.0.2-0.20".into(),
            vibs,
        }],
    }
}

fn good_image() -> Image {
    image_with(
        vec![
            vib(&descriptor("esx-base", AcceptanceLevel::Partner)),
            vib(&descriptor("esx-ui", AcceptanceLevel::Partner)),
        ],
        8,
        datetime!(2030-01-01 00:00 UTC),
    )
}

fn signed(image: &Image) -> Envelope {
    sign_json(IMAGE_PAYLOAD_TYPE, image, &image_key())
}

/// Replaces `from` by `to` (same length) inside the payload, keeping the signatures.
fn tamper_payload(mut env: Envelope, from: &str, to: &str) -> Envelope {
    let text = String::from_utf8(env.payload).expect("utf8");
    assert!(text.contains(from), "{from} not in payload");
    env.payload = text.replacen(from, to, 1).into_bytes();
    env
}

/// Every fixture: file name, envelope JSON, and the code it must produce (None = accepted).
fn fixtures() -> Vec<(&'static str, String, Option<ErrorCode>)> {
    let json = |env: &Envelope| serde_json::to_string_pretty(env).expect("json");
    let mut out = Vec::new();
    let mut add = |name, env: Envelope, code| out.push((name, json(&env), code));

    add("valid-image", signed(&good_image()), None);
    add(
        "tampered-payload",
        tamper_payload(signed(&good_image()), "\"serial\":8", "\"serial\":9"),
        Some(ErrorCode::SignatureInvalid),
    );
    let mut env = signed(&good_image());
    env.signatures[0].sig[10] ^= 0x01;
    add("tampered-signature", env, Some(ErrorCode::SignatureInvalid));
    add(
        "unknown-key",
        sign_json(IMAGE_PAYLOAD_TYPE, &good_image(), &unknown_key()),
        Some(ErrorCode::UntrustedKey),
    );
    add(
        "wrong-key-role-image-signed-by-vib-key",
        sign_json(IMAGE_PAYLOAD_TYPE, &good_image(), &certified_key()),
        Some(ErrorCode::UntrustedKey),
    );
    let d = descriptor("esx-base", AcceptanceLevel::Partner);
    add(
        "wrong-key-role-vib-signed-by-image-key",
        signed(&image_with(
            vec![sign_json(VIB_PAYLOAD_TYPE, &d, &image_key())],
            8,
            datetime!(2030-01-01 00:00 UTC),
        )),
        Some(ErrorCode::UntrustedKey),
    );
    add(
        "vib-above-signer-max-acceptance",
        signed(&image_with(
            vec![vib(&descriptor("esx-base", AcceptanceLevel::Certified))],
            8,
            datetime!(2030-01-01 00:00 UTC),
        )),
        Some(ErrorCode::UntrustedKey),
    );
    add(
        "vib-below-host-acceptance",
        signed(&image_with(
            vec![vib(&descriptor("esx-base", AcceptanceLevel::Community))],
            8,
            datetime!(2030-01-01 00:00 UTC),
        )),
        Some(ErrorCode::AcceptanceTooLow),
    );
    add(
        "expired-image",
        signed(&image_with(
            vec![vib(&d)],
            8,
            datetime!(2026-05-31 23:59:59 UTC),
        )),
        Some(ErrorCode::ImageExpired),
    );
    add(
        "rollback-serial",
        signed(&image_with(
            vec![vib(&d)],
            6,
            datetime!(2030-01-01 00:00 UTC),
        )),
        Some(ErrorCode::RollbackRefused),
    );
    let mut env = signed(&good_image());
    env.add_signature(&image_key());
    add("duplicate-signature-same-key", env, None);
    let mut tampered_vib = vib(&d);
    tampered_vib.payload = String::from_utf8(tampered_vib.payload)
        .expect("utf8")
        .replacen("\"size\":8", "\"size\":9", 1)
        .into_bytes();
    add(
        "tampered-vib-descriptor",
        signed(&image_with(
            vec![tampered_vib],
            8,
            datetime!(2030-01-01 00:00 UTC),
        )),
        Some(ErrorCode::SignatureInvalid),
    );
    let mut extra = serde_json::to_value(good_image()).expect("json");
    extra["unexpected"] = serde_json::json!(true);
    add(
        "unknown-field-in-image",
        sign_json(IMAGE_PAYLOAD_TYPE, &extra, &image_key()),
        Some(ErrorCode::BadRequest),
    );
    let mut extra_vib = serde_json::to_value(&d).expect("json");
    extra_vib["install_script"] = serde_json::json!("rm -rf /");
    add(
        "unknown-field-in-vib",
        signed(&image_with(
            vec![sign_json(VIB_PAYLOAD_TYPE, &extra_vib, &partner_key())],
            8,
            datetime!(2030-01-01 00:00 UTC),
        )),
        Some(ErrorCode::BadRequest),
    );
    add(
        "wrong-payload-type",
        sign_json(VIB_PAYLOAD_TYPE, &good_image(), &image_key()),
        Some(ErrorCode::BadRequest),
    );
    add(
        "unsigned-image",
        Envelope {
            signatures: vec![],
            ..signed(&good_image())
        },
        Some(ErrorCode::UntrustedKey),
    );
    // Text-level fixtures: envelopes that must not even parse.
    let valid = json(&signed(&good_image()));
    let payload_b64 = {
        let v: serde_json::Value = serde_json::from_str(&valid).expect("json");
        v["payload"].as_str().expect("payload").to_owned()
    };
    out.push((
        "malformed-base64",
        valid.replacen(&payload_b64, &format!("{}!", &payload_b64[1..]), 1),
        Some(ErrorCode::BadRequest),
    ));
    out.push((
        "unknown-field-in-envelope",
        valid.replacen('{', "{\n  \"comment\": \"hi\",", 1),
        Some(ErrorCode::BadRequest),
    ));
    out
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn check(text: &str, store: &TrustStore) -> Result<(), ErrorCode> {
    let env: Envelope = serde_json::from_str(text).map_err(|_| ErrorCode::BadRequest)?;
    verify_image(&env, store, AcceptanceLevel::Partner, NOW, |name| {
        (name.as_str() == "esx-8.0u2").then_some(HIGHEST_SERIAL)
    })
    .map(|_| ())
    .map_err(|e| e.code())
}

#[test]
fn fixtures_are_current() {
    let regen = std::env::var_os("VIBSTAGE_REGEN_FIXTURES").is_some();
    for (name, text, _) in fixtures() {
        let path = data_dir().join(format!("{name}.json"));
        if regen {
            std::fs::write(&path, &text).expect("write fixture");
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate with VIBSTAGE_REGEN_FIXTURES=1)",
                path.display()
            )
        });
        assert_eq!(on_disk, text, "{name} is stale (VIBSTAGE_REGEN_FIXTURES=1)");
    }
}

#[test]
fn each_fixture_gives_its_exact_code() {
    for (name, _, expected) in fixtures() {
        let path = data_dir().join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).expect("fixture");
        assert_eq!(check(&text, &store()).err(), expected, "fixture {name}");
    }
}

#[test]
fn same_key_twice_counts_once_toward_a_threshold() {
    let text = std::fs::read_to_string(data_dir().join("duplicate-signature-same-key.json"))
        .expect("fixture");
    let two = store().with_threshold(2);
    assert_eq!(check(&text, &two), Err(ErrorCode::UntrustedKey));

    // Two distinct image keys do meet a threshold of two.
    let second = key(4);
    let mut keys = store().keys().to_vec();
    keys.push(TrustedKey::new(second.verifying_key(), KeyRole::Image));
    let mut env = signed(&good_image());
    env.add_signature(&second);
    let text2 = serde_json::to_string(&env).expect("json");
    assert_eq!(check(&text2, &TrustStore::new(keys.clone())), Ok(()));
    // With a threshold of two the image passes, and the descriptors (signed by one vib key
    // each) are now what falls short.
    let err = check(&text2, &TrustStore::new(keys).with_threshold(2));
    assert_eq!(err, Err(ErrorCode::UntrustedKey));
}

#[test]
fn accepted_image_reports_digest_and_vibs() {
    let env = signed(&good_image());
    let v = verify_image(&env, &store(), AcceptanceLevel::Partner, NOW, |_| Some(8))
        .expect("same serial is not a rollback");
    assert_eq!(v.digest.digest(), Digest::of(&env.payload));
    assert_eq!(v.vibs.len(), 2);
    assert_eq!(
        v.vibs[0].signers,
        vec![key_id(&partner_key().verifying_key())]
    );
}

#[test]
fn a_bad_signature_does_not_hide_a_good_one_by_another_key() {
    // Two trusted image keys; the first signature (key 1) is broken, the second (key 4) good.
    let second = key(4);
    let mut keys = store().keys().to_vec();
    keys.push(TrustedKey::new(second.verifying_key(), KeyRole::Image));
    let two_image_keys = TrustStore::new(keys);
    let mut env = signed(&good_image());
    env.add_signature(&second);
    env.signatures[0].sig[0] ^= 1;
    assert_eq!(
        check(&serde_json::to_string(&env).expect("json"), &two_image_keys),
        Ok(())
    );
}

#[test]
fn hostile_envelope_with_thousands_of_signatures_is_refused_before_any_is_checked() {
    // Issue 11, item 6: 11 500 signatures naming the trusted key cost 21 s of agent CPU.
    let mut env = signed(&good_image());
    let one = env.signatures[0].clone();
    env.signatures = vec![one; 11_500];
    assert_eq!(
        check(&serde_json::to_string(&env).expect("json"), &store()),
        Err(ErrorCode::BadRequest)
    );
}

#[test]
fn a_key_id_is_tried_once_however_often_it_signs() {
    // Within the cap: 16 signatures naming the image key, the first one broken. The key is
    // tried once (its broken signature), so the envelope is refused as `signature_invalid`
    // rather than verified 16 times over.
    let mut env = signed(&good_image());
    let mut broken = env.signatures[0].clone();
    broken.sig[0] ^= 1;
    let good = env.signatures[0].clone();
    env.signatures = std::iter::once(broken)
        .chain(std::iter::repeat_n(good, Envelope::MAX_SIGNATURES - 1))
        .collect();
    assert_eq!(
        check(&serde_json::to_string(&env).expect("json"), &store()),
        Err(ErrorCode::SignatureInvalid)
    );
}

#[test]
fn two_descriptors_of_the_same_bytes_with_different_sizes_are_refused() {
    // Found by an outside review: staging could satisfy only one of them, and the stage then
    // failed `internal` after its download instead of the request being refused.
    let a = descriptor("tools", AcceptanceLevel::Partner);
    let mut b = descriptor("tools2", AcceptanceLevel::Partner);
    b.sha256 = a.sha256;
    b.size = a.size + 5;
    let env = signed(&image_with(
        vec![vib(&a), vib(&b)],
        8,
        datetime!(2030-01-01 00:00 UTC),
    ));
    assert_eq!(
        check(&serde_json::to_string(&env).expect("json"), &store()),
        Err(ErrorCode::BadRequest)
    );
    // The same bytes under two names with the same size stay fine.
    b.size = a.size;
    let env = signed(&image_with(
        vec![vib(&a), vib(&b)],
        8,
        datetime!(2030-01-01 00:00 UTC),
    ));
    assert_eq!(
        check(&serde_json::to_string(&env).expect("json"), &store()),
        Ok(())
    );
}

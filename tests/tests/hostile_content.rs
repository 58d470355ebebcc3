//! Hostile clients (issue 8; SPEC §2, §5, §7). Signed content: forged, re-signed, mislabelled and oversized images and descriptors.
//! The harness and what every case asserts: `vibstage_e2e::hostile`.

use serde_json::{Value, json};
use time::Duration as TimeDelta;
use vibstage_e2e::{AgentOptions, VibFile};
use vibstage_protocol::{Envelope, IMAGE_PAYLOAD_TYPE, VIB_PAYLOAD_TYPE};

use vibstage_e2e::hostile::*;

#[test]
fn hostile_signed_content_is_refused_with_its_code() {
    let mut t = Target::new(AgentOptions {
        retries: Some(1),
        timeout_secs: Some(3),
        ..AgentOptions::default()
    });
    let url = t.world.depot.url();
    // Serial 5 of the image is accepted (and staged) first, so that 4 is a rollback.
    let image = t.world.image("esx-8.0u2", 5, &["ESXi=8.0.2-0.20"]);
    assert_eq!(t.agent.stage_and_wait(&image, &url)["state"], "succeeded");
    let tools = t.world.image("tools", 1, &["Tools=1.0"]);
    let body = |t: &Target, env: &Envelope| t.stage_body(env);
    let ikey = t.world.image_key.clone();
    let vkey = t.world.vendor_key.clone();
    let p = payload(&image);

    let mut tampered = image.clone();
    tampered.payload = String::from_utf8(tampered.payload.clone())
        .expect("utf8")
        .replacen("\"serial\":5", "\"serial\":6", 1)
        .into_bytes();
    t.case(
        "signed-payload-tampered",
        422,
        Some("signature_invalid"),
        |t| t.post("/v1/stage", &body(t, &tampered)),
    );
    let mut bad_sig = image.clone();
    bad_sig.signatures[0].sig[7] ^= 0x40;
    t.case(
        "signed-signature-bytes-flipped",
        422,
        Some("signature_invalid"),
        |t| t.post("/v1/stage", &body(t, &bad_sig)),
    );
    let mut short_sig = image.clone();
    short_sig.signatures[0].sig.truncate(10);
    t.case(
        "signed-signature-too-short",
        422,
        Some("signature_invalid"),
        |t| t.post("/v1/stage", &body(t, &short_sig)),
    );
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let unknown = Envelope::sign(IMAGE_PAYLOAD_TYPE, image.payload.clone(), &stranger);
    t.case("signed-by-unknown-key", 422, Some("untrusted_key"), |t| {
        t.post("/v1/stage", &body(t, &unknown))
    });
    let by_vendor = Envelope::sign(IMAGE_PAYLOAD_TYPE, image.payload.clone(), &vkey);
    t.case("signed-image-by-vib-key", 422, Some("untrusted_key"), |t| {
        t.post("/v1/stage", &body(t, &by_vendor))
    });
    let mut unsigned = image.clone();
    unsigned.signatures.clear();
    t.case("signed-no-signature", 422, Some("untrusted_key"), |t| {
        t.post("/v1/remediate", &body(t, &unsigned))
    });
    // A signature by an unknown key that claims the trusted key's id.
    let mut forged = Envelope::sign(IMAGE_PAYLOAD_TYPE, image.payload.clone(), &stranger);
    forged.signatures[0].keyid = image.signatures[0].keyid;
    t.case("signed-forged-keyid", 422, Some("signature_invalid"), |t| {
        t.post("/v1/stage", &body(t, &forged))
    });
    let mut retyped = image.clone();
    retyped.payload_type = VIB_PAYLOAD_TYPE.into();
    t.case("signed-wrong-payload-type", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &body(t, &retyped))
    });
    let resigned_type = Envelope::sign(VIB_PAYLOAD_TYPE, image.payload.clone(), &ikey);
    t.case(
        "signed-wrong-payload-type-resigned",
        400,
        Some("bad_request"),
        |t| t.post("/v1/compliance/check", &json!({"image": resigned_type})),
    );
    let expired = t.world.image_expiring(
        "esx-8.0u2",
        6,
        &["ESXi=8.0.2-0.20"],
        time::OffsetDateTime::now_utc() - TimeDelta::seconds(1),
    );
    t.case("signed-expired", 422, Some("image_expired"), |t| {
        t.post("/v1/stage", &body(t, &expired))
    });
    t.case("signed-expired-check", 422, Some("image_expired"), |t| {
        t.post("/v1/compliance/check", &json!({"image": expired}))
    });
    let older = t.world.image("esx-8.0u2", 4, &["ESXi=8.0.2-0.20"]);
    t.case("signed-rollback", 422, Some("rollback_refused"), |t| {
        t.post("/v1/stage", &body(t, &older))
    });
    t.case(
        "signed-rollback-remediate",
        422,
        Some("rollback_refused"),
        |t| t.post("/v1/remediate", &body(t, &older)),
    );

    // Descriptors.
    let resign_vib = |level: &str, key: &ed25519_dalek::SigningKey| {
        let vib = vib_envelope(&p, 0, 0);
        let mut d: Value = serde_json::from_slice(&vib.payload).expect("descriptor");
        d["acceptance"] = json!(level);
        let mut image = p.clone();
        image["components"][0]["vibs"][0] = json!(sign(VIB_PAYLOAD_TYPE, &d, key));
        image["serial"] = json!(9);
        sign(IMAGE_PAYLOAD_TYPE, &image, &ikey)
    };
    let low = resign_vib("community", &vkey);
    t.case(
        "signed-acceptance-too-low",
        422,
        Some("acceptance_too_low"),
        |t| t.post("/v1/stage", &body(t, &low)),
    );
    let high = resign_vib("certified", &vkey);
    t.case(
        "signed-vib-above-signer-level",
        422,
        Some("untrusted_key"),
        |t| t.post("/v1/stage", &body(t, &high)),
    );
    let vib_by_image_key = resign_vib("partner", &ikey);
    t.case("signed-vib-by-image-key", 422, Some("untrusted_key"), |t| {
        t.post("/v1/stage", &body(t, &vib_by_image_key))
    });
    // A VIB envelope of another image swapped into this one, the image's signature kept.
    let other_vib = vib_envelope(&payload(&tools), 0, 0);
    let mut swapped_payload = p.clone();
    swapped_payload["components"][0]["vibs"][0] = json!(other_vib);
    let swapped = Envelope {
        payload: swapped_payload.to_string().into_bytes(),
        ..image.clone()
    };
    t.case(
        "signed-vib-swapped-from-another-image",
        422,
        Some("signature_invalid"),
        |t| t.post("/v1/stage", &body(t, &swapped)),
    );
    // The same swap signed by the image key: the descriptor's component does not match.
    swapped_payload["serial"] = json!(9);
    let swapped_resigned = sign(IMAGE_PAYLOAD_TYPE, &swapped_payload, &ikey);
    t.case(
        "signed-vib-of-another-component-resigned",
        400,
        Some("bad_request"),
        |t| t.post("/v1/stage", &body(t, &swapped_resigned)),
    );
    let mut vib_tampered = vib_envelope(&p, 0, 0);
    vib_tampered.payload = String::from_utf8(vib_tampered.payload)
        .expect("utf8")
        .replacen("\"size\":200000", "\"size\":200001", 1)
        .into_bytes();
    let mut tampered_vib_payload = p.clone();
    tampered_vib_payload["components"][0]["vibs"][0] = json!(vib_tampered);
    tampered_vib_payload["serial"] = json!(9);
    let tampered_vib = sign(IMAGE_PAYLOAD_TYPE, &tampered_vib_payload, &ikey);
    t.case(
        "signed-vib-descriptor-tampered",
        422,
        Some("signature_invalid"),
        |t| t.post("/v1/stage", &body(t, &tampered_vib)),
    );
    let mut inner_type = p.clone();
    let inner = vib_envelope(&p, 0, 0);
    inner_type["components"][0]["vibs"][0] =
        json!(Envelope::sign(IMAGE_PAYLOAD_TYPE, inner.payload, &vkey));
    inner_type["serial"] = json!(9);
    let inner_type = sign(IMAGE_PAYLOAD_TYPE, &inner_type, &ikey);
    t.case(
        "signed-vib-wrong-payload-type",
        400,
        Some("bad_request"),
        |t| t.post("/v1/stage", &body(t, &inner_type)),
    );
    let mut dup_vib = p.clone();
    let first = dup_vib["components"][0]["vibs"][0].clone();
    dup_vib["components"][0]["vibs"]
        .as_array_mut()
        .expect("vibs")
        .push(first);
    dup_vib["serial"] = json!(9);
    let dup_vib = sign(IMAGE_PAYLOAD_TYPE, &dup_vib, &ikey);
    t.case("signed-vib-listed-twice", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &body(t, &dup_vib))
    });
    let mut no_vibs = p.clone();
    no_vibs["components"][0]["vibs"] = json!([]);
    no_vibs["serial"] = json!(9);
    let no_vibs = sign(IMAGE_PAYLOAD_TYPE, &no_vibs, &ikey);
    t.case(
        "signed-component-without-vibs",
        400,
        Some("bad_request"),
        |t| t.post("/v1/stage", &body(t, &no_vibs)),
    );
    let mut unknown_field = p.clone();
    unknown_field["post_install"] = json!("rm -rf /");
    unknown_field["serial"] = json!(9);
    let unknown_field = sign(IMAGE_PAYLOAD_TYPE, &unknown_field, &ikey);
    t.case(
        "signed-unknown-field-in-image",
        400,
        Some("bad_request"),
        |t| t.post("/v1/stage", &body(t, &unknown_field)),
    );
    let not_json = Envelope::sign(IMAGE_PAYLOAD_TYPE, b"\x00\xffnot json".to_vec(), &ikey);
    t.case("signed-payload-not-json", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &body(t, &not_json))
    });
    let mut bad_name = p.clone();
    bad_name["name"] = json!("../../etc");
    let bad_name = sign(IMAGE_PAYLOAD_TYPE, &bad_name, &ikey);
    t.case(
        "signed-image-name-traversal",
        400,
        Some("bad_request"),
        |t| t.post("/v1/stage", &body(t, &bad_name)),
    );

    // The depot's bytes do not match the signed descriptor: the task fails, nothing is stored.
    let esx = t.world.add_vibs(&[VibFile {
        component: "Evil".into(),
        version: "1.0".into(),
        ..VibFile::software("evil", 150_000)
    }]);
    let vib_file = t.world.depot_dir.join("vibs").join(&esx[0]);
    let evil = t.world.image("evil", 1, &["Evil=1.0"]);
    let store_dirs = |t: &Target| {
        snapshot(&[
            &t.agent.scratch.join("blobs"),
            &t.agent.scratch.join("ingest"),
            &t.agent.scratch.join("images"),
        ])
    };
    for (name, bytes, code) in [
        (
            "depot-bytes-differ-from-descriptor",
            vibstage_e2e::agent::bytes_for("other", 150_000),
            "checksum_mismatch",
        ),
        (
            "depot-bytes-longer-than-descriptor",
            vibstage_e2e::agent::bytes_for("evil", 150_001),
            "size_mismatch",
        ),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&vib_file, std::fs::Permissions::from_mode(0o644));
        std::fs::write(&vib_file, bytes).expect("replace depot bytes");
        let before = store_dirs(&t);
        let task = t.agent.stage_and_wait(&evil, &url);
        assert_eq!(task["state"], "failed", "case {name}: {task}");
        assert_eq!(task["error"]["code"], code, "case {name}: {task}");
        t.still_serving(name);
        let changes = diff(&before, &store_dirs(&t));
        assert!(
            changes.is_empty(),
            "case {name} stored something: {changes:?}"
        );
        t.cases.push(name.into());
    }
    eprintln!("{} signed-content cases: {:?}", t.cases.len(), t.cases);
}

#[test]
fn a_signature_repeated_does_not_meet_a_threshold_of_two() {
    let mut t = Target::new(AgentOptions::default());
    // Two keys of each role, so that a threshold of 2 can be met at all: a configuration where
    // it cannot is refused at start-up.
    let dir = t.world.dir.path().to_owned();
    for (name, seed) in [("image2", 41u8), ("vendor2", 42u8)] {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let pem = vibstage_protocol::dsse::verifying_key_to_pem(&key.verifying_key()).expect("pem");
        std::fs::write(dir.join(format!("{name}.pub")), pem).expect("pub");
    }
    t.agent.terminate(std::time::Duration::from_secs(10));
    let d = dir.display();
    t.agent.merge_config(&format!(
        "[trust]\nthreshold = 2\n\
         [[trust.keys]]\nfile = \"{d}/image.pub\"\nrole = \"image\"\n\
         [[trust.keys]]\nfile = \"{d}/image2.pub\"\nrole = \"image\"\n\
         [[trust.keys]]\nfile = \"{d}/vendor.pub\"\nrole = \"vib\"\nmax_acceptance = \"partner\"\n\
         [[trust.keys]]\nfile = \"{d}/vendor2.pub\"\nrole = \"vib\"\nmax_acceptance = \"partner\"\n"
    ));
    t.agent.start();
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut twice = image.clone();
    twice.signatures.push(image.signatures[0].clone());
    t.case(
        "signed-duplicate-signature-threshold-2",
        422,
        Some("untrusted_key"),
        |t| t.post("/v1/stage", &t.stage_body(&twice)),
    );
    let mut resigned = image.clone();
    resigned.add_signature(&t.world.image_key);
    t.case(
        "signed-same-key-twice-threshold-2",
        422,
        Some("untrusted_key"),
        |t| t.post("/v1/stage", &t.stage_body(&resigned)),
    );
}

//! The reader of real ESXi content (issue 14, item 1) against the independent builder in
//! `tests/src/vibs.rs`: round trips, byte-exact checks, and every refusal as its own case.

use std::io::Cursor;

use sha2::{Digest as _, Sha256};
use vibstage::vib::{Bundle, Limits, VibError, read_vib};
use vibstage_e2e::vibs::{
    BundleBuild, ComponentBuild, PayloadSpec, ReleaseBuild, VibBuild, ar_archive, gzip, zip_archive,
};
use vibstage_protocol::AcceptanceLevel;

fn sample() -> VibBuild {
    let mut v = VibBuild::new("acme", "nut-client", "2.8.0-1OEM.800", 50_000);
    v.payloads.push(PayloadSpec {
        name: "tools".into(),
        payload_type: "tgz".into(),
        contents: b"second payload".to_vec(),
    });
    v
}

fn refuse(bytes: &[u8]) -> VibError {
    read_vib(Cursor::new(bytes), &Limits::default()).expect_err("refused")
}

#[test]
fn round_trip_is_byte_exact() {
    let v = sample();
    let bytes = v.build();
    assert_eq!(bytes, v.build(), "the builder is deterministic");
    let vib = read_vib(Cursor::new(&bytes), &Limits::default()).expect("valid VIB");
    assert_eq!(vib.xml.id(), v.id());
    assert_eq!(vib.xml.file_name(), v.file_name());
    assert_eq!(vib.descriptor_bytes, v.descriptor_xml().as_bytes());
    assert_eq!(
        vib.sha256.as_bytes(),
        &<[u8; 32]>::from(Sha256::digest(&bytes))
    );
    assert_eq!(vib.size, bytes.len() as u64);
    assert_eq!(vib.xml.acceptance, AcceptanceLevel::Partner);
    assert!(vib.xml.maintenance_mode && !vib.xml.live_install_allowed);
    assert_eq!(vib.xml.payloads.len(), 2);
    assert!(!vib.signed);
}

#[test]
fn refuses_what_is_not_an_ar_archive() {
    assert!(matches!(refuse(b"PK\x03\x04 a zip"), VibError::NotAr));
    assert!(matches!(refuse(b""), VibError::NotAr));
    let mut cut = sample().build();
    cut.truncate(cut.len() - 10);
    assert!(
        matches!(refuse(&cut), VibError::Ar { .. }),
        "{}",
        refuse(&cut)
    );
}

#[test]
fn refuses_a_missing_or_malformed_descriptor() {
    let v = sample();
    let stored = v.stored_payloads();
    let no_descriptor = ar_archive(&[("sig.pkcs7", b""), (&stored[0].0, &stored[0].1)]);
    assert!(matches!(
        refuse(&no_descriptor),
        VibError::DescriptorMissing { .. }
    ));
    let empty = b"!<arch>\n".to_vec();
    assert!(matches!(refuse(&empty), VibError::DescriptorMissing { .. }));
    let broken = v.build_with_descriptor("<vib version=\"5.0\"><name>x</vib>");
    assert!(matches!(refuse(&broken), VibError::Descriptor(_)));
    let no_level = v.build_with_descriptor(
        &v.descriptor_xml()
            .replace("<acceptance-level>partner</acceptance-level>", ""),
    );
    let e = refuse(&no_level);
    assert!(e.to_string().contains("acceptance-level"), "{e}");
}

#[test]
fn refuses_a_missing_payload() {
    let v = sample();
    let stored = v.stored_payloads();
    let xml = v.descriptor_xml();
    let bytes = ar_archive(&[
        ("descriptor.xml", xml.as_bytes()),
        ("sig.pkcs7", b""),
        (&stored[0].0, &stored[0].1),
    ]);
    let e = refuse(&bytes);
    assert!(
        matches!(&e, VibError::PayloadMissing { name } if name == "tools"),
        "{e}"
    );
}

#[test]
fn refuses_a_size_mismatch() {
    let v = sample();
    let stored = v.stored_payloads();
    let xml = v.descriptor_xml();
    let mut longer = stored[1].1.clone();
    longer.push(0);
    let bytes = ar_archive(&[
        ("descriptor.xml", xml.as_bytes()),
        ("sig.pkcs7", b""),
        (&stored[0].0, &stored[0].1),
        (&stored[1].0, &longer),
    ]);
    assert!(matches!(refuse(&bytes), VibError::Size { .. }));
}

#[test]
fn refuses_stored_and_gunzipped_checksum_mismatches() {
    let v = sample();
    // A payload whose stored bytes differ (same length): the stored sha-256 fails.
    let mut other = v.clone();
    other.payloads[1].contents = b"second pAyload".to_vec();
    let mut members = v.stored_payloads();
    members[1] = other.stored_payloads().remove(1);
    let xml = v.descriptor_xml();
    let bytes = ar_archive(&[
        ("descriptor.xml", xml.as_bytes()),
        ("sig.pkcs7", b""),
        (&members[0].0, &members[0].1),
        (&members[1].0, &members[1].1),
    ]);
    let e = refuse(&bytes);
    assert!(
        matches!(
            &e,
            VibError::Checksum {
                which: "stored",
                ..
            }
        ),
        "{e}"
    );

    // Declared gunzip checksum wrong while the stored one is right.
    let good_gunzip = hex::encode(Sha256::digest(&v.payloads[0].contents));
    let bad = v
        .descriptor_xml()
        .replacen(&good_gunzip, &"0".repeat(64), 1);
    let e = refuse(&v.build_with_descriptor(&bad));
    assert!(
        matches!(
            &e,
            VibError::Checksum {
                which: "gunzipped",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn refuses_unknown_checksum_types() {
    let v = sample();
    let bad = v
        .descriptor_xml()
        .replacen("checksum-type=\"sha-1\"", "checksum-type=\"md5\"", 1);
    let e = refuse(&v.build_with_descriptor(&bad));
    assert!(
        matches!(
            &e,
            VibError::Unsupported {
                what: "checksum type",
                ..
            }
        ),
        "{e}"
    );
    let bad =
        v.descriptor_xml()
            .replacen("verify-process=\"gunzip\"", "verify-process=\"txt-mle\"", 1);
    let e = refuse(&v.build_with_descriptor(&bad));
    assert!(
        matches!(
            &e,
            VibError::Unsupported {
                what: "verify-process",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn refuses_path_traversal_in_member_names() {
    let v = sample();
    let xml = v.descriptor_xml();
    for name in ["../../etc/x", "..", ".hidden"] {
        let bytes = ar_archive(&[("descriptor.xml", xml.as_bytes()), (name, b"x")]);
        assert!(matches!(refuse(&bytes), VibError::BadName { .. }), "{name}");
    }
    let bad = v
        .descriptor_xml()
        .replace("name=\"tools\"", "name=\"../tools\"");
    assert!(matches!(
        refuse(&v.build_with_descriptor(&bad)),
        VibError::BadName { .. }
    ));
}

#[test]
fn refuses_duplicate_and_undeclared_members() {
    let v = sample();
    let stored = v.stored_payloads();
    let xml = v.descriptor_xml();
    let dup = ar_archive(&[
        ("descriptor.xml", xml.as_bytes()),
        (&stored[0].0, &stored[0].1),
        (&stored[0].0, &stored[0].1),
    ]);
    assert!(matches!(refuse(&dup), VibError::Duplicate { .. }));
    let extra = ar_archive(&[
        ("descriptor.xml", xml.as_bytes()),
        (&stored[0].0, &stored[0].1),
        (&stored[1].0, &stored[1].1),
        ("evil", b"x"),
    ]);
    assert!(matches!(refuse(&extra), VibError::Undeclared { .. }));
}

#[test]
fn refuses_decompression_bombs() {
    let mut v = VibBuild::new("acme", "bomb", "1.0", 0);
    v.payloads[0].contents = vec![0u8; 8 << 20];
    let bytes = v.build();
    let stored = gzip(&v.payloads[0].contents).len();
    assert!(stored < 16 << 10, "zeros compress well: {stored}");
    let e = refuse(&bytes);
    assert!(
        matches!(&e, VibError::Gunzip { detail, .. } if detail.contains("bomb")),
        "{e}"
    );
    // Within a looser ratio it is fine; an absolute bound still applies.
    let loose = Limits {
        max_ratio: 10_000,
        ..Limits::default()
    };
    read_vib(Cursor::new(&bytes), &loose).expect("within the bounds");
    let capped = Limits {
        max_ratio: 10_000,
        max_expanded: 1 << 20,
        ..Limits::default()
    };
    assert!(matches!(
        read_vib(Cursor::new(&bytes), &capped),
        Err(VibError::Gunzip { .. })
    ));
    // Not gzip at all under a gunzip checksum.
    let mut not_gz = VibBuild::new("acme", "plain", "1.0", 10);
    not_gz.payloads[0].contents = b"x".to_vec();
    let xml = not_gz.descriptor_xml();
    let stored = not_gz.stored_payloads();
    let fake = vec![b'x'; stored[0].1.len()];
    let fixed = xml.replace(
        &hex::encode(Sha256::digest(&stored[0].1)),
        &hex::encode(Sha256::digest(&fake)),
    );
    let bytes = ar_archive(&[("descriptor.xml", fixed.as_bytes()), (&stored[0].0, &fake)]);
    assert!(matches!(refuse(&bytes), VibError::Gunzip { .. }));
}

fn bundle() -> BundleBuild {
    let mut dpu = VibBuild::new("acme", "dpu-agent", "1.0-1", 3000);
    dpu.platforms = vec!["esxio".into()];
    let mut fw = VibBuild::new("dell", "bios-fw", "2.1.0", 5000);
    fw.tags = vec!["firmware".into()];
    BundleBuild {
        vendor: "acme".into(),
        components: vec![
            ComponentBuild {
                name: "ESXi".into(),
                version: "8.0.2-0.20".into(),
                vibs: vec![
                    VibBuild::new("VMW", "esx-base", "8.0.2-0.20", 20_000),
                    VibBuild::new("VMW", "vsan", "8.0.2-0.20", 10_000),
                ],
            },
            ComponentBuild {
                name: "acme-dpu".into(),
                version: "1.0-1".into(),
                vibs: vec![dpu],
            },
            ComponentBuild {
                name: "dell-firmware".into(),
                version: "2.1.0".into(),
                vibs: vec![fw],
            },
        ],
        base_image: Some(ReleaseBuild {
            name: "ESXi".into(),
            version: "8.0.2-0.20".into(),
            vendor: "VMware".into(),
            components: vec![("ESXi".into(), "8.0.2-0.20".into())],
        }),
        addons: vec![ReleaseBuild {
            name: "dell-addon".into(),
            version: "2.1.0".into(),
            vendor: "dell".into(),
            components: vec![("dell-firmware".into(), "2.1.0".into())],
        }],
    }
}

#[test]
fn bundle_round_trip() {
    let b = bundle();
    let bytes = b.build();
    assert_eq!(bytes, b.build());
    let mut opened = Bundle::open(Cursor::new(bytes), &Limits::default()).expect("bundle");
    assert_eq!(opened.vib_paths.len(), 4);
    assert_eq!(opened.bulletins.len(), 3);
    assert_eq!(opened.base_images[0].version, "8.0.2-0.20");
    assert_eq!(opened.addons[0].name, "dell-addon");
    for (path, v, vib_bytes) in b.vib_files() {
        let vib = opened.read_vib(&path).expect("vib");
        assert_eq!(vib.xml.id(), v.id());
        assert_eq!(vib.size, vib_bytes.len() as u64);
        let (component, _) = opened.component_of(&v.id()).expect("one").expect("some");
        assert!(b.components.iter().any(|c| c.name == component.name));
    }
}

#[test]
fn bundle_refusals() {
    let b = bundle();
    let index = b.index_xml();
    let vi = b.vendor_index_xml();
    let meta = b.metadata_zip();
    let vibs = b.vib_files();
    let open = |entries: &[(&str, &[u8])]| {
        Bundle::open(Cursor::new(zip_archive(entries)), &Limits::default()).map(|_| ())
    };
    // Missing index, missing metadata, traversal, duplicate names.
    assert!(open(&[("vendor-index.xml", vi.as_bytes())]).is_err());
    let e = open(&[
        ("index.xml", index.as_bytes()),
        ("vendor-index.xml", vi.as_bytes()),
    ])
    .expect_err("no metadata");
    assert!(e.to_string().contains("metadata.zip"), "{e}");
    let e = open(&[
        ("index.xml", index.as_bytes()),
        ("vendor-index.xml", vi.as_bytes()),
        ("acme-metadata.zip", &meta),
        ("vib20/../../etc/passwd.vib", &vibs[0].2),
    ])
    .expect_err("traversal");
    assert!(matches!(e, VibError::BadName { .. }), "{e}");
    // The zip writer refuses duplicate names, so two names of one length are made equal after.
    let mut dup = zip_archive(&[
        ("index.xml", index.as_bytes()),
        ("vendor-index.xml", vi.as_bytes()),
        ("acme-metadata.zip", &meta),
        ("vib20/a/x1.vib", &vibs[0].2),
        ("vib20/a/x2.vib", &vibs[1].2),
    ]);
    let (from, to) = (b"vib20/a/x2.vib", b"vib20/a/x1.vib");
    let mut i = 0;
    while i + from.len() <= dup.len() {
        if &dup[i..i + from.len()] == from {
            dup[i..i + from.len()].copy_from_slice(to);
        }
        i += 1;
    }
    let e = Bundle::open(Cursor::new(dup), &Limits::default())
        .map(|_| ())
        .expect_err("duplicate");
    assert!(matches!(e, VibError::Duplicate { .. }), "{e}");
    // A zip bomb among the metadata.
    let bomb_xml = vec![b' '; 64 << 20];
    let e = open(&[("index.xml", &bomb_xml)]).expect_err("bomb");
    // Stopped at the XML bound (4 MiB), not at 200 times its compressed size (13 MB here).
    assert!(
        matches!(e, VibError::TooLarge { limit, .. } if limit == Limits::default().max_xml),
        "{e}"
    );
    // A VIB whose bytes disagree with the metadata's record.
    let mut tampered = vibs[0].2.clone();
    let mid = tampered.len() - 5;
    tampered[mid] ^= 1;
    let mut entries: Vec<(&str, &[u8])> = vec![
        ("index.xml", index.as_bytes()),
        ("vendor-index.xml", vi.as_bytes()),
        ("acme-metadata.zip", &meta),
    ];
    entries.push((&vibs[0].0, &tampered));
    let mut opened =
        Bundle::open(Cursor::new(zip_archive(&entries)), &Limits::default()).expect("opens");
    assert!(opened.read_vib(&vibs[0].0).is_err());
}

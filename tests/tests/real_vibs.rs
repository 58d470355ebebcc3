//! Real ESXi content end to end (issue 14): an offline bundle with several components, a
//! firmware add-on and a DPU VIB is imported with `vibstagectl depot import`, an image is made
//! with `image create --from-bundle`, and a real agent stages it; a VIB whose payload disagrees
//! with its own descriptor is refused at import; a depot serving another real VIB under a
//! descriptor re-signed for its bytes is refused by the agent.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use vibstage_ctl::cli::{Cli, run};
use vibstage_e2e::vibs::{BundleBuild, ComponentBuild, ReleaseBuild, VibBuild};
use vibstage_e2e::{AgentOptions, World};
use vibstage_protocol::dsse::signing_key_to_pem;
use vibstage_protocol::{Envelope, VIB_PAYLOAD_TYPE, VibDescriptor};

/// Runs vibstagectl in-process; returns its stdout or its error.
fn ctl(args: &[&str]) -> Result<String, String> {
    let cli = Cli::try_parse_from(std::iter::once("vibstagectl").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    run(cli, &mut out).map_err(|e| e.to_string())?;
    Ok(String::from_utf8(out).expect("utf8"))
}

fn keys(world: &World) -> (String, String) {
    let dir = world.dir.path();
    let vendor = dir.join("vendor.key");
    let image = dir.join("image.key");
    std::fs::write(&vendor, signing_key_to_pem(&world.vendor_key).expect("pem")).expect("key");
    std::fs::write(&image, signing_key_to_pem(&world.image_key).expect("pem")).expect("key");
    (s(&vendor), s(&image))
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf8 path").to_owned()
}

fn bundle() -> BundleBuild {
    let mut dpu = VibBuild::new("acme", "dpu-agent", "1.0-1", 200_000);
    dpu.platforms = vec!["esxio".into()];
    let mut fw = VibBuild::new("dell", "bios-fw", "2.1.0", 300_000);
    fw.tags = vec!["firmware".into()];
    let mut live = VibBuild::new("acme", "nut-client", "2.8.0-1", 50_000);
    live.live_install = true;
    live.maintenance_mode = false;
    BundleBuild {
        vendor: "acme".into(),
        components: vec![
            ComponentBuild {
                name: "ESXi".into(),
                version: "8.0.2-0.20".into(),
                vibs: vec![
                    VibBuild::new("acme", "esx-base", "8.0.2-0.20", 1 << 20),
                    VibBuild::new("acme", "vsan", "8.0.2-0.20", 400_000),
                ],
            },
            ComponentBuild {
                name: "acme-dpu".into(),
                version: "1.0-1".into(),
                vibs: vec![dpu],
            },
            ComponentBuild {
                name: "nut-client".into(),
                version: "2.8.0-1".into(),
                vibs: vec![live],
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
            vendor: "acme".into(),
            components: vec![
                ("ESXi".into(), "8.0.2-0.20".into()),
                ("acme-dpu".into(), "1.0-1".into()),
                ("nut-client".into(), "2.8.0-1".into()),
            ],
        }),
        addons: vec![ReleaseBuild {
            name: "dell-addon".into(),
            version: "2.1.0".into(),
            vendor: "dell".into(),
            components: vec![("dell-firmware".into(), "2.1.0".into())],
        }],
    }
}

fn descriptors(depot: &Path) -> Vec<VibDescriptor> {
    let mut out: Vec<VibDescriptor> = std::fs::read_dir(depot.join("descriptors"))
        .expect("descriptors")
        .map(|e| {
            let env: Envelope =
                serde_json::from_slice(&std::fs::read(e.expect("entry").path()).expect("read"))
                    .expect("envelope");
            serde_json::from_slice(&env.payload).expect("descriptor")
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[test]
fn a_bundle_is_imported_made_into_an_image_and_staged() {
    let world = World::new();
    let (vendor_key, image_key) = keys(&world);
    let bundle_path = world.dir.path().join("acme-offline-bundle.zip");
    std::fs::write(&bundle_path, bundle().build()).expect("bundle");
    let depot = s(&world.depot_dir);

    let out = ctl(&[
        "depot",
        "import",
        "--depot",
        &depot,
        "--key",
        &vendor_key,
        &s(&bundle_path),
    ])
    .expect("import");
    assert!(
        out.contains("5 VIB(s): 5 written, 0 already present"),
        "{out}"
    );
    let d = descriptors(&world.depot_dir);
    let by = |n: &str| d.iter().find(|x| x.name.as_str() == n).expect(n);
    assert_eq!(by("esx-base").component.as_str(), "ESXi");
    assert_eq!(by("dpu-agent").target, vibstage_protocol::VibTarget::Dpu);
    assert_eq!(by("bios-fw").kind, vibstage_protocol::VibKind::Firmware);
    assert_eq!(by("bios-fw").vendor, "dell");
    assert!(!by("nut-client").maintenance_mode && !by("nut-client").reboot_required);
    assert!(by("vsan").maintenance_mode && by("vsan").reboot_required);

    // Idempotent: a second import writes nothing.
    let again = ctl(&[
        "depot",
        "import",
        "--depot",
        &depot,
        "--key",
        &vendor_key,
        &s(&bundle_path),
    ])
    .expect("again");
    assert!(again.contains("0 written, 5 already present"), "{again}");

    let image_file = world.depot_dir.join("images/esx-8.0u2.json");
    ctl(&[
        "image",
        "create",
        "--depot",
        &depot,
        "--key",
        &image_key,
        "--name",
        "esx-8.0u2",
        "--serial",
        "1",
        "--from-bundle",
        &s(&bundle_path),
        "--vib-key",
        &s(&world.dir.path().join("vendor.pub")),
    ])
    .expect("image create");
    let env: Envelope =
        serde_json::from_slice(&std::fs::read(&image_file).expect("image")).expect("envelope");
    let image: vibstage_protocol::Image = serde_json::from_slice(&env.payload).expect("image");
    assert_eq!(image.base_image.as_str(), "8.0.2-0.20");
    let names: Vec<&str> = image.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["ESXi", "acme-dpu", "nut-client", "dell-firmware"]);

    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            dpus: vec!["dpu0".into()],
            firmware_vendors: vec!["dell".into()],
            ..AgentOptions::default()
        },
    );
    agent.start();
    let task = agent.stage_and_wait(&env, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    let status = agent.status();
    assert_eq!(status["staging"]["staged"], true, "{status}");
    assert_eq!(status["staging"]["dpu"], "staged", "{status}");
    assert_eq!(status["staging"]["firmware"], "staged", "{status}");
    assert_eq!(agent.blobs().len(), 5);
}

#[test]
fn a_payload_that_disagrees_with_its_descriptor_is_refused_at_import() {
    let world = World::new();
    let (vendor_key, _) = keys(&world);
    let v = VibBuild::new("acme", "esx-base", "8.0.2-0.20", 100_000);
    let mut bytes = v.build();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    let file = world.dir.path().join(v.file_name());
    std::fs::write(&file, &bytes).expect("vib");
    let depot = world.dir.path().join("fresh-depot");
    let e = ctl(&[
        "depot",
        "import",
        "--depot",
        &s(&depot),
        "--key",
        &vendor_key,
        &s(&file),
    ])
    .expect_err("refused");
    assert!(e.starts_with("checksum_mismatch:"), "{e}");
    assert!(e.contains("esx-base") || e.contains(&v.file_name()), "{e}");
    assert!(!depot.exists(), "nothing is written on a refusal");

    // A VIB declaring more than the key may sign is refused too, with the flag to pass.
    let mut certified = VibBuild::new("VMW", "esx-ui", "2.1", 1000);
    certified.acceptance = "certified".into();
    let file = world.dir.path().join(certified.file_name());
    std::fs::write(&file, certified.build()).expect("vib");
    let e = ctl(&[
        "depot",
        "import",
        "--depot",
        &s(&depot),
        "--key",
        &vendor_key,
        &s(&file),
    ])
    .expect_err("above the key");
    assert!(e.contains("--max-acceptance certified"), "{e}");
    assert!(!depot.exists());
    ctl(&[
        "depot",
        "import",
        "--depot",
        &s(&depot),
        "--key",
        &vendor_key,
        "--max-acceptance",
        "certified",
        &s(&file),
    ])
    .expect("allowed with the flag");
}

#[test]
fn a_depot_serving_another_real_vib_under_a_re_signed_descriptor_is_refused_by_the_agent() {
    let world = World::new();
    let (vendor_key, image_key) = keys(&world);
    let real = VibBuild::new("acme", "esx-base", "8.0.2-0.20", 300_000);
    let file = world.dir.path().join(real.file_name());
    std::fs::write(&file, real.build()).expect("vib");
    let depot = s(&world.depot_dir);
    ctl(&[
        "depot",
        "import",
        "--depot",
        &depot,
        "--key",
        &vendor_key,
        &s(&file),
    ])
    .expect("import");

    // The depot swaps in another real VIB and re-signs the descriptor (names unchanged) for
    // its bytes: signatures, size and sha256 all agree, the VIB itself does not.
    let other = VibBuild::new("evil", "rootkit", "6.6.6", 300_000).build();
    let digest = vibstage_protocol::Digest::of(&other);
    let old = descriptors(&world.depot_dir).remove(0);
    std::fs::remove_file(
        world
            .depot_dir
            .join(format!("descriptors/{}.json", old.sha256)),
    )
    .expect("rm");
    std::fs::write(world.depot_dir.join("vibs").join(digest.to_hex()), &other).expect("blob");
    let forged = VibDescriptor {
        sha256: digest,
        size: other.len() as u64,
        ..old
    };
    let env = Envelope::sign(
        VIB_PAYLOAD_TYPE,
        serde_json::to_vec(&forged).expect("json"),
        &world.vendor_key,
    );
    std::fs::write(
        world
            .depot_dir
            .join(format!("descriptors/{}.json", digest.to_hex())),
        serde_json::to_vec(&env).expect("json"),
    )
    .expect("descriptor");
    ctl(&[
        "image",
        "create",
        "--depot",
        &depot,
        "--key",
        &image_key,
        "--name",
        "esx",
        "--serial",
        "1",
        "--base-image",
        "8.0.2-0.20",
        "--component",
        "esx-base=8.0.2-0.20",
    ])
    .expect("image");
    let image: Envelope = serde_json::from_slice(
        &std::fs::read(world.depot_dir.join("images/esx.json")).expect("image"),
    )
    .expect("envelope");

    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            retries: Some(0),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["error"]["code"], "checksum_mismatch", "{task}");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("descriptor.xml names rootkit"),
        "{message}"
    );
    assert!(agent.blobs().is_empty(), "nothing entered the store");
    let partials: Vec<PathBuf> = std::fs::read_dir(agent.scratch.join("ingest"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(partials.is_empty(), "{partials:?}");
}

#[test]
fn install_command_gets_real_vib_file_names() {
    let world = World::new();
    let (vendor_key, image_key) = keys(&world);
    let vibs = [
        VibBuild::new("acme", "esx-base", "8.0.2-0.20", 100_000),
        VibBuild::new("acme", "vsan", "8.0.2-0.20", 50_000),
    ];
    let mut files = Vec::new();
    for v in &vibs {
        let f = world.dir.path().join(format!("{}.vib", v.name));
        std::fs::write(&f, v.build()).expect("vib");
        files.push(s(&f));
    }
    let depot = s(&world.depot_dir);
    let mut args = vec!["depot", "import", "--depot", &depot, "--key", &vendor_key];
    args.extend(files.iter().map(String::as_str));
    ctl(&args).expect("import");
    ctl(&[
        "image",
        "create",
        "--depot",
        &depot,
        "--key",
        &image_key,
        "--name",
        "esx",
        "--serial",
        "1",
        "--base-image",
        "8.0.2-0.20",
        "--component",
        "esx-base=8.0.2-0.20",
        "--component",
        "vsan=8.0.2-0.20",
    ])
    .expect("image");
    let image: Envelope = serde_json::from_slice(
        &std::fs::read(world.depot_dir.join("images/esx.json")).expect("image"),
    )
    .expect("envelope");

    // The hook records each argument's file name and that it reads as the VIB it names.
    let log = world.dir.path().join("install.log");
    let agent = world.agent("esx-01", AgentOptions::default());
    let hook = format!(
        "\n[install]\ncommand = [\"sh\", \"-c\", \"for v; do echo $(basename $v) $(head -c 8 $v | tr -d '\\\\n'); done >> {}\", \"install\"]\n",
        log.display()
    );
    agent.merge_config(&hook);
    let mut agent = agent;
    agent.start();
    let r = agent.request(
        "POST",
        "/v1/remediate",
        Some(&serde_json::json!({"image": image, "depot": world.depot.url()})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json["task"]["id"].as_str().expect("id").to_owned();
    let task = agent.wait_task(&id, 120);
    assert_eq!(task["state"], "succeeded", "{task}");
    let text = std::fs::read_to_string(&log).expect("hook ran");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "acme_bootbank_esx-base_8.0.2-0.20.vib !<arch>",
            "acme_bootbank_vsan_8.0.2-0.20.vib !<arch>"
        ],
        "{text}"
    );
    // The links are gone after the command.
    let leftovers: Vec<_> = std::fs::read_dir(&agent.state_dir)
        .expect("state dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("install-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

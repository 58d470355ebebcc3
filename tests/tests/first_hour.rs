//! Issue 17, "the first hour": what a new operator meets — correctness of `staged rm`, errors that
//! say what to do, readable screens.

use std::process::{Command, Output};

use serde_json::Value;
use vibstage_e2e::terminal::{screen_lines, through_a_terminal};
use vibstage_e2e::{AgentOptions, AgentProc, VibFile, World, vibstagectl};

fn ctl(world: &World, agents: &[&AgentProc], args: &[&str]) -> Output {
    let mut cmd = Command::new(vibstagectl());
    cmd.arg("--tls-dir").arg(&world.tls_dir);
    for a in agents {
        cmd.arg("--host").arg(a.addr());
    }
    cmd.args(args).output().expect("run vibstagectl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

/// Item 1: deleting staged content re-evaluates compliance; a host whose staged image is gone is
/// not `staged` any more.
#[test]
fn staged_rm_makes_compliance_non_compliant_again() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    let env = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();
    let task = a.stage_and_wait(&env, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    let s = a.status();
    assert_eq!(s["compliance"]["status"], "staged", "{s}");
    let digest = s["compliance"]["image"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();

    let out = ctl(&world, &[&a], &["staged", "rm", &digest]);
    assert!(out.status.success(), "{}", text(&out));
    let s = a.status();
    assert_eq!(s["compliance"]["status"], "non_compliant", "{s}");
    assert_eq!(s["staging"]["staged"], false, "{s}");
    // And it stays so across a restart (the re-evaluation is persisted).
    a.terminate(std::time::Duration::from_secs(10));
    a.start();
    let s = json_of(&ctl(&world, &[&a], &["--json", "status"]));
    assert_eq!(s[a.addr()]["compliance"]["status"], "non_compliant", "{s}");
}

/// Item 4: the notification that explains `staged=false` is printed in plain output, without
/// `--json`; with the vendor configured the host reaches `staged=true`.
#[test]
fn plain_output_prints_notifications() {
    let world = World::new();
    world.add_vibs(&[
        VibFile::software("esx-base", 100_000),
        VibFile::firmware("bios", "dell", 50_000),
    ]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20", "BIOS=2.1"]);
    let image = world.depot_dir.join("images/esx-8.0u2.json");
    let image = image.to_str().expect("utf8");
    let url = world.depot.url();
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();
    let out = ctl(
        &world,
        &[&a],
        &["stage", "--image", image, "--depot", &url, "--wait"],
    );
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("note: firmware_staging_unsupported: "),
        "{shown}"
    );
    let out = ctl(&world, &[&a], &["status"]);
    let shown = text(&out);
    assert!(
        shown.contains("note: firmware_staging_unsupported: "),
        "{shown}"
    );

    let mut b = world.agent(
        "esx-02",
        AgentOptions {
            firmware_vendors: vec!["dell".into()],
            ..AgentOptions::default()
        },
    );
    b.start();
    let out = ctl(
        &world,
        &[&b],
        &["stage", "--image", image, "--depot", &url, "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let s = b.status();
    assert_eq!(s["staging"]["staged"], true, "{s}");
}

/// Item 8: a failed operation names the command and the host, not `internal`; a malformed
/// depot URL is a usage error (2) caught before any host is asked.
#[test]
fn failures_name_the_host_and_bad_depot_urls_are_usage_errors() {
    let world = World::new();
    let digests = world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let image = world.depot_dir.join("images/esx-8.0u2.json");
    let image = image.to_str().expect("utf8");
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();
    for bad in ["htp://127.0.0.1:1/", "depot.example/path", "127.0.0.1:8080"] {
        let out = ctl(&world, &[&a], &["stage", "--image", image, "--depot", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(
            text(&out).contains("expected a depot base URL"),
            "{}",
            text(&out)
        );
    }
    assert!(
        a.request("GET", "/v1/tasks", None).json["tasks"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );

    std::fs::remove_file(world.depot_dir.join("vibs").join(&digests[0])).expect("rm");
    let out = ctl(
        &world,
        &[&a],
        &[
            "stage",
            "--image",
            image,
            "--depot",
            &world.depot.url(),
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("internal"), "{err}");
    assert!(
        err.contains(&format!("error: stage failed on {}", a.addr())),
        "{err}"
    );
}

/// Item 9: no agent on the socket, and a user other than root, each get a sentence saying what
/// to do (exit 3), not a raw `os error`.
#[test]
fn local_socket_mistakes_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("vibstaged.sock");
    let out = Command::new(vibstagectl())
        .arg("--socket")
        .arg(&missing)
        .arg("status")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no agent listening at {}: is vibstaged running? use --socket",
            missing.display()
        )),
        "{err}"
    );
    assert!(err.contains("--host"), "{err}");
    assert!(!err.contains("os error"), "{err}");

    let world = World::new();
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();
    // The agent's directory is private to root; let the socket's own mode (0600) decide.
    let mut p = a.socket.parent().map(std::path::Path::to_path_buf);
    while let Some(dir) = p {
        if dir == world.dir.path().parent().unwrap_or(&dir) {
            break;
        }
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&dir).expect("stat").permissions().mode();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o011))
            .expect("chmod");
        p = dir.parent().map(std::path::Path::to_path_buf);
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vibstagectl())
        .arg("--socket")
        .arg(&a.socket)
        .arg("status")
        .output()
        .expect("run setpriv");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the local socket is root-only: run as root"),
        "{err}"
    );
    assert!(err.contains("--host"), "{err}");
}

/// Item 11: `task ID` with several hosts is refused with the reason (ids differ per host).
#[test]
fn task_id_with_several_hosts_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("fleet.txt");
    std::fs::write(&hosts, "esx-01\nesx-02:9443\n").expect("fleet");
    let out = Command::new(vibstagectl())
        .arg("--tls-dir")
        .arg(dir.path())
        .arg("--hosts")
        .arg(&hosts)
        .args(["task", "abc", "--wait"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ids differ from host to host"), "{err}");
    assert!(err.contains("single --host"), "{err}");
}

/// Item 13: `status` of several hosts is a table with a header and human sizes; `tasks` prints
/// one task a line.
#[test]
fn status_is_a_table_and_tasks_one_a_line() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    let env = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut a = world.agent("esx-01", AgentOptions::default());
    let mut b = world.agent("esx-02", AgentOptions::default());
    a.start();
    b.start();
    let url = world.depot.url();
    a.stage_and_wait(&env, &url);
    let out = ctl(&world, &[&a, &b], &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "HOST",
            "COMPLIANCE",
            "STAGED",
            "FIRMWARE",
            "SCRATCH",
            "FREE",
            "TASK",
            "HOST",
            "ID"
        ],
        "{stdout}"
    );
    let row_a = lines
        .iter()
        .find(|l| l.starts_with(&a.addr()))
        .expect("row a");
    let cols: Vec<&str> = row_a.split_whitespace().collect();
    assert_eq!(&cols[1..4], ["staged", "true", "not_applicable"], "{row_a}");
    assert!(
        ["B", "KiB", "MiB", "GiB", "TiB"].contains(&cols[5]),
        "free space in human units: {row_a}"
    );
    assert_eq!(cols.last(), Some(&"esx-01"), "{row_a}");
    let row_b = lines
        .iter()
        .find(|l| l.starts_with(&b.addr()))
        .expect("row b");
    // Columns line up: every row starts its compliance where the header says.
    let at = lines[0].find("COMPLIANCE").expect("col");
    assert_eq!(row_a.find("staged"), Some(at), "{stdout}");
    assert_eq!(row_b.find("unknown"), Some(at), "{stdout}");
    assert!(stdout.contains("summary: 2 hosts: 2 ok"), "{stdout}");

    let out = ctl(&world, &[&a], &["tasks"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let task_lines: Vec<&str> = stdout.lines().filter(|l| l.contains("stage ")).collect();
    assert_eq!(task_lines.len(), 1, "{stdout}");
    assert!(task_lines[0].contains("succeeded"), "{stdout}");
    assert!(stdout.contains("1 task:"), "{stdout}");
}

/// Item 10: a `.vib` given as `--image`, an image signed by the vendor (`vib`) key, and a TLS
/// key that does not match its certificate each say which file is wrong and why.
#[test]
fn wrong_files_are_named_with_what_they_are() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    let mut a = world.agent("esx-01", AgentOptions::default());
    a.start();

    let vib = world.dir.path().join("esx-base.vib");
    let mut ar = b"!<arch>\n".to_vec();
    ar.extend_from_slice(&[0xff, 0xfe, 0x00, 0x80]);
    std::fs::write(&vib, ar).expect("vib");
    let out = ctl(
        &world,
        &[&a],
        &["check", "--image", vib.to_str().expect("utf8")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is a VIB file (an ar archive), not a signed image"),
        "{err}"
    );
    assert!(err.contains("images/NAME.json"), "{err}");
    assert!(!err.contains("UTF-8"), "{err}");

    // An image signed with the vendor's key, which the agent trusts only for descriptors.
    let spec = vibstage_ctl::publish::image::ImageSpec {
        name: "esx-8.0u2".parse().expect("name"),
        serial: 1,
        expires: time::OffsetDateTime::now_utc() + time::Duration::days(30),
        base_image: vibstage_protocol::version::Version::from("8.0.2-0.20"),
        components: vec!["ESXi=8.0.2-0.20".parse().expect("component")],
    };
    let created = vibstage_ctl::publish::image::create(
        &world.depot_dir,
        &world.vendor_key,
        &spec,
        &[world.vendor_key.verifying_key()],
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
        &mut |_| {},
    )
    .expect("create");
    let image = created.path.to_str().expect("utf8").to_owned();
    let out = ctl(&world, &[&a], &["check", "--image", &image]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    let vendor_pub = world.dir.path().join("vendor.pub");
    assert!(shown.contains("untrusted_key"), "{shown}");
    assert!(
        shown.contains(&format!(
            "{} (role vib, up to partner)",
            vendor_pub.display()
        )),
        "{shown}"
    );
    // `image verify` names the file as given.
    let out = Command::new(vibstagectl())
        .args(["image", "verify", "--image-key"])
        .arg(world.dir.path().join("image.pub"))
        .arg("--vib-key")
        .arg(&vendor_pub)
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "{} (given as --vib-key) (role vib",
            vendor_pub.display()
        )),
        "{}",
        text(&out)
    );

    // tls.key from another certificate.
    let other = world.agent("esx-02", AgentOptions::default());
    std::fs::copy(other.home.join("agent.key"), a.home.join("agent.key")).expect("copy key");
    let out = Command::new(vibstage_e2e::vibstaged())
        .arg("--config")
        .arg(&a.config)
        .arg("--check-config")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the private key in tls.key ({}) does not match the certificate in tls.cert ({})",
            a.home.join("agent.key").display(),
            a.home.join("agent.pem").display()
        )),
        "{err}"
    );
}

/// Item 6: a depot certificate from an unknown issuer fails at once, saying to set depot.ca;
/// SIGHUP applies a new depot.ca, and names the changed keys that need a restart.
#[test]
fn untrusted_depot_certificate_says_set_depot_ca_and_sighup_applies_it() {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 100_000)]);
    let env = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let mut a = world.agent("esx-01", AgentOptions::default());
    let config = std::fs::read_to_string(&a.config).expect("config");
    let right = format!("ca = \"{}\"", world.depot_pki.ca_pem_path().display());
    assert!(config.contains(&right), "{config}");
    // Another CA than the depot's: the controller CA.
    let wrong = format!("ca = \"{}\"", world.tls_dir.join("ca.pem").display());
    std::fs::write(&a.config, config.replace(&right, &wrong)).expect("config");
    a.start();

    let task = a.stage_and_wait(&env, &world.depot.url());
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["error"]["code"], "depot_unreachable", "{task}");
    let message = task["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("the depot's certificate is not trusted"),
        "{message}"
    );
    assert!(message.contains("set depot.ca"), "{message}");
    assert!(
        !a.log_text().contains("retrying download"),
        "a trust failure is not retried: {}",
        a.log_text()
    );

    // Fix depot.ca, change a key that needs a restart, and reload.
    let fixed = config.replace("reserve_bytes = 0", "reserve_bytes = 4096");
    assert_ne!(fixed, config, "{config}");
    std::fs::write(&a.config, fixed).expect("config");
    a.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !a.log_text().contains("depot settings reloaded") {
        assert!(std::time::Instant::now() < deadline, "{}", a.log_text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = a.log_text();
    assert!(
        log.contains("only take effect after a restart") && log.contains("scratch.reserve_bytes"),
        "{log}"
    );
    let task = a.stage_and_wait(&env, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
}

/// Item 14: `stage --wait` in a terminal: a line for every host from the start, bars with sizes
/// once known (never `0 B/0 B`), the total with rate and ETA, a done line per host, a host that
/// is down reported once with its reason, final lines in the bars' units.
#[test]
fn stage_progress_in_a_terminal() {
    let world = World::new();
    let digests = world.add_vibs(&[VibFile::software("esx-base", 600_000)]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    world.depot.fault(
        &vibstage_e2e::Depot::vib_path(&digests[0]),
        vibstage_e2e::Fault::SlowDrip {
            bytes_per_sec: 200_000,
        },
        2,
    );
    let mut a = world.agent("esx-01", AgentOptions::default());
    let mut b = world.agent("esx-02", AgentOptions::default());
    a.start();
    b.start();
    // A host whose first poll fails: its line says it is retrying, and why.
    let polls = std::sync::atomic::AtomicUsize::new(0);
    let flaky = vibstage_e2e::FakeAgent::start(
        &world.ca,
        &world.dir.path().join("fake-flaky"),
        move |r| match r.method.as_str() {
            "POST" => vibstage_e2e::Answer::Json(
                202,
                serde_json::json!({"task": vibstage_e2e::fake_agent::task("f1", "running", (0, 1000), None)}),
            ),
            _ if polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => {
                vibstage_e2e::Answer::Raw {
                    status: 503,
                    headers: vec![],
                    body: b"try later".to_vec(),
                }
            }
            _ => vibstage_e2e::Answer::Json(
                200,
                vibstage_e2e::fake_agent::task("f1", "succeeded", (1000, 1000), None),
            ),
        },
    );
    let dead = "127.0.0.1:1".to_owned();
    let mut args = vec!["--tls-dir".to_owned(), world.tls_dir.display().to_string()];
    for h in [a.addr(), b.addr(), dead.clone(), flaky.addr()] {
        args.extend(["--host".to_owned(), h]);
    }
    let image = world.depot_dir.join("images/esx-8.0u2.json");
    args.extend(
        [
            "stage",
            "--image",
            image.to_str().expect("utf8"),
            "--depot",
            &world.depot.url(),
            "--wait",
        ]
        .map(str::to_owned),
    );
    let (code, raw) = through_a_terminal(world.dir.path(), &args);
    let lines = screen_lines(&raw);
    let shown = lines.join("\n");
    assert_eq!(code, Some(3), "{shown}");
    // Every host has its line from the start.
    for host in [a.addr(), b.addr()] {
        assert!(
            lines
                .iter()
                .any(|l| l.trim_start().starts_with(&host) && !l.contains('[')),
            "no waiting line for {host}: {shown}"
        );
        // A bar with sizes, once known.
        assert!(
            lines.iter().any(|l| l.trim_start().starts_with(&host)
                && l.contains("] ")
                && l.contains("KiB/")),
            "no bar with sizes for {host}: {shown}"
        );
        // Its done line, in the bars' units.
        let done = format!("{host}: succeeded task ");
        let line = lines
            .iter()
            .find(|l| l.starts_with(&done))
            .unwrap_or_else(|| panic!("{shown}"));
        assert!(
            line.ends_with("(585.94 KiB needed, 585.94 KiB downloaded)"),
            "{line}"
        );
    }
    assert!(!shown.contains("0 B/0 B"), "{shown}");
    // The total: rate and ETA.
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("total [") && l.contains("/s ETA")),
        "{shown}"
    );
    // The host that is down: once, with the reason.
    let dead_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with(&format!("{dead}: ")))
        .collect();
    assert_eq!(dead_lines.len(), 1, "{shown}");
    assert!(dead_lines[0].contains("unreachable"), "{shown}");
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with(&flaky.addr())
                && l.contains("retry 1/5 in 2s: HTTP 503: try later")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("{}: succeeded task f1", flaky.addr())),
        "{shown}"
    );
    assert!(
        shown.contains("summary: 4 hosts: 3 ok, 1 unreachable or refused"),
        "{shown}"
    );
    eprintln!("{shown}");
}

/// Item 7: a second agent on one machine that shares the first one's `volatile_path` is told
/// which key to change.
#[test]
fn second_agent_on_a_taken_volatile_path_names_the_key() {
    let world = World::new();
    let shared = world.dir.path().join("volatile");
    let opts = AgentOptions {
        volatile: Some(shared.display().to_string()),
        ..AgentOptions::default()
    };
    let mut first = world.agent("esx-01", opts.clone());
    first.start();
    let mut second = world.agent("esx-02", opts);
    second.spawn();
    let status = second
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("the second agent exits");
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("scratch.volatile_path is in use by another agent: give this agent its own scratch.volatile_path"),
        "{log}"
    );
}

//! Issue 18: a compromised host must not steer the controller.
//!
//! The real `vibstagectl` against hosts that lie ([`FakeAgent`]: mutual TLS with the fleet's own
//! CA, scripted answers), mostly beside real agents. Each test is named after the failure it
//! prevents and checks what the operator sees, the exit code, the controller's peak memory
//! (VmHWM, read from /proc while it runs), how many requests the fake got, and that no other
//! host received anything it should not.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vibstage_e2e::fake_agent::{status as fake_status, task as fake_task};
use vibstage_e2e::{AgentOptions, AgentProc, Answer, FakeAgent, Seen, VibFile, World, vibstagectl};

/// What one run of `vibstagectl` showed.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stdout_raw: Vec<u8>,
    stderr: String,
    /// Each stdout line with when it arrived, from the start.
    lines: Vec<(Duration, String)>,
    /// The highest VmHWM seen, in KiB.
    peak_kib: u64,
    took: Duration,
}

/// The controller may not use more than this, whatever a host sends.
const RSS_LIMIT_KIB: u64 = 96 * 1024;

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs vibstagectl with `args`, watching its memory; sends SIGINT once stdout lines have
/// contained every one of `interrupt_on`. Kills it (and the test fails on the result) past
/// `limit` or [`RSS_LIMIT_KIB`].
fn run(args: &[String], limit: Duration, interrupt_on: Option<&[String]>) -> Ran {
    let start = Instant::now();
    let mut child = Command::new(vibstagectl())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vibstagectl");
    let pid = child.id();
    let lines = Arc::new(Mutex::new(Vec::<(Duration, Vec<u8>)>::new()));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            loop {
                let mut line = Vec::new();
                match stdout.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => lines.lock().expect("lines").push((start.elapsed(), line)),
                }
            }
        })
    };
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let mut peak = 0;
    let mut interrupted = false;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if let Some(needles) = interrupt_on
            && !interrupted
            && needles.iter().all(|needle| {
                lines
                    .lock()
                    .expect("lines")
                    .iter()
                    .any(|(_, l)| String::from_utf8_lossy(l).contains(needle.as_str()))
            })
        {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .expect("SIGINT");
            interrupted = true;
        }
        if start.elapsed() > limit || peak > RSS_LIMIT_KIB {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = start.elapsed();
    let _ = reader.join();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let lines: Vec<(Duration, Vec<u8>)> = lines.lock().expect("lines").clone();
    let stdout_raw: Vec<u8> = lines.iter().flat_map(|(_, l)| l.clone()).collect();
    Ran {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout_raw).into_owned(),
        stdout_raw,
        stderr,
        lines: lines
            .into_iter()
            .map(|(t, l)| (t, String::from_utf8_lossy(&l).trim_end().to_owned()))
            .collect(),
        peak_kib: peak,
        took,
    }
}

/// `--tls-dir` and one `--host` per target, then `rest`.
fn args(world: &World, hosts: &[String], rest: &[&str]) -> Vec<String> {
    let mut v = vec!["--tls-dir".to_owned(), world.tls_dir.display().to_string()];
    for h in hosts {
        v.push("--host".into());
        v.push(h.clone());
    }
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

/// A world with one small image, and its image file path.
fn world_with_image() -> (World, String) {
    let world = World::new();
    world.add_vibs(&[VibFile::software("esx-base", 200_000)]);
    world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let image = world
        .depot_dir
        .join("images/esx-8.0u2.json")
        .display()
        .to_string();
    (world, image)
}

fn fake(
    world: &World,
    name: &str,
    script: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
) -> FakeAgent {
    FakeAgent::start(
        &world.ca,
        &world.dir.path().join(format!("fake-{name}")),
        script,
    )
}

fn good_agent(world: &World, name: &str) -> AgentProc {
    let mut a = world.agent(name, AgentOptions::default());
    a.start();
    a
}

/// The kinds of the tasks a real agent ran.
fn task_kinds(agent: &AgentProc) -> Vec<String> {
    let r = agent.request("GET", "/v1/tasks", None);
    r.json["tasks"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| t["kind"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn line_of<'a>(ran: &'a Ran, host: &str) -> &'a str {
    ran.lines
        .iter()
        .map(|(_, l)| l.as_str())
        .find(|l| is_line_of(l, host))
        .unwrap_or_else(|| panic!("no line for {host}: {ran:#?}"))
}

#[test]
fn redirect_to_another_host_is_not_followed_issue18() {
    let (world, image) = world_with_image();
    let good = good_agent(&world, "good");
    let victim = fake(&world, "victim", |_| Answer::Json(200, json!({})));
    // The hostile host sends the signed image on to the good agent's remediate, and would have
    // the victim get the next request.
    let target = format!("https://{}/v1/remediate", good.addr());
    let hostile = fake(&world, "hostile", move |_| Answer::Raw {
        status: 307,
        headers: vec![("Location".into(), target.clone())],
        body: vec![],
    });
    let hosts = [good.addr(), hostile.addr()];
    let url = world.depot.url();
    let ran = run(
        &args(
            &world,
            &hosts,
            &["stage", "--image", &image, "--depot", &url, "--wait"],
        ),
        Duration::from_secs(60),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    assert!(
        line_of(&ran, &good.addr()).contains("succeeded"),
        "{ran:#?}"
    );
    let line = line_of(&ran, &hostile.addr());
    assert!(
        line.contains("protocol_violation") && line.contains("never follows redirects"),
        "{line}"
    );
    assert_eq!(hostile.requests().len(), 1, "one POST, nothing more");
    assert_eq!(hostile.count("POST", "/v1/stage"), 1);
    assert!(victim.requests().is_empty());
    assert_eq!(
        task_kinds(&good),
        ["stage"],
        "no remediation on the good host"
    );
    assert!(good.status()["installed"]["image"].is_null());
    assert!(ran.peak_kib < RSS_LIMIT_KIB);
}

#[test]
fn endless_body_does_not_grow_the_controller_issue18() {
    let world = World::new();
    let good = good_agent(&world, "good");
    let hostile = fake(&world, "hostile", |_| Answer::Endless);
    let hosts = [good.addr(), hostile.addr()];
    // The same command against the good host alone, for the baseline.
    let baseline = run(
        &args(&world, &hosts[..1], &["status"]),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(baseline.code, Some(0), "{baseline:#?}");

    let ran = run(
        &args(&world, &hosts, &["status"]),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    assert!(is_status_row(line_of(&ran, &good.addr())), "{ran:#?}");
    let line = line_of(&ran, &hostile.addr());
    assert!(line.contains("exceeds the 4194304-byte limit"), "{line}");
    assert!(ran.took < Duration::from_secs(20), "{:?}", ran.took);
    eprintln!(
        "peak RSS: {} KiB against an endless body ({} MiB streamed), {} KiB baseline",
        ran.peak_kib,
        hostile.streamed() >> 20,
        baseline.peak_kib
    );
    assert!(
        ran.peak_kib < baseline.peak_kib + 32 * 1024,
        "peak {} KiB, baseline {} KiB",
        ran.peak_kib,
        baseline.peak_kib
    );
    assert_eq!(hostile.count("GET", "/v1/status"), 1);
}

#[test]
fn non_json_error_body_is_shown_as_a_short_escaped_excerpt_issue18() {
    let world = World::new();
    let mut body = b"\x1b[2J\x1b]0;owned\x07".to_vec();
    body.extend(std::iter::repeat_n(b'A', 1 << 20));
    let hostile = fake(&world, "hostile", move |_| Answer::Raw {
        status: 500,
        headers: vec![],
        body: body.clone(),
    });
    let ran = run(
        &args(&world, &[hostile.addr()], &["status"]),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    let line = line_of(&ran, &hostile.addr());
    assert!(
        line.contains("HTTP 500: \\x1b[2J\\x1b]0;owned\\x07AAA"),
        "{line}"
    );
    assert!(line.contains("bytes in all"), "{line}");
    assert!(line.len() < 400, "{} characters: {line}", line.len());
    assert!(!ran.stdout_raw.contains(&0x1b));
}

#[test]
fn drip_fed_answer_is_cut_off_by_timeout_issue18() {
    let world = World::new();
    let good = good_agent(&world, "good");
    let hostile = fake(&world, "hostile", |_| Answer::Drip {
        every: Duration::from_millis(200),
    });
    let hosts = [good.addr(), hostile.addr()];
    let ran = run(
        &args(&world, &hosts, &["--timeout", "3s", "status"]),
        Duration::from_secs(20),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    assert!(is_status_row(line_of(&ran, &good.addr())), "{ran:#?}");
    assert!(
        line_of(&ran, &hostile.addr()).contains("timed out after 3s"),
        "{ran:#?}"
    );
    assert!(ran.took < Duration::from_secs(8), "{:?}", ran.took);
}

#[test]
fn never_ending_task_is_polled_gently_and_cut_off_by_timeout_issue18() {
    let (world, image) = world_with_image();
    let good = good_agent(&world, "good");
    let endless = fake(&world, "endless", |r| match r.method.as_str() {
        "POST" => Answer::Json(
            202,
            json!({"task": fake_task("t1", "running", (0, 10), None)}),
        ),
        _ => Answer::Json(200, fake_task("t1", "running", (0, 10), None)),
    });
    // Polls of this one fail: the controller backs off.
    let failing = fake(&world, "failing", |r| match r.method.as_str() {
        "POST" => Answer::Json(
            202,
            json!({"task": fake_task("t2", "running", (0, 10), None)}),
        ),
        _ => Answer::Raw {
            status: 503,
            headers: vec![],
            body: b"try later".to_vec(),
        },
    });
    let hosts = [good.addr(), endless.addr(), failing.addr()];
    let url = world.depot.url();
    let ran = run(
        &args(
            &world,
            &hosts,
            &[
                "--timeout",
                "6s",
                "stage",
                "--image",
                &image,
                "--depot",
                &url,
                "--wait",
            ],
        ),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    assert!(line_of(&ran, &good.addr()).contains("succeeded"));
    let line = line_of(&ran, &endless.addr());
    assert!(
        line.contains("timed out after 6s; task t1 may still be running"),
        "{line}"
    );
    assert!(
        ran.stdout.contains("summary: 3 hosts: 1 ok, 2 timed out"),
        "{ran:#?}"
    );
    assert!(
        ran.stdout
            .contains(&format!("{} (timed out)", endless.addr()))
    );
    assert!(ran.took < Duration::from_secs(12), "{:?}", ran.took);

    let polls = endless.count("GET", "/v1/tasks/t1");
    let failed_polls = failing.count("GET", "/v1/tasks/t2");
    eprintln!("in 6 s: {polls} polls of a never-ending task, {failed_polls} of a failing one");
    assert!((3..=8).contains(&polls), "{polls} polls in 6 s");
    assert!(
        endless
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.query == "wait=30"),
        "long-polls with the server's wait: {:?}",
        endless.requests()
    );
    assert!(
        (1..=4).contains(&failed_polls),
        "{failed_polls} polls despite 503s"
    );
}

#[test]
fn slow_host_does_not_withhold_other_results_and_ctrl_c_prints_what_is_known_issue18() {
    let world = World::new();
    let a = good_agent(&world, "a");
    let b = good_agent(&world, "b");
    let hung = fake(&world, "hung", |_| Answer::Hang);
    let hosts = [hung.addr(), a.addr(), b.addr()];
    // Interrupt once both good hosts have been printed.
    let ran = run(
        &args(&world, &hosts, &["status"]),
        Duration::from_secs(60),
        Some(&[format!("{} ", a.addr()), format!("{} ", b.addr())]),
    );
    assert_eq!(ran.code, Some(130), "{ran:#?}");
    for agent in [&a, &b] {
        let (at, line) = ran
            .lines
            .iter()
            .find(|(_, l)| is_line_of(l, &agent.addr()))
            .expect("line");
        assert!(is_status_row(line), "{line}");
        assert!(*at < Duration::from_secs(10), "printed after {at:?}");
    }
    assert!(
        line_of(&ran, &hung.addr()).contains("interrupted while waiting for an answer"),
        "{ran:#?}"
    );
    assert!(
        ran.stdout.contains("summary: 3 hosts: 2 ok, 1 interrupted"),
        "{ran:#?}"
    );
    assert!(ran.took < Duration::from_secs(15), "{:?}", ran.took);
}

fn line_of_opt<'a>(ran: &'a Ran, host: &str) -> Option<&'a str> {
    ran.lines
        .iter()
        .map(|(_, l)| l.as_str())
        .find(|l| is_line_of(l, host))
}

/// A host's line: `host: …`, or a row of `status`'s table (`host   …`, issue 17 item 13).
fn is_line_of(line: &str, host: &str) -> bool {
    line.starts_with(&format!("{host}: ")) || line.starts_with(&format!("{host} "))
}

/// A row of `status`'s table: host, compliance, staged mark, … (issue 17, item 13).
fn is_status_row(line: &str) -> bool {
    let cols: Vec<&str> = line.split_whitespace().collect();
    cols.len() >= 6 && matches!(cols[2], "true" | "false")
}

const EVIL: &str = "\u{1b}]0;owned\u{7}\u{1b}[2J\nhost-X: succeeded\r\u{9b}31m\u{202e}";

fn assert_clean(ran: &Ran) {
    for bad in ['\u{1b}', '\u{7}', '\r', '\u{9b}', '\u{202e}', '\u{7f}'] {
        assert!(
            !ran.stdout.contains(bad),
            "{bad:?} reached stdout: {ran:#?}"
        );
        assert!(
            !ran.stderr.contains(bad),
            "{bad:?} reached stderr: {ran:#?}"
        );
    }
    assert!(
        !ran.lines.iter().any(|(_, l)| l.starts_with("host-X")),
        "a host printed a line of its own: {ran:#?}"
    );
}

#[test]
fn control_characters_from_a_host_are_escaped_issue18() {
    let (world, image) = world_with_image();
    let good = good_agent(&world, "good");
    let evil_task = {
        let mut t = fake_task("t1", "failed", (5, 10), Some(("internal", EVIL)));
        t["step"] = json!(EVIL);
        t["notifications"] = json!([{"code": EVIL, "message": EVIL, "retriable": false}]);
        t
    };
    let listed = {
        let mut t = fake_task("t1", "failed", (5, 10), None);
        t["id"] = json!(EVIL);
        t
    };
    let hostile = fake(&world, "hostile", move |r| {
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/v1/status") => {
                let mut s = fake_status(EVIL);
                s["running_task"] = json!(EVIL);
                s["compliance"]["notifications"] = json!([{"code": EVIL, "message": EVIL}]);
                Answer::Json(200, s)
            }
            ("POST", _) => Answer::Json(
                202,
                json!({"task": fake_task("t1", "running", (0, 10), None)}),
            ),
            ("GET", "/v1/tasks") => Answer::Json(200, json!({"tasks": [listed.clone()]})),
            ("GET", _) => Answer::Json(200, evil_task.clone()),
            _ => Answer::Json(
                404,
                json!({"error": {"code": "not_found", "message": EVIL}}),
            ),
        }
    });
    let hosts = [good.addr(), hostile.addr()];
    let url = world.depot.url();
    let runs = [
        vec!["status"],
        vec!["tasks"],
        vec!["stage", "--image", &image, "--depot", &url, "--wait"],
        vec![
            "staged",
            "rm",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ],
    ];
    for rest in &runs {
        let ran = run(&args(&world, &hosts, rest), Duration::from_secs(60), None);
        assert_clean(&ran);
        assert!(line_of_opt(&ran, &good.addr()).is_some(), "{ran:#?}");
        assert!(
            ran.stdout
                .contains("\\x1b]0;owned\\x07\\x1b[2J\\nhost-X: succeeded\\r\\x9b31m\\u{202e}"),
            "{rest:?}: {ran:#?}"
        );
    }
    // --json escapes too, and the value survives.
    let ran = run(
        &args(&world, &hosts, &["--json", "status"]),
        Duration::from_secs(60),
        None,
    );
    assert_clean(&ran);
    let v: Value = serde_json::from_str(&ran.stdout).expect("json");
    assert_eq!(v[hostile.addr()]["host_id"], EVIL);
    assert_eq!(v[good.addr()]["host_id"], "good");
}

#[test]
fn remediate_without_wait_cannot_start_every_host_at_once_issue18() {
    let (world, image) = world_with_image();
    let url = world.depot.url();
    // Each fake's task runs 1.5 s after its POST.
    let make = |name: &str| {
        let posted = Arc::new(Mutex::new(None::<Instant>));
        fake(&world, name, move |r| {
            let mut posted = posted.lock().expect("posted");
            match r.method.as_str() {
                "POST" => {
                    *posted = Some(r.at);
                    Answer::Json(
                        202,
                        json!({"task": fake_task("t1", "running", (0, 10), None)}),
                    )
                }
                _ => {
                    let done = posted
                        .is_some_and(|p| r.at.duration_since(p) > Duration::from_millis(1500));
                    let state = if done { "succeeded" } else { "running" };
                    Answer::Json(200, fake_task("t1", state, (10, 10), None))
                }
            }
        })
    };
    let (first, second) = (make("first"), make("second"));
    let hosts = [first.addr(), second.addr()];

    let ran = run(
        &args(
            &world,
            &hosts,
            &["remediate", "--image", &image, "--depot", &url],
        ),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(2), "{ran:#?}");
    assert!(ran.stderr.contains("--wait"), "{ran:#?}");
    assert!(first.requests().is_empty() && second.requests().is_empty());

    let ran = run(
        &args(
            &world,
            &hosts,
            &["remediate", "--image", &image, "--depot", &url, "--wait"],
        ),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(0), "{ran:#?}");
    let last_poll_of_first = first.requests().last().expect("polled").at;
    let second_post = second.requests().first().expect("posted").at;
    assert!(
        second_post > last_poll_of_first,
        "the second host started before the first one ended"
    );
    // One host without --wait is still allowed.
    let ran = run(
        &args(
            &world,
            &hosts[..1],
            &["remediate", "--image", &image, "--depot", &url],
        ),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(0), "{ran:#?}");
    assert!(ran.stdout.contains("task t1 started"));
}

#[test]
fn host_strings_and_task_ids_cannot_rewrite_urls_issue18() {
    let (world, image) = world_with_image();
    let url = world.depot.url();
    let sneaky = fake(&world, "sneaky", |r| match r.method.as_str() {
        "POST" => Answer::Json(
            202,
            json!({"task": fake_task("../status#", "running", (0, 1), None)}),
        ),
        _ => Answer::Json(200, fake_status("sneaky")),
    });
    // A hosts file whose third line smuggles a path: refused with its line number, exit 2,
    // before anything is sent.
    let hosts_file = world.dir.path().join("hosts");
    std::fs::write(
        &hosts_file,
        format!(
            "# fleet\n{}\n{}/v1/remediate#\n",
            sneaky.addr(),
            sneaky.addr()
        ),
    )
    .expect("hosts file");
    let mut a = args(&world, &[], &["stage", "--image", &image, "--depot", &url]);
    a.extend(["--hosts".to_owned(), hosts_file.display().to_string()]);
    let ran = run(&a, Duration::from_secs(30), None);
    assert_eq!(ran.code, Some(2), "{ran:#?}");
    assert!(ran.stderr.contains("line 3"), "{ran:#?}");
    for bad in [
        format!("user@{}", sneaky.addr()),
        "/path?q".to_owned(),
        format!("{}/v1/remediate#", sneaky.addr()),
        format!("{}?x", sneaky.addr()),
    ] {
        let ran = run(
            &args(&world, std::slice::from_ref(&bad), &["status"]),
            Duration::from_secs(30),
            None,
        );
        assert_eq!(ran.code, Some(2), "{bad}: {ran:#?}");
    }
    // An operator-given task id that is not an id.
    let ran = run(
        &args(&world, &[sneaky.addr()], &["task", "../status#"]),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(2), "{ran:#?}");
    assert!(sneaky.requests().is_empty(), "{:?}", sneaky.requests());

    // A host-supplied task id that would redirect polling.
    let ran = run(
        &args(
            &world,
            &[sneaky.addr()],
            &["stage", "--image", &image, "--depot", &url, "--wait"],
        ),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    assert!(
        line_of(&ran, &sneaky.addr()).contains("protocol_violation"),
        "{ran:#?}"
    );
    let paths: Vec<String> = sneaky
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(paths, ["POST /v1/stage"]);
}

#[test]
fn task_claiming_success_with_an_error_counts_as_failed_issue18() {
    let (world, image) = world_with_image();
    let url = world.depot.url();
    let liar = fake(&world, "liar", |r| match r.method.as_str() {
        "POST" => Answer::Json(
            202,
            json!({"task": fake_task("t1", "running", (0, u64::MAX), None)}),
        ),
        _ => Answer::Json(
            200,
            fake_task(
                "t1",
                "succeeded",
                (u64::MAX, u64::MAX),
                Some(("install_failed", "it did not")),
            ),
        ),
    });
    let ran = run(
        &args(
            &world,
            &[liar.addr()],
            &["stage", "--image", &image, "--depot", &url, "--wait"],
        ),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    let line = line_of(&ran, &liar.addr());
    assert!(
        line.contains("claims to have succeeded but reports an error"),
        "{line}"
    );
    assert!(!ran.stderr.contains("panicked"), "{ran:#?}");
}

#[test]
fn duplicate_hosts_are_contacted_once_issue18() {
    let world = World::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let host = fake(&world, "host", move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Answer::Json(200, fake_status("esx-01"))
    });
    let hosts_file = world.dir.path().join("hosts");
    std::fs::write(&hosts_file, format!("{}\n", host.addr())).expect("hosts");
    let mut a = args(&world, &[host.addr(), host.addr()], &["--json", "status"]);
    a.extend(["--hosts".to_owned(), hosts_file.display().to_string()]);
    let ran = run(&a, Duration::from_secs(30), None);
    assert_eq!(ran.code, Some(0), "{ran:#?}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert!(ran.stderr.contains("contacted once"), "{ran:#?}");
    let v: Value = serde_json::from_str(&ran.stdout).expect("json");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1));
}

fn ctl_ok(args: &[&str]) -> std::process::Output {
    Command::new(vibstagectl())
        .args(args)
        .output()
        .expect("run")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn image_create_refuses_descriptors_not_signed_by_the_vib_key_issue18() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vendor, other, image_key, depot) = (
        dir.path().join("vendor"),
        dir.path().join("other"),
        dir.path().join("image"),
        dir.path().join("depot"),
    );
    for k in [&vendor, &other, &image_key] {
        assert!(ctl_ok(&["keygen", "--out", &s(k)]).status.success());
    }
    let file = dir.path().join("esx-base.vib");
    std::fs::write(&file, b"bytes").expect("vib");
    let out = ctl_ok(&[
        "depot",
        "add",
        "--depot",
        &s(&depot),
        "--key",
        &format!("{}.key", s(&vendor)),
        "--component",
        "ESXi",
        "--component-version",
        "8.0",
        "--vendor",
        "acme",
        "--acceptance",
        "partner",
        &s(&file),
    ]);
    assert!(out.status.success(), "{out:?}");
    let create = |extra: &[&str]| {
        let key = format!("{}.key", s(&image_key));
        let depot = s(&depot);
        let mut a = vec![
            "image",
            "create",
            "--depot",
            &depot,
            "--key",
            &key,
            "--name",
            "img",
            "--serial",
            "1",
            "--base-image",
            "8.0",
            "--component",
            "ESXi=8.0",
        ];
        a.extend_from_slice(extra);
        ctl_ok(&a)
    };
    let other_pub = format!("{}.pub", s(&other));
    let out = create(&["--vib-key", &other_pub]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("untrusted_key") && err.contains("not signed by any --vib-key"),
        "{err}"
    );
    assert!(!depot.join("images/img.json").exists(), "nothing signed");

    let vendor_pub = format!("{}.pub", s(&vendor));
    let out = create(&["--vib-key", &vendor_pub]);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));

    let out = create(&[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("were not verified (no --vib-key given)"),
        "{out:?}"
    );
}

#[test]
fn many_hosts_print_a_summary_and_only_the_hosts_that_did_not_succeed_issue18() {
    let world = World::new();
    let fleet: Vec<FakeAgent> = (0..11)
        .map(|i| {
            fake(&world, &format!("h{i}"), move |_| {
                let mut s = fake_status(&format!("esx-{i}"));
                s["staging"]["staged"] = json!(i % 2 == 0);
                Answer::Json(200, s)
            })
        })
        .collect();
    let broken = fake(&world, "broken", |_| {
        Answer::Json(200, json!({"host_id": 1}))
    });
    let mut hosts: Vec<String> = fleet.iter().map(FakeAgent::addr).collect();
    hosts.push(broken.addr());
    let ran = run(
        &args(&world, &hosts, &["status"]),
        Duration::from_secs(30),
        None,
    );
    assert_eq!(ran.code, Some(1), "{ran:#?}");
    assert!(line_of_opt(&ran, &hosts[0]).is_none(), "{ran:#?}");
    assert!(line_of(&ran, &broken.addr()).contains("unexpected answer"));
    assert!(
        ran.stdout.contains("summary: 12 hosts: 11 ok, 1 failed"),
        "{ran:#?}"
    );
    assert!(ran.stdout.contains("  compliance: unknown 11"), "{ran:#?}");
    assert!(ran.stdout.contains("  staged: false 5, true 6"), "{ran:#?}");
    assert!(
        ran.stdout
            .contains(&format!("  not ok: {} (failed)", broken.addr()))
    );

    let ran = run(
        &args(&world, &hosts, &["--verbose", "status"]),
        Duration::from_secs(30),
        None,
    );
    assert!(
        hosts.iter().all(|h| line_of_opt(&ran, h).is_some()),
        "{ran:#?}"
    );
}

/// Issue 17, item 11: Ctrl-C during `--wait` says the tasks go on and prints, per host, the
/// command that follows its task.
#[test]
fn ctrl_c_during_wait_says_the_tasks_go_on_and_how_to_follow_them_issue17() {
    let (world, image) = world_with_image();
    // The quick host ends at its second poll, a second after the endless host's task started.
    let polls = std::sync::atomic::AtomicUsize::new(0);
    let quick = fake(&world, "quick", move |r| match r.method.as_str() {
        "POST" => Answer::Json(
            202,
            json!({"task": fake_task("q1", "running", (0, 10), None)}),
        ),
        _ if polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => {
            Answer::Json(200, fake_task("q1", "running", (5, 10), None))
        }
        _ => Answer::Json(200, fake_task("q1", "succeeded", (10, 10), None)),
    });
    let endless = fake(&world, "endless", |r| match r.method.as_str() {
        "POST" => Answer::Json(
            202,
            json!({"task": fake_task("t1", "running", (0, 10), None)}),
        ),
        _ => Answer::Json(200, fake_task("t1", "running", (5, 10), None)),
    });
    let hosts = [quick.addr(), endless.addr()];
    let url = world.depot.url();
    let ran = run(
        &args(
            &world,
            &hosts,
            &["stage", "--image", &image, "--depot", &url, "--wait"],
        ),
        Duration::from_secs(60),
        Some(&[format!("{}: succeeded", quick.addr())]),
    );
    assert_eq!(ran.code, Some(130), "{ran:#?}");
    assert!(
        ran.stdout
            .contains("only the waiting stopped; the tasks below go on on their hosts"),
        "{ran:#?}"
    );
    let line = line_of(&ran, &endless.addr());
    assert!(
        line.contains(&format!(
            "task t1 continues on the host; follow it with: vibstagectl --tls-dir {} --host {} task t1 --wait",
            world.tls_dir.display(),
            endless.addr()
        )),
        "{line}"
    );
}

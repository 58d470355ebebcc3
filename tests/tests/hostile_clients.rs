//! Hostile clients (issue 8; SPEC §2, §5, §7): more than 40 ways to talk to a real `vibstaged`
//! wrongly, each with its precise outcome.
//!
//! Every case asserts the exact refusal: the TLS alert of a refused handshake, or the HTTP status
//! and `error.code` of the API's error body (for the few inputs that are not HTTP at all and never
//! reach the API, the status hyper's parser answers with). After every case the agent must still
//! serve (`/healthz` on the socket, and over mTLS for the TLS cases) and nothing may have been
//! written: the scratch directory and the state directory are byte-for-byte what they were before
//! the case (a refusal that comes as a failed task may write the task list, but never anything
//! under `blobs/`, `ingest/` or `images/`).
//!
//! Four tests, each with its own agent: TLS (`tls_clients_are_refused_at_the_handshake`), the Unix
//! socket's peer check, malformed HTTP and request bodies (with a slowloris connection trickling
//! its headers in the background the whole time), and signed content.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::Duration as TimeDelta;
use vibstage_e2e::agent::{tls_client, tls_request};
use vibstage_e2e::{AgentOptions, AgentProc, Reply, VibFile, World};
use vibstage_protocol::{Envelope, IMAGE_PAYLOAD_TYPE, VIB_PAYLOAD_TYPE};

/// Every file (path → bytes) and directory (path → None) under `dirs`.
fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.insert(path.clone(), None);
                walk(&path, out);
            } else {
                out.insert(path.clone(), Some(std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    let mut out = BTreeMap::new();
    for dir in dirs {
        walk(dir, &mut out);
    }
    out
}

/// What changed between two snapshots, for messages.
fn diff(
    before: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    after: &BTreeMap<PathBuf, Option<Vec<u8>>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, content) in after {
        match before.get(path) {
            None => out.push(format!("created {}", path.display())),
            Some(old) if old != content => out.push(format!("changed {}", path.display())),
            Some(_) => {}
        }
    }
    for path in before.keys().filter(|p| !after.contains_key(*p)) {
        out.push(format!("removed {}", path.display()));
    }
    out
}

/// One world and agent under attack, with the case bookkeeping.
struct Target {
    world: World,
    agent: AgentProc,
    cases: Vec<String>,
}

impl Target {
    fn new(opts: AgentOptions) -> Target {
        let world = World::new();
        world.add_vibs(&[
            VibFile::software("esx-base", 200_000),
            VibFile::software("esx-ui", 100_000),
            VibFile {
                component: "Tools".into(),
                version: "1.0".into(),
                ..VibFile::software("tools", 50_000)
            },
        ]);
        let mut agent = world.agent("esx-01", opts);
        agent.start();
        Target {
            world,
            agent,
            cases: Vec::new(),
        }
    }

    fn disk(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        snapshot(&[&self.agent.scratch, &self.agent.state_dir])
    }

    /// Runs one case: `act` must give `status` and `code` (code `None`: the HTTP layer answered
    /// before the API, without an error body), and must leave every file as it was.
    fn case(
        &mut self,
        name: &str,
        status: u16,
        code: Option<&str>,
        act: impl FnOnce(&Self) -> Reply,
    ) {
        let before = self.disk();
        let reply = act(self);
        assert_eq!(reply.status, status, "case {name}: {}", reply.body);
        match code {
            Some(code) => {
                assert_eq!(
                    reply.json["error"]["code"], code,
                    "case {name}: {}",
                    reply.body
                );
                assert!(
                    reply.json["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "case {name}: no message: {}",
                    reply.body
                );
            }
            None => assert!(
                reply.json.get("error").is_none(),
                "case {name}: {}",
                reply.body
            ),
        }
        self.still_serving(name);
        let changes = diff(&before, &self.disk());
        assert!(changes.is_empty(), "case {name} wrote to disk: {changes:?}");
        self.cases.push(name.to_owned());
    }

    fn still_serving(&self, name: &str) {
        let r = self.agent.request("GET", "/healthz", None);
        assert_eq!(
            r.status, 200,
            "case {name}: agent stopped serving: {}",
            r.body
        );
    }

    /// A request with any body and content type on the socket. Built by hand rather than with
    /// the harness's `http_exchange`: when the agent refuses an oversized body before reading it
    /// all, it closes with our bytes unread and the kernel reports a reset after its answer,
    /// which must not hide the answer.
    fn send(&self, method: &str, path: &str, body: &str, content_type: &str) -> Reply {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        raw_clean(&self.agent.socket, request.as_bytes(), false)
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.send("POST", path, &body.to_string(), "application/json")
    }

    fn stage_body(&self, image: &Envelope) -> Value {
        json!({"image": image, "depot": self.world.depot.url()})
    }
}

/// Raw bytes on the socket; reads the answer until the agent closes. `half_close` shuts our
/// writing side after sending (a client that stops in the middle of its body).
fn raw(socket: &Path, bytes: &[u8], half_close: bool) -> Reply {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // A server may answer and close before reading everything we send.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    parse(&answer)
}

/// Like [`raw`], for requests the agent must read (or drain) completely before it closes: the
/// whole write must succeed and the answer must be read without a reset (issue 11: an answer
/// sent before a refused body was drained could be lost to a reset).
fn raw_clean(socket: &Path, bytes: &[u8], half_close: bool) -> Reply {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(bytes)
        .unwrap_or_else(|e| panic!("the agent closed before reading the request: {e}"));
    if half_close {
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
    }
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .unwrap_or_else(|e| panic!("reading the answer: {e} (got {} bytes)", answer.len()));
    parse(&answer)
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // One chunk is all the agent sends for these small answers.
        body.split_once("\r\n")
            .map(|(_, rest)| rest.rsplit_once("\r\n0\r\n").map_or(rest, |(b, _)| b))
            .unwrap_or_default()
            .to_owned()
    } else {
        body.to_owned()
    };
    Reply {
        status,
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        body,
    }
}

/// Decodes an image envelope's payload as JSON.
fn payload(env: &Envelope) -> Value {
    serde_json::from_slice(&env.payload).expect("payload json")
}

fn sign(payload_type: &str, value: &Value, key: &ed25519_dalek::SigningKey) -> Envelope {
    Envelope::sign(payload_type, value.to_string().into_bytes(), key)
}

fn vib_envelope(image: &Value, component: usize, vib: usize) -> Envelope {
    serde_json::from_value(image["components"][component]["vibs"][vib].clone()).expect("vib")
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The error of a refused handshake, as text (rustls reports the server's alert on first read).
fn refused(config: Arc<rustls::ClientConfig>, addr: &str) -> String {
    match tls_request(config, addr, "GET", "/v1/status", None) {
        Ok(r) => panic!("request was served: {} {}", r.status, r.body),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tls_clients_are_refused_at_the_handshake() {
    let mut t = Target::new(AgentOptions {
        operators: vec!["controller".into()],
        readers: vec!["auditor".into()],
        ..AgentOptions::default()
    });
    let addr = t.agent.addr();
    let ca = t.world.tls_dir.join("ca.pem");
    let pair = |dir: &Path| {
        tls_client(
            &ca,
            Some((&dir.join("client.pem"), &dir.join("client.key"))),
        )
    };
    let good = pair(&t.world.tls_dir);

    // A connection that never starts its handshake: closed after the handshake timeout, while
    // everyone else is served. Runs in the background during the other cases.
    let idle_open = Arc::new(AtomicBool::new(true));
    let idle = {
        let addr = addr.clone();
        let open = idle_open.clone();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            let result = s.read(&mut buf);
            open.store(false, Ordering::SeqCst);
            result.map_err(|e| e.to_string())
        })
    };
    let served_meanwhile = AtomicUsize::new(0);

    let tls_case = |t: &mut Target, name: &str, config: Arc<rustls::ClientConfig>, alert: &str| {
        let before = t.disk();
        let err = refused(config, &addr);
        assert!(
            err.contains(alert),
            "case {name}: expected alert {alert}, got: {err}"
        );
        let ok = tls_request(good.clone(), &addr, "GET", "/healthz", None)
            .expect("still serving over mTLS");
        assert_eq!(ok.status, 200, "case {name}");
        if idle_open.load(Ordering::SeqCst) {
            served_meanwhile.fetch_add(1, Ordering::SeqCst);
        }
        t.still_serving(name);
        let changes = diff(&before, &t.disk());
        assert!(changes.is_empty(), "case {name} wrote to disk: {changes:?}");
        t.cases.push(name.to_owned());
    };

    tls_case(
        &mut t,
        "tls-no-client-certificate",
        tls_client(&ca, None),
        "CertificateRequired",
    );
    let other_world = World::new();
    let foreign = other_world.client_tls_dir(
        "foreign",
        "controller",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    tls_case(
        &mut t,
        "tls-certificate-of-another-ca",
        pair(&foreign),
        "UnknownCA",
    );
    let expired = t.world.client_tls_dir(
        "expired",
        "controller",
        -TimeDelta::days(10),
        -TimeDelta::days(1),
    );
    tls_case(
        &mut t,
        "tls-expired-certificate",
        pair(&expired),
        "CertificateExpired",
    );
    let future = t.world.client_tls_dir(
        "future",
        "controller",
        TimeDelta::days(1),
        TimeDelta::days(10),
    );
    tls_case(
        &mut t,
        "tls-not-yet-valid-certificate",
        pair(&future),
        "CertificateExpired",
    );
    // The agent's own server certificate (same CA, EKU serverAuth only) used as a client one.
    let server_cert = tls_client(
        &ca,
        Some((
            &t.agent.home.join("agent.pem"),
            &t.agent.home.join("agent.key"),
        )),
    );
    tls_case(
        &mut t,
        "tls-server-certificate-as-client",
        server_cert,
        "UnsupportedCertificate",
    );
    // A self-signed certificate claiming the controller's name.
    let selfsigned = {
        let dir = t.world.dir.path().join("selfsigned");
        std::fs::create_dir_all(&dir).expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["controller".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "controller");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key).expect("self-sign");
        std::fs::write(dir.join("client.pem"), cert.pem()).expect("cert");
        std::fs::write(dir.join("client.key"), key.serialize_pem()).expect("key");
        dir
    };
    tls_case(
        &mut t,
        "tls-self-signed-certificate",
        pair(&selfsigned),
        "UnknownCA",
    );
    // The CA's own certificate and key presented as a client certificate.
    let ca_as_client = {
        let dir = t.world.dir.path().join("ca-as-client");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("client.pem"), t.world.ca.cert_pem()).expect("cert");
        std::fs::write(dir.join("client.key"), t.world.ca.key_pem()).expect("key");
        dir
    };
    tls_case(
        &mut t,
        "tls-ca-certificate-as-client",
        pair(&ca_as_client),
        "CertificateUnknown",
    );

    // Plain HTTP on the mTLS port: no HTTP answer, the connection is closed.
    {
        let before = t.disk();
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
            .expect("write");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plain HTTP was answered: {}",
            String::from_utf8_lossy(&answer)
        );
        t.still_serving("tls-plain-http-on-the-tls-port");
        assert!(diff(&before, &t.disk()).is_empty());
        t.cases.push("tls-plain-http-on-the-tls-port".into());
    }

    // Valid certificates the allow-lists do not allow: 403 forbidden.
    let stranger = t.world.client_tls_dir(
        "stranger",
        "stranger",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let stranger_cfg = pair(&stranger);
    t.case("tls-unlisted-client-reads", 403, Some("forbidden"), |t| {
        tls_request(
            stranger_cfg.clone(),
            &t.agent.addr(),
            "GET",
            "/v1/status",
            None,
        )
        .expect("stranger")
    });
    let auditor = t.world.client_tls_dir(
        "auditor",
        "auditor",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let auditor_cfg = pair(&auditor);
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let body = t.stage_body(&image);
    t.case("tls-reader-stages", 403, Some("forbidden"), |t| {
        tls_request(
            auditor_cfg.clone(),
            &t.agent.addr(),
            "POST",
            "/v1/stage",
            Some(&body),
        )
        .expect("auditor")
    });
    t.case("tls-reader-deletes-staged", 403, Some("forbidden"), |t| {
        let path = format!("/v1/staged/sha256:{}", "0".repeat(64));
        tls_request(auditor_cfg.clone(), &t.agent.addr(), "DELETE", &path, None).expect("auditor")
    });
    // The reader may read.
    let read = tls_request(auditor_cfg, &addr, "GET", "/v1/status", None).expect("auditor read");
    assert_eq!(read.status, 200, "{}", read.body);

    let closed = idle.join().expect("idle thread");
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "a connection that never sent a handshake got {closed:?}"
    );
    assert!(
        served_meanwhile.load(Ordering::SeqCst) >= 5,
        "other clients were not served while the idle connection was open"
    );
    eprintln!("{} TLS cases: {:?}", t.cases.len(), t.cases);
    assert!(t.cases.len() >= 11);
}

// ---------------------------------------------------------------------------------------------
// Unix socket

/// curl on the socket as uid/gid 65534; returns the answer.
fn as_nobody(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "curl",
        "-s",
        "-i",
        "-X",
        method,
    ])
    .arg("--unix-socket")
    .arg(socket);
    if body.is_some() {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = cmd
        .arg(format!("http://agent{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv curl");
    if let Some(body) = body {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("body");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("curl");
    let reply = parse(&out.stdout);
    assert!(
        reply.status != 0,
        "curl got no answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reply
}

#[test]
fn non_root_peers_on_the_socket_get_403() {
    let mut t = Target::new(AgentOptions::default());
    // The socket's mode (0600) already keeps others out; open it and its directories up, so that
    // only the SO_PEERCRED check stands between uid 65534 and the API.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&t.agent.socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&t.agent.socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        let mut dir = t.agent.socket.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    let socket = t.agent.socket.clone();
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let body = t.stage_body(&image).to_string();
    t.case(
        "socket-non-root-reads-status",
        403,
        Some("forbidden"),
        |_| as_nobody(&socket, "GET", "/v1/status", None),
    );
    t.case("socket-non-root-stages", 403, Some("forbidden"), |_| {
        as_nobody(&socket, "POST", "/v1/stage", Some(&body))
    });
    t.case("socket-non-root-remediates", 403, Some("forbidden"), |_| {
        as_nobody(&socket, "POST", "/v1/remediate", Some(&body))
    });
    t.case(
        "socket-non-root-deletes-staged",
        403,
        Some("forbidden"),
        |_| {
            as_nobody(
                &socket,
                "DELETE",
                &format!("/v1/staged/sha256:{}", "0".repeat(64)),
                None,
            )
        },
    );
    eprintln!("{} socket cases: {:?}", t.cases.len(), t.cases);
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Trickles header bytes on the socket and never ends the head; returns what it saw once the
/// agent closed the connection (`Err` if it never did within a minute).
fn slowloris(
    socket: PathBuf,
    open: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Vec<u8>, String>> {
    trickle(
        socket,
        open,
        b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nX-Slow: ".to_vec(),
    )
}

/// Sends `start`, then one more byte every 250 ms until the agent answers and closes (what it
/// sent is returned) or a minute passes (`Err`).
fn trickle(
    socket: PathBuf,
    open: Arc<AtomicBool>,
    start: Vec<u8>,
) -> std::thread::JoinHandle<Result<Vec<u8>, String>> {
    std::thread::spawn(move || {
        let result = (|| {
            let mut s = UnixStream::connect(&socket).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(250)))
                .map_err(|e| e.to_string())?;
            s.write_all(&start).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut answer = Vec::new();
            loop {
                if s.write_all(b"a").is_err() {
                    return Ok(answer);
                }
                let mut buf = [0u8; 1024];
                match s.read(&mut buf) {
                    Ok(0) => return Ok(answer),
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return Ok(answer),
                }
                if Instant::now() > deadline {
                    return Err("the agent kept a trickling connection open for a minute".into());
                }
            }
        })();
        open.store(false, Ordering::SeqCst);
        result
    })
}

#[test]
fn malformed_http_and_bodies_get_precise_errors() {
    let mut t = Target::new(AgentOptions::default());
    let socket = t.agent.socket.clone();
    let loris_open = Arc::new(AtomicBool::new(true));
    let loris = slowloris(socket.clone(), loris_open.clone());
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let url = t.world.depot.url();
    let valid = json!(image).to_string();
    let json_ct = "application/json";

    // Protocol level: answered by the HTTP parser before any route, without an error body.
    let huge_header = format!(
        "GET /v1/status HTTP/1.1\r\nHost: agent\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    t.case("http-huge-header", 431, None, |_| {
        raw(&socket, huge_header.as_bytes(), false)
    });
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /v1/status HTTP/1.1\r\nHost: agent\r\n{many_headers}\r\n");
    t.case("http-too-many-headers", 431, None, |_| {
        raw(&socket, many.as_bytes(), false)
    });
    t.case("http-garbage-request-line", 400, None, |_| {
        raw(&socket, b"\x16\x03\x01garbage\r\n\r\n", false)
    });
    t.case("http-content-length-and-chunked", 400, Some("bad_request"), |_| {
        raw(
            &socket,
            b"POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            false,
        )
    });
    t.case("http-two-content-lengths", 400, None, |_| {
        raw(
            &socket,
            b"POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{} ",
            false,
        )
    });

    // Bodies.
    let huge = format!("{{\"depot\": \"{}\"}}", "x".repeat(5 << 20));
    t.case("http-huge-body", 413, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &huge, json_ct)
    });
    // A gigabyte announced, and more than the limit actually sent.
    let announced = format!(
        "POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{{\"depot\": \"{}",
        "x".repeat(5 << 20)
    );
    t.case(
        "http-huge-content-length-announced",
        413,
        Some("bad_request"),
        |_| raw_clean(&socket, announced.as_bytes(), true),
    );
    let chunked_huge = {
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
        format!(
            "POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(5)
        )
    };
    t.case("http-huge-chunked-body", 413, Some("bad_request"), |_| {
        raw_clean(&socket, chunked_huge.as_bytes(), false)
    });
    let truncated_body = format!(
        "POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        valid.len() + 100,
        &valid[..valid.len() / 2]
    );
    t.case(
        "http-body-shorter-than-content-length",
        400,
        Some("bad_request"),
        |_| raw(&socket, truncated_body.as_bytes(), true),
    );
    t.case("json-truncated", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &valid[..valid.len() / 2], json_ct)
    });
    t.case("json-malformed", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "{\"image\": ", json_ct)
    });
    t.case("json-empty-body", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "", json_ct)
    });
    t.case("json-null", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "null", json_ct)
    });
    t.case("json-array", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "[1,2]", json_ct)
    });
    t.case("json-invalid-utf8", 400, Some("bad_request"), |_| {
        let body = b"{\"image\": \"\xff\xfe\"}";
        let mut bytes = format!(
            "POST /v1/compliance/check HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        raw(&socket, &bytes, false)
    });
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    t.case("json-nested-100000-deep", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &deep, json_ct)
    });
    t.case("json-trailing-garbage", 400, Some("bad_request"), |t| {
        t.send(
            "POST",
            "/v1/stage",
            &format!("{{\"image\": {valid}, \"depot\": \"{url}\"}} {{}}"),
            json_ct,
        )
    });

    // Types and fields.
    t.case("json-depot-wrong-type", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &json!({"image": image, "depot": 7}))
    });
    t.case("json-image-wrong-type", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &json!({"image": "esx-8.0u2", "depot": url}))
    });
    t.case(
        "json-signatures-wrong-type",
        400,
        Some("bad_request"),
        |t| {
            let mut env = json!(image);
            env["signatures"] = json!({"keyid": "x"});
            t.post("/v1/stage", &json!({"image": env, "depot": url}))
        },
    );
    t.case("json-payload-not-base64", 400, Some("bad_request"), |t| {
        let mut env = json!(image);
        env["payload"] = json!("not base64!");
        t.post("/v1/compliance/check", &json!({"image": env}))
    });
    t.case("json-keyid-not-hex", 400, Some("bad_request"), |t| {
        let mut env = json!(image);
        env["signatures"][0]["keyid"] = json!("../../etc/passwd");
        t.post("/v1/compliance/check", &json!({"image": env}))
    });
    t.case("json-missing-depot", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &json!({"image": image}))
    });
    t.case("json-unknown-field", 400, Some("bad_request"), |t| {
        t.post(
            "/v1/stage",
            &json!({"image": image, "depot": url, "force": true}),
        )
    });
    t.case(
        "json-unknown-field-in-envelope",
        400,
        Some("bad_request"),
        |t| {
            let mut env = json!(image);
            env["comment"] = json!("hi");
            t.post("/v1/remediate", &json!({"image": env, "depot": url}))
        },
    );
    t.case("json-duplicate-key", 400, Some("bad_request"), |t| {
        t.send(
            "POST",
            "/v1/stage",
            &format!("{{\"depot\": \"{url}\", \"depot\": \"{url}\", \"image\": {valid}}}"),
            json_ct,
        )
    });
    t.case(
        "json-duplicate-key-in-envelope",
        400,
        Some("bad_request"),
        |t| {
            let env = valid.replacen(
                "\"payloadType\"",
                "\"payloadType\":\"x\",\"payloadType\"",
                1,
            );
            t.send(
                "POST",
                "/v1/compliance/check",
                &format!("{{\"image\": {env}}}"),
                json_ct,
            )
        },
    );

    // Content types.
    let good = json!({"image": image, "depot": url}).to_string();
    t.case("content-type-text-plain", 415, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &good, "text/plain")
    });
    t.case("content-type-form", 415, Some("bad_request"), |t| {
        t.send(
            "POST",
            "/v1/remediate",
            &good,
            "application/x-www-form-urlencoded",
        )
    });
    t.case("content-type-missing", 415, Some("bad_request"), |_| {
        let req = format!(
            "POST /v1/stage HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{good}",
            good.len()
        );
        raw(&socket, req.as_bytes(), false)
    });
    t.case(
        "content-type-json-lookalike",
        415,
        Some("bad_request"),
        |t| t.send("POST", "/v1/stage", &good, "application/jsonx"),
    );

    // Routes, methods, paths and queries.
    t.case("route-unknown", 404, Some("not_found"), |t| {
        t.agent.request("GET", "/v1/nope", None)
    });
    t.case("route-wrong-method", 405, Some("bad_request"), |t| {
        t.agent.request("DELETE", "/v1/status", None)
    });
    t.case("route-task-id-10k", 404, Some("not_found"), |t| {
        t.agent
            .request("GET", &format!("/v1/tasks/{}", "a".repeat(10_000)), None)
    });
    t.case("route-wait-not-a-number", 400, Some("bad_request"), |t| {
        t.agent.request("GET", "/v1/tasks/x?wait=soon", None)
    });
    t.case("route-wait-overflow", 400, Some("bad_request"), |t| {
        t.agent
            .request("GET", "/v1/tasks/x?wait=99999999999999999999999", None)
    });
    t.case("route-unknown-query", 400, Some("bad_request"), |t| {
        t.agent.request("GET", "/v1/tasks/x?wait=1&all=1", None)
    });
    t.case("route-staged-traversal", 400, Some("bad_request"), |t| {
        t.agent
            .request("DELETE", "/v1/staged/..%2F..%2Fstate%2Fstate.json", None)
    });
    t.case("route-staged-bad-digest", 400, Some("bad_request"), |t| {
        t.agent.request("DELETE", "/v1/staged/sha256:ZZ", None)
    });
    t.case("route-staged-unknown-digest", 404, Some("not_found"), |t| {
        t.agent.request(
            "DELETE",
            &format!("/v1/staged/sha256:{}", "0".repeat(64)),
            None,
        )
    });

    // Depot URLs.
    for (name, depot) in [
        ("depot-file-url", "file:///etc/"),
        ("depot-plain-http", "http://127.0.0.1:1/"),
        ("depot-ftp", "ftp://depot/"),
        ("depot-not-a-url", "depot"),
        ("depot-with-query", "https://depot.example/?x=1"),
    ] {
        t.case(name, 400, Some("bad_request"), |t| {
            t.post("/v1/stage", &json!({"image": image, "depot": depot}))
        });
    }

    // Meanwhile the slowloris connection was open and the agent served everyone else; then it
    // closed that connection (after its header timeout).
    let served_while_open = if loris_open.load(Ordering::SeqCst) {
        t.cases.len()
    } else {
        0
    };
    let seen = loris.join().expect("slowloris thread");
    let seen = seen.unwrap_or_else(|e| panic!("slowloris: {e}"));
    let answer = parse(&seen);
    assert!(
        seen.is_empty() || answer.status == 408,
        "slowloris got: {}",
        String::from_utf8_lossy(&seen)
    );
    assert!(
        served_while_open >= 10,
        "the cases did not run while the slowloris connection was open"
    );
    t.still_serving("after slowloris");
    t.cases.push("http-slowloris-headers".into());
    eprintln!("{} HTTP cases: {:?}", t.cases.len(), t.cases);
}

/// Found by this suite: the HTTP layer bounds the time for a request's head, but nothing bounded
/// its body, so a client announcing a body and trickling it (slow POST) held its connection, and
/// one of the listener's connection slots, for ever.
#[test]
fn a_request_body_trickled_slower_than_the_body_timeout_gets_408() {
    let mut t = Target::new(AgentOptions::default());
    let socket = t.agent.socket.clone();
    let open = Arc::new(AtomicBool::new(true));
    let slow = trickle(
        socket,
        open.clone(),
        b"POST /v1/stage HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"depot\": \"".to_vec(),
    );
    // Others are served meanwhile.
    let mut served = 0;
    while open.load(Ordering::SeqCst) && served < 20 {
        t.still_serving("during a slow body");
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    t.case("http-slow-body", 408, Some("bad_request"), |_| {
        parse(
            &slow
                .join()
                .expect("thread")
                .unwrap_or_else(|e| panic!("slow body: {e}")),
        )
    });
    assert_eq!(
        served, 20,
        "other clients were not served during the slow body"
    );
}

// ---------------------------------------------------------------------------------------------
// Signed content

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
    let mut t = Target::new(AgentOptions {
        extra: "\n[trust]\nthreshold = 2\n".into(),
        ..AgentOptions::default()
    });
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

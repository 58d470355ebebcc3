//! A hostile fake agent (issue 18): what a host an attacker controls, or a buggy one, could
//! answer the controller.
//!
//! It is a real mutual-TLS server with a server certificate from the world's CA that requires a
//! client certificate from the same CA, exactly as `vibstaged` does, so `vibstagectl` talks to it
//! as to any agent of the fleet. Each request is logged ([`Seen`]) and answered by a script, a
//! closure from the request to an [`Answer`]: any JSON, any status and headers (a redirect),
//! an endless body, a body that drips a byte at a time, or no answer at all. The HTTP/1.1 side is
//! driven by hand so nothing between the script and the socket tidies up what it sends.
//!
//! [`task`] and [`status`] build SPEC-shaped bodies to start lies from.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::{Value, json};
use time::OffsetDateTime;
use vibstage::tls::{load_certs, load_key};
use vibstage_ctl::pki::{DevCa, issue_server};

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query, without `?` (empty if none).
    pub query: String,
    /// The request body.
    pub body: Vec<u8>,
    /// When the request had arrived in full.
    pub at: Instant,
}

/// How the fake answers one request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// `status` with a JSON body.
    Json(u16, Value),
    /// Exactly this status, these headers and this body (Content-Length is added).
    Raw {
        /// HTTP status.
        status: u16,
        /// Extra headers, e.g. `Location`.
        headers: Vec<(String, String)>,
        /// The body.
        body: Vec<u8>,
    },
    /// 200 with a chunked body that never ends.
    Endless,
    /// 200 announcing a 1 MB JSON body, then one byte every `every`, for ever.
    Drip {
        /// Pause between bytes.
        every: Duration,
    },
    /// Never answer; keep the connection open.
    Hang,
}

/// The script: the answer to each request.
pub type Script = dyn Fn(&Seen) -> Answer + Send + Sync;

/// A running fake agent; stops when dropped.
pub struct FakeAgent {
    /// Where it listens (127.0.0.1).
    addr: SocketAddr,
    /// Every request, in arrival order.
    log: Arc<Mutex<Vec<Seen>>>,
    /// Bytes of endless or dripped bodies written so far.
    streamed: Arc<AtomicU64>,
    /// Tells the accept loop and hanging connections to end.
    stop: Arc<AtomicBool>,
    /// Connections accepted so far (cut ones included).
    accepted: Arc<AtomicU64>,
}

impl FakeAgent {
    /// Starts a fake agent whose certificates come from `ca` (files written under `dir`),
    /// answering with `script`.
    pub fn start(
        ca: &DevCa,
        dir: &Path,
        script: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
    ) -> FakeAgent {
        Self::start_cutting(ca, dir, 0, script)
    }

    /// Like [`FakeAgent::start`], but the first `cut` connections are closed at once, before
    /// any TLS: what a controller sees of an agent whose handshake deadline passed while it was
    /// busy.
    pub fn start_cutting(
        ca: &DevCa,
        dir: &Path,
        cut: u64,
        script: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
    ) -> FakeAgent {
        let config = server_config(ca, dir);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake agent");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let fake = FakeAgent {
            addr,
            log: Arc::default(),
            streamed: Arc::default(),
            stop: Arc::default(),
            accepted: Arc::default(),
        };
        let script: Arc<Script> = Arc::new(script);
        let (log, streamed, stop) = (fake.log.clone(), fake.streamed.clone(), fake.stop.clone());
        let accepted = fake.accepted.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) if accepted.fetch_add(1, Ordering::SeqCst) < cut => drop(tcp),
                    Ok((tcp, _)) => {
                        let conn = Conn {
                            config: config.clone(),
                            script: script.clone(),
                            log: log.clone(),
                            streamed: streamed.clone(),
                            stop: stop.clone(),
                        };
                        std::thread::spawn(move || conn.serve(tcp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        fake
    }

    /// `127.0.0.1:PORT`, as `--host` takes it.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.log.lock().expect("log").clone()
    }

    /// How many requests had `method` and `path` (query ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Connections accepted so far, cut ones included.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Bytes of endless or dripped bodies written so far.
    pub fn streamed(&self) -> u64 {
        self.streamed.load(Ordering::SeqCst)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn server_config(ca: &DevCa, dir: &Path) -> Arc<ServerConfig> {
    std::fs::create_dir_all(dir).expect("fake agent dir");
    let now = OffsetDateTime::now_utc();
    let cert = issue_server(
        ca,
        "localhost",
        now - time::Duration::hours(1),
        now + time::Duration::days(30),
    )
    .expect("fake agent certificate");
    let (cert_path, key_path, ca_path) = (
        dir.join("agent.pem"),
        dir.join("agent.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.cert_pem).expect("write cert");
    std::fs::write(&key_path, cert.key_pem).expect("write key");
    std::fs::write(&ca_path, ca.cert_pem()).expect("write ca");
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs("CA", &ca_path).expect("ca") {
        roots.add(c).expect("ca root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs("certificate", &cert_path).expect("cert"),
            load_key("key", &key_path).expect("key"),
        )
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One accepted connection.
struct Conn {
    config: Arc<ServerConfig>,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Seen>>>,
    streamed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Conn {
    fn serve(self, tcp: TcpStream) {
        let _ = tcp.set_nonblocking(false);
        let Ok(server) = ServerConnection::new(self.config.clone()) else {
            return;
        };
        let mut reader = BufReader::new(StreamOwned::new(server, tcp));
        // Keep-alive: answer requests until the client closes or an answer ends the connection.
        while let Some(seen) = read_request(&mut reader) {
            self.log.lock().expect("log").push(seen.clone());
            let answer = (self.script)(&seen);
            if !self.answer(reader.get_mut(), answer) {
                return;
            }
        }
    }

    /// Writes `answer`; false when the connection is done.
    fn answer(&self, stream: &mut impl Write, answer: Answer) -> bool {
        let head = |status: u16, headers: &[(String, String)], len: Option<usize>| {
            let mut h = format!("HTTP/1.1 {status} {}\r\n", reason(status));
            for (k, v) in headers {
                h.push_str(&format!("{k}: {v}\r\n"));
            }
            match len {
                Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
                None => h.push_str("Transfer-Encoding: chunked\r\n"),
            }
            h.push_str("\r\n");
            h.into_bytes()
        };
        let json_type = vec![("Content-Type".to_owned(), "application/json".to_owned())];
        match answer {
            Answer::Json(status, value) => {
                let body = value.to_string().into_bytes();
                let mut all = head(status, &json_type, Some(body.len()));
                all.extend_from_slice(&body);
                stream.write_all(&all).and_then(|()| stream.flush()).is_ok()
            }
            Answer::Raw {
                status,
                headers,
                body,
            } => {
                let mut all = head(status, &headers, Some(body.len()));
                all.extend_from_slice(&body);
                stream.write_all(&all).and_then(|()| stream.flush()).is_ok()
            }
            Answer::Endless => {
                if stream.write_all(&head(200, &json_type, None)).is_err() {
                    return false;
                }
                let chunk = [b' '; 64 * 1024];
                let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                frame.extend_from_slice(&chunk);
                frame.extend_from_slice(b"\r\n");
                while !self.stop.load(Ordering::SeqCst) && stream.write_all(&frame).is_ok() {
                    self.streamed
                        .fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                false
            }
            Answer::Drip { every } => {
                if stream
                    .write_all(&head(200, &json_type, Some(1_000_000)))
                    .is_err()
                {
                    return false;
                }
                while !self.stop.load(Ordering::SeqCst)
                    && stream.write_all(b" ").and_then(|()| stream.flush()).is_ok()
                {
                    self.streamed.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(every);
                }
                false
            }
            Answer::Hang => {
                while !self.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                false
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

/// Reads one request (head and Content-Length body); None at end of connection.
fn read_request(reader: &mut impl BufRead) -> Option<Seen> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target, String::new()),
    };
    Some(Seen {
        method,
        path,
        query,
        body,
        at: Instant::now(),
    })
}

/// A SPEC-shaped task: `state`, `bytes_done`/`bytes_total`, an optional error `(code,
/// message)`, a step and notifications to lie with.
pub fn task(id: &str, state: &str, progress: (u64, u64), error: Option<(&str, &str)>) -> Value {
    json!({
        "id": id,
        "kind": "stage",
        "state": state,
        "progress": {"bytes_done": progress.0, "bytes_total": progress.1},
        "error": error.map(|(code, message)| json!({"code": code, "message": message})),
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "bytes_downloaded": 0,
        "notifications": [],
        "step": "fetching",
    })
}

/// A SPEC-shaped host status for `host_id`.
pub fn status(host_id: &str) -> Value {
    json!({
        "host_id": host_id,
        "agent_version": "0.1.0",
        "compliance": {"status": "unknown", "image": null, "checked_at": null, "notifications": []},
        "staging": {"state": "none", "staged": false, "software": "missing",
                    "firmware": "not_applicable", "dpu": "not_applicable",
                    "persistent": true, "location": "/scratch/vibstage", "bytes": 0},
        "maintenance": {"active": false},
        "installed": {"image": null, "reboot_required": false},
        "scratch": {"path": "/scratch/vibstage", "total_bytes": 0, "free_bytes": 0},
    })
}

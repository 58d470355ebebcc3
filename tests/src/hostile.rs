//! Shared by the hostile-client suites (`tests/tests/hostile_{tls,socket,http,content}.rs`,
//! issue 8): one agent under attack ([`Target`]), the check that a refused case wrote nothing,
//! raw requests on the socket, and signing of forged content.
//!
//! Every case asserts the exact refusal: the TLS alert of a refused handshake, or the HTTP status
//! and `error.code` of the API's error body (for the few inputs that are not HTTP at all and never
//! reach the API, the status hyper's parser answers with). After every case the agent must still
//! serve (`/healthz` on the socket, and over mTLS for the TLS cases) and nothing may have been
//! written: the scratch directory and the state directory are byte-for-byte what they were before
//! the case (a refusal that comes as a failed task may write the task list, but never anything
//! under `blobs/`, `ingest/` or `images/`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{AgentOptions, AgentProc, Reply, VibFile, World};
use serde_json::{Value, json};
use vibstage_protocol::Envelope;

/// Every file (path → bytes) and directory (path → None) under `dirs`.
pub fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    pub fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
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
pub fn diff(
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
pub struct Target {
    /// Its keys, depot and agents.
    pub world: World,
    /// The agent under attack.
    pub agent: AgentProc,
    /// The cases run so far, for the final count.
    pub cases: Vec<String>,
}

impl Target {
    /// A world with three VIBs in its depot and a started agent `esx-01` configured by `opts`.
    pub fn new(opts: AgentOptions) -> Target {
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

    /// The agent's scratch and state directories, file by file (what a refusal must not change).
    pub fn disk(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        snapshot(&[&self.agent.scratch, &self.agent.state_dir])
    }

    /// Runs one case: `act` must give `status` and `code` (code `None`: the HTTP layer answered
    /// before the API, without an error body), and must leave every file as it was.
    pub fn case(
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

    /// Panics, naming the case, unless the agent still answers `/healthz` on its socket.
    pub fn still_serving(&self, name: &str) {
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
    pub fn send(&self, method: &str, path: &str, body: &str, content_type: &str) -> Reply {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        raw_clean(&self.agent.socket, request.as_bytes(), false)
    }

    /// A JSON `POST` on the socket.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.send("POST", path, &body.to_string(), "application/json")
    }

    /// The body of a stage request for `image` from the world's depot.
    pub fn stage_body(&self, image: &Envelope) -> Value {
        json!({"image": image, "depot": self.world.depot.url()})
    }
}

/// Raw bytes on the socket; reads the answer until the agent closes. `half_close` shuts our
/// writing side after sending (a client that stops in the middle of its body).
pub fn raw(socket: &Path, bytes: &[u8], half_close: bool) -> Reply {
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
pub fn raw_clean(socket: &Path, bytes: &[u8], half_close: bool) -> Reply {
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

/// An HTTP answer as read off the socket (a single chunk when chunked), as a [`Reply`].
pub fn parse(raw: &[u8]) -> Reply {
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
pub fn payload(env: &Envelope) -> Value {
    serde_json::from_slice(&env.payload).expect("payload json")
}

/// `value` signed as a DSSE envelope of `payload_type` by `key`.
pub fn sign(payload_type: &str, value: &Value, key: &ed25519_dalek::SigningKey) -> Envelope {
    Envelope::sign(payload_type, value.to_string().into_bytes(), key)
}

/// The descriptor envelope of VIB `vib` of component `component` of an image payload.
pub fn vib_envelope(image: &Value, component: usize, vib: usize) -> Envelope {
    serde_json::from_value(image["components"][component]["vibs"][vib].clone()).expect("vib")
}

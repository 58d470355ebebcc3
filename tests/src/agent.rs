//! A test world: signing keys, a depot directory served by the fault-injecting [`Depot`], a
//! development CA with controller certificates, and real `vibstaged` processes configured to use
//! them ([`AgentProc`]), each in the world's temporary directory.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use serde_json::Value;
use time::OffsetDateTime;
use vibstage_ctl::pki::{DevCa, Validity, issue_client, issue_server};
use vibstage_ctl::publish::depot::VibSpec;
use vibstage_ctl::publish::image::{ComponentRef, ImageSpec};
use vibstage_protocol::config::Config;
use vibstage_protocol::{AcceptanceLevel, Envelope, VibKind, VibTarget};

use crate::{Depot, TestPki};

/// One VIB file to put in the depot.
#[derive(Clone, Debug)]
pub struct VibFile {
    /// VIB name.
    pub name: String,
    /// Component.
    pub component: String,
    /// Component version.
    pub version: String,
    /// Vendor.
    pub vendor: String,
    /// Software or firmware.
    pub kind: VibKind,
    /// Host or dpu.
    pub target: VibTarget,
    /// Acceptance level.
    pub acceptance: AcceptanceLevel,
    /// Size in bytes (content is pseudo-random, derived from the name).
    pub size: usize,
}

impl VibFile {
    /// A partner software VIB of component ESXi 8.0.2.
    pub fn software(name: &str, size: usize) -> Self {
        Self {
            name: name.into(),
            component: "ESXi".into(),
            version: "8.0.2-0.20".into(),
            vendor: "acme".into(),
            kind: VibKind::Software,
            target: VibTarget::Host,
            acceptance: AcceptanceLevel::Partner,
            size,
        }
    }

    /// A firmware VIB of `vendor`, component BIOS 2.1.
    pub fn firmware(name: &str, vendor: &str, size: usize) -> Self {
        Self {
            component: "BIOS".into(),
            version: "2.1".into(),
            vendor: vendor.into(),
            kind: VibKind::Firmware,
            ..Self::software(name, size)
        }
    }

    /// A dpu software VIB, component DPU 1.0.
    pub fn dpu(name: &str, size: usize) -> Self {
        Self {
            component: "DPU".into(),
            version: "1.0".into(),
            target: VibTarget::Dpu,
            ..Self::software(name, size)
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so depots are reproducible.
pub fn bytes_for(seed: &str, size: usize) -> Vec<u8> {
    let mut x: u64 = seed.bytes().fold(0x9E37_79B9_7F4A_7C15, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    });
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Options of one agent's configuration.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// `host.dpus`.
    pub dpus: Vec<String>,
    /// `host.firmware_staging_vendors`.
    pub firmware_vendors: Vec<String>,
    /// `tls.operators`.
    pub operators: Vec<String>,
    /// `tls.readers`.
    pub readers: Vec<String>,
    /// `scratch.path` (default: inside the agent's directory).
    pub scratch: Option<PathBuf>,
    /// `agent.state_dir` (default: inside the agent's directory).
    pub state_dir: Option<PathBuf>,
    /// `scratch.volatile_path`: None = inside the agent's directory; Some("") = off.
    pub volatile: Option<String>,
    /// `scratch.reserve_bytes`.
    pub reserve_bytes: u64,
    /// `depot.timeout_secs` (default 5).
    pub timeout_secs: Option<u64>,
    /// `depot.retries` (default 3).
    pub retries: Option<u32>,
    /// `scratch.concurrency` (default 4).
    pub concurrency: Option<usize>,
    /// Extra TOML merged over the configuration (see [`merge_toml`]).
    pub extra: String,
}

/// Everything one test needs around its agents.
pub struct World {
    /// The test's directory.
    pub dir: tempfile::TempDir,
    /// Signs images.
    pub image_key: SigningKey,
    /// Signs VIB descriptors (trusted up to partner).
    pub vendor_key: SigningKey,
    /// The depot directory.
    pub depot_dir: PathBuf,
    /// The HTTPS depot server.
    pub depot: Depot,
    /// The depot's PKI.
    pub depot_pki: TestPki,
    /// The controller CA.
    pub ca: DevCa,
    /// `ca.pem`, `client.pem`, `client.key` for vibstagectl's `--tls-dir`.
    pub tls_dir: PathBuf,
}

fn key(seed: &str) -> SigningKey {
    let bytes = bytes_for(seed, 32);
    let mut seed32 = [0u8; 32];
    seed32.copy_from_slice(&bytes);
    SigningKey::from_bytes(&seed32)
}

impl World {
    /// A new world with an empty depot being served.
    pub fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let depot_dir = dir.path().join("depot");
        std::fs::create_dir_all(&depot_dir).expect("depot dir");
        std::fs::create_dir_all(dir.path().join("depot-pki")).expect("pki dir");
        let depot_pki = TestPki::new(&dir.path().join("depot-pki"));
        let depot = Depot::start(&depot_dir, &depot_pki);
        let now = OffsetDateTime::now_utc();
        let ca = DevCa::generate(Validity::standard(now)).expect("ca");
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir_all(&tls_dir).expect("tls dir");
        std::fs::write(tls_dir.join("ca.pem"), ca.cert_pem()).expect("ca.pem");
        let client = issue_client(
            &ca,
            "controller",
            now - time::Duration::hours(1),
            now + time::Duration::days(30),
        )
        .expect("client cert");
        std::fs::write(tls_dir.join("client.pem"), &client.cert_pem).expect("client.pem");
        std::fs::write(tls_dir.join("client.key"), &client.key_pem).expect("client.key");
        for (name, k) in [("image", key("image")), ("vendor", key("vendor"))] {
            let pem =
                vibstage_protocol::dsse::verifying_key_to_pem(&k.verifying_key()).expect("pem");
            std::fs::write(dir.path().join(format!("{name}.pub")), pem).expect("pub");
        }
        World {
            image_key: key("image"),
            vendor_key: key("vendor"),
            depot_dir,
            depot,
            depot_pki,
            ca,
            tls_dir,
            dir,
        }
    }

    /// Adds VIB files to the depot (signed by the vendor key); returns their sha256 hex digests.
    pub fn add_vibs(&self, vibs: &[VibFile]) -> Vec<String> {
        let src = self.dir.path().join("src");
        std::fs::create_dir_all(&src).expect("src");
        vibs.iter()
            .map(|v| {
                let file = src.join(format!("{}.vib", v.name));
                std::fs::write(&file, bytes_for(&v.name, v.size)).expect("vib file");
                let spec = VibSpec {
                    component: v.component.parse().expect("component"),
                    component_version: v.version.as_str().into(),
                    vendor: v.vendor.clone(),
                    acceptance: v.acceptance,
                    kind: v.kind,
                    target: v.target,
                    version: None,
                    maintenance_mode: true,
                    reboot_required: true,
                };
                let added = vibstage_ctl::publish::depot::add(
                    &self.depot_dir,
                    &self.vendor_key,
                    &spec,
                    None,
                    &[file],
                )
                .expect("depot add");
                added[0].descriptor.sha256.to_hex()
            })
            .collect()
    }

    /// Signs an image of the given components (each `NAME=VERSION`) from the depot's descriptors;
    /// returns the envelope.
    pub fn image(&self, name: &str, serial: u64, components: &[&str]) -> Envelope {
        self.image_expiring(
            name,
            serial,
            components,
            OffsetDateTime::now_utc() + time::Duration::days(30),
        )
    }

    /// [`World::image`] with an explicit expiry.
    pub fn image_expiring(
        &self,
        name: &str,
        serial: u64,
        components: &[&str],
        expires: OffsetDateTime,
    ) -> Envelope {
        let spec = ImageSpec {
            name: name.parse().expect("name"),
            serial,
            expires,
            base_image: "8.0.2-0.20".into(),
            components: components
                .iter()
                .map(|c| c.parse::<ComponentRef>().expect("component"))
                .collect(),
        };
        let created = vibstage_ctl::publish::image::create(
            &self.depot_dir,
            &self.image_key,
            &spec,
            &[self.vendor_key.verifying_key()],
            OffsetDateTime::now_utc() - time::Duration::days(1),
            &mut |_| {},
        )
        .expect("image create");
        let text = std::fs::read_to_string(created.path).expect("image file");
        serde_json::from_str(&text).expect("envelope")
    }

    /// Writes a client certificate pair named `name` into `dir`, valid from/to the given offsets
    /// from now; returns the directory (usable as a `--tls-dir`).
    pub fn client_tls_dir(
        &self,
        dir_name: &str,
        name: &str,
        from: time::Duration,
        to: time::Duration,
    ) -> PathBuf {
        let dir = self.dir.path().join(dir_name);
        std::fs::create_dir_all(&dir).expect("dir");
        let now = OffsetDateTime::now_utc();
        let c = issue_client(&self.ca, name, now + from, now + to).expect("client");
        std::fs::write(dir.join("ca.pem"), self.ca.cert_pem()).expect("ca");
        std::fs::write(dir.join("client.pem"), c.cert_pem).expect("cert");
        std::fs::write(dir.join("client.key"), c.key_pem).expect("key");
        dir
    }

    /// Configures (but does not start) an agent named `name`.
    pub fn agent(&self, name: &str, opts: AgentOptions) -> AgentProc {
        let home = self.dir.path().join(format!("agent-{name}"));
        std::fs::create_dir_all(&home).expect("agent dir");
        let now = OffsetDateTime::now_utc();
        let server = issue_server(
            &self.ca,
            "localhost",
            now - time::Duration::hours(1),
            now + time::Duration::days(30),
        )
        .expect("server cert");
        std::fs::write(home.join("agent.pem"), server.cert_pem).expect("cert");
        std::fs::write(home.join("agent.key"), server.key_pem).expect("key");
        let port = free_port();
        let scratch = opts.scratch.clone().unwrap_or_else(|| home.join("scratch"));
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| home.join("state"));
        let volatile = opts
            .volatile
            .clone()
            .unwrap_or_else(|| home.join("volatile").display().to_string());
        let world = self.dir.path();
        let host_id = name.parse().expect("agent name is a host id");
        let mut config = Config::local(
            host_id,
            &home,
            &world.join("image.pub"),
            &world.join("vendor.pub"),
        );
        config.agent.state_dir = state_dir.clone();
        config.scratch.path = scratch.clone();
        config.scratch.volatile_path = volatile.into();
        config.scratch.reserve_bytes = opts.reserve_bytes;
        config.scratch.concurrency = opts.concurrency.unwrap_or(4);
        config.listen.tcp = format!("127.0.0.1:{port}");
        config.tls.cert = home.join("agent.pem");
        config.tls.key = home.join("agent.key");
        config.tls.client_ca = self.tls_dir.join("ca.pem");
        config.tls.operators = opts.operators.clone();
        config.tls.readers = opts.readers.clone();
        config.depot.ca = self.depot_pki.ca_pem_path().to_owned();
        config.depot.timeout_secs = opts.timeout_secs.unwrap_or(5);
        config.depot.retries = opts.retries.unwrap_or(3);
        config.host.dpus = opts.dpus.clone();
        config.host.firmware_staging_vendors = opts.firmware_vendors.clone();
        let config = merge_toml(&config.to_toml().expect("config as TOML"), &opts.extra);
        std::fs::write(home.join("agent.toml"), config).expect("config");
        AgentProc {
            name: name.into(),
            config: home.join("agent.toml"),
            socket: home.join("api.sock"),
            scratch,
            state_dir,
            log: home.join("agent.log"),
            port,
            home,
            env: Vec::new(),
            args: Vec::new(),
            child: None,
        }
    }
}

/// `extra` (a TOML fragment: sections and keys) merged over the TOML document `base`: a key in
/// both takes `extra`'s value, tables merge key by key. What the tests that add hooks or change
/// a limit use instead of appending text, which would repeat a section.
pub fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut doc: toml::Table = base.parse().expect("base config is TOML");
    merge(&mut doc, extra.parse().expect("extra config is TOML"));
    toml::to_string(&doc).expect("config as TOML")
}

impl AgentProc {
    /// Merges the TOML fragment `extra` into this agent's `agent.toml` (see [`merge_toml`]).
    pub fn merge_config(&self, extra: &str) {
        let config = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&self.config, merge_toml(&config, extra)).expect("config");
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A real `vibstaged` process.
pub struct AgentProc {
    /// Host id.
    pub name: String,
    /// Its directory.
    pub home: PathBuf,
    /// Its agent.toml.
    pub config: PathBuf,
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its scratch directory.
    pub scratch: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its stderr, appended across restarts.
    pub log: PathBuf,
    /// Its mTLS port on 127.0.0.1.
    pub port: u16,
    /// Extra environment for the process (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments (e.g. `--scrub`).
    pub args: Vec<String>,
    child: Option<Child>,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Body parsed as JSON (Null if it is not JSON).
    pub json: Value,
    /// Raw body.
    pub body: String,
}

impl AgentProc {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until it answers on its socket.
    pub fn start(&mut self) -> &mut Self {
        self.spawn();
        self.wait_ready();
        self
    }

    /// Starts the process without waiting.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent {} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(crate::vibstaged())
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .env("VIBSTAGE_LOG", "info,vibstage=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn vibstaged");
        self.child = Some(child);
    }

    /// Waits up to 20 s for `/healthz` on the socket.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "vibstaged {} exited early ({status}); log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if self
                .try_request("GET", "/healthz", None)
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "vibstaged {} not ready; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; waits up to `limit` for the exit and returns its status and the time it took.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().expect("running");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                return (status, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for a process started with [`AgentProc::spawn`] to exit on its own
    /// (e.g. one refused at start) and reaps it; `None` if it is still running (it is then
    /// left running) or was not started.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a request on the Unix socket.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<Reply> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        http_exchange(
            &mut stream,
            method,
            path,
            body.map(|b| b.to_string()).as_deref(),
            "application/json",
        )
    }

    /// Sends a request on the Unix socket; panics if the socket is unusable.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.try_request(method, path, body).unwrap_or_else(|e| {
            panic!(
                "request {method} {path} to {}: {e}\nlog:\n{}",
                self.name,
                self.log_text()
            )
        })
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Value {
        let r = self.request("GET", "/v1/status", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json
    }

    /// `POST /v1/stage`.
    pub fn stage(&self, image: &Envelope, depot: &str) -> Reply {
        self.request(
            "POST",
            "/v1/stage",
            Some(&serde_json::json!({"image": image, "depot": depot})),
        )
    }

    /// Waits (long-poll) until task `id` ends, up to `secs`; returns it.
    pub fn wait_task(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.request("GET", &format!("/v1/tasks/{id}?wait=5"), None);
            assert_eq!(r.status, 200, "{}", r.body);
            let state = r.json["state"].as_str().unwrap_or_default().to_owned();
            if !matches!(state.as_str(), "queued" | "running") {
                return r.json;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} still {state}: {}\nlog:\n{}",
                r.body,
                self.log_text()
            );
        }
    }

    /// Stages and waits for the task; returns the final task.
    pub fn stage_and_wait(&self, image: &Envelope, depot: &str) -> Value {
        let r = self.stage(image, depot);
        assert_eq!(r.status, 202, "stage: {}", r.body);
        let id = r.json["task"]["id"].as_str().expect("task id").to_owned();
        self.wait_task(&id, 120)
    }

    /// Every file under `blobs/sha256` of its scratch, with whether its bytes hash to its name.
    pub fn blobs(&self) -> Vec<(String, bool)> {
        blobs_in(&self.scratch)
    }
}

/// Files under `<store>/blobs/sha256`, each with whether it hashes to its name.
pub fn blobs_in(store: &Path) -> Vec<(String, bool)> {
    let dir = store.join("blobs/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, bool)> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            let ok = vibstage_protocol::Digest::of(&bytes).to_hex() == name;
            (name, ok)
        })
        .collect();
    out.sort();
    out
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Writes one HTTP/1.1 request (Connection: close) and reads the whole answer.
pub fn http_exchange<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&str>,
    content_type: &str,
) -> std::io::Result<Reply> {
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    // Strict on purpose: the agent reads (or drains) a whole request before it closes, so a
    // write error or a reset means an answer could be lost (issue 11).
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // rustls reports a peer that closes without close_notify; the answer is complete anyway.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    Ok(Reply {
        status,
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let len =
            usize::from_str_radix(String::from_utf8_lossy(&data[..pos]).trim(), 16).unwrap_or(0);
        if len == 0 {
            break;
        }
        let start = pos + 2;
        out.extend_from_slice(&data[start..(start + len).min(data.len())]);
        data = &data[(start + len + 2).min(data.len())..];
    }
    out
}

/// A TLS client configuration for the agent: trusts the world's CA, presents the client
/// certificate in `tls_dir` (if any).
pub fn tls_client(ca_pem: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("cert")
                    .map(|c| c.expect("cert"))
                    .collect(),
                PrivateKeyDer::from_pem_file(key).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// One request over mTLS to `addr`; an `Err` means the connection or handshake failed.
pub fn tls_request(
    config: Arc<rustls::ClientConfig>,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<Reply> {
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    http_exchange(
        &mut tls,
        method,
        path,
        body.map(|b| b.to_string()).as_deref(),
        "application/json",
    )
}

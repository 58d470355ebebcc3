//! The API client `vibstagectl` uses: the local agent over its Unix socket, or remote agents over
//! mutual TLS with the controller certificate in `--tls-dir` (`ca.pem`, `client.pem`,
//! `client.key`). Only the CA in `ca.pem` is trusted for agents' server certificates.
//!
//! A host is an untrusted peer even with a certificate from the fleet's CA (issue 18): a
//! compromised or buggy agent must not steer the controller. So the client dials only the
//! `host:port` the operator named ([`HostAddr`], nothing else of a URL survives parsing), never
//! follows a redirect, percent-encodes every path segment it did not write itself
//! ([`path_segment`]), reads at most [`MAX_BODY`] bytes of any answer and gives every request a
//! deadline. What a host says is data to check and escape, never an instruction.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use vibstage_protocol::ErrorCode;
use vibstage_protocol::api::{ErrorBody, ErrorDetail};
use vibstage_protocol::error::{error_chain, without_os_error};

/// The most bytes of one answer body the controller reads. The largest SPEC answer (a task list
/// or a status with notifications) is a few KiB; a body beyond this is a host misbehaving and is
/// cut off, so a host streaming an endless body cannot grow the controller.
pub const MAX_BODY: usize = 4 << 20;

/// Deadline of an ordinary request (everything but a long-poll): connect, send, whole answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How many characters of a non-JSON error body are kept for the operator.
const EXCERPT_CHARS: usize = 200;

/// The port an agent listens on unless the host string says otherwise (SPEC §4 `listen.tcp`).
pub const DEFAULT_PORT: u16 = 9443;

/// Why a request to an agent did not produce an answer body of the expected type.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached (connect, TLS handshake, timeout).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The agent answered with an error.
    #[error("{}: {}", .detail.code, .detail.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        detail: ErrorDetail,
    },
    /// The agent answered something no SPEC agent would: a redirect, an oversized body, a task
    /// other than the one asked for. Nothing more is asked of that host.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Local setup (TLS files) is unusable.
    #[error("{0}")]
    Setup(String),
}

impl ClientError {
    /// Whether the host refused us or could not be reached (exit code 3).
    pub fn is_refusal(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Api { detail, .. } => {
                matches!(detail.code, ErrorCode::Forbidden | ErrorCode::Unauthorized)
            }
            ClientError::Protocol(_) | ClientError::Setup(_) => false,
        }
    }

    /// Whether asking again later may help: the host was unreachable or answered 5xx. A
    /// protocol violation or a 4xx will not change by asking again.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Api { status, .. } => *status >= 500,
            ClientError::Protocol(_) | ClientError::Setup(_) => false,
        }
    }

    /// The short code shown to the operator and in `--json`.
    pub fn code(&self) -> String {
        match self {
            ClientError::Api { detail, .. } => detail.code.as_str().to_owned(),
            ClientError::Unreachable(_) => "unreachable".into(),
            ClientError::Protocol(_) => "protocol_violation".into(),
            ClientError::Setup(_) => "setup".into(),
        }
    }

    /// The message without the code.
    pub fn message(&self) -> String {
        match self {
            ClientError::Api { detail, .. } => detail.message.clone(),
            ClientError::Unreachable(m) | ClientError::Protocol(m) | ClientError::Setup(m) => {
                m.clone()
            }
        }
    }
}

/// A remote agent as the operator named it: a host (DNS name, IPv4 or IPv6 address) and a port,
/// nothing else. `esx01`, `esx01:9443`, `10.0.0.1`, `[fd00::1]:9443` and a bare `fd00::1` parse;
/// anything with a user, a path, a query, a fragment or a character no host name has is refused,
/// so a hosts-file line can never turn one request into another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostAddr {
    /// The host, lowercased, without brackets.
    host: String,
    /// The TCP port.
    port: u16,
}

impl HostAddr {
    /// `host:port`, IPv6 in brackets: what goes into the URL and identifies duplicates.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {s:?} is not a number from 1 to 65535"));
    }
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {s:?} is not a number from 1 to 65535")),
    }
}

fn check_dns_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("a host name is 1 to 253 characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!(
            "{c:?} cannot appear in a host name (expected HOST or HOST:PORT, IPv6 in brackets)"
        ));
    }
    let labels = s.strip_suffix('.').unwrap_or(s);
    for label in labels.split('.') {
        if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{label:?} is not a valid label of a host name"));
        }
    }
    Ok(())
}

impl FromStr for HostAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| "an IPv6 address opened with [ is not closed".to_owned())?;
            let ip: Ipv6Addr = inside
                .parse()
                .map_err(|_| format!("{inside:?} is not an IPv6 address"))?;
            let port = match after {
                "" => DEFAULT_PORT,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("unexpected {p:?} after the IPv6 address"))?,
                )?,
            };
            return Ok(HostAddr {
                host: ip.to_string(),
                port,
            });
        }
        if let Ok(ip) = s.parse::<Ipv6Addr>() {
            return Ok(HostAddr {
                host: ip.to_string(),
                port: DEFAULT_PORT,
            });
        }
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, parse_port(p)?),
            None => (s, DEFAULT_PORT),
        };
        if host.parse::<Ipv4Addr>().is_err() {
            check_dns_name(host)?;
        }
        Ok(HostAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// `segment` percent-encoded for use as one path segment: everything but unreserved characters
/// is encoded, and `.`/`..` (which URL parsers resolve even when encoded) are refused by the
/// callers' id checks before they get here.
pub fn path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// At most [`EXCERPT_CHARS`] characters of a body, for an error message (escaped when printed).
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_CHARS * 4)]);
    let mut short: String = text.chars().take(EXCERPT_CHARS).collect();
    if short.len() < bytes.len() {
        short.push_str(&format!("… ({} bytes in all)", bytes.len()));
    }
    short
}

/// The most connections one command sets up at once across all its hosts (TCP connect and TLS
/// handshake; a request on an open connection needs no slot). A controller that opens a
/// thousand TLS connections at the same instant is a thundering herd: where many agents share
/// little CPU (this repository's 1,000-agent bench on 2 cores) their handshakes miss the agents'
/// 3-second handshake deadline. A slot is held only while the connection is set up, so hosts
/// that take the request and then never answer hold none.
pub const DIALING: usize = 64;

/// How long setting up one connection may take once it has its slot.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Times a request whose connection could not be set up is tried again, after
/// [`CONNECT_BACKOFF`], then twice that: nothing reached the host, so trying again is safe even
/// for a POST, and a host that is busy for a moment (a TLS handshake that missed the agent's
/// deadline on a loaded host) should not fail a fleet-wide rollout.
const CONNECT_RETRIES: u32 = 2;
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// Whether `e` failed to set up the connection in a way that may pass: the host hung up or
/// reset during the TCP or TLS handshake, or did not finish it in time. Nothing else is tried
/// again: a refused connection (nothing listens), a name that does not resolve, a certificate
/// either side refuses, a peer that does not speak TLS.
fn worth_reconnecting(e: &reqwest::Error) -> bool {
    use std::io::ErrorKind::{
        BrokenPipe, ConnectionAborted, ConnectionReset, TimedOut, UnexpectedEof,
    };
    if !e.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<tower::timeout::error::Elapsed>()
            || io_kind(err).is_some_and(|kind| {
                matches!(
                    kind,
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut
                )
            })
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// The kind of the innermost I/O error `err` is or wraps (the connector hands the OS's error on
/// inside an `ErrorKind::Other` of its own).
fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let io = err.downcast_ref::<std::io::Error>()?;
    match io.get_ref() {
        Some(inner) if io.kind() == std::io::ErrorKind::Other => io_kind(inner).or(Some(io.kind())),
        _ => Some(io.kind()),
    }
}

/// A client bound to one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    client: reqwest::Client,
    base: String,
    /// How the target is named in output.
    pub name: String,
}

/// What every remote agent of one command shares: the controller's identity and the CA, read
/// and parsed once into one TLS configuration (whose session cache all hosts share), and the
/// [`DIALING`] slots. Each host gets its own small connection pool on top, so its connection
/// closes as soon as the host is done: with `--parallel N` the controller holds about N
/// connections, not one per host it has finished with.
#[derive(Clone, Debug)]
pub struct Fleet {
    tls: rustls::ClientConfig,
    dialing: Arc<Semaphore>,
}

impl Fleet {
    /// Reads `ca.pem`, `client.pem` and `client.key` from `tls_dir`.
    pub fn new(tls_dir: &Path) -> Result<Fleet, ClientError> {
        let setup = |file: &str, e: String| {
            ClientError::Setup(format!(
                "{}: {} (--tls-dir holds ca.pem, client.pem and client.key, as written by \
                 `vibstagectl certs init`)",
                tls_dir.join(file).display(),
                without_os_error(e)
            ))
        };
        let mut roots = rustls::RootCertStore::empty();
        let cas = vibstage::tls::load_certs("the CA", &tls_dir.join("ca.pem"))
            .map_err(|e| setup("ca.pem", e.to_string()))?;
        if cas.is_empty() {
            return Err(setup("ca.pem", "no certificate in it".into()));
        }
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| setup("ca.pem", format!("not a CA certificate: {e}")))?;
        }
        let certs =
            vibstage::tls::load_certs("the controller certificate", &tls_dir.join("client.pem"))
                .map_err(|e| setup("client.pem", e.to_string()))?;
        let key = vibstage::tls::load_key("the controller key", &tls_dir.join("client.key"))
            .map_err(|e| setup("client.key", e.to_string()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Setup(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| ClientError::Setup(format!("client.pem/client.key: {e}")))?;
        Ok(Fleet {
            tls,
            dialing: Arc::new(Semaphore::new(DIALING)),
        })
    }

    /// The agent at `addr`, shown as `name`.
    pub fn agent(&self, addr: &HostAddr, name: &str) -> Result<AgentClient, ClientError> {
        // Layers wrap the ones added before: the slot is taken first, then the connection has
        // CONNECT_TIMEOUT (waiting for a slot is bounded by the request's own deadline).
        let client = builder()
            .tls_backend_preconfigured(self.tls.clone())
            .https_only(true)
            .connector_layer(tower::timeout::TimeoutLayer::new(CONNECT_TIMEOUT))
            .connector_layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                self.dialing.clone(),
            ))
            .build()
            .map_err(|e| ClientError::Setup(chain(e)))?;
        Ok(AgentClient {
            client,
            base: format!("https://{}", addr.authority()),
            name: name.to_owned(),
        })
    }
}

/// The error and its causes ([`error_chain`]), without reqwest's URL (the host is already
/// named on the line).
fn chain(e: reqwest::Error) -> String {
    error_chain(&e.without_url())
}

/// What every client of an agent has: no redirects (a redirect would carry the signed image and
/// our certificate to a place the operator never named, issue 18 item 1: a 3xx is an answer,
/// not an instruction).
fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

impl AgentClient {
    /// The local agent on `socket`.
    pub fn local(socket: &Path) -> Result<AgentClient, ClientError> {
        let client = builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .unix_socket(socket)
            .build()
            .map_err(|e| ClientError::Setup(chain(e)))?;
        Ok(AgentClient {
            client,
            base: "http://localhost".into(),
            name: socket.display().to_string(),
        })
    }

    /// A remote agent at `addr` over mutual TLS with the files in `tls_dir`, shown as `name`.
    /// For several agents, load the files once with [`Fleet::new`] instead.
    pub fn remote(addr: &HostAddr, name: &str, tls_dir: &Path) -> Result<AgentClient, ClientError> {
        Fleet::new(tls_dir)?.agent(addr, name)
    }

    /// Sends `request` and reads its answer, trying again when the connection could not be
    /// set up ([`worth_reconnecting`]).
    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<(u16, T), ClientError> {
        let mut retries = 0;
        let mut response = loop {
            let Some(attempt) = request.try_clone() else {
                return Err(ClientError::Setup(
                    "internal error: a request body that cannot be sent twice".into(),
                ));
            };
            match attempt.timeout(timeout).send().await {
                Ok(r) => break r,
                Err(e) if retries < CONNECT_RETRIES && worth_reconnecting(&e) => {
                    retries += 1;
                    tokio::time::sleep(CONNECT_BACKOFF * retries).await;
                }
                Err(e) => return Err(ClientError::Unreachable(chain(e))),
            }
        };
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| excerpt(l.as_bytes()))
                .unwrap_or_default();
            return Err(ClientError::Protocol(format!(
                "answered HTTP {status} redirecting to {location:?}; the controller never follows redirects"
            )));
        }
        if let Some(len) = response.content_length().filter(|&l| l > MAX_BODY as u64) {
            return Err(ClientError::Protocol(format!(
                "announced an answer of {len} bytes, more than the {MAX_BODY}-byte limit; not read"
            )));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ClientError::Unreachable(chain(e)))?
        {
            if bytes.len().saturating_add(chunk.len()) > MAX_BODY {
                return Err(ClientError::Protocol(format!(
                    "answer body exceeds the {MAX_BODY}-byte limit; stopped reading it"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if status >= 400 {
            let detail = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| {
                    ErrorDetail::new(
                        ErrorCode::Internal,
                        format!("HTTP {status}: {}", excerpt(&bytes)),
                    )
                });
            return Err(ClientError::Api { status, detail });
        }
        serde_json::from_slice(&bytes)
            .map(|v| (status, v))
            .map_err(|e| ClientError::Api {
                status,
                detail: ErrorDetail::new(
                    ErrorCode::Internal,
                    format!("unexpected answer ({e}): {}", excerpt(&bytes)),
                ),
            })
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(
            self.client.get(format!("{}{path}", self.base)),
            REQUEST_TIMEOUT,
        )
        .await
        .map(|(_, v)| v)
    }

    /// A long-poll: GET `path` with a deadline of `timeout` (the poll's wait plus a margin).
    pub async fn get_within<T: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.send(self.client.get(format!("{}{path}", self.base)), timeout)
            .await
            .map(|(_, v)| v)
    }

    /// POST `body` as JSON to `path`; returns the status and the answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(u16, T), ClientError> {
        self.send(
            self.client.post(format!("{}{path}", self.base)).json(body),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// DELETE `path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(
            self.client.delete(format!("{}{path}", self.base)),
            REQUEST_TIMEOUT,
        )
        .await
        .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, String> {
        s.parse::<HostAddr>().map(|h| h.authority())
    }

    #[test]
    fn hosts_parse_into_host_and_port_only() {
        assert_eq!(parse("esx01").as_deref(), Ok("esx01:9443"));
        assert_eq!(parse("ESX01.lab:1234").as_deref(), Ok("esx01.lab:1234"));
        assert_eq!(parse("10.0.0.1").as_deref(), Ok("10.0.0.1:9443"));
        assert_eq!(parse("[fd00::1]:8443").as_deref(), Ok("[fd00::1]:8443"));
        assert_eq!(parse("[::1]").as_deref(), Ok("[::1]:9443"));
        assert_eq!(parse("fd00::1").as_deref(), Ok("[fd00::1]:9443"));
        for bad in [
            "esx01/v1/remediate#",
            "user@host",
            "/path?q",
            "host:",
            "host:0",
            "host:+1",
            "host:70000",
            "host:1:2",
            "[fd00::1",
            "[fd00::1]x",
            "[nothost]:1",
            "",
            "-a.b",
            "a..b",
            "host name",
            "hóst",
            "esx01#x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("0123abcd"), "0123abcd");
        assert_eq!(path_segment("../status#"), "..%2Fstatus%23");
        assert_eq!(path_segment("a?b c"), "a%3Fb%20c");
    }

    #[test]
    fn excerpts_are_short() {
        let long = vec![b'x'; 100_000];
        let e = excerpt(&long);
        assert!(e.len() < 300, "{e}");
        assert!(e.ends_with("(100000 bytes in all)"), "{e}");
        assert_eq!(excerpt(b"short"), "short");
    }
}

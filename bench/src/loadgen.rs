//! The P6 load generator: N HTTP/1.1 keep-alive connections over mutual TLS (rustls with the
//! controller certificate) sending `GET path`. Closed loop (no rate): each connection sends its
//! next request as soon as the previous answer is read, which finds the highest rate. Paced (a
//! total rate): each connection sends on a fixed schedule, and a request sent late because the
//! previous answer came late is timed from when it should have been sent, so that a slow server
//! cannot hide its queueing (no coordinated omission). It runs on one thread (a current-thread
//! tokio runtime), so on a 2-core machine it leaves the other core to the server under test.
//!
//! Requests that complete within the measured window (after a warm-up) count; each one's
//! latency (request sent to body read) goes into the percentiles.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use crate::{BenchError, Result};

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Requests answered 200 within the window.
    pub requests: u64,
    /// Other answers or failed requests within the window.
    pub errors: u64,
    /// The window, seconds.
    pub secs: f64,
    /// Latencies of the counted requests, microseconds, sorted.
    pub latencies_us: Vec<u64>,
}

impl Load {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-9)
    }

    /// A percentile of the latencies, in seconds.
    pub fn latency(&self, p: f64) -> f64 {
        crate::report::percentile(&self.latencies_us, p) as f64 / 1e6
    }
}

/// A client configuration trusting `ca` and presenting `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(format!("load generator TLS: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in vibstage::tls::load_certs("CA", ca).map_err(|e| setup(&e))? {
        roots.add(c).map_err(|e| setup(&e))?;
    }
    let certs = vibstage::tls::load_certs("client certificate", cert).map_err(|e| setup(&e))?;
    let key = vibstage::tls::load_key("client key", key).map_err(|e| setup(&e))?;
    let config = rustls::ClientConfig::builder_with_provider(vibstage::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| setup(&e))?;
    Ok(Arc::new(config))
}

/// How hard to load.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Keep-alive connections.
    pub connections: usize,
    /// Total requests per second over all connections; `None` = closed loop, as fast as answered.
    pub rate: Option<f64>,
    /// Time before the measured window.
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
}

/// Loads `addr` with requests for `path` in `shape`.
pub fn run(
    addr: SocketAddr,
    path: &str,
    config: Arc<rustls::ClientConfig>,
    shape: Shape,
) -> Result<Load> {
    let Shape {
        connections,
        rate,
        warmup,
        window,
    } = shape;
    let connections = connections.max(1);
    // Each connection's interval between sends, when paced.
    let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r.max(1e-3)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::io("start the load generator's runtime"))?;
    runtime.block_on(async move {
        let from = Instant::now() + warmup;
        let until = from + window;
        let mut set = tokio::task::JoinSet::new();
        // The agent closes connections beyond 8 handshakes in progress from one address (its
        // defence against handshake floods): connect like a well-behaved client, a few at once.
        let dialing = Arc::new(tokio::sync::Semaphore::new(DIALING));
        for i in 0..connections {
            let (config, path, dialing) = (config.clone(), path.to_owned(), dialing.clone());
            // Paced connections start spread over one interval, not all at once.
            let offset = interval.map(|d| d * i as u32 / connections as u32);
            set.spawn(async move {
                let permit = dialing.acquire_owned().await.ok();
                connection(addr, &path, config, permit, (from, until), interval, offset).await
            });
        }
        let mut load = Load {
            secs: window.as_secs_f64(),
            ..Load::default()
        };
        while let Some(joined) = set.join_next().await {
            let one = joined.map_err(|e| BenchError::Run(format!("load generator: {e}")))??;
            load.requests += one.requests;
            load.errors += one.errors;
            load.latencies_us.extend(one.latencies_us);
        }
        load.latencies_us.sort_unstable();
        Ok(load)
    })
}

/// Connections of the load generator set up at once.
const DIALING: usize = 4;

/// One keep-alive connection's requests; `dialing` is released once it is set up.
async fn connection(
    addr: SocketAddr,
    path: &str,
    config: Arc<rustls::ClientConfig>,
    dialing: Option<tokio::sync::OwnedSemaphorePermit>,
    (from, until): (Instant, Instant),
    interval: Option<Duration>,
    offset: Option<Duration>,
) -> Result<Load> {
    let what = || format!("connect to {addr}");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(BenchError::io(what()))?;
    tcp.set_nodelay(true).map_err(BenchError::io(what()))?;
    let name = ServerName::from(addr.ip());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(BenchError::io(format!("TLS handshake with {addr}")))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| BenchError::Run(format!("HTTP handshake with {addr}: {e}")))?;
    drop(dialing);
    tokio::spawn(conn);
    let mut load = Load::default();
    let mut due = Instant::now() + offset.unwrap_or_default();
    loop {
        // When paced and early, wait for the schedule and time from the actual send (the timer's
        // lateness is not the server's); when late, time from when the request was due.
        let mut start = Instant::now();
        if let Some(interval) = interval {
            if start < due {
                tokio::time::sleep_until(due.into()).await;
                start = Instant::now();
            } else {
                start = due;
            }
            due += interval;
        }
        if start >= until {
            return Ok(load);
        }
        let request = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| BenchError::Run(format!("request: {e}")))?;
        let ok = match sender.ready().await {
            Ok(()) => match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    response.into_body().collect().await.is_ok() && status == http::StatusCode::OK
                }
                Err(_) => false,
            },
            Err(e) => {
                return Err(BenchError::Run(format!(
                    "connection to {addr} closed under load: {e}"
                )));
            }
        };
        let end = Instant::now();
        if start >= from && end < until {
            if ok {
                load.requests += 1;
                load.latencies_us
                    .push(end.duration_since(start).as_micros() as u64);
            } else {
                load.errors += 1;
            }
        }
    }
}

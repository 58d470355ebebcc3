//! A real HTTP(S) depot server with fault injection.
//!
//! [`Depot`] serves a depot directory (`vibs/<sha256>`, `descriptors/<sha256>.json`,
//! `images/<name>.json`) like any static web server would: GET and HEAD, a
//! `Content-Length` on every file, single `Range` requests answered with 206 and
//! `Content-Range`, 416 when unsatisfiable, 404 for missing files and 400 for
//! paths that try to leave the root. File bodies are streamed in 64 KiB chunks.
//!
//! Tests then break it on purpose with [`Depot::fault`], modeled on tough's
//! `integ/failure-server` and Mender's `http_resumer_test.cpp`: every request
//! takes at most one [`Fault`] from the rules set for its path, and the rule is
//! used up after `times` requests. [`Depot::requests`] records what each request
//! asked for and what it got, for assertions.
//!
//! Shape: the server runs on its own multi-thread tokio runtime in a background
//! thread, so it works the same from sync `#[test]`s and `#[tokio::test]`s, and
//! dropping the [`Depot`] stops it. Every request is turned into a `Reply` by
//! one function, `reply`, which is the only place that knows what a fault
//! does to the status and headers; `pump` is the only place that knows what
//! a fault does to the body bytes.
//!
//! Invariants: no lock is held across an await; a client that goes away, or a
//! request that makes no sense, never panics the server.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use crate::pki::TestPki;

mod faults;
#[cfg(test)]
mod tests;

pub use faults::Fault;
use faults::{DepotBody, pump, reply};

/// The `path` that makes a fault rule match every request path.
pub const ANY_PATH: &str = "*";

/// What the depot saw and did for one request. The log is in the order the
/// responses were started (which is arrival order unless requests overlap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog {
    /// Request method (`GET`, `HEAD`, …).
    pub method: String,
    /// Request path as sent, without the query (e.g. `/vibs/<hex>`).
    pub path: String,
    /// The `Range` header as sent, if any.
    pub range: Option<String>,
    /// Status code of the response.
    pub status: u16,
    /// Body bytes handed to the connection so far. For a cut (Truncate, Reset)
    /// they were also flushed to the socket before the cut.
    pub body_bytes_sent: u64,
}

/// A running depot server; dropping it shuts the server down.
pub struct Depot {
    /// State shared with the server: root, fault rules, request log.
    shared: Arc<Shared>,
    /// Where the server listens (127.0.0.1, a port the kernel picked).
    addr: SocketAddr,
    /// `https` or `http`.
    scheme: &'static str,
    /// Fired by `Drop` to stop the accept loop.
    shutdown: Option<oneshot::Sender<()>>,
    /// The thread that owns the server's runtime; joined by `Drop`.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Depot {
    /// Serves `root` over HTTPS with the server certificate of `pki`.
    pub fn start(root: &Path, pki: &TestPki) -> Depot {
        Depot::launch(root, Some(TlsAcceptor::from(pki.server_config())))
    }

    /// Serves `root` over plain HTTP.
    pub fn start_http(root: &Path) -> Depot {
        Depot::launch(root, None)
    }

    fn launch(root: &Path, tls: Option<TlsAcceptor>) -> Depot {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-depot")
            .enable_all()
            .build()
            .expect("build the depot's tokio runtime");
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the depot on 127.0.0.1");
        std_listener
            .set_nonblocking(true)
            .expect("make the depot listener non-blocking");
        let addr = std_listener.local_addr().expect("depot listener address");
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener).expect("register the depot listener")
        };

        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        });
        let (shutdown, stop) = oneshot::channel();
        let server = accept_loop(listener, tls.clone(), Arc::clone(&shared), stop);
        let thread = std::thread::Builder::new()
            .name("test-depot".into())
            .spawn(move || {
                runtime.block_on(server);
                // Ends in-flight connections and body pumps; waits briefly for file reads.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .expect("spawn the depot thread");

        Depot {
            shared,
            addr,
            scheme: if tls.is_some() { "https" } else { "http" },
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Base URL with a trailing slash, e.g. `https://127.0.0.1:41234/`.
    pub fn url(&self) -> String {
        format!("{}://{}/", self.scheme, self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory being served.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Request path of a VIB in the depot: `/vibs/<sha256_hex>`.
    pub fn vib_path(sha256_hex: &str) -> String {
        format!("/vibs/{sha256_hex}")
    }

    /// Applies `fault` to the next `times` requests for `path` (usize::MAX: always).
    ///
    /// `path` is an exact request path such as `/vibs/<hex>`, or [`ANY_PATH`].
    /// A request takes one fault: the oldest live rule for its exact path, else
    /// the oldest live `*` rule. Rules are used up by any request, whatever its
    /// method and whether the file exists.
    pub fn fault(&self, path: &str, fault: Fault, times: usize) {
        if times == 0 {
            return;
        }
        lock(&self.shared.faults).push(Rule {
            path: path.to_owned(),
            fault,
            remaining: times,
        });
    }

    /// Removes every fault rule, used up or not.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Every request since the start or the last [`Depot::clear_log`].
    pub fn requests(&self) -> Vec<RequestLog> {
        lock(&self.shared.log).iter().map(Entry::snapshot).collect()
    }

    /// Total body bytes sent since the start or the last [`Depot::clear_log`].
    pub fn bytes_served(&self) -> u64 {
        lock(&self.shared.log)
            .iter()
            .map(|e| e.sent.load(Ordering::Relaxed))
            .sum()
    }

    /// How many requests were made for exactly `path`.
    pub fn count(&self, path: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|e| e.path == path)
            .count()
    }

    /// Forgets the request log (and so resets [`Depot::bytes_served`]).
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }
}

impl Drop for Depot {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// State shared between the [`Depot`] handle and the server tasks.
struct Shared {
    root: PathBuf,
    /// Fault rules in the order they were set; used-up rules are removed.
    faults: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Entry>>,
}

struct Rule {
    path: String,
    fault: Fault,
    /// Requests left; usize::MAX never runs out.
    remaining: usize,
}

/// A log entry whose byte count the response body keeps updating.
struct Entry {
    method: String,
    path: String,
    range: Option<String>,
    status: u16,
    sent: Arc<AtomicU64>,
}

impl Entry {
    fn snapshot(&self) -> RequestLog {
        RequestLog {
            method: self.method.clone(),
            path: self.path.clone(),
            range: self.range.clone(),
            status: self.status,
            body_bytes_sent: self.sent.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// Takes one use of the fault rule that applies to `path`, if any.
    fn take_fault(&self, path: &str) -> Option<Fault> {
        let mut rules = lock(&self.faults);
        let index = rules
            .iter()
            .position(|r| r.path == path)
            .or_else(|| rules.iter().position(|r| r.path == ANY_PATH))?;
        let rule = &mut rules[index];
        let fault = rule.fault.clone();
        if rule.remaining != usize::MAX {
            rule.remaining -= 1;
            if rule.remaining == 0 {
                rules.remove(index);
            }
        }
        Some(fault)
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test must not take the depot down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Connections

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    tokio::spawn(serve_tcp(tcp, tls.clone(), Arc::clone(&shared)));
                }
                // E.g. out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn serve_tcp(tcp: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let conn = Arc::new(ConnState::new(&tcp));
    match tls {
        None => serve_http(tcp, conn, shared).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
            if let Ok(Ok(stream)) = handshake.await {
                serve_http(stream, conn, shared).await;
            }
        }
    }
}

async fn serve_http<IO>(io: IO, conn: Arc<ConnState>, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(TrackedIo {
        inner: io,
        conn: Arc::clone(&conn),
    });
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(handle(&shared, conn, req).await) }
    });
    // Errors here are the faults doing their job, or a client that went away.
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(io, service)
        .await;
}

/// Per-connection state that lets a response body cut its connection cleanly.
///
/// hyper drops buffered bytes when a body fails, so before a Truncate or Reset
/// the body waits for the connection to be flushed once more ([`TrackedIo`]
/// counts flushes). For a Reset it then sets SO_LINGER 0 on a duplicate of the
/// socket's descriptor: when the last descriptor closes, the kernel sends RST.
struct ConnState {
    flushes: AtomicU64,
    flush_waiter: Mutex<Option<Waker>>,
    /// A dup of the TCP socket; keeps the socket open until the connection ends.
    socket: Option<OwnedFd>,
}

impl ConnState {
    fn new(tcp: &TcpStream) -> ConnState {
        ConnState {
            flushes: AtomicU64::new(0),
            flush_waiter: Mutex::new(None),
            socket: tcp.as_fd().try_clone_to_owned().ok(),
        }
    }

    fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// True once a flush completed after `count` was read; otherwise wakes `waker` on the next one.
    fn flushed_since(&self, count: u64, waker: &Waker) -> bool {
        let mut waiter = lock(&self.flush_waiter);
        if self.flush_count() > count {
            return true;
        }
        *waiter = Some(waker.clone());
        false
    }

    fn flushed(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if let Some(waker) = lock(&self.flush_waiter).take() {
            waker.wake();
        }
    }

    /// Makes the socket's final close send RST instead of FIN.
    fn arm_reset(&self) {
        if let Some(socket) = &self.socket {
            let linger = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let _ =
                nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Linger, &linger);
        }
    }
}

/// The connection's byte stream, counting completed flushes for [`ConnState`].
struct TrackedIo<IO> {
    inner: IO,
    conn: Arc<ConnState>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TrackedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = result {
            self.conn.flushed();
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Requests

async fn handle(
    shared: &Shared,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<DepotBody> {
    let path = req.uri().path().to_owned();
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let fault = shared.take_fault(&path);
    let reply = reply(&shared.root, &req, range.as_deref(), fault).await;

    let sent = Arc::new(AtomicU64::new(0));
    lock(&shared.log).push(Entry {
        method: req.method().to_string(),
        path,
        range,
        status: reply.status.as_u16(),
        sent: Arc::clone(&sent),
    });

    let body = match reply.body {
        Some(plan) if req.method() != Method::HEAD => {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(pump(plan, tx));
            DepotBody::streaming(rx, sent, conn)
        }
        _ => DepotBody::empty(),
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    for (name, value) in reply.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

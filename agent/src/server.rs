//! One `serve` for both listeners (mini-redis `server::run`): accept, establish who the peer is
//! (TLS client certificate, or SO_PEERCRED on the Unix socket), then serve HTTP/1.1 on the
//! connection until it ends or shutdown is signalled, and close it the way nginx does (lingering
//! close) so a client that is still sending reads the whole answer instead of a reset.
//!
//! Over TCP nobody is known until the TLS handshake has succeeded, so handshakes have their own
//! small pool, a short timeout and a per-source-address cap, and only authenticated connections
//! take one of the connection slots: a peer that opens connections and never starts TLS holds at
//! most a few handshake slots for a few seconds, never the slots of real clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower::Service as _;

use crate::api::Peer;

/// Most connections served at once per listener (authenticated ones, over TCP).
const MAX_CONNECTIONS: usize = 512;
/// Most TLS handshakes in progress at once: everything an unauthenticated peer can hold.
const MAX_HANDSHAKES: usize = 64;
/// Most TLS handshakes in progress at once from one source address; a connection over the cap
/// is closed at once, so one flooding source cannot fill the handshake pool.
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
/// Time allowed for a TLS handshake (a real client needs milliseconds).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time an authenticated connection may wait for a free connection slot before it is closed.
const SLOT_WAIT: Duration = Duration::from_secs(10);
/// Time allowed for a request's headers to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Lingering close: how long, and how many bytes, a closing connection keeps reading (and
/// discarding) what the client still sends after our answer, so that the answer is not lost
/// to a reset (nginx `lingering_time`, `lingering_timeout`).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 8 << 20;

/// The TLS server configuration, replaceable on SIGHUP.
pub type TlsConfig = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// What happened to the TLS handshakes of a listener (`vibstage_tls_handshakes_total`): how
/// many connections the clients of a fleet cost, and whether anyone is knocking who should not.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    /// Handshakes that authenticated a client.
    pub completed: AtomicU64,
    /// Handshakes refused (no or a bad client certificate, not TLS) or timed out.
    pub failed: AtomicU64,
    /// Connections closed before any handshake: their source had too many in progress.
    pub turned_away: AtomicU64,
}

impl HandshakeStats {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// mTLS over TCP, counting its handshakes.
    Tcp(TcpListener, TlsConfig, Arc<HandshakeStats>),
    /// The local root socket.
    Unix(UnixListener),
}

/// Handshakes in progress per source address.
#[derive(Clone, Default)]
struct Sources(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One handshake counted against its source; uncounted when dropped.
struct SourceSlot {
    sources: Sources,
    ip: IpAddr,
}

impl Sources {
    /// Counts a handshake from `ip`, or `None` if that source already has its share.
    fn enter(&self, ip: IpAddr) -> Option<SourceSlot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` becomes true, then waits for open connections to
/// finish their requests.
pub async fn serve(listener: Listener, app: Router, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let sources = Sources::default();
    let mut connections = JoinSet::new();
    loop {
        // Over TCP a connection first needs a handshake slot; the Unix socket's peers are
        // known from the start and take a connection slot at once.
        let pool = match listener {
            Listener::Tcp(..) => &handshakes,
            Listener::Unix(_) => &limit,
        };
        let permit = tokio::select! {
            p = pool.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.changed() => break,
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        match accepted {
            Ok(Accepted::Tcp(stream, ip, config, stats)) => {
                let Some(source) = sources.enter(ip) else {
                    HandshakeStats::count(&stats.turned_away);
                    tracing::debug!(%ip, "too many TLS handshakes from this address; connection closed");
                    continue;
                };
                let limit = limit.clone();
                connections.spawn(async move {
                    let handshake = (permit, source);
                    let Some(tls) = handshake_tls(stream, ip, config).await else {
                        HandshakeStats::count(&stats.failed);
                        return;
                    };
                    HandshakeStats::count(&stats.completed);
                    drop(handshake);
                    let Some(_permit) = connection_slot(limit, ip).await else {
                        return;
                    };
                    let names = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(crate::tls::cert_names)
                        .unwrap_or_default();
                    serve_connection(tls, Peer::Remote { names }, app, shutdown).await;
                });
            }
            Ok(Accepted::Unix(stream)) => {
                connections.spawn(async move {
                    let _permit = permit;
                    let uid = nix::sys::socket::getsockopt(
                        &stream,
                        nix::sys::socket::sockopt::PeerCredentials,
                    )
                    .map(|c| c.uid())
                    .unwrap_or(u32::MAX);
                    serve_connection(stream, Peer::Local { uid }, app, shutdown).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// The TLS handshake, within [`HANDSHAKE_TIMEOUT`]; `None` (logged) if it fails.
async fn handshake_tls(
    stream: tokio::net::TcpStream,
    ip: IpAddr,
    config: Arc<rustls::ServerConfig>,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!(%ip, error = %e, "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::info!(%ip, "TLS handshake timed out");
            None
        }
    }
}

/// A connection slot for an authenticated connection, waiting at most [`SLOT_WAIT`].
async fn connection_slot(limit: Arc<Semaphore>, ip: IpAddr) -> Option<OwnedSemaphorePermit> {
    match tokio::time::timeout(SLOT_WAIT, limit.acquire_owned()).await {
        Ok(Ok(permit)) => Some(permit),
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::warn!(%ip, "every connection slot stayed busy; authenticated connection closed");
            None
        }
    }
}

enum Accepted {
    Tcp(
        tokio::net::TcpStream,
        IpAddr,
        Arc<rustls::ServerConfig>,
        Arc<HandshakeStats>,
    ),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l, config, stats) => {
            let (stream, addr) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            let config = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(Accepted::Tcp(
                stream,
                addr.ip().to_canonical(),
                config,
                stats.clone(),
            ))
        }
        Listener::Unix(l) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

async fn serve_connection<IO>(io: IO, peer: Peer, app: Router, mut shutdown: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(peer.clone());
        Box::pin(app.clone().call(request))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10);
    // Served "without shutdown" so that the connection comes back for the lingering close.
    let mut connection = builder.serve_connection(TokioIo::new(io), service);
    let mut stopping = false;
    tokio::select! {
        result = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => stopping = true,
    }
    if stopping {
        std::pin::Pin::new(&mut connection).graceful_shutdown();
        let finish = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx));
        if tokio::time::timeout(Duration::from_secs(5), finish)
            .await
            .is_err()
        {
            return;
        }
    }
    linger(connection.into_parts().io.into_inner()).await;
}

/// Closes a connection the way nginx does (lingering close): our side is shut for writing, so
/// the client reads the whole answer and then the end of the stream, and whatever it still
/// sends (the rest of a body we refused) is read and discarded, within [`LINGER_TIME`] and
/// [`LINGER_BYTES`], until it closes too. Closing a socket with unread bytes in it would send a
/// reset instead, and the client could lose the answer it had not read yet.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    if tokio::time::timeout_at(deadline, io.shutdown())
        .await
        .is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut drained = 0usize;
    while drained < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => drained = drained.saturating_add(n),
        }
    }
}

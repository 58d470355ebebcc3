//! One `serve` for both listeners (mini-redis `server::run`): accept, establish who the peer is
//! (TLS client certificate, or SO_PEERCRED on the Unix socket), then serve HTTP/1.1 on the
//! connection until it ends or shutdown is signalled. Connections are capped by a semaphore, a
//! TLS handshake and a request's headers must arrive within their timeouts, and shutdown lets
//! in-flight requests finish.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::Service as _;

use crate::api::Peer;

/// Most connections served at once per listener.
const MAX_CONNECTIONS: usize = 512;
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's headers to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS server configuration, replaceable on SIGHUP.
pub type TlsConfig = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// mTLS over TCP.
    Tcp(TcpListener, TlsConfig),
    /// The local root socket.
    Unix(UnixListener),
}

/// Serves `app` on `listener` until `shutdown` becomes true, then waits for open connections to
/// finish their requests.
pub async fn serve(listener: Listener, app: Router, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.changed() => break,
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        match accepted {
            Ok(Accepted::Tcp(stream, config)) => {
                connections.spawn(async move {
                    let _permit = permit;
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!("TLS handshake timed out");
                            return;
                        }
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

enum Accepted {
    Tcp(tokio::net::TcpStream, Arc<rustls::ServerConfig>),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l, config) => {
            let (stream, _) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            let config = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(Accepted::Tcp(stream, config))
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
        app.clone().call(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}

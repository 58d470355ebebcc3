//! A small static HTTPS file server for a depot directory (SPEC §1 `depot`): what `vibstagectl
//! demo` uses to serve the depot it builds, on loopback, without asking the operator for nginx.
//!
//! It is tower-http's `ServeDir` (GET and HEAD, `Range` requests with `206 Partial Content`,
//! `Last-Modified`, no directory listings, `..` refused) served by the agent's own accept loop
//! (`vibstage::server::serve`: handshake and connection limits, timeouts, graceful shutdown)
//! with a server certificate the caller names; no client certificate is asked for, since depot
//! content is signed and checked by the agent either way. It is not tuned to be a production depot:
//! fleets serve their depot from a real web server or a CDN.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::services::ServeDir;

use vibstage::server::{Listener, serve};
use vibstage::tls::{TlsError, load_certs, load_key, provider};

/// Why the depot server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DepotServerError {
    /// The directory to serve is missing or not a directory.
    #[error("cannot serve {}: {detail}", path.display())]
    Root {
        /// The directory.
        path: PathBuf,
        /// What is wrong, in words for the operator (the message ends with it).
        detail: String,
    },
    /// The certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error: what the OS or library said, kept as `source()`.
        #[source]
        source: std::io::Error,
    },
}

/// A running depot server. Dropping it without [`DepotServer::stop`] aborts the accept loop.
#[derive(Debug)]
pub struct DepotServer {
    /// The bound address (the real port when port 0 was asked for).
    addr: SocketAddr,
    /// Flipped to true to stop accepting and close connections.
    shutdown: watch::Sender<bool>,
    /// The accept loop.
    task: Option<JoinHandle<()>>,
}

/// The TLS configuration of the depot: TLS 1.3 and 1.2, the given chain and key, no client
/// authentication.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = load_certs("depot certificate", cert)?;
    let key = load_key("depot key", key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl DepotServer {
    /// Serves the directory `root` over HTTPS on `addr` (port 0 picks a free port) with the
    /// certificate chain `cert` and its key `key`. Must be called inside a tokio runtime.
    pub async fn start(
        root: &Path,
        cert: &Path,
        key: &Path,
        addr: SocketAddr,
    ) -> Result<DepotServer, DepotServerError> {
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(DepotServerError::Root {
                    path: root.to_owned(),
                    detail: "not a directory".into(),
                });
            }
            Err(e) => {
                return Err(DepotServerError::Root {
                    path: root.to_owned(),
                    detail: e.to_string(),
                });
            }
        }
        let tls = tls_config(cert, key)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DepotServerError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DepotServerError::Bind { addr, source })?;
        let (shutdown, rx) = watch::channel(false);
        let app = axum::Router::new().fallback_service(ServeDir::new(root));
        let listener = Listener::Tcp(listener, Arc::new(RwLock::new(tls)), Arc::default());
        let task = tokio::spawn(serve(listener, app, rx));
        Ok(DepotServer {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The depot URL agents are given: `https://ADDR/`.
    pub fn url(&self) -> String {
        format!("https://{}/", self.addr)
    }

    /// Stops accepting, lets open requests finish (at most a few seconds) and returns.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DepotServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevCa, Validity, issue_server};

    #[tokio::test]
    async fn serves_files_and_ranges_over_https() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("depot");
        std::fs::create_dir_all(root.join("vibs")).expect("mkdir");
        std::fs::write(root.join("vibs/blob"), b"0123456789").expect("write");
        let now = time::OffsetDateTime::now_utc();
        let ca = DevCa::generate(Validity::standard(now)).expect("ca");
        let v = Validity::standard(now);
        let issued = issue_server(&ca, "depot", v.not_before, v.not_after).expect("cert");
        let (cert, key) = (dir.path().join("d.pem"), dir.path().join("d.key"));
        std::fs::write(&cert, &issued.cert_pem).expect("cert");
        std::fs::write(&key, &issued.key_pem).expect("key");

        let server = DepotServer::start(&root, &cert, &key, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start");
        let client = reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("ca pem")
            ])
            .build()
            .expect("client");
        let url = format!("{}vibs/blob", server.url());
        let whole = client.get(&url).send().await.expect("get");
        assert_eq!(whole.status(), 200);
        assert_eq!(whole.bytes().await.expect("body").as_ref(), b"0123456789");
        let part = client
            .get(&url)
            .header("range", "bytes=4-")
            .send()
            .await
            .expect("range");
        assert_eq!(part.status(), 206);
        assert_eq!(part.bytes().await.expect("body").as_ref(), b"456789");
        let missing = client
            .get(format!("{}vibs/nope", server.url()))
            .send()
            .await
            .expect("404");
        assert_eq!(missing.status(), 404);
        let escape = client
            .get(format!("{}vibs/..%2f..%2fd.key", server.url()))
            .send()
            .await
            .expect("escape");
        assert_eq!(escape.status(), 404);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_missing_directory_is_named() {
        let err = DepotServer::start(
            Path::new("/nonexistent/depot"),
            Path::new("/x.pem"),
            Path::new("/x.key"),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
        .expect_err("missing root");
        assert!(err.to_string().contains("/nonexistent/depot"), "{err}");
    }
}

//! The API client `vibstagectl` uses: the local agent over its Unix socket, or remote agents over
//! mutual TLS with the controller certificate in `--tls-dir` (`ca.pem`, `client.pem`,
//! `client.key`). Only the CA in `ca.pem` is trusted for agents' server certificates.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use vibstage_protocol::ErrorCode;
use vibstage_protocol::api::{ErrorBody, ErrorDetail};

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
            ClientError::Setup(_) => false,
        }
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

fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

impl AgentClient {
    /// The local agent on `socket`.
    pub fn local(socket: &Path) -> Result<AgentClient, ClientError> {
        let client = reqwest::Client::builder()
            .unix_socket(socket)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Setup(chain(&e)))?;
        Ok(AgentClient {
            client,
            base: "http://localhost".into(),
            name: socket.display().to_string(),
        })
    }

    /// A remote agent `host[:port]` over mutual TLS with the files in `tls_dir`.
    pub fn remote(host: &str, tls_dir: &Path) -> Result<AgentClient, ClientError> {
        let read = |name: &str| {
            std::fs::read(tls_dir.join(name)).map_err(|e| {
                ClientError::Setup(format!("cannot read {}: {e}", tls_dir.join(name).display()))
            })
        };
        let ca = reqwest::Certificate::from_pem_bundle(&read("ca.pem")?)
            .map_err(|e| ClientError::Setup(format!("ca.pem: {}", chain(&e))))?;
        let mut identity = read("client.pem")?;
        identity.extend_from_slice(&read("client.key")?);
        let identity = reqwest::Identity::from_pem(&identity)
            .map_err(|e| ClientError::Setup(format!("client.pem/client.key: {}", chain(&e))))?;
        let client = reqwest::Client::builder()
            .tls_certs_only(ca)
            .identity(identity)
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Setup(chain(&e)))?;
        let authority = if host.starts_with('[') || host.matches(':').count() == 1 {
            if host
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                host.to_owned()
            } else {
                format!("{host}:9443")
            }
        } else if host.contains(':') {
            format!("[{host}]:9443")
        } else {
            format!("{host}:9443")
        };
        Ok(AgentClient {
            client,
            base: format!("https://{authority}"),
            name: host.to_owned(),
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, T), ClientError> {
        let response = request
            .timeout(Duration::from_secs(330))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(chain(&e)))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(chain(&e)))?;
        if status >= 400 {
            let detail = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| {
                    ErrorDetail::new(
                        ErrorCode::Internal,
                        format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                    )
                });
            return Err(ClientError::Api { status, detail });
        }
        serde_json::from_slice(&bytes)
            .map(|v| (status, v))
            .map_err(|e| ClientError::Api {
                status,
                detail: ErrorDetail::new(ErrorCode::Internal, format!("unexpected answer: {e}")),
            })
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
            .map(|(_, v)| v)
    }

    /// POST `body` as JSON to `path`; returns the status and the answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(u16, T), ClientError> {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// DELETE `path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.client.delete(format!("{}{path}", self.base)))
            .await
            .map(|(_, v)| v)
    }
}

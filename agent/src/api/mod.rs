//! The HTTP API of SPEC §5, served identically on the mTLS and Unix listeners.
//!
//! Every answer that is not 2xx carries the error body `{"error": {"code", "message"}}`, also
//! for unknown routes, wrong methods, oversized or malformed bodies. Who may do what is decided
//! once, in the `authorize` middleware, from the [`Peer`] the listener attached to the request.

mod error;
mod handlers;
mod long_poll;

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use http::Method;
use vibstage_protocol::ErrorCode;

pub use error::{ApiError, detail_of};
pub use long_poll::PER_CLIENT as LONG_POLLS_PER_CLIENT;

use crate::agent::Agent;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 4 << 20;

/// Who is on the other end of a connection, as the listener established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A process on the Unix socket, with its uid (SO_PEERCRED).
    Local {
        /// The peer's uid.
        uid: u32,
    },
    /// A TLS client with a verified certificate, with the certificate's names (DNS SANs and CN).
    Remote {
        /// The names.
        names: Vec<String>,
    },
}

/// The TLS allow-lists (SPEC §4 `tls.operators`, `tls.readers`); replaced on SIGHUP.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Names that may change state; empty = any client of the CA not listed as a reader.
    pub operators: Vec<String>,
    /// Names that may only read.
    pub readers: Vec<String>,
}

/// What a peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Operator,
    /// GET only.
    Reader,
}

impl Access {
    /// The role of a peer, or `None` if it may do nothing.
    pub fn role(&self, peer: &Peer) -> Option<Role> {
        match peer {
            Peer::Local { uid: 0 } => Some(Role::Operator),
            Peer::Local { .. } => None,
            Peer::Remote { names } => {
                let listed = |list: &[String]| names.iter().any(|n| list.contains(n));
                if listed(&self.operators) {
                    Some(Role::Operator)
                } else if listed(&self.readers) {
                    Some(Role::Reader)
                } else if self.operators.is_empty() {
                    Some(Role::Operator)
                } else {
                    None
                }
            }
        }
    }
}

/// Shared by every handler.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The agent.
    pub agent: Arc<Agent>,
    /// The allow-lists.
    pub access: Arc<RwLock<Access>>,
}

/// The API router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(handlers::status))
        .route("/v1/compliance/check", post(handlers::check))
        .route("/v1/stage", post(handlers::stage))
        .route("/v1/remediate", post(handlers::remediate))
        .route("/v1/tasks", get(handlers::tasks))
        .route("/v1/tasks/{id}", get(handlers::task))
        .route("/v1/staged", get(handlers::staged))
        .route("/v1/staged/{digest}", delete(handlers::delete_staged))
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(axum::Extension(long_poll::LongPolls::default()))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Refuses peers that may not make this request, and counts every answer for `/metrics`.
async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    let role = request.extensions().get::<Peer>().and_then(|peer| {
        state
            .access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .role(peer)
    });
    let response = match role {
        None => ApiError::new(
            ErrorCode::Forbidden,
            "this client may not use the vibstage API",
        )
        .into_response(),
        Some(Role::Reader) if !matches!(method, Method::GET | Method::HEAD) => ApiError::new(
            ErrorCode::Forbidden,
            "this client may only read (it is listed in tls.readers)",
        )
        .into_response(),
        Some(_) => next.run(request).await,
    };
    state
        .agent
        .metrics()
        .request(method.as_str(), &route, response.status().as_u16());
    response
}

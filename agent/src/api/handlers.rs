//! One handler per route of SPEC §5.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use vibstage_protocol::ErrorCode;
use vibstage_protocol::api::{
    CheckRequest, StageRequest, StagedList, TaskKind, TaskList, TaskResponse,
};

use super::long_poll::LongPolls;
use super::{ApiError, ApiState, Peer};
use crate::agent::{Agent, Started};

/// Longest long-poll accepted.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// Time allowed for a whole request body to arrive. The HTTP layer bounds the time for the
/// head only; a body trickled byte by byte would otherwise hold its connection (and one of the
/// listener's connection slots) for ever.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads (within [`BODY_TIMEOUT`] and [`super::BODY_LIMIT`]) and parses a JSON request body
/// strictly, with errors in the API's error body.
async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, super::BODY_LIMIT));
    let body = match read.await {
        Err(_) => {
            return Err(ApiError::with_status(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                format!(
                    "request body not received within {}s",
                    BODY_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(Err(e)) => {
            let e = e.into_inner();
            return Err(
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::with_status(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        ErrorCode::BadRequest,
                        format!("request body is larger than {} bytes", super::BODY_LIMIT),
                    )
                } else {
                    ApiError::new(
                        ErrorCode::BadRequest,
                        format!("failed to read request body: {e}"),
                    )
                },
            );
        }
        Ok(Ok(bytes)) => bytes,
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::with_status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadRequest,
            "request body must be sent as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid request body: {e}")))
}

/// Runs signature verification (one ed25519 check per descriptor, up to the body limit) and the
/// state writes that follow on the blocking pool, so a large image never stalls other requests.
/// At most [`Agent::verification_slots`] run at once: the rest wait their turn here, so a burst
/// of large signed bodies cannot take every core (issue 11, item 6).
async fn off_worker<T: Send + 'static>(
    agent: &Agent,
    f: impl FnOnce() -> Result<T, crate::agent::LifecycleError> + Send + 'static,
) -> Result<T, ApiError> {
    let _slot = agent.verification_slots().acquire().await.map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("verification slots closed: {e}"),
        )
    })?;
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            ErrorCode::Internal,
            format!("request task failed: {e}"),
        )),
    }
}

pub async fn status(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(s.agent.status()?).into_response())
}

pub async fn check(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CheckRequest = json_body(&headers, body).await?;
    let agent = s.agent.clone();
    let report = off_worker(&s.agent, move || agent.check(&req.image)).await?;
    Ok(Json(report).into_response())
}

fn started(result: Started) -> Response {
    match result {
        Started::New(task) | Started::Joined(task) => (
            StatusCode::ACCEPTED,
            Json(TaskResponse {
                task: Some(task),
                notifications: Vec::new(),
            }),
        )
            .into_response(),
        Started::NothingToDo(notifications) => Json(TaskResponse {
            task: None,
            notifications,
        })
        .into_response(),
    }
}

/// `POST /v1/stage` and `POST /v1/remediate`: the same body, a different kind of task.
async fn lifecycle(
    s: ApiState,
    headers: HeaderMap,
    body: Body,
    kind: TaskKind,
) -> Result<Response, ApiError> {
    let req: StageRequest = json_body(&headers, body).await?;
    let agent = s.agent.clone();
    Ok(started(
        off_worker(&s.agent, move || agent.start(kind, req.image, req.depot)).await?,
    ))
}

pub async fn stage(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    lifecycle(s, headers, body, TaskKind::Stage).await
}

pub async fn remediate(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    lifecycle(s, headers, body, TaskKind::Remediate).await
}

pub async fn tasks(State(s): State<ApiState>) -> Response {
    Json(TaskList {
        tasks: s.agent.tasks().list(),
    })
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    wait: Option<u64>,
}

/// `GET /v1/tasks/{id}?wait=SECS`. A wait beyond the long-poll caps ([`super::long_poll`]) is
/// answered at once with the task as it is.
pub async fn task(
    State(s): State<ApiState>,
    Extension(polls): Extension<LongPolls>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let role = s
        .access
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .role(&peer);
    let held = match role {
        Some(role) if !wait.is_zero() => polls.enter(&peer, role),
        _ => None,
    };
    let task = match held {
        Some(_held) => s.agent.tasks().wait(&id, wait).await,
        None => s.agent.tasks().get(&id),
    };
    match task {
        Some(t) => Ok(Json(t).into_response()),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no task {id:?}"),
        )),
    }
}

pub async fn staged(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(StagedList {
        staged: s.agent.staged()?,
    })
    .into_response())
}

pub async fn delete_staged(
    State(s): State<ApiState>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let digest = digest
        .parse()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("{e}")))?;
    s.agent.delete_staged(&digest)?;
    Ok(Json(serde_json::json!({"deleted": digest})).into_response())
}

pub async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

pub async fn metrics(State(s): State<ApiState>) -> Response {
    let tasks: Vec<(String, String, u64)> = s
        .agent
        .task_counts()
        .into_iter()
        .map(|((k, st), n)| (k.as_str().to_owned(), st.as_str().to_owned(), n))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.agent.metrics().render(s.agent.staged_bytes(), &tasks),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::with_status(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        "method not allowed on this route",
    )
}

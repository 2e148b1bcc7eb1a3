//! The REST API under `/api/v1`, the OpenAPI document describing it, and the health, readiness
//! and metrics endpoints. Handlers check scopes, validate input and delegate to the
//! [`Coordinator`](crate::coordinator::Coordinator); they hold no state of their own.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use kennel_proto::api::{
    ApiKey, CreateKey, CreateTask, CreatedKey, Daemon, ErrorBody, Page, Scope, SendMessageRequest,
    ServerStatus, Task, TaskDetail,
};
use kennel_proto::{validate_id, TaskStatus};
use kennel_store::{rfc3339, TaskFilter};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;
type S = State<Arc<AppState>>;

const READ: &[Scope] = &[Scope::Client];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kennel coordinator API",
        description = "Submit and manage AI coding-agent tasks, watch daemons, manage API keys. \
            Every endpoint but /health and /ready needs `Authorization: Bearer <key>`."
    ),
    paths(
        create_task, list_tasks, get_task, cancel_task, pause_task, resume_task, send_message,
        crate::stream::task_output, crate::stream::task_output_stream, crate::stream::events,
        list_daemons, get_daemon, drain_daemon, undrain_daemon,
        create_key, list_keys, revoke_key, status, health, ready, metrics_text
    ),
    components(schemas(ErrorBody, Page<Task>, kennel_proto::api::Event)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "apiKey",
            Vec::<String>::new(),
        )]);
    }
}

pub async fn openapi_json(_p: Principal) -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The API docs page: a static shell that asks for a key and renders `/api/openapi.json`.
pub async fn docs_page() -> Html<&'static str> {
    Html(include_str!("../../../web/api-docs.html"))
}

/// Submit a task.
#[utoipa::path(post, path = "/api/v1/tasks", request_body = CreateTask, tag = "tasks",
    responses((status = 201, body = Task), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_task(
    p: Principal,
    State(app): S,
    body: Result<Json<CreateTask>, axum::extract::rejection::JsonRejection>,
) -> AppResult<(StatusCode, Json<Task>)> {
    p.require(READ)?;
    let Json(req) = body.map_err(json_error)?;
    let task = app.coord.submit(req).await?;
    Ok((StatusCode::CREATED, Json(task)))
}

/// Turns axum's body rejections into our error shape, keeping serde's precise message.
pub fn json_error(e: axum::extract::rejection::JsonRejection) -> ApiError {
    use axum::extract::rejection::JsonRejection as J;
    match e {
        J::MissingJsonContentType(_) => {
            ApiError::invalid("send the body as JSON with `Content-Type: application/json`")
        }
        J::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payloadTooLarge",
            message: "request body is larger than the server's limit (api.max_body_bytes)".into(),
        },
        other => ApiError::invalid(format!("invalid JSON body: {}", other.body_text())),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only tasks in this state.
    status: Option<String>,
    /// Only tasks held by this daemon.
    daemon: Option<String>,
    /// Page size (default 50).
    limit: Option<u32>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// List tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", params(ListQuery), tag = "tasks",
    responses((status = 200, body = Page<Task>), (status = 400, body = ErrorBody)))]
pub async fn list_tasks(
    p: Principal,
    State(app): S,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<Page<Task>>> {
    p.require(READ)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status = q
        .status
        .as_deref()
        .map(str::parse::<TaskStatus>)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(d) = &q.daemon {
        validate_id("daemon id", d).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>().map_err(|_| {
                ApiError::invalid(format!(
                    "invalid cursor `{c}`: pass back `nextCursor` as given"
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50).clamp(1, app.coord.cfg.api.max_page);
    let rows = app
        .store
        .list_tasks(&TaskFilter {
            status,
            daemon_id: q.daemon,
            before,
            limit: limit + 1,
        })
        .await?;
    let more = rows.len() > limit as usize;
    let mut items: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let next_cursor = if more {
        items.last().map(|t| t.order.to_string())
    } else {
        None
    };
    Ok(Json(Page {
        items: items
            .drain(..)
            .map(|q| app.coord.overlay_task(q.task))
            .collect(),
        next_cursor,
    }))
}

/// A task with its attempts.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    responses((status = 200, body = TaskDetail), (status = 404, body = ErrorBody)))]
pub async fn get_task(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<TaskDetail>> {
    p.require(READ)?;
    let task = app.coord.task(&id).await?;
    let attempts = app.store.list_attempts(&id).await?;
    Ok(Json(TaskDetail { task, attempts }))
}

/// Cancel a task: a queued task ends at once; a running one is interrupted on its daemon.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks",
    responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel_task(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<Task>> {
    p.require(READ)?;
    Ok(Json(app.coord.cancel(&id).await?))
}

/// Pause a running task (SIGSTOP to its process group on the daemon).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/pause", tag = "tasks",
    responses((status = 200, body = Task), (status = 409, body = ErrorBody)))]
pub async fn pause_task(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<Task>> {
    p.require(READ)?;
    Ok(Json(app.coord.set_paused(&id, true).await?))
}

/// Resume a paused task.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/resume", tag = "tasks",
    responses((status = 200, body = Task), (status = 409, body = ErrorBody)))]
pub async fn resume_task(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<Task>> {
    p.require(READ)?;
    Ok(Json(app.coord.set_paused(&id, false).await?))
}

/// Send a message to a running agent (delivered to its stdin).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/messages", request_body = SendMessageRequest, tag = "tasks",
    responses((status = 202), (status = 409, body = ErrorBody)))]
pub async fn send_message(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
    body: Result<Json<SendMessageRequest>, axum::extract::rejection::JsonRejection>,
) -> AppResult<StatusCode> {
    p.require(READ)?;
    let Json(req) = body.map_err(json_error)?;
    app.coord.send_message(&id, req.message).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Every daemon that ever connected.
#[utoipa::path(get, path = "/api/v1/daemons", tag = "daemons", responses((status = 200, body = Vec<Daemon>)))]
pub async fn list_daemons(p: Principal, State(app): S) -> AppResult<Json<Vec<Daemon>>> {
    p.require(READ)?;
    let daemons = app.store.list_daemons().await?;
    Ok(Json(
        daemons.into_iter().map(|d| app.coord.overlay(d)).collect(),
    ))
}

/// One daemon.
#[utoipa::path(get, path = "/api/v1/daemons/{id}", tag = "daemons",
    responses((status = 200, body = Daemon), (status = 404, body = ErrorBody)))]
pub async fn get_daemon(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<Daemon>> {
    p.require(READ)?;
    validate_id("daemon id", &id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let d = app.store.get_daemon(&id).await?.ok_or_else(|| {
        ApiError::not_found(format!("no daemon `{id}`; `kennel daemons` lists them"))
    })?;
    Ok(Json(app.coord.overlay(d)))
}

/// Drain a daemon: it finishes its running tasks and is given no new ones.
#[utoipa::path(post, path = "/api/v1/daemons/{id}/drain", tag = "daemons",
    responses((status = 200, body = Daemon), (status = 404, body = ErrorBody)))]
pub async fn drain_daemon(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<Daemon>> {
    p.require(&[])?;
    Ok(Json(app.coord.set_draining(&id, true).await?))
}

/// Undo a drain.
#[utoipa::path(post, path = "/api/v1/daemons/{id}/undrain", tag = "daemons",
    responses((status = 200, body = Daemon), (status = 404, body = ErrorBody)))]
pub async fn undrain_daemon(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<Daemon>> {
    p.require(&[])?;
    Ok(Json(app.coord.set_draining(&id, false).await?))
}

/// Create an API key (admin). The key is in the response only.
#[utoipa::path(post, path = "/api/v1/keys", request_body = CreateKey, tag = "keys",
    responses((status = 201, body = CreatedKey), (status = 403, body = ErrorBody)))]
pub async fn create_key(
    p: Principal,
    State(app): S,
    body: Result<Json<CreateKey>, axum::extract::rejection::JsonRejection>,
) -> AppResult<(StatusCode, Json<CreatedKey>)> {
    p.require(&[])?;
    let Json(req) = body.map_err(json_error)?;
    if req.name.trim().is_empty() || req.name.len() > 100 {
        return Err(ApiError::invalid("`name` must be 1 to 100 characters"));
    }
    if req.scopes.is_empty() {
        return Err(ApiError::invalid(
            "`scopes` must name at least one of admin, client, daemon, relay, agent, gateway",
        ));
    }
    let mut scopes = req.scopes;
    scopes.sort();
    scopes.dedup();
    let (key, record) = app
        .keys
        .mint(&req.name, scopes, rfc3339(app.clock.now_ms()));
    app.store.insert_key(&record).await?;
    tracing::info!(key_id = %record.info.id, name = %req.name, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            info: record.info,
        }),
    ))
}

/// List API keys (admin). Secrets are never shown again.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys", responses((status = 200, body = Vec<ApiKey>)))]
pub async fn list_keys(p: Principal, State(app): S) -> AppResult<Json<Vec<ApiKey>>> {
    p.require(&[])?;
    Ok(Json(app.store.list_keys().await?))
}

/// Revoke an API key (admin). Takes effect within 5 seconds on every coordinator.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys",
    responses((status = 200, body = ApiKey), (status = 404, body = ErrorBody)))]
pub async fn revoke_key(
    p: Principal,
    State(app): S,
    Path(id): Path<String>,
) -> AppResult<Json<ApiKey>> {
    p.require(&[])?;
    validate_id("key id", &id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let key = app
        .store
        .revoke_key(&id, app.clock.now_ms())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("no API key `{id}`; `kennel keys list` shows them"))
        })?;
    app.keys.forget(&id);
    app.coord.key_revoked(&id);
    tracing::info!(key_id = %id, "api key revoked");
    Ok(Json(key))
}

/// Counts and capacity at a glance.
#[utoipa::path(get, path = "/api/v1/status", tag = "server", responses((status = 200, body = ServerStatus)))]
pub async fn status(p: Principal, State(app): S) -> AppResult<Json<ServerStatus>> {
    p.require(READ)?;
    let counts = app.store.count_tasks().await?;
    let (daemons, total, used) = app.coord.capacity();
    Ok(Json(ServerStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: kennel_proto::PROTOCOL_VERSION,
        uptime_secs: app.coord.uptime().as_secs(),
        store: app.store.backend().to_string(),
        daemons_connected: daemons,
        capacity_total: total,
        capacity_used: used,
        tasks: TaskStatus::ALL
            .into_iter()
            .map(|s| (s.to_string(), counts.get(&s).copied().unwrap_or(0)))
            .collect(),
        waiting: app.coord.waiting_summary(),
    }))
}

/// Liveness: the process answers. No auth.
#[utoipa::path(get, path = "/health", tag = "server", security(()), responses((status = 200, body = String)))]
pub async fn health() -> &'static str {
    "ok"
}

/// Readiness: the store answers. No auth.
#[utoipa::path(get, path = "/ready", tag = "server", security(()),
    responses((status = 200, body = String), (status = 503, body = ErrorBody)))]
pub async fn ready(State(app): S) -> AppResult<&'static str> {
    app.store.ping().await?;
    Ok("ready")
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "server", responses((status = 200, body = String)))]
pub async fn metrics_text(p: Principal, State(app): S) -> AppResult<Response> {
    p.require(READ)?;
    let counts = app.store.count_tasks().await?;
    for s in TaskStatus::ALL {
        metrics::gauge!("kennel_tasks", "state" => s.as_str())
            .set(counts.get(&s).copied().unwrap_or(0) as f64);
    }
    let body = app.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the API is described at /api/openapi.json")
}

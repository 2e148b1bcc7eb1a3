//! The relay's HTTP side: the downstream hub at `/ws/daemon` and the admin endpoints
//! (`/`, `/status`, `/tasks`, `/logs`, `/reconnect`, `/metrics`). Everything but `/health`
//! and the hub (which checks daemon keys itself) needs one of `relay.admin_keys`, as
//! `Authorization: Bearer <key>` or `x-api-key`. CORS is open so a browser dashboard can call it.
//!
//! `/health` and `/status` also carry the fields of a Makima edge relay's answers (`healthy`,
//! `upstreamConnected`, `lastHeartbeat`, `totalTasksProcessed`, `connectedDaemons` as a count),
//! and `/tasks` lists tasks, not attempts, as Makima's does; a golden fixture in
//! `tests/fixtures/makima.json` pins those shapes.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kennel_auth::KeyList;
use serde::Deserialize;
use serde_json::json;
use tower_http::cors::{Any, CorsLayer};

use crate::downstream::ws_daemon;
use crate::relay::Relay;

pub fn router(relay: Arc<Relay>) -> Router {
    // Each key list is hashed once here, not per request.
    let admin_keys = Arc::new(KeyList::new(&relay.cfg.admin_keys));
    let daemon_keys = Arc::new(KeyList::new(&relay.cfg.daemon_keys));
    let admin = Router::new()
        .route("/", get(status))
        .route("/status", get(status))
        .route("/tasks", get(tasks))
        .route("/logs", get(logs))
        .route("/reconnect", post(reconnect))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            admin_keys,
            require_admin,
        ));
    Router::new()
        .route("/health", get(health))
        .route(
            "/ws/daemon",
            get(move |State(relay): State<Arc<Relay>>, req: Request| {
                ws_daemon(relay, daemon_keys, req)
            }),
        )
        .merge(admin)
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        )
        .with_state(relay)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// Lets a request through when it carries one of `relay.admin_keys`.
async fn require_admin(
    State(admin_keys): State<Arc<KeyList>>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    match presented_key(req.headers()) {
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing API key: send `Authorization: Bearer <key>` with one of relay.admin_keys",
        ),
        Some(k) if admin_keys.contains(k) => next.run(req).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "invalid API key: use one of relay.admin_keys",
        ),
    }
}

/// 200 while the relay is healthy, even with the upstream down (`status: "degraded"`): a
/// liveness probe must not restart a relay that is holding work for a coordinator outage, and
/// Makima-style monitors read `upstreamConnected` from the body. 503 when its database is not
/// usable, so a load balancer or supervisor notices without parsing anything.
async fn health(State(relay): State<Arc<Relay>>) -> Response {
    let h = relay.health();
    let code = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(h)).into_response()
}

async fn status(State(relay): State<Arc<Relay>>) -> Response {
    Json(relay.status()).into_response()
}

#[derive(Deserialize)]
struct Page {
    limit: Option<i64>,
    offset: Option<i64>,
}

/// Clamps `limit` to 1..=`max` (default `default`) and `offset` to 0..=1,000,000.
fn clamp(p: &Page, default: i64, max: i64) -> (u32, u32) {
    let limit = p.limit.unwrap_or(default).clamp(1, max) as u32;
    let offset = p.offset.unwrap_or(0).clamp(0, 1_000_000) as u32;
    (limit, offset)
}

async fn tasks(State(relay): State<Arc<Relay>>, Query(p): Query<Page>) -> Response {
    let (limit, offset) = clamp(&p, 50, 500);
    match relay.tasks(limit, offset) {
        Ok(tasks) => {
            Json(json!({ "tasks": tasks, "limit": limit, "offset": offset })).into_response()
        }
        Err(e) => db_failed(&e),
    }
}

/// A failed read of `relay.db`: logged with its causes; the caller is told where to look.
fn db_failed(e: &crate::history::HistoryError) -> Response {
    tracing::error!(
        error = e as &dyn std::error::Error,
        "failed to read the relay database"
    );
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("{e}; the relay's log has the cause"),
    )
}

async fn logs(State(relay): State<Arc<Relay>>, Query(p): Query<Page>) -> Response {
    let (limit, _) = clamp(&p, 50, crate::history::LOG_KEEP);
    match relay.logs(limit) {
        Ok(logs) => Json(json!({ "logs": logs, "limit": limit })).into_response(),
        Err(e) => db_failed(&e),
    }
}

async fn reconnect(State(relay): State<Arc<Relay>>) -> Response {
    relay.log("connect", "upstream reconnect requested over HTTP");
    relay.reconnect.notify_one();
    (StatusCode::ACCEPTED, Json(json!({ "reconnecting": true }))).into_response()
}

async fn metrics(State(relay): State<Arc<Relay>>) -> Response {
    let s = relay.status();
    let body = format!(
        "# TYPE kennel_relay_upstream_connected gauge\nkennel_relay_upstream_connected {}\n\
         # TYPE kennel_relay_daemons_connected gauge\nkennel_relay_daemons_connected {}\n\
         # TYPE kennel_relay_tasks_active gauge\nkennel_relay_tasks_active {}\n\
         # TYPE kennel_relay_tasks_queued gauge\nkennel_relay_tasks_queued {}\n\
         # TYPE kennel_relay_tasks_received_total counter\nkennel_relay_tasks_received_total {}\n\
         # TYPE kennel_relay_tasks_processed_total counter\nkennel_relay_tasks_processed_total {}\n\
         # TYPE kennel_relay_messages_buffered gauge\nkennel_relay_messages_buffered {}\n\
         # TYPE kennel_relay_messages_forwarded_total counter\nkennel_relay_messages_forwarded_total {}\n",
        u8::from(s.upstream_connected),
        s.connected_daemons,
        s.active_tasks,
        s.queued_tasks,
        s.total_received,
        s.total_processed,
        s.buffered_messages,
        s.messages_forwarded,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

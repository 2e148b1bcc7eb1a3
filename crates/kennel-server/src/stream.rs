//! Reading what tasks produce: paged task output, live output as server-sent events, and the
//! resumable event log (`GET /api/v1/events`, `Last-Event-ID`).
//!
//! Live streams are fed from the store, not from memory: the in-process broadcast only says
//! "something changed" (or carries events that are already committed), and any gap it leaves
//! — a lagging subscriber, events published out of commit order — is filled from the store,
//! so a client never misses or repeats an entry.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use kennel_proto::api::{ErrorBody, OutputPage};
use kennel_proto::validate_id;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

const PAGE: u32 = 500;

/// Why a stream ends when its key is revoked.
const KEY_REVOKED: &str = "the API key of this stream was revoked; the stream ends";

type SseStream = axum::response::Response;

/// An SSE response fed by a channel, with keep-alive comments so proxies keep it open.
fn sse_response(rx: mpsc::Receiver<Result<SseEvent, Infallible>>) -> SseStream {
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// Attempt to read (default: the task's current or last attempt).
    attempt: Option<u32>,
    /// Return chunks with a larger seq (default 0: from the start).
    after_seq: Option<u64>,
    /// Page size (default 500, at most 1000).
    limit: Option<u32>,
}

/// Stored output of one attempt, in seq order.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/output", params(OutputQuery), tag = "tasks",
    responses((status = 200, body = OutputPage), (status = 404, body = ErrorBody)))]
pub async fn task_output(
    p: Principal,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OutputPage>, ApiError> {
    p.require(&[kennel_proto::api::Scope::Client])?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let task = app.coord.task(&id).await?;
    let attempt = q.attempt.unwrap_or(task.attempt);
    let after = q.after_seq.unwrap_or(0);
    let limit = q.limit.unwrap_or(PAGE).clamp(1, 1000);
    let items = app.store.task_output(&id, attempt, after, limit).await?;
    let next_after_seq = items.last().map(|c| c.seq).unwrap_or(after);
    Ok(Json(OutputPage {
        attempt,
        items,
        next_after_seq,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OutputStreamQuery {
    /// Follow only this attempt (default: the current one, switching to retries).
    attempt: Option<u32>,
    /// Start after this seq of the first attempt followed.
    after_seq: Option<u64>,
}

fn last_event_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Live output of a task as SSE: `output` events (id `attempt:seq`), `attempt` when a retry
/// starts, `waiting` with the reason while no connected daemon can run the queued task (empty
/// when one can again), `end` with the final task when it finishes. Resumable with
/// `Last-Event-ID`.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/output/stream", params(OutputStreamQuery), tag = "tasks",
    responses((status = 200, description = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub async fn task_output_stream(
    p: Principal,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<OutputStreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<SseStream, ApiError> {
    p.require(&[kennel_proto::api::Scope::Client])?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    validate_id("task id", &id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let wake = app.coord.subscribe_output();
    let task = app.coord.task(&id).await?;
    let (mut attempt, mut after) = (q.attempt.unwrap_or(task.attempt), q.after_seq.unwrap_or(0));
    if let Some(last) = last_event_id(&headers) {
        let parsed = last
            .split_once(':')
            .and_then(|(a, s)| Some((a.parse().ok()?, s.parse().ok()?)));
        let Some((a, s)) = parsed else {
            return Err(ApiError::invalid(format!(
                "Last-Event-ID `{last}` is not of the form `attempt:seq`"
            )));
        };
        (attempt, after) = (a, s);
    }
    let follow_retries = q.attempt.is_none();
    let (tx, rx) = mpsc::channel(64);
    let revoked = app.coord.revocation_of(&p.key_id);
    tokio::spawn(async move {
        let r = tokio::select! {
            r = follow_output(&app, &id, attempt, after, follow_retries, wake, &tx) => r,
            () = revoked => Err(ApiError::unauthorized(KEY_REVOKED)),
        };
        if let Err(e) = r {
            let _ = tx
                .send(Ok(SseEvent::default().event("error").data(e.to_string())))
                .await;
        }
    });
    Ok(sse_response(rx))
}

/// Sends output from the store until the task ends or the client leaves.
async fn follow_output(
    app: &AppState,
    id: &str,
    mut attempt: u32,
    mut after: u64,
    follow_retries: bool,
    mut wake: broadcast::Receiver<Arc<str>>,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> Result<(), ApiError> {
    let mut waiting: Option<String> = None;
    loop {
        let Some(task) = app.store.get_task(id).await? else {
            return Ok(());
        };
        let task = app.coord.overlay_task(task);
        if task.waiting != waiting {
            waiting = task.waiting.clone();
            let ev = SseEvent::default()
                .event("waiting")
                .data(waiting.clone().unwrap_or_default());
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(());
            }
        }
        let chunks = app.store.task_output(id, attempt, after, PAGE).await?;
        let full = chunks.len() == PAGE as usize;
        for c in chunks {
            after = c.seq;
            let ev = SseEvent::default()
                .id(format!("{}:{}", c.attempt, c.seq))
                .event("output")
                .json_data(&c)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(());
            }
        }
        if full {
            continue;
        }
        if follow_retries && task.attempt > attempt {
            attempt = task.attempt;
            after = 0;
            let ev = SseEvent::default()
                .event("attempt")
                .data(attempt.to_string());
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if task.status.is_terminal() && task.attempt <= attempt {
            let ev = SseEvent::default()
                .event("end")
                .json_data(&task)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let _ = tx.send(Ok(ev)).await;
            return Ok(());
        }
        loop {
            tokio::select! {
                r = wake.recv() => match r {
                    Ok(t) if &*t == id => break,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Start after this event id (same as the `Last-Event-ID` header, which wins).
    after: Option<i64>,
    /// Only events of this task.
    task: Option<String>,
}

/// The event log as SSE, from `Last-Event-ID` (or `after`) on, then live. Each event's SSE
/// `event` is its kind (`task.created`, `task.status`, `daemon.connected`, ...).
#[utoipa::path(get, path = "/api/v1/events", params(EventsQuery), tag = "events",
    responses((status = 200, description = "text/event-stream of Event")))]
pub async fn events(
    p: Principal,
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<SseStream, ApiError> {
    p.require(&[kennel_proto::api::Scope::Client])?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let mut after = q.after.unwrap_or(0);
    if let Some(last) = last_event_id(&headers) {
        after = last.parse().map_err(|_| {
            ApiError::invalid(format!(
                "Last-Event-ID `{last}` is not an event id (an integer)"
            ))
        })?;
    }
    if let Some(t) = &q.task {
        validate_id("task id", t).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let live = app.coord.subscribe_events();
    let (tx, rx) = mpsc::channel(256);
    let revoked = app.coord.revocation_of(&p.key_id);
    tokio::spawn(async move {
        let r = tokio::select! {
            r = follow_events(&app, after, q.task, live, &tx) => r,
            () = revoked => Err(ApiError::unauthorized(KEY_REVOKED)),
        };
        if let Err(e) = r {
            let _ = tx
                .send(Ok(SseEvent::default().event("error").data(e.to_string())))
                .await;
        }
    });
    Ok(sse_response(rx))
}

async fn follow_events(
    app: &AppState,
    mut last: i64,
    task: Option<String>,
    mut live: broadcast::Receiver<Arc<kennel_proto::api::Event>>,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> Result<(), ApiError> {
    let send = |ev: &kennel_proto::api::Event| -> Result<Option<SseEvent>, ApiError> {
        if task
            .as_ref()
            .is_some_and(|t| ev.task_id.as_ref() != Some(t))
        {
            return Ok(None);
        }
        SseEvent::default()
            .id(ev.id.to_string())
            .event(&ev.kind)
            .json_data(ev)
            .map(Some)
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    // Catch up from the store until the live feed can take over without a gap.
    let mut catch_up = true;
    loop {
        if catch_up {
            loop {
                let batch = app.store.events_after(last, PAGE).await?;
                let n = batch.len();
                for ev in &batch {
                    last = ev.id;
                    if let Some(e) = send(ev)? {
                        if tx.send(Ok(e)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                if n < PAGE as usize {
                    break;
                }
            }
            catch_up = false;
        }
        let ev = tokio::select! {
            r = live.recv() => r,
            _ = tx.closed() => return Ok(()),
        };
        match ev {
            Ok(ev) if ev.id <= last => {}
            Ok(ev) if ev.id == last + 1 => {
                last = ev.id;
                if let Some(e) = send(&ev)? {
                    if tx.send(Ok(e)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            // Published out of commit order, or we lagged: the store has everything in order.
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => catch_up = true,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

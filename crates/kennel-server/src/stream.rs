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

use crate::api::{decimal, page_limit, path_id, query_error, IdParam};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

const PAGE: u32 = 500;

/// Why a stream ends when its key is revoked.
pub(crate) const KEY_REVOKED: &str = "the API key of this stream was revoked; the stream ends";

type SseStream = axum::response::Response;

/// An SSE response fed by a channel, with keep-alive comments so proxies keep it open.
pub(crate) fn sse_response(rx: mpsc::Receiver<Result<SseEvent, Infallible>>) -> SseStream {
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Largest page of `GET /api/v1/tasks/{id}/output`.
const MAX_OUTPUT_PAGE: u32 = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// Attempt to read, from 1 (default: the task's current or last attempt).
    #[param(value_type = u64, required = false, minimum = 1, maximum = 4294967295_u64)]
    attempt: Option<u32>,
    /// Return chunks with a larger seq (default 0: from the start).
    #[param(value_type = i64, required = false, minimum = 0)]
    after_seq: Option<u64>,
    /// Page size: 1 to 1000; default 500.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 1000, default = 500)]
    limit: Option<u32>,
}

/// Stored output of one attempt, in seq order.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/output", params(IdParam, OutputQuery), tag = "tasks",
    responses(
        (status = 200, description = "a page of output", body = OutputPage),
        (status = 400, description = "the task id or a query parameter is invalid or out of range", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
    ))]
pub async fn task_output(
    p: Principal,
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OutputPage>, ApiError> {
    p.require(&[kennel_proto::api::Scope::Client])?;
    let id = path_id("task id", id)?;
    let Query(q) = q.map_err(query_error)?;
    let limit = page_limit(q.limit, PAGE, MAX_OUTPUT_PAGE)?;
    let after = check_after_seq(q.after_seq)?;
    check_attempt(q.attempt)?;
    let task = app.coord.task(&id).await?;
    let attempt = q.attempt.unwrap_or(task.attempt);
    let items = app.store.task_output(&id, attempt, after, limit).await?;
    let next_after_seq = items.last().map(|c| c.seq).unwrap_or(after);
    Ok(Json(OutputPage {
        attempt,
        items,
        next_after_seq,
    }))
}

/// One server-sent event of `GET /api/v1/tasks/{id}/output/stream`, as an SSE client reads it
/// (the OpenAPI document's schema of each event; never built).
#[derive(utoipa::ToSchema)]
pub struct OutputStreamEvent {
    /// `output` (data: an `OutputChunk` as JSON), `attempt` (data: the number of the retry now
    /// followed), `waiting` (data: why no connected daemon can run the task; empty once one
    /// can), `end` (data: the final `Task` as JSON) or `error` (data: why the stream ends).
    #[schema(pattern = "^(output|attempt|waiting|end|error)$")]
    pub event: String,
    /// `attempt:seq` of the last `output` event, usable as `Last-Event-ID`.
    #[schema(pattern = "^[0-9]+:[0-9]+$")]
    pub id: Option<String>,
    pub data: String,
}

/// One server-sent event of `GET /api/v1/events`, as an SSE client reads it (the OpenAPI
/// document's schema of each event; never built).
#[derive(utoipa::ToSchema)]
pub struct LogStreamEvent {
    /// The event's kind (`task.created`, `task.status`, `daemon.connected`, ...), or `error`
    /// when the stream ends early (data: why).
    #[schema(min_length = 1)]
    pub event: String,
    /// The event id, usable as `Last-Event-ID` and `after`.
    #[schema(pattern = "^[0-9]+$")]
    pub id: Option<String>,
    /// The `Event` as JSON (the message, for `error`).
    pub data: String,
}

/// Attempts count from 1.
fn check_attempt(attempt: Option<u32>) -> Result<(), ApiError> {
    if attempt == Some(0) {
        return Err(ApiError::invalid(
            "`attempt` counts from 1; leave it out for the current attempt",
        ));
    }
    Ok(())
}

/// Seqs are stored as signed 64-bit integers; a larger `after_seq` could never match.
fn check_after_seq(after_seq: Option<u64>) -> Result<u64, ApiError> {
    let after = after_seq.unwrap_or(0);
    if after > i64::MAX as u64 {
        return Err(ApiError::invalid(format!(
            "`after_seq` must be at most {}",
            i64::MAX
        )));
    }
    Ok(after)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OutputStreamQuery {
    /// Follow only this attempt, from 1 (default: the current one, switching to retries).
    #[param(value_type = u64, required = false, minimum = 1, maximum = 4294967295_u64)]
    attempt: Option<u32>,
    /// Start after this seq of the first attempt followed.
    #[param(value_type = i64, required = false, minimum = 0)]
    after_seq: Option<u64>,
}

/// Where a stream of numbered items resumes: after `Last-Event-ID` if the client sent one,
/// else after the `after` parameter, else from the start. `what` names the number (`an event
/// id`, `a message seq`) in the refusal.
pub(crate) fn resume_after(
    headers: &HeaderMap,
    after: Option<i64>,
    what: &str,
) -> Result<i64, ApiError> {
    let after = after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid(format!(
            "`after` must be {what} (0 or more); leave it out to start at the beginning"
        )));
    }
    match last_event_id(headers)? {
        Some(last) => decimal(last, 18)
            .and_then(|n| i64::try_from(n).ok())
            .ok_or_else(|| {
                ApiError::invalid(format!("Last-Event-ID `{last}` is not {what} (0 or more)"))
            }),
        None => Ok(after),
    }
}

/// The `Last-Event-ID` a reconnecting client sends; an empty one counts as none.
fn last_event_id(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        ApiError::invalid("Last-Event-ID must be the id of the last event received, in ASCII")
    })?;
    Ok(Some(v.trim()).filter(|v| !v.is_empty()))
}

/// Live output of a task as SSE: `output` events (id `attempt:seq`), `attempt` when a retry
/// starts, `waiting` with the reason while no connected daemon can run the queued task (empty
/// when one can again), `end` with the final task when it finishes. Resumable with
/// `Last-Event-ID`.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/output/stream",
    params(
        IdParam,
        OutputStreamQuery,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^([0-9]{1,9}:[0-9]{1,18})?$",
            description = "`attempt:seq` of the last event received: resume after it"),
    ),
    tag = "tasks",
    responses(
        (status = 200, description = "server-sent events until the task ends", content_type = "text/event-stream", body = OutputStreamEvent),
        (status = 400, description = "the task id, a query parameter or Last-Event-ID is invalid", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
    ))]
pub async fn task_output_stream(
    p: Principal,
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    q: Result<Query<OutputStreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<SseStream, ApiError> {
    p.require(&[kennel_proto::api::Scope::Client])?;
    let id = path_id("task id", id)?;
    let Query(q) = q.map_err(query_error)?;
    check_attempt(q.attempt)?;
    let after_seq = check_after_seq(q.after_seq)?;
    let wake = app.coord.subscribe_output();
    let task = app.coord.task(&id).await?;
    let (mut attempt, mut after) = (q.attempt.unwrap_or(task.attempt), after_seq);
    if let Some(last) = last_event_id(&headers)? {
        let parsed = last.split_once(':').and_then(|(a, s)| {
            let a = decimal(a, 9)?;
            Some((u32::try_from(a).ok()?, decimal(s, 18)?))
        });
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
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Start after this event id (same as the `Last-Event-ID` header, which wins).
    #[param(value_type = i64, required = false, minimum = 0)]
    after: Option<i64>,
    /// Only events of this task (a task id).
    #[param(
        value_type = String,
        required = false,
        pattern = r"^(?![-.])(?!.*\.\.)[A-Za-z0-9._-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    task: Option<String>,
}

/// The event log as SSE, from `Last-Event-ID` (or `after`) on, then live. Each event's SSE
/// `event` is its kind (`task.created`, `task.status`, `daemon.connected`, ...).
#[utoipa::path(get, path = "/api/v1/events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{0,18}$",
            description = "id of the last event received: resume after it"),
    ),
    tag = "events",
    responses(
        (status = 200, description = "server-sent events, then live ones", content_type = "text/event-stream", body = LogStreamEvent),
        (status = 400, description = "a query parameter or Last-Event-ID is invalid", body = ErrorBody),
    ))]
pub async fn events(
    p: Principal,
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<SseStream, ApiError> {
    p.require(&[kennel_proto::api::Scope::Client])?;
    let Query(q) = q.map_err(query_error)?;
    let after = resume_after(&headers, q.after, "an event id")?;
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

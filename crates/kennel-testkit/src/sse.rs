//! [`EventStream`]: a server-sent-events client for `GET /api/v1/events` and any other SSE
//! endpoint (task output streams), read one event at a time with a deadline.
//!
//! It keeps a short log of what it has seen, so a wait that fails says which events did
//! arrive instead of only "timed out". It only reads; reconnecting with `Last-Event-ID` is
//! the test's job, because that is usually what the test is about.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use kennel_proto::api::{Task, TaskDetail};
use kennel_proto::TaskStatus;
use tokio::time::Instant;

use crate::api::Api;

/// How many recent events a stream remembers for error messages.
const SEEN_LOG: usize = 40;
/// Longest piece of an event's data quoted in an error message.
const SEEN_DATA_CHARS: usize = 200;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMsg {
    /// The SSE `id` (empty when the event has none).
    pub id: String,
    /// The SSE `event` name (`message` when the server sets none).
    pub event: String,
    pub data: String,
}

impl SseMsg {
    /// The data decoded as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.data)
            .with_context(|| format!("event `{}` data is not JSON: {}", self.event, self.data))
    }

    fn summary(&self) -> String {
        let data: String = self.data.chars().take(SEEN_DATA_CHARS).collect();
        format!("id={} event={} data={data}", self.id, self.event)
    }
}

type Events = Pin<
    Box<
        dyn Stream<Item = Result<eventsource_stream::Event, EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// An open SSE response, read event by event.
pub struct EventStream {
    url: String,
    events: Events,
    seen: VecDeque<String>,
    ended: bool,
}

impl EventStream {
    /// Opens `url` (a full URL, query included) with an optional key (sent as a bearer
    /// token) and an optional `Last-Event-ID`. Fails unless the server answers 2xx.
    pub async fn connect(
        url: &str,
        key: Option<&str>,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut rb = reqwest::Client::new()
            .get(url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        if let Some(id) = last_event_id {
            rb = rb.header("Last-Event-ID", id);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("failed to open the event stream {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("event stream {url} answered {status}: {body}");
        }
        Ok(EventStream {
            url: url.to_string(),
            events: Box::pin(resp.bytes_stream().eventsource()),
            seen: VecDeque::new(),
            ended: false,
        })
    }

    /// The next event, waiting at most `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> anyhow::Result<SseMsg> {
        if self.ended {
            bail!("the event stream {} has ended", self.url);
        }
        let item = tokio::time::timeout(deadline, self.events.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "timed out after {deadline:?} waiting for an event on {}",
                    self.url
                )
            })?;
        match item {
            None => {
                self.ended = true;
                bail!("the event stream {} ended", self.url)
            }
            Some(Err(e)) => {
                self.ended = true;
                Err(anyhow!("the event stream {} failed: {e}", self.url))
            }
            Some(Ok(ev)) => {
                let msg = SseMsg {
                    id: ev.id,
                    event: ev.event,
                    data: ev.data,
                };
                if self.seen.len() == SEEN_LOG {
                    self.seen.pop_front();
                }
                self.seen.push_back(msg.summary());
                Ok(msg)
            }
        }
    }

    /// The first event (from now on) for which `pred` holds, within `deadline` in total.
    /// On failure the error lists the most recent events seen on this stream.
    pub async fn wait_for(
        &mut self,
        deadline: Duration,
        mut pred: impl FnMut(&SseMsg) -> bool,
    ) -> anyhow::Result<SseMsg> {
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Ok(m) if pred(&m) => return Ok(m),
                Ok(_) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "no matching event within {deadline:?}; recent events seen:\n{}",
                        self.seen_report()
                    )))
                }
            }
        }
    }

    /// The most recent events seen, one per line, oldest first.
    pub fn seen_report(&self) -> String {
        if self.seen.is_empty() {
            "(none)".to_string()
        } else {
            self.seen.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }
}

/// True when `msg` is a `task.status` event whose status is `status`.
pub fn is_task_status(msg: &SseMsg, status: TaskStatus) -> bool {
    msg.event == "task.status"
        && msg
            .json()
            .ok()
            .as_ref()
            .and_then(|v| v.pointer("/data/status"))
            .and_then(|s| s.as_str())
            == Some(status.as_str())
}

/// Waits until task `task_id` reaches `status`, then returns the task as
/// `GET /api/v1/tasks/{id}` shows it. Reads the task's event log from the start, so a status
/// reached before this call is found too. `api_url` is the server root.
pub async fn wait_task_status(
    api_url: &str,
    key: &str,
    task_id: &str,
    status: TaskStatus,
    deadline: Duration,
) -> anyhow::Result<Task> {
    let base = api_url.trim_end_matches('/');
    let url = format!("{base}/api/v1/events?task={task_id}&after=0");
    let mut events = EventStream::connect(&url, Some(key), None).await?;
    events
        .wait_for(deadline, |m| is_task_status(m, status))
        .await
        .with_context(|| format!("task {task_id} did not become {}", status.as_str()))?;
    let detail: TaskDetail = Api::new(base, Some(key.to_string())).task(task_id).await?;
    Ok(detail.task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_task_status_events() {
        let msg = SseMsg {
            id: "7".into(),
            event: "task.status".into(),
            data: r#"{"id":7,"kind":"task.status","taskId":"t1","daemonId":null,
                      "data":{"status":"running","attempt":1},"at":"x"}"#
                .into(),
        };
        assert!(is_task_status(&msg, TaskStatus::Running));
        assert!(!is_task_status(&msg, TaskStatus::Completed));
        let other = SseMsg {
            event: "task.created".into(),
            ..msg
        };
        assert!(!is_task_status(&other, TaskStatus::Running));
    }
}

//! The daemon's connection to its upstream (a coordinator or a relay). The session (connect,
//! authenticate, heartbeats, reconnecting forever with exponential backoff and jitter from 1 s
//! to 60 s) is `kennel_link::client`'s; this says what the daemon brings to it: the attempts
//! it still holds, the outbox it replays, the commands it hands to the executor, the acks it
//! applies. A refused key or protocol version stops it for good.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kennel_link::client::{self, Refusal, SessionEnd, Upstream};
use kennel_proto::link::{
    Authenticate, Authenticated, Capacity, ErrorCode, Heartbeat, Secret, TaskRef,
};
use kennel_proto::{decode_server_frame, DaemonMessage, Decoded, ServerMessage};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::executor::{Control, Executor};
use crate::outbox::{Outbox, Pending};

/// Who the daemon says it is.
#[derive(Clone)]
pub struct Identity {
    /// Where to connect, in order: `daemon.server`, then `daemon.fallback_servers`.
    pub urls: Vec<String>,
    pub api_key: String,
    pub machine_id: String,
    pub hostname: String,
    pub max_concurrent_tasks: u32,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<String>,
}

/// The link's state, for `kennel daemon status`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkState {
    pub connected: bool,
    /// The coordinator (or relay) of the current or last accepted session.
    pub upstream: Option<String>,
    pub daemon_id: Option<String>,
    /// Why the last connection ended or failed, if it did.
    pub last_error: Option<String>,
    pub reconnects: u64,
}

/// Why the link stopped (only on shutdown or a refused key: it never gives up otherwise).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the upstream refused this daemon: {0}{hint}", hint = key_hint(.0))]
    Refused(String),
}

/// The hint for a refusal about the key itself; a refusal that already says what to do (a
/// machine id bound to another key, a protocol version) gets none.
fn key_hint(reason: &str) -> &'static str {
    if reason.contains("API key") && !reason.contains("machine id") {
        " (check daemon.api_key; it needs the daemon scope)"
    } else {
        ""
    }
}

pub struct Link {
    id: Identity,
    outbox: Arc<Outbox>,
    exec: Arc<Executor>,
    out: mpsc::UnboundedReceiver<Pending>,
    state: watch::Sender<LinkState>,
    /// True once a clean stop began: offer no capacity upstream.
    stopping: watch::Receiver<bool>,
    /// The same, as the current session watches it: a change offers no capacity at once.
    session_stopping: watch::Receiver<bool>,
}

impl Link {
    pub fn new(
        id: Identity,
        outbox: Arc<Outbox>,
        exec: Arc<Executor>,
        out: mpsc::UnboundedReceiver<Pending>,
        stopping: watch::Receiver<bool>,
    ) -> (Self, watch::Receiver<LinkState>) {
        let (state, rx) = watch::channel(LinkState::default());
        (
            Link {
                id,
                outbox,
                exec,
                out,
                state,
                session_stopping: stopping.clone(),
                stopping,
            },
            rx,
        )
    }

    /// Runs until `shutdown` fires. Reconnects forever otherwise. A shutdown during a session
    /// closes the connection with a Close frame (going away), so the upstream sees a clean
    /// stop.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> Result<(), LinkError> {
        client::run(
            &mut self,
            shutdown,
            client::AUTH_DEADLINE,
            kennel_link::reconnect_backoff,
        )
        .await
        .map_err(|r| LinkError::Refused(r.message().to_string()))
    }

    /// The `capacity` message of a daemon that is stopping: it offers nothing.
    fn no_capacity(&self) -> String {
        DaemonMessage::Capacity(Capacity {
            max_concurrent_tasks: 0,
            agents: self.id.agents.clone(),
            labels: self.id.labels.clone(),
        })
        .to_json()
    }

    /// Applies one upstream frame; returns messages to resend (after a `seqGap`).
    async fn handle(&self, text: &str) -> Option<Vec<Pending>> {
        let msg = match decode_server_frame(text, usize::MAX) {
            Ok(Decoded::Known(m)) => m,
            Ok(Decoded::Unknown { type_name }) => {
                tracing::debug!(type_name, "ignoring unknown message type from upstream");
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "bad frame from upstream"
                );
                return None;
            }
        };
        match msg {
            ServerMessage::Ack(a) => {
                if let Err(e) = self.outbox.ack(&a.task_id, a.attempt, a.seq) {
                    tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "outbox failed to apply an ack"
                    );
                }
            }
            ServerMessage::SpawnTask(s) => self.exec.spawn(s).await,
            ServerMessage::PauseTask(c) => self.exec.control(&c.task_id, c.attempt, Control::Pause),
            ServerMessage::ResumeTask(c) => {
                self.exec.control(&c.task_id, c.attempt, Control::Resume)
            }
            ServerMessage::InterruptTask(c) => self.exec.control(
                &c.task_id,
                c.attempt,
                Control::Interrupt {
                    grace: Duration::from_secs(c.grace_secs),
                },
            ),
            ServerMessage::DeliverMessage(m) => self.exec.control(
                &m.task_id,
                m.attempt,
                Control::Deliver {
                    message_id: m.message_id,
                    from: m.from,
                    body: m.body,
                },
            ),
            ServerMessage::SendMessage(m) => {
                self.exec
                    .control(&m.task_id, m.attempt, Control::Message(m.message))
            }
            ServerMessage::Error(e) => match (e.code, &e.task_id, e.attempt) {
                (ErrorCode::StaleAttempt, Some(t), Some(a)) => {
                    tracing::warn!(task_id = %t, attempt = a, "upstream refused the attempt as stale: {}", e.message);
                    self.exec.control(t, a, Control::Drop);
                    if let Err(err) = self.outbox.drop_attempt(t, a) {
                        tracing::error!(error = &err as &dyn std::error::Error, "outbox failed");
                    }
                }
                (ErrorCode::SeqGap, Some(t), Some(a)) => {
                    let from = e.expected_seq.unwrap_or(1);
                    return self.outbox.pending_from(t, a, from).ok();
                }
                _ => tracing::warn!(code = e.code.as_str(), "upstream error: {}", e.message),
            },
            ServerMessage::Authenticated(_) => {}
        }
        None
    }
}

impl Upstream for Link {
    fn urls(&self) -> Result<Vec<String>, String> {
        Ok(self.id.urls.clone())
    }

    fn hello(&mut self) -> Result<DaemonMessage, String> {
        let running = self
            .outbox
            .running_tasks()
            .map_err(|e| format!("outbox unreadable: {e}"))?;
        Ok(DaemonMessage::Authenticate(Authenticate {
            api_key: Secret(self.id.api_key.clone()),
            machine_id: self.id.machine_id.clone(),
            hostname: self.id.hostname.clone(),
            max_concurrent_tasks: self.id.max_concurrent_tasks,
            protocol_version: kennel_proto::PROTOCOL_VERSION,
            min_protocol_version: Some(kennel_proto::MIN_PROTOCOL_VERSION),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.id.labels.clone(),
            agents: self.id.agents.clone(),
            running_tasks: running,
        }))
    }

    fn accepted(&mut self, url: &str, answer: &Authenticated) -> Result<Vec<String>, String> {
        tracing::info!(daemon_id = %answer.daemon_id, url, "connected upstream");
        self.state.send_modify(|s| {
            s.connected = true;
            s.upstream = Some(url.to_string());
            s.daemon_id = Some(answer.daemon_id.clone());
        });
        self.session_stopping = self.stopping.clone();
        let mut first = Vec::new();
        // Reconnected while stopping: offer nothing before anything else happens.
        if *self.stopping.borrow() {
            first.push(self.no_capacity());
        }
        // Everything queued for the old connection is in the outbox; replay from there.
        while self.out.try_recv().is_ok() {}
        let pending = self
            .outbox
            .pending()
            .map_err(|e| format!("outbox unreadable: {e}"))?;
        first.extend(pending.into_iter().map(|p| p.frame));
        Ok(first)
    }

    async fn outgoing(&mut self) -> Option<String> {
        loop {
            tokio::select! {
                Ok(()) = self.session_stopping.changed() => {
                    if *self.session_stopping.borrow_and_update() {
                        return Some(self.no_capacity());
                    }
                }
                Some(p) = self.out.recv() => return Some(p.frame),
                // Neither can yield again: wait for the session's other ends.
                else => std::future::pending::<()>().await,
            }
        }
    }

    fn try_outgoing(&mut self) -> Option<String> {
        self.out.try_recv().ok().map(|p| p.frame)
    }

    fn heartbeat(&mut self) -> DaemonMessage {
        let active = self
            .exec
            .running_now()
            .into_iter()
            .map(|r| TaskRef {
                task_id: r.task_id,
                attempt: r.attempt,
            })
            .collect();
        DaemonMessage::Heartbeat(Heartbeat {
            active_tasks: active,
        })
    }

    async fn received(&mut self, frames: &[Utf8Bytes]) -> Vec<String> {
        let mut resend = Vec::new();
        for text in frames {
            if let Some(again) = self.handle(text.as_str()).await {
                resend.extend(again.into_iter().map(|p| p.frame));
            }
        }
        resend
    }

    fn ended(&mut self, end: &SessionEnd, retry_in: Option<Duration>) {
        self.state.send_modify(|s| s.connected = false);
        match (end, retry_in) {
            (SessionEnd::Refused(r), None) => {
                let e = LinkError::Refused(r.message().to_string());
                self.state
                    .send_modify(|s| s.last_error = Some(e.to_string()));
            }
            (end, Some(delay)) => {
                if delay.is_zero() {
                    tracing::warn!("upstream link down ({end}); trying the next upstream");
                } else {
                    tracing::warn!(
                        "upstream link down ({end}); retrying in {:.1}s",
                        delay.as_secs_f64()
                    );
                }
                self.state.send_modify(|s| {
                    s.last_error = Some(end.to_string());
                    s.reconnects += 1;
                });
            }
            _ => {}
        }
    }

    fn gives_up(&self, refusal: &Refusal) -> bool {
        matches!(
            refusal,
            Refusal::Unauthorized(_) | Refusal::UnsupportedVersion(_)
        )
    }

    fn goodbye(&self) -> Option<&'static str> {
        Some("daemon shutting down")
    }
}

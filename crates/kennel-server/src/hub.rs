//! `WS /ws/daemon`: the daemon hub. One task per connection reads frames, checks them,
//! hands sequenced reports to the [`Coordinator`] in batches and answers with acks or errors;
//! a writer task drains the connection's outbound channel.
//!
//! A bad frame gets an `error` and the connection carries on; only authentication failures,
//! silence past the heartbeat limit and frames past the hard cap end it, with a close reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use kennel_auth::Principal;
use kennel_link::handshake::{close_now, Admitted, Gate, Handshake, Refusal};
use kennel_proto::api::Scope;
use kennel_proto::link::{Ack, Authenticate, ErrorCode, ErrorFrame, OutputStream, ServerMessage};
use kennel_proto::{decode_daemon_frame, DaemonMessage, Decoded, FrameError};
use kennel_store::{Applied, DaemonHello, Effect, Report};

use crate::coordinator::IdentityRefused;
use crate::outbound::{LinkTx, Outbound};
use crate::ws::{self, LinkSocket};
use crate::AppState;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Close codes (the protocol's, in `kennel_proto`).
pub use kennel_proto::link::close;

/// Most frames read ahead and applied in one store transaction.
const REPORT_BATCH: usize = 128;

pub async fn ws_daemon(
    State(app): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let protocol = &app.coord.cfg.protocol;
    // Frames up to the hard cap are read and answered with `frameTooLarge`; beyond it the
    // WebSocket layer ends the connection.
    let hard_cap = protocol.max_frame_bytes.saturating_mul(8).max(16 << 20);
    let limits = ws::Limits {
        pre_auth_bytes: protocol.max_auth_frame_bytes,
        max_message_bytes: hard_cap,
    };
    let slots = app.pre_auth.clone();
    ws::accept(req, limits, &slots, move |link, slot| {
        Connection::run(app, link, addr, slot)
    })
}

struct Connection {
    app: Arc<AppState>,
    tx: LinkTx,
    daemon_id: String,
    max_frame: usize,
    bad_frames: std::sync::Mutex<ws::BadFrameLog>,
}

fn error_frame(code: ErrorCode, message: String) -> Outbound {
    Outbound::Msg(Box::new(ServerMessage::error(code, message)))
}

/// The coordinator's checks of a daemon's `authenticate`: a stored key with the daemon or
/// relay scope, then that the key may pose as the machine it names.
struct HubGate<'a> {
    app: &'a AppState,
}

fn store_failed(e: &kennel_store::StoreError) -> Refusal {
    tracing::error!(error = e as &dyn std::error::Error, "key check failed");
    Refusal::new(
        ErrorCode::Internal,
        close::STORE_UNAVAILABLE,
        "coordinator store unavailable; retry",
    )
}

impl Gate for HubGate<'_> {
    type Key = Principal;
    /// The principal and the key id to bind the machine to.
    type Admitted = (Principal, Option<String>);

    async fn check_key(&self, hello: &Authenticate) -> Result<Principal, Refusal> {
        let app = self.app;
        let principal = app
            .keys
            .verify(
                app.store.as_ref(),
                hello.api_key.expose(),
                app.clock.now_ms(),
            )
            .await
            .map_err(|e| store_failed(&e))?;
        let Some(p) = principal else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                close::UNAUTHORIZED,
                "invalid or revoked API key",
            ));
        };
        if p.require(&[Scope::Daemon, Scope::Relay]).is_err() {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                close::UNAUTHORIZED,
                "this API key lacks the daemon or relay scope",
            ));
        }
        Ok(p)
    }

    async fn check_machine(
        &self,
        hello: &Authenticate,
        p: Principal,
    ) -> Result<(Principal, Option<String>), Refusal> {
        match self.app.coord.check_identity(&hello.machine_id, &p).await {
            Ok(bind_key) => Ok((p, bind_key)),
            Err(IdentityRefused::Store(e)) => Err(store_failed(&e)),
            Err(IdentityRefused::Taken(msg)) => Err(Refusal::new(
                ErrorCode::Unauthorized,
                close::UNAUTHORIZED,
                msg,
            )),
        }
    }
}

/// The store failed after the daemon was admitted: it is told to retry.
async fn store_unavailable(
    socket: &mut LinkSocket,
    what: &str,
    e: &(dyn std::error::Error + Send + Sync + 'static),
) {
    tracing::error!(error = e, "failed to {what}");
    close_now(
        socket,
        close::STORE_UNAVAILABLE,
        "coordinator store unavailable; retry",
    )
    .await;
}

impl Connection {
    #[tracing::instrument(name = "daemon_link", skip_all, fields(peer = %addr))]
    async fn run(
        app: Arc<AppState>,
        accepted: ws::Accepted,
        addr: SocketAddr,
        pre_auth_slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let cfg = &app.coord.cfg.protocol;
        let handshake = Handshake {
            auth_timeout: cfg.auth_timeout.get(),
            max_frame_bytes: cfg.max_frame_bytes,
            end: "server",
        };
        let gate = HubGate { app: &app };
        let Some(mut admitted) = handshake.run(accepted, pre_auth_slot, &gate).await else {
            return;
        };
        let daemon_id = match app
            .coord
            .resolve_daemon_id(&admitted.hello.machine_id)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                store_unavailable(&mut admitted.socket, "resolve daemon id", &e).await;
                return;
            }
        };
        let (tx, rx) = admitted.queue(cfg.max_queued_frames);
        let authenticated =
            admitted.authenticated(daemon_id.clone(), cfg.heartbeat_interval.as_secs());
        let Admitted {
            mut socket,
            hello,
            version,
            admitted: (principal, bind_key),
            ..
        } = admitted;
        let running = hello.running_tasks.clone();
        let info = DaemonHello {
            machine_id: hello.machine_id,
            hostname: hello.hostname,
            max_concurrent_tasks: hello.max_concurrent_tasks,
            labels: hello.labels,
            agents: hello.agents,
            version: hello.version,
            protocol_version: version,
            remote_addr: Some(addr.to_string()),
            key_id: bind_key,
        };
        let attached = match app
            .coord
            .attach(
                &daemon_id,
                info,
                running,
                tx.clone(),
                authenticated,
                &principal.key_id,
            )
            .await
        {
            Ok(a) => a,
            Err(e) => {
                store_unavailable(&mut socket, "register daemon", &e).await;
                return;
            }
        };
        let conn = Connection {
            app: app.clone(),
            tx,
            daemon_id: daemon_id.clone(),
            max_frame: cfg.max_frame_bytes,
            bad_frames: Default::default(),
        };
        let silence = app.coord.cfg.silence_limit();
        let clock = app.coord.clock.as_ref();
        let reason = kennel_link::serve(
            socket,
            &conn.tx,
            rx,
            clock,
            silence,
            REPORT_BATCH,
            |frames| conn.handle_batch(frames),
        )
        .await;
        if reason.0 == close::SLOW_READER {
            tracing::warn!(daemon_id = %daemon_id, "disconnecting a daemon that does not read: {}", reason.1);
        }
        drop(conn);
        app.coord
            .detach(&daemon_id, attached.conn_id, &reason.1)
            .await;
    }

    async fn handle_batch(&self, frames: Vec<Message>) -> Option<(u16, String)> {
        let mut reports = Vec::new();
        // Active tasks the newest heartbeat in the batch reported.
        let mut heartbeat = None;
        for frame in frames {
            let text = match frame {
                Message::Text(t) => t,
                Message::Binary(_) => {
                    self.send_err(
                        ErrorCode::MalformedFrame,
                        "binary frames are not part of the protocol; send JSON text frames".into(),
                    );
                    continue;
                }
                Message::Close(frame) => return Some(closed_by_daemon(frame)),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            metrics::counter!("kennel_frames_received_total").increment(1);
            let msg = match decode_daemon_frame(text.as_str(), self.max_frame) {
                Ok(Decoded::Known(m)) => m,
                Ok(Decoded::Unknown { type_name }) => {
                    tracing::info!(daemon_id = %self.daemon_id, type_name, "ignoring unknown message type");
                    continue;
                }
                Err(e) => {
                    self.frame_error(&e);
                    continue;
                }
            };
            match msg {
                DaemonMessage::Authenticate(_) => self.send_err(
                    ErrorCode::NotAuthenticated,
                    "already authenticated on this connection".into(),
                ),
                DaemonMessage::Heartbeat(h) => heartbeat = Some(h.active_tasks.len()),
                DaemonMessage::Capacity(c) => self.app.coord.set_capacity(&self.daemon_id, c),
                DaemonMessage::TaskQueued(q) => self.app.coord.attempt_queued(&self.daemon_id, &q),
                other => {
                    if let Some(r) = to_report(&self.daemon_id, other) {
                        reports.push(r);
                    }
                }
            }
        }
        if let Some(active) = heartbeat {
            self.app.coord.heartbeat(&self.daemon_id, active).await;
        }
        if reports.is_empty() {
            return None;
        }
        match self.app.coord.report(&reports).await {
            Ok(results) => self.answer(&reports, results),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to apply daemon reports"
                );
                // Not acked: the daemon's outbox keeps them and replays after reconnecting.
                return Some((
                    close::STORE_UNAVAILABLE,
                    "coordinator store failed; reconnect and replay".into(),
                ));
            }
        }
        None
    }

    /// Sends one cumulative ack per (task, attempt), and an error for each refused report.
    fn answer(&self, reports: &[Report], results: Vec<Applied>) {
        let mut acks: HashMap<(&str, u32), u64> = HashMap::new();
        let mut order = Vec::new();
        for (r, res) in reports.iter().zip(results) {
            let key = (r.task_id.as_str(), r.attempt);
            match res {
                Applied::Done { .. } => {
                    bump(&mut acks, &mut order, key, r.seq);
                }
                Applied::Duplicate { last_seq } => {
                    bump(&mut acks, &mut order, key, last_seq);
                }
                Applied::Gap { expected } => {
                    metrics::counter!("kennel_frame_errors_total", "code" => "seqGap").increment(1);
                    self.tx.msg(ServerMessage::Error(ErrorFrame {
                        code: ErrorCode::SeqGap,
                        message: format!(
                            "seq {} of task {} attempt {} is out of order; resend from seq {expected}",
                            r.seq, r.task_id, r.attempt
                        ),
                        task_id: Some(r.task_id.clone()),
                        attempt: Some(r.attempt),
                        expected_seq: Some(expected),
                    }));
                }
                Applied::Stale { reason } => {
                    metrics::counter!("kennel_frame_errors_total", "code" => "staleAttempt")
                        .increment(1);
                    self.tx.msg(ServerMessage::Error(ErrorFrame {
                        code: ErrorCode::StaleAttempt,
                        message: format!("{reason}; stop this attempt and drop its messages"),
                        task_id: Some(r.task_id.clone()),
                        attempt: Some(r.attempt),
                        expected_seq: None,
                    }));
                }
            }
        }
        for key in order {
            if let Some(seq) = acks.get(&key) {
                self.tx.msg(ServerMessage::Ack(Ack {
                    task_id: key.0.to_string(),
                    attempt: key.1,
                    seq: *seq,
                }));
            }
        }
    }

    fn frame_error(&self, e: &FrameError) {
        metrics::counter!("kennel_frame_errors_total", "code" => e.code().as_str()).increment(1);
        let due = self
            .bad_frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due();
        if let Some(suppressed) = due {
            tracing::warn!(daemon_id = %self.daemon_id, error = %e, suppressed, "bad frame (with `suppressed` more since the last one logged)");
        }
        self.send_err(e.code(), truncate(&e.to_string(), 500));
    }

    fn send_err(&self, code: ErrorCode, message: String) {
        self.tx.send(error_frame(code, message));
    }
}

fn bump<'a>(
    acks: &mut HashMap<(&'a str, u32), u64>,
    order: &mut Vec<(&'a str, u32)>,
    key: (&'a str, u32),
    seq: u64,
) {
    match acks.get_mut(&key) {
        Some(s) => *s = (*s).max(seq),
        None => {
            acks.insert(key, seq);
            order.push(key);
        }
    }
}

/// The code and reason of a Close frame the daemon sent. 1001 (going away) is a clean stop.
fn closed_by_daemon(frame: Option<CloseFrame>) -> (u16, String) {
    match frame.map(|f| (u16::from(f.code), f.reason)) {
        Some((code, reason)) if code == close::GOING_AWAY => (
            code,
            format!("daemon is shutting down (going away: {})", reason.as_str()),
        ),
        Some((code, reason)) => (
            code,
            format!("daemon closed the connection ({code} {})", reason.as_str()),
        ),
        None => (1000, "daemon closed the connection".into()),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn to_report(daemon_id: &str, m: DaemonMessage) -> Option<Report> {
    let (task_id, attempt, seq, effect) = match m {
        DaemonMessage::TaskAccepted(m) => (m.task_id, m.attempt, m.seq, Effect::Accepted),
        DaemonMessage::TaskRejected(m) => (
            m.task_id,
            m.attempt,
            m.seq,
            Effect::Rejected {
                reason: m.reason,
                code: m.code,
            },
        ),
        DaemonMessage::TaskOutput(m) => (
            m.task_id,
            m.attempt,
            m.seq,
            Effect::Output {
                stream: m.stream,
                output: m.output,
                is_partial: m.is_partial,
            },
        ),
        DaemonMessage::TaskProgress(m) => (
            m.task_id,
            m.attempt,
            m.seq,
            Effect::Progress {
                summary: m.summary,
                detail: m.detail,
            },
        ),
        DaemonMessage::TaskStatusChange(m) => (
            m.task_id,
            m.attempt,
            m.seq,
            Effect::StatusChange {
                new_status: m.new_status.parse().ok(),
            },
        ),
        DaemonMessage::TaskComplete(m) => (
            m.task_id,
            m.attempt,
            m.seq,
            Effect::Complete {
                success: m.success,
                error: m.error,
                exit_code: m.exit_code,
                branch: m.branch,
                commit: m.commit,
            },
        ),
        // A session agent's deliveries and answers are kept in the attempt's output, exactly
        // once like the rest of it; the lifecycle manager reads them from there.
        DaemonMessage::MessageDelivered(m) => (
            m.task_id,
            m.attempt,
            m.seq,
            Effect::Output {
                stream: OutputStream::Delivered,
                output: m.message_id,
                is_partial: false,
            },
        ),
        DaemonMessage::AgentMessage(m) => {
            let output = serde_json::json!({
                "to": m.to,
                "inReplyTo": m.in_reply_to,
                "body": m.body,
            })
            .to_string();
            (
                m.task_id,
                m.attempt,
                m.seq,
                Effect::Output {
                    stream: OutputStream::Message,
                    output,
                    is_partial: false,
                },
            )
        }
        DaemonMessage::Authenticate(_)
        | DaemonMessage::Heartbeat(_)
        | DaemonMessage::Capacity(_)
        | DaemonMessage::TaskQueued(_) => return None,
    };
    Some(Report {
        daemon_id: daemon_id.to_string(),
        task_id,
        attempt,
        seq,
        effect,
    })
}

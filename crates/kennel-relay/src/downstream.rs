//! `WS /ws/daemon` on the relay: the same protocol as the coordinator's hub. A daemon must
//! `authenticate` first, within the deadline, with one of `relay.daemon_keys`; then its
//! task-scoped messages go to the [`Relay`] core, which relays them upstream. A bad frame gets
//! an `error` and the connection carries on; silence past `relay.missed_heartbeats` heartbeat
//! intervals ends it.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use kennel_auth::KeyList;
use kennel_link::handshake::{self, Gate, Handshake};
use kennel_link::outbound::LinkTx;
use kennel_link::ws;
use kennel_proto::link::{Authenticate, ErrorCode};
use kennel_proto::{decode_daemon_frame, DaemonMessage, Decoded, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

use crate::relay::{Outbound, Refusal, Relay};

use kennel_proto::link::close;

/// `daemon_keys` is `relay.daemon_keys`, hashed once when the routes were built.
pub async fn ws_daemon(relay: Arc<Relay>, daemon_keys: Arc<KeyList>, req: Request) -> Response {
    let limits = ws::Limits {
        pre_auth_bytes: relay.cfg.max_auth_frame_bytes,
        max_message_bytes: relay.cfg.max_frame_bytes.saturating_mul(8).max(16 << 20),
    };
    let slots = relay.pre_auth.clone();
    ws::accept(req, limits, &slots, move |link, slot| {
        run(relay, daemon_keys, link, slot)
    })
}

/// The relay's checks of a daemon's `authenticate`: one of `relay.daemon_keys`; any machine
/// may use it.
struct RelayGate<'a> {
    relay: &'a Relay,
    daemon_keys: &'a KeyList,
}

impl Gate for RelayGate<'_> {
    type Key = ();
    type Admitted = ();

    async fn check_key(&self, hello: &Authenticate) -> Result<(), handshake::Refusal> {
        if self.daemon_keys.contains(hello.api_key.expose()) {
            return Ok(());
        }
        self.relay.log(
            "error",
            &format!("daemon {} refused: invalid API key", hello.machine_id),
        );
        Err(handshake::Refusal::new(
            ErrorCode::Unauthorized,
            close::UNAUTHORIZED,
            "invalid API key: use one of the relay's daemon_keys",
        ))
    }

    async fn check_machine(&self, _: &Authenticate, _: ()) -> Result<(), handshake::Refusal> {
        Ok(())
    }
}

impl ws::Closing for Outbound {
    fn closing(code: u16, reason: String) -> Self {
        Outbound::Close(code, reason)
    }
}

#[tracing::instrument(name = "relay_downstream", skip_all)]
async fn run(
    relay: Arc<Relay>,
    daemon_keys: Arc<KeyList>,
    accepted: ws::Accepted,
    pre_auth_slot: tokio::sync::OwnedSemaphorePermit,
) {
    let cfg = &relay.cfg;
    let handshake = Handshake {
        auth_timeout: cfg.auth_timeout.get(),
        max_frame_bytes: cfg.max_frame_bytes,
        end: "relay",
    };
    let gate = RelayGate {
        relay: &relay,
        daemon_keys: &daemon_keys,
    };
    let Some(admitted) = handshake.run(accepted, pre_auth_slot, &gate).await else {
        return;
    };
    // The relay knows a daemon by its machine id.
    let machine = admitted.hello.machine_id.clone();
    // Bounded: a daemon that stops reading is cut off (4006) instead of the relay buffering
    // for it without limit.
    let (tx, rx) = admitted.queue(DOWN_QUEUE);
    let authenticated = admitted.authenticated(machine.clone(), cfg.heartbeat_interval.as_secs());
    let conn_id = relay.attach(&admitted.hello, tx.clone(), authenticated);
    let mut bad_frames = ws::BadFrameLog::default();
    let (_, reason) = kennel_link::serve(
        admitted.socket,
        &tx,
        rx,
        relay.clock.as_ref(),
        cfg.silence_limit(),
        BATCH,
        |frames| {
            let end = handle_batch(&relay, &machine, &tx, frames, &mut bad_frames);
            std::future::ready(end)
        },
    )
    .await;
    drop(tx);
    relay.detach(&machine, conn_id, &reason);
}

/// Frames that may wait for one downstream daemon (at least twice its slots).
const DOWN_QUEUE: usize = 4096;

/// Most frames read ahead and relayed under one lock and one history transaction.
const BATCH: usize = 128;

fn handle_batch(
    relay: &Arc<Relay>,
    machine: &str,
    tx: &LinkTx<Outbound>,
    frames: Vec<Message>,
    bad_frames: &mut ws::BadFrameLog,
) -> Option<(u16, String)> {
    let err = |code: ErrorCode, message: String| {
        tx.send(Outbound::Text(
            ServerMessage::error(code, message).to_json(),
        ));
    };
    let mut texts = Vec::with_capacity(frames.len());
    for frame in frames {
        match frame {
            Message::Text(t) => texts.push(t),
            Message::Binary(_) => err(
                ErrorCode::MalformedFrame,
                "binary frames are not part of the protocol; send JSON text frames".into(),
            ),
            Message::Close(_) => return Some((1000, "daemon closed the connection".into())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    let mut reports: Vec<(DaemonMessage, &str)> = Vec::new();
    // Reports are relayed in order; anything else flushes the reports before it.
    let flush = |reports: &mut Vec<(DaemonMessage, &str)>| {
        if reports.is_empty() {
            return;
        }
        for Refusal::Stale(e) in relay.from_daemon(machine, reports) {
            tracing::warn!(machine, task_id = ?e.task_id, "refused a report on a task this daemon does not hold");
            tx.send(Outbound::Text(ServerMessage::Error(e).to_json()));
        }
        reports.clear();
    };
    for text in &texts {
        let msg = match decode_daemon_frame(text.as_str(), relay.cfg.max_frame_bytes) {
            Ok(Decoded::Known(m)) => m,
            Ok(Decoded::Unknown { type_name }) => {
                // Forward compatibility: relays pass unknown daemon messages on.
                tracing::debug!(machine, type_name, "forwarding an unknown message type");
                flush(&mut reports);
                relay.forward_unknown(text.as_str());
                continue;
            }
            Err(e) => {
                if let Some(suppressed) = bad_frames.due() {
                    tracing::warn!(machine, error = %e, suppressed, "bad frame (with `suppressed` more since the last one logged)");
                }
                err(e.code(), e.to_string());
                continue;
            }
        };
        match msg {
            DaemonMessage::Authenticate(_) => err(
                ErrorCode::NotAuthenticated,
                "already authenticated on this connection".into(),
            ),
            DaemonMessage::Heartbeat(h) => relay.heartbeat(machine, h.active_tasks.len()),
            DaemonMessage::Capacity(c) => {
                flush(&mut reports);
                relay.set_daemon_capacity(machine, &c)
            }
            DaemonMessage::TaskQueued(q) => {
                flush(&mut reports);
                if let Some(Refusal::Stale(e)) = relay.queued_below(machine, &q, text.as_str()) {
                    tx.send(Outbound::Text(ServerMessage::Error(e).to_json()));
                }
            }
            other => reports.push((other, text.as_str())),
        }
    }
    flush(&mut reports);
    None
}

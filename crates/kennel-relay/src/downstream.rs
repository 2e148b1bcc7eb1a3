//! `WS /ws/daemon` on the relay: the same protocol as the coordinator's hub. A daemon must
//! `authenticate` first, within the deadline, with one of `relay.daemon_keys`; then its
//! task-scoped messages go to the [`Relay`] core, which relays them upstream. A bad frame gets
//! an `error` and the connection carries on; silence past `relay.missed_heartbeats` heartbeat
//! intervals ends it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use kennel_auth::KeyList;
use kennel_proto::link::{negotiate_version, Authenticated, ErrorCode};
use kennel_proto::{decode_daemon_frame, DaemonMessage, Decoded, ServerMessage};
use kennel_server::outbound::LinkTx;
use kennel_server::ws::{self, close_message, LinkSocket};
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

async fn refuse(socket: &mut LinkSocket, code: ErrorCode, close: u16, msg: &str) {
    let _ = socket
        .send(Message::Text(
            ServerMessage::error(code, msg).to_json().into(),
        ))
        .await;
    let _ = socket.send(close_message(close, msg)).await;
}

#[tracing::instrument(name = "relay_downstream", skip_all)]
async fn run(
    relay: Arc<Relay>,
    daemon_keys: Arc<KeyList>,
    accepted: ws::Accepted,
    pre_auth_slot: tokio::sync::OwnedSemaphorePermit,
) {
    let ws::Accepted { mut socket, budget } = accepted;
    let cfg = &relay.cfg;
    let first =
        match tokio::time::timeout(Duration::from_secs(cfg.auth_timeout_secs), socket.next()).await
        {
            Err(_) => {
                let reason = format!("no authenticate frame within {}s", cfg.auth_timeout_secs);
                let _ = socket
                    .send(close_message(close::AUTH_TIMEOUT, &reason))
                    .await;
                return;
            }
            Ok(None) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(m))) => m,
        };
    let Message::Text(text) = first else {
        let _ = socket
            .send(close_message(
                close::PROTOCOL,
                "expected an authenticate text frame first",
            ))
            .await;
        return;
    };
    let hello = match decode_daemon_frame(text.as_str(), cfg.max_frame_bytes) {
        Ok(Decoded::Known(DaemonMessage::Authenticate(a))) => a,
        Ok(_) => {
            let msg = "the first frame must be `authenticate`";
            refuse(
                &mut socket,
                ErrorCode::NotAuthenticated,
                close::PROTOCOL,
                msg,
            )
            .await;
            return;
        }
        Err(e) => {
            let msg = format!("the first frame must be a valid `authenticate`: {e}");
            refuse(
                &mut socket,
                ErrorCode::NotAuthenticated,
                close::PROTOCOL,
                &msg,
            )
            .await;
            return;
        }
    };
    if !daemon_keys.contains(hello.api_key.expose()) {
        let msg = "invalid API key: use one of the relay's daemon_keys";
        relay.log(
            "error",
            &format!("daemon {} refused: invalid API key", hello.machine_id),
        );
        refuse(
            &mut socket,
            ErrorCode::Unauthorized,
            close::UNAUTHORIZED,
            msg,
        )
        .await;
        return;
    }
    let Some(version) = negotiate_version(hello.protocol_version, hello.min_protocol_version)
    else {
        let msg = format!(
            "no common protocol version: daemon speaks {}..={}, relay speaks {}..={}",
            hello.min_protocol_version.unwrap_or(hello.protocol_version),
            hello.protocol_version,
            kennel_proto::MIN_PROTOCOL_VERSION,
            kennel_proto::PROTOCOL_VERSION
        );
        refuse(
            &mut socket,
            ErrorCode::UnsupportedVersion,
            close::UNSUPPORTED_VERSION,
            &msg,
        )
        .await;
        return;
    };
    // Authenticated: no byte budget and no pre-authentication slot from here on.
    budget.lift();
    drop(pre_auth_slot);
    let machine = hello.machine_id.clone();
    // Bounded: a daemon that stops reading is cut off (4006) instead of the relay buffering
    // for it without limit.
    let bound = DOWN_QUEUE.max(2 * hello.max_concurrent_tasks as usize);
    let (tx, rx) = kennel_server::outbound::channel(bound);
    let authenticated = ServerMessage::Authenticated(Authenticated {
        daemon_id: machine.clone(),
        heartbeat_interval_secs: cfg.heartbeat_interval_secs,
        protocol_version: version,
        max_frame_bytes: cfg.max_frame_bytes,
    });
    let conn_id = relay.attach(&hello, tx.clone(), authenticated);
    let (sink, stream) = socket.split();
    let mut writer = tokio::spawn(ws::write_loop(sink, rx));
    let (code, reason) = tokio::select! {
        r = read_loop(&relay, &machine, &tx, stream) => r,
        r = tx.overflowed() => r,
    };
    tx.send(Outbound::Close(code, reason.clone()));
    drop(tx);
    if tokio::time::timeout(Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        // Stuck writing to a peer that does not read: drop the socket.
        writer.abort();
    }
    relay.detach(&machine, conn_id, &reason);
}

/// Frames that may wait for one downstream daemon (at least twice its slots).
const DOWN_QUEUE: usize = 4096;

/// Most frames read ahead and relayed under one lock and one history transaction.
const BATCH: usize = 128;

async fn read_loop(
    relay: &Arc<Relay>,
    machine: &str,
    tx: &LinkTx<Outbound>,
    mut stream: futures_util::stream::SplitStream<LinkSocket>,
) -> (u16, String) {
    let silence = relay.cfg.silence_limit();
    let mut bad_frames = ws::BadFrameLog::default();
    loop {
        // Whatever already arrived is relayed together.
        let frames = match kennel_link::next_batch(&mut stream, silence, BATCH).await {
            Ok(frames) => frames,
            Err(end) => return end,
        };
        if let Some(end) = handle_batch(relay, machine, tx, frames, &mut bad_frames) {
            return end;
        }
    }
}

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

//! What coordinators sharing one PostgreSQL database tell each other, so that a task submitted
//! on one is scheduled by whichever holds a free daemon, an event stream on any shows every
//! event, and a command reaches a daemon on whichever coordinator holds its link.
//!
//! Signals are hints, never the truth: the store decides (conditional dispatch, attempt
//! fencing), and a coordinator that missed signals (its listening connection dropped) is told
//! to resynchronise from the store ([`Heard::Resync`]). On SQLite there is one coordinator and
//! [`Solo`] sends nothing.
//!
//! PostgreSQL carries them with `NOTIFY` on one channel; a payload is a [`Packet`] of JSON,
//! kept under PostgreSQL's 8,000-byte limit by splitting batches.

use std::sync::Arc;

use kennel_proto::TaskStatus;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The `LISTEN`/`NOTIFY` channel is this, then `_` and the schema the store's tables are in:
/// clusters in different schemas of one database (tests, staging beside production) do not
/// hear each other.
pub const CHANNEL_PREFIX: &str = "kennel";

/// Largest payload sent in one `NOTIFY` (PostgreSQL refuses 8,000 bytes and more).
pub const MAX_PAYLOAD: usize = 7_900;

/// One thing another coordinator should know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "camelCase")]
pub enum Signal {
    /// A task's status changed here, to `status` with attempt `attempt`. A queued task goes
    /// into the receivers' queues (they read it from the store), any other leaves them, and an
    /// attempt they hold is released if it ended. Without a status (a coordinator of an
    /// earlier version) receivers read the task to know.
    Task {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<TaskStatus>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        /// The sender has a free slot for this newly queued task and dispatches it: the
        /// others queue it only if it is still queued after [`CLAIM_WAIT`], so that they do
        /// not all race for it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        claimed: bool,
    },
    /// Events were committed: the event tails read what is new.
    Events,
    /// A task's output grew: its output streams read what is new.
    Output { task: String },
    /// For the coordinator holding `daemon`'s link: send it `frame` (a `ServerMessage`).
    Send { daemon: String, frame: String },
    /// An API key was revoked: links and streams it opened close now.
    Revoked { key: String },
}

/// Least time between two notifications of one coordinator when one of them carries a
/// signal another coordinator acts on (a task to queue or leave, a frame to send, a revoked
/// key): each notification wakes every other coordinator's listening connection and costs
/// the database a transaction, so under load signals are sent in batches (three coordinators
/// at 1,000 tasks/s sent ~500 a second).
const SIGNAL_GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// Least time between two notifications that only wake streams ([`Signal::Events`],
/// [`Signal::Output`]): the event tails read at most this often under load anyway, so sooner
/// would wake them for nothing.
const STREAM_GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// How long the other coordinators leave a claimed task to its claimer (see
/// [`Signal::Task`]); past it, one still queued is theirs to dispatch too.
pub const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What travels in one `NOTIFY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    /// The sending coordinator (a coordinator ignores its own packets).
    pub from: String,
    pub signals: Vec<Signal>,
}

/// What a coordinator hears from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    Signals(Vec<Signal>),
    /// Signals may have been missed (the listener connected again): reread the queue and
    /// catch up on events from the store.
    Resync,
}

/// How a coordinator reaches the others.
pub trait Peers: Send + Sync + 'static {
    /// This coordinator's id.
    fn id(&self) -> &str;
    /// Whether other coordinators may share the database (callers skip work for them if not).
    fn shared(&self) -> bool;
    /// Queues a signal; it is sent with whatever else is queued, in order. Never waits.
    fn send(&self, signal: Signal);
}

/// The one coordinator of a SQLite database: nobody to tell.
#[derive(Debug)]
pub struct Solo {
    id: String,
}

impl Solo {
    pub fn peers(id: String) -> Arc<dyn Peers> {
        Arc::new(Solo { id })
    }
}

impl Peers for Solo {
    fn id(&self) -> &str {
        &self.id
    }

    fn shared(&self) -> bool {
        false
    }

    fn send(&self, _signal: Signal) {}
}

/// Splits `signals` into packets whose JSON stays within `max` bytes. A single signal larger
/// than `max` is dropped with a warning (frames sent through [`Signal::Send`] are bounded by
/// the link's own limits, far below this, except a huge message; the sender falls back to an
/// error for those).
pub fn pack(from: &str, signals: Vec<Signal>, max: usize) -> Vec<String> {
    let overhead = serde_json::to_string(&Packet {
        from: from.to_string(),
        signals: Vec::new(),
    })
    .map(|s| s.len())
    .unwrap_or(64);
    let mut out = Vec::new();
    let mut parts: Vec<String> = Vec::new();
    let mut size = overhead;
    let flush = |parts: &mut Vec<String>, out: &mut Vec<String>| {
        if !parts.is_empty() {
            out.push(format!(
                "{{\"from\":{},\"signals\":[{}]}}",
                serde_json::Value::String(from.to_string()),
                parts.join(",")
            ));
            parts.clear();
        }
    };
    for s in signals {
        let Ok(json) = serde_json::to_string(&s) else {
            continue;
        };
        if overhead + json.len() > max {
            tracing::warn!(
                bytes = json.len(),
                "a signal to the other coordinators is too large to send; dropped"
            );
            continue;
        }
        // One comma between parts.
        if size + json.len() + 1 > max {
            flush(&mut parts, &mut out);
            size = overhead;
        }
        size += json.len() + 1;
        parts.push(json);
    }
    flush(&mut parts, &mut out);
    out
}

/// Coordinators on one PostgreSQL database: signals go out with `NOTIFY` from a sender task
/// that batches what is queued; a listener task hands what the others send to the
/// coordinator.
pub struct PgPeers {
    id: String,
    queue: mpsc::UnboundedSender<Signal>,
}

impl std::fmt::Debug for PgPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPeers").field("id", &self.id).finish()
    }
}

impl Peers for PgPeers {
    fn id(&self) -> &str {
        &self.id
    }

    fn shared(&self) -> bool {
        true
    }

    fn send(&self, signal: Signal) {
        let _ = self.queue.send(signal);
    }
}

impl PgPeers {
    /// Connects to `url`, starts listening, and returns the peers and what is heard. The first
    /// thing heard is [`Heard::Resync`] only after a reconnect; signals sent before this call
    /// returned are not heard.
    pub async fn start(
        url: &str,
        id: String,
    ) -> Result<(Arc<PgPeers>, mpsc::UnboundedReceiver<Heard>), sqlx::Error> {
        use sqlx::postgres::{PgListener, PgPoolOptions};
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let channel = format!("{CHANNEL_PREFIX}_{schema}");
        let mut listener = PgListener::connect(url).await?;
        listener.listen(&channel).await?;
        let (queue, outgoing) = mpsc::unbounded_channel();
        let (heard_tx, heard) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(pool, channel, id.clone(), outgoing));
        tokio::spawn(listen_loop(listener, id.clone(), heard_tx));
        Ok((Arc::new(PgPeers { id, queue }), heard))
    }
}

/// Signals waiting to go out in one notification. Signals that only wake streams are sent
/// once each: one [`Signal::Events`], one [`Signal::Output`] per task.
#[derive(Default)]
struct Batch {
    signals: Vec<Signal>,
    /// Holds a signal another coordinator acts on, not only stream wake-ups.
    acted_on: bool,
}

impl Batch {
    fn push(&mut self, signal: Signal) {
        match &signal {
            Signal::Events | Signal::Output { .. } => {
                if self.signals.contains(&signal) {
                    return;
                }
            }
            Signal::Task { .. } | Signal::Send { .. } | Signal::Revoked { .. } => {
                self.acted_on = true
            }
        }
        self.signals.push(signal);
    }

    /// How long after the last notification this batch may go out.
    fn gather(&self) -> std::time::Duration {
        match self.acted_on {
            true => SIGNAL_GATHER,
            false => STREAM_GATHER,
        }
    }
}

async fn send_loop(
    pool: sqlx::PgPool,
    channel: String,
    from: String,
    mut queue: mpsc::UnboundedReceiver<Signal>,
) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    while let Some(first) = queue.recv().await {
        let mut batch = Batch::default();
        batch.push(first);
        // Under load, what comes within the gather of the last notification goes out with
        // the next one; a signal after a quiet spell goes out at once.
        while let Some(wait) = last_sent.and_then(|t| batch.gather().checked_sub(t.elapsed())) {
            tokio::select! {
                _ = tokio::time::sleep(wait) => break,
                next = queue.recv() => match next {
                    Some(s) => batch.push(s),
                    None => break,
                },
            }
        }
        last_sent = Some(tokio::time::Instant::now());
        while let Ok(s) = queue.try_recv() {
            batch.push(s);
        }
        for payload in pack(&from, batch.signals, MAX_PAYLOAD) {
            let sent = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(&payload)
                .execute(&pool)
                .await;
            if let Err(e) = sent {
                // The others resynchronise when their listeners reconnect; a signal lost
                // while the database is unreachable costs latency, not correctness.
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "failed to signal the other coordinators"
                );
            }
        }
    }
}

async fn listen_loop(
    mut listener: sqlx::postgres::PgListener,
    me: String,
    heard: mpsc::UnboundedSender<Heard>,
) {
    loop {
        let next = match listener.try_recv().await {
            Ok(Some(n)) => n,
            Ok(None) => {
                // The connection was lost; the next call reconnects. What was sent meanwhile
                // is gone: resynchronise.
                tracing::warn!(
                    "lost the connection listening to the other coordinators; reconnecting"
                );
                if heard.send(Heard::Resync).is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "failed to listen to the other coordinators; retrying in 1s"
                );
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if heard.is_closed() {
                    return;
                }
                continue;
            }
        };
        let packet: Packet = match serde_json::from_str(next.payload()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "ignoring a notification that is not a kennel packet"
                );
                continue;
            }
        };
        if packet.from == me {
            continue;
        }
        if heard.send(Heard::Signals(packet.signals)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn task(n: usize) -> Signal {
        Signal::Task {
            id: format!("t-{n:032}"),
            status: Some(TaskStatus::Running),
            attempt: Some(1),
            claimed: false,
        }
    }

    #[test]
    fn packets_stay_under_the_limit_and_keep_every_signal_in_order() {
        let signals: Vec<Signal> = (0..500).map(task).collect();
        let packets = pack("c-1", signals.clone(), MAX_PAYLOAD);
        assert!(packets.len() > 1, "500 signals need several packets");
        let mut back = Vec::new();
        for p in &packets {
            assert!(p.len() <= MAX_PAYLOAD, "{} bytes", p.len());
            let packet: Packet = serde_json::from_str(p).unwrap();
            assert_eq!(packet.from, "c-1");
            back.extend(packet.signals);
        }
        assert_eq!(back, signals);
    }

    #[test]
    fn a_signal_too_large_for_any_packet_is_dropped_alone() {
        let big = Signal::Send {
            daemon: "d-1".into(),
            frame: "x".repeat(MAX_PAYLOAD),
        };
        let packets = pack("c-1", vec![task(1), big, task(2)], MAX_PAYLOAD);
        let back: Vec<Signal> = packets
            .iter()
            .flat_map(|p| serde_json::from_str::<Packet>(p).unwrap().signals)
            .collect();
        assert_eq!(back, vec![task(1), task(2)]);
    }

    #[test]
    fn a_batch_sends_each_stream_wake_up_once_and_waits_longer_for_only_those() {
        let mut batch = Batch::default();
        let output = |t: &str| Signal::Output { task: t.into() };
        for s in [
            Signal::Events,
            output("t1"),
            Signal::Events,
            output("t2"),
            output("t1"),
        ] {
            batch.push(s);
        }
        assert_eq!(
            batch.signals,
            vec![Signal::Events, output("t1"), output("t2")]
        );
        assert_eq!(batch.gather(), STREAM_GATHER);
        // A signal another coordinator acts on is never deduplicated, and goes out sooner.
        batch.push(task(1));
        batch.push(task(1));
        assert_eq!(batch.signals.len(), 5);
        assert_eq!(batch.gather(), SIGNAL_GATHER);
    }

    #[test]
    fn the_wire_form_is_tagged() {
        let s = serde_json::to_string(&Signal::Revoked { key: "k1".into() }).unwrap();
        assert_eq!(s, r#"{"k":"revoked","key":"k1"}"#);
        assert_eq!(
            serde_json::to_string(&Signal::Events).unwrap(),
            r#"{"k":"events"}"#
        );
    }

    fn postgres_url() -> String {
        std::env::var("KENNEL_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
    }

    async fn next(heard: &mut mpsc::UnboundedReceiver<Heard>) -> Heard {
        tokio::time::timeout(std::time::Duration::from_secs(10), heard.recv())
            .await
            .expect("a signal arrives within 10 s")
            .expect("the listener runs")
    }

    /// Two coordinators on the real PostgreSQL: what one sends, the other hears, in order and
    /// in one batch; nobody hears itself.
    #[tokio::test]
    async fn coordinators_hear_each_other_through_postgres_and_not_themselves() {
        let url = postgres_url();
        let connect = |id: &str| PgPeers::start(&url, id.to_string());
        let (a, mut heard_a) = connect("c-test-a").await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is needed at {url} (set KENNEL_TEST_POSTGRES_URL to point \
                 elsewhere): {e}"
            )
        });
        let (b, mut heard_b) = connect("c-test-b").await.unwrap();
        a.send(task(1));
        a.send(Signal::Events);
        let mut got = Vec::new();
        while got.len() < 2 {
            match next(&mut heard_b).await {
                Heard::Signals(s) => got.extend(s),
                Heard::Resync => {}
            }
        }
        assert_eq!(got, vec![task(1), Signal::Events]);
        // B answers; A hears B's signal and never its own.
        b.send(Signal::Revoked { key: "k1".into() });
        assert_eq!(
            next(&mut heard_a).await,
            Heard::Signals(vec![Signal::Revoked { key: "k1".into() }])
        );
    }
}

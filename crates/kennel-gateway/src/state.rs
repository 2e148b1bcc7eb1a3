//! What the gateway remembers: upstream health, the local agent's heartbeats, incidents and
//! totals. Held in memory for the request path and written through to the kennel store (the
//! `gateway_*` tables of `kennel.db` by default) by one writer task, so it survives a restart
//! without putting disk I/O on the request path. Nothing here decides routing; see `health`.
//!
//! Heartbeats and incidents come from clients, so what is kept of them is bounded twice: by
//! count ([`MAX_HEARTBEATS`], 1000 incidents) and by bytes (`gateway.max_kept_report_bytes`
//! each, as stored JSON), the oldest dropped first, in memory and in the store alike.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use kennel_store::{GatewayOp, GatewayStore, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::health::UpstreamHealth;

/// Heartbeats kept (and shown by `GET /state`).
pub const MAX_HEARTBEATS: usize = 100;
/// Incidents kept; `GET /gateway/incidents` shows the newest [`RECENT_INCIDENTS`].
const MAX_INCIDENTS: usize = 1000;
pub const RECENT_INCIDENTS: usize = 100;

/// Why the gateway's stored state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to read the gateway state from the kennel store")]
    Store(#[from] StoreError),
    #[error("stored gateway state is corrupt; delete the rows of the gateway_kv, gateway_heartbeats and gateway_incidents tables to start afresh")]
    Corrupt(#[from] serde_json::Error),
}

/// One heartbeat from the local agent, as sent (fields are free-form, as in ZeptoClaw).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Heartbeat {
    pub timestamp: Option<Value>,
    pub hostname: Option<String>,
    pub pid: Option<u64>,
    pub status: Option<String>,
    pub memory: Option<Value>,
    pub uptime: Option<Value>,
    pub version: Option<String>,
    /// Unix ms when the gateway received it.
    #[serde(rename = "receivedAtMs")]
    pub received_at_ms: i64,
}

/// Something worth a human's attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Incident {
    /// Unix ms.
    pub at_ms: i64,
    /// `downtime` (takeover), `recovered`, or what a reporter chose.
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// Counters since the last `POST /state/reset`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Totals {
    pub requests: u64,
    pub failures: u64,
    pub failovers: u64,
    pub heartbeats: u64,
    pub incidents: u64,
    pub takeovers: u64,
}

/// The in-memory picture.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub health: BTreeMap<String, UpstreamHealth>,
    pub heartbeats: VecDeque<Heartbeat>,
    pub incidents: VecDeque<Incident>,
    pub totals: Totals,
    /// Unix ms of the last heartbeat.
    pub last_seen_ms: Option<i64>,
    /// A downtime incident is open (no heartbeat since it was recorded).
    pub down: bool,
    /// Stored JSON bytes of `heartbeats`.
    heartbeat_bytes: usize,
    /// Stored JSON bytes of `incidents`.
    incident_bytes: usize,
    /// Upstreams whose health changed but is not queued for writing yet.
    dirty_health: std::collections::BTreeSet<String>,
    /// Totals changed but not queued for writing yet.
    dirty_totals: bool,
}

impl Snapshot {
    /// Drops the oldest heartbeats and incidents beyond the count caps and `max_bytes` each;
    /// the newest of each is always kept.
    fn trim(&mut self, max_bytes: usize) {
        while self.heartbeats.len() > MAX_HEARTBEATS
            || (self.heartbeats.len() > 1 && self.heartbeat_bytes > max_bytes)
        {
            if let Some(old) = self.heartbeats.pop_front() {
                self.heartbeat_bytes = self.heartbeat_bytes.saturating_sub(json_len(&old));
            }
        }
        while self.incidents.len() > MAX_INCIDENTS
            || (self.incidents.len() > 1 && self.incident_bytes > max_bytes)
        {
            if let Some(old) = self.incidents.pop_front() {
                self.incident_bytes = self.incident_bytes.saturating_sub(json_len(&old));
            }
        }
    }

    /// The newest [`RECENT_INCIDENTS`] incidents, newest first.
    pub fn recent_incidents(&self) -> Vec<Incident> {
        self.incidents
            .iter()
            .rev()
            .take(RECENT_INCIDENTS)
            .cloned()
            .collect()
    }
}

/// The length of `v` as stored (serde_json's maps are sorted, so this is stable).
fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_string(v).map_or(0, |s| s.len())
}

enum Op {
    Write(GatewayOp),
    Flush(oneshot::Sender<()>),
}

/// The shared state and its write-through.
pub struct GatewayState {
    inner: Mutex<Snapshot>,
    writer: mpsc::UnboundedSender<Op>,
    /// Woken by each heartbeat, for the takeover watch.
    pub heartbeat_seen: Notify,
    /// Woken when something is marked dirty, for the debounced writer.
    dirty: Notify,
    /// Bytes of heartbeats, and of incidents, kept (`gateway.max_kept_report_bytes`).
    max_kept_bytes: usize,
}

/// How long routine changes (successes, counters) wait before they are written, so the
/// request path costs no disk write per request. Failures and resets are written at once.
pub const WRITE_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

impl GatewayState {
    /// Loads what `store` holds and starts the writer task that persists changes to it.
    /// Heartbeats and incidents beyond `max_kept_bytes` each are dropped, oldest first.
    pub async fn open(
        store: Arc<dyn GatewayStore>,
        max_kept_bytes: usize,
    ) -> Result<Arc<Self>, StateError> {
        let rows = store
            .gateway_state(MAX_HEARTBEATS as u32, MAX_INCIDENTS as u32)
            .await?;
        let mut snap = load(rows)?;
        snap.trim(max_kept_bytes);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, rx));
        Ok(Arc::new(GatewayState {
            inner: Mutex::new(snap),
            writer: tx,
            heartbeat_seen: Notify::new(),
            dirty: Notify::new(),
            max_kept_bytes,
        }))
    }

    /// The state, locked. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, op: GatewayOp) {
        self.queue(Op::Write(op));
    }

    fn queue(&self, op: Op) {
        if self.writer.send(op).is_err() {
            tracing::error!(
                "the gateway state writer stopped; state changes are no longer persisted"
            );
        }
    }

    /// Persists the health of `name` (call after changing it).
    pub fn save_health(&self, name: &str, h: &UpstreamHealth) {
        if let Ok(json) = serde_json::to_string(h) {
            self.send(GatewayOp::Put(format!("health:{name}"), json));
        }
    }

    /// Marks `name`'s health to be written within [`WRITE_DELAY`].
    pub fn mark_health(&self, s: &mut Snapshot, name: &str) {
        if !s.dirty_health.contains(name) {
            s.dirty_health.insert(name.to_string());
        }
        self.dirty.notify_one();
    }

    /// Marks the totals to be written within [`WRITE_DELAY`].
    pub fn mark_totals(&self, s: &mut Snapshot) {
        s.dirty_totals = true;
        self.dirty.notify_one();
    }

    /// Queues everything marked dirty for writing.
    pub fn write_dirty(&self) {
        let mut s = self.lock();
        for name in std::mem::take(&mut s.dirty_health) {
            if let Some(h) = s.health.get(&name) {
                self.save_health(&name, h);
            }
        }
        if std::mem::take(&mut s.dirty_totals) {
            self.save_totals(&s.totals);
        }
    }

    /// Writes dirty state [`WRITE_DELAY`] after it was first marked; runs until aborted.
    pub async fn write_behind(self: Arc<Self>) {
        loop {
            self.dirty.notified().await;
            tokio::time::sleep(WRITE_DELAY).await;
            self.write_dirty();
        }
    }

    pub fn save_totals(&self, t: &Totals) {
        if let Ok(json) = serde_json::to_string(t) {
            self.send(GatewayOp::Put("totals".to_string(), json));
        }
    }

    fn save_meta(&self, s: &Snapshot) {
        match s.last_seen_ms {
            Some(ms) => self.send(GatewayOp::Put("last_seen".to_string(), ms.to_string())),
            None => self.send(GatewayOp::Delete("last_seen".to_string())),
        }
        self.send(GatewayOp::Put("down".to_string(), s.down.to_string()));
    }

    /// Records a heartbeat; returns whether it ended an open downtime.
    pub fn heartbeat(&self, hb: Heartbeat) -> bool {
        let mut s = self.lock();
        s.last_seen_ms = Some(hb.received_at_ms);
        let recovered = std::mem::take(&mut s.down);
        if let Ok(json) = serde_json::to_string(&hb) {
            s.heartbeat_bytes += json.len();
            s.heartbeats.push_back(hb);
            s.trim(self.max_kept_bytes);
            // The store keeps exactly what memory keeps: the newest `keep`.
            self.send(GatewayOp::Heartbeat {
                body: json,
                keep: s.heartbeats.len() as u32,
            });
        }
        s.totals.heartbeats += 1;
        self.save_totals(&s.totals);
        self.save_meta(&s);
        drop(s);
        self.heartbeat_seen.notify_one();
        recovered
    }

    pub fn incident(&self, inc: Incident) {
        let mut s = self.lock();
        if let Ok(json) = serde_json::to_string(&inc) {
            s.incident_bytes += json.len();
            s.incidents.push_back(inc);
            s.trim(self.max_kept_bytes);
            self.send(GatewayOp::Incident {
                body: json,
                keep: s.incidents.len() as u32,
            });
        }
        s.totals.incidents += 1;
        self.save_totals(&s.totals);
    }

    /// Marks the agent as down (a takeover) if no heartbeat arrived since `seen_ms`; returns
    /// whether it did.
    pub fn takeover(&self, seen_ms: i64, now_ms: i64) -> bool {
        let mut s = self.lock();
        if s.down || s.last_seen_ms != Some(seen_ms) {
            return false;
        }
        s.down = true;
        s.totals.takeovers += 1;
        self.save_meta(&s);
        drop(s);
        self.incident(Incident {
            at_ms: now_ms,
            kind: "downtime".to_string(),
            message: format!(
                "no heartbeat from the local agent for {} ms; the gateway keeps serving requests",
                now_ms - seen_ms
            ),
            details: None,
        });
        true
    }

    pub fn clear_incidents(&self) {
        let mut s = self.lock();
        s.incidents.clear();
        s.incident_bytes = 0;
        drop(s);
        self.send(GatewayOp::ClearIncidents);
    }

    /// `POST /state/reset`: heartbeats, incidents, totals and last-seen are cleared.
    pub fn reset_state(&self) {
        let mut s = self.lock();
        s.heartbeats.clear();
        s.incidents.clear();
        s.heartbeat_bytes = 0;
        s.incident_bytes = 0;
        s.totals = Totals::default();
        s.last_seen_ms = None;
        s.down = false;
        self.send(GatewayOp::ClearHeartbeats);
        self.send(GatewayOp::ClearIncidents);
        self.save_totals(&s.totals);
        self.save_meta(&s);
    }

    /// Waits until everything changed so far is on disk.
    pub async fn flush(&self) {
        self.write_dirty();
        let (tx, rx) = oneshot::channel();
        self.queue(Op::Flush(tx));
        let _ = rx.await;
    }
}

fn load(rows: kennel_store::GatewayRows) -> Result<Snapshot, StateError> {
    let mut s = Snapshot::default();
    for (k, v) in rows.kv {
        if let Some(name) = k.strip_prefix("health:") {
            s.health.insert(name.to_string(), serde_json::from_str(&v)?);
        } else if k == "totals" {
            s.totals = serde_json::from_str(&v)?;
        } else if k == "last_seen" {
            s.last_seen_ms = v.parse().ok();
        } else if k == "down" {
            s.down = v == "true";
        }
    }
    for body in rows.heartbeats {
        s.heartbeat_bytes += body.len();
        s.heartbeats.push_back(serde_json::from_str(&body)?);
    }
    for body in rows.incidents {
        s.incident_bytes += body.len();
        s.incidents.push_back(serde_json::from_str(&body)?);
    }
    Ok(s)
}

/// Writes what is queued, everything already waiting in one transaction, and answers flushes
/// once what was queued before them is committed. A failed write is logged; the state stays
/// in memory and is written again with its next change.
async fn write_loop(store: Arc<dyn GatewayStore>, mut rx: mpsc::UnboundedReceiver<Op>) {
    while let Some(first) = rx.recv().await {
        let mut ops = Vec::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(op) = next {
            match op {
                Op::Write(w) => ops.push(w),
                Op::Flush(ack) => acks.push(ack),
            }
            next = rx.try_recv().ok();
        }
        if !ops.is_empty() {
            if let Err(e) = store.gateway_write(ops).await {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to persist gateway state"
                );
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kennel.db");
        {
            let store: Arc<dyn GatewayStore> =
                Arc::new(kennel_store::SqliteStore::open(&path).await.unwrap());
            let st = GatewayState::open(store, 1 << 20).await.unwrap();
            st.heartbeat(Heartbeat {
                hostname: Some("h".into()),
                received_at_ms: 5,
                ..Default::default()
            });
            assert!(st.takeover(5, 100));
            let h = UpstreamHealth {
                requests: 3,
                ..Default::default()
            };
            st.save_health("a", &h);
            st.flush().await;
        }
        let store: Arc<dyn GatewayStore> =
            Arc::new(kennel_store::SqliteStore::open(&path).await.unwrap());
        let st = GatewayState::open(store, 1 << 20).await.unwrap();
        let s = st.lock();
        assert_eq!(s.heartbeats.len(), 1);
        assert_eq!(s.incidents[0].kind, "downtime");
        assert_eq!(s.health["a"].requests, 3);
        assert_eq!(s.totals.takeovers, 1);
        assert!(s.down);
    }

    #[tokio::test]
    async fn kept_reports_are_bounded_in_bytes_in_memory_and_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kennel.db");
        let budget = 10_000;
        let big = |i: i64| Heartbeat {
            status: Some("x".repeat(3_000)),
            received_at_ms: i,
            ..Default::default()
        };
        {
            let store: Arc<dyn GatewayStore> =
                Arc::new(kennel_store::SqliteStore::open(&path).await.unwrap());
            let st = GatewayState::open(store, budget).await.unwrap();
            for i in 0..20 {
                st.heartbeat(big(i));
                st.incident(Incident {
                    at_ms: i,
                    kind: "reported".into(),
                    message: "y".repeat(3_000),
                    details: None,
                });
            }
            st.flush().await;
            let s = st.lock();
            assert_eq!(s.heartbeats.len(), 3, "three of about 3 KB fit in 10 KB");
            assert_eq!(s.heartbeats.back().map(|h| h.received_at_ms), Some(19));
            assert_eq!(s.incidents.len(), 3);
            assert!(s.heartbeat_bytes <= budget && s.incident_bytes <= budget);
            assert_eq!(s.totals.heartbeats, 20, "counted, though not kept");
        }
        let store: Arc<dyn GatewayStore> =
            Arc::new(kennel_store::SqliteStore::open(&path).await.unwrap());
        let st = GatewayState::open(store, budget).await.unwrap();
        let s = st.lock();
        assert_eq!(s.heartbeats.len(), 3, "the store kept what memory kept");
        assert_eq!(s.incidents.len(), 3);
        assert_eq!(s.incidents.front().map(|i| i.at_ms), Some(17));
    }
}

//! What the gateway remembers: upstream health, the local agent's heartbeats, incidents and
//! totals. Held in memory for the request path and written through to `gateway.db` (SQLite in
//! the data directory) by one writer thread, so it survives a restart without putting disk
//! I/O on the request path. Nothing here decides routing; see `health`.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{oneshot, Notify};

use crate::health::UpstreamHealth;

/// Heartbeats kept (and shown by `GET /state`).
pub const MAX_HEARTBEATS: usize = 100;
/// Incidents kept; `GET /gateway/incidents` shows the newest [`RECENT_INCIDENTS`].
const MAX_INCIDENTS: usize = 1000;
pub const RECENT_INCIDENTS: usize = 100;

/// Why the gateway's own database failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to open the gateway database {path}: {source}; check that the data directory is writable")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("gateway database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored gateway state is corrupt ({0}); delete gateway.db to start afresh")]
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
    /// Upstreams whose health changed but is not queued for writing yet.
    dirty_health: std::collections::BTreeSet<String>,
    /// Totals changed but not queued for writing yet.
    dirty_totals: bool,
}

impl Snapshot {
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

enum Op {
    Put(String, String),
    Delete(String),
    Heartbeat(String),
    Incident(String),
    ClearIncidents,
    ClearHeartbeats,
    Flush(oneshot::Sender<()>),
}

/// The shared state and its write-through.
pub struct GatewayState {
    inner: Mutex<Snapshot>,
    writer: std::sync::mpsc::Sender<Op>,
    /// Woken by each heartbeat, for the takeover watch.
    pub heartbeat_seen: Notify,
    /// Woken when something is marked dirty, for the debounced writer.
    dirty: Notify,
}

/// How long routine changes (successes, counters) wait before they are written, so the
/// request path costs no disk write per request. Failures and resets are written at once.
pub const WRITE_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeats (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
";

impl GatewayState {
    /// Opens (creating) `path` and loads what was stored.
    pub fn open(path: &Path) -> Result<Arc<Self>, StateError> {
        let open_err = |source| StateError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        // Another process (a second gateway on the same data directory) may hold the lock.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        let snap = load(&conn)?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("gateway-db".to_string())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| StateError::Open {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Arc::new(GatewayState {
            inner: Mutex::new(snap),
            writer: tx,
            heartbeat_seen: Notify::new(),
            dirty: Notify::new(),
        }))
    }

    /// The state, locked. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, op: Op) {
        if self.writer.send(op).is_err() {
            tracing::error!(
                "the gateway database writer stopped; state changes are no longer persisted"
            );
        }
    }

    /// Persists the health of `name` (call after changing it).
    pub fn save_health(&self, name: &str, h: &UpstreamHealth) {
        if let Ok(json) = serde_json::to_string(h) {
            self.send(Op::Put(format!("health:{name}"), json));
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
            self.send(Op::Put("totals".to_string(), json));
        }
    }

    fn save_meta(&self, s: &Snapshot) {
        match s.last_seen_ms {
            Some(ms) => self.send(Op::Put("last_seen".to_string(), ms.to_string())),
            None => self.send(Op::Delete("last_seen".to_string())),
        }
        self.send(Op::Put("down".to_string(), s.down.to_string()));
    }

    /// Records a heartbeat; returns whether it ended an open downtime.
    pub fn heartbeat(&self, hb: Heartbeat) -> bool {
        let mut s = self.lock();
        s.last_seen_ms = Some(hb.received_at_ms);
        let recovered = std::mem::take(&mut s.down);
        if let Ok(json) = serde_json::to_string(&hb) {
            self.send(Op::Heartbeat(json));
        }
        s.heartbeats.push_back(hb);
        while s.heartbeats.len() > MAX_HEARTBEATS {
            s.heartbeats.pop_front();
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
            self.send(Op::Incident(json));
        }
        s.incidents.push_back(inc);
        while s.incidents.len() > MAX_INCIDENTS {
            s.incidents.pop_front();
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
        self.lock().incidents.clear();
        self.send(Op::ClearIncidents);
    }

    /// `POST /state/reset`: heartbeats, incidents, totals and last-seen are cleared.
    pub fn reset_state(&self) {
        let mut s = self.lock();
        s.heartbeats.clear();
        s.incidents.clear();
        s.totals = Totals::default();
        s.last_seen_ms = None;
        s.down = false;
        self.send(Op::ClearHeartbeats);
        self.send(Op::ClearIncidents);
        self.save_totals(&s.totals);
        self.save_meta(&s);
    }

    /// Waits until everything changed so far is on disk.
    pub async fn flush(&self) {
        self.write_dirty();
        let (tx, rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        let _ = rx.await;
    }
}

fn load(conn: &Connection) -> Result<Snapshot, StateError> {
    let mut s = Snapshot::default();
    let mut stmt = conn.prepare("SELECT key, value FROM kv")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (k, v) = row?;
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
    let mut stmt = conn.prepare(
        "SELECT body FROM (SELECT id, body FROM heartbeats ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    for body in stmt.query_map([MAX_HEARTBEATS as i64], |r| r.get::<_, String>(0))? {
        s.heartbeats.push_back(serde_json::from_str(&body?)?);
    }
    let mut stmt = conn.prepare(
        "SELECT body FROM (SELECT id, body FROM incidents ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    for body in stmt.query_map([MAX_INCIDENTS as i64], |r| r.get::<_, String>(0))? {
        s.incidents.push_back(serde_json::from_str(&body?)?);
    }
    Ok(s)
}

fn write_loop(conn: Connection, rx: std::sync::mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        // Apply everything already queued in one transaction.
        let mut ops = vec![first];
        ops.extend(rx.try_iter());
        let mut acks = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        tx.execute(
                            "INSERT INTO kv (key, value) VALUES (?1, ?2)
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            params![k, v],
                        )?;
                    }
                    Op::Delete(k) => {
                        tx.execute("DELETE FROM kv WHERE key = ?1", params![k])?;
                    }
                    Op::Heartbeat(b) => {
                        tx.execute("INSERT INTO heartbeats (body) VALUES (?1)", params![b])?;
                        tx.execute(
                            "DELETE FROM heartbeats WHERE id <= (SELECT MAX(id) FROM heartbeats) - ?1",
                            params![MAX_HEARTBEATS as i64],
                        )?;
                    }
                    Op::Incident(b) => {
                        tx.execute("INSERT INTO incidents (body) VALUES (?1)", params![b])?;
                        tx.execute(
                            "DELETE FROM incidents WHERE id <= (SELECT MAX(id) FROM incidents) - ?1",
                            params![MAX_INCIDENTS as i64],
                        )?;
                    }
                    Op::ClearIncidents => {
                        tx.execute("DELETE FROM incidents", [])?;
                    }
                    Op::ClearHeartbeats => {
                        tx.execute("DELETE FROM heartbeats", [])?;
                    }
                    Op::Flush(ack) => acks.push(ack),
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "failed to persist gateway state");
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
        let dir = tempfile_dir();
        let path = dir.join("gateway.db");
        {
            let st = GatewayState::open(&path).unwrap();
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
        let st = GatewayState::open(&path).unwrap();
        let s = st.lock();
        assert_eq!(s.heartbeats.len(), 1);
        assert_eq!(s.incidents[0].kind, "downtime");
        assert_eq!(s.health["a"].requests, 3);
        assert_eq!(s.totals.takeovers, 1);
        assert!(s.down);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kennel-gw-state-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

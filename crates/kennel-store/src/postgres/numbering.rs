//! Event ids on PostgreSQL: global, without gaps, and visible in id order, so a reader resuming
//! after an id (`events_after`, SSE's `Last-Event-ID` on any coordinator) never skips one.
//!
//! An event is stored in its change's transaction without an id ([`insert_events`]); until it
//! is numbered it carries its row's `seq` where its id goes. Once the transaction has
//! committed, [`PgStore::numbered`] asks `kennel_sequence_events` (migration 1) to number
//! every committed event still waiting, under a lock held until that numbering commits, and
//! puts the ids in place. So writers commit concurrently (their fsyncs are shared by
//! PostgreSQL's group commit) and only the numbering is serial, a batch of events at a time.
//! An event whose writer died before numbering it is numbered by the next numbering, or by
//! [`PgStore::number_waiting`].

use std::collections::HashMap;

use kennel_proto::api::{Daemon, Event, Task};
use sqlx::postgres::PgConnection;

use super::PgStore;
use crate::events::NewEvent;
use crate::rows::to_json;
use crate::{Applied, Ended, Millis, QueuedTask, Result, StoreError};

/// Stores `events` at `now` in the caller's transaction, in order; each is returned with its
/// row's `seq` as its id, to be replaced by [`PgStore::numbered`] once the transaction has
/// committed.
pub(super) async fn insert_events(
    conn: &mut PgConnection,
    events: Vec<NewEvent>,
    now: Millis,
) -> Result<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&NewEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
    let mut seqs: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO events (kind, task_id, daemon_id, data, at) \
         SELECT kind, task_id, daemon_id, data, $5 FROM UNNEST($1::text[], $2::text[], \
         $3::text[], $4::text[]) WITH ORDINALITY AS e(kind, task_id, daemon_id, data, n) \
         ORDER BY n RETURNING seq",
    )
    .bind(column(|e| Some(e.kind.clone())))
    .bind(column(|e| e.task_id.clone()))
    .bind(column(|e| e.daemon_id.clone()))
    .bind(column(|e| Some(to_json(&e.data))))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    // Rows are inserted, and their identities drawn, in the order of `n`.
    seqs.sort_unstable();
    Ok(events
        .into_iter()
        .zip(seqs)
        .map(|(e, seq)| e.stored(seq, now))
        .collect())
}

/// [`insert_events`] of one event.
pub(super) async fn insert_event(
    conn: &mut PgConnection,
    event: NewEvent,
    now: Millis,
) -> Result<Event> {
    let mut events = insert_events(conn, vec![event], now).await?;
    events
        .pop()
        .ok_or_else(|| StoreError::Corrupt("an event was not stored".into()))
}

/// A result holding events stored by [`insert_events`].
pub(super) trait Numbered {
    /// Every event in the result.
    fn events(&mut self) -> Vec<&mut Event>;
}

impl Numbered for Event {
    fn events(&mut self) -> Vec<&mut Event> {
        vec![self]
    }
}

impl<T: Numbered> Numbered for Option<T> {
    fn events(&mut self) -> Vec<&mut Event> {
        self.as_mut().map_or_else(Vec::new, Numbered::events)
    }
}

impl<T: Numbered> Numbered for Vec<T> {
    fn events(&mut self) -> Vec<&mut Event> {
        self.iter_mut().flat_map(Numbered::events).collect()
    }
}

impl Numbered for Applied {
    fn events(&mut self) -> Vec<&mut Event> {
        match self {
            Applied::Done { events, .. } => events.iter_mut().collect(),
            _ => Vec::new(),
        }
    }
}

impl Numbered for Ended {
    fn events(&mut self) -> Vec<&mut Event> {
        self.events.iter_mut().collect()
    }
}

impl Numbered for (Task, Event) {
    fn events(&mut self) -> Vec<&mut Event> {
        vec![&mut self.1]
    }
}

impl Numbered for (Daemon, Event) {
    fn events(&mut self) -> Vec<&mut Event> {
        vec![&mut self.1]
    }
}

impl Numbered for (QueuedTask, Event) {
    fn events(&mut self) -> Vec<&mut Event> {
        vec![&mut self.1]
    }
}

impl PgStore {
    /// Numbers the events of `out`, whose transaction has committed, and puts their ids in
    /// place.
    ///
    /// The change is stored whatever happens here. Should the numbering fail (the database
    /// went away in between), the events keep id 0 and a warning is logged rather than the
    /// committed change reported as failed; they are numbered by the next numbering, and
    /// `events_after` shows them with their ids.
    pub(super) async fn numbered<T: Numbered>(&self, mut out: T) -> Result<T> {
        let mut events = out.events();
        if events.is_empty() {
            return Ok(out);
        }
        let seqs: Vec<i64> = events.iter().map(|e| e.id).collect();
        let ids = match self.number(&seqs).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "failed to number stored events; they are numbered later"
                );
                HashMap::new()
            }
        };
        for event in &mut events {
            event.id = ids.get(&event.id).copied().unwrap_or(0);
        }
        drop(events);
        Ok(out)
    }

    /// Numbers the committed events still waiting for an id (those of a writer that died
    /// between committing and numbering).
    pub(super) async fn number_waiting(&self) -> Result<()> {
        self.number(&[]).await.map(drop)
    }

    /// Runs `kennel_sequence_events`; returns the ids of the events `seqs`.
    async fn number(&self, seqs: &[i64]) -> Result<HashMap<i64, i64>> {
        let rows: Vec<(i64, Option<i64>)> =
            sqlx::query_as("SELECT event_seq, event_id FROM kennel_sequence_events($1)")
                .bind(seqs)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, id)| Some((seq, id?)))
            .collect())
    }
}

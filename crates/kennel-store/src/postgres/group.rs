//! Group commit on PostgreSQL: a coordinator's writes that record events share transactions.
//!
//! A transaction costs the database a `BEGIN`, a commit (a flush to disk) and the statements
//! every transaction repeats (the events' insert). Run one call per transaction and each call
//! pays them all. Here each writer task of a store ([`WRITERS`]) takes every call already
//! queued (up to [`MAX_GROUP`]), runs them in one transaction, and stores all their events and
//! commits in one message at the end ([`finish`]).
//!
//! - **An answer means committed.** Callers get their answers only after the group commits.
//!   A call's events are handed out with provisional ids while it runs ([`Tx::events`]) and
//!   numbered once the group's events are stored ([`Numbered`]).
//! - **A failing call fails alone.** When a call fails inside a group, the group is rolled
//!   back (nothing of it was committed) and each of its calls is run again in a transaction of
//!   its own, so only the failing one gets an error. A call is therefore a function and the
//!   input it keeps ([`Work`]), run as often as needed. A failed commit is another matter:
//!   every call of the group gets the error and none is run again (whether it took effect is
//!   unknown when the answer was lost).
//! - **Reports run together.** A group's links' reports are decided as one batch ([`Merge`]);
//!   other calls run one by one. New tasks are not calls of a group: they have a
//!   writer of their own ([`super::new_tasks`]), one statement per batch.
//! - **No deadlock between groups.** A group first locks every task its calls will wait for,
//!   in id order, in one statement; calls then lock them again (a no-op) and the attempts
//!   under them. Two groups, of this coordinator or another, meet on task rows in the same
//!   order. A group of merged calls only skips that statement: its reports' first statement
//!   locks their tasks in id order. (Dispatches lock with `SKIP LOCKED`, which never waits.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kennel_proto::api::{Event, Task};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Executor, Postgres, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::new_tasks::{self, NewCall};
use super::{lifecycle, EventIds};
use crate::events::NewEvent;
use crate::rows::to_json;
use crate::{Applied, Ended, Millis, QueuedTask, Report, Result, StoreError};

/// Most calls in one group; bounds how long the first of them waits for its answer.
const MAX_GROUP: usize = 256;

/// Least time between the starts of two groups of reports only. A group costs the database
/// the same few statements and a commit however many reports it holds, and the writer starts
/// the next as soon as one ends: without a pause, a busy writer keeps the database busy with
/// small groups. With three coordinators at 1,000 tasks/s, 20 ms against 10 ms took
/// PostgreSQL from 74–84 % to 61–67 % of a core and p99 of submit → `spawnTask` from 7–9 to
/// 5–6 ms (docs/benchmarks.md, eighth sitting). A report's answer (the daemon's ack, the
/// task's new status) comes this much later at most, and only under load.
const REPORT_GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Writer tasks per store. One makes the largest groups, so the fewest statements per call:
/// with three coordinators at 1,000 tasks/s, p50 of submit → `spawnTask` fell from about 30
/// to 20 ms against two writers (docs/benchmarks.md, sixth sitting).
const WRITERS: usize = 1;

/// A future borrowing the transaction it runs in.
pub(super) type TxFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 't>>;

/// The transaction a group's calls run in, and the events they leave to be stored at its end.
///
/// The transaction is begun and ended by hand ([`commit`]), not with sqlx's `Transaction`, so
/// that its events' insert and its `COMMIT` go in one message ([`finish`]): the transaction
/// ends, and the rows it locked are free, one round trip to the coordinator sooner. (When event
/// ids came from a locked counter row, this took that round trip out of every other writer's
/// wait: 9552cee, docs/benchmarks.md.)
pub(super) struct Tx {
    conn: PoolConnection<Postgres>,
    events: Vec<(NewEvent, Millis)>,
    /// Begun and not yet ended: dropped so (a panic in a call, say), the connection is closed
    /// instead of going back to the pool inside the transaction.
    open: bool,
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

impl Tx {
    /// Queues `events`, recorded at `now`, to be stored when the group's calls have run;
    /// returns them with provisional ids (negative, numbered by [`Numbered`] after the store).
    pub(super) fn events(&mut self, events: Vec<NewEvent>, now: Millis) -> Vec<Event> {
        events
            .into_iter()
            .map(|e| {
                self.events.push((e.clone(), now));
                e.stored(-(self.events.len() as i64), now)
            })
            .collect()
    }

    /// Queues one event; see [`Tx::events`].
    pub(super) fn event(&mut self, event: NewEvent, now: Millis) -> Event {
        let mut events = self.events(vec![event], now);
        events.pop().expect("one event in, one out")
    }
}

impl std::ops::Deref for Tx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// An answer holding events whose ids are provisional until its group's events are stored.
pub(super) trait Numbered {
    /// Calls `f` on every event of the answer.
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event));
}

impl Numbered for Event {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        f(self)
    }
}

impl<T: Numbered> Numbered for Option<T> {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        if let Some(t) = self {
            t.each_event(f)
        }
    }
}

impl<T: Numbered> Numbered for Vec<T> {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        for t in self {
            t.each_event(f)
        }
    }
}

/// A row with its event: a created task, a dispatch, a daemon's change.
impl<T> Numbered for (T, Event) {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        f(&mut self.1)
    }
}

/// A created task's event, and its dispatch's if it was dispatched at once.
impl<T, U> Numbered for (T, Event, Option<(U, Event)>) {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        f(&mut self.1);
        if let Some((_, e)) = &mut self.2 {
            f(e)
        }
    }
}

impl Numbered for Ended {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        self.events.iter_mut().for_each(f)
    }
}

impl Numbered for Applied {
    fn each_event(&mut self, f: &mut dyn FnMut(&mut Event)) {
        if let Applied::Done { events, .. } = self {
            events.iter_mut().for_each(f)
        }
    }
}

/// Handle to a store's writer tasks; cloning shares them. They end when every handle is gone.
#[derive(Clone)]
pub(super) struct Writers {
    calls: mpsc::UnboundedSender<Box<dyn Job>>,
    new_tasks: mpsc::UnboundedSender<NewCall>,
}

impl Writers {
    /// Starts the writer tasks on `pool`, and the writer of new tasks on `new_tasks`. Must be
    /// called inside a tokio runtime.
    pub(super) fn start(pool: PgPool, new_tasks: PgPool) -> Writers {
        let (calls, queue) = mpsc::unbounded_channel();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..WRITERS {
            tokio::spawn(run(pool.clone(), queue.clone()));
        }
        let (sender, queue) = mpsc::unbounded_channel();
        tokio::spawn(new_tasks::run(new_tasks, queue));
        Writers {
            calls,
            new_tasks: sender,
        }
    }

    /// Runs `work` on `input` in a group's transaction and answers once the group has
    /// committed. `tasks` are the tasks `work` may lock (see the module's notes on deadlock).
    pub(super) async fn call<I, T>(
        &self,
        tasks: Vec<String>,
        input: I,
        work: Work<I, T>,
    ) -> Result<T>
    where
        I: Send + Sync + 'static,
        T: Numbered + Send + 'static,
    {
        self.send(tasks, input, work, None).await
    }

    /// Stores a new task, dispatched at once to `dispatch_to` if given, with the other new
    /// tasks queued meanwhile in one statement ([`new_tasks`]).
    pub(super) async fn create(
        &self,
        task: Task,
        dispatch_to: Option<String>,
        now: Millis,
    ) -> Result<CreatedDispatched> {
        let (reply, answer) = oneshot::channel();
        let call = NewCall {
            task,
            dispatch_to,
            now,
            reply,
        };
        ask(&self.new_tasks, call, answer).await
    }

    /// Applies a link's reports; in a group, with the group's other reports as one batch.
    pub(super) async fn apply(&self, batch: Vec<Report>, now: Millis) -> Result<Vec<Applied>> {
        let tasks = batch.iter().map(|r| r.task_id.clone()).collect();
        let merge: Merger<(Vec<Report>, Millis), Vec<Applied>> = |c| Merge {
            batch: &c.input.0,
            now: c.input.1,
            result: &mut c.result,
        };
        let work: Work<(Vec<Report>, Millis), Vec<Applied>> =
            |tx, (batch, now)| Box::pin(lifecycle::apply(tx, batch, *now));
        self.send(tasks, (batch, now), work, Some(merge)).await
    }

    async fn send<I, T>(
        &self,
        tasks: Vec<String>,
        input: I,
        work: Work<I, T>,
        merge: Option<Merger<I, T>>,
    ) -> Result<T>
    where
        I: Send + Sync + 'static,
        T: Numbered + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            tasks,
            input,
            work,
            merge,
            reply,
            result: None,
        };
        ask(&self.calls, Box::new(call), answer).await
    }
}

/// Queues `call` for a writer and waits for its answer.
async fn ask<C, T>(
    writer: &mpsc::UnboundedSender<C>,
    call: C,
    answer: oneshot::Receiver<Result<T>>,
) -> Result<T> {
    writer.send(call).map_err(|_| StoreError::WriterStopped)?;
    answer.await.map_err(|_| StoreError::WriterStopped)?
}

/// A link's reports, which a group decides as one batch with its other links' reports, and
/// where the call's result goes.
struct Merge<'a> {
    batch: &'a [Report],
    now: Millis,
    result: &'a mut Option<Result<Vec<Applied>>>,
}

/// A created task: the stored task, its creation's event, and, for one dispatched at once, the
/// dispatch with its event unless the state machine refused it.
pub(super) type CreatedDispatched = (QueuedTask, Event, Option<(Task, Event)>);

/// How a call that merges shows itself to its group.
type Merger<I, T> = for<'a> fn(&'a mut Call<I, T>) -> Merge<'a>;

/// One queued call, type-erased so calls of any answer type share the queue.
trait Job: Send {
    /// The caller stopped waiting: skip the work.
    fn abandoned(&self) -> bool;
    /// The tasks the work may lock.
    fn tasks(&self) -> &[String];
    /// Runs the work in `tx` and keeps its result; false when it failed.
    fn run<'t>(&'t mut self, tx: &'t mut Tx) -> Pin<Box<dyn Future<Output = bool> + Send + 't>>;
    /// The call as reports its group decides together, if it is.
    fn merge(&mut self) -> Option<Merge<'_>>;
    /// Gives the kept answer's provisional event ids the ids they were stored with.
    fn number(&mut self, ids: &EventIds);
    /// Sends the kept result, or `instead` when the transaction did not store it.
    fn answer(self: Box<Self>, instead: Option<StoreError>);
}

/// A call's work: run on its input in a group's transaction; run again, alone, when another
/// call of its group failed.
pub(super) type Work<I, T> = for<'t> fn(&'t mut Tx, &'t I) -> TxFuture<'t, T>;

struct Call<I, T> {
    tasks: Vec<String>,
    input: I,
    work: Work<I, T>,
    merge: Option<Merger<I, T>>,
    reply: oneshot::Sender<Result<T>>,
    result: Option<Result<T>>,
}

impl<I, T> Job for Call<I, T>
where
    I: Send + Sync + 'static,
    T: Numbered + Send + 'static,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn tasks(&self) -> &[String] {
        &self.tasks
    }

    fn run<'t>(&'t mut self, tx: &'t mut Tx) -> Pin<Box<dyn Future<Output = bool> + Send + 't>> {
        Box::pin(async move {
            let result = (self.work)(tx, &self.input).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn merge(&mut self) -> Option<Merge<'_>> {
        let merge = self.merge?;
        Some(merge(self))
    }

    fn number(&mut self, ids: &EventIds) {
        if let Some(Ok(answer)) = &mut self.result {
            answer.each_event(&mut |e| ids.number(e));
        }
    }

    fn answer(self: Box<Self>, instead: Option<StoreError>) {
        let result = match (instead, self.result) {
            (Some(e), _) => Err(e),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Aborted("the call was never run".into())),
        };
        let _ = self.reply.send(result);
    }
}

/// One writer: takes the calls queued at a time and commits them as one group.
async fn run(pool: PgPool, queue: Arc<Mutex<mpsc::UnboundedReceiver<Box<dyn Job>>>>) {
    let mut last_start: Option<tokio::time::Instant> = None;
    loop {
        let mut group = Vec::new();
        {
            let mut queue = queue.lock().await;
            match queue.recv().await {
                Some(job) => group.push(job),
                None => return,
            }
            // Under load, reports wait for the others that come within REPORT_GATHER of the
            // last group's start; any other call ends the wait.
            while let Some(wait) = last_start
                .filter(|_| {
                    group.len() < MAX_GROUP && group.iter_mut().all(|j| j.merge().is_some())
                })
                .and_then(|t| REPORT_GATHER.checked_sub(t.elapsed()))
            {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => break,
                    job = queue.recv() => match job {
                        Some(job) => group.push(job),
                        None => break,
                    },
                }
            }
            last_start = Some(tokio::time::Instant::now());
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
        }
        group.retain(|job| !job.abandoned());
        let outcome = commit(&pool, &mut group).await;
        if matches!(outcome, Outcome::CallFailed) && group.len() > 1 {
            // Nothing of the group was stored: each call again, on its own, so only the
            // failing one fails.
            for job in group {
                let mut alone = vec![job];
                let outcome = commit(&pool, &mut alone).await;
                answer_all(alone, &outcome);
            }
        } else {
            answer_all(group, &outcome);
        }
    }
}

/// Answers every call of `group` as `outcome` says: with its own result, or with the
/// transaction's error.
fn answer_all(group: Vec<Box<dyn Job>>, outcome: &Outcome) {
    for job in group {
        job.answer(match outcome {
            Outcome::Committed | Outcome::CallFailed => None,
            Outcome::NotStored(cause) => Some(StoreError::NotStored(cause.clone())),
            Outcome::Unknown(cause) => Some(StoreError::CommitUnknown(cause.clone())),
        });
    }
}

/// Runs the calls of a group: reports as one batch, the others one by one.
async fn run_merged(tx: &mut Tx, group: &mut [Box<dyn Job>]) -> Result<(), Outcome> {
    let (mut applies, mut others) = (Vec::new(), Vec::new());
    for job in group.iter_mut() {
        // Whether it merges is asked first; the borrow of the answer then ends.
        if job.merge().is_none() {
            others.push(job);
            continue;
        }
        if let Some(Merge { batch, now, result }) = job.merge() {
            applies.push((batch, now, result));
        }
    }
    if !applies.is_empty() {
        // The latest time among them is what their shared statements record.
        let now = applies.iter().map(|a| a.1).max().unwrap_or_default();
        let all: Vec<Report> = applies
            .iter()
            .flat_map(|(batch, _, _)| batch.iter().cloned())
            .collect();
        let mut applied = lifecycle::apply(tx, &all, now)
            .await
            .map_err(|_| Outcome::CallFailed)?
            .into_iter();
        for (batch, _, result) in applies {
            *result = Some(Ok(applied.by_ref().take(batch.len()).collect()));
        }
    }
    for job in others {
        if !job.run(tx).await {
            return Err(Outcome::CallFailed);
        }
    }
    Ok(())
}

/// How a group's transaction ended.
enum Outcome {
    Committed,
    /// A call failed (its result holds why); nothing was stored.
    CallFailed,
    /// The transaction failed outside the calls (connecting, locking, storing events);
    /// nothing was stored.
    NotStored(Arc<sqlx::Error>),
    /// The commit failed: whether it took effect is unknown, so no call may run again.
    Unknown(Arc<sqlx::Error>),
}

/// Runs `group` in one transaction: locks its tasks, runs each call, stores their events,
/// commits.
async fn commit(pool: &PgPool, group: &mut [Box<dyn Job>]) -> Outcome {
    if group.is_empty() {
        return Outcome::Committed;
    }
    let conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return Outcome::NotStored(Arc::new(e)),
    };
    let mut tx = Tx {
        conn,
        events: Vec::new(),
        open: true,
    };
    if let Err(e) = tx.execute("BEGIN").await {
        return Outcome::NotStored(Arc::new(e));
    }
    if let Err(outcome) = run_calls(&mut tx, group).await {
        roll_back(&mut tx).await;
        return outcome;
    }
    match finish(&mut tx.conn, &tx.events).await {
        Ok(ids) => {
            tx.open = false;
            group.iter_mut().for_each(|job| job.number(&ids));
            Outcome::Committed
        }
        // The database refused the insert or the commit: the transaction did not commit.
        Err(e @ sqlx::Error::Database(_)) => {
            roll_back(&mut tx).await;
            Outcome::NotStored(Arc::new(e))
        }
        // The connection failed: whether the commit took effect is unknown, and the
        // connection is closed (`tx.open`).
        Err(e) => Outcome::Unknown(Arc::new(e)),
    }
}

/// Ends a transaction that will not commit; a connection that cannot is closed, not reused.
async fn roll_back(tx: &mut Tx) {
    if tx.conn.execute("ROLLBACK").await.is_ok() {
        tx.open = false;
    }
}

/// Locks the group's tasks and runs its calls.
async fn run_calls(tx: &mut Tx, group: &mut [Box<dyn Job>]) -> Result<(), Outcome> {
    // Tasks first, in id order, before any other row a call of the group locks. A group of
    // calls that all merge needs no statement for it: the reports, decided as one batch, lock
    // their tasks in id order in their first statement.
    let mut tasks: Vec<String> = group.iter().flat_map(|j| j.tasks()).cloned().collect();
    let all_merge = group.iter_mut().all(|j| j.merge().is_some());
    if group.len() > 1 && !tasks.is_empty() && !all_merge {
        tasks.sort_unstable();
        tasks.dedup();
        sqlx::query("SELECT 1 FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(tasks)
            .execute(&mut **tx)
            .await
            .map_err(|e| Outcome::NotStored(Arc::new(e)))?;
    }
    if group.len() == 1 {
        match group[0].run(tx).await {
            true => Ok(()),
            false => Err(Outcome::CallFailed),
        }
    } else {
        run_merged(tx, group).await
    }
}

/// The group's events, handed to [`STORE_EVENTS_AND_COMMIT`] as a setting of the transaction.
#[derive(serde::Serialize)]
struct StoredEvent<'a> {
    kind: &'a str,
    task_id: Option<&'a str>,
    daemon_id: Option<&'a str>,
    data: String,
    at: Millis,
}

/// Stores the transaction's events and commits it, in one message of the simple protocol
/// (which takes no parameters: the events come from the setting `kennel.events`, which ends
/// with the transaction). Their ids are drawn as [`super::insert_events`] draws them; answers
/// them, one row each, in order.
const STORE_EVENTS_AND_COMMIT: &str = "\
WITH e AS (SELECT * FROM ROWS FROM (json_to_recordset(current_setting('kennel.events')::json) \
 AS (kind text, task_id text, daemon_id text, data text, at bigint)) WITH ORDINALITY \
 AS e(kind, task_id, daemon_id, data, at, n)), \
d AS (SELECT draw_event_ids((SELECT count(*) FROM e)::integer) AS ids), \
stored AS (INSERT INTO events (id, kind, task_id, daemon_id, data, at) \
 SELECT d.ids[e.n], e.kind, e.task_id, e.daemon_id, e.data, e.at FROM d, e) \
SELECT id FROM d, UNNEST(d.ids) WITH ORDINALITY AS i(id, n) ORDER BY n; \
COMMIT";

/// Stores `events` and commits; returns their ids.
async fn finish(conn: &mut PgConnection, events: &[(NewEvent, Millis)]) -> sqlx::Result<EventIds> {
    if events.is_empty() {
        conn.execute("COMMIT").await?;
        return Ok(EventIds::default());
    }
    let stored: Vec<StoredEvent<'_>> = events
        .iter()
        .map(|(e, at)| StoredEvent {
            kind: &e.kind,
            task_id: e.task_id.as_deref(),
            daemon_id: e.daemon_id.as_deref(),
            data: to_json(&e.data),
            at: *at,
        })
        .collect();
    sqlx::query("SELECT length(set_config('kennel.events', $1, true))")
        .bind(to_json(&stored))
        .execute(&mut *conn)
        .await?;
    // Every answer is read, the commit's included: an error it reports must not be missed.
    let rows = conn.fetch_all(STORE_EVENTS_AND_COMMIT).await?;
    let ids = rows
        .iter()
        .map(|row| row.try_get::<i64, _>(0))
        .collect::<sqlx::Result<Vec<i64>>>()?;
    if ids.len() != events.len() {
        return Err(sqlx::Error::Protocol(format!(
            "{} event ids for {} events",
            ids.len(),
            events.len()
        )));
    }
    Ok(EventIds(ids))
}

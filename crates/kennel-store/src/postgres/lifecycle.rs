//! The task lifecycle on PostgreSQL: dispatches, daemon reports, server-side ends, pause and
//! resume, and the end of queued tasks, each inside the caller's transaction.
//!
//! Every function first locks the rows it decides on and reads their facts in the same
//! statement: task rows in id order (and, for reports, then their attempt rows), so that
//! coordinators writing at once wait for each other instead of deciding on stale facts, and
//! two transactions locking overlapping sets cannot deadlock. A dispatch alone does not wait:
//! it skips tasks another transaction holds (`SKIP LOCKED`), since every coordinator tries to
//! dispatch the same queued tasks and the one holding a task is deciding it. Every transaction
//! that changes an attempt holds its task's lock first. Then [`machine`] decides and the
//! verdict is written; events are queued on the [`Tx`] and stored when the group's calls have
//! run. Nothing here decides a transition itself.
//!
//! A batch is decided in memory before it is written: the facts a decision changes are
//! carried forward to the next item of the batch ([`AttemptFacts::after`],
//! [`TaskFacts::dispatched`]), and the writes go in a few statements for the whole batch.

use std::collections::HashMap;

use kennel_proto::api::{Event, Task};
use kennel_proto::TaskStatus;
use sqlx::postgres::PgConnection;

use super::group::Tx;
use super::{tasks_of, Query};
use crate::events::NewEvent;
use crate::machine::{self, AttemptFacts, Change, Ending, Outcome, Step, TaskAfter, TaskFacts};
use crate::rows::{self, columns};
use crate::{Applied, Dispatch, EndAttempt, Ended, Millis, Report, Result, StoreError};

/// How to take a row lock another transaction holds.
#[derive(Clone, Copy)]
enum Wait {
    /// Wait for it: the decision needs this row.
    Yes,
    /// Leave the row out: another coordinator is deciding on it.
    SkipLocked,
}

/// Locks the tasks `ids` in id order and reads their facts; a task that does not exist (or,
/// with [`Wait::SkipLocked`], that another transaction holds) is missing from the answer.
async fn lock_tasks(
    conn: &mut PgConnection,
    ids: Vec<String>,
    wait: Wait,
) -> Result<HashMap<String, TaskFacts>> {
    let lock = match wait {
        Wait::Yes => "FOR UPDATE",
        Wait::SkipLocked => "FOR UPDATE SKIP LOCKED",
    };
    let sql = format!(
        concat!(
            "SELECT ",
            columns!(task_facts),
            ", id FROM tasks WHERE id = ANY($1) ORDER BY id {}"
        ),
        lock
    );
    let rows = sqlx::query(&sql).bind(ids).fetch_all(&mut *conn).await?;
    let mut facts = HashMap::with_capacity(rows.len());
    for row in &rows {
        facts.insert(rows::Columns::text(row, 4)?, rows::task_facts(row, 0)?);
    }
    Ok(facts)
}

/// Locks one task and reads its facts; `None` when there is no such task.
async fn lock_task(conn: &mut PgConnection, id: &str) -> Result<Option<TaskFacts>> {
    Ok(lock_tasks(conn, vec![id.to_string()], Wait::Yes)
        .await?
        .remove(id))
}

/// Runs a statement that returns at most one `columns!(task)` row.
async fn one_task(conn: &mut PgConnection, query: Query<'_>) -> Result<Option<Task>> {
    let mut tasks = tasks_of(&query.fetch_all(&mut *conn).await?)?;
    Ok(tasks.pop().map(|q| q.task))
}

/// Records the `task.status` event of a changed task; what a server-side change answers.
fn ended(tx: &mut Tx, task: Option<Task>, now: Millis) -> Option<Ended> {
    let task = task?;
    let events = vec![tx.event(NewEvent::task_status(&task), now)];
    Some(Ended { task, events })
}

/// See [`crate::Store::dispatch`].
pub(super) async fn dispatch(
    tx: &mut Tx,
    batch: &[Dispatch],
    now: Millis,
) -> Result<Vec<Option<(Task, Event)>>> {
    let ids = batch.iter().map(|d| d.task_id.clone()).collect();
    // A task another coordinator is dispatching (or ending) right now is left to it: this
    // coordinator neither waits for that transaction nor gets the task.
    let facts = lock_tasks(tx, ids, Wait::SkipLocked).await?;
    dispatch_decided(tx, batch, facts, now).await
}

/// Dispatches `batch` on the tasks' `facts` (locked, or new): what the machine lets go out is
/// written, with its events.
async fn dispatch_decided(
    tx: &mut Tx,
    batch: &[Dispatch],
    mut facts: HashMap<String, TaskFacts>,
    now: Millis,
) -> Result<Vec<Option<(Task, Event)>>> {
    // The dispatches the machine lets go out, by their place in the batch.
    let mut out: Vec<Option<Step>> = Vec::with_capacity(batch.len());
    for d in batch {
        let step = facts.get_mut(&d.task_id).and_then(|f| {
            let to = machine::dispatch(f, d.attempt)?;
            *f = f.dispatched(d.attempt, to);
            Some(to)
        });
        out.push(step);
    }
    let going: Vec<(&Dispatch, Step)> = batch
        .iter()
        .zip(&out)
        .filter_map(|(d, step)| step.map(|s| (d, s)))
        .collect();
    if going.is_empty() {
        return Ok(vec![None; batch.len()]);
    }
    let column = |f: fn(&(&Dispatch, Step)) -> String| going.iter().map(f).collect::<Vec<_>>();
    let written = sqlx::query(concat!(
        "WITH d AS (SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], \
         $5::text[]) AS d(tid, n, holder, task_status, attempt_status)), \
         a AS (INSERT INTO attempts (task_id, attempt, daemon_id, status, dispatched_at) \
         SELECT tid, n, holder, attempt_status, $6 FROM d) \
         UPDATE tasks SET status = d.task_status, attempt = d.n, daemon_id = d.holder, \
         updated_at = $6, error = NULL FROM d WHERE id = d.tid RETURNING ",
        columns!(task)
    ))
    .bind(column(|(d, _)| d.task_id.clone()))
    .bind(
        going
            .iter()
            .map(|(d, _)| i64::from(d.attempt))
            .collect::<Vec<_>>(),
    )
    .bind(column(|(d, _)| d.daemon_id.clone()))
    .bind(column(|(_, s)| s.task.as_str().to_string()))
    .bind(column(|(_, s)| s.attempt.as_str().to_string()))
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    let mut tasks: HashMap<String, Task> = tasks_of(&written)?
        .into_iter()
        .map(|q| (q.task.id.clone(), q.task))
        .collect();
    let mut dispatched = Vec::with_capacity(going.len());
    for (d, _) in &going {
        let task = tasks.remove(&d.task_id).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "task {} vanished while it was dispatched",
                d.task_id
            ))
        })?;
        dispatched.push(task);
    }
    let events = dispatched.iter().map(NewEvent::task_status).collect();
    let mut events = tx.events(events, now).into_iter();
    let mut dispatched = dispatched.into_iter();
    Ok(out
        .into_iter()
        .map(|step| {
            step?;
            Some((dispatched.next()?, events.next()?))
        })
        .collect())
}

/// The facts of one report's attempt and task, as locked and as carried forward; and, per
/// task, what a finish writes as it was when locked.
#[derive(Default)]
struct Facts {
    tasks: HashMap<String, TaskFacts>,
    attempts: HashMap<(String, u32), AttemptFacts>,
    unfinished: HashMap<String, Unfinished>,
}

/// The columns of a task a finish writes and a live change does not, as they were before the
/// batch: with them, the task after a live change that a finish of the same batch follows is
/// the finished task as written, with these and the live change's status.
#[derive(Default)]
struct Unfinished {
    finished_at: Option<String>,
    error: Option<String>,
    exit_code: Option<i32>,
    branch: Option<String>,
    commit: Option<String>,
}

impl Unfinished {
    /// `finished`, as it was after the live change to `status` that the finish followed.
    fn before(&self, finished: &Task, status: TaskStatus) -> Task {
        let mut task = finished.clone();
        task.status = status;
        task.finished_at = self.finished_at.clone();
        task.error = self.error.clone();
        task.exit_code = self.exit_code;
        task.branch = self.branch.clone();
        task.commit = self.commit.clone();
        task
    }
}

impl Facts {
    fn get(&self, r: &Report) -> Option<AttemptFacts> {
        let attempt = self.attempts.get(&(r.task_id.clone(), r.attempt))?;
        let task = *self.tasks.get(&r.task_id)?;
        Some(AttemptFacts {
            task,
            ..attempt.clone()
        })
    }

    fn set(&mut self, r: &Report, facts: AttemptFacts) {
        self.tasks.insert(r.task_id.clone(), facts.task);
        self.attempts.insert((r.task_id.clone(), r.attempt), facts);
    }
}

/// Locks the tasks and attempts `batch` reports on and reads their facts.
async fn lock_attempts(conn: &mut PgConnection, batch: &[Report]) -> Result<Facts> {
    let mut wanted: Vec<(&str, u32)> = batch
        .iter()
        .map(|r| (r.task_id.as_str(), r.attempt))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let rows = sqlx::query(concat!(
        "SELECT ",
        columns!(attempt_facts),
        ", a.task_id, a.attempt, t.finished_at, t.error, t.exit_code, t.branch, t.commit_sha \
         FROM UNNEST($1::text[], $2::bigint[]) AS w(tid, n) \
         JOIN tasks t ON t.id = w.tid JOIN attempts a ON a.task_id = w.tid AND a.attempt = w.n \
         ORDER BY t.id, a.attempt FOR UPDATE OF t, a"
    ))
    .bind(
        wanted
            .iter()
            .map(|(t, _)| t.to_string())
            .collect::<Vec<_>>(),
    )
    .bind(
        wanted
            .iter()
            .map(|(_, n)| i64::from(*n))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut facts = Facts::default();
    for row in &rows {
        let f = rows::attempt_facts(row, 0)?;
        let task_id = rows::Columns::text(row, 7)?;
        let attempt = rows::Columns::int(row, 8)? as u32;
        let unfinished = Unfinished {
            finished_at: rows::Columns::int_opt(row, 9)?.map(crate::rfc3339),
            error: rows::Columns::text_opt(row, 10)?,
            exit_code: rows::Columns::int_opt(row, 11)?.map(|v| v as i32),
            branch: rows::Columns::text_opt(row, 12)?,
            commit: rows::Columns::text_opt(row, 13)?,
        };
        facts.unfinished.insert(task_id.clone(), unfinished);
        facts.tasks.insert(task_id.clone(), f.task);
        facts.attempts.insert((task_id, attempt), f);
    }
    Ok(facts)
}

/// Chunks of output to store, column by column (for `UNNEST`).
#[derive(Default)]
struct Chunks {
    task_ids: Vec<String>,
    attempts: Vec<i64>,
    seqs: Vec<i64>,
    streams: Vec<String>,
    texts: Vec<String>,
    partial: Vec<bool>,
}

/// The highest seq applied per attempt of a batch of reports.
type Seqs = HashMap<(String, u32), u64>;

/// What a batch of reports writes beyond its status changes: output, and the applied seqs of
/// attempts whose status does not change (a status change writes its attempt's seq itself).
#[derive(Default)]
struct Appended {
    output: Chunks,
    seqs: Seqs,
}

impl Appended {
    fn chunk(&mut self, r: &Report, chunk: &machine::Chunk<'_>) {
        let (stream, text, is_partial) = rows::stored_chunk(chunk);
        let o = &mut self.output;
        o.task_ids.push(r.task_id.clone());
        o.attempts.push(i64::from(r.attempt));
        o.seqs.push(r.seq as i64);
        o.streams.push(stream.as_str().to_string());
        o.texts.push(text.into_owned());
        o.partial.push(is_partial);
    }

    /// Stores the output and the seqs, in one statement; none when there is neither.
    async fn write(self, conn: &mut PgConnection, now: Millis) -> Result<()> {
        if self.seqs.is_empty() && self.output.task_ids.is_empty() {
            return Ok(());
        }
        let (tasks, attempts, seqs): (Vec<String>, Vec<i64>, Vec<i64>) = self
            .seqs
            .into_iter()
            .map(|((t, a), s)| (t, i64::from(a), s as i64))
            .fold(Default::default(), |mut acc, (t, a, s)| {
                acc.0.push(t);
                acc.1.push(a);
                acc.2.push(s);
                acc
            });
        let o = self.output;
        sqlx::query(
            "WITH o AS (INSERT INTO task_output \
             (task_id, attempt, seq, stream, output, is_partial, at) \
             SELECT tid, n, seq, stream, output, partial, $7 FROM UNNEST($1::text[], \
             $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bool[]) \
             AS o(tid, n, seq, stream, output, partial)) \
             UPDATE attempts SET last_seq = s.seq FROM UNNEST($8::text[], $9::bigint[], \
             $10::bigint[]) AS s(tid, n, seq) WHERE task_id = s.tid AND attempt = s.n",
        )
        .bind(o.task_ids)
        .bind(o.attempts)
        .bind(o.seqs)
        .bind(o.streams)
        .bind(o.texts)
        .bind(o.partial)
        .bind(now)
        .bind(tasks)
        .bind(attempts)
        .bind(seqs)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// The status changes of a batch of reports, in rounds: a round holds at most one change per
/// task, so its live changes are written in one statement and its finishes in another (ends,
/// which are rare, one by one); a task's next change goes to the next round. Each change keeps
/// the place of its report in the batch, which orders the events.
///
/// A finish right after a live change of the same attempt takes the live change's place
/// instead (the live change's slot becomes `None`): a finish writes every column a live change
/// does, so the attempt and the task are written once, and the task after the live change is
/// derived from the finished one ([`Unfinished::before`]). An agent that starts and ends
/// between two batches of its link (quick tasks) costs one write instead of two.
#[derive(Default)]
struct Round<'r> {
    live: Vec<Option<(usize, &'r Report, Step, bool)>>,
    finish: Vec<(usize, &'r Report, Step, Outcome<'r>)>,
    end: Vec<(usize, &'r Report, Ending)>,
}

/// The round for the next change of `r`'s task: the one after its latest change's.
fn next_round<'a, 'r>(
    rounds: &'a mut Vec<Round<'r>>,
    last_round: &mut HashMap<&'r str, usize>,
    r: &'r Report,
) -> &'a mut Round<'r> {
    let n = last_round.get(r.task_id.as_str()).map_or(0, |n| n + 1);
    last_round.insert(&r.task_id, n);
    if rounds.len() <= n {
        rounds.push(Round::default());
    }
    &mut rounds[n]
}

/// See [`crate::Store::apply`].
pub(super) async fn apply(tx: &mut Tx, batch: &[Report], now: Millis) -> Result<Vec<Applied>> {
    let mut facts = lock_attempts(tx, batch).await?;
    let mut appended = Appended::default();
    let mut seqs = Seqs::new();
    let mut out = Vec::with_capacity(batch.len());
    let mut rounds: Vec<Round<'_>> = Vec::new();
    // The round of each task's latest change.
    let mut last_round: HashMap<&str, usize> = HashMap::new();
    // Where each task's latest change is, when it is a live change: its round and slot.
    let mut last_live: HashMap<&str, (usize, usize)> = HashMap::new();
    // Live changes a finish took the place of: the place of each one's report, the task's
    // status after it, and the place of the finish's report.
    let mut folded: Vec<(usize, TaskStatus, usize)> = Vec::new();
    for r in batch {
        let now_facts = facts.get(r);
        let change = match machine::report(now_facts.as_ref(), r).into_change(r) {
            Ok(change) => change,
            Err(answer) => {
                out.push(answer);
                continue;
            }
        };
        if let Some(f) = &now_facts {
            facts.set(r, f.after(r.seq, &change));
        }
        seqs.insert((r.task_id.clone(), r.attempt), r.seq);
        let at = out.len();
        out.push(Applied::Done {
            events: Vec::new(),
            task: None,
        });
        match change {
            Change::Seq => {}
            Change::Output(chunk) => appended.chunk(r, &chunk),
            Change::Live { to, started } => {
                let round = next_round(&mut rounds, &mut last_round, r);
                round.live.push(Some((at, r, to, started)));
                let slot = round.live.len() - 1;
                last_live.insert(&r.task_id, (last_round[r.task_id.as_str()], slot));
            }
            Change::End(ending) => {
                last_live.remove(r.task_id.as_str());
                next_round(&mut rounds, &mut last_round, r)
                    .end
                    .push((at, r, ending))
            }
            Change::Finish { to, outcome } => {
                let live = last_live.remove(r.task_id.as_str());
                let same_attempt = |(n, slot): (usize, usize)| {
                    let taken = rounds[n].live[slot].filter(|l| l.1.attempt == r.attempt)?;
                    Some((n, slot, taken))
                };
                match live.and_then(same_attempt) {
                    Some((n, slot, (live_at, _, step, _))) => {
                        rounds[n].live[slot] = None;
                        folded.push((live_at, step.task, at));
                        rounds[n].finish.push((at, r, to, outcome));
                    }
                    None => next_round(&mut rounds, &mut last_round, r)
                        .finish
                        .push((at, r, to, outcome)),
                }
            }
        }
    }
    // Seqs a status change writes need no statement of their own.
    appended.seqs = seqs.clone();
    for round in &rounds {
        let live = round.live.iter().flatten().map(|c| c.1);
        let finish = round.finish.iter().map(|c| c.1);
        for r in live.chain(finish).chain(round.end.iter().map(|c| c.1)) {
            appended.seqs.remove(&(r.task_id.clone(), r.attempt));
        }
    }
    appended.write(tx, now).await?;
    let mut changed = Vec::new();
    for round in rounds {
        let live: Vec<_> = round.live.into_iter().flatten().collect();
        changed.extend(write_live(tx, &live, &seqs, now).await?);
        changed.extend(write_finish(tx, &round.finish, &seqs, now).await?);
        for (at, r, ending) in &round.end {
            let seq = seqs.get(&(r.task_id.clone(), r.attempt)).copied();
            let attempt = (r.task_id.as_str(), r.attempt);
            let task = write_ending(tx, attempt, ending, seq.unwrap_or(r.seq), now).await?;
            changed.extend(task.map(|t| (*at, t)));
        }
    }
    // The tasks after the live changes a finish took the place of.
    let finished: HashMap<usize, &Task> = changed.iter().map(|(at, t)| (*at, t)).collect();
    let before: Vec<(usize, Task)> = folded
        .into_iter()
        .filter_map(|(live_at, status, finish_at)| {
            let task = finished.get(&finish_at)?;
            let unfinished = facts.unfinished.get(&task.id);
            let task = unfinished.map_or_else(
                || Unfinished::default().before(task, status),
                |u| u.before(task, status),
            );
            Some((live_at, task))
        })
        .collect();
    changed.extend(before);
    // Events in the order of the reports that caused them, as one report at a time would.
    changed.sort_by_key(|(at, _)| *at);
    for (at, task) in changed {
        let event = tx.event(NewEvent::task_status(&task), now);
        if let Applied::Done { events, task: t } = &mut out[at] {
            events.push(event);
            *t = Some(Box::new(task));
        }
    }
    Ok(out)
}

/// What every batched status change binds, column by column: the task, the attempt, the
/// attempt's and the task's new statuses, the highest seq the batch applies to the attempt;
/// and the place of each task's report in the batch.
struct Steps<'a> {
    tasks: Vec<&'a str>,
    attempts: Vec<i64>,
    attempt_statuses: Vec<&'static str>,
    task_statuses: Vec<&'static str>,
    seqs: Vec<i64>,
    places: HashMap<&'a str, usize>,
}

impl<'a> Steps<'a> {
    fn of(changes: impl Iterator<Item = (usize, &'a Report, Step)>, seqs: &Seqs) -> Steps<'a> {
        let mut steps = Steps {
            tasks: Vec::new(),
            attempts: Vec::new(),
            attempt_statuses: Vec::new(),
            task_statuses: Vec::new(),
            seqs: Vec::new(),
            places: HashMap::new(),
        };
        for (at, r, step) in changes {
            let seq = seqs.get(&(r.task_id.clone(), r.attempt)).copied();
            steps.tasks.push(&r.task_id);
            steps.attempts.push(i64::from(r.attempt));
            steps.attempt_statuses.push(step.attempt.as_str());
            steps.task_statuses.push(step.task.as_str());
            steps.seqs.push(seq.unwrap_or(r.seq) as i64);
            steps.places.insert(&r.task_id, at);
        }
        steps
    }
}

/// Moves live attempts and their tasks (one change per task) to their steps; returns each
/// changed task with the place of its report.
async fn write_live(
    conn: &mut PgConnection,
    changes: &[(usize, &Report, Step, bool)],
    seqs: &Seqs,
    now: Millis,
) -> Result<Vec<(usize, Task)>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let steps = Steps::of(changes.iter().map(|c| (c.0, c.1, c.2)), seqs);
    let query = sqlx::query(concat!(
        "WITH c AS (SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], \
         $5::bool[], $7::bigint[]) AS c(tid, n, attempt_status, task_status, started, applied)), \
         a AS (UPDATE attempts SET status = c.attempt_status, started_at = CASE WHEN c.started \
         THEN COALESCE(started_at, $6) ELSE started_at END, \
         last_seq = GREATEST(last_seq, c.applied) FROM c \
         WHERE task_id = c.tid AND attempt = c.n) \
         UPDATE tasks SET status = c.task_status, updated_at = $6 FROM c WHERE id = c.tid \
         RETURNING ",
        columns!(task)
    ))
    .bind(steps.tasks)
    .bind(steps.attempts)
    .bind(steps.attempt_statuses)
    .bind(steps.task_statuses)
    .bind(changes.iter().map(|c| c.3).collect::<Vec<_>>())
    .bind(now)
    .bind(steps.seqs);
    changed_tasks(conn, query, &steps.places).await
}

/// Ends attempts and their tasks as their agents finished (one change per task), with what
/// they reported; returns each changed task with the place of its report.
async fn write_finish(
    conn: &mut PgConnection,
    changes: &[(usize, &Report, Step, Outcome<'_>)],
    seqs: &Seqs,
    now: Millis,
) -> Result<Vec<(usize, Task)>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let steps = Steps::of(changes.iter().map(|c| (c.0, c.1, c.2)), seqs);
    let text = |f: for<'o> fn(&'o Outcome<'o>) -> Option<&'o str>| {
        changes.iter().map(|c| f(&c.3)).collect::<Vec<_>>()
    };
    let query = sqlx::query(concat!(
        "WITH c AS (SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], \
         $5::text[], $6::bigint[], $7::text[], $8::text[], $10::bigint[]) AS c(tid, n, \
         attempt_status, task_status, why, code, br, sha, applied)), \
         a AS (UPDATE attempts SET status = c.attempt_status, finished_at = $9, error = c.why, \
         started_at = COALESCE(started_at, $9), last_seq = GREATEST(last_seq, c.applied) \
         FROM c WHERE task_id = c.tid AND attempt = c.n) \
         UPDATE tasks SET status = c.task_status, updated_at = $9, finished_at = $9, \
         error = c.why, exit_code = c.code, branch = c.br, commit_sha = c.sha \
         FROM c WHERE id = c.tid RETURNING ",
        columns!(task)
    ))
    .bind(steps.tasks)
    .bind(steps.attempts)
    .bind(steps.attempt_statuses)
    .bind(steps.task_statuses)
    .bind(text(|o| o.error))
    .bind(
        changes
            .iter()
            .map(|c| c.3.exit_code.map(i64::from))
            .collect::<Vec<_>>(),
    )
    .bind(text(|o| o.branch))
    .bind(text(|o| o.commit))
    .bind(now)
    .bind(steps.seqs);
    changed_tasks(conn, query, &steps.places).await
}

/// Runs a statement returning `columns!(task)` rows of changed tasks, and pairs each with the
/// place of the report that changed it.
async fn changed_tasks(
    conn: &mut PgConnection,
    query: Query<'_>,
    places: &HashMap<&str, usize>,
) -> Result<Vec<(usize, Task)>> {
    let rows = query.fetch_all(&mut *conn).await?;
    let mut changed = Vec::with_capacity(rows.len());
    for q in tasks_of(&rows)? {
        let at = places.get(q.task.id.as_str()).copied().ok_or_else(|| {
            StoreError::Corrupt(format!("task {} changed without a report", q.task.id))
        })?;
        changed.push((at, q.task));
    }
    Ok(changed)
}

/// Writes how an attempt ended, with `seq` as its highest applied seq if higher (0 for an end
/// no report made), and what became of its task; returns the task after.
async fn write_ending(
    conn: &mut PgConnection,
    (task_id, attempt): (&str, u32),
    ending: &Ending,
    seq: u64,
    now: Millis,
) -> Result<Option<Task>> {
    let (sql, status) = match ending.task {
        TaskAfter::Requeued => (
            concat!(
                "WITH a AS (UPDATE attempts SET status = $1, finished_at = $2, error = $3, \
                 last_seq = GREATEST(last_seq, $9) WHERE task_id = $4 AND attempt = $5) \
                 UPDATE tasks SET status = $6, daemon_id = NULL, updated_at = $2, error = $7, \
                 returned_attempts = returned_attempts + $8 WHERE id = $4 RETURNING ",
                columns!(task)
            ),
            TaskStatus::Queued,
        ),
        TaskAfter::Ended(status) => (
            concat!(
                "WITH a AS (UPDATE attempts SET status = $1, finished_at = $2, error = $3, \
                 last_seq = GREATEST(last_seq, $9) WHERE task_id = $4 AND attempt = $5) \
                 UPDATE tasks SET status = $6, updated_at = $2, finished_at = $2, error = $7, \
                 returned_attempts = returned_attempts + $8 WHERE id = $4 RETURNING ",
                columns!(task)
            ),
            status,
        ),
    };
    let query = sqlx::query(sql)
        .bind(ending.attempt.as_str())
        .bind(now)
        .bind(&ending.reason)
        .bind(task_id)
        .bind(i64::from(attempt))
        .bind(status.as_str())
        .bind(&ending.error)
        .bind(i64::from(ending.returned))
        .bind(seq as i64);
    one_task(conn, query).await
}

/// See [`crate::Store::end_attempt`].
pub(super) async fn end_attempt(
    tx: &mut Tx,
    end: &EndAttempt<'_>,
    now: Millis,
) -> Result<Option<Ended>> {
    let facts = lock_task(tx, end.task_id).await?;
    let Some(ending) = facts.and_then(|f| machine::end_attempt(&f, end)) else {
        return Ok(None);
    };
    let task = write_ending(tx, (end.task_id, end.attempt), &ending, 0, now).await?;
    Ok(ended(tx, task, now))
}

/// Ends a task that is still queued as `status`; see [`crate::Store::cancel_queued`].
pub(super) async fn end_queued(
    tx: &mut Tx,
    task_id: &str,
    status: TaskStatus,
    error: &str,
    now: Millis,
) -> Result<Option<Ended>> {
    let facts = lock_task(tx, task_id).await?;
    let Some(status) = facts.and_then(|f| machine::end_queued(&f, status)) else {
        return Ok(None);
    };
    let query = sqlx::query(concat!(
        "UPDATE tasks SET status = $1, updated_at = $2, finished_at = $2, error = $3 \
         WHERE id = $4 RETURNING ",
        columns!(task)
    ))
    .bind(status.as_str())
    .bind(now)
    .bind(error)
    .bind(task_id);
    let task = one_task(tx, query).await?;
    Ok(ended(tx, task, now))
}

/// See [`crate::Store::set_paused`].
pub(super) async fn set_paused(
    tx: &mut Tx,
    task_id: &str,
    attempt: u32,
    paused: bool,
    now: Millis,
) -> Result<Option<Ended>> {
    let facts = lock_task(tx, task_id).await?;
    let Some(to) = facts.and_then(|f| machine::pause(&f, attempt, paused)) else {
        return Ok(None);
    };
    let query = sqlx::query(concat!(
        "WITH a AS (UPDATE attempts SET status = $1 WHERE task_id = $2 AND attempt = $3) \
         UPDATE tasks SET status = $4, updated_at = $5 WHERE id = $2 RETURNING ",
        columns!(task)
    ))
    .bind(to.attempt.as_str())
    .bind(task_id)
    .bind(i64::from(attempt))
    .bind(to.task.as_str())
    .bind(now);
    let task = one_task(tx, query).await?;
    Ok(ended(tx, task, now))
}

//! The task and attempt state machine: given what the store holds about a task and its
//! attempt, and one input, it decides what happens. Inputs are a daemon report (accepted,
//! output, progress, a status change, a refusal, completion), a server-side end of an attempt
//! (an expired lease, a daemon lost past its reattach grace, a cancel), a pause or resume asked
//! through the API, a dispatch, and the end of a task that is still queued.
//!
//! It owns fencing (which daemon and which attempt may still report), the exactly-once seq
//! rules, every status transition and the retry policy. It is pure: no I/O, no SQL, no clock.
//! A backend loads the facts, calls it and writes what it decided, so every backend applies
//! the same rules; it must never decide a transition itself.

use kennel_proto::link::OutputStream;
use kennel_proto::{AttemptStatus, TaskStatus};

use crate::{Applied, Effect, EndAttempt, Report, Retry};

/// What the store holds about a task, as far as the rules need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskFacts {
    pub status: TaskStatus,
    /// The current attempt: counts every dispatch, and is the fencing token (0 before the
    /// first dispatch).
    pub attempt: u32,
    /// How many charged attempts the task may use.
    pub max_attempts: u32,
    /// Attempts that ended through no fault of the task; not charged against `max_attempts`.
    pub returned_attempts: u32,
}

/// What the store holds about the attempt a report names, and about its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFacts {
    /// The daemon the attempt was dispatched to; only it may report on the attempt.
    pub holder: String,
    pub status: AttemptStatus,
    /// The highest report seq applied for this attempt (0 before the first).
    pub last_seq: u64,
    pub task: TaskFacts,
}

impl TaskFacts {
    /// The facts once a dispatch as `attempt`, decided by [`dispatch`], is written.
    pub fn dispatched(self, attempt: u32, to: Step) -> TaskFacts {
        TaskFacts {
            status: to.task,
            attempt,
            ..self
        }
    }
}

impl AttemptFacts {
    /// The facts once `change`, decided by [`report`] for the report numbered `seq`, is
    /// written: what a backend that decides several reports before writing them reads for
    /// the next report of the same attempt or task.
    pub fn after(&self, seq: u64, change: &Change<'_>) -> AttemptFacts {
        let mut f = self.clone();
        f.last_seq = seq;
        match change {
            Change::Seq | Change::Output(_) => {}
            Change::Live { to, .. } | Change::Finish { to, .. } => {
                f.status = to.attempt;
                f.task.status = to.task;
            }
            Change::End(ending) => {
                f.status = ending.attempt;
                f.task.status = match ending.task {
                    TaskAfter::Requeued => TaskStatus::Queued,
                    TaskAfter::Ended(status) => status,
                };
                f.task.returned_attempts += u32::from(ending.returned);
            }
        }
        f
    }
}

/// What to do with one daemon report.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict<'r> {
    /// Apply it: record its seq and make the change.
    Apply(Change<'r>),
    /// Seq already applied: acknowledge again, change nothing.
    Duplicate { last_seq: u64 },
    /// Seq ahead of the next expected one: change nothing; the daemon resends from `expected`.
    Gap { expected: u64 },
    /// Fenced off: change nothing.
    Stale(Stale),
}

impl<'r> Verdict<'r> {
    /// The change to write, or the answer to give without writing anything.
    pub fn into_change(self, r: &Report) -> Result<Change<'r>, Applied> {
        match self {
            Verdict::Apply(change) => Ok(change),
            Verdict::Duplicate { last_seq } => Err(Applied::Duplicate { last_seq }),
            Verdict::Gap { expected } => Err(Applied::Gap { expected }),
            Verdict::Stale(stale) => Err(Applied::Stale {
                reason: stale.reason(r),
            }),
        }
    }
}

/// Why a report is fenced off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The task has no attempt with this number.
    NoAttempt,
    /// The attempt was dispatched to another daemon.
    OtherHolder,
    /// The attempt is not the task's current one, or has ended.
    Over {
        /// The attempt's status.
        status: AttemptStatus,
        /// The task's current attempt.
        current: u32,
    },
}

impl Stale {
    /// The reason given back to the daemon.
    pub fn reason(self, r: &Report) -> String {
        match self {
            Stale::NoAttempt => format!("task {} has no attempt {}", r.task_id, r.attempt),
            Stale::OtherHolder => format!(
                "attempt {} of task {} is held by another daemon",
                r.attempt, r.task_id
            ),
            Stale::Over { status, current } => format!(
                "attempt {} of task {} is over ({status}); the current attempt is {current}",
                r.attempt, r.task_id
            ),
        }
    }
}

/// What an applied report changes, beyond recording its seq.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<'r> {
    /// Nothing else: a repeated accept, a status the attempt already has, a status this
    /// coordinator does not act on, or an end that finds the task no longer holding the attempt.
    Seq,
    /// Store a chunk of the attempt's output.
    Output(Chunk<'r>),
    /// The live attempt and its task move to `to`.
    Live {
        to: Step,
        /// Whether the agent started now: the attempt's start time is set unless it is set.
        started: bool,
    },
    /// The attempt ends without completing.
    End(Ending),
    /// The agent finished: the attempt and its task end as `to`, with the report's details.
    Finish { to: Step, outcome: Outcome<'r> },
}

/// A chunk of output as reported, to store in the order of its seq.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk<'r> {
    Output {
        stream: OutputStream,
        text: &'r str,
        is_partial: bool,
    },
    Progress {
        summary: &'r str,
        detail: Option<&'r serde_json::Value>,
    },
}

/// What a finished agent reported, stored on the task as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome<'r> {
    pub error: Option<&'r str>,
    pub exit_code: Option<i32>,
    pub branch: Option<&'r str>,
    pub commit: Option<&'r str>,
}

/// The statuses a task and its attempt move to together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub task: TaskStatus,
    pub attempt: AttemptStatus,
}

impl Step {
    const DISPATCHED: Step = Step {
        task: TaskStatus::Dispatched,
        attempt: AttemptStatus::Dispatched,
    };
    const RUNNING: Step = Step {
        task: TaskStatus::Running,
        attempt: AttemptStatus::Running,
    };
    const PAUSED: Step = Step {
        task: TaskStatus::Paused,
        attempt: AttemptStatus::Paused,
    };
}

/// How a live attempt ends when it does not complete, and what becomes of its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// What the attempt becomes.
    pub attempt: AttemptStatus,
    /// Why, stored on the attempt.
    pub reason: String,
    /// Whether the attempt is counted in `returned_attempts`: not charged to the task.
    pub returned: bool,
    /// Whether the task is queued again or ends.
    pub task: TaskAfter,
    /// The task's error.
    pub error: String,
}

/// What becomes of a task whose attempt ended without completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAfter {
    /// Back to the queue, held by no daemon, for the next attempt.
    Requeued,
    /// Ends in this terminal status.
    Ended(TaskStatus),
}

/// Decides what a daemon report does to the attempt it names (`None` when the task has no
/// such attempt).
///
/// The checks run in this order: the holder (a report from another daemon is stale whatever
/// its seq); the seq against the last applied one (a resent report of an attempt that has
/// ended since is still acknowledged as a duplicate); whether the attempt is current and live;
/// and last whether the seq is the next one.
pub fn report<'r>(facts: Option<&AttemptFacts>, r: &'r Report) -> Verdict<'r> {
    let Some(f) = facts else {
        return Verdict::Stale(Stale::NoAttempt);
    };
    if f.holder != r.daemon_id {
        return Verdict::Stale(Stale::OtherHolder);
    }
    if r.seq <= f.last_seq {
        return Verdict::Duplicate {
            last_seq: f.last_seq,
        };
    }
    if f.task.attempt != r.attempt || !f.status.is_live() {
        return Verdict::Stale(Stale::Over {
            status: f.status,
            current: f.task.attempt,
        });
    }
    // No overflow: `r.seq > f.last_seq`, so `f.last_seq < u64::MAX`.
    let expected = f.last_seq + 1;
    if r.seq != expected {
        return Verdict::Gap { expected };
    }
    Verdict::Apply(change(f, r))
}

/// What an in-order report on the current live attempt changes.
fn change<'r>(f: &AttemptFacts, r: &'r Report) -> Change<'r> {
    match &r.effect {
        Effect::Output {
            stream,
            output,
            is_partial,
        } => Change::Output(Chunk::Output {
            stream: *stream,
            text: output,
            is_partial: *is_partial,
        }),
        Effect::Progress { summary, detail } => Change::Output(Chunk::Progress {
            summary,
            detail: detail.as_ref(),
        }),
        Effect::Accepted if f.status == AttemptStatus::Dispatched => Change::Live {
            to: Step::RUNNING,
            started: true,
        },
        Effect::Accepted => Change::Seq,
        // `newStatus` names what the attempt became on the daemon, in the attempt's own words.
        Effect::StatusChange { new_status } => match new_status {
            Some(AttemptStatus::Lost) => {
                // The daemon lost the agent's process (it crashed and restarted): like a
                // vanished daemon, the attempt ends as lost and the task is retried while
                // attempts remain.
                let reason = format!(
                    "daemon {} lost the agent's process (the daemon restarted mid-task)",
                    r.daemon_id
                );
                let status = AttemptStatus::Lost;
                end_by_report(f, r, status, &reason, Retry::Charged, TaskStatus::Lost)
            }
            Some(AttemptStatus::Returned) => {
                // The daemon stopped cleanly before the agent finished and hands the attempt
                // back: the task is retried without using up an attempt.
                let reason = format!(
                    "daemon {} shut down before the agent finished; the task goes back to the \
                     queue (not counted against its attempts)",
                    r.daemon_id
                );
                let status = AttemptStatus::Returned;
                end_by_report(f, r, status, &reason, Retry::Free, TaskStatus::Failed)
            }
            Some(AttemptStatus::Running) if f.status != AttemptStatus::Running => Change::Live {
                to: Step::RUNNING,
                started: false,
            },
            Some(AttemptStatus::Paused) if f.status != AttemptStatus::Paused => Change::Live {
                to: Step::PAUSED,
                started: false,
            },
            _ => Change::Seq,
        },
        Effect::Rejected { reason, code } => {
            let reason = format!("rejected by daemon {}: {reason}", r.daemon_id);
            // A full or stopping daemon says nothing about the task: not charged.
            let retry = match code {
                Some(c) if c.is_daemon_state() => Retry::Free,
                _ => Retry::Charged,
            };
            let status = AttemptStatus::Rejected;
            end_by_report(f, r, status, &reason, retry, TaskStatus::Failed)
        }
        // A failed agent is not retried: it ran, and its failure is the task's result.
        Effect::Complete {
            success,
            error,
            exit_code,
            branch,
            commit,
        } => Change::Finish {
            to: if *success {
                Step {
                    task: TaskStatus::Completed,
                    attempt: AttemptStatus::Completed,
                }
            } else {
                Step {
                    task: TaskStatus::Failed,
                    attempt: AttemptStatus::Failed,
                }
            },
            outcome: Outcome {
                error: error.as_deref(),
                exit_code: *exit_code,
                branch: branch.as_deref(),
                commit: commit.as_deref(),
            },
        },
    }
}

/// A report that ends the attempt: the same rules as a server-side end.
fn end_by_report<'r>(
    f: &AttemptFacts,
    r: &Report,
    status: AttemptStatus,
    reason: &str,
    retry: Retry,
    terminal: TaskStatus,
) -> Change<'r> {
    let end = EndAttempt {
        task_id: &r.task_id,
        attempt: r.attempt,
        status,
        reason,
        retry,
        terminal,
    };
    end_attempt(&f.task, &end).map_or(Change::Seq, Change::End)
}

/// Decides how a live attempt ends without completing, from the server side (an expired
/// lease, a daemon lost past its grace, a cancel) or by a daemon's report. `None` when the
/// attempt is not the task's current one or the task holds no live attempt: nothing changes.
///
/// The task is queued again unless `retry` is [`Retry::Never`] or, for [`Retry::Charged`],
/// the charged attempts (this one included) have reached `max_attempts`; then it ends as
/// `terminal`, and a charged end says so in its error.
pub fn end_attempt(task: &TaskFacts, end: &EndAttempt<'_>) -> Option<Ending> {
    if task.attempt != end.attempt || !task.status.is_active() {
        return None;
    }
    let charged = i64::from(task.attempt) - i64::from(task.returned_attempts);
    let requeue = match end.retry {
        Retry::Never => false,
        Retry::Charged => charged < i64::from(task.max_attempts),
        Retry::Free => true,
    };
    let (after, error) = if requeue {
        (TaskAfter::Requeued, end.reason.to_string())
    } else if end.retry == Retry::Charged {
        let error = format!(
            "{}; no attempts left ({charged} of {})",
            end.reason, task.max_attempts
        );
        (TaskAfter::Ended(end.terminal), error)
    } else {
        (TaskAfter::Ended(end.terminal), end.reason.to_string())
    };
    Some(Ending {
        attempt: end.status,
        reason: end.reason.to_string(),
        returned: end.retry == Retry::Free,
        task: after,
        error,
    })
}

/// Decides whether a queued task can go out as `attempt`: only as the attempt after its
/// current one, so a second dispatch of the same attempt (a race) does nothing.
pub fn dispatch(task: &TaskFacts, attempt: u32) -> Option<Step> {
    let next = attempt.checked_sub(1) == Some(task.attempt);
    (task.status == TaskStatus::Queued && next).then_some(Step::DISPATCHED)
}

/// Decides a pause (`paused`) or resume asked through the API: only a running attempt
/// pauses and only a paused one resumes, and only the current attempt.
pub fn pause(task: &TaskFacts, attempt: u32, paused: bool) -> Option<Step> {
    let (from, to) = if paused {
        (TaskStatus::Running, Step::PAUSED)
    } else {
        (TaskStatus::Paused, Step::RUNNING)
    };
    (task.attempt == attempt && task.status == from).then_some(to)
}

/// Decides ending a task that no attempt holds (cancelled before it ran, or nothing could
/// run it in time) as `to`: only a queued task ends this way.
pub fn end_queued(task: &TaskFacts, to: TaskStatus) -> Option<TaskStatus> {
    (task.status == TaskStatus::Queued).then_some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kennel_proto::link::{RejectCode, RETURNED};

    const ALL_RETRIES: [Retry; 3] = [Retry::Never, Retry::Charged, Retry::Free];

    /// A task at `attempt`, whose status mirrors its live attempt's, with 3 attempts allowed.
    fn task(status: TaskStatus, attempt: u32) -> TaskFacts {
        TaskFacts {
            status,
            attempt,
            max_attempts: 3,
            returned_attempts: 0,
        }
    }

    /// Attempt 1 of a task, held by `d1`, in `status`, with `last_seq` applied.
    fn attempt(status: AttemptStatus, last_seq: u64) -> AttemptFacts {
        let task_status = match status {
            AttemptStatus::Dispatched => TaskStatus::Dispatched,
            AttemptStatus::Running => TaskStatus::Running,
            AttemptStatus::Paused => TaskStatus::Paused,
            AttemptStatus::Completed => TaskStatus::Completed,
            AttemptStatus::Cancelled => TaskStatus::Cancelled,
            AttemptStatus::Lost => TaskStatus::Lost,
            AttemptStatus::Failed
            | AttemptStatus::Rejected
            | AttemptStatus::Expired
            | AttemptStatus::Returned => TaskStatus::Failed,
        };
        AttemptFacts {
            holder: "d1".into(),
            status,
            last_seq,
            task: task(task_status, 1),
        }
    }

    /// The same attempt, at `used` of `max` dispatches of which `returned` were not charged.
    fn counted(mut f: AttemptFacts, used: u32, max: u32, returned: u32) -> AttemptFacts {
        f.task.attempt = used;
        f.task.max_attempts = max;
        f.task.returned_attempts = returned;
        f
    }

    /// A report from `d1` on attempt 1 of `t1`.
    fn report_of(seq: u64, effect: Effect) -> Report {
        Report {
            daemon_id: "d1".into(),
            task_id: "t1".into(),
            attempt: 1,
            seq,
            effect,
        }
    }

    fn output(text: &str) -> Effect {
        Effect::Output {
            stream: OutputStream::Stdout,
            output: text.into(),
            is_partial: false,
        }
    }

    fn status_change(new_status: &str) -> Effect {
        Effect::StatusChange {
            new_status: new_status.parse().ok(),
        }
    }

    fn rejected(code: Option<RejectCode>) -> Effect {
        Effect::Rejected {
            reason: "no".into(),
            code,
        }
    }

    fn complete(success: bool) -> Effect {
        Effect::Complete {
            success,
            error: (!success).then(|| "exit 1".into()),
            exit_code: Some(i32::from(!success)),
            branch: Some("kennel/t1".into()),
            commit: Some("abc".into()),
        }
    }

    fn ending<'r>(
        attempt: AttemptStatus,
        reason: &str,
        returned: bool,
        task: TaskAfter,
    ) -> Change<'r> {
        ending_with_error(attempt, reason, returned, task, reason)
    }

    fn ending_with_error<'r>(
        attempt: AttemptStatus,
        reason: &str,
        returned: bool,
        task: TaskAfter,
        error: &str,
    ) -> Change<'r> {
        Change::End(Ending {
            attempt,
            reason: reason.into(),
            returned,
            task,
            error: error.into(),
        })
    }

    const LOST: &str = "daemon d1 lost the agent's process (the daemon restarted mid-task)";
    const RETURNED_REASON: &str = "daemon d1 shut down before the agent finished; the task goes \
                                   back to the queue (not counted against its attempts)";
    const REJECTED: &str = "rejected by daemon d1: no";

    #[test]
    fn reports_are_fenced_deduplicated_and_ordered() {
        use AttemptStatus as A;
        let over = |status, current| Verdict::Stale(Stale::Over { status, current });
        let mut other = attempt(A::Running, 3);
        other.holder = "d2".into();
        let mut superseded = counted(attempt(A::Running, 0), 2, 3, 0);
        superseded.status = A::Lost;
        let cases: Vec<(&str, Option<AttemptFacts>, Report, Verdict)> = vec![
            (
                "no such attempt",
                None,
                report_of(1, Effect::Accepted),
                Verdict::Stale(Stale::NoAttempt),
            ),
            (
                "another daemon's attempt, new seq",
                Some(other.clone()),
                report_of(4, output("x")),
                Verdict::Stale(Stale::OtherHolder),
            ),
            (
                "another daemon's attempt, old seq: the holder is checked first",
                Some(other),
                report_of(2, output("x")),
                Verdict::Stale(Stale::OtherHolder),
            ),
            (
                "seq already applied",
                Some(attempt(A::Running, 3)),
                report_of(2, output("x")),
                Verdict::Duplicate { last_seq: 3 },
            ),
            (
                "the last applied seq again",
                Some(attempt(A::Running, 3)),
                report_of(3, output("x")),
                Verdict::Duplicate { last_seq: 3 },
            ),
            (
                "a resent report of an attempt that has completed since",
                Some(attempt(A::Completed, 4)),
                report_of(4, complete(true)),
                Verdict::Duplicate { last_seq: 4 },
            ),
            (
                "seq 0 before anything was applied",
                Some(attempt(A::Dispatched, 0)),
                report_of(0, Effect::Accepted),
                Verdict::Duplicate { last_seq: 0 },
            ),
            (
                "a late report of a completed attempt",
                Some(attempt(A::Completed, 4)),
                report_of(5, output("late")),
                over(A::Completed, 1),
            ),
            (
                "a late report of a cancelled task",
                Some(attempt(A::Cancelled, 2)),
                report_of(3, output("late")),
                over(A::Cancelled, 1),
            ),
            (
                "a late completion of a cancelled task",
                Some(attempt(A::Cancelled, 2)),
                report_of(3, complete(true)),
                over(A::Cancelled, 1),
            ),
            (
                "an attempt the task has moved on from",
                Some(superseded),
                report_of(1, Effect::Accepted),
                over(A::Lost, 2),
            ),
            (
                "a stale attempt is reported as such before a gap",
                Some(attempt(A::Expired, 0)),
                report_of(7, Effect::Accepted),
                over(A::Expired, 1),
            ),
            (
                "a seq past the next one",
                Some(attempt(A::Running, 2)),
                report_of(4, output("x")),
                Verdict::Gap { expected: 3 },
            ),
            (
                "the first report skipped",
                Some(attempt(A::Dispatched, 0)),
                report_of(2, Effect::Accepted),
                Verdict::Gap { expected: 1 },
            ),
            (
                "the next seq",
                Some(attempt(A::Running, 2)),
                report_of(3, output("x")),
                Verdict::Apply(Change::Output(Chunk::Output {
                    stream: OutputStream::Stdout,
                    text: "x",
                    is_partial: false,
                })),
            ),
        ];
        for (name, facts, r, want) in &cases {
            assert_eq!(report(facts.as_ref(), r), *want, "{name}");
        }
    }

    #[test]
    fn a_report_on_an_ended_attempt_is_stale_whatever_it_says() {
        let effects = [
            Effect::Accepted,
            output("x"),
            status_change("paused"),
            status_change("lost"),
            status_change(RETURNED),
            rejected(Some(RejectCode::AtCapacity)),
            complete(false),
        ];
        for status in AttemptStatus::ALL.into_iter().filter(|s| !s.is_live()) {
            for effect in &effects {
                let r = report_of(6, effect.clone());
                assert_eq!(
                    report(Some(&attempt(status, 5)), &r),
                    Verdict::Stale(Stale::Over { status, current: 1 }),
                    "{status}: {effect:?}"
                );
            }
        }
    }

    #[test]
    fn every_report_on_a_live_attempt_changes_what_it_says() {
        use AttemptStatus as A;
        use TaskAfter::{Ended, Requeued};
        let detail = serde_json::json!({"tool": "Edit"});
        let live = |to, started| Verdict::Apply(Change::Live { to, started });
        let apply = Verdict::Apply;
        let no_attempts_left =
            |reason: &str, n: u32| format!("{reason}; no attempts left ({n} of 3)");
        let cases: Vec<(&str, AttemptFacts, Effect, Verdict)> = vec![
            // Output never changes a status.
            (
                "output",
                attempt(A::Paused, 0),
                Effect::Output {
                    stream: OutputStream::Stderr,
                    output: "e".into(),
                    is_partial: true,
                },
                apply(Change::Output(Chunk::Output {
                    stream: OutputStream::Stderr,
                    text: "e",
                    is_partial: true,
                })),
            ),
            (
                "progress with detail",
                attempt(A::Running, 0),
                Effect::Progress {
                    summary: "editing".into(),
                    detail: Some(detail.clone()),
                },
                apply(Change::Output(Chunk::Progress {
                    summary: "editing",
                    detail: Some(&detail),
                })),
            ),
            (
                "progress without detail",
                attempt(A::Dispatched, 0),
                Effect::Progress {
                    summary: "cloning".into(),
                    detail: None,
                },
                apply(Change::Output(Chunk::Progress {
                    summary: "cloning",
                    detail: None,
                })),
            ),
            // Accepting starts the attempt, once.
            (
                "accepted",
                attempt(A::Dispatched, 0),
                Effect::Accepted,
                live(Step::RUNNING, true),
            ),
            (
                "accepted again",
                attempt(A::Running, 0),
                Effect::Accepted,
                apply(Change::Seq),
            ),
            (
                "accepted while paused",
                attempt(A::Paused, 0),
                Effect::Accepted,
                apply(Change::Seq),
            ),
            // Pause and resume as the daemon reports them.
            (
                "paused",
                attempt(A::Running, 0),
                status_change("paused"),
                live(Step::PAUSED, false),
            ),
            (
                "paused before accepting",
                attempt(A::Dispatched, 0),
                status_change("paused"),
                live(Step::PAUSED, false),
            ),
            (
                "paused again",
                attempt(A::Paused, 0),
                status_change("paused"),
                apply(Change::Seq),
            ),
            (
                "resumed",
                attempt(A::Paused, 0),
                status_change("running"),
                live(Step::RUNNING, false),
            ),
            (
                "running before accepting: no start time",
                attempt(A::Dispatched, 0),
                status_change("running"),
                live(Step::RUNNING, false),
            ),
            (
                "running again",
                attempt(A::Running, 0),
                status_change("running"),
                apply(Change::Seq),
            ),
            (
                "a status this coordinator does not act on",
                attempt(A::Running, 0),
                status_change("completed"),
                apply(Change::Seq),
            ),
            (
                "a status it does not know",
                attempt(A::Running, 0),
                status_change("levitating"),
                apply(Change::Seq),
            ),
            // Lost: the daemon restarted and the agent died with it. Charged.
            (
                "lost with attempts left",
                attempt(A::Running, 0),
                status_change("lost"),
                apply(ending(A::Lost, LOST, false, Requeued)),
            ),
            (
                "lost on the last attempt",
                counted(attempt(A::Running, 0), 3, 3, 0),
                status_change("lost"),
                apply(ending_with_error(
                    A::Lost,
                    LOST,
                    false,
                    Ended(TaskStatus::Lost),
                    &no_attempts_left(LOST, 3),
                )),
            ),
            (
                "lost on the third dispatch, one of them returned",
                counted(attempt(A::Running, 0), 3, 3, 1),
                status_change("lost"),
                apply(ending(A::Lost, LOST, false, Requeued)),
            ),
            (
                "lost while paused",
                attempt(A::Paused, 0),
                status_change("lost"),
                apply(ending(A::Lost, LOST, false, Requeued)),
            ),
            // Returned on a clean stop: never charged, whatever is left.
            (
                "returned",
                attempt(A::Running, 0),
                status_change(RETURNED),
                apply(ending(A::Returned, RETURNED_REASON, true, Requeued)),
            ),
            (
                "returned on the last attempt",
                counted(attempt(A::Running, 0), 3, 3, 0),
                status_change(RETURNED),
                apply(ending(A::Returned, RETURNED_REASON, true, Requeued)),
            ),
            // Refusals: typed capacity and shutdown refusals are free, the rest are charged.
            (
                "refused at capacity on the last attempt",
                counted(attempt(A::Dispatched, 0), 3, 3, 0),
                rejected(Some(RejectCode::AtCapacity)),
                apply(ending(A::Rejected, REJECTED, true, Requeued)),
            ),
            (
                "refused while shutting down on the last attempt",
                counted(attempt(A::Dispatched, 0), 3, 3, 0),
                rejected(Some(RejectCode::ShuttingDown)),
                apply(ending(A::Rejected, REJECTED, true, Requeued)),
            ),
            (
                "refused without a code, attempts left",
                attempt(A::Dispatched, 0),
                rejected(None),
                apply(ending(A::Rejected, REJECTED, false, Requeued)),
            ),
            (
                "refused without a code on the last attempt",
                counted(attempt(A::Dispatched, 0), 3, 3, 0),
                rejected(None),
                apply(ending_with_error(
                    A::Rejected,
                    REJECTED,
                    false,
                    Ended(TaskStatus::Failed),
                    &no_attempts_left(REJECTED, 3),
                )),
            ),
            (
                "refused with a code from a newer daemon: charged",
                counted(attempt(A::Dispatched, 0), 3, 3, 0),
                rejected(Some(RejectCode::Other)),
                apply(ending_with_error(
                    A::Rejected,
                    REJECTED,
                    false,
                    Ended(TaskStatus::Failed),
                    &no_attempts_left(REJECTED, 3),
                )),
            ),
            // Completion ends the task either way; a failure is not retried.
            (
                "completed",
                attempt(A::Running, 0),
                complete(true),
                apply(Change::Finish {
                    to: Step {
                        task: TaskStatus::Completed,
                        attempt: A::Completed,
                    },
                    outcome: Outcome {
                        error: None,
                        exit_code: Some(0),
                        branch: Some("kennel/t1"),
                        commit: Some("abc"),
                    },
                }),
            ),
            (
                "failed with attempts left",
                attempt(A::Running, 0),
                complete(false),
                apply(Change::Finish {
                    to: Step {
                        task: TaskStatus::Failed,
                        attempt: A::Failed,
                    },
                    outcome: Outcome {
                        error: Some("exit 1"),
                        exit_code: Some(1),
                        branch: Some("kennel/t1"),
                        commit: Some("abc"),
                    },
                }),
            ),
            (
                "failed on the last attempt",
                counted(attempt(A::Running, 0), 3, 3, 0),
                complete(false),
                apply(Change::Finish {
                    to: Step {
                        task: TaskStatus::Failed,
                        attempt: A::Failed,
                    },
                    outcome: Outcome {
                        error: Some("exit 1"),
                        exit_code: Some(1),
                        branch: Some("kennel/t1"),
                        commit: Some("abc"),
                    },
                }),
            ),
            (
                "completed before its acceptance was applied",
                attempt(A::Dispatched, 0),
                complete(true),
                apply(Change::Finish {
                    to: Step {
                        task: TaskStatus::Completed,
                        attempt: A::Completed,
                    },
                    outcome: Outcome {
                        error: None,
                        exit_code: Some(0),
                        branch: Some("kennel/t1"),
                        commit: Some("abc"),
                    },
                }),
            ),
            (
                "failed while paused",
                attempt(A::Paused, 0),
                complete(false),
                apply(Change::Finish {
                    to: Step {
                        task: TaskStatus::Failed,
                        attempt: A::Failed,
                    },
                    outcome: Outcome {
                        error: Some("exit 1"),
                        exit_code: Some(1),
                        branch: Some("kennel/t1"),
                        commit: Some("abc"),
                    },
                }),
            ),
        ];
        for (name, facts, effect, want) in cases {
            // The next report on the task's current attempt.
            let mut r = report_of(facts.last_seq + 1, effect);
            r.attempt = facts.task.attempt;
            assert_eq!(report(Some(&facts), &r), want, "{name}");
        }
    }

    #[test]
    fn an_ending_report_on_a_task_that_no_longer_holds_the_attempt_only_records_its_seq() {
        // The attempt row still says live, but the task has moved on (a cancel that ended the
        // task first): the report is applied and changes nothing but its seq.
        for status in [TaskStatus::Cancelled, TaskStatus::Queued] {
            let mut f = attempt(AttemptStatus::Running, 0);
            f.task.status = status;
            for effect in [
                status_change("lost"),
                status_change(RETURNED),
                rejected(None),
            ] {
                let r = report_of(1, effect);
                assert_eq!(
                    report(Some(&f), &r),
                    Verdict::Apply(Change::Seq),
                    "{status}: {:?}",
                    r.effect
                );
            }
        }
    }

    #[test]
    fn stale_reasons_name_the_attempt_and_why() {
        let r = report_of(9, Effect::Accepted);
        assert_eq!(Stale::NoAttempt.reason(&r), "task t1 has no attempt 1");
        assert_eq!(
            Stale::OtherHolder.reason(&r),
            "attempt 1 of task t1 is held by another daemon"
        );
        let over = Stale::Over {
            status: AttemptStatus::Lost,
            current: 2,
        };
        assert_eq!(
            over.reason(&r),
            "attempt 1 of task t1 is over (lost); the current attempt is 2"
        );
    }

    /// The server-side ends: expired leases, lost daemons, cancels.
    #[test]
    fn server_side_ends_requeue_while_attempts_remain() {
        use AttemptStatus as A;
        use TaskAfter::{Ended, Requeued};
        let end = |status, retry, terminal| EndAttempt {
            task_id: "t1",
            attempt: 2,
            status,
            reason: "why",
            retry,
            terminal,
        };
        let expired = end(A::Expired, Retry::Charged, TaskStatus::Failed);
        let grace_over = end(A::Lost, Retry::Charged, TaskStatus::Lost);
        let never_received = end(A::Lost, Retry::Free, TaskStatus::Lost);
        let cancel = end(A::Cancelled, Retry::Never, TaskStatus::Cancelled);
        let at = |status, attempt, max, returned| TaskFacts {
            status,
            attempt,
            max_attempts: max,
            returned_attempts: returned,
        };
        let ended = |attempt, returned, task, error: &str| {
            Some(Ending {
                attempt,
                reason: "why".into(),
                returned,
                task,
                error: error.into(),
            })
        };
        let cases: Vec<(&str, TaskFacts, &EndAttempt, Option<Ending>)> = vec![
            (
                "lease expired, attempts left",
                at(TaskStatus::Dispatched, 2, 3, 0),
                &expired,
                ended(A::Expired, false, Requeued, "why"),
            ),
            (
                "lease expired on the last attempt",
                at(TaskStatus::Dispatched, 2, 2, 0),
                &expired,
                ended(
                    A::Expired,
                    false,
                    Ended(TaskStatus::Failed),
                    "why; no attempts left (2 of 2)",
                ),
            ),
            (
                "lease expired on the second dispatch, the first returned",
                at(TaskStatus::Dispatched, 2, 2, 1),
                &expired,
                ended(A::Expired, false, Requeued, "why"),
            ),
            (
                "reattach grace over, attempts left",
                at(TaskStatus::Running, 2, 3, 0),
                &grace_over,
                ended(A::Lost, false, Requeued, "why"),
            ),
            (
                "reattach grace over on the last attempt",
                at(TaskStatus::Paused, 2, 2, 0),
                &grace_over,
                ended(
                    A::Lost,
                    false,
                    Ended(TaskStatus::Lost),
                    "why; no attempts left (2 of 2)",
                ),
            ),
            (
                "lost before the daemon received it, on the last attempt: free",
                at(TaskStatus::Dispatched, 2, 1, 0),
                &never_received,
                ended(A::Lost, true, Requeued, "why"),
            ),
            (
                "cancelled with attempts left",
                at(TaskStatus::Running, 2, 3, 0),
                &cancel,
                ended(A::Cancelled, false, Ended(TaskStatus::Cancelled), "why"),
            ),
            (
                "cancelled while paused",
                at(TaskStatus::Paused, 2, 3, 0),
                &cancel,
                ended(A::Cancelled, false, Ended(TaskStatus::Cancelled), "why"),
            ),
            (
                "an attempt the task has moved on from",
                at(TaskStatus::Dispatched, 3, 3, 0),
                &expired,
                None,
            ),
            (
                "a task requeued since",
                at(TaskStatus::Queued, 2, 3, 0),
                &grace_over,
                None,
            ),
        ];
        for (name, facts, end, want) in &cases {
            assert_eq!(end_attempt(facts, end), *want, "{name}");
        }
        // A task that holds no live attempt never changes, whatever the end.
        for status in TaskStatus::ALL.into_iter().filter(|s| !s.is_active()) {
            for retry in ALL_RETRIES {
                let e = end(A::Lost, retry, TaskStatus::Lost);
                assert_eq!(end_attempt(&at(status, 2, 3, 0), &e), None, "{status}");
            }
        }
    }

    #[test]
    fn dispatch_takes_a_queued_task_to_its_next_attempt_only() {
        let queued = |attempt| task(TaskStatus::Queued, attempt);
        let cases = [
            ("first dispatch", queued(0), 1, true),
            ("after a requeue", queued(1), 2, true),
            ("the same attempt twice", queued(1), 1, false),
            ("skipping an attempt", queued(0), 2, false),
            ("attempt 0", queued(0), 0, false),
            (
                "already dispatched",
                task(TaskStatus::Dispatched, 0),
                1,
                false,
            ),
        ];
        for (name, facts, attempt, ok) in cases {
            let want = ok.then_some(Step::DISPATCHED);
            assert_eq!(dispatch(&facts, attempt), want, "{name}");
        }
        for status in TaskStatus::ALL
            .into_iter()
            .filter(|s| *s != TaskStatus::Queued)
        {
            assert_eq!(dispatch(&task(status, 1), 2), None, "{status}");
        }
    }

    #[test]
    fn pause_and_resume_move_only_the_current_attempt_between_running_and_paused() {
        for status in TaskStatus::ALL {
            for paused in [true, false] {
                let want = match (status, paused) {
                    (TaskStatus::Running, true) => Some(Step::PAUSED),
                    (TaskStatus::Paused, false) => Some(Step::RUNNING),
                    _ => None,
                };
                let facts = task(status, 2);
                assert_eq!(pause(&facts, 2, paused), want, "{status} paused={paused}");
                assert_eq!(pause(&facts, 1, paused), None, "{status}, an old attempt");
            }
        }
    }

    #[test]
    fn only_a_queued_task_ends_without_an_attempt() {
        for status in TaskStatus::ALL {
            for to in [TaskStatus::Cancelled, TaskStatus::Failed] {
                let want = (status == TaskStatus::Queued).then_some(to);
                assert_eq!(end_queued(&task(status, 1), to), want, "{status} to {to}");
            }
        }
    }

    /// Reports decided one after another on facts carried forward in memory (as a backend
    /// deciding a batch before writing it does) get the verdicts they would get one at a time.
    #[test]
    fn facts_carried_forward_decide_the_next_report_as_the_stored_ones_would() {
        use AttemptStatus as A;
        let step = |facts: &AttemptFacts, r: &Report| {
            let change = match report(Some(facts), r) {
                Verdict::Apply(change) => change,
                other => panic!("seq {} applies: {other:?}", r.seq),
            };
            facts.after(r.seq, &change)
        };
        let f = attempt(A::Dispatched, 0);
        let f = step(&f, &report_of(1, Effect::Accepted));
        assert_eq!(
            (f.status, f.task.status, f.last_seq),
            (A::Running, TaskStatus::Running, 1)
        );
        let f = step(&f, &report_of(2, output("a")));
        assert_eq!((f.status, f.last_seq), (A::Running, 2));
        let f = step(&f, &report_of(3, status_change("paused")));
        assert_eq!((f.status, f.task.status), (A::Paused, TaskStatus::Paused));
        assert_eq!(
            report(Some(&f), &report_of(3, output("again"))),
            Verdict::Duplicate { last_seq: 3 }
        );
        let done = step(&f, &report_of(4, complete(true)));
        assert_eq!(
            (done.status, done.task.status),
            (A::Completed, TaskStatus::Completed)
        );
        assert_eq!(
            report(Some(&done), &report_of(5, output("late"))),
            Verdict::Stale(Stale::Over {
                status: A::Completed,
                current: 1
            })
        );

        // An attempt handed back: the task is queued again and the attempt is not charged.
        let back = step(&f, &report_of(4, status_change(RETURNED)));
        assert_eq!(
            (back.status, back.task.status),
            (A::Returned, TaskStatus::Queued)
        );
        assert_eq!((back.task.returned_attempts, back.last_seq), (1, 4));
        // Out of attempts: the task ends as the machine said.
        let last = counted(attempt(A::Running, 0), 3, 3, 0);
        let lost_report = Report {
            attempt: 3,
            ..report_of(1, status_change("lost"))
        };
        let lost = step(&last, &lost_report);
        assert_eq!((lost.status, lost.task.status), (A::Lost, TaskStatus::Lost));
        assert_eq!(lost.task.returned_attempts, 0);
    }

    #[test]
    fn a_dispatch_carried_forward_refuses_the_same_attempt_again() {
        let queued = task(TaskStatus::Queued, 1);
        let to = dispatch(&queued, 2).expect("the next attempt goes out");
        let after = queued.dispatched(2, to);
        assert_eq!((after.status, after.attempt), (TaskStatus::Dispatched, 2));
        assert_eq!(dispatch(&after, 2), None);
        assert_eq!(after.max_attempts, queued.max_attempts);
    }

    #[test]
    fn the_wire_status_of_a_handed_back_attempt_is_the_returned_status() {
        assert_eq!(
            RETURNED.parse::<AttemptStatus>().ok(),
            Some(AttemptStatus::Returned)
        );
    }
}

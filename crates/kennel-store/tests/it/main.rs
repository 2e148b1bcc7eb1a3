//! The `Store` contract, checked through the trait on both backends — a real SQLite file and
//! a real PostgreSQL schema — by the same test bodies: exactly-once reports, conditional
//! dispatch, retries and terminal states, pause and resume, events in commit order, keys, that
//! committed state is there after reopening, and that a status the store does not know is an
//! error. `coordinators` adds what only PostgreSQL is for: several stores writing at once.

// The test bodies are plain async fns, run once per backend by `#[tokio::test]` wrappers, so
// clippy does not take them for tests.
#![allow(clippy::unwrap_used)]

mod agents;
mod coordinators;
mod db;

use std::collections::BTreeMap;

use kennel_proto::api::{ApiKey, Scope};
use kennel_proto::link::{OutputStream, RejectCode};
use kennel_proto::{AttemptStatus, TaskStatus};
use kennel_store::{
    Applied, DaemonHello, Dispatch, Effect, EndAttempt, GatewayOp, KeyRecord, NewTask, Report,
    Retry, Store, StoreError, TaskFilter,
};

use crate::db::Db;

const NOW: i64 = 1_790_000_000_000;

/// Declares each test once per backend: `sqlite::NAME` and `postgres::NAME` run the async fn
/// `NAME(db)` on a fresh database of that backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::postgres().await).await
                }
            )*
        }
    };
}

on_both_backends!(
    reports_apply_exactly_once_and_in_order,
    a_batch_of_reports_decides_as_one_report_at_a_time_would,
    an_attempt_that_starts_and_finishes_in_one_batch_reads_as_one_report_at_a_time_would,
    dispatch_is_conditional_and_attempts_end_with_retry_or_terminal_state,
    one_batch_cannot_dispatch_an_attempt_twice,
    pause_and_resume_move_task_and_attempt_and_a_paused_task_holds_its_slot,
    an_unknown_status_in_the_database_is_reported_as_corrupt_not_guessed,
    state_and_events_survive_reopening_in_commit_order,
    keys_are_stored_hashed_and_revocable,
    the_last_live_admin_key_stays,
    gateway_state_round_trips_and_keeps_only_the_newest_rows,
    daemon_links_belong_to_one_coordinator_and_stranded_ones_are_found,
    daemons_register_refresh_and_drain,
    the_location_picks_the_backend,
    a_daemons_live_task_count_reads_only_its_live_tasks,
    tasks_are_read_many_at_a_time,
    a_new_task_is_created_and_dispatched_at_once,
    new_tasks_submitted_together_fail_alone,
    old_events_are_pruned_and_ids_go_on_from_the_newest,
);

fn new_task(id: &str, max_attempts: u32) -> NewTask {
    NewTask {
        id: id.to_string(),
        name: id.to_string(),
        prompt: "p".into(),
        repo: None,
        agent: "command".into(),
        labels: BTreeMap::new(),
        priority: 0,
        env: BTreeMap::new(),
        timeout_secs: None,
        max_attempts,
        session: None,
    }
}

fn hello(machine: &str) -> DaemonHello {
    DaemonHello {
        key_id: None,
        machine_id: machine.into(),
        hostname: machine.into(),
        max_concurrent_tasks: 2,
        labels: BTreeMap::new(),
        agents: vec!["command".into()],
        version: "t".into(),
        protocol_version: 1,
        remote_addr: None,
    }
}

fn report(daemon: &str, task: &str, attempt: u32, seq: u64, effect: Effect) -> Report {
    Report {
        daemon_id: daemon.into(),
        task_id: task.into(),
        attempt,
        seq,
        effect,
    }
}

fn out(text: &str) -> Effect {
    Effect::Output {
        stream: OutputStream::Stdout,
        output: text.into(),
        is_partial: false,
    }
}

async fn dispatched(store: &dyn Store, task: &str, attempt: u32, daemon: &str) {
    let r = store
        .dispatch(
            &[Dispatch {
                task_id: task.into(),
                attempt,
                daemon_id: daemon.into(),
            }],
            NOW,
        )
        .await
        .expect("dispatch");
    assert!(
        r[0].is_some(),
        "dispatch of {task} attempt {attempt} applied"
    );
}

async fn reports_apply_exactly_once_and_in_order(db: Db) {
    let store = db.open().await;
    store.create_task(new_task("t1", 3), NOW).await.unwrap();
    store
        .daemon_connected("d1", &hello("m1"), NOW)
        .await
        .unwrap();
    dispatched(store.as_ref(), "t1", 1, "d1").await;

    let batch = vec![
        report("d1", "t1", 1, 1, Effect::Accepted),
        report("d1", "t1", 1, 2, out("a")),
        report("d1", "t1", 1, 2, out("a again")),
        report("d1", "t1", 1, 4, out("gap")),
        report("d1", "t1", 1, 3, out("b")),
        report("d2", "t1", 1, 4, out("not the holder")),
        report("d1", "t1", 2, 1, Effect::Accepted),
    ];
    let r = store.apply(&batch, NOW).await.unwrap();
    assert!(matches!(r[0], Applied::Done { .. }));
    assert!(matches!(r[1], Applied::Done { .. }));
    assert_eq!(r[2], Applied::Duplicate { last_seq: 2 });
    assert_eq!(r[3], Applied::Gap { expected: 3 });
    assert!(matches!(r[4], Applied::Done { .. }));
    assert!(matches!(r[5], Applied::Stale { .. }));
    assert!(matches!(r[6], Applied::Stale { .. }));

    let chunks = store.task_output("t1", 1, 0, 100).await.unwrap();
    let got: Vec<_> = chunks.iter().map(|c| (c.seq, c.output.as_str())).collect();
    assert_eq!(got, vec![(2, "a"), (3, "b")]);
    let task = store.get_task("t1").await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Running);

    let done = store
        .apply(
            &[report(
                "d1",
                "t1",
                1,
                4,
                Effect::Complete {
                    success: true,
                    error: None,
                    exit_code: Some(0),
                    branch: Some("kennel/t1".into()),
                    commit: Some("abc123".into()),
                },
            )],
            NOW,
        )
        .await
        .unwrap();
    let Applied::Done { events, task } = &done[0] else {
        panic!("complete applied: {done:?}");
    };
    assert_eq!(events.len(), 1);
    let task = task.as_ref().expect("task changed");
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.branch.as_deref(), Some("kennel/t1"));
    // After completion, further reports of the attempt are stale (a replayed duplicate is not).
    let after = store
        .apply(
            &[
                report("d1", "t1", 1, 4, out("dup")),
                report("d1", "t1", 1, 5, out("late")),
            ],
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(after[0], Applied::Duplicate { last_seq: 4 });
    assert!(matches!(after[1], Applied::Stale { .. }));
}

/// `prune_events` deletes what was recorded before a time, never the newest event, and new
/// events take ids after it.
async fn old_events_are_pruned_and_ids_go_on_from_the_newest(db: Db) {
    let store = db.open().await;
    let mut ids = Vec::new();
    for at in [1_000, 2_000, 3_000] {
        let e = store
            .record_event("test.tick", None, None, serde_json::json!({}), NOW + at)
            .await
            .unwrap();
        ids.push(e.id);
    }
    assert_eq!(store.prune_events(NOW + 2_500).await.unwrap(), 2);
    let left: Vec<i64> = store
        .events_after(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, [ids[2]]);
    assert_eq!(
        store.prune_events(NOW + 10_000).await.unwrap(),
        0,
        "the newest stays"
    );
    let next = store
        .record_event("test.tick", None, None, serde_json::json!({}), NOW + 4_000)
        .await
        .unwrap();
    assert_eq!(next.id, ids[2] + 1);
}

/// `create_and_dispatch` stores a task and its first attempt on a daemon, with both events in
/// order, as `create_task` then `dispatch` would.
async fn a_new_task_is_created_and_dispatched_at_once(db: Db) {
    let store = db.open().await;
    let (queued, created, dispatched) = store
        .create_and_dispatch(new_task("t1", 1), "d1", NOW)
        .await
        .unwrap();
    let (task, ev) = dispatched.expect("a new task is dispatched");
    assert_eq!(queued.task.status, TaskStatus::Queued);
    assert_eq!((task.status, task.attempt), (TaskStatus::Dispatched, 1));
    assert_eq!(task.daemon_id.as_deref(), Some("d1"));
    assert_eq!(
        (created.kind.as_str(), ev.kind.as_str()),
        ("task.created", "task.status")
    );
    let stored = store.events_after(0, 10).await.unwrap();
    assert_eq!(stored, [created, ev]);
    let attempts = store.list_attempts("t1").await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].daemon_id, "d1");
    assert_eq!(store.get_task("t1").await.unwrap(), Some(task));
}

/// New tasks submitted at once are stored together where the backend can (one statement on
/// PostgreSQL); one whose id is taken fails alone, and every other is stored with its events.
async fn new_tasks_submitted_together_fail_alone(db: Db) {
    let store = db.open().await;
    let ids = ["a", "b", "dup", "c", "dup", "d", "e", "f"];
    let calls = ids.iter().enumerate().map(|(n, id)| {
        let store = store.clone();
        let task = new_task(id, 1);
        tokio::spawn(async move {
            match n % 2 {
                0 => store.create_task(task, NOW).await.map(|(q, _)| q.task),
                _ => store
                    .create_and_dispatch(task, "d1", NOW)
                    .await
                    .map(|(_, _, sent)| sent.expect("a new task is dispatched").0),
            }
        })
    });
    let calls: Vec<_> = calls.collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let failed: Vec<usize> = (0..ids.len()).filter(|n| answers[*n].is_err()).collect();
    assert_eq!(
        failed.len(),
        1,
        "exactly one of the two `dup` fails: {answers:?}"
    );
    assert_eq!(ids[failed[0]], "dup");
    for (n, answer) in answers.iter().enumerate() {
        if let Ok(task) = answer {
            assert_eq!(store.get_task(ids[n]).await.unwrap().as_ref(), Some(task));
        }
    }
    // Each stored task has its creation event, and the dispatched ones their dispatch, once.
    let dispatched = answers
        .iter()
        .filter(|a| matches!(a, Ok(t) if t.status == TaskStatus::Dispatched))
        .count();
    let events = read_events(store.as_ref(), ids.len() - 1 + dispatched).await;
    let created = events.iter().filter(|e| e.kind == "task.created").count();
    let sent = events.iter().filter(|e| e.kind == "task.status").count();
    assert_eq!((created, sent), (ids.len() - 1, dispatched));
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
}

/// The first `n` events, read as a stream reads them: on PostgreSQL a reader is held at the ids a
/// rolled-back write drew until no older transaction runs (another test's migration may), and
/// comes back.
async fn read_events(store: &dyn Store, n: usize) -> Vec<kennel_proto::api::Event> {
    let read = async {
        let mut events: Vec<kennel_proto::api::Event> = Vec::new();
        while events.len() < n {
            let after = events.last().map_or(0, |e| e.id);
            events.extend(store.events_after(after, 100).await.unwrap());
        }
        events
    };
    tokio::time::timeout(crate::db::DEADLINE, read)
        .await
        .expect("every stored event is read in time")
}

/// `get_tasks` returns the tasks that exist among those asked for, each once, as `get_task`
/// would.
async fn tasks_are_read_many_at_a_time(db: Db) {
    let store = db.open().await;
    for id in ["t1", "t2", "t3"] {
        store.create_task(new_task(id, 1), NOW).await.unwrap();
    }
    let asked: Vec<String> = ["t3", "nope", "t1"].map(String::from).to_vec();
    let mut got = store.get_tasks(&asked).await.unwrap();
    got.sort_by(|a, b| a.id.cmp(&b.id));
    let one = store.get_task("t1").await.unwrap().unwrap();
    let three = store.get_task("t3").await.unwrap().unwrap();
    assert_eq!(got, [one, three]);
    assert!(store.get_tasks(&[]).await.unwrap().is_empty());
}

async fn dispatch_is_conditional_and_attempts_end_with_retry_or_terminal_state(db: Db) {
    let store = db.open().await;
    store.create_task(new_task("t1", 2), NOW).await.unwrap();
    dispatched(store.as_ref(), "t1", 1, "d1").await;
    // A second dispatch of the same attempt (another coordinator, a race) does nothing.
    let again = store
        .dispatch(
            &[Dispatch {
                task_id: "t1".into(),
                attempt: 1,
                daemon_id: "d2".into(),
            }],
            NOW,
        )
        .await
        .unwrap();
    assert!(again[0].is_none());

    let end = |attempt, status| EndAttempt {
        task_id: "t1",
        attempt,
        status,
        reason: "daemon lost",
        retry: Retry::Charged,
        terminal: TaskStatus::Lost,
    };
    let ended = store
        .end_attempt(&end(1, AttemptStatus::Lost), NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ended.task.status,
        TaskStatus::Queued,
        "attempts remain: requeued"
    );
    assert!(store
        .end_attempt(&end(1, AttemptStatus::Lost), NOW)
        .await
        .unwrap()
        .is_none());
    dispatched(store.as_ref(), "t1", 2, "d2").await;
    let ended = store
        .end_attempt(&end(2, AttemptStatus::Lost), NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.task.status, TaskStatus::Lost, "no attempts left");
    assert!(ended
        .task
        .error
        .unwrap_or_default()
        .contains("no attempts left (2 of 2)"));
    let attempts = store.list_attempts("t1").await.unwrap();
    let statuses: Vec<_> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![AttemptStatus::Lost, AttemptStatus::Lost]);

    // Attempts a daemon hands back (full or stopping) are retried however many there were,
    // and do not use up the task's own attempts.
    store.create_task(new_task("t3", 1), NOW).await.unwrap();
    for attempt in 1..=3 {
        dispatched(store.as_ref(), "t3", attempt, "d2").await;
        let ended = store
            .end_attempt(
                &EndAttempt {
                    task_id: "t3",
                    attempt,
                    status: AttemptStatus::Returned,
                    reason: "daemon stopping",
                    retry: Retry::Free,
                    terminal: TaskStatus::Failed,
                },
                NOW,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.task.status, TaskStatus::Queued, "returned: requeued");
    }
    dispatched(store.as_ref(), "t3", 4, "d2").await;
    let ended = store
        .end_attempt(
            &EndAttempt {
                task_id: "t3",
                attempt: 4,
                status: AttemptStatus::Lost,
                reason: "daemon lost",
                retry: Retry::Charged,
                terminal: TaskStatus::Lost,
            },
            NOW,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ended.task.status,
        TaskStatus::Lost,
        "the one charged attempt of 1 is used up"
    );
    assert!(ended
        .task
        .error
        .unwrap_or_default()
        .contains("no attempts left (1 of 1)"));

    store.create_task(new_task("t2", 3), NOW).await.unwrap();
    assert!(store.cancel_queued("t2", NOW).await.unwrap().is_some());
    assert!(store.cancel_queued("t2", NOW).await.unwrap().is_none());
    let counts = store.count_tasks().await.unwrap();
    assert_eq!(counts.get(&TaskStatus::Cancelled), Some(&1));
    assert_eq!(counts.get(&TaskStatus::Lost), Some(&2));
}

async fn pause_and_resume_move_task_and_attempt_and_a_paused_task_holds_its_slot(db: Db) {
    let store = db.open().await;
    store
        .daemon_connected("d1", &hello("m1"), NOW)
        .await
        .unwrap();
    store.create_task(new_task("t1", 3), NOW).await.unwrap();
    dispatched(store.as_ref(), "t1", 1, "d1").await;
    let attempt_status = || async { store.list_attempts("t1").await.unwrap()[0].status };
    assert!(
        store
            .set_paused("t1", 1, true, NOW)
            .await
            .unwrap()
            .is_none(),
        "only a running attempt pauses"
    );
    store
        .apply(&[report("d1", "t1", 1, 1, Effect::Accepted)], NOW)
        .await
        .unwrap();
    assert!(
        store
            .set_paused("t1", 2, true, NOW)
            .await
            .unwrap()
            .is_none(),
        "not the current attempt"
    );
    let paused = store.set_paused("t1", 1, true, NOW).await.unwrap();
    let paused = paused.expect("a running attempt pauses");
    assert_eq!(paused.task.status, TaskStatus::Paused);
    assert_eq!(paused.events.len(), 1);
    assert_eq!(attempt_status().await, AttemptStatus::Paused);
    assert!(
        store
            .set_paused("t1", 1, true, NOW)
            .await
            .unwrap()
            .is_none(),
        "already paused"
    );
    let daemon = store.get_daemon("d1").await.unwrap().expect("daemon");
    assert_eq!(daemon.active_tasks, 1, "a paused task keeps its slot");
    assert_eq!(store.active_tasks().await.unwrap().len(), 1);

    let resumed = store.set_paused("t1", 1, false, NOW).await.unwrap();
    let resumed = resumed.expect("a paused attempt resumes");
    assert_eq!(resumed.task.status, TaskStatus::Running);
    assert_eq!(attempt_status().await, AttemptStatus::Running);
}

async fn an_unknown_status_in_the_database_is_reported_as_corrupt_not_guessed(db: Db) {
    {
        let store = db.open().await;
        store.create_task(new_task("t1", 3), NOW).await.unwrap();
        dispatched(store.as_ref(), "t1", 1, "d1").await;
    }
    let is_corrupt =
        |e: &StoreError| matches!(e, StoreError::Corrupt(m) if m.contains("levitating"));

    db.execute("UPDATE attempts SET status = 'levitating'")
        .await;
    let store = db.open().await;
    let err = store
        .apply(&[report("d1", "t1", 1, 1, Effect::Accepted)], NOW)
        .await
        .unwrap_err();
    assert!(is_corrupt(&err), "{err}");
    drop(store);

    db.execute("UPDATE tasks SET status = 'levitating'").await;
    let store = db.open().await;
    let end = EndAttempt {
        task_id: "t1",
        attempt: 1,
        status: AttemptStatus::Lost,
        reason: "daemon lost",
        retry: Retry::Charged,
        terminal: TaskStatus::Lost,
    };
    let err = store.end_attempt(&end, NOW).await.unwrap_err();
    assert!(is_corrupt(&err), "{err}");
    let err = store.set_paused("t1", 1, true, NOW).await.unwrap_err();
    assert!(is_corrupt(&err), "{err}");
}

async fn state_and_events_survive_reopening_in_commit_order(db: Db) {
    {
        let store = db.open().await;
        for i in 0..5 {
            store
                .create_task(new_task(&format!("t{i}"), 1), NOW + i)
                .await
                .unwrap();
        }
        dispatched(store.as_ref(), "t0", 1, "d1").await;
    }
    let store = db.open().await;
    let queued: Vec<_> = store
        .queued_tasks()
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.task.id)
        .collect();
    assert_eq!(queued, vec!["t1", "t2", "t3", "t4"]);
    let active = store.active_tasks().await.unwrap();
    assert_eq!(active.len(), 1);
    let events = store.events_after(0, 100).await.unwrap();
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=6).collect::<Vec<_>>());
    assert_eq!(events[5].kind, "task.status");
    let page = store
        .list_tasks(&TaskFilter {
            status: Some(TaskStatus::Queued),
            daemon_id: None,
            before: None,
            limit: 2,
        })
        .await
        .unwrap();
    let ids: Vec<_> = page.iter().map(|q| q.task.id.as_str()).collect();
    assert_eq!(ids, vec!["t4", "t3"], "newest first");
}

async fn keys_are_stored_hashed_and_revocable(db: Db) {
    let store = db.open().await;
    let rec = KeyRecord {
        info: ApiKey {
            id: "0123456789ab".into(),
            name: "ci".into(),
            scopes: vec![Scope::Client, Scope::Daemon],
            created_at: "2026-11-21T00:00:00Z".into(),
            last_used_at: None,
            revoked_at: None,
        },
        hash: vec![7; 32],
    };
    store.insert_key(&rec).await.unwrap();
    let found = store.find_key("0123456789ab").await.unwrap().unwrap();
    assert_eq!(found.hash, vec![7; 32]);
    assert_eq!(found.info.scopes, vec![Scope::Client, Scope::Daemon]);
    assert_eq!(store.count_keys().await.unwrap(), 1);
    let revoked = store
        .revoke_key("0123456789ab", NOW)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    assert!(store.revoke_key("nope", NOW).await.unwrap().is_none());
}

async fn gateway_state_round_trips_and_keeps_only_the_newest_rows(db: Db) {
    {
        let store = db.open().await;
        let mut ops = vec![
            GatewayOp::Put("health:a".into(), "{\"requests\":1}".into()),
            GatewayOp::Put("totals".into(), "{}".into()),
            GatewayOp::Put("gone".into(), "x".into()),
            GatewayOp::Delete("gone".into()),
            GatewayOp::Put("health:a".into(), "{\"requests\":2}".into()),
        ];
        for i in 0..5 {
            ops.push(GatewayOp::Heartbeat {
                body: format!("hb{i}"),
                keep: 3,
            });
        }
        ops.push(GatewayOp::Incident {
            body: "old".into(),
            keep: 10,
        });
        ops.push(GatewayOp::ClearIncidents);
        ops.push(GatewayOp::Incident {
            body: "new".into(),
            keep: 10,
        });
        store.gateway_write(ops).await.unwrap();
    }
    let store = db.open().await;
    let rows = store.gateway_state(100, 100).await.unwrap();
    assert_eq!(
        rows.kv,
        vec![
            ("health:a".to_string(), "{\"requests\":2}".to_string()),
            ("totals".to_string(), "{}".to_string()),
        ]
    );
    assert_eq!(rows.heartbeats, vec!["hb2", "hb3", "hb4"]);
    assert_eq!(rows.incidents, vec!["new"]);
    // Asking for fewer gives the newest, still oldest first.
    let few = store.gateway_state(2, 1).await.unwrap();
    assert_eq!(few.heartbeats, vec!["hb3", "hb4"]);
    store
        .gateway_write(vec![GatewayOp::ClearHeartbeats])
        .await
        .unwrap();
    assert!(store
        .gateway_state(9, 9)
        .await
        .unwrap()
        .heartbeats
        .is_empty());
}

/// Several coordinators on one database: a daemon's link belongs to the coordinator that
/// holds it, a late disconnect from another one changes nothing, a coordinator that stops
/// being seen strands its daemons, and one lease holder at a time.
async fn daemon_links_belong_to_one_coordinator_and_stranded_ones_are_found(db: Db) {
    let store = db.open().await;
    store.coordinator_seen("c-a", NOW).await.unwrap();
    store.coordinator_seen("c-b", NOW).await.unwrap();
    store
        .daemon_connected("d1", &hello("m1"), NOW)
        .await
        .unwrap();
    store.daemon_held_by("d1", "c-a").await.unwrap();
    // The daemon moves to B; A notices its old link's end afterwards: nothing changes.
    store
        .daemon_connected("d1", &hello("m1"), NOW + 1)
        .await
        .unwrap();
    store.daemon_held_by("d1", "c-b").await.unwrap();
    assert!(store
        .daemon_left("d1", "c-a", "late", NOW + 2)
        .await
        .unwrap()
        .is_none());
    assert!(store.get_daemon("d1").await.unwrap().unwrap().connected);
    assert!(store.last_event_id().await.unwrap() > 0);

    // B stops being seen; A goes on. B's daemon is stranded, and only once B is stale.
    store.coordinator_seen("c-a", NOW + 10_000).await.unwrap();
    assert!(store.stranded_daemons(NOW).await.unwrap().is_empty());
    let stranded = store.stranded_daemons(NOW + 5_000).await.unwrap();
    assert_eq!(
        stranded.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d1"]
    );
    // A link recorded after the cutoff whose holder has not written yet that it holds it
    // (a storm of connects delays that write) is not stranded; one recorded before it is.
    store
        .daemon_connected("d2", &hello("m2"), NOW + 9_000)
        .await
        .unwrap();
    let ids = |ds: Vec<kennel_proto::api::Daemon>| -> Vec<String> {
        ds.into_iter().map(|d| d.id).collect()
    };
    assert_eq!(
        ids(store.stranded_daemons(NOW + 5_000).await.unwrap()),
        ["d1"]
    );
    assert_eq!(
        ids(store.stranded_daemons(NOW + 9_001).await.unwrap()),
        ["d1", "d2"]
    );
    store.daemon_held_by("d2", "c-a").await.unwrap();
    assert_eq!(
        ids(store.stranded_daemons(NOW + 9_001).await.unwrap()),
        ["d1"]
    );
    // The holder's own disconnect goes through, and the daemon is stranded no more.
    let ev = store
        .daemon_left("d1", "c-b", "gone", NOW + 10_001)
        .await
        .unwrap()
        .expect("the holder's disconnect is recorded");
    assert_eq!(ev.kind, "daemon.disconnected");
    assert_eq!(store.last_event_id().await.unwrap(), ev.id);
    assert!(!store.get_daemon("d1").await.unwrap().unwrap().connected);
    assert!(store
        .stranded_daemons(NOW + 5_000)
        .await
        .unwrap()
        .is_empty());

    // One lease holder at a time; it renews; another takes over once it has run out.
    assert!(store.lease("rescue", "c-a", NOW, 1_000).await.unwrap());
    assert!(!store
        .lease("rescue", "c-b", NOW + 500, 1_000)
        .await
        .unwrap());
    assert!(store
        .lease("rescue", "c-a", NOW + 900, 1_000)
        .await
        .unwrap());
    assert!(!store
        .lease("rescue", "c-b", NOW + 1_500, 1_000)
        .await
        .unwrap());
    assert!(store
        .lease("rescue", "c-b", NOW + 1_901, 1_000)
        .await
        .unwrap());
}

fn dispatch(task: &str, attempt: u32, daemon: &str) -> Dispatch {
    Dispatch {
        task_id: task.into(),
        attempt,
        daemon_id: daemon.into(),
    }
}

/// The tasks `t1` (3 attempts), `t2` (1) and `t3` (2), each dispatched as attempt 1 to `d1`.
async fn three_dispatched_tasks(store: &dyn Store) {
    store
        .daemon_connected("d1", &hello("m1"), NOW)
        .await
        .unwrap();
    for (id, max) in [("t1", 3), ("t2", 1), ("t3", 2)] {
        store.create_task(new_task(id, max), NOW).await.unwrap();
        dispatched(store, id, 1, "d1").await;
    }
}

/// An agent that starts and ends between two batches of its link: its live changes and its
/// finish arrive in one batch (PostgreSQL writes the finish in the live change's place). The
/// answers, the events and what is stored are those of one report at a time, on a second
/// attempt after a lost first one too.
async fn an_attempt_that_starts_and_finishes_in_one_batch_reads_as_one_report_at_a_time_would(
    db: Db,
) {
    let complete = |success: bool| Effect::Complete {
        success,
        error: (!success).then(|| "exit 3".to_string()),
        exit_code: Some(if success { 0 } else { 3 }),
        branch: Some("kennel/t".into()),
        commit: Some("abc".into()),
    };
    let status = |s: &str| Effect::StatusChange {
        new_status: s.parse().ok(),
    };
    let one_by_one = db.another().await;
    let (batched, single) = (db.open().await, one_by_one.open().await);
    for store in [&batched, &single] {
        store
            .daemon_connected("d1", &hello("m1"), NOW)
            .await
            .unwrap();
        for id in ["t1", "t2"] {
            store.create_task(new_task(id, 2), NOW).await.unwrap();
            dispatched(store.as_ref(), id, 1, "d1").await;
        }
        // t2's first attempt is lost (requeued with an error), its second dispatched.
        let lost = report("d1", "t2", 1, 1, status("lost"));
        store.apply(&[lost], NOW).await.unwrap();
        dispatched(store.as_ref(), "t2", 2, "d1").await;
    }
    let batch = vec![
        report("d1", "t1", 1, 1, Effect::Accepted),
        report("d1", "t2", 2, 1, Effect::Accepted),
        report("d1", "t1", 1, 2, status("running")),
        report("d1", "t1", 1, 3, complete(true)),
        report("d1", "t2", 2, 2, out("working")),
        report("d1", "t2", 2, 3, complete(false)),
    ];
    let got = batched.apply(&batch, NOW + 1).await.unwrap();
    let mut want = Vec::new();
    for r in &batch {
        want.extend(
            single
                .apply(std::slice::from_ref(r), NOW + 1)
                .await
                .unwrap(),
        );
    }
    assert_eq!(got, want);
    assert_eq!(
        batched.events_after(0, 100).await.unwrap(),
        single.events_after(0, 100).await.unwrap()
    );
    for id in ["t1", "t2"] {
        assert_eq!(
            batched.get_task(id).await.unwrap(),
            single.get_task(id).await.unwrap()
        );
        assert_eq!(
            batched.list_attempts(id).await.unwrap(),
            single.list_attempts(id).await.unwrap()
        );
    }
    // Every seq was recorded: the reports again are duplicates.
    let again = batched.apply(&batch, NOW + 2).await.unwrap();
    assert!(again
        .iter()
        .all(|a| matches!(a, Applied::Duplicate { .. } | Applied::Stale { .. })));
}

/// A backend may decide a whole batch before writing it (PostgreSQL does): every report must
/// still be decided on what the reports before it in the batch did.
async fn a_batch_of_reports_decides_as_one_report_at_a_time_would(db: Db) {
    let progress = |summary: &str| Effect::Progress {
        summary: summary.into(),
        detail: Some(serde_json::json!({ "n": 1 })),
    };
    let status = |s: &str| Effect::StatusChange {
        new_status: s.parse().ok(),
    };
    let complete = Effect::Complete {
        success: true,
        error: None,
        exit_code: Some(0),
        branch: Some("kennel/t1".into()),
        commit: Some("abc".into()),
    };
    let rejected = Effect::Rejected {
        reason: "full".into(),
        code: Some(RejectCode::AtCapacity),
    };
    let batch = vec![
        report("d1", "t1", 1, 1, Effect::Accepted),
        report("d1", "t2", 1, 1, Effect::Accepted),
        report("d1", "t1", 1, 3, out("gap")),
        report("d1", "t1", 1, 2, out("a")),
        report("d1", "t3", 1, 1, out("before accepting")),
        report("d1", "t1", 1, 3, progress("half")),
        report("d1", "t2", 1, 2, rejected),
        report("d1", "t1", 1, 4, status("paused")),
        report("d1", "t2", 1, 3, out("after the refusal")),
        report("d1", "t1", 1, 5, out("b")),
        report("d1", "t3", 1, 2, status("lost")),
        report("d1", "t1", 1, 6, status("running")),
        report("d1", "t3", 1, 2, out("resent")),
        report("d2", "t1", 1, 7, out("not the holder")),
        report("d1", "t1", 1, 7, complete),
        report("d1", "t1", 1, 7, out("resent")),
        report("d1", "t1", 1, 8, out("late")),
        report("d1", "t4", 1, 1, out("no such task")),
    ];

    let one_by_one = db.another().await;
    let (batched, single) = (db.open().await, one_by_one.open().await);
    three_dispatched_tasks(batched.as_ref()).await;
    three_dispatched_tasks(single.as_ref()).await;
    let got = batched.apply(&batch, NOW).await.unwrap();
    let mut want = Vec::new();
    for r in &batch {
        want.extend(single.apply(std::slice::from_ref(r), NOW).await.unwrap());
    }
    assert_eq!(got, want);
    let kinds: Vec<&str> = got
        .iter()
        .map(|a| match a {
            Applied::Done { task: Some(_), .. } => "changed",
            Applied::Done { .. } => "done",
            Applied::Duplicate { .. } => "duplicate",
            Applied::Gap { .. } => "gap",
            Applied::Stale { .. } => "stale",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "changed",
            "changed",
            "gap",
            "done",
            "done",
            "done",
            "changed",
            "changed",
            "stale",
            "done",
            "changed",
            "changed",
            "duplicate",
            "stale",
            "changed",
            "duplicate",
            "stale",
            "stale"
        ]
    );

    for store in [&batched, &single] {
        let t1 = store.get_task("t1").await.unwrap().unwrap();
        assert_eq!(t1.status, TaskStatus::Completed);
        let t2 = store.get_task("t2").await.unwrap().unwrap();
        assert_eq!(
            t2.status,
            TaskStatus::Queued,
            "a refusal at capacity is free"
        );
        let t3 = store.get_task("t3").await.unwrap().unwrap();
        assert_eq!(t3.status, TaskStatus::Queued, "one of two attempts lost");
        let chunks = store.task_output("t1", 1, 0, 100).await.unwrap();
        let got: Vec<_> = chunks
            .iter()
            .map(|c| (c.seq, c.stream, c.output.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, OutputStream::Stdout, "a"),
                (
                    3,
                    OutputStream::Progress,
                    r#"{"detail":{"n":1},"summary":"half"}"#
                ),
                (5, OutputStream::Stdout, "b"),
            ]
        );
    }
    for task in ["t1", "t2", "t3"] {
        assert_eq!(
            batched.list_attempts(task).await.unwrap(),
            single.list_attempts(task).await.unwrap(),
            "{task}"
        );
        assert_eq!(
            batched.get_task(task).await.unwrap(),
            single.get_task(task).await.unwrap(),
            "{task}"
        );
    }
    assert_eq!(
        batched.events_after(0, 100).await.unwrap(),
        single.events_after(0, 100).await.unwrap()
    );
    // Every seq applied is recorded: the next report of t1 is a duplicate up to 7.
    let again = batched
        .apply(&[report("d1", "t1", 1, 7, out("x"))], NOW)
        .await
        .unwrap();
    assert_eq!(again, [Applied::Duplicate { last_seq: 7 }]);
}

async fn one_batch_cannot_dispatch_an_attempt_twice(db: Db) {
    let store = db.open().await;
    store.create_task(new_task("t1", 3), NOW).await.unwrap();
    let got = store
        .dispatch(
            &[
                dispatch("t1", 1, "d1"),
                dispatch("t1", 1, "d2"),
                dispatch("t1", 2, "d1"),
                dispatch("nope", 1, "d1"),
            ],
            NOW,
        )
        .await
        .unwrap();
    let (task, event) = got[0].as_ref().expect("the first dispatch goes out");
    assert_eq!(
        (task.status, task.attempt, task.daemon_id.as_deref()),
        (TaskStatus::Dispatched, 1, Some("d1"))
    );
    assert_eq!(event.kind, "task.status");
    assert!(got[1..].iter().all(Option::is_none), "{got:?}");
    let attempts = store.list_attempts("t1").await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].daemon_id, "d1");
    assert!(store.dispatch(&[], NOW).await.unwrap().is_empty());
    assert!(store.apply(&[], NOW).await.unwrap().is_empty());
}

fn key(id: &str, scopes: Vec<Scope>) -> KeyRecord {
    KeyRecord {
        info: ApiKey {
            id: id.into(),
            name: id.into(),
            scopes,
            created_at: "2026-11-21T00:00:00Z".into(),
            last_used_at: None,
            revoked_at: None,
        },
        hash: vec![1; 32],
    }
}

async fn the_last_live_admin_key_stays(db: Db) {
    use kennel_store::Revoke;
    let store = db.open().await;
    for k in [
        key("admin1", vec![Scope::Admin]),
        key("admin2", vec![Scope::Client, Scope::Admin]),
        key("client", vec![Scope::Client]),
    ] {
        store.insert_key(&k).await.unwrap();
    }
    let revoke = |id: &'static str| {
        let store = store.clone();
        async move { store.revoke_key_keeping_an_admin(id, 5).await.unwrap() }
    };
    assert!(matches!(revoke("admin1").await, Revoke::Revoked(k) if k.revoked_at.is_some()));
    assert!(matches!(revoke("admin2").await, Revoke::LastAdmin(k) if k.revoked_at.is_none()));
    // Revoking again is harmless; other scopes never count.
    assert!(matches!(revoke("admin1").await, Revoke::Revoked(_)));
    assert!(matches!(revoke("client").await, Revoke::Revoked(_)));
    assert_eq!(revoke("nope").await, Revoke::NotFound);
    let live: Vec<_> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.revoked_at.is_none())
        .map(|k| k.id)
        .collect();
    assert_eq!(live, vec!["admin2".to_string()]);
    store.touch_key("admin2", NOW).await.unwrap();
    let found = store.find_key("admin2").await.unwrap().unwrap();
    assert_eq!(found.info.last_used_at, Some(kennel_store::rfc3339(NOW)));
    assert_eq!(found.info.created_at, "2026-11-21T00:00:00Z");
}

async fn daemons_register_refresh_and_drain(db: Db) {
    let store = db.open().await;
    let first = DaemonHello {
        key_id: Some("k1".into()),
        labels: BTreeMap::from([("gpu".to_string(), "yes".to_string())]),
        remote_addr: Some("10.0.0.1:5000".into()),
        ..hello("m1")
    };
    let (d, ev) = store.daemon_connected("d1", &first, NOW).await.unwrap();
    assert_eq!(ev.kind, "daemon.connected");
    assert_eq!(ev.data["machineId"], "m1");
    assert!(d.connected && !d.draining);
    assert_eq!((d.key_id.as_deref(), d.active_tasks), (Some("k1"), 0));
    assert_eq!(d.labels.get("gpu").map(String::as_str), Some("yes"));
    // Reconnecting with an admin key (no key id) keeps the binding; new fields replace old.
    let again = DaemonHello {
        max_concurrent_tasks: 5,
        ..hello("m1")
    };
    let (d, _) = store.daemon_connected("d1", &again, NOW + 1).await.unwrap();
    assert_eq!(
        (d.key_id.as_deref(), d.max_concurrent_tasks),
        (Some("k1"), 5)
    );
    assert!(d.labels.is_empty());
    store
        .daemon_connected("d0", &hello("m0"), NOW)
        .await
        .unwrap();
    let by_machine = store.daemon_by_machine("m1").await.unwrap().unwrap();
    assert_eq!(by_machine.id, "d1");
    assert!(store.daemon_by_machine("m9").await.unwrap().is_none());

    store.create_task(new_task("t1", 1), NOW).await.unwrap();
    store.create_task(new_task("t2", 1), NOW).await.unwrap();
    dispatched(store.as_ref(), "t1", 1, "d1").await;
    let d = store.get_daemon("d1").await.unwrap().unwrap();
    assert_eq!(d.active_tasks, 1);
    let on_d1 = store
        .list_tasks(&TaskFilter {
            daemon_id: Some("d1".into()),
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(on_d1.len(), 1);
    let newest = store
        .list_tasks(&TaskFilter {
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    let before = store
        .list_tasks(&TaskFilter {
            before: Some(newest[0].order),
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].task.id, "t1");

    let (d, ev) = store
        .set_draining("d1", true, NOW + 2)
        .await
        .unwrap()
        .expect("a known daemon drains");
    assert!(d.draining);
    assert_eq!(
        (ev.kind.as_str(), &ev.data["draining"]),
        ("daemon.draining", &serde_json::json!(true))
    );
    assert!(store.set_draining("d9", true, NOW).await.unwrap().is_none());
    store.daemon_seen("d1", NOW + 3).await.unwrap();
    let ids: Vec<_> = store
        .list_daemons()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["d0", "d1"], "by hostname");

    let ev = store
        .daemon_disconnected("d1", "closed", NOW + 4)
        .await
        .unwrap();
    assert_eq!(
        (ev.kind.as_str(), ev.daemon_id.as_deref()),
        ("daemon.disconnected", Some("d1"))
    );
    let d = store.get_daemon("d1").await.unwrap().unwrap();
    assert!(!d.connected);
    assert_eq!(d.last_seen_at, Some(kennel_store::rfc3339(NOW + 4)));
    store.reset_connections(NOW + 5).await.unwrap();
    assert!(!store.get_daemon("d0").await.unwrap().unwrap().connected);
    assert!(store.get_daemon("d9").await.unwrap().is_none());
    store.ping().await.unwrap();
}

async fn the_location_picks_the_backend(db: Db) {
    let store = kennel_store::open(&db.location()).await.unwrap();
    assert_eq!(store.backend(), db.backend());
    store.create_task(new_task("t1", 1), NOW).await.unwrap();
    assert!(db.open().await.get_task("t1").await.unwrap().is_some());
}

async fn a_daemons_live_task_count_reads_only_its_live_tasks(db: Db) {
    // Opening migrates the database.
    db.open().await;
    let live: Vec<String> = TaskStatus::ALL
        .into_iter()
        .filter(|s| s.is_active())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    let count = format!(
        "SELECT COUNT(*) FROM tasks t WHERE t.daemon_id = 'd1' AND t.status IN ({})",
        live.join(", ")
    );
    let plan = db.plan(&count).await;
    assert!(
        plan.contains("tasks_daemon_live"),
        "the count of a daemon's live tasks should use the index of live tasks, whose \
         condition must name exactly the live statuses; the plan was:\n{plan}"
    );
}

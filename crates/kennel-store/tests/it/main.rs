//! The `Store` contract, checked through the trait on a real SQLite file: exactly-once
//! reports, conditional dispatch, retries and terminal states, pause and resume, events in
//! commit order, keys, that committed state is there after reopening the file, and that a
//! status the store does not know is an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use kennel_proto::api::{ApiKey, Scope};
use kennel_proto::link::OutputStream;
use kennel_proto::{AttemptStatus, TaskStatus};
use kennel_store::{
    Applied, Backend, DaemonHello, Dispatch, Effect, EndAttempt, GatewayOp, KeyRecord, NewTask,
    Report, Retry, SqliteStore, Store, StoreError, TaskFilter,
};

const NOW: i64 = 1_790_000_000_000;

async fn open(dir: &tempfile::TempDir) -> Arc<dyn Backend> {
    Arc::new(
        SqliteStore::open(&dir.path().join("kennel.db"))
            .await
            .expect("open store"),
    )
}

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

#[tokio::test]
async fn reports_apply_exactly_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn dispatch_is_conditional_and_attempts_end_with_retry_or_terminal_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn pause_and_resume_move_task_and_attempt_and_a_paused_task_holds_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn an_unknown_status_in_the_file_is_reported_as_corrupt_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir).await;
        store.create_task(new_task("t1", 3), NOW).await.unwrap();
        dispatched(store.as_ref(), "t1", 1, "d1").await;
    }
    let corrupt = |sql: &str| {
        let conn = rusqlite::Connection::open(dir.path().join("kennel.db")).unwrap();
        conn.execute(sql, []).unwrap();
    };
    let is_corrupt =
        |e: &StoreError| matches!(e, StoreError::Corrupt(m) if m.contains("levitating"));

    corrupt("UPDATE attempts SET status = 'levitating'");
    let store = open(&dir).await;
    let err = store
        .apply(&[report("d1", "t1", 1, 1, Effect::Accepted)], NOW)
        .await
        .unwrap_err();
    assert!(is_corrupt(&err), "{err}");
    drop(store);

    corrupt("UPDATE tasks SET status = 'levitating'");
    let store = open(&dir).await;
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

#[tokio::test]
async fn state_and_events_survive_reopening_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir).await;
        for i in 0..5 {
            store
                .create_task(new_task(&format!("t{i}"), 1), NOW + i)
                .await
                .unwrap();
        }
        dispatched(store.as_ref(), "t0", 1, "d1").await;
    }
    let store = open(&dir).await;
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

#[tokio::test]
async fn keys_are_stored_hashed_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn gateway_state_round_trips_and_keeps_only_the_newest_rows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir).await;
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
    let store = open(&dir).await;
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
#[tokio::test]
async fn daemon_links_belong_to_one_coordinator_and_stranded_ones_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

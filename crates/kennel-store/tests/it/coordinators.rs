//! What PostgreSQL is for: several coordinators, each with its own store, on one database at
//! once. Dispatch hands each attempt out once, a report delivered twice applies once, event ids
//! become visible in id order, and migrating is safe however many start together.

use std::collections::BTreeMap;
use std::sync::Arc;

use kennel_proto::api::Event;
use kennel_proto::AttemptStatus;
use kennel_proto::TaskStatus;
use kennel_store::{EndAttempt, PgStore, Retry, Store, StoreError};
use tokio::task::JoinSet;

use crate::db::{Schema, DEADLINE};
use crate::{dispatch, hello, new_task, out, report, NOW};

/// Runs the futures in `set` to the end within the deadline; returns what they returned.
async fn all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let joined = async {
        let mut got = Vec::new();
        while let Some(r) = set.join_next().await {
            got.push(r.expect("a writer panicked"));
        }
        got
    };
    tokio::time::timeout(DEADLINE, joined)
        .await
        .expect("the concurrent writers finish in time (a deadlock would not)")
}

/// A fresh schema with the stores of two coordinators on it.
async fn two_coordinators() -> (Schema, Arc<PgStore>, Arc<PgStore>) {
    let schema = Schema::create().await;
    let (a, b) = (schema.connect().await, schema.connect().await);
    (schema, Arc::new(a), Arc::new(b))
}

/// `n` task ids, and the same in reverse: the orders two coordinators take them in.
fn task_ids(n: usize) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("t{i:03}")).collect();
    let reversed = ids.iter().rev().cloned().collect();
    (ids, reversed)
}

/// Two coordinators race for the same queued tasks, in opposite orders and in batches, round
/// after round: each attempt goes to exactly one daemon, and neither coordinator fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_dispatching_the_same_tasks_hand_each_attempt_out_once() {
    const TASKS: usize = 60;
    const ROUNDS: u32 = 3;
    let (_schema, a, b) = two_coordinators().await;
    let (ids, reversed) = task_ids(TASKS);
    for id in &ids {
        a.create_task(new_task(id, ROUNDS), NOW).await.unwrap();
    }
    for attempt in 1..=ROUNDS {
        let mut racers = JoinSet::new();
        let racing = [(a.clone(), "da", &ids), (b.clone(), "db", &reversed)];
        for (store, daemon, order) in racing {
            let order = order.clone();
            racers.spawn(async move {
                let mut won = Vec::new();
                for chunk in order.chunks(7) {
                    let batch: Vec<_> =
                        chunk.iter().map(|t| dispatch(t, attempt, daemon)).collect();
                    let got = store.dispatch(&batch, NOW).await.expect("dispatch");
                    for (task, event) in got.into_iter().flatten() {
                        // Each dispatch comes with its own event.
                        assert_eq!(event.task_id.as_deref(), Some(task.id.as_str()));
                        assert_eq!(event.data["attempt"], attempt);
                        won.push(task);
                    }
                }
                won
            });
        }
        let mut winners: BTreeMap<String, String> = BTreeMap::new();
        for task in all(racers).await.into_iter().flatten() {
            assert_eq!(task.attempt, attempt);
            let daemon = task
                .daemon_id
                .clone()
                .expect("a dispatched task has a daemon");
            let twice = winners.insert(task.id.clone(), daemon);
            assert!(
                twice.is_none(),
                "{} attempt {attempt} went out twice",
                task.id
            );
        }
        assert_eq!(
            winners.len(),
            TASKS,
            "every task went out in round {attempt}"
        );
        for id in &ids {
            let attempts = a.list_attempts(id).await.unwrap();
            assert_eq!(attempts.len(), attempt as usize, "{id}");
            assert_eq!(attempts.last().unwrap().daemon_id, winners[id], "{id}");
            // Back to the queue for the next round.
            let end = EndAttempt {
                task_id: id,
                attempt,
                status: AttemptStatus::Lost,
                reason: "daemon lost",
                retry: Retry::Charged,
                terminal: TaskStatus::Lost,
            };
            a.end_attempt(&end, NOW)
                .await
                .unwrap()
                .expect("a live attempt ends");
        }
    }
    let counts = b.count_tasks().await.unwrap();
    assert_eq!(counts.get(&TaskStatus::Lost), Some(&(TASKS as u64)));
}

/// A daemon's reports reach two coordinators at once (it reconnected and replays its outbox):
/// every report applies once, the copy is a duplicate, and the output is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_replayed_through_two_coordinators_at_once_apply_once() {
    const TASKS: usize = 20;
    const SEQS: u64 = 30;
    let (_schema, a, b) = two_coordinators().await;
    let (ids, reversed) = task_ids(TASKS);
    a.daemon_connected("d1", &hello("m1"), NOW).await.unwrap();
    for id in &ids {
        a.create_task(new_task(id, 1), NOW).await.unwrap();
        crate::dispatched(a.as_ref(), id, 1, "d1").await;
    }
    let mut racers = JoinSet::new();
    for (store, order) in [(a.clone(), ids.clone()), (b.clone(), reversed)] {
        racers.spawn(async move {
            let mut done = 0;
            for seq in (1..=SEQS).step_by(3) {
                // Three reports of every task per batch, tasks interleaved.
                let batch: Vec<_> = (seq..seq + 3)
                    .flat_map(|s| {
                        order
                            .iter()
                            .map(move |t| report("d1", t, 1, s, out(&format!("{s}"))))
                    })
                    .collect();
                let got = store.apply(&batch, NOW).await.expect("apply");
                for (r, applied) in batch.iter().zip(got) {
                    match applied {
                        kennel_store::Applied::Done { .. } => done += 1,
                        kennel_store::Applied::Duplicate { last_seq } => {
                            assert!(last_seq >= r.seq)
                        }
                        other => panic!("seq {} of {}: {other:?}", r.seq, r.task_id),
                    }
                }
            }
            done
        });
    }
    let done: usize = all(racers).await.into_iter().sum();
    assert_eq!(
        done,
        TASKS * SEQS as usize,
        "each report applied exactly once"
    );
    for id in &ids {
        let chunks = b.task_output(id, 1, 0, 1000).await.unwrap();
        let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..=SEQS).collect::<Vec<_>>(), "{id}");
    }
}

/// Writers on two coordinators store events at once while a reader on a third follows them
/// with `events_after` from the last id it saw, as an SSE stream resuming with `Last-Event-ID`
/// does: it never finds an id missing below one it has seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_become_visible_in_id_order_under_concurrent_writers() {
    const WRITERS: usize = 8;
    const EACH: usize = 60;
    let (schema, a, b) = two_coordinators().await;
    let reader = schema.connect().await;
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.spawn(async move {
            for i in 0..EACH {
                // Events of three kinds of transaction: alone, with a task, with a daemon.
                match i % 3 {
                    0 => {
                        let data = serde_json::json!({ "writer": w, "i": i });
                        store
                            .record_event("test.tick", None, None, data, NOW)
                            .await
                            .map(drop)
                    }
                    1 => {
                        let task = new_task(&format!("t{w}-{i}"), 1);
                        store.create_task(task, NOW).await.map(drop)
                    }
                    _ => {
                        let machine = format!("m{w}");
                        store
                            .daemon_connected(&format!("d{w}"), &hello(&machine), NOW)
                            .await
                            .map(drop)
                    }
                }
                .expect("write an event");
            }
        });
    }
    let total = (WRITERS * EACH) as i64;
    let follow = async {
        let (mut last, mut reads_while_writing) = (0_i64, 0);
        while last < total {
            let writing = !writers.is_empty() && writers.try_join_next().is_none();
            let got = reader.events_after(last, 50).await.expect("read events");
            for e in &got {
                assert_eq!(
                    e.id,
                    last + 1,
                    "after {last} the next visible event is {}",
                    e.id
                );
                last = e.id;
            }
            if writing && !got.is_empty() {
                reads_while_writing += 1;
            }
            if got.is_empty() {
                tokio::task::yield_now().await;
            }
        }
        reads_while_writing
    };
    let reads_while_writing = tokio::time::timeout(DEADLINE, follow)
        .await
        .expect("the reader sees every event in time");
    all(writers).await;
    assert!(
        reads_while_writing > 1,
        "the reader followed the writers while they wrote ({reads_while_writing} reads)"
    );
    assert_eq!(reader.last_event_id().await.unwrap(), total);
    assert!(reader.events_after(total, 10).await.unwrap().is_empty());
}

/// Event ids are drawn without a lock and committed in any order: a reader is held at an id
/// whose transaction is still open, however many later events are committed, and reads on
/// once it commits; an id whose transaction rolls back is passed once it cannot commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waits_for_an_open_transactions_event_and_passes_a_rolled_back_one() {
    let schema = Schema::create().await;
    let store = schema.connect().await;
    let mut last = tick(&store, 0).await.id;
    for end in ["COMMIT", "ROLLBACK"] {
        // Another writer draws the next id and holds its transaction open.
        let mut writer = schema.server_connection().await;
        let sql = format!(
            "SET search_path TO {}; BEGIN; INSERT INTO events (id, kind, data, at) \
             SELECT (draw_event_ids(1))[1], 'test.open', '{{}}', 0",
            schema.name
        );
        sqlx::raw_sql(&sql).execute(&mut writer).await.unwrap();
        let later = [tick(&store, 1).await, tick(&store, 2).await];
        let read = store.events_after(last, 100).await.unwrap();
        assert!(
            read.is_empty(),
            "read past an open transaction's id: {read:?}"
        );
        sqlx::raw_sql(end).execute(&mut writer).await.unwrap();
        let read = tokio::time::timeout(DEADLINE, async {
            loop {
                let read = store.events_after(last, 100).await.unwrap();
                if read.len() >= 2 {
                    break read;
                }
            }
        })
        .await
        .expect("the reader reads on in time");
        let kinds: Vec<&str> = read.iter().map(|e| e.kind.as_str()).collect();
        let ids: Vec<i64> = read.iter().map(|e| e.id).collect();
        match end {
            "COMMIT" => {
                assert_eq!(kinds, ["test.open", "test.tick", "test.tick"]);
                assert_eq!(&ids[1..], later.map(|e| e.id));
            }
            _ => {
                assert_eq!(kinds, ["test.tick", "test.tick"]);
                assert_eq!(ids, later.map(|e| e.id));
            }
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]) && ids[0] > last);
        last = ids[ids.len() - 1];
    }
}

async fn tick(store: &PgStore, n: u32) -> Event {
    let data = serde_json::json!({ "n": n });
    store
        .record_event("test.tick", None, None, data, NOW)
        .await
        .unwrap()
}

/// The versions recorded in the schema's migration table.
async fn versions(schema: &Schema) -> Vec<i64> {
    let mut conn = schema.server_connection().await;
    let sql = format!(
        "SELECT version FROM {}.kennel_migrations ORDER BY version",
        schema.name
    );
    sqlx::query_scalar(&sql)
        .fetch_all(&mut conn)
        .await
        .expect("read the recorded versions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_schema_is_migrated_once_whoever_connects_and_however_many_at_once() {
    // One after the other: the second finds the schema current and its data in place.
    let schema = Schema::create().await;
    let first = schema.connect().await;
    first.create_task(new_task("t1", 1), NOW).await.unwrap();
    first.close().await;
    let second = schema.connect().await;
    assert!(second.get_task("t1").await.unwrap().is_some());
    assert_eq!(versions(&schema).await, [1, 2, 3, 4]);

    // Four coordinators starting at once on an empty schema: one migrates, all work.
    let schema = Schema::create().await;
    let mut starting = JoinSet::new();
    for _ in 0..4 {
        let url = schema.url.clone();
        starting.spawn(async move { PgStore::connect(&url).await });
    }
    let stores: Vec<PgStore> = all(starting)
        .await
        .into_iter()
        .map(|s| s.expect("every coordinator starts"))
        .collect();
    assert_eq!(versions(&schema).await, [1, 2, 3, 4]);
    for (i, store) in stores.iter().enumerate() {
        store
            .create_task(new_task(&format!("t{i}"), 1), NOW)
            .await
            .unwrap();
    }
    assert_eq!(stores[0].last_event_id().await.unwrap(), 4);
}

#[tokio::test]
async fn a_schema_of_a_newer_kennel_or_no_schema_at_all_is_refused_with_what_to_do() {
    let schema = Schema::create().await;
    schema.connect().await.close().await;
    let mut conn = schema.server_connection().await;
    let sql = format!(
        "INSERT INTO {}.kennel_migrations (version) VALUES (99)",
        schema.name
    );
    sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
    let err = PgStore::connect(&schema.url)
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(
        matches!(
            err,
            StoreError::SchemaTooNew {
                found: 99,
                known: 4
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("run a newer kennel"), "{err}");

    let missing = Schema::named("kennel_t_no_such_schema");
    let err = PgStore::connect(&missing.url)
        .await
        .err()
        .expect("no schema to migrate");
    assert!(matches!(err, StoreError::NoSchema { .. }), "{err:?}");
    assert!(err.to_string().contains("kennel_t_no_such_schema"), "{err}");
    assert!(err.to_string().contains("create it"), "{err}");
}

#[tokio::test]
async fn a_database_refusing_the_connection_is_an_error_naming_it_without_its_password() {
    let host = Schema::named("unused").host();
    let url = format!("postgres://kennel_no_such_role:s3cret@{host}/kennel?sslmode=disable");
    let err = PgStore::connect(&url)
        .await
        .err()
        .expect("the role does not exist");
    let shown = format!("{err} / {:?}", std::error::Error::source(&err));
    assert!(
        shown.contains(&format!("postgres://kennel_no_such_role@{host}/kennel")),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
}

/// How many transactions stored the events of `schema` with ids above `after` (each row's
/// `xmin` is the transaction that inserted it).
async fn transactions_that_stored_events(schema: &Schema, after: i64) -> i64 {
    let mut conn = schema.server_connection().await;
    let sql = format!(
        "SELECT COUNT(DISTINCT xmin::text) FROM {}.events WHERE id > $1",
        schema.name
    );
    sqlx::query_scalar(&sql)
        .bind(after)
        .fetch_one(&mut conn)
        .await
        .expect("count the transactions")
}

/// Many writes of one coordinator at once share commits, and each still answers with the ids
/// its events were stored under: what SSE sends first live must be what it resends after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_each_answers_with_its_stored_event_ids() {
    const CALLS: usize = 300;
    let schema = Schema::create().await;
    let store = Arc::new(schema.connect().await);
    let mut set = JoinSet::new();
    for i in 0..CALLS {
        let store = store.clone();
        set.spawn(async move {
            let task = new_task(&format!("t{i}"), 1);
            let events = match i % 3 {
                0 => vec![store.create_task(task, NOW).await.expect("create").1],
                1 => {
                    let (_, created, sent) = store
                        .create_and_dispatch(task, &format!("d{i}"), NOW)
                        .await
                        .expect("create and dispatch");
                    let (task, sent) = sent.expect("a new task is dispatched");
                    assert_eq!(task.daemon_id, Some(format!("d{i}")));
                    vec![created, sent]
                }
                _ => {
                    let data = serde_json::json!({ "i": i });
                    let recorded = store.record_event("test.tick", None, None, data, NOW);
                    vec![recorded.await.expect("record an event")]
                }
            };
            (i, events)
        });
    }
    let answered: Vec<(usize, Event)> = all(set)
        .await
        .into_iter()
        .flat_map(|(i, events)| events.into_iter().map(move |e| (i, e)))
        .collect();
    let stored = store.events_after(0, 1000).await.unwrap();
    assert_eq!(stored.len(), answered.len());
    let by_id: BTreeMap<i64, _> = stored.into_iter().map(|e| (e.id, e)).collect();
    for (i, event) in &answered {
        let kept = by_id
            .get(&event.id)
            .unwrap_or_else(|| panic!("call {i} answered id {}, which is not stored", event.id));
        assert_eq!(kept, event, "call {i}: the answer is the stored event");
    }
    let transactions = transactions_that_stored_events(&schema, 0).await;
    assert!(
        transactions < CALLS as i64,
        "{CALLS} concurrent writes took {transactions} transactions: none shared a commit"
    );
}

/// A write that fails among others sharing its transaction fails alone: the others are stored
/// and answered, the failing one gets its error, and a reader reads every stored event, in
/// id order, past the ids the failed attempt drew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failing_among_concurrent_writes_fails_alone() {
    const CALLS: usize = 120;
    let schema = Schema::create().await;
    let store = Arc::new(schema.connect().await);
    let mut set = JoinSet::new();
    for i in 0..CALLS {
        let store = store.clone();
        // Calls 40 and 41 submit the same task id: one of them must fail.
        let id = if i == 41 {
            "t40".to_string()
        } else {
            format!("t{i}")
        };
        set.spawn(async move { (i, store.create_task(new_task(&id, 1), NOW).await) });
    }
    let answered = all(set).await;
    let failed: Vec<usize> = answered
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "exactly one of calls 40 and 41 fails: {failed:?}"
    );
    assert!(failed[0] == 40 || failed[0] == 41, "{failed:?}");
    // The failed attempt's ids never commit: a reader is held at them until no transaction
    // that could still commit them runs (another test's migration may run meanwhile), and
    // comes back as an SSE stream would.
    let read_all = async {
        let mut stored: Vec<kennel_proto::api::Event> = Vec::new();
        while stored.len() < CALLS - 1 {
            let after = stored.last().map_or(0, |e| e.id);
            stored.extend(store.events_after(after, 1000).await.unwrap());
        }
        stored
    };
    let stored = tokio::time::timeout(DEADLINE, read_all)
        .await
        .expect("the reader reads every stored event in time");
    assert_eq!(stored.len(), CALLS - 1, "every stored event is read");
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    for (i, result) in &answered {
        if let Ok((queued, event)) = result {
            let read = stored.iter().find(|e| e.id == event.id);
            assert_eq!(read, Some(event), "call {i}");
            let kept = store.get_task(&queued.task.id).await.unwrap();
            assert_eq!(kept.as_ref(), Some(&queued.task), "call {i}");
        }
    }
}

/// Heartbeats are written together, within about a second, the newest of each daemon's kept;
/// closing the store writes what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_many_daemons_are_written_together_and_the_newest_wins() {
    const DAEMONS: usize = 300;
    let schema = Schema::create().await;
    let store = schema.connect().await;
    for d in 0..DAEMONS {
        store
            .daemon_connected(&format!("d{d}"), &hello(&format!("m{d}")), NOW)
            .await
            .unwrap();
    }
    for d in 0..DAEMONS {
        let id = format!("d{d}");
        store.daemon_seen(&id, NOW + 5_000).await.unwrap();
        store.daemon_seen(&id, NOW + 9_000).await.unwrap();
        store.daemon_seen(&id, NOW + 7_000).await.unwrap();
    }
    let seen_at = |store: PgStore| async move {
        let daemons = store.list_daemons().await.unwrap();
        daemons
            .into_iter()
            .map(|d| d.last_seen_at.unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let newest = kennel_store::rfc3339(NOW + 9_000);
    let written = async {
        loop {
            let all = seen_at(store.clone()).await;
            if all.iter().all(|t| *t == newest) {
                return all.len();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let n = tokio::time::timeout(DEADLINE, written)
        .await
        .expect("every heartbeat is written within the deadline");
    assert_eq!(n, DAEMONS);

    store.daemon_seen("d0", NOW + 20_000).await.unwrap();
    store.close().await;
    let other = schema.connect().await;
    let d0 = other.get_daemon("d0").await.unwrap().unwrap();
    assert_eq!(d0.last_seen_at, Some(kennel_store::rfc3339(NOW + 20_000)));
}

/// Reports of many links applied at once are decided together in one batch per group, and
/// each link still gets the answers its own reports would get alone: running, output stored in
/// order, completed, each with its stored events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_many_links_applied_at_once_answer_each_link_as_alone() {
    const LINKS: usize = 60;
    let schema = Schema::create().await;
    let store = Arc::new(schema.connect().await);
    for l in 0..LINKS {
        let (task, daemon) = (format!("t{l:02}"), format!("d{l:02}"));
        store.create_task(new_task(&task, 1), NOW).await.unwrap();
        let sent = store.dispatch(&[dispatch(&task, 1, &daemon)], NOW).await;
        assert!(sent.unwrap()[0].is_some(), "{task} dispatched");
    }
    let setup = store.last_event_id().await.unwrap();
    let mut set = JoinSet::new();
    for l in 0..LINKS {
        let store = store.clone();
        set.spawn(async move {
            let (task, daemon) = (format!("t{l:02}"), format!("d{l:02}"));
            let done = kennel_store::Effect::Complete {
                success: true,
                error: None,
                exit_code: Some(0),
                branch: None,
                commit: None,
            };
            let batch = [
                report(&daemon, &task, 1, 1, kennel_store::Effect::Accepted),
                report(&daemon, &task, 1, 2, out(&format!("a{l}"))),
                report(&daemon, &task, 1, 3, out(&format!("b{l}"))),
                report(&daemon, &task, 1, 4, done),
            ];
            (l, store.apply(&batch, NOW).await.expect("apply"))
        });
    }
    let answered = all(set).await;
    let stored: BTreeMap<i64, _> = store
        .events_after(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e))
        .collect();
    for (l, applied) in answered {
        let task = format!("t{l:02}");
        let statuses: Vec<_> = applied
            .iter()
            .map(|a| match a {
                kennel_store::Applied::Done { task, events } => {
                    for e in events {
                        assert_eq!(stored.get(&e.id), Some(e), "link {l}: stored as answered");
                    }
                    task.as_ref().map(|t| t.status)
                }
                other => panic!("link {l}: {other:?}"),
            })
            .collect();
        assert_eq!(
            statuses,
            [
                Some(TaskStatus::Running),
                None,
                None,
                Some(TaskStatus::Completed)
            ],
            "link {l}"
        );
        let output = store.task_output(&task, 1, 0, 10).await.unwrap();
        let lines: Vec<_> = output.iter().map(|o| o.output.as_str()).collect();
        assert_eq!(lines, [format!("a{l}"), format!("b{l}")], "link {l}");
    }
    assert!(
        transactions_that_stored_events(&schema, setup).await < LINKS as i64,
        "the links' reports shared transactions"
    );
}

/// `sslmode` in the URL is honoured: `require` connects over TLS (the test server has TLS on),
/// and `verify-full` against a certificate no known authority signed is refused with a
/// message naming the database (not its password) and the certificate problem.
#[tokio::test]
async fn the_url_asks_for_tls_and_gets_it_or_a_clear_refusal() {
    let schema = Schema::create().await;
    let store = PgStore::connect(&format!("{}&sslmode=require", schema.url))
        .await
        .expect("connect over TLS");
    store.ping().await.unwrap();
    let mut conn = schema.server_connection().await;
    let over_tls: Vec<bool> = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
         WHERE a.application_name = $1",
    )
    .bind(&schema.name)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(
        !over_tls.is_empty() && over_tls.iter().all(|ssl| *ssl),
        "the store's connections use TLS: {over_tls:?}"
    );
    store.close().await;

    let url = format!("{}&sslmode=verify-full", schema.url);
    let err = PgStore::connect(&url)
        .await
        .err()
        .expect("the test server's certificate is signed by no known authority");
    let mut shown = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        shown.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert!(
        shown.contains("failed to open database at postgres://"),
        "{shown}"
    );
    assert!(shown.to_lowercase().contains("certificate"), "{shown}");
}

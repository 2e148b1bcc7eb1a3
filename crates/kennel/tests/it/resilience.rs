//! Losing nothing: leases, lost daemons, reattach within the grace, coordinator `kill -9`.

use kennel_proto::api::{Page, Task};
use kennel_proto::link::{ErrorCode, TaskRef};
use kennel_proto::{AttemptStatus, ServerMessage, TaskStatus};
use kennel_testkit::wait_task_status;

use crate::{daemon, server, server_with, task, WAIT};

#[tokio::test]
async fn an_unaccepted_lease_expires_and_the_task_is_retried() -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\naccept_timeout = \"1s\"\n").await?;
    let api = srv.api();
    let mut d = daemon(&srv, "lease", 1).await?;
    let t = api.submit(&task("lease")).await?;
    let first = d.expect_spawn(WAIT).await?;
    assert_eq!((first.task_id.as_str(), first.attempt), (t.id.as_str(), 1));
    // Say nothing: the lease runs out and attempt 2 is dispatched.
    let second = d.expect_spawn(WAIT).await?;
    assert_eq!(
        (second.task_id.as_str(), second.attempt),
        (t.id.as_str(), 2)
    );

    // The late answer for attempt 1 is refused, not applied.
    d.accept(&t.id, 1).await?;
    let err = d.expect_error(WAIT).await?;
    assert_eq!(err.code, ErrorCode::StaleAttempt);
    assert_eq!(
        (err.task_id.as_deref(), err.attempt),
        (Some(t.id.as_str()), Some(1))
    );

    d.accept(&t.id, 2).await?;
    d.complete(&t.id, 2, true).await?;
    d.expect_ack(&t.id, 2, 2, WAIT).await?;
    let detail = api.task(&t.id).await?;
    assert_eq!(detail.task.status, TaskStatus::Completed);
    assert_eq!(detail.task.attempt, 2);
    let statuses: Vec<_> = detail.attempts.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        vec![AttemptStatus::Expired, AttemptStatus::Completed]
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_daemon_loses_its_task_to_a_new_attempt_and_its_messages_are_refused(
) -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\nreattach_grace = \"1s\"\n").await?;
    let api = srv.api();
    let mut a = daemon(&srv, "lost-a", 1).await?;
    let t = api.submit(&task("lost")).await?;
    let s = a.expect_spawn(WAIT).await?;
    a.accept(&t.id, 1).await?;
    a.output(&t.id, 1, "from attempt one").await?;
    a.expect_ack(&t.id, 1, 2, WAIT).await?;

    let mut b = daemon(&srv, "lost-b", 1).await?;
    a.drop_connection().await;
    // After the grace the task is retried on b with a new attempt.
    let retry = b.expect_spawn(WAIT).await?;
    assert_eq!(
        (retry.task_id.as_str(), retry.attempt),
        (s.task_id.as_str(), 2)
    );

    // a comes back too late, still claiming attempt 1: it is told to drop it.
    a.reconnect(vec![TaskRef {
        task_id: t.id.clone(),
        attempt: 1,
    }])
    .await?;
    let err = a.expect_error(WAIT).await?;
    assert_eq!(err.code, ErrorCode::StaleAttempt);
    a.output(&t.id, 1, "late output").await?;
    let err = a.expect_error(WAIT).await?;
    assert_eq!(err.code, ErrorCode::StaleAttempt);

    b.accept(&t.id, 2).await?;
    b.complete(&t.id, 2, true).await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    assert_eq!(done.attempt, 2);
    let out1 = api.output(&t.id, Some(1), 0).await?;
    let texts: Vec<_> = out1.items.iter().map(|c| c.output.as_str()).collect();
    assert_eq!(
        texts,
        vec!["from attempt one"],
        "the late output was not stored"
    );
    let detail = api.task(&t.id).await?;
    assert_eq!(detail.attempts[0].status, AttemptStatus::Lost);
    Ok(())
}

#[tokio::test]
async fn a_silent_daemon_is_closed_after_missed_heartbeats() -> anyhow::Result<()> {
    let srv = server_with(
        "[server.protocol]\nheartbeat_interval = \"1s\"\nmissed_heartbeats = 2\n\
         [server.scheduler]\nreattach_grace = \"1s\"\n",
    )
    .await?;
    let api = srv.api();
    let mut a = daemon(&srv, "silent", 1).await?;
    assert_eq!(a.authenticated().heartbeat_interval_secs, 1);
    let t = api.submit(&task("silent")).await?;
    a.expect_spawn(WAIT).await?;
    a.accept(&t.id, 1).await?;
    // No heartbeats from here on.
    let (code, reason) = a.wait_closed(WAIT).await?;
    assert_eq!(code, 4005, "{reason}");
    assert!(reason.contains("heartbeat"), "{reason}");
    let mut b = daemon(&srv, "silent-b", 1).await?;
    let retry = b.expect_spawn(WAIT).await?;
    assert_eq!((retry.task_id.as_str(), retry.attempt), (t.id.as_str(), 2));
    Ok(())
}

#[tokio::test]
async fn a_daemon_that_reconnects_within_the_grace_keeps_its_task() -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\nreattach_grace = \"60s\"\n").await?;
    let api = srv.api();
    let mut a = daemon(&srv, "reattach", 1).await?;
    let t = api.submit(&task("reattach")).await?;
    a.expect_spawn(WAIT).await?;
    a.accept(&t.id, 1).await?;
    a.output(&t.id, 1, "before").await?;
    a.expect_ack(&t.id, 1, 2, WAIT).await?;
    let id_before = a.daemon_id().to_string();

    a.drop_connection().await;
    a.reconnect(vec![TaskRef {
        task_id: t.id.clone(),
        attempt: 1,
    }])
    .await?;
    assert_eq!(a.daemon_id(), id_before, "same machine, same daemon id");
    a.output(&t.id, 1, "after").await?;
    a.complete(&t.id, 1, true).await?;
    a.expect_ack(&t.id, 1, 4, WAIT).await?;

    let detail = api.task(&t.id).await?;
    assert_eq!(detail.task.status, TaskStatus::Completed);
    assert_eq!(detail.task.attempt, 1, "no retry happened");
    let out = api.output(&t.id, Some(1), 0).await?;
    let texts: Vec<_> = out.items.iter().map(|c| c.output.as_str()).collect();
    assert_eq!(texts, vec!["before", "after"]);
    Ok(())
}

#[tokio::test]
async fn a_daemon_that_reconnects_without_its_task_has_it_retried() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut a = daemon(&srv, "forgot", 1).await?;
    let t = api.submit(&task("forgot")).await?;
    a.expect_spawn(WAIT).await?;
    a.accept(&t.id, 1).await?;
    a.expect_ack(&t.id, 1, 1, WAIT).await?;
    a.drop_connection().await;
    a.reconnect(vec![]).await?;
    let retry = a.expect_spawn(WAIT).await?;
    assert_eq!((retry.task_id.as_str(), retry.attempt), (t.id.as_str(), 2));
    Ok(())
}

#[tokio::test]
async fn kill_9_of_the_server_loses_no_accepted_task() -> anyhow::Result<()> {
    let mut srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "k9", 1).await?;
    let running = api.submit(&task("running")).await?;
    d.expect_spawn(WAIT).await?;
    d.accept(&running.id, 1).await?;
    d.output(&running.id, 1, "line 1").await?;
    d.expect_ack(&running.id, 1, 2, WAIT).await?;
    let mut queued = Vec::new();
    for i in 0..20 {
        queued.push(api.submit(&task(&format!("q{i}"))).await?.id);
    }

    srv.kill9().await?;
    d.drop_connection().await;
    srv.restart().await?;

    let page: Page<Task> = api.get("/api/v1/tasks?limit=100").await?;
    assert_eq!(page.items.len(), 21, "every accepted task is still there");
    let still_queued = page
        .items
        .iter()
        .filter(|t| t.status == TaskStatus::Queued)
        .count();
    assert_eq!(still_queued, 20);
    let r = page
        .items
        .iter()
        .find(|t| t.id == running.id)
        .expect("running task listed");
    assert_eq!(r.status, TaskStatus::Running);

    // The daemon comes back with its task and finishes it; then the queue drains to it.
    d.reconnect(vec![TaskRef {
        task_id: running.id.clone(),
        attempt: 1,
    }])
    .await?;
    d.output(&running.id, 1, "line 2").await?;
    d.complete(&running.id, 1, true).await?;
    d.expect_ack(&running.id, 1, 4, WAIT).await?;
    let out = api.output(&running.id, Some(1), 0).await?;
    let texts: Vec<_> = out.items.iter().map(|c| c.output.as_str()).collect();
    assert_eq!(texts, vec!["line 1", "line 2"]);
    let next = d.expect_spawn(WAIT).await?;
    assert_eq!(next.task_id, queued[0], "FIFO survives the restart");
    Ok(())
}

#[tokio::test]
async fn cancel_interrupts_a_running_task_and_refuses_its_later_reports() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "cancel", 1).await?;
    let t = api.submit(&task("cancel-me")).await?;
    d.expect_spawn(WAIT).await?;
    d.accept(&t.id, 1).await?;
    let cancelled: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/cancel", t.id))
        .await?;
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    match d.recv(WAIT).await? {
        ServerMessage::InterruptTask(i) => {
            assert_eq!((i.task_id.as_str(), i.attempt), (t.id.as_str(), 1))
        }
        ServerMessage::Ack(_) => match d.recv(WAIT).await? {
            ServerMessage::InterruptTask(i) => assert_eq!(i.task_id, t.id),
            other => panic!("expected interruptTask, got {other:?}"),
        },
        other => panic!("expected interruptTask, got {other:?}"),
    }
    d.complete(&t.id, 1, true).await?;
    let err = d.expect_error(WAIT).await?;
    assert_eq!(err.code, ErrorCode::StaleAttempt);
    assert_eq!(api.task(&t.id).await?.task.status, TaskStatus::Cancelled);

    // A queued task cancels at once and is never dispatched.
    let q = api.submit(&task("queued-cancel")).await?;
    let c: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/cancel", q.id))
        .await?;
    assert_eq!(c.status, TaskStatus::Cancelled);
    Ok(())
}

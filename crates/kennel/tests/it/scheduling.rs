//! Who gets which task, and when: least-loaded dispatch, capacity, priority, labels, drain.

use kennel_proto::api::{Daemon, Task};
use kennel_proto::TaskStatus;

use crate::{daemon, server, task, WAIT};

#[tokio::test]
async fn dispatches_to_the_least_loaded_daemon() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut a = daemon(&srv, "least-a", 4).await?;
    let t1 = api.submit(&task("t1")).await?;
    let s1 = a.expect_spawn(WAIT).await?;
    assert_eq!(s1.task_id, t1.id);
    assert_eq!(s1.attempt, 1);
    a.accept(&s1.task_id, 1).await?;

    // b is idle, a runs one task: the next task must go to b.
    let mut b = daemon(&srv, "least-b", 4).await?;
    let t2 = api.submit(&task("t2")).await?;
    let s2 = b.expect_spawn(WAIT).await?;
    assert_eq!(s2.task_id, t2.id, "the idle daemon gets the next task");
    b.accept(&s2.task_id, 1).await?;

    // Both run one: two more tasks are spread one each.
    let t3 = api.submit(&task("t3")).await?;
    let t4 = api.submit(&task("t4")).await?;
    let sa = a.expect_spawn(WAIT).await?;
    let sb = b.expect_spawn(WAIT).await?;
    let mut got = vec![sa.task_id.clone(), sb.task_id.clone()];
    got.sort();
    let mut want = vec![t3.id.clone(), t4.id.clone()];
    want.sort();
    assert_eq!(got, want);

    // Loads 2 and 2; b finishes both of its tasks; the next two go to b (0 < 2), not a.
    a.accept(&sa.task_id, 1).await?;
    b.accept(&sb.task_id, 1).await?;
    b.complete(&s2.task_id, 1, true).await?;
    b.complete(&sb.task_id, 1, true).await?;
    b.expect_ack(&sb.task_id, 1, 2, WAIT).await?;
    let t5 = api.submit(&task("t5")).await?;
    let s5 = b.expect_spawn(WAIT).await?;
    assert_eq!(s5.task_id, t5.id);
    assert!(crate::only_acks_pending(&mut a), "a got nothing meanwhile");
    Ok(())
}

#[tokio::test]
async fn capacity_is_respected() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "cap", 2).await?;
    let t1 = api.submit(&task("c1")).await?;
    let t2 = api.submit(&task("c2")).await?;
    let t3 = api.submit(&task("c3")).await?;
    let s1 = d.expect_spawn(WAIT).await?;
    let s2 = d.expect_spawn(WAIT).await?;
    assert_eq!(
        [s1.task_id.as_str(), s2.task_id.as_str()],
        [t1.id.as_str(), t2.id.as_str()]
    );
    d.accept(&s1.task_id, 1).await?;
    d.accept(&s2.task_id, 1).await?;
    d.expect_ack(&s2.task_id, 1, 1, WAIT).await?;

    let third = api.task(&t3.id).await?;
    assert_eq!(third.task.status, TaskStatus::Queued, "no third slot");
    let daemons: Vec<Daemon> = api.get("/api/v1/daemons").await?;
    let me = daemons
        .iter()
        .find(|x| x.machine_id == "cap")
        .expect("daemon listed");
    assert_eq!((me.active_tasks, me.max_concurrent_tasks), (2, 2));
    assert!(
        crate::only_acks_pending(&mut d),
        "nothing beyond capacity was sent"
    );

    d.complete(&s1.task_id, 1, true).await?;
    let s3 = d.expect_spawn(WAIT).await?;
    assert_eq!(s3.task_id, t3.id, "a freed slot takes the queued task");
    Ok(())
}

#[tokio::test]
async fn higher_priority_first_then_fifo() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "prio", 1).await?;
    let busy = api.submit(&task("busy")).await?;
    let s = d.expect_spawn(WAIT).await?;
    assert_eq!(s.task_id, busy.id);
    d.accept(&busy.id, 1).await?;

    let low1 = api.submit(&task("low1")).await?;
    let low2 = api.submit(&task("low2")).await?;
    let mut high = task("high");
    high.priority = 10;
    let high = api.submit(&high).await?;
    let mut neg = task("neg");
    neg.priority = -5;
    let neg = api.submit(&neg).await?;

    let mut order = Vec::new();
    let mut current = busy.id.clone();
    for _ in 0..4 {
        d.complete(&current, 1, true).await?;
        let next = d.expect_spawn(WAIT).await?;
        d.accept(&next.task_id, 1).await?;
        order.push(next.task_id.clone());
        current = next.task_id;
    }
    assert_eq!(order, vec![high.id, low1.id, low2.id, neg.id]);
    Ok(())
}

#[tokio::test]
async fn agent_profiles_and_labels_must_match() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut plain = daemon(&srv, "plain", 4).await?;
    let mut gpu = kennel_testkit::TestDaemon::connect(
        &srv.ws_url(),
        kennel_testkit::DaemonOpts {
            machine_id: "gpu".into(),
            max_concurrent_tasks: 4,
            agents: vec!["aider".into()],
            labels: [("gpu".to_string(), "a100".to_string())].into(),
            ..kennel_testkit::DaemonOpts::with_key(srv.admin_key())
        },
    )
    .await?;
    let mut t = task("needs-gpu");
    t.agent = Some("aider".into());
    t.labels.insert("gpu".into(), "a100".into());
    let t = api.submit(&t).await?;
    let s = gpu.expect_spawn(WAIT).await?;
    assert_eq!(s.task_id, t.id);
    assert_eq!(s.agent, "aider");

    // No daemon offers `codex`: the task waits, and does not block other work.
    let mut nobody = task("nobody");
    nobody.agent = Some("codex".into());
    let nobody = api.submit(&nobody).await?;
    let other = api.submit(&task("other")).await?;
    let s = plain.expect_spawn(WAIT).await?;
    assert_eq!(s.task_id, other.id);
    assert_eq!(api.task(&nobody.id).await?.task.status, TaskStatus::Queued);
    Ok(())
}

#[tokio::test]
async fn a_drained_daemon_gets_no_new_work() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut a = daemon(&srv, "drain-a", 2).await?;
    let t1 = api.submit(&task("d1")).await?;
    let s1 = a.expect_spawn(WAIT).await?;
    a.accept(&s1.task_id, 1).await?;
    let drained: Daemon = api
        .post_empty(&format!("/api/v1/daemons/{}/drain", a.daemon_id()))
        .await?;
    assert!(drained.draining);
    let t2 = api.submit(&task("d2")).await?;
    // The running task may still report and finish.
    a.complete(&t1.id, 1, true).await?;
    a.expect_ack(&t1.id, 1, 2, WAIT).await?;
    let mut b = daemon(&srv, "drain-b", 2).await?;
    let s2 = b.expect_spawn(WAIT).await?;
    assert_eq!(s2.task_id, t2.id);
    assert!(
        crate::only_acks_pending(&mut a),
        "the drained daemon got nothing"
    );
    let done: Task = api.task(&t1.id).await?.task;
    assert_eq!(done.status, TaskStatus::Completed);
    Ok(())
}

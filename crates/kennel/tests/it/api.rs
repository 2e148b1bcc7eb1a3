//! The REST API and event streams as a client sees them.

use kennel_proto::api::{Page, Task};
use kennel_proto::{ServerMessage, TaskStatus};
use kennel_testkit::{EventStream, Method, StatusCode};

use crate::{daemon, server, task, WAIT};

#[tokio::test]
async fn every_endpoint_but_health_and_ready_needs_a_key() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    for path in ["/health", "/ready"] {
        let (status, _) = api.raw(Method::GET, path, None, None).await?;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    for path in [
        "/api/v1/tasks",
        "/api/v1/daemons",
        "/api/v1/keys",
        "/api/v1/status",
        "/api/v1/events",
        "/metrics",
        "/api/openapi.json",
    ] {
        let (status, body) = api.raw(Method::GET, path, None, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert!(body.contains("\"unauthorized\""), "{path}: {body}");
        let (status, _) = api
            .raw(Method::GET, path, Some("kn_000000000000_wrong"), None)
            .await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // A client key cannot manage keys.
    let client = api
        .create_key("ci", &[kennel_proto::api::Scope::Client])
        .await?;
    let (status, body) = api
        .raw(Method::GET, "/api/v1/keys", Some(&client.key), None)
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = api
        .raw(Method::GET, "/api/v1/tasks", Some(&client.key), None)
        .await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_clear_errors() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let key = srv.admin_key().to_string();
    let cases = [
        (
            r#"{"name":"x","prompt":"y","prio":1}"#,
            "unknown field `prio`",
        ),
        (r#"{"name":"x"}"#, "missing field `prompt`"),
        (r#"{"name":"","prompt":"y"}"#, "`name` must be"),
        (
            r#"{"name":"x","prompt":"y","agent":"../sh"}"#,
            "invalid agent profile",
        ),
        (
            r#"{"name":"x","prompt":"y","repo":{"url":"r","baseBranch":"a..b"}}"#,
            "baseBranch",
        ),
        (
            r#"{"name":"x","prompt":"y","env":{"A-B":"1"}}"#,
            "environment variable name",
        ),
        (
            r#"{"name":"x","prompt":"y","maxAttempts":0}"#,
            "maxAttempts",
        ),
        ("{nope", "invalid JSON body"),
    ];
    for (body, want) in cases {
        let (status, text) = api
            .raw(
                Method::POST,
                "/api/v1/tasks",
                Some(&key),
                Some(body.to_string()),
            )
            .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
    }
    // A task that could never be sent to a daemon in one frame is refused, naming the field.
    let big_env = format!(
        r#"{{"name":"x","prompt":"y","env":{{"BIG":"{}"}}}}"#,
        "v".repeat(3 << 20)
    );
    let split = format!(
        r#"{{"name":"x","prompt":"{}","env":{{"A":"{}"}}}}"#,
        "p".repeat(400 << 10),
        "v".repeat(700 << 10)
    );
    for (body, want) in [
        (big_env, "the largest is `env.BIG` (3.0 MiB)"),
        (split, "`env` 700.0 KiB, `prompt` 400.0 KiB"),
    ] {
        let (status, text) = api
            .raw(Method::POST, "/api/v1/tasks", Some(&key), Some(body))
            .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(
            text.contains("too large to send to a daemon") && text.contains(want),
            "{text}"
        );
    }
    let (status, text) = api
        .raw(Method::GET, "/api/v1/tasks/t-nope", Some(&key), None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    let (status, _) = api
        .raw(Method::GET, "/api/v1/tasks?status=bogus", Some(&key), None)
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .raw(Method::GET, "/api/v1/nope", Some(&key), None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Nothing was created by the bad requests.
    let page: Page<Task> = api.get("/api/v1/tasks").await?;
    assert!(page.items.is_empty());
    // Last: the server closes a connection whose oversized body it did not read.
    let huge = format!(r#"{{"name":"x","prompt":"{}"}}"#, "p".repeat(5 << 20));
    let (status, text) = api
        .raw(Method::POST, "/api/v1/tasks", Some(&key), Some(huge))
        .await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    Ok(())
}

#[tokio::test]
async fn lists_page_with_cursors_and_filter() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(api.submit(&task(&format!("p{i}"))).await?.id);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/tasks?limit=3&cursor={c}"),
            None => "/api/v1/tasks?limit=3".to_string(),
        };
        let page: Page<Task> = api.get(&path).await?;
        seen.extend(page.items.iter().map(|t| t.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");
    let queued: Page<Task> = api.get("/api/v1/tasks?status=queued").await?;
    assert_eq!(queued.items.len(), 7);
    let running: Page<Task> = api.get("/api/v1/tasks?status=running").await?;
    assert!(running.items.is_empty());
    Ok(())
}

#[tokio::test]
async fn pause_resume_and_messages_reach_the_daemon() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "ctl", 1).await?;
    let t = api.submit(&task("ctl")).await?;
    d.expect_spawn(WAIT).await?;
    d.accept(&t.id, 1).await?;
    d.expect_ack(&t.id, 1, 1, WAIT).await?;

    let paused: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/pause", t.id))
        .await?;
    assert_eq!(paused.status, TaskStatus::Paused);
    assert!(
        matches!(d.recv(WAIT).await?, ServerMessage::PauseTask(c) if c.task_id == t.id && c.attempt == 1)
    );
    let (status, body) = api
        .raw(
            Method::POST,
            &format!("/api/v1/tasks/{}/pause", t.id),
            Some(srv.admin_key()),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "pausing twice is harmless: {body}");
    let resumed: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/resume", t.id))
        .await?;
    assert_eq!(resumed.status, TaskStatus::Running);
    assert!(matches!(d.recv(WAIT).await?, ServerMessage::ResumeTask(c) if c.task_id == t.id));

    let (status, _) = api
        .raw(
            Method::POST,
            &format!("/api/v1/tasks/{}/messages", t.id),
            Some(srv.admin_key()),
            Some(r#"{"message":"also add tests"}"#.into()),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    match d.recv(WAIT).await? {
        ServerMessage::SendMessage(m) => {
            assert_eq!(
                (m.task_id.as_str(), m.attempt, m.message.as_str()),
                (t.id.as_str(), 1, "also add tests")
            )
        }
        other => panic!("expected sendMessage, got {other:?}"),
    }

    // The daemon's own status reports are applied too.
    d.status_change(&t.id, 1, "running", "paused").await?;
    d.expect_ack(&t.id, 1, 2, WAIT).await?;
    assert_eq!(api.task(&t.id).await?.task.status, TaskStatus::Paused);

    // A queued task cannot be paused.
    let q = api.submit(&task("queued")).await?;
    let (status, body) = api
        .raw(
            Method::POST,
            &format!("/api/v1/tasks/{}/pause", q.id),
            Some(srv.admin_key()),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("only a running task can be paused"), "{body}");
    Ok(())
}

#[tokio::test]
async fn events_resume_from_last_event_id_without_gaps() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let url = format!("{}/api/v1/events", srv.url());
    let mut first = EventStream::connect(&url, Some(srv.admin_key()), None).await?;
    for i in 0..3 {
        api.submit(&task(&format!("e{i}"))).await?;
    }
    let mut last = 0i64;
    let mut created = 0;
    while created < 3 {
        let ev = first.next(WAIT).await?;
        let id: i64 = ev.id.parse()?;
        assert_eq!(id, last + 1, "contiguous ids");
        last = id;
        if ev.event == "task.created" {
            created += 1;
        }
    }
    drop(first);

    // Meanwhile: more events, including a daemon connecting and a dispatch.
    let mut d = daemon(&srv, "events", 1).await?;
    let late = api.submit(&task("e-late")).await?;
    let spawned = d.expect_spawn(WAIT).await?;

    let mut resumed =
        EventStream::connect(&url, Some(srv.admin_key()), Some(&last.to_string())).await?;
    let mut kinds = Vec::new();
    let (mut saw_late, mut saw_dispatch) = (false, false);
    while !(saw_late && saw_dispatch) {
        let ev = resumed.next(WAIT).await?;
        let id: i64 = ev.id.parse()?;
        assert_eq!(id, last + 1, "no gap, no repeat after Last-Event-ID");
        last = id;
        let data = ev.json()?;
        kinds.push(ev.event.clone());
        saw_late |= ev.event == "task.created" && data["taskId"] == late.id.as_str();
        saw_dispatch |= ev.event == "task.status" && data["taskId"] == spawned.task_id.as_str();
    }
    // Events before the resume point are not repeated; the ones after it are all there.
    assert!(kinds.contains(&"daemon.connected".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"task.created".to_string()), "{kinds:?}");
    let (status, _) = api
        .raw(
            Method::GET,
            "/api/v1/events?after=x",
            Some(srv.admin_key()),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn output_streams_live_and_ends_with_the_task() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "stream", 1).await?;
    let t = api.submit(&task("stream")).await?;
    d.expect_spawn(WAIT).await?;
    d.accept(&t.id, 1).await?;
    d.output(&t.id, 1, "one").await?;
    d.expect_ack(&t.id, 1, 2, WAIT).await?;
    let url = format!("{}/api/v1/tasks/{}/output/stream", srv.url(), t.id);
    let mut s = EventStream::connect(&url, Some(srv.admin_key()), None).await?;
    let first = s.next(WAIT).await?;
    assert_eq!((first.event.as_str(), first.id.as_str()), ("output", "1:2"));
    d.output(&t.id, 1, "two").await?;
    d.progress(&t.id, 1, "edited README.md").await?;
    d.complete(&t.id, 1, true).await?;
    let two = s.next(WAIT).await?;
    assert_eq!(two.json()?["output"], "two");
    let progress = s.next(WAIT).await?;
    assert_eq!(progress.json()?["stream"], "progress");
    let end = s.next(WAIT).await?;
    assert_eq!(end.event, "end");
    assert_eq!(end.json()?["status"], "completed");

    // Resuming from an id replays only what came after it.
    let mut again = EventStream::connect(&url, Some(srv.admin_key()), Some("1:3")).await?;
    let next = again.next(WAIT).await?;
    assert_eq!(next.id, "1:4");
    Ok(())
}

#[tokio::test]
async fn status_metrics_and_openapi_describe_the_server() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "m", 3).await?;
    api.submit(&task("m1")).await?;
    d.expect_spawn(WAIT).await?;
    let status: kennel_proto::api::ServerStatus = api.get("/api/v1/status").await?;
    assert_eq!(
        (
            status.daemons_connected,
            status.capacity_total,
            status.capacity_used
        ),
        (1, 3, 1)
    );
    assert_eq!(status.store, "sqlite");
    let (code, metrics) = api
        .raw(Method::GET, "/metrics", Some(srv.admin_key()), None)
        .await?;
    assert_eq!(code, StatusCode::OK);
    for name in [
        "kennel_queue_depth",
        "kennel_daemons_connected",
        "kennel_dispatch_latency_seconds_bucket",
        "kennel_tasks{state=\"running\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let spec: serde_json::Value = api.get("/api/openapi.json").await?;
    for path in [
        "/api/v1/tasks",
        "/api/v1/tasks/{id}/output/stream",
        "/api/v1/events",
        "/api/v1/keys",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let (code, html) = api.raw(Method::GET, "/api/docs", None, None).await?;
    assert_eq!(code, StatusCode::OK);
    assert!(html.contains("/api/openapi.json"));
    Ok(())
}

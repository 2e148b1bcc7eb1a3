//! Long-lived agents through the real binary: the registry with its per-key ids and session
//! guards, messages with claims that race and expire, spawn policies applied from a file with
//! the CLI, and nothing lost across a `kill -9` of the coordinator.

use std::process::Output;

use kennel_proto::agents::{Agent, InboxPage, Message, RegisterAgent};
use kennel_proto::api::Scope;
use kennel_testkit::sse::EventStream;
use kennel_testkit::Api;
use reqwest::{Method, StatusCode};

use crate::{server, WAIT};

fn reg(id: &str, instance: &str) -> RegisterAgent {
    RegisterAgent {
        id: id.into(),
        name: format!("agent {id}"),
        machine: "m1".into(),
        instance_id: instance.into(),
        tags: vec!["worker".into()],
        ..RegisterAgent::default()
    }
}

async fn agent_api(srv: &kennel_testkit::KennelServer, name: &str) -> anyhow::Result<Api> {
    let key = srv.api().create_key(name, &[Scope::Agent]).await?;
    Ok(srv.api().with_key(Some(key.key)))
}

use crate::kennel_cli as kennel;

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn an_agent_id_belongs_to_its_key_and_a_stale_instance_is_refused() -> anyhow::Result<()> {
    let srv = server().await?;
    let (a, b) = (agent_api(&srv, "a").await?, agent_api(&srv, "b").await?);
    let first: Agent = a.post("/api/v1/agents", &reg("rev", "p1")).await?;
    assert_eq!(first.epoch, 1);

    // Another key cannot take the id, however it asks.
    let body = serde_json::to_string(&reg("rev", "evil"))?;
    let (status, text) = b
        .raw(Method::POST, "/api/v1/agents", b.key(), Some(body.clone()))
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("registered with another key"), "{text}");
    let (status, _) = srv
        .api()
        .raw(
            Method::POST,
            "/api/v1/agents",
            Some(srv.admin_key()),
            Some(body),
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A client key cannot register agents at all.
    let client = srv.api().create_key("c", &[Scope::Client]).await?;
    let (status, _) = srv
        .api()
        .raw(
            Method::POST,
            "/api/v1/agents",
            Some(&client.key),
            Some(serde_json::to_string(&reg("x", "p"))?),
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The process restarts and registers again: the old instance is fenced out.
    let second: Agent = a.post("/api/v1/agents", &reg("rev", "p2")).await?;
    assert_eq!(second.epoch, 2);
    let old = r#"{"instanceId":"p1","epoch":1}"#.to_string();
    let (status, text) = a
        .raw(
            Method::POST,
            "/api/v1/agents/rev/heartbeat",
            a.key(),
            Some(old),
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("stale agent instance"), "{text}");
    let (status, _) = a
        .raw(
            Method::GET,
            "/api/v1/agents/rev/inbox?instanceId=p1&epoch=1",
            a.key(),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    let current = r#"{"instanceId":"p2","epoch":2}"#.to_string();
    let (status, _) = a
        .raw(
            Method::POST,
            "/api/v1/agents/rev/heartbeat",
            a.key(),
            Some(current),
        )
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Nor may the other key heartbeat or read as it.
    let (status, _) = b
        .raw(Method::GET, "/api/v1/agents/rev/inbox", b.key(), None)
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    Ok(())
}

#[tokio::test]
async fn two_agents_claim_one_message_exactly_one_wins_and_an_expired_claim_is_released(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let (a, b) = (agent_api(&srv, "a").await?, agent_api(&srv, "b").await?);
    let _: Agent = a.post("/api/v1/agents", &reg("a1", "p")).await?;
    let _: Agent = b.post("/api/v1/agents", &reg("a2", "p")).await?;
    let mut events = EventStream::connect(
        &format!("{}/api/v1/events", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    let job: Message = srv
        .api()
        .post(
            "/api/v1/messages",
            &serde_json::json!({ "to": "tag:worker", "body": "build it", "claimable": true }),
        )
        .await?;
    events
        .wait_for(WAIT, |m| m.event == "message.available")
        .await?;

    let path = format!("/api/v1/messages/{}/claim", job.id);
    let claim = |api: &Api, agent: &str| {
        let body = serde_json::json!({ "agentId": agent, "ttlSecs": 1 }).to_string();
        let (api, path) = (api.clone(), path.clone());
        async move { api.raw(Method::POST, &path, api.key(), Some(body)).await }
    };
    let (x, y) = tokio::join!(claim(&a, "a1"), claim(&b, "a2"));
    let (x, y) = (x?, y?);
    let statuses = [x.0, y.0];
    assert!(
        statuses.contains(&StatusCode::OK) && statuses.contains(&StatusCode::CONFLICT),
        "one claim wins and one is refused: {x:?} {y:?}"
    );
    let (winner, loser) = if x.0 == StatusCode::OK {
        (("a1", &a), ("a2", &b))
    } else {
        (("a2", &b), ("a1", &a))
    };
    let refused = if x.0 == StatusCode::OK { &y.1 } else { &x.1 };
    assert!(
        refused.contains(&format!("claimed by `{}`", winner.0)),
        "{refused}"
    );

    // The claim runs out after a second: released, and the other agent can have it.
    let released = events
        .wait_for(WAIT, |m| m.event == "message.claim.released")
        .await?;
    assert!(released.data.contains(&job.id), "{}", released.data);
    let (status, text) = claim(loser.1, loser.0).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let m: Message = serde_json::from_str(&text)?;
    assert_eq!(m.claimed_by.as_deref(), Some(loser.0));
    Ok(())
}

#[tokio::test]
async fn policies_are_applied_from_a_file_and_keep_their_history() -> anyhow::Result<()> {
    let srv = server().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("policies.toml");
    let write = |mode: &str| {
        std::fs::write(
            &file,
            format!(
                "[[policy]]\nname = \"reviewer\"\nprovider = \"command\"\nmode = \"{mode}\"\n\
                 onDemand = {{ keepaliveSeconds = 60 }}\n\n[[policy]]\nname = \"triager\"\n\
                 provider = \"command\"\nmode = \"always-on\"\n"
            ),
        )
    };
    write("on-demand")?;
    let path = file.display().to_string();
    let applied = kennel(&srv, &["policy", "apply", "-f", &path]).await?;
    assert!(applied.status.success(), "{}", out(&applied));
    assert!(
        out(&applied).contains("policy `reviewer` at version 1"),
        "{}",
        out(&applied)
    );
    write("always-on")?;
    let again = kennel(&srv, &["policy", "apply", "-f", &path]).await?;
    assert!(
        out(&again).contains("policy `reviewer` at version 2"),
        "{}",
        out(&again)
    );
    assert!(
        out(&again).contains("policy `triager` at version 1"),
        "{}",
        out(&again)
    );

    let list = kennel(&srv, &["policy", "list"]).await?;
    assert!(
        out(&list).contains("reviewer") && out(&list).contains("triager"),
        "{}",
        out(&list)
    );
    let deleted = kennel(&srv, &["policy", "delete", "reviewer"]).await?;
    assert!(deleted.status.success(), "{}", out(&deleted));
    let history = kennel(&srv, &["--json", "policy", "history", "reviewer"]).await?;
    let versions: Vec<serde_json::Value> = serde_json::from_slice(&history.stdout)?;
    let kinds: Vec<(i64, bool)> = versions
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap_or(0),
                v.get("policy").is_some(),
            )
        })
        .collect();
    assert_eq!(kinds, [(1, true), (2, true), (3, false)]);
    let gone = kennel(&srv, &["policy", "show", "reviewer"]).await?;
    assert!(!gone.status.success());
    assert!(
        out(&gone).contains("no policy `reviewer`"),
        "{}",
        out(&gone)
    );

    // A bad file is refused before anything is sent, naming what is wrong.
    std::fs::write(
        &file,
        "[[policy]]\nname = \"x\"\nprovider = \"command\"\nmode = \"always-on\"\nkeepalive = 3\n",
    )?;
    let bad = kennel(&srv, &["policy", "apply", "-f", &path]).await?;
    assert!(!bad.status.success());
    assert!(
        out(&bad).contains("unknown field `keepalive`"),
        "{}",
        out(&bad)
    );
    assert!(srv
        .api()
        .get::<Vec<serde_json::Value>>("/api/v1/policies")
        .await?
        .iter()
        .all(|p| p["policy"]["name"] != "x"));
    Ok(())
}

#[tokio::test]
async fn messages_survive_a_kill_9_and_the_inbox_cursor_goes_on_through_the_cli(
) -> anyhow::Result<()> {
    let mut srv = server().await?;
    let a = agent_api(&srv, "a").await?;
    let _: Agent = a.post("/api/v1/agents", &reg("a1", "p")).await?;
    for body in ["one", "two"] {
        let sent = kennel(&srv, &["msg", "send", "a1", body]).await?;
        assert!(sent.status.success(), "{}", out(&sent));
    }
    let page: InboxPage = a.get("/api/v1/agents/a1/inbox").await?;
    let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["one", "two"]);
    let cursor = page.next_cursor;

    let sent = kennel(
        &srv,
        &["msg", "send", "a1", "three", "--idempotency-key", "k3"],
    )
    .await?;
    assert!(sent.status.success(), "{}", out(&sent));
    srv.kill9().await?;
    srv.restart().await?;
    // Sent again after the restart with the same key: still one message.
    let again = kennel(
        &srv,
        &["msg", "send", "a1", "three", "--idempotency-key", "k3"],
    )
    .await?;
    assert!(again.status.success(), "{}", out(&again));
    let a = a.with_key(a.key().map(str::to_string));
    let page: InboxPage = a
        .get(&format!("/api/v1/agents/a1/inbox?after={cursor}"))
        .await?;
    let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["three"]);

    // The CLI reads the same inbox.
    let inbox = kennel(&srv, &["msg", "inbox", "a1"]).await?;
    let text = out(&inbox);
    assert!(
        text.contains(": one") && text.contains(": two") && text.contains(": three"),
        "{text}"
    );
    let agents = kennel(&srv, &["agents", "list"]).await?;
    assert!(out(&agents).contains("a1"), "{}", out(&agents));
    Ok(())
}

#[tokio::test]
async fn an_inbox_streams_what_is_there_then_each_new_message_and_resumes_after_the_last(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let key = srv.api().create_key("a", &[Scope::Agent]).await?;
    let a = srv.api().with_key(Some(key.key.clone()));
    let _: Agent = a.post("/api/v1/agents", &reg("a1", "p")).await?;
    let send = |body: &str| {
        let body = serde_json::json!({ "to": "tag:worker", "body": body });
        let api = srv.api();
        async move { api.post::<_, Message>("/api/v1/messages", &body).await }
    };
    send("first").await?;
    let url = format!("{}/api/v1/agents/a1/inbox/stream", srv.url());
    let mut stream = EventStream::connect(&url, Some(&key.key), None).await?;
    let first = stream.wait_for(WAIT, |m| m.event == "message").await?;
    assert!(first.data.contains("\"first\""), "{}", first.data);
    send("second").await?;
    let second = stream.wait_for(WAIT, |m| m.event == "message").await?;
    assert!(second.data.contains("\"second\""), "{}", second.data);
    drop(stream);

    // Resumed after the first: only what came after it.
    let mut resumed = EventStream::connect(&url, Some(&key.key), Some(&first.id)).await?;
    let next = resumed.wait_for(WAIT, |m| m.event == "message").await?;
    assert_eq!(next.id, second.id);
    // Another agent key may not follow this inbox.
    let other = srv.api().create_key("b", &[Scope::Agent]).await?;
    assert!(EventStream::connect(&url, Some(&other.key), None)
        .await
        .is_err());
    Ok(())
}

#[tokio::test]
async fn a_self_registered_agent_that_stops_heartbeating_goes_offline_after_stale_after(
) -> anyhow::Result<()> {
    let srv = crate::server_with("[server.agents]\nstale_after = \"1s\"\n").await?;
    let a = agent_api(&srv, "a").await?;
    let mut events = EventStream::connect(
        &format!("{}/api/v1/events", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    let _: Agent = a.post("/api/v1/agents", &reg("quiet", "p1")).await?;
    let offline = events
        .wait_for(WAIT, |m| m.event == "agent.offline")
        .await?;
    assert!(
        offline.data.contains("no heartbeat since"),
        "{}",
        offline.data
    );
    let agent: Agent = a.get("/api/v1/agents/quiet").await?;
    assert!(!agent.online);
    // Its next heartbeat brings it back.
    let guard = r#"{"instanceId":"p1","epoch":1}"#.to_string();
    let (status, _) = a
        .raw(
            Method::POST,
            "/api/v1/agents/quiet/heartbeat",
            a.key(),
            Some(guard),
        )
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let agent: Agent = a.get("/api/v1/agents/quiet").await?;
    assert!(agent.online);
    Ok(())
}

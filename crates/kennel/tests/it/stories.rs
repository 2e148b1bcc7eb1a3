//! The build agents' rendezvous on the coordinator: stories added and moved with the CLI reach
//! an agent over `WS /crdt-sync` (the real Automerge sync protocol, the agent's copy kept by
//! `kennel-sync`), the agent's claim and progress come back into the story API with a
//! `story.stage` event, and everything is still there after a `kill -9`.

use automerge::sync::{self, SyncDoc};
use futures_util::{SinkExt, StreamExt};
use kennel_proto::api::{Scope, StoryStage, StoryView};
use kennel_sync::pipeline::StoryUpdate;
use kennel_sync::{Pipeline, Stage};
use kennel_testkit::sse::EventStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{kennel_cli as kennel, server, WAIT};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(srv: &kennel_testkit::KennelServer, key: &str) -> anyhow::Result<Socket> {
    let url = format!("{}/crdt-sync", srv.url().replacen("http", "ws", 1));
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

/// Syncs `p` with the rendezvous over `ws` until `done(p)` holds.
async fn sync_until(
    p: &mut Pipeline,
    state: &mut sync::State,
    ws: &mut Socket,
    done: impl Fn(&mut Pipeline, &sync::State) -> bool,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        while let Some(m) = p.doc_mut().sync().generate_sync_message(state) {
            ws.send(WsMessage::Binary(m.encode().into())).await?;
        }
        if done(p, state) {
            return Ok(());
        }
        let frame = tokio::time::timeout_at(until, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("the pipeline did not sync within {WAIT:?}"))?;
        match frame {
            Some(Ok(WsMessage::Binary(b))) => {
                let m = sync::Message::decode(&b)?;
                p.doc_mut().sync().receive_sync_message(state, m)?;
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("the rendezvous closed the sync: {other:?}"),
        }
    }
}

/// Whether the rendezvous said it has every change of `p`. (A message generated while an
/// earlier one is unanswered is held back, so sending once is not enough.)
fn pushed(p: &mut Pipeline, state: &sync::State) -> bool {
    state.their_heads.as_deref() == Some(&p.doc_mut().get_heads()[..])
}

#[tokio::test]
async fn an_agent_syncs_the_pipeline_claims_a_story_and_its_progress_shows_on_the_api(
) -> anyhow::Result<()> {
    let mut srv = server().await?;
    let key = srv.api().create_key("agent-a", &[Scope::Agent]).await?;
    let added = kennel(&srv, &["story", "add", "Build the parser", "--id", "s1"]).await?;
    assert!(added.status.success(), "{added:?}");
    let moved = kennel(&srv, &["story", "move", "s1", "2_current"]).await?;
    assert!(moved.status.success(), "{moved:?}");

    // The agent starts with nothing and gets the story.
    let mut agent = Pipeline::new("agent-a");
    let mut state = sync::State::new();
    let mut ws = connect(&srv, &key.key).await?;
    sync_until(&mut agent, &mut state, &mut ws, |p, _| {
        p.story("s1").is_some_and(|s| s.stage == Stage::Current)
    })
    .await?;
    assert_eq!(agent.story("s1").unwrap().title, "Build the parser");

    // It claims it and finishes; the rendezvous shows it, with an event.
    let mut events = EventStream::connect(
        &format!("{}/api/v1/events", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    agent.claim("s1", 1)?;
    agent.heartbeat("ws://127.0.0.1:1/crdt-sync")?;
    agent.record(
        "s1",
        &StoryUpdate {
            stage: Some(Stage::Qa),
            branch: Some("kennel/s1".into()),
            commit: Some("abc123".into()),
            ..StoryUpdate::default()
        },
    )?;
    sync_until(&mut agent, &mut state, &mut ws, pushed).await?;
    let ev = events
        .wait_for(WAIT, |m| {
            m.event == "story.stage" && m.data.contains("3_qa")
        })
        .await?;
    let data = ev.json()?["data"].clone();
    assert_eq!(
        (
            data["storyId"].as_str(),
            data["from"].as_str(),
            data["to"].as_str()
        ),
        (Some("s1"), Some("2_current"), Some("3_qa"))
    );
    let s: StoryView = srv.api().get("/api/v1/stories/s1").await?;
    assert_eq!(s.stage, StoryStage::Qa);
    assert_eq!(s.owner.as_deref(), Some("agent-a"));
    assert_eq!(s.branch.as_deref(), Some("kennel/s1"));

    // After a kill -9, the rendezvous has all of it.
    drop(ws);
    srv.kill9().await?;
    srv.restart().await?;
    let s: StoryView = srv.api().get("/api/v1/stories/s1").await?;
    assert_eq!(
        (s.stage, s.owner.as_deref()),
        (StoryStage::Qa, Some("agent-a"))
    );
    let listed = kennel(&srv, &["story", "list"]).await?;
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("3_qa") && text.contains("kennel/s1"),
        "{text}"
    );

    // A deleted story stays deleted for an agent that syncs again.
    let deleted = kennel(&srv, &["story", "delete", "s1"]).await?;
    assert!(deleted.status.success());
    let mut ws = connect(&srv, &key.key).await?;
    let mut state = sync::State::new();
    sync_until(&mut agent, &mut state, &mut ws, |p, _| {
        p.story("s1").is_none()
    })
    .await?;
    assert!(srv
        .api()
        .get::<Vec<StoryView>>("/api/v1/stories")
        .await?
        .is_empty());
    Ok(())
}

#[tokio::test]
async fn the_sync_needs_an_agent_key() -> anyhow::Result<()> {
    let srv = server().await?;
    let client = srv.api().create_key("c", &[Scope::Client]).await?;
    assert!(connect(&srv, &client.key).await.is_err());
    assert!(connect(&srv, "kn_nope_nope").await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_join_token_becomes_an_agent_key_once() -> anyhow::Result<()> {
    let srv = server().await?;
    let minted = kennel(&srv, &["agent-tokens", "create", "--name", "laptop"]).await?;
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout)?.trim().to_string();
    assert!(token.starts_with("kj_"), "{token}");

    // No key: the token is the credential.
    let body = serde_json::json!({ "token": token }).to_string();
    let (status, text) = srv
        .api()
        .raw(
            reqwest::Method::POST,
            "/api/v1/agent-tokens/exchange",
            None,
            Some(body.clone()),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{text}");
    let key: kennel_proto::api::CreatedKey = serde_json::from_str(&text)?;
    assert_eq!(key.info.scopes, [Scope::Agent]);
    assert_eq!(key.info.name, "agent laptop");
    // The key it became syncs the pipeline.
    let mut ws = connect(&srv, &key.key).await?;
    let mut agent = Pipeline::new("laptop");
    let mut state = sync::State::new();
    sync_until(&mut agent, &mut state, &mut ws, pushed).await?;

    // Once only; and a made-up token is refused the same way.
    let (status, text) = srv
        .api()
        .raw(
            reqwest::Method::POST,
            "/api/v1/agent-tokens/exchange",
            None,
            Some(body),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED);
    assert!(text.contains("used already"), "{text}");
    let fake = serde_json::json!({ "token": format!("kj_{}_{}", "0".repeat(12), "0".repeat(48)) });
    let (status, _) = srv
        .api()
        .raw(
            reqwest::Method::POST,
            "/api/v1/agent-tokens/exchange",
            None,
            Some(fake.to_string()),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED);
    Ok(())
}

//! The daemon link under bad input: wrong keys, malformed, oversized and out-of-order frames,
//! replays. The server answers clearly and keeps serving everyone else.

use std::time::Duration;

use kennel_proto::api::Scope;
use kennel_proto::link::{Authenticate, ErrorCode, Secret};
use kennel_proto::{DaemonMessage, ServerMessage};
use kennel_testkit::{DaemonOpts, TestDaemon};

use crate::{daemon, server, server_with, task, WAIT};

fn hello(key: &str) -> String {
    DaemonMessage::Authenticate(Authenticate {
        api_key: Secret(key.to_string()),
        machine_id: "raw".into(),
        hostname: "raw".into(),
        max_concurrent_tasks: 1,
        protocol_version: kennel_proto::PROTOCOL_VERSION,
        min_protocol_version: None,
        version: "test".into(),
        labels: Default::default(),
        agents: vec![],
        running_tasks: vec![],
    })
    .to_json()
}

#[tokio::test]
async fn a_wrong_key_is_closed_with_a_reason() -> anyhow::Result<()> {
    let srv = server().await?;
    let (first, close) =
        TestDaemon::connect_raw(&srv.ws_url(), hello("kn_0123456789ab_nope")).await?;
    match first {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected an unauthorized error, got {other:?}"),
    }
    let (code, reason) = close.expect("the server closes the connection");
    assert_eq!(code, 4001);
    assert!(reason.contains("invalid or revoked API key"), "{reason}");

    // A valid key without the daemon scope is refused too.
    let client = srv.api().create_key("reader", &[Scope::Client]).await?;
    let (_, close) = TestDaemon::connect_raw(&srv.ws_url(), hello(&client.key)).await?;
    let (code, reason) = close.expect("closed");
    assert_eq!(code, 4001);
    assert!(reason.contains("daemon or relay scope"), "{reason}");

    // A daemon-scoped key works, and stops working once revoked.
    let dk = srv.api().create_key("worker", &[Scope::Daemon]).await?;
    let d = TestDaemon::connect(&srv.ws_url(), DaemonOpts::with_key(dk.key.clone())).await?;
    drop(d);
    let _: kennel_proto::api::ApiKey = srv
        .api()
        .delete(&format!("/api/v1/keys/{}", dk.info.id))
        .await?;
    let (_, close) = TestDaemon::connect_raw(&srv.ws_url(), hello(&dk.key)).await?;
    assert_eq!(close.expect("closed").0, 4001);
    Ok(())
}

#[tokio::test]
async fn the_first_frame_must_authenticate_in_time() -> anyhow::Result<()> {
    let srv = server_with("[server.protocol]\nauth_timeout = \"1s\"\n").await?;
    let (first, close) =
        TestDaemon::connect_raw(&srv.ws_url(), r#"{"type":"heartbeat"}"#.into()).await?;
    match first {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::NotAuthenticated),
        other => panic!("expected notAuthenticated, got {other:?}"),
    }
    assert_eq!(close.expect("closed").0, 4000);

    let (_, close) = TestDaemon::connect_raw_with(&srv.ws_url(), vec![], WAIT).await?;
    let (code, reason) = close.expect("closed after the deadline");
    assert_eq!(code, 4003, "{reason}");

    let mut future = DaemonOpts::with_key(srv.admin_key());
    future.protocol_version = 9;
    future.min_protocol_version = Some(5);
    let a = Authenticate {
        api_key: Secret(srv.admin_key().to_string()),
        machine_id: future.machine_id.clone(),
        hostname: "x".into(),
        max_concurrent_tasks: 1,
        protocol_version: 9,
        min_protocol_version: Some(5),
        version: "future".into(),
        labels: Default::default(),
        agents: vec![],
        running_tasks: vec![],
    };
    let (first, close) =
        TestDaemon::connect_raw(&srv.ws_url(), DaemonMessage::Authenticate(a).to_json()).await?;
    match first {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::UnsupportedVersion),
        other => panic!("expected unsupportedVersion, got {other:?}"),
    }
    assert_eq!(close.expect("closed").0, 4002);

    // A newer daemon that still speaks v1 is answered in v1.
    future.min_protocol_version = Some(1);
    let d = TestDaemon::connect(&srv.ws_url(), future).await?;
    assert_eq!(
        d.authenticated().protocol_version,
        kennel_proto::PROTOCOL_VERSION
    );
    Ok(())
}

#[tokio::test]
async fn bad_frames_get_errors_and_everyone_carries_on() -> anyhow::Result<()> {
    let srv = server_with("[server.protocol]\nmax_frame_bytes = 4096\n").await?;
    let api = srv.api();
    let mut bad = daemon(&srv, "bad", 1).await?;
    let mut good = daemon(&srv, "good", 1).await?;
    assert_eq!(bad.authenticated().max_frame_bytes, 4096);

    bad.send_raw_text("{not json".into()).await?;
    assert_eq!(
        bad.expect_error(WAIT).await?.code,
        ErrorCode::MalformedFrame
    );
    bad.send_raw_binary(vec![1, 2, 3]).await?;
    assert_eq!(
        bad.expect_error(WAIT).await?.code,
        ErrorCode::MalformedFrame
    );
    let big = format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "x".repeat(10_000));
    bad.send_raw_text(big).await?;
    let e = bad.expect_error(WAIT).await?;
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert!(e.message.contains("4096"), "{}", e.message);
    bad.send_raw_text(r#"{"type":"taskOutput","taskId":"t-1"}"#.into())
        .await?;
    let e = bad.expect_error(WAIT).await?;
    assert_eq!(e.code, ErrorCode::InvalidMessage);
    assert!(e.message.contains("missing field"), "{}", e.message);
    bad.send_raw_text(r#"{"type":"telemetry","cpu":3}"#.into())
        .await?;
    bad.send_raw_text(hello(srv.admin_key())).await?;
    assert_eq!(
        bad.expect_error(WAIT).await?.code,
        ErrorCode::NotAuthenticated
    );

    // Both daemons still get work, and out-of-order seqs are refused with the expected seq.
    let t1 = api.submit(&task("after-garbage-1")).await?;
    let t2 = api.submit(&task("after-garbage-2")).await?;
    let mut got = Vec::new();
    for d in [&mut bad, &mut good] {
        let s = d.expect_spawn(WAIT).await?;
        d.accept(&s.task_id, 1).await?;
        d.expect_ack(&s.task_id, 1, 1, WAIT).await?;
        got.push(s.task_id);
    }
    got.sort();
    let mut want = vec![t1.id.clone(), t2.id.clone()];
    want.sort();
    assert_eq!(got, want);

    let mine = &got[0];
    let holder = if bad.highest_ack(mine, 1).is_some() {
        &mut bad
    } else {
        &mut good
    };
    holder.set_seq(mine, 1, 5);
    holder.output(mine, 1, "too early").await?;
    let e = holder.expect_error(WAIT).await?;
    assert_eq!(e.code, ErrorCode::SeqGap);
    assert_eq!(e.expected_seq, Some(2));
    assert_eq!(
        api.output(mine, Some(1), 0).await?.items.len(),
        0,
        "nothing applied"
    );
    Ok(())
}

#[tokio::test]
async fn replayed_output_is_applied_once_and_in_order() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "replay", 1).await?;
    let t = api.submit(&task("replay")).await?;
    d.expect_spawn(WAIT).await?;
    d.accept(&t.id, 1).await?;
    for i in 2..=6 {
        d.output(&t.id, 1, &format!("line {i}")).await?;
    }
    d.expect_ack(&t.id, 1, 6, WAIT).await?;

    // Replay 4..=6 (as an outbox does after a reconnect), then continue with 7 and 8.
    d.drop_connection().await;
    d.reconnect(vec![kennel_proto::link::TaskRef {
        task_id: t.id.clone(),
        attempt: 1,
    }])
    .await?;
    d.set_seq(&t.id, 1, 4);
    for i in 4..=8 {
        d.output(&t.id, 1, &format!("line {i}")).await?;
    }
    d.expect_ack(&t.id, 1, 8, WAIT).await?;

    let out = api.output(&t.id, Some(1), 0).await?;
    let got: Vec<(u64, String)> = out
        .items
        .iter()
        .map(|c| (c.seq, c.output.clone()))
        .collect();
    let want: Vec<(u64, String)> = (2..=8).map(|i| (i, format!("line {i}"))).collect();
    assert_eq!(got, want, "every line once, in order");
    let page2 = api.output(&t.id, Some(1), 5).await?;
    assert_eq!(
        page2.items.first().map(|c| c.seq),
        Some(6),
        "paged by after_seq"
    );
    Ok(())
}

#[tokio::test]
async fn output_with_invalid_utf8_bytes_and_long_lines_is_stored() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "bytes", 1).await?;
    let t = api.submit(&task("bytes")).await?;
    d.expect_spawn(WAIT).await?;
    d.accept(&t.id, 1).await?;
    let lossy = String::from_utf8_lossy(b"caf\xe9 \xff ok").to_string();
    d.output(&t.id, 1, &lossy).await?;
    let long = "y".repeat(500_000);
    d.output(&t.id, 1, &long).await?;
    d.expect_ack(&t.id, 1, 3, Duration::from_secs(30)).await?;
    let out = api.output(&t.id, Some(1), 0).await?;
    assert_eq!(out.items[0].output, lossy);
    assert_eq!(out.items[1].output.len(), 500_000);
    Ok(())
}

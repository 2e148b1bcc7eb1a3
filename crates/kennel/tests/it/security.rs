//! The coordinator as an attacker meets it: keys posing as other machines, revoked keys with
//! live sessions, oversized and abusive input.

use kennel_proto::api::{Daemon, Scope};
use kennel_proto::{ErrorCode, ServerMessage, TaskStatus};
use kennel_testkit::{wait_task_status, DaemonOpts, KennelServer, TestDaemon};

use crate::{server, task, WAIT};

async fn key(srv: &KennelServer, name: &str, scope: Scope) -> anyhow::Result<String> {
    Ok(srv.api().create_key(name, &[scope]).await?.key)
}

fn opts(key: &str, machine: &str) -> DaemonOpts {
    DaemonOpts {
        machine_id: machine.to_string(),
        hostname: machine.to_string(),
        ..DaemonOpts::with_key(key)
    }
}

#[tokio::test]
async fn another_key_cannot_pose_as_a_daemon_and_the_victim_keeps_its_task() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let victim_key = key(&srv, "victim", Scope::Daemon).await?;
    let mut victim = TestDaemon::connect(&srv.ws_url(), opts(&victim_key, "victim-box")).await?;
    let t = api.submit(&task("precious")).await?;
    let s = victim.expect_spawn(WAIT).await?;
    victim.accept(&s.task_id, 1).await?;
    victim.expect_ack(&s.task_id, 1, 1, WAIT).await?;

    // A daemon key and a relay key of someone else, each naming the victim's machine and
    // claiming its attempt.
    for (name, scope) in [("thief", Scope::Daemon), ("rogue relay", Scope::Relay)] {
        let thief_key = key(&srv, name, scope).await?;
        let mut o = opts(&thief_key, "victim-box");
        o.running_tasks = vec![kennel_proto::link::TaskRef {
            task_id: t.id.clone(),
            attempt: 1,
        }];
        let (first, close) =
            TestDaemon::connect_raw(&srv.ws_url(), o.authenticate().to_json()).await?;
        match first {
            Some(ServerMessage::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Unauthorized);
                assert!(
                    e.message.contains("machine id `victim-box`")
                        && e.message.contains("bound to another API key"),
                    "{}",
                    e.message
                );
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
        assert_eq!(close.map(|c| c.0), Some(4001), "{name}");
    }

    // The victim was not replaced and finishes its own task.
    victim.output(&s.task_id, 1, "still mine").await?;
    victim.complete(&s.task_id, 1, true).await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    assert_eq!(done.daemon_id.as_deref(), Some(victim.daemon_id()));
    let out = api.output(&t.id, Some(1), 0).await?;
    assert_eq!(
        out.items
            .iter()
            .map(|c| c.output.as_str())
            .collect::<Vec<_>>(),
        ["still mine"]
    );
    let daemons: Vec<Daemon> = api.get("/api/v1/daemons").await?;
    let d = daemons
        .iter()
        .find(|d| d.machine_id == "victim-box")
        .expect("listed");
    assert!(d.connected);
    assert!(d.key_id.as_deref().is_some_and(|k| victim_key.contains(k)));

    // Rotating the key: once the bound key is revoked, a new key may take the machine over.
    let bound = d.key_id.clone().unwrap_or_default();
    api.delete::<serde_json::Value>(&format!("/api/v1/keys/{bound}"))
        .await?;
    let new_key = key(&srv, "rotated", Scope::Daemon).await?;
    let rotated = TestDaemon::connect(&srv.ws_url(), opts(&new_key, "victim-box")).await?;
    assert_eq!(
        rotated.daemon_id(),
        victim.daemon_id(),
        "same daemon, new key"
    );
    Ok(())
}

#[tokio::test]
async fn revoking_a_key_ends_its_live_sessions() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let daemon_key = api.create_key("worker", &[Scope::Daemon]).await?;
    let client_key = api.create_key("watcher", &[Scope::Client]).await?;
    let mut d = TestDaemon::connect(&srv.ws_url(), opts(&daemon_key.key, "revoked-box")).await?;
    let mut events = kennel_testkit::EventStream::connect(
        &format!("{}/api/v1/events?after=0", srv.url()),
        Some(&client_key.key),
        None,
    )
    .await?;
    let mut output = {
        let t = api.submit(&task("watched")).await?;
        kennel_testkit::EventStream::connect(
            &format!("{}/api/v1/tasks/{}/output/stream", srv.url(), t.id),
            Some(&client_key.key),
            None,
        )
        .await?
    };
    let s = d.expect_spawn(WAIT).await?;
    d.accept(&s.task_id, 1).await?;

    api.delete::<serde_json::Value>(&format!("/api/v1/keys/{}", daemon_key.info.id))
        .await?;
    let (code, reason) = d.wait_closed(WAIT).await?;
    assert_eq!((code, reason.as_str()), (4001, "API key revoked"));
    // Work submitted now is not sent over the revoked link.
    let later = api.submit(&task("after-revoke")).await?;
    assert_eq!(api.task(&later.id).await?.task.status, TaskStatus::Queued);

    api.delete::<serde_json::Value>(&format!("/api/v1/keys/{}", client_key.info.id))
        .await?;
    for stream in [&mut events, &mut output] {
        let end = stream.wait_for(WAIT, |m| m.event == "error").await?;
        assert!(end.data.contains("revoked"), "{}", end.data);
        assert!(stream.next(WAIT).await.is_err(), "the stream has ended");
    }
    Ok(())
}

/// Authenticates as `hello` on `ws_url`, then sends up to 400,000 bad frames without ever
/// reading the answers, until the other side cuts the link (or 60 s pass). Returns how many
/// frames went out.
async fn flood_without_reading(ws_url: &str, hello: &DaemonOpts) -> anyhow::Result<u64> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
    // Never read: the answers to the bad frames pile up on the server's side.
    let (mut sink, _never_read) = futures_util::StreamExt::split(ws);
    sink.send(Message::text(hello.authenticate().to_json()))
        .await?;
    let bad = r#"{"type":"taskOutput","taskId":"t-x"}"#;
    let mut sent = 0u64;
    let flood = async {
        for _ in 0..400_000 {
            if sink.feed(Message::text(bad)).await.is_err() {
                break;
            }
            sent += 1;
            if sent.is_multiple_of(1000) && sink.flush().await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), flood).await;
    Ok(sent)
}

/// The value of an unlabelled counter in Prometheus text, 0 if absent.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_floods_without_reading_is_cut_off_and_memory_stays_flat(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let key = key(&srv, "flooder", Scope::Daemon).await?;
    let before = srv.rss_kib().unwrap_or_default();
    let sent = flood_without_reading(&srv.ws_url(), &opts(&key, "flooder")).await?;
    let metrics: String = api
        .raw(
            kennel_testkit::Method::GET,
            "/metrics",
            Some(srv.admin_key()),
            None,
        )
        .await?
        .1;
    assert_eq!(
        counter(&metrics, "kennel_links_overflowed_total"),
        1.0,
        "the flooding link was closed for not reading (sent {sent} frames)"
    );
    assert!(
        sent < 400_000,
        "the connection was cut ({sent} frames sent)"
    );
    let after = srv.rss_kib().unwrap_or_default();
    assert!(
        after < before + 64 * 1024,
        "server memory grew from {before} KiB to {after} KiB"
    );
    // The server carries on.
    let t = api.submit(&task("after the flood")).await?;
    assert_eq!(api.task(&t.id).await?.task.status, TaskStatus::Queued);
    Ok(())
}

/// A raw TCP connection that has completed the WebSocket handshake on `/ws/daemon`, or the
/// HTTP status the server answered instead.
async fn raw_ws(addr: std::net::SocketAddr) -> anyhow::Result<Result<tokio::net::TcpStream, u16>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "GET /ws/daemon HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            anyhow::bail!("the server closed during the handshake");
        }
        head.push(byte[0]);
    }
    let status: u16 = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(if status == 101 { Ok(s) } else { Err(status) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_before_authentication_cost_little_memory() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let srv = server().await?;
    let before = srv.rss_kib().unwrap_or_default();
    // 60 connections, each starting a 15 MiB first frame and sending 2 MiB of it.
    let mut cut = 0;
    let mut conns = Vec::new();
    for _ in 0..60 {
        let Ok(mut s) = raw_ws(srv.addr()).await? else {
            anyhow::bail!("the upgrade was refused");
        };
        let len: u64 = 15 << 20;
        let mut header = vec![0x81u8, 0x80 | 127];
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]); // mask key: the payload goes as is
        s.write_all(&header).await?;
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        while sent < (2 << 20) {
            if s.write_all(&chunk).await.is_err() {
                cut += 1;
                break;
            }
            sent += chunk.len();
        }
        conns.push(s);
    }
    let after = srv.rss_kib().unwrap_or_default();
    assert!(
        after < before + 48 * 1024,
        "60 oversized first frames took the server from {before} KiB to {after} KiB"
    );
    assert!(
        cut > 0,
        "the server cut connections that sent more than allowed"
    );
    drop(conns);
    // Daemons still connect.
    let mut d = crate::daemon(&srv, "after-oversized", 1).await?;
    srv.api().submit(&task("still works")).await?;
    d.expect_spawn(WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn connections_waiting_to_authenticate_are_capped() -> anyhow::Result<()> {
    let srv = crate::server_with("[server.protocol]\nmax_unauthenticated = 4\n").await?;
    let mut idle = Vec::new();
    for _ in 0..4 {
        match raw_ws(srv.addr()).await? {
            Ok(s) => idle.push(s),
            Err(status) => anyhow::bail!("refused early with {status}"),
        }
    }
    assert_eq!(
        raw_ws(srv.addr()).await?.err(),
        Some(503),
        "the fifth is refused"
    );
    drop(idle);
    // The slots free when those connections go; a real daemon gets in.
    let d = kennel_testkit::within(
        WAIT,
        "a daemon to connect after the idle ones left",
        async {
            loop {
                match crate::daemon(&srv, "after-cap", 1).await {
                    Ok(d) => return d,
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        },
    )
    .await?;
    assert!(!d.daemon_id().is_empty());
    Ok(())
}

#[tokio::test]
async fn the_relay_limits_links_before_authentication_too() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = server().await?;
    let relay = kennel_testkit::KennelRelay::start(
        crate::bin(),
        &srv,
        "max_unauthenticated = 2\nmax_auth_frame_bytes = 4096",
    )
    .await?;
    let addr = relay.addr()?;
    let Ok(mut big) = raw_ws(addr).await? else {
        anyhow::bail!("the relay refused the first upgrade");
    };
    let Ok(_idle) = raw_ws(addr).await? else {
        anyhow::bail!("the relay refused the second upgrade");
    };
    assert_eq!(
        raw_ws(addr).await?.err(),
        Some(503),
        "a third waiting link is refused"
    );
    // A first frame past the budget ends the link: the relay closes the socket.
    let len: u64 = 1 << 20;
    let mut frame = vec![0x81u8, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend(std::iter::repeat_n(b'x', 64 << 10));
    let _ = big.write_all(&frame).await;
    // Reading ends (EOF or reset) only when the relay has closed the socket; the deadline
    // fails the test if it keeps the link open.
    let mut rest = Vec::new();
    let _ = kennel_testkit::within(
        WAIT,
        "the relay to close the link",
        big.read_to_end(&mut rest),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_cuts_off_a_daemon_that_floods_without_reading() -> anyhow::Result<()> {
    let srv = server().await?;
    let relay = kennel_testkit::KennelRelay::start(crate::bin(), &srv, "").await?;
    let hello = opts(kennel_testkit::RELAY_DAEMON_KEY, "relay-flooder");
    let sent = flood_without_reading(&relay.ws_url(), &hello).await?;
    assert!(
        sent < 400_000,
        "the relay cut the link ({sent} frames sent)"
    );
    // The relay carries on: a well-behaved daemon connects behind it.
    let d = TestDaemon::connect(
        &relay.ws_url(),
        opts(kennel_testkit::RELAY_DAEMON_KEY, "relay-polite"),
    )
    .await?;
    assert_eq!(d.daemon_id(), "relay-polite");
    Ok(())
}

//! Resource limits seen from outside, on the real binaries: the HTTP listeners of the
//! coordinator, the gateway and the relay close idle and slow-header connections and refuse
//! connections beyond `max_connections` while `/health` keeps answering; the gateway bounds
//! heartbeat and incident bodies (413) and what it keeps of them.
//!
//! Every wait is a read that ends, or a request that answers, with a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use kennel_testkit::raw_http::RawConn;
use kennel_testkit::{KennelGateway, KennelRelay, KennelServer};
use serde_json::{json, Value};

use crate::{bin, daemon, server_with, task, WAIT};

/// Short listener timeouts for the tests: a request head within 1 s, idle for at most 4 s.
fn http_section(table: &str) -> String {
    format!("[{table}.http]\nheader_read_timeout = \"1000ms\"\nidle_timeout = \"4s\"\n")
}

/// How long after its header timeout a connection may still be open on a slow machine.
const MARGIN: Duration = Duration::from_secs(9);

async fn health(base: &str) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .get(format!("{base}/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "/health answered {}",
        resp.status()
    );
    Ok(())
}

fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    Ok(url.trim_start_matches("http://").parse()?)
}

/// Opens `idle` silent and `slow` slow-header connections to `addr`, checks `/health` of
/// `base` answers while they are open, and that the listener closes them all within its
/// header timeout plus [`MARGIN`].
async fn flood_is_shed(
    addr: SocketAddr,
    base: &str,
    idle: usize,
    slow: usize,
) -> anyhow::Result<()> {
    let mut conns = RawConn::many(idle, || RawConn::idle(addr)).await?;
    conns.extend(RawConn::many(slow, || RawConn::slow_header(addr)).await?);
    health(base).await?;
    let longest = RawConn::all_closed_within(conns, Duration::from_secs(1) + MARGIN).await?;
    eprintln!("{idle} idle and {slow} slow-header connections closed; the last after {longest:?}");
    health(base).await?;
    Ok(())
}

#[tokio::test]
async fn the_server_sheds_idle_and_slow_clients_but_keeps_websockets_and_kept_alive_ones(
) -> anyhow::Result<()> {
    let srv = server_with(&http_section("server")).await?;
    let addr = srv.addr();
    // A daemon link: upgraded, so neither timeout applies to it.
    let mut d = daemon(&srv, "limits-d", 1).await?;
    // A kept-alive connection that stays silent gets the idle timeout (4 s), not the header
    // one (1 s); one that starts a request and stalls gets the header timeout.
    let mut kept = RawConn::idle(addr).await?;
    assert_eq!(kept.get("/health", WAIT).await?, 200);
    let mut stalled = RawConn::idle(addr).await?;
    assert_eq!(stalled.get("/health", WAIT).await?, 200);
    stalled.send(b"GET /heal").await?;

    flood_is_shed(addr, &srv.url(), 200, 50).await?;

    let stalled_for = stalled.closed_within(WAIT).await?;
    assert!(
        stalled_for < Duration::from_secs(3),
        "a stalled second request gets the header timeout, closed after {stalled_for:?}"
    );
    let kept_for = kept.closed_within(WAIT).await?;
    assert!(
        kept_for >= Duration::from_millis(3500),
        "an idle kept-alive connection gets the idle timeout, closed after {kept_for:?}"
    );
    // The daemon link outlived both timeouts and still takes work.
    let id = srv.api().submit(&task("after-the-flood")).await?.id;
    let spawn = d.expect_spawn(WAIT).await?;
    assert_eq!(spawn.task_id, id);
    Ok(())
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() -> anyhow::Result<()> {
    let srv = server_with(
        "[server.http]\nheader_read_timeout = \"60000ms\"\nidle_timeout = \"60s\"\nmax_connections = 16\n",
    )
    .await?;
    let addr = srv.addr();
    let mut held = RawConn::many(16, || RawConn::idle(addr)).await?;
    // The 17th is accepted and closed straight away, long before any timeout.
    let mut extra = RawConn::idle(addr).await?;
    let closed_after = extra.closed_within(Duration::from_secs(10)).await?;
    eprintln!("the connection over the limit was closed after {closed_after:?}");
    // Freeing slots lets clients in again.
    held.truncate(8);
    health_returns(&srv.url()).await?;
    drop(held);
    Ok(())
}

/// Waits until `/health` of `base` answers, trying every 50 ms.
async fn health_returns(base: &str) -> anyhow::Result<()> {
    kennel_testkit::within(WAIT, "/health to answer", async {
        let mut every = tokio::time::interval(Duration::from_millis(50));
        loop {
            every.tick().await;
            if health(base).await.is_ok() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn under_a_256_open_files_limit_a_flood_is_capped_then_shed() -> anyhow::Result<()> {
    // The binary behind a shell that lowers its open-files limit, soft and hard.
    let dir = tempfile::tempdir()?;
    let wrapper = dir.path().join("kennel-256");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -n 256 || exit 97\nexec '{}' \"$@\"\n",
            bin().display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    let srv = KennelServer::start_with_config(&wrapper, &http_section("server")).await?;
    let addr = srv.addr();
    // 256 − 64 = 192 connections fit; the rest are closed on accept, so the server never
    // runs out of descriptors for its store and its daemons.
    let conns = RawConn::many(250, || RawConn::idle(addr)).await?;
    RawConn::all_closed_within(conns, Duration::from_secs(1) + MARGIN).await?;
    health_returns(&srv.url()).await?;
    let mut d = daemon(&srv, "limits-fd", 1).await?;
    let id = srv.api().submit(&task("after-the-fd-flood")).await?.id;
    assert_eq!(d.expect_spawn(WAIT).await?.task_id, id);
    Ok(())
}

#[test]
fn http_sections_refuse_unknown_keys_and_show_their_defaults() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("kennel.toml");
    let show = |toml: &str| -> anyhow::Result<std::process::Output> {
        std::fs::write(&file, toml)?;
        Ok(std::process::Command::new(bin())
            .arg("--config")
            .arg(&file)
            .args(["config", "show"])
            .env_remove("KENNEL_CONFIG")
            .output()?)
    };
    for table in ["server", "gateway", "relay"] {
        let out = show(&format!("[{table}.http]\nidle_timeut = \"3s\"\n"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "[{table}.http] accepted an unknown key"
        );
        assert!(err.contains("idle_timeut"), "{table}: {err}");
    }
    let out = show("")?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "header_read_timeout = \"10s\"",
        "idle_timeout = \"1m\"",
        "max_connections = 65536",
        "max_report_bytes = 16384",
    ] {
        assert!(text.contains(key), "`config show` lacks {key}:\n{text}");
    }
    Ok(())
}

fn gateway_toml(extra: &str) -> String {
    format!(
        "[gateway]\nmax_report_bytes = 4096\nmax_kept_report_bytes = 16384\n{extra}\n\
         [gateway.rate_limit]\nper_minute = 100000\nburst = 10000\n{}",
        http_section("gateway")
    )
}

#[tokio::test]
async fn the_gateway_sheds_idle_and_slow_clients() -> anyhow::Result<()> {
    let gw = KennelGateway::start(bin(), &gateway_toml(""), &[]).await?;
    flood_is_shed(addr_of(&gw.url())?, &gw.url(), 40, 20).await
}

struct Reporter {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Reporter {
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await?))
    }

    /// Posts `body` as a chunked stream, without a Content-Length.
    async fn post_streamed(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let bytes = body.to_string().into_bytes();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            bytes.chunks(1000).map(|c| Ok(c.to_vec())).collect();
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await?))
    }

    async fn state(&self) -> anyhow::Result<(usize, Value)> {
        let text = self
            .http
            .get(format!("{}/state", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok((text.len(), serde_json::from_str(&text)?))
    }
}

#[tokio::test]
async fn gateway_reports_are_bounded_per_body_and_in_total() -> anyhow::Result<()> {
    let gw = KennelGateway::start(bin(), &gateway_toml(""), &[]).await?;
    let r = Reporter {
        http: reqwest::Client::new(),
        base: gw.url(),
        key: gw.admin_key().to_string(),
    };
    let long = "x".repeat(5000);

    let (status, body) = r.post("/heartbeat", json!({"hostname": long})).await?;
    assert_eq!(status, 413, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("gateway.max_report_bytes (4096 bytes)"),
        "{body}"
    );
    assert_eq!(body["error"]["type"], "request_too_large", "{body}");
    let (status, body) = r
        .post("/gateway/incident", json!({"message": long}))
        .await?;
    assert_eq!(status, 413, "{body}");
    let (status, body) = r
        .post_streamed(
            "/gateway/incident",
            json!({"message": "m", "details": {"log": long}}),
        )
        .await?;
    assert_eq!(status, 413, "without a Content-Length too: {body}");
    let (_, s) = r.state().await?;
    assert_eq!(s["heartbeats"], json!([]), "nothing stored: {s}");
    assert_eq!(s["incidents"], json!([]), "nothing stored: {s}");
    assert_eq!(s["totals"]["heartbeats"], 0, "{s}");

    let (status, body) = r.post("/heartbeat", json!({"hostname": "box"})).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = r
        .post_streamed("/gateway/incident", json!({"message": "disk full"}))
        .await?;
    assert_eq!(status, 200, "{body}");

    // Many bodies just under the limit: /state stays near twice max_kept_report_bytes.
    let near = "y".repeat(3800);
    for i in 0..40 {
        let (status, body) = r
            .post("/heartbeat", json!({"hostname": near, "pid": i}))
            .await?;
        assert_eq!(status, 200, "{body}");
        let (status, body) = r
            .post(
                "/gateway/incident",
                json!({"message": near, "kind": format!("k{i}")}),
            )
            .await?;
        assert_eq!(status, 200, "{body}");
    }
    let (size, s) = r.state().await?;
    assert!(size < 2 * 16384 + 4096, "/state is {size} bytes");
    let beats = s["heartbeats"].as_array().map(Vec::len).unwrap_or(0);
    assert!((1..=5).contains(&beats), "{beats} heartbeats kept");
    assert_eq!(s["heartbeats"][beats - 1]["pid"], 39, "the newest is kept");
    assert_eq!(s["incidents"][0]["kind"], "k39", "newest first");
    assert_eq!(s["totals"]["heartbeats"], 41, "every heartbeat is counted");
    Ok(())
}

#[tokio::test]
async fn the_relay_sheds_idle_and_slow_clients() -> anyhow::Result<()> {
    let srv: KennelServer = server_with("").await?;
    let mut relay = KennelRelay::start(bin(), &srv, &http_section("relay")).await?;
    relay.wait_upstream(WAIT).await?;
    flood_is_shed(relay.addr()?, &relay.url(), 40, 20).await
}

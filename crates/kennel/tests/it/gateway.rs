//! `kennel gateway` end to end: the real binary on a free port in front of scripted LLM
//! upstreams on loopback ([`ScriptedLlm`]), driven over real HTTP, and by the official
//! `openai` and `anthropic` Python SDKs.

use std::time::Duration;

use kennel_proto::api::Scope;
use kennel_testkit::{refused_addr, within, Behavior, KennelGateway, ScriptedLlm};
use serde_json::{json, Value};

use crate::{bin, WAIT};

/// One upstream in a test config.
struct Up<'a> {
    name: &'a str,
    kind: &'a str,
    base: String,
    priority: i32,
    extra: &'a str,
}

fn up<'a>(name: &'a str, llm: &ScriptedLlm, priority: i32) -> Up<'a> {
    Up {
        name,
        kind: "openai",
        base: llm.openai_base(),
        priority,
        extra: "",
    }
}

fn config(ups: &[Up<'_>], gateway_extra: &str) -> String {
    let mut s = format!(
        "[gateway]\nmax_attempts = 3\nmax_body_bytes = 4096\n{gateway_extra}\n\
         [gateway.rate_limit]\nper_minute = 100000\nburst = 1000\n"
    );
    for u in ups {
        // 1.5 s unless the test sets its own.
        let first_byte = if u.extra.contains("first_byte_timeout") {
            ""
        } else {
            "first_byte_timeout = \"1500ms\"\n"
        };
        s.push_str(&format!(
            "[[gateway.upstreams]]\nname = \"{}\"\nkind = \"{}\"\nbase_url = \"{}\"\n\
             priority = {}\n{first_byte}{}\n",
            u.name, u.kind, u.base, u.priority, u.extra
        ));
    }
    s
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    fn new(gw: &KennelGateway) -> Self {
        Client {
            http: reqwest::Client::new(),
            base: gw.url(),
            key: gw.admin_key().to_string(),
        }
    }

    async fn chat(&self, model: &str, stream: bool) -> anyhow::Result<reqwest::Response> {
        let body = json!({"model": model, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]});
        Ok(self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?)
    }

    async fn messages(&self, model: &str, stream: bool) -> anyhow::Result<reqwest::Response> {
        let body = json!({"model": model, "stream": stream, "max_tokens": 16,
                          "messages": [{"role": "user", "content": "hi"}]});
        Ok(self
            .http
            .post(format!("{}/v1/messages", self.base))
            .header("x-api-key", &self.key)
            .json(&body)
            .send()
            .await?)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "GET {path}: {}", r.status());
        Ok(r.json().await?)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "POST {path}: {}", r.status());
        Ok(r.json().await?)
    }

    /// The health record of upstream `name`.
    async fn health(&self, name: &str) -> anyhow::Result<Value> {
        Ok(self.upstream(name).await?["health"].clone())
    }

    /// Upstream `name`'s entry in `/health` (`coolingDown`, `health`, ...).
    async fn upstream(&self, name: &str) -> anyhow::Result<Value> {
        let h = self.get("/health").await?;
        h["upstreams"]
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no upstream {name} in /health: {h}"))
    }

    /// The `/metrics` text.
    async fn metrics(&self) -> anyhow::Result<String> {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "GET /metrics: {}", r.status());
        Ok(r.text().await?)
    }
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Cooldown length recorded for an upstream, in ms.
fn cooldown_ms(h: &Value) -> i64 {
    h["cooldownUntilMs"].as_i64().unwrap_or(0) - h["lastFailureMs"].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn fails_over_on_refused_500_503_429_and_timeout() -> anyhow::Result<()> {
    // (case, behaviour of the primary or None for a refused connection, class, cooldown ms)
    let cases: [(&str, Option<Behavior>, &str, i64); 5] = [
        ("refused", None, "network", 60_000),
        (
            "500",
            Some(Behavior::Status {
                status: 500,
                retry_after: None,
            }),
            "server_error",
            10_000,
        ),
        (
            "503",
            Some(Behavior::Status {
                status: 503,
                retry_after: None,
            }),
            "overloaded",
            60_000,
        ),
        (
            "429",
            Some(Behavior::Status {
                status: 429,
                retry_after: Some("7".into()),
            }),
            "rate_limited",
            7_000,
        ),
        ("hang", Some(Behavior::HangBeforeHeaders), "timeout", 60_000),
    ];
    for (case, behavior, class, cooldown) in cases {
        let a = ScriptedLlm::start("a").await?;
        let b = ScriptedLlm::start("b").await?;
        let mut primary = up("a", &a, 0);
        // The hang is a non-streaming request: it is cut at the total deadline.
        primary.extra = "total_timeout = \"1500ms\"";
        match behavior {
            Some(beh) => a.script([beh]),
            None => primary.base = format!("http://{}/v1", refused_addr().await?),
        }
        let gw = KennelGateway::start(bin(), &config(&[primary, up("b", &b, 1)], ""), &[]).await?;
        let c = Client::new(&gw);
        let r = c.chat("m", false).await?;
        assert_eq!(r.status(), 200, "{case}");
        assert_eq!(header(&r, "x-kennel-upstream"), "b", "{case}");
        assert_eq!(header(&r, "x-kennel-attempts"), "2", "{case}");
        let body: Value = r.json().await?;
        assert_eq!(
            body["choices"][0]["message"]["content"], "reply from b",
            "{case}"
        );
        let h = c.health("a").await?;
        assert_eq!(h["lastFailureClass"], class, "{case}: {h}");
        assert_eq!(h["consecutiveFailures"], 1, "{case}: {h}");
        assert_eq!(cooldown_ms(&h), cooldown, "{case}: {h}");
        // While a cools down, b is tried first and alone.
        let r = c.chat("m", false).await?;
        assert_eq!(header(&r, "x-kennel-upstream"), "b", "{case}");
        assert_eq!(header(&r, "x-kennel-attempts"), "1", "{case}");
    }
    Ok(())
}

#[tokio::test]
async fn no_failover_after_the_first_streamed_byte() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    let first_event = kennel_testkit::llm::stream_text(false, "m", "reply from a")
        .find("\n\n")
        .map(|i| i + 2)
        .unwrap_or(0);
    // Breaks in the middle of the second event.
    a.script([Behavior::StreamThenBreak {
        bytes: first_event + 10,
    }]);
    let gw =
        KennelGateway::start(bin(), &config(&[up("a", &a, 0), up("b", &b, 1)], ""), &[]).await?;
    let c = Client::new(&gw);
    let r = c.chat("m", true).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "a");
    let text = within(WAIT, "the broken stream to end", r.text()).await??;
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.contains("\"role\":\"assistant\""), "{text}");
    let tail = text.rsplit("\n\n").find(|s| !s.is_empty()).unwrap_or("");
    assert!(tail.starts_with("data: {\"error\""), "{text}");
    let err: Value = serde_json::from_str(tail.trim_start_matches("data: "))?;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("incomplete"),
        "{err}"
    );
    assert!(b.requests().is_empty(), "no failover after the first byte");
    let h = c.health("a").await?;
    assert_eq!(h["lastFailureClass"], "stream_broken", "{h}");

    // Anthropic format, a stall: ended with `event: error` after the idle timeout.
    let x = ScriptedLlm::start("x").await?;
    x.script([Behavior::StreamThenStall { bytes: 300 }]);
    let ups = [Up {
        name: "x",
        kind: "anthropic",
        base: x.anthropic_base(),
        priority: 0,
        extra: "",
    }];
    let gw = KennelGateway::start(bin(), &config(&ups, ""), &[]).await?;
    let c = Client::new(&gw);
    let r = c.messages("claude", true).await?;
    assert_eq!(r.status(), 200);
    let text = within(WAIT, "the stalled stream to end", r.text()).await??;
    assert!(text.starts_with("event: message_start"), "{text}");
    assert!(text.contains("\n\nevent: error\ndata: {"), "{text}");
    assert!(text.contains("stalled"), "{text}");
    Ok(())
}

#[tokio::test]
async fn cooldown_doubles_and_the_upstream_recovers() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    let overloaded = Behavior::Status {
        status: 503,
        retry_after: None,
    };
    a.script([overloaded.clone(), overloaded]);
    let gw = KennelGateway::start(
        bin(),
        &config(
            &[up("a", &a, 0), up("b", &b, 1)],
            "[gateway.cooldowns]\noverload_base = \"400ms\"\n",
        ),
        &[],
    )
    .await?;
    let c = Client::new(&gw);
    let mut expected = 400;
    for _ in 0..2 {
        let r = c.chat("m", false).await?;
        assert_eq!(header(&r, "x-kennel-upstream"), "b");
        let h = c.health("a").await?;
        assert_eq!(cooldown_ms(&h), expected, "{h}");
        // Waiting out the cooldown is the behaviour under test; wait exactly until it ends.
        let until = h["cooldownUntilMs"].as_i64().unwrap_or(0);
        wait_until_ms(until).await;
        expected *= 2;
    }
    let r = c.chat("m", false).await?;
    assert_eq!(header(&r, "x-kennel-upstream"), "a", "recovered");
    assert_eq!(header(&r, "x-kennel-attempts"), "1");
    let h = c.health("a").await?;
    assert_eq!(h["consecutiveFailures"], 0, "{h}");
    assert!(h["cooldownUntilMs"].is_null(), "{h}");
    Ok(())
}

async fn wait_until_ms(until: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    if until > now {
        tokio::time::sleep(Duration::from_millis((until - now) as u64 + 20)).await;
    }
}

#[tokio::test]
async fn when_all_cool_down_the_one_ending_first_is_tried() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    a.script([Behavior::Status {
        status: 429,
        retry_after: Some("30".into()),
    }]);
    b.script([Behavior::Status {
        status: 503,
        retry_after: None,
    }]);
    let gw = KennelGateway::start(
        bin(),
        &config(
            &[up("a", &a, 0), up("b", &b, 1)],
            "[gateway.cooldowns]\noverload_base = \"5000ms\"\n",
        ),
        &[],
    )
    .await?;
    let c = Client::new(&gw);
    let r = c.chat("m", false).await?;
    // Every attempt failed: the last upstream's own error comes back unchanged.
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-kennel-attempts"), "2");
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["message"], "scripted 503 from b");
    // Both cooling: b's cooldown (5 s) ends before a's (30 s), so only b is tried.
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    assert_eq!(header(&r, "x-kennel-attempts"), "1");
    assert_eq!(a.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn renames_models_and_passes_4xx_back_unchanged() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    let mut primary = up("a", &a, 0);
    primary.extra = "models = [\"small\"]\nrenames = { \"gpt-x\" = \"real-model\" }";
    let gw = KennelGateway::start(bin(), &config(&[primary, up("b", &b, 1)], ""), &[]).await?;
    let c = Client::new(&gw);
    let r = c.chat("gpt-x", false).await?;
    assert_eq!(header(&r, "x-kennel-upstream"), "a");
    let body: Value = r.json().await?;
    assert_eq!(body["model"], "real-model");
    assert_eq!(a.requests()[0].body["model"], "real-model");
    // b has no allow-list; a model a does not serve goes to b only.
    let r = c.chat("other", false).await?;
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    let models = c.get("/v1/models").await?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["gpt-x", "small"]);

    a.script([Behavior::Status {
        status: 400,
        retry_after: None,
    }]);
    let r = c.chat("small", false).await?;
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-kennel-attempts"), "1");
    let body: Value = r.json().await?;
    assert_eq!(
        body,
        json!({"error": {"message": "scripted 400 from a", "type": "api_error", "code": 400}})
    );
    let h = c.health("a").await?;
    assert_eq!(h["consecutiveFailures"], 0, "a 4xx is no failure: {h}");
    assert_eq!(b.requests().len(), 1, "no failover on a 4xx");
    Ok(())
}

#[tokio::test]
async fn bad_json_oversized_bodies_and_missing_keys_get_clear_4xx() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let gw = KennelGateway::start(bin(), &config(&[up("a", &a, 0)], ""), &[]).await?;
    let c = Client::new(&gw);
    let post = |path: &str, body: Vec<u8>, key: Option<&str>| {
        let mut rb = c
            .http
            .post(format!("{}{path}", c.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        rb.send()
    };
    let r = post("/v1/chat/completions", b"{not json".to_vec(), Some(&c.key)).await?;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await?;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{v}"
    );
    let r = post("/v1/messages", b"[1,".to_vec(), Some(&c.key)).await?;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await?;
    assert_eq!(v["type"], "error", "anthropic error shape: {v}");
    // Valid JSON of the wrong shape, and an object without a model string.
    for (body, says) in [
        (&b"[1, 2]"[..], "must be a JSON object"),
        (
            &b"{\"model\": 7, \"messages\": []}"[..],
            "no \"model\" string",
        ),
        (&b"{\"messages\": []}"[..], "no \"model\" string"),
    ] {
        let r = post("/v1/chat/completions", body.to_vec(), Some(&c.key)).await?;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await?;
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(says), "{}: {v}", String::from_utf8_lossy(body));
    }
    let big = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(8000));
    let r = post("/v1/chat/completions", big.into_bytes(), Some(&c.key)).await?;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await?;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_body_bytes"),
        "{v}"
    );
    let r = post("/v1/chat/completions", b"{}".to_vec(), None).await?;
    assert_eq!(r.status(), 401);
    let r = post(
        "/v1/chat/completions",
        b"{}".to_vec(),
        Some("kn_000000000000_nope"),
    )
    .await?;
    assert_eq!(r.status(), 401);
    assert!(a.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn state_survives_a_restart_and_silence_is_a_downtime_incident() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    a.script([Behavior::Status {
        status: 500,
        retry_after: None,
    }]);
    let mut gw = KennelGateway::start(
        bin(),
        &config(
            &[up("a", &a, 0), up("b", &b, 1)],
            "[gateway.heartbeat]\ntakeover_after = \"300ms\"\n",
        ),
        &[],
    )
    .await?;
    let c = Client::new(&gw);
    assert_eq!(c.chat("m", false).await?.status(), 200);
    c.post(
        "/heartbeat",
        json!({"timestamp": 1, "hostname": "box", "pid": 42, "status": "ok",
               "memory": 1024, "uptime": 5, "version": "1.0"}),
    )
    .await?;
    c.post(
        "/gateway/incident",
        json!({"kind": "manual", "message": "disk full"}),
    )
    .await?;
    // No heartbeat follows: the watch records a downtime incident.
    let downtime = within(WAIT, "a downtime incident", async {
        loop {
            let s = c.get("/state").await?;
            if s["incidents"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["kind"] == "downtime"))
            {
                return Ok::<_, anyhow::Error>(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    assert_eq!(downtime["down"], true);
    assert_eq!(downtime["totals"]["takeovers"], 1);
    let metrics = c
        .http
        .get(format!("{}/metrics", c.base))
        .bearer_auth(&c.key)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("kennel_gateway_takeovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kennel_gateway_failures_total{upstream=\"a\",class=\"server_error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kennel_gateway_failovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kennel_gateway_added_latency_seconds_count"),
        "{metrics}"
    );
    // A heartbeat makes everything queued before it durable (one ordered writer).
    c.post("/heartbeat", json!({"hostname": "box"})).await?;

    gw.restart().await?;
    let c = Client::new(&gw);
    let s = c.get("/state").await?;
    assert_eq!(s["heartbeats"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["heartbeats"][0]["pid"], 42, "{s}");
    let kinds: Vec<&str> = s["incidents"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(kinds, ["recovered", "downtime", "manual"], "{s}");
    assert_eq!(s["totals"]["requests"], 1, "{s}");
    assert_eq!(s["totals"]["failovers"], 1, "{s}");
    let h = c.health("a").await?;
    assert_eq!(h["lastFailureClass"], "server_error", "{h}");
    assert_eq!(h["requests"], 1, "{h}");

    c.post("/gateway/incidents/clear", json!({})).await?;
    assert_eq!(c.get("/gateway/incidents").await?["incidents"], json!([]));
    c.post("/state/reset", json!({})).await?;
    let s = c.get("/state").await?;
    assert_eq!(s["heartbeats"], json!([]));
    assert!(s["lastSeenMs"].is_null());
    c.post("/reset", json!({})).await?;
    assert!(c.health("a").await?["cooldownUntilMs"].is_null());
    Ok(())
}

#[tokio::test]
async fn kennel_keys_with_the_gateway_scope_work_and_others_are_refused() -> anyhow::Result<()> {
    let srv = crate::server().await?;
    let api = srv.api();
    let gw_key = api.create_key("agents", &[Scope::Gateway]).await?.key;
    let client_key = api.create_key("cli", &[Scope::Client]).await?.key;
    let a = ScriptedLlm::start("a").await?;
    let gw =
        KennelGateway::start_in(bin(), &config(&[up("a", &a, 0)], ""), &[], srv.data_dir()).await?;
    let mut c = Client::new(&gw);
    c.key = gw_key;
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 200);
    // A gateway key is not an admin key.
    let r = c
        .http
        .post(format!("{}/reset", c.base))
        .bearer_auth(&c.key)
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    c.key = client_key;
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await?;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("gateway"),
        "{v}"
    );
    assert_eq!(a.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_key_over_its_rate_limit_gets_429() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let toml = config(&[up("a", &a, 0)], "").replace(
        "per_minute = 100000\nburst = 1000",
        "per_minute = 1\nburst = 2",
    );
    let gw = KennelGateway::start(bin(), &toml, &[]).await?;
    let c = Client::new(&gw);
    assert_eq!(c.chat("m", false).await?.status(), 200);
    assert_eq!(c.chat("m", false).await?.status(), 200);
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 429);
    assert!(!header(&r, "retry-after").is_empty());
    assert_eq!(a.requests().len(), 2);
    Ok(())
}

#[tokio::test]
async fn kennel_up_runs_the_gateway_when_upstreams_are_configured() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let a = ScriptedLlm::start("a").await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("kennel.toml");
    let toml = config(&[up("a", &a, 0)], "listen = \"127.0.0.1:0\"");
    std::fs::write(&cfg, toml)?;
    let data = dir.path().join("data");
    let mut child = tokio::process::Command::new(bin())
        .args([
            "--config",
            &cfg.display().to_string(),
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout not captured"))?;
    let mut lines = BufReader::new(stdout).lines();
    let url = within(WAIT, "kennel up to print the gateway's address", async {
        while let Some(line) = lines.next_line().await? {
            if let Some(u) = line.strip_prefix("kennel: gateway listening on ") {
                return anyhow::Ok(u.to_string());
            }
        }
        anyhow::bail!("kennel up exited without starting the gateway")
    })
    .await??;
    let key = std::fs::read_to_string(data.join("admin.key"))?
        .trim()
        .to_string();
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "a");
    Ok(())
}

#[tokio::test]
async fn zeptoclaw_environment_defines_a_single_upstream() -> anyhow::Result<()> {
    let z = ScriptedLlm::start("z").await?;
    let base = z.openai_base();
    let gw = KennelGateway::start(
        bin(),
        "[gateway]\n",
        &[
            ("ZEPTOCLAW_GATEWAY_URL", base.as_str()),
            ("ZEPTOCLAW_API_KEY", "sk-zepto"),
        ],
    )
    .await?;
    let c = Client::new(&gw);
    let r = c.chat("any", false).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "zeptoclaw");
    // The upstream gets its own key, not the client's kennel key.
    assert_eq!(
        z.requests()[0].credential.as_deref(),
        Some("Bearer sk-zepto")
    );
    Ok(())
}

#[tokio::test]
async fn claude_code_runs_through_the_gateway_unchanged() -> anyhow::Result<()> {
    use kennel_testkit::anthropic::Reply;
    use kennel_testkit::ScriptedAnthropic;
    anyhow::ensure!(
        which("claude"),
        "the Claude Code CLI (`claude`) is not on PATH; install it with \
         `npm install -g @anthropic-ai/claude-code` (.ci/run does)"
    );
    let upstream = ScriptedAnthropic::start(std::sync::Arc::new(|_: &Value| {
        Reply::text("hello via kennel")
    }))
    .await?;
    let ups = [Up {
        name: "anthropic",
        kind: "anthropic",
        base: upstream.url(),
        priority: 0,
        extra: "api_key_env = \"UPSTREAM_KEY\"",
    }];
    let toml = config(&ups, "max_body_bytes = 33554432").replace("max_body_bytes = 4096\n", "");
    let gw = KennelGateway::start(bin(), &toml, &[("UPSTREAM_KEY", "sk-ant-upstream")]).await?;
    let home = tempfile::Builder::new()
        .prefix("kennel-test-claude-home-")
        .tempdir()?;
    let out = within(
        Duration::from_secs(180),
        "claude -p through the gateway",
        tokio::process::Command::new("claude")
            .args(["-p", "Say hello", "--output-format", "json"])
            .current_dir(home.path())
            .env("ANTHROPIC_BASE_URL", gw.url())
            .env("ANTHROPIC_API_KEY", gw.admin_key())
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("DISABLE_ERROR_REPORTING", "1")
            .env("HOME", home.path())
            .env("CLAUDE_CONFIG_DIR", home.path().join(".claude"))
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "claude failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(v["result"], "hello via kennel", "{v}");
    let recorded = upstream.recorded();
    assert!(!recorded.is_empty());
    for r in &recorded {
        assert_eq!(
            r.headers.get("x-api-key").map(String::as_str),
            Some("sk-ant-upstream"),
            "the upstream sees its own key, never the kennel key: {r:?}"
        );
    }
    Ok(())
}

fn which(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(bin).is_file())
}

/// The Python SDK script: non-streaming and streaming calls through the gateway; prints the
/// texts it got, one per line.
const PY_SDKS: &str = r#"
import sys, openai, anthropic
base, key = sys.argv[1], sys.argv[2]
o = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
r = o.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
print("openai:" + r.choices[0].message.content)
s = o.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True)
print("openai-stream:" + "".join((c.choices[0].delta.content or "") for c in s if c.choices))
a = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
m = a.messages.create(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
print("anthropic:" + m.content[0].text)
n = a.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "hi"}])
print("anthropic-count:" + str(n.input_tokens))
with a.messages.stream(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as st:
    print("anthropic-stream:" + "".join(st.text_stream))
"#;

#[tokio::test]
async fn official_python_sdks_work_through_the_gateway() -> anyhow::Result<()> {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .output()
        .await;
    anyhow::ensure!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "this test runs the official SDKs: install them with `pip install openai anthropic` \
         (.ci/run does)"
    );
    let o = ScriptedLlm::start("o").await?;
    let an = ScriptedLlm::start("an").await?;
    let dead = refused_addr().await?;
    let ups = [
        Up {
            name: "dead",
            kind: "openai",
            base: format!("http://{dead}/v1"),
            priority: 0,
            extra: "",
        },
        up("o", &o, 1),
        Up {
            name: "an",
            kind: "anthropic",
            base: an.anthropic_base(),
            priority: 0,
            extra: "",
        },
    ];
    let gw = KennelGateway::start(bin(), &config(&ups, ""), &[]).await?;
    let out = within(
        Duration::from_secs(120),
        "the Python SDK script",
        tokio::process::Command::new("python3")
            .args(["-c", PY_SDKS, &gw.url(), gw.admin_key()])
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "openai:reply from o",
            "openai-stream:reply from o",
            "anthropic:reply from an",
            "anthropic-count:3",
            "anthropic-stream:reply from an",
        ]
    );
    // The gateway's kennel key never reaches an upstream.
    assert!(o.requests().iter().chain(an.requests().iter()).all(|r| r
        .credential
        .as_deref()
        .is_none_or(|c| !c.contains(gw.admin_key()))));
    Ok(())
}

#[tokio::test]
async fn a_slow_non_streaming_answer_is_awaited_up_to_the_total_timeout() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    // Providers send a non-streamed completion's headers when it is finished: here four
    // times the first-byte deadline after the request, well inside the total one.
    let slow = Behavior::AnswerAfter {
        delay: Duration::from_millis(1200),
    };
    a.script([slow.clone()]);
    let mut primary = up("a", &a, 0);
    primary.extra = "first_byte_timeout = \"300ms\"\ntotal_timeout = \"20000ms\"";
    let gw = KennelGateway::start(bin(), &config(&[primary, up("b", &b, 1)], ""), &[]).await?;
    let c = Client::new(&gw);
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "a");
    assert_eq!(header(&r, "x-kennel-attempts"), "1");
    assert_eq!(header(&r, "x-kennel-failover"), "");
    let body: Value = r.json().await?;
    assert_eq!(body["choices"][0]["message"]["content"], "reply from a");
    assert_eq!(a.requests().len(), 1, "sent once");
    assert!(b.requests().is_empty(), "never re-sent to b");
    let h = c.health("a").await?;
    assert!(h["lastFailureClass"].is_null(), "{h}");

    // A stream still has to start within first_byte_timeout.
    a.script([slow]);
    let r = c.chat("m", true).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    assert_eq!(header(&r, "x-kennel-failover"), "a=timeout");
    let text = within(WAIT, "the stream from b", r.text()).await??;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(a.requests().len(), 2);
    assert_eq!(c.health("a").await?["lastFailureClass"], "timeout");
    Ok(())
}

#[tokio::test]
async fn a_non_streaming_answer_slower_than_the_total_timeout_fails_over() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    a.script([Behavior::HangBeforeHeaders]);
    let mut primary = up("a", &a, 0);
    primary.extra = "first_byte_timeout = \"200ms\"\ntotal_timeout = \"1000ms\"";
    let gw = KennelGateway::start(bin(), &config(&[primary, up("b", &b, 1)], ""), &[]).await?;
    let c = Client::new(&gw);
    let t0 = std::time::Instant::now();
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    assert_eq!(header(&r, "x-kennel-attempts"), "2");
    assert_eq!(header(&r, "x-kennel-failover"), "a=timeout");
    // a was given its whole total_timeout, not cut at first_byte_timeout.
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    let h = c.health("a").await?;
    assert_eq!(h["lastFailureClass"], "timeout", "{h}");
    assert!(
        h["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("did not complete within 1s"),
        "{h}"
    );

    // With no other upstream the client gets a 504 in its format.
    let x = ScriptedLlm::start("x").await?;
    x.script([Behavior::HangBeforeHeaders]);
    let ups = [Up {
        name: "x",
        kind: "anthropic",
        base: x.anthropic_base(),
        priority: 0,
        extra: "first_byte_timeout = \"200ms\"\ntotal_timeout = \"1000ms\"",
    }];
    let gw = KennelGateway::start(bin(), &config(&ups, ""), &[]).await?;
    let c = Client::new(&gw);
    let r = c.messages("claude", false).await?;
    assert_eq!(r.status(), 504);
    assert_eq!(header(&r, "x-kennel-failover"), "x=timeout");
    let v: Value = r.json().await?;
    assert_eq!(v["type"], "error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("did not complete within 1s"), "{v}");
    Ok(())
}

#[tokio::test]
async fn a_provider_refusing_kennels_key_fails_over_and_cools_down_long() -> anyhow::Result<()> {
    // (status, extra [gateway] config, the auth cooldown expected, in ms)
    let cases = [
        (401, "", 10 * 60_000),
        (403, "[gateway.cooldowns]\nauth = \"120000ms\"\n", 120_000),
    ];
    for (status, extra, cooldown) in cases {
        let a = ScriptedLlm::start("a").await?;
        let b = ScriptedLlm::start("b").await?;
        a.script([Behavior::Status {
            status,
            retry_after: None,
        }]);
        let gw = KennelGateway::start(
            bin(),
            &config(&[up("a", &a, 0), up("b", &b, 1)], extra),
            &[],
        )
        .await?;
        let c = Client::new(&gw);
        let r = c.chat("m", false).await?;
        assert_eq!(r.status(), 200, "{status}");
        assert_eq!(header(&r, "x-kennel-upstream"), "b", "{status}");
        assert_eq!(header(&r, "x-kennel-attempts"), "2", "{status}");
        assert_eq!(
            header(&r, "x-kennel-failover"),
            format!("a=auth({status})"),
            "{status}"
        );
        assert_eq!(header(&r, "x-kennel-refused-by"), "", "b answered");
        let body: Value = r.json().await?;
        assert_eq!(body["choices"][0]["message"]["content"], "reply from b");

        let u = c.upstream("a").await?;
        let h = &u["health"];
        assert_eq!(u["coolingDown"], true, "{u}");
        assert_eq!(h["lastFailureClass"], "auth", "{u}");
        assert!(
            h["lastError"]
                .as_str()
                .unwrap_or("")
                .contains(&status.to_string()),
            "{u}"
        );
        assert_eq!(cooldown_ms(h), cooldown, "{u}");
        assert!(u["cooldownRemainingMs"].as_i64().unwrap_or(0) > 0, "{u}");
        let metrics = c.metrics().await?;
        assert!(
            metrics.contains("kennel_gateway_failures_total{upstream=\"a\",class=\"auth\"} 1"),
            "{metrics}"
        );
        // While a cools down, b serves alone; a is not asked again.
        let r = c.chat("m", false).await?;
        assert_eq!(header(&r, "x-kennel-upstream"), "b");
        assert_eq!(header(&r, "x-kennel-attempts"), "1");
        assert_eq!(a.requests().len(), 1, "{status}");
    }
    Ok(())
}

#[tokio::test]
async fn a_404_for_a_model_fails_over_and_skips_only_that_model() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    let x = ScriptedLlm::start("x").await?;
    let not_found = Behavior::Status {
        status: 404,
        retry_after: None,
    };
    a.script([not_found.clone()]);
    x.script([not_found]);
    let lone = Up {
        name: "x",
        kind: "anthropic",
        base: x.anthropic_base(),
        priority: 0,
        extra: "",
    };
    let gw = KennelGateway::start(
        bin(),
        &config(&[up("a", &a, 0), up("b", &b, 1), lone], ""),
        &[],
    )
    .await?;
    let c = Client::new(&gw);
    let r = c.chat("gone", false).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    assert_eq!(header(&r, "x-kennel-failover"), "a=not_found(404)");
    let u = c.upstream("a").await?;
    let h = &u["health"];
    assert_eq!(h["lastFailureClass"], "not_found", "{u}");
    assert_eq!(u["coolingDown"], false, "a still serves other models: {u}");
    let until = h["modelCooldowns"]["gone"]["untilMs"].as_i64().unwrap_or(0);
    assert_eq!(
        until - h["lastFailureMs"].as_i64().unwrap_or(0),
        60_000,
        "{u}"
    );
    assert!(c
        .metrics()
        .await?
        .contains("kennel_gateway_failures_total{upstream=\"a\",class=\"not_found\"} 1"));
    // The model goes to b alone; another model still goes to a first.
    let r = c.chat("gone", false).await?;
    assert_eq!(header(&r, "x-kennel-upstream"), "b");
    assert_eq!(header(&r, "x-kennel-attempts"), "1");
    let r = c.chat("other", false).await?;
    assert_eq!(header(&r, "x-kennel-upstream"), "a");
    assert_eq!(header(&r, "x-kennel-attempts"), "1");
    assert_eq!(a.requests().len(), 2);

    // When no upstream serves the model, the provider's 404 reaches the client unchanged.
    let r = c.messages("gone", false).await?;
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "x-kennel-refused-by"), "");
    let v: Value = r.json().await?;
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "api_error", "message": "scripted 404 from x"}})
    );
    Ok(())
}

#[tokio::test]
async fn when_every_provider_refuses_kennels_key_the_client_is_told_so() -> anyhow::Result<()> {
    let a = ScriptedLlm::start("a").await?;
    let b = ScriptedLlm::start("b").await?;
    let x = ScriptedLlm::start("x").await?;
    let refuse = |status| Behavior::Status {
        status,
        retry_after: None,
    };
    a.script([refuse(401)]);
    b.script([refuse(403)]);
    x.script([refuse(401)]);
    let lone = Up {
        name: "x",
        kind: "anthropic",
        base: x.anthropic_base(),
        priority: 0,
        extra: "",
    };
    let gw = KennelGateway::start(
        bin(),
        &config(&[up("a", &a, 0), up("b", &b, 1), lone], ""),
        &[],
    )
    .await?;
    let c = Client::new(&gw);
    let r = c.chat("m", false).await?;
    // The last provider's status, marked as the provider's refusal.
    assert_eq!(r.status(), 403);
    assert_eq!(header(&r, "x-kennel-refused-by"), "provider");
    assert_eq!(header(&r, "x-kennel-attempts"), "2");
    assert_eq!(header(&r, "x-kennel-failover"), "a=auth(401), b=auth(403)");
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["type"], "provider_auth_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    for says in [
        "upstreams a (401), b (403) refused kennel's provider credentials",
        "check api_key_env",
        "your kennel key was accepted",
        "scripted 403 from b",
    ] {
        assert!(msg.contains(says), "{says:?} missing from {v}");
    }

    let r = c.messages("claude", false).await?;
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "x-kennel-refused-by"), "provider");
    let v: Value = r.json().await?;
    assert_eq!(v["type"], "error", "anthropic error shape: {v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.starts_with(
            "upstream x refused kennel's provider credentials (401): check api_key_env for \
             that upstream"
        ),
        "{v}"
    );
    assert!(msg.contains("your kennel key was accepted"), "{v}");
    Ok(())
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not() -> anyhow::Result<()>
{
    let srv = crate::server().await?;
    let other = srv.api().create_key("other", &[Scope::Gateway]).await?.key;
    let a = ScriptedLlm::start("a").await?;
    // One request a minute, two saved: the third in a row waits about a minute.
    let toml = config(&[up("a", &a, 0)], "").replace(
        "per_minute = 100000\nburst = 1000",
        "per_minute = 1\nburst = 2",
    );
    let gw = KennelGateway::start_in(bin(), &toml, &[], srv.data_dir()).await?;
    let mut c = Client::new(&gw);
    for _ in 0..2 {
        assert_eq!(c.chat("m", false).await?.status(), 200);
    }
    let r = c.chat("m", false).await?;
    assert_eq!(r.status(), 429);
    let wait: u64 = header(&r, "retry-after").parse()?;
    assert!((50..=60).contains(&wait), "retry-after {wait}");
    let body: Value = r.json().await?;
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("exceeded gateway.rate_limit"), "{body}");

    // The limit is per key: another key still gets through.
    c.key = other;
    assert_eq!(c.chat("m", false).await?.status(), 200);
    Ok(())
}

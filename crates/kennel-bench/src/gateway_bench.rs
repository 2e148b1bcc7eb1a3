//! `kennel-bench gateway`: the latency `kennel gateway` adds over calling the same upstream
//! directly. Starts a scripted OpenAI-compatible upstream in process and the real gateway
//! binary on loopback, then, for each concurrency level, sends the same non-streaming chat
//! request directly and through the gateway (and through a peer proxy such as LiteLLM when
//! `--peer-url` is given) and reports p50/p99 of each and their difference.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kennel_testkit::{KennelGateway, ScriptedLlm};
use serde_json::json;

use crate::{machine, percentile};

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// The kennel binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: PathBuf,
    /// Concurrency levels to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Requests per concurrency level and path.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// A peer proxy's OpenAI base URL (e.g. LiteLLM: `http://127.0.0.1:4000/v1`), configured
    /// to forward to the upstream this command prints.
    #[arg(long)]
    peer_url: Option<String>,
    /// The peer's API key.
    #[arg(long, default_value = "sk-bench")]
    peer_key: String,
    /// Seconds to wait after printing the upstream address, to start the peer against it.
    #[arg(long, default_value_t = 0)]
    peer_wait_secs: u64,
    /// Fixed request rates (per second) to try, open loop, for the highest rate whose p99
    /// added latency stays within 1 ms (empty: skip this phase).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u32>,
    /// Length of each fixed-rate run, seconds.
    #[arg(long, default_value_t = 5)]
    rate_seconds: u64,
}

/// Sorted latencies in ms of requests sent at `rate` per second for `secs` seconds, each
/// timed from its scheduled send time (so queueing in the client counts, open loop).
async fn at_rate(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    rate: u32,
    secs: u64,
) -> anyhow::Result<Vec<f64>> {
    let body =
        json!({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let n = u64::from(rate) * secs;
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + gap.mul_f64(i as f64);
        tokio::time::sleep_until(at).await;
        let (http, url, key, body) = (http.clone(), url.to_string(), key.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{url}: HTTP {}", r.status());
            r.bytes().await?;
            anyhow::Ok(at.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut all = Vec::with_capacity(tasks.len());
    for t in tasks {
        all.push(t.await??);
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

/// Sorted latencies in ms of `n` requests from `conc` workers against `url`.
async fn measure(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    conc: usize,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let body = Arc::new(
        json!({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    );
    let per = n.div_ceil(conc);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (http, url, key, body) = (http.clone(), url.to_string(), key.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.as_str().to_string())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "{url}: HTTP {}", r.status());
                r.bytes().await?;
                v.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(v)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

pub async fn run(a: GatewayArgs) -> anyhow::Result<()> {
    let upstream = ScriptedLlm::start("bench").await?;
    let toml = format!(
        "[gateway]\n[gateway.rate_limit]\nper_minute = 0\n[[gateway.upstreams]]\nname = \"u\"\n\
         kind = \"openai\"\nbase_url = \"{}\"\n",
        upstream.openai_base()
    );
    let gw = KennelGateway::start(&a.kennel_bin, &toml, &[])
        .await
        .with_context(|| format!("failed to start {}", a.kennel_bin.display()))?;
    println!("machine: {}", machine());
    println!("upstream: {}", upstream.openai_base());
    if a.peer_wait_secs > 0 {
        tokio::time::sleep(Duration::from_secs(a.peer_wait_secs)).await;
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let direct = format!("{}/chat/completions", upstream.openai_base());
    let via = format!("{}/v1/chat/completions", gw.url());
    // Warm up connections and caches on every path.
    measure(&http, &direct, "x", 4, 200).await?;
    measure(&http, &via, gw.admin_key(), 4, 200).await?;
    let peer = a
        .peer_url
        .as_ref()
        .map(|p| format!("{}/chat/completions", p.trim_end_matches('/')));
    if let Some(p) = &peer {
        measure(&http, p, &a.peer_key, 4, 50).await?;
    }
    println!("| concurrency | direct p50 / p99 | gateway p50 / p99 | added p50 / p99 | peer p50 / p99 | peer added p50 / p99 |");
    println!("|---|---|---|---|---|---|");
    for &c in &a.concurrency {
        let d = measure(&http, &direct, "x", c, a.requests).await?;
        let g = measure(&http, &via, gw.admin_key(), c, a.requests).await?;
        let (d50, d99) = (percentile(&d, 0.5), percentile(&d, 0.99));
        let (g50, g99) = (percentile(&g, 0.5), percentile(&g, 0.99));
        let peer_cols = match &peer {
            Some(p) => {
                let l = measure(&http, p, &a.peer_key, c, a.requests).await?;
                let (l50, l99) = (percentile(&l, 0.5), percentile(&l, 0.99));
                format!(
                    "{l50:.3} / {l99:.3} ms | {:.3} / {:.3} ms",
                    l50 - d50,
                    l99 - d99
                )
            }
            None => "– | –".to_string(),
        };
        println!(
            "| {c} | {d50:.3} / {d99:.3} ms | {g50:.3} / {g99:.3} ms | {:.3} / {:.3} ms | {peer_cols} |",
            g50 - d50,
            g99 - d99
        );
    }
    if !a.rates.is_empty() {
        println!();
        println!("| rate/s | direct p99 | gateway p99 | added p99 |");
        println!("|---|---|---|---|");
        let mut best = None;
        for &rate in &a.rates {
            let d = at_rate(&http, &direct, "x", rate, a.rate_seconds).await?;
            let g = at_rate(&http, &via, gw.admin_key(), rate, a.rate_seconds).await?;
            let (d99, g99) = (percentile(&d, 0.99), percentile(&g, 0.99));
            println!(
                "| {rate} | {d99:.3} ms | {g99:.3} ms | {:.3} ms |",
                g99 - d99
            );
            if g99 - d99 <= 1.0 {
                best = Some(rate);
            }
        }
        match best {
            Some(r) => println!("highest rate with p99 added <= 1 ms: {r}/s"),
            None => println!("no rate tried kept p99 added <= 1 ms"),
        }
    }
    Ok(())
}

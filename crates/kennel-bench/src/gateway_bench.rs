//! `kennel-bench gateway`: the latency `kennel gateway` adds over calling the same upstream
//! directly. Starts a scripted OpenAI-compatible upstream in process and the real gateway
//! binary on loopback (and, with `--litellm`, LiteLLM's proxy against the same upstream), then,
//! for each concurrency level, sends the same non-streaming chat request directly, through the
//! gateway and through the peer, in interleaved rounds, and reports p50/p99 of each path and
//! their difference. The load generator and the upstream share one thread (see `main`), so
//! on two cores the proxy under test has a core's worth of CPU without waiting for the
//! scheduler's time slices; `--pin` makes that placement strict (this process on CPU 0, the
//! proxies on CPU 1).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
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
    /// Requests per concurrency level, for the direct path and the gateway each.
    #[arg(long, default_value_t = 6000)]
    requests: usize,
    /// Rounds each level is split into; the paths take turns in every round, so a slow
    /// moment of the machine hits all of them alike.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Pin this process (load generator and upstream) to CPU 0 and the proxies to CPU 1
    /// (with `taskset`).
    #[arg(long)]
    pin: bool,
    /// Start LiteLLM's proxy (`litellm` from `pip install 'litellm[proxy]'`) against the same
    /// upstream and measure it as the peer.
    #[arg(long)]
    litellm: bool,
    /// The `litellm` executable for `--litellm`.
    #[arg(long, default_value = "litellm")]
    litellm_bin: PathBuf,
    /// An already running peer proxy's OpenAI base URL (e.g. `http://127.0.0.1:4000/v1`),
    /// configured to forward to the upstream this command prints.
    #[arg(long, conflicts_with = "litellm")]
    peer_url: Option<String>,
    /// The peer's API key.
    #[arg(long, default_value = "sk-bench")]
    peer_key: String,
    /// Seconds to wait after printing the upstream address, to start a `--peer-url` peer.
    #[arg(long, default_value_t = 0)]
    peer_wait_secs: u64,
    /// Requests per concurrency level through the peer (it may be far slower).
    #[arg(long, default_value_t = 1000)]
    peer_requests: usize,
    /// Fixed request rates (per second) to try, open loop, for the highest rate whose p99
    /// added latency stays within 1 ms (empty: skip this phase).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u32>,
    /// Length of each fixed-rate run, seconds (split into the same rounds).
    #[arg(long, default_value_t = 6)]
    rate_seconds: u64,
    /// Size of the user message in each request, bytes (coding agents send conversations of
    /// tens to hundreds of kilobytes).
    #[arg(long, default_value_t = 2)]
    prompt_bytes: usize,
}

/// The request every path gets: a chat completion with a `prompt_bytes` user message.
fn body(prompt_bytes: usize) -> String {
    let content: String = "hi, please review this code. "
        .chars()
        .cycle()
        .take(prompt_bytes.max(1))
        .collect();
    json!({"model": "bench", "messages": [{"role": "user", "content": content}]}).to_string()
}

/// One way to the upstream: a URL and the key it wants.
struct Route {
    url: String,
    key: String,
}

/// Requests sent at `rate` per second for `secs` seconds, open loop (each request is sent on
/// schedule, whether or not earlier ones have been answered): their latencies in ms, each
/// timed from when it was actually sent (the runtime's 1 ms timer releases the requests due
/// in each millisecond together), and the rate achieved.
async fn at_rate(
    http: &reqwest::Client,
    p: &Route,
    body: &str,
    rate: u32,
    secs: f64,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let body = bytes::Bytes::from(body.to_string());
    let n = (f64::from(rate) * secs).round() as u64;
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + gap.mul_f64(i as f64);
        tokio::time::sleep_until(at).await;
        let (http, url, key, body) = (http.clone(), p.url.clone(), p.key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{url}: HTTP {}", r.status());
            r.bytes().await?;
            anyhow::Ok(t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut all = Vec::with_capacity(tasks.len());
    for t in tasks {
        all.push(t.await??);
    }
    let achieved = all.len() as f64 / start.elapsed().as_secs_f64();
    Ok((all, achieved))
}

/// Latencies in ms of `n` requests from `conc` closed-loop workers.
async fn measure(
    http: &reqwest::Client,
    p: &Route,
    body: &str,
    conc: usize,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let body = bytes::Bytes::from(body.to_string());
    let per = n.div_ceil(conc).max(1);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (http, url, key, body) = (http.clone(), p.url.clone(), p.key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.clone())
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
    Ok(all)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Pins every thread of this process to CPU 0.
fn pin_self() -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid])
        .output()
        .context("--pin needs `taskset` (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset could not pin the bench to CPU 0: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A script that runs `bin` on CPU 1, to start the gateway through.
fn pinned_wrapper(dir: &Path, bin: &Path) -> anyhow::Result<PathBuf> {
    let bin = std::fs::canonicalize(bin)
        .with_context(|| format!("{} not found; build it first", bin.display()))?;
    let path = dir.join("kennel-on-cpu1");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec taskset -c 1 '{}' \"$@\"\n",
            bin.display().to_string().replace('\'', "'\\''")
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// LiteLLM's proxy as a child process, killed on drop.
struct Litellm {
    child: Child,
    url: String,
}

impl Litellm {
    /// Sends a signal (`-STOP`, `-CONT`) to the proxy's process.
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Litellm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_litellm(
    a: &GatewayArgs,
    dir: &Path,
    upstream: &str,
    http: &reqwest::Client,
) -> anyhow::Result<Litellm> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = dir.join("litellm.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      \
             api_base: {upstream}\n      api_key: x\ngeneral_settings:\n  master_key: {}\n",
            a.peer_key
        ),
    )?;
    let log = std::fs::File::create(dir.join("litellm.log"))?;
    let mut cmd = if a.pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(&a.litellm_bin);
        c
    } else {
        Command::new(&a.litellm_bin)
    };
    cmd.arg("--config")
        .arg(&cfg)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("LITELLM_LOG", "ERROR")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().with_context(|| {
        format!(
            "failed to start {} (pip install 'litellm[proxy]')",
            a.litellm_bin.display()
        )
    })?;
    let mut l = Litellm {
        child,
        url: format!("http://127.0.0.1:{port}/v1"),
    };
    let health = format!("http://127.0.0.1:{port}/health/liveliness");
    let until = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = l.child.try_wait()? {
            bail!(
                "litellm exited ({status}) before it answered; see {}",
                dir.join("litellm.log").display()
            );
        }
        if let Ok(r) = http.get(&health).send().await {
            if r.status().is_success() {
                return Ok(l);
            }
        }
        if Instant::now() > until {
            bail!("litellm did not answer {health} within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// CPU time a process has used so far, in seconds (Linux `/proc/PID/stat`, at the usual
/// 100 ticks per second).
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
    else {
        return f64::NAN;
    };
    // Fields after the `(comm)`, which may itself contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `(comm)` and state.
    (ticks(11) + ticks(12)) / 100.0
}

/// (p50, p99) of the direct path and of `via`, from `n` requests each at concurrency `c`, in
/// `rounds` rounds that alternate the two.
async fn interleaved(
    http: &reqwest::Client,
    direct: &Route,
    via: &Route,
    body: &str,
    c: usize,
    n: usize,
    rounds: usize,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let (mut d, mut v) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        d.extend(measure(http, direct, body, c, n / rounds).await?);
        v.extend(measure(http, via, body, c, n / rounds).await?);
    }
    Ok((cols(&sorted(d)), cols(&sorted(v))))
}

fn cols(v: &[f64]) -> (f64, f64) {
    (percentile(v, 0.5), percentile(v, 0.99))
}

pub async fn run(a: GatewayArgs) -> anyhow::Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let machine = machine();
    if a.pin {
        pin_self()?;
    }
    let dir = tempfile::Builder::new()
        .prefix("kennel-bench-gateway-")
        .tempdir()?;
    let upstream = ScriptedLlm::start("bench").await?;
    let toml = format!(
        "[gateway]\n[gateway.rate_limit]\nper_minute = 0\n[[gateway.upstreams]]\nname = \"u\"\n\
         kind = \"openai\"\nbase_url = \"{}\"\n",
        upstream.openai_base()
    );
    let bin = if a.pin {
        pinned_wrapper(dir.path(), &a.kennel_bin)?
    } else {
        a.kennel_bin.clone()
    };
    let gw = KennelGateway::start(&bin, &toml, &[])
        .await
        .with_context(|| format!("failed to start {}", a.kennel_bin.display()))?;
    println!("machine: {machine}");
    println!(
        "placement: {}",
        if a.pin {
            "load generator + upstream on CPU 0, proxies on CPU 1"
        } else {
            "unpinned: load generator + upstream on one thread, proxies wherever the scheduler puts them"
        }
    );
    println!("upstream: {}", upstream.openai_base());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let litellm = if a.litellm {
        let l = start_litellm(&a, dir.path(), &upstream.openai_base(), &http).await?;
        let version = Command::new("python3")
            .args([
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        println!("peer: LiteLLM proxy {version} at {}", l.url);
        Some(l)
    } else {
        if a.peer_wait_secs > 0 {
            tokio::time::sleep(Duration::from_secs(a.peer_wait_secs)).await;
        }
        None
    };
    let direct = Route {
        url: format!("{}/chat/completions", upstream.openai_base()),
        key: "x".into(),
    };
    let via = Route {
        url: format!("{}/v1/chat/completions", gw.url()),
        key: gw.admin_key().to_string(),
    };
    let peer = litellm
        .as_ref()
        .map(|l| l.url.clone())
        .or_else(|| a.peer_url.clone())
        .map(|p| Route {
            url: format!("{}/chat/completions", p.trim_end_matches('/')),
            key: a.peer_key.clone(),
        });
    let body = body(a.prompt_bytes);
    println!("request body: {} bytes", body.len());
    // Warm up connections and caches on every path.
    measure(&http, &direct, &body, 4, 400).await?;
    measure(&http, &via, &body, 4, 400).await?;
    if let Some(p) = &peer {
        measure(&http, p, &body, 4, 100).await?;
    }
    println!(
        "{} requests per level and path ({} through the peer), in {} interleaved rounds",
        a.requests, a.peer_requests, a.rounds
    );
    // The gateway first, with the peer frozen (SIGSTOP) so its background work takes no CPU
    // from the gateway; then the peer, each against direct calls interleaved with it.
    if let Some(l) = &litellm {
        l.signal("-STOP");
    }
    let mut rows = Vec::new();
    for &c in &a.concurrency {
        rows.push(interleaved(&http, &direct, &via, &body, c, a.requests, a.rounds).await?);
    }
    let mut peer_rows = Vec::new();
    if let Some(p) = &peer {
        if let Some(l) = &litellm {
            l.signal("-CONT");
        }
        for &c in &a.concurrency {
            peer_rows
                .push(interleaved(&http, &direct, p, &body, c, a.peer_requests, a.rounds).await?);
        }
    }
    drop(litellm);
    println!();
    println!("| concurrency | direct p50 / p99 | gateway p50 / p99 | added p50 / p99 | peer p50 / p99 | peer added p50 / p99 |");
    println!("|---|---|---|---|---|---|");
    for (k, &c) in a.concurrency.iter().enumerate() {
        let ((d50, d99), (g50, g99)) = rows[k];
        let peer_cols = match peer_rows.get(k) {
            Some(&((pd50, pd99), (l50, l99))) => format!(
                "{l50:.3} / {l99:.3} ms | {:.3} / {:.3} ms",
                l50 - pd50,
                l99 - pd99
            ),
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
        println!("| rate/s | achieved direct / gateway | direct p50 / p99 | gateway p50 / p99 | added p50 / p99 | gateway CPU |");
        println!("|---|---|---|---|---|---|");
        let mut best = None;
        let mut stop = None;
        let mut first_direct_p99 = None;
        let slice = a.rate_seconds as f64 / a.rounds as f64;
        for &rate in &a.rates {
            let (mut d, mut g) = (Vec::new(), Vec::new());
            let (mut dr, mut gr) = (0.0, 0.0);
            let (mut cpu, mut wall) = (0.0, 0.0);
            for _ in 0..a.rounds {
                let (v, r) = at_rate(&http, &direct, &body, rate, slice).await?;
                d.extend(v);
                dr += r / a.rounds as f64;
                let (c0, t0) = (cpu_secs(gw.pid()), Instant::now());
                let (v, r) = at_rate(&http, &via, &body, rate, slice).await?;
                cpu += cpu_secs(gw.pid()) - c0;
                wall += t0.elapsed().as_secs_f64();
                g.extend(v);
                gr += r / a.rounds as f64;
            }
            let ((d50, d99), (g50, g99)) = (cols(&sorted(d)), cols(&sorted(g)));
            println!(
                "| {rate} | {dr:.0} / {gr:.0} | {d50:.3} / {d99:.3} ms | {g50:.3} / {g99:.3} ms | {:.3} / {:.3} ms | {:.0}% |",
                g50 - d50,
                g99 - d99,
                100.0 * cpu / wall
            );
            let first_d99 = *first_direct_p99.get_or_insert(d99);
            if stop.is_none() {
                // A stalled direct path makes the difference meaningless (even negative):
                // such a rate ends the search as inconclusive, not as a pass.
                let direct_degraded = d99 > 3.0 * first_d99;
                if g99 - d99 <= 1.0 && !direct_degraded {
                    best = Some(rate);
                } else {
                    stop = Some((rate, direct_degraded, d99));
                }
            }
        }
        match best {
            Some(r) => {
                println!("highest rate with p99 added <= 1 ms (and every lower rate tried): {r}/s")
            }
            None => println!("no rate tried kept p99 added <= 1 ms"),
        }
        if let Some((rate, direct_degraded, d99)) = stop {
            if direct_degraded {
                println!(
                    "at {rate}/s the direct path itself degraded (p99 {d99:.3} ms, over 3x \
                     its p99 at the lowest rate): the load generator's share of the machine or \
                     a stall of the machine, not only the gateway, limits what this run shows"
                );
            }
        }
    }
    Ok(())
}

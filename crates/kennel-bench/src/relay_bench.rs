//! `kennel-bench relay`: what `kennel relay` adds to the daemon link. Starts the real
//! coordinator and a real relay on loopback, connects one protocol-level daemon directly and
//! one behind the relay, each holding one running task, and measures for both:
//! - latency: `taskOutput` sent → its `ack` received, one message at a time (the relay's added
//!   latency is the difference of the two distributions);
//! - throughput: a burst of `taskOutput`s sent back to back until the last one is acked.
//!
//! Both paths end in the same coordinator store, so the throughput figures include its cost;
//! compare them as a ratio measured in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use kennel_proto::api::CreateTask;
use kennel_testkit::{DaemonOpts, KennelRelay, KennelServer, TestDaemon, RELAY_DAEMON_KEY};

use crate::{machine, percentile};

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// The kennel binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: PathBuf,
    /// Messages per path in the latency phase (one in flight at a time).
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Messages per path in the throughput phase (sent back to back).
    #[arg(long, default_value_t = 20000)]
    burst: u64,
}

fn task(name: &str) -> CreateTask {
    CreateTask {
        name: name.into(),
        prompt: "bench".into(),
        agent: Some("command".into()),
        ..CreateTask::default()
    }
}

/// Connects a daemon at `url` and gives it one accepted task; returns it and the task id.
async fn holder(
    srv: &KennelServer,
    url: &str,
    key: &str,
    machine_id: &str,
) -> anyhow::Result<(TestDaemon, String)> {
    let mut d = TestDaemon::connect(
        url,
        DaemonOpts {
            machine_id: machine_id.into(),
            hostname: machine_id.into(),
            max_concurrent_tasks: 1,
            ..DaemonOpts::with_key(key)
        },
    )
    .await?;
    let t = srv.api().submit(&task(machine_id)).await?;
    let s = d.expect_spawn(WAIT).await?;
    anyhow::ensure!(s.task_id == t.id, "{machine_id} got another task");
    d.accept(&t.id, 1).await?;
    d.expect_ack(&t.id, 1, 1, WAIT).await?;
    Ok((d, t.id))
}

/// One `taskOutput` → `ack` round trip, in ms.
async fn round_trip(d: &mut TestDaemon, id: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let seq = d.output(id, 1, "x").await?;
    d.expect_ack(id, 1, seq, WAIT).await?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Messages per second for `n` outputs sent back to back until the last is acked.
async fn burst(d: &mut TestDaemon, id: &str, n: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut last = 0;
    for _ in 0..n {
        last = d.output(id, 1, "y").await?;
    }
    d.expect_ack(id, 1, last, WAIT).await?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let srv = KennelServer::start(&args.kennel_bin, &[])
        .await
        .context("failed to start the coordinator")?;
    let mut relay = KennelRelay::start(&args.kennel_bin, &srv, "")
        .await
        .context("failed to start the relay")?;
    relay.wait_upstream(WAIT).await?;
    // The relayed daemon first: while it is the only one with the agent, it gets the task.
    let (mut via, via_id) = holder(&srv, &relay.ws_url(), RELAY_DAEMON_KEY, "bench-via").await?;
    let (mut direct, direct_id) =
        holder(&srv, &srv.ws_url(), srv.admin_key(), "bench-direct").await?;

    let (mut lat_direct, mut lat_via) = (Vec::new(), Vec::new());
    // Interleaved, so both paths see the same machine noise.
    for _ in 0..args.messages {
        lat_direct.push(round_trip(&mut direct, &direct_id).await?);
        lat_via.push(round_trip(&mut via, &via_id).await?);
    }
    lat_direct.sort_by(f64::total_cmp);
    lat_via.sort_by(f64::total_cmp);
    let rate_direct = burst(&mut direct, &direct_id, args.burst).await?;
    let rate_via = burst(&mut via, &via_id, args.burst).await?;

    println!("machine: {}", machine());
    println!(
        "latency (taskOutput → ack, {} messages per path, one in flight)",
        args.messages
    );
    for (name, v) in [("direct", &lat_direct), ("via relay", &lat_via)] {
        println!(
            "  {name:<10} p50 {:.3} ms  p99 {:.3} ms",
            percentile(v, 0.50),
            percentile(v, 0.99)
        );
    }
    println!(
        "  added      p50 {:.3} ms  p99 {:.3} ms",
        percentile(&lat_via, 0.50) - percentile(&lat_direct, 0.50),
        percentile(&lat_via, 0.99) - percentile(&lat_direct, 0.99)
    );
    println!(
        "throughput ({} messages back to back, until the last ack)",
        args.burst
    );
    println!("  direct     {rate_direct:.0} msg/s");
    println!("  via relay  {rate_via:.0} msg/s");
    Ok(())
}

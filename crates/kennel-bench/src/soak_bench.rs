//! `kennel-bench soak`: the suite's soak (kennel_testkit::soak) at benchmark size — many
//! tasks at once on real daemons with real git, the same faults while they run — reporting
//! throughput, submit → agent start, attempts per task and capacity refusals. Run after
//! `cargo build --release -p kennel`; the machine's description is printed with the figures.

use std::path::PathBuf;
use std::time::Duration;

use kennel_testkit::soak::{self, SoakPlan};

use crate::machine;

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// The kennel binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: PathBuf,
    /// Tasks submitted at once.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Daemons; their slots cycle through 1, 2, 3.
    #[arg(long, default_value_t = 10)]
    daemons: usize,
    /// Seed for the agents' run times (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Put the daemons behind one `kennel relay`.
    #[arg(long)]
    relay: bool,
    /// Run without the faults (a baseline for the same load).
    #[arg(long)]
    no_faults: bool,
    /// Shortest and longest agent run time, in milliseconds.
    #[arg(long, default_value_t = 50)]
    min_ms: u64,
    #[arg(long, default_value_t = 500)]
    max_ms: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    deadline_secs: u64,
}

pub async fn run(a: SoakArgs) -> anyhow::Result<()> {
    let seed = match a.seed {
        Some(s) => s,
        None => soak::seed_from_env()?,
    };
    let plan = SoakPlan {
        bin: a.kennel_bin,
        tasks: a.tasks,
        capacities: (0..a.daemons).map(|i| 1 + (i % 3) as u32).collect(),
        seed,
        relay: a.relay,
        faults: !a.no_faults,
        run_ms: (a.min_ms, a.max_ms.max(a.min_ms)),
        deadline: Duration::from_secs(a.deadline_secs),
    };
    println!("machine: {}", machine());
    println!(
        "soak: {} tasks, {} daemons with {} slots in all{}, agents {}–{} ms, seed {seed}",
        plan.tasks,
        plan.capacities.len(),
        plan.capacities.iter().sum::<u32>(),
        if plan.relay { ", behind a relay" } else { "" },
        plan.run_ms.0,
        plan.run_ms.1
    );
    let report = soak::run(&plan).await?;
    println!("{}", report.summary());
    println!(
        "tasks/s {:.2}  start p50 {:.0} ms  p99 {:.0} ms  attempts/task {:.3}  capacity refusals {}  charged losses {}",
        report.tasks_per_sec(),
        report.start_percentile(50.0),
        report.start_percentile(99.0),
        report.attempts_per_task(),
        report.capacity_refusals,
        report.charged_losses
    );
    if !report.problems.is_empty() {
        anyhow::bail!(
            "{} problems:\n{}",
            report.problems.len(),
            report.problems.join("\n")
        );
    }
    Ok(())
}

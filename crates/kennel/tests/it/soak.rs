//! The soak (kennel_testkit::soak): 200 tasks at once on daemons of 1, 2 and 3 slots, a real
//! repository, and a kill -9 of a daemon, a kill -9 of the server and a SIGTERM of a daemon
//! while they run; then what a user would check. Once direct, once through `kennel relay`.
//! The seed is printed; set `KENNEL_SOAK_SEED` to replay it.

use kennel_testkit::soak::{self, SoakPlan};

use crate::bin;

async fn soak_once(relay: bool) -> anyhow::Result<()> {
    let seed = soak::seed_from_env()?;
    eprintln!("soak seed {seed} (replay with KENNEL_SOAK_SEED={seed})");
    let plan = SoakPlan::suite(bin().to_path_buf(), seed, relay);
    let report = soak::run(&plan).await?;
    eprintln!("{}", report.summary());
    assert!(
        report.problems.is_empty(),
        "seed {seed}: {} problems:\n{}",
        report.problems.len(),
        report.problems.join("\n")
    );
    assert_eq!(report.completed, plan.tasks, "seed {seed}");
    assert_eq!(
        report.faults.len(),
        3,
        "every fault was injected: {:?}",
        report.faults
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_survive_crashes_and_clean_stops() -> anyhow::Result<()> {
    soak_once(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_through_a_relay_survive_crashes_and_clean_stops() -> anyhow::Result<()> {
    soak_once(true).await
}

//! `kennel-bench agents`: build agents converging on a pipeline. Starts the real
//! `kennel server` (the rendezvous), adds N stories in `2_current` whose profile exits at
//! once, starts M real `kennel agent`s, each behind a counting TCP proxy, and reports:
//! - the time from the first agent's start until every story is in `3_qa` at the rendezvous
//!   (as its `story.stage` events say), and stories built more than once (from the
//!   profile's own log);
//! - the pipeline document's size on disk, at the rendezvous and at the agents, and its
//!   number of changes;
//! - the sync traffic between the agents and the rendezvous, per story and per change.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use kennel_proto::api::{CreateJoinToken, CreateStory, CreatedJoinToken, MoveStory, StoryStage};
use kennel_testkit::sse::EventStream;
use kennel_testkit::{FaultProxy, KennelAgent, KennelServer};

use crate::machine;

#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// The kennel binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: std::path::PathBuf,
    /// Build agents to start.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Stories in the pipeline.
    #[arg(long, default_value_t = 1000)]
    stories: usize,
    /// Stories each agent builds at once.
    #[arg(long, default_value_t = 4)]
    capacity: u32,
    /// The agents' tick (`kennel agent --tick`).
    #[arg(long, default_value = "1s")]
    tick: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub async fn run(a: AgentsArgs) -> anyhow::Result<()> {
    let bin = std::fs::canonicalize(&a.kennel_bin)
        .with_context(|| format!("no kennel binary at {}", a.kennel_bin.display()))?;
    println!("machine: {}", machine());
    let srv = KennelServer::start(&bin, &[]).await?;
    let api = srv.api();
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("built.log");
    let toml = format!(
        "[daemon]\nmax_concurrent_tasks = {}\n\n[daemon.agents.build]\nkind = \"command\"\n\
         command = [\"sh\", \"-c\", \"echo \\\"$KENNEL_STORY\\\" >> '{}'\"]\n",
        a.capacity,
        log.display()
    );
    let added = Instant::now();
    for i in 0..a.stories {
        let id = format!("s{i:05}");
        let story = CreateStory {
            id: Some(id.clone()),
            title: format!("story {i}"),
            body: None,
            profile: Some("build".into()),
            repo: None,
            depends_on: Vec::new(),
            max_retries: None,
        };
        let _: serde_json::Value = api.post("/api/v1/stories", &story).await?;
        let to = MoveStory {
            stage: StoryStage::Current,
        };
        let _: serde_json::Value = api.post(&format!("/api/v1/stories/{id}/move"), &to).await?;
    }
    println!(
        "setup: {} stories added in {:.1}s; {} agents x {} slots, tick {}",
        a.stories,
        added.elapsed().as_secs_f64(),
        a.agents,
        a.capacity,
        a.tick
    );
    let mut events = EventStream::connect(
        &format!("{}/api/v1/events", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    let started = Instant::now();
    let mut agents = Vec::new();
    let mut proxies = Vec::new();
    for n in 0..a.agents {
        let req = CreateJoinToken {
            name: format!("bench-{n}"),
            ttl_secs: None,
        };
        let token: CreatedJoinToken = api.post("/api/v1/agent-tokens", &req).await?;
        let proxy = FaultProxy::start(srv.addr()).await?;
        let args = ["--tick", a.tick.as_str(), "--claim-ttl", "10m"];
        agents.push(KennelAgent::start(&bin, &proxy.url(), &token.token, &toml, &args).await?);
        proxies.push(proxy);
    }
    let deadline = Duration::from_secs(a.timeout_secs);
    let mut built = std::collections::BTreeSet::new();
    while built.len() < a.stories {
        let left = deadline.saturating_sub(started.elapsed());
        let m = events
            .wait_for(left, |m| m.event == "story.stage")
            .await
            .with_context(|| format!("{} of {} stories built", built.len(), a.stories))?;
        let v = m.json()?;
        if v.pointer("/data/to").and_then(|t| t.as_str()) == Some("3_qa") {
            if let Some(id) = v.pointer("/data/storyId").and_then(|s| s.as_str()) {
                built.insert(id.to_string());
            }
        }
    }
    let converged = started.elapsed();
    let traffic: u64 = proxies.iter().map(|p| p.carried().0 + p.carried().1).sum();
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&log)?.lines() {
        *runs.entry(line.to_string()).or_default() += 1;
    }
    let twice = runs.values().filter(|n| **n > 1).count();
    drop(agents);
    let doc = srv.data_dir().join("pipeline.automerge");
    let changes = kennel_sync::DocFile::new(&doc)
        .load()?
        .get_changes(&[])
        .len();
    println!(
        "converged: {} stories in 3_qa {:.1}s after the first agent started ({:.0} stories/s); \
         built more than once: {twice}",
        a.stories,
        converged.as_secs_f64(),
        a.stories as f64 / converged.as_secs_f64()
    );
    println!(
        "document: {} KiB at the rendezvous ({} changes, {:.0} bytes per story)",
        size(&doc) / 1024,
        changes,
        size(&doc) as f64 / a.stories as f64
    );
    println!(
        "sync traffic: {:.1} MiB between the agents and the rendezvous, {:.0} bytes per story, \
         {:.0} bytes per change",
        traffic as f64 / (1 << 20) as f64,
        traffic as f64 / a.stories as f64,
        traffic as f64 / changes.max(1) as f64
    );
    Ok(())
}

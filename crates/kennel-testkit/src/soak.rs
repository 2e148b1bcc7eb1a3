//! The soak: the real system given more work than it has slots, with faults injected while it
//! works, then checked the way a user would check it. The suite runs it small (a test) and
//! `kennel-bench soak` runs it large (a benchmark); both read the same [`SoakReport`].
//!
//! What runs: a real `kennel server`, real `kennel daemon`s (optionally behind a real
//! `kennel relay`), a real repository with a bare remote, and a `command` agent (`sh -c`) that
//! prints `start`, sleeps, prints `middle`, sleeps (the two sleeps total a seeded random time),
//! writes `<task id>.txt` and prints `end`. All tasks are submitted at once.
//!
//! The faults, each once and each while tasks run (triggered by how many have finished, never
//! by a timer): `kill -9` of a daemon and its restart, `kill -9` of the server and its
//! restart, SIGTERM of another daemon and its restart.
//!
//! What is checked (each failure becomes a line in [`SoakReport::problems`]): every task
//! completed; its branch on the remote holds exactly its file; the output of the attempt that
//! completed is `start`, `middle`, `end` in order without repeats; no attempt was refused for
//! capacity; every attempt before the last ended by a fault (`lost`, `returned`, or refused by
//! a daemon shutting down), and no more attempts were lost and counted than the crashed daemon
//! had slots.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures_util::future::join_all;
use kennel_proto::api::{CreateTask, TaskDetail};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::{AttemptStatus, TaskStatus};

use crate::git::{git, GitFixture};
use crate::relay::{KennelRelay, RELAY_DAEMON_KEY};
use crate::server::KennelServer;
use crate::sse::EventStream;
use crate::worker::KennelDaemon;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// The `kennel` binary.
    pub bin: PathBuf,
    pub tasks: usize,
    /// One daemon per entry, with that many slots.
    pub capacities: Vec<u32>,
    /// Seeds the agents' run times; print it so a failure can be replayed.
    pub seed: u64,
    /// Put the daemons behind one `kennel relay`.
    pub relay: bool,
    /// Inject the three faults.
    pub faults: bool,
    /// Each agent runs a random time in this range, in milliseconds.
    pub run_ms: (u64, u64),
    /// How long the whole run may take before it is reported as stuck.
    pub deadline: Duration,
}

impl SoakPlan {
    /// The suite's scenario: 200 tasks, daemons of 1, 2 and 3 slots, agents of 50–500 ms.
    pub fn suite(bin: PathBuf, seed: u64, relay: bool) -> Self {
        SoakPlan {
            bin,
            tasks: 200,
            capacities: vec![1, 2, 3],
            seed,
            relay,
            faults: true,
            run_ms: (50, 500),
            deadline: Duration::from_secs(300),
        }
    }
}

/// What happened, and what a user would find wrong.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub tasks: usize,
    /// First submit to last task finished.
    pub elapsed: Duration,
    pub completed: usize,
    /// Attempts of all tasks, by how they ended.
    pub attempts: BTreeMap<String, u64>,
    /// Attempts refused by a daemon for capacity.
    pub capacity_refusals: u64,
    /// Attempts lost to a crash and counted against their task.
    pub charged_losses: u64,
    /// Per task, creation to the start of its first attempt that ran, in milliseconds.
    pub start_ms: Vec<f64>,
    /// The faults injected, in order, with how many tasks had finished at the time.
    pub faults: Vec<String>,
    /// Everything a user would call wrong; empty when the run is clean.
    pub problems: Vec<String>,
}

impl SoakReport {
    pub fn tasks_per_sec(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn attempts_per_task(&self) -> f64 {
        self.attempts.values().sum::<u64>() as f64 / self.tasks.max(1) as f64
    }

    /// The `p`-th percentile (0–100) of submit → agent start, in milliseconds.
    pub fn start_percentile(&self, p: f64) -> f64 {
        let mut v = self.start_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    }

    /// One paragraph for a log or a benchmark report.
    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} of {} tasks completed in {:.1}s ({:.1} tasks/s); submit→agent start \
             p50 {:.0} ms, p99 {:.0} ms; {:.3} attempts per task {:?}; {} capacity refusals; \
             {} charged losses; faults: {}",
            self.seed,
            self.completed,
            self.tasks,
            self.elapsed.as_secs_f64(),
            self.tasks_per_sec(),
            self.start_percentile(50.0),
            self.start_percentile(99.0),
            self.attempts_per_task(),
            self.attempts,
            self.capacity_refusals,
            self.charged_losses,
            if self.faults.is_empty() {
                "none".to_string()
            } else {
                self.faults.join("; ")
            }
        )
    }
}

/// splitmix64: a tiny, well-mixed generator, so a seed replays the same run times.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi.saturating_sub(lo) + 1)
    }
}

fn daemon_toml(slots: u32) -> String {
    format!(
        r#"
[daemon]
max_concurrent_tasks = {slots}
interrupt_grace = "1s"
shutdown_grace = "0s"

[daemon.agents.sh]
kind = "command"
command = ["sh", "-c", "{{prompt}}"]
"#
    )
}

/// The agent's script: two sleeps adding up to `ms`, output around them, the task's file.
fn script(ms: u64) -> String {
    let first = ms / 2;
    let second = ms - first;
    format!(
        "echo start; sleep {}.{:03}; echo middle; sleep {}.{:03}; \
         echo $KENNEL_TASK_ID > $KENNEL_TASK_ID.txt; echo end",
        first / 1000,
        first % 1000,
        second / 1000,
        second % 1000
    )
}

/// The running system.
struct Rig {
    server: KennelServer,
    _relay: Option<KennelRelay>,
    daemons: Vec<KennelDaemon>,
}

async fn start_rig(plan: &SoakPlan) -> anyhow::Result<Rig> {
    let server = KennelServer::start(&plan.bin, &[]).await?;
    let mut relay = None;
    let mut daemons = Vec::new();
    if plan.relay {
        let mut r = KennelRelay::start(&plan.bin, &server, "").await?;
        r.wait_upstream(Duration::from_secs(30)).await?;
        for (i, slots) in plan.capacities.iter().enumerate() {
            let (_, machine) =
                crate::server::named_data_dir("kennel-soak-id-", &format!("soak-{i}"))?;
            daemons.push(
                KennelDaemon::start_at(
                    &plan.bin,
                    &r.ws_url(),
                    RELAY_DAEMON_KEY,
                    &machine,
                    &daemon_toml(*slots),
                )
                .await?,
            );
        }
        relay = Some(r);
    } else {
        for slots in &plan.capacities {
            daemons.push(KennelDaemon::start(&plan.bin, &server, &daemon_toml(*slots)).await?);
        }
    }
    Ok(Rig {
        server,
        _relay: relay,
        daemons,
    })
}

/// An event stream that survives the server's restart by resuming after the last id seen.
struct Events {
    url: String,
    key: String,
    stream: Option<EventStream>,
    last_id: i64,
}

impl Events {
    async fn connect(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/api/v1/events?after={}", self.url, self.last_id);
        self.stream = Some(EventStream::connect(&url, Some(&self.key), None).await?);
        Ok(())
    }

    /// The next terminal task status: (task id, status). Reconnects once if the stream broke.
    async fn next_end(&mut self, deadline: Duration) -> anyhow::Result<(String, String)> {
        let until = Instant::now() + deadline;
        loop {
            if self.stream.is_none() {
                self.connect().await?;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("no task finished within {deadline:?}");
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let msg = match stream.next(left).await {
                Ok(m) => m,
                Err(e) if Instant::now() < until => {
                    // The server went away (a fault) or the stream broke: resume.
                    tracing_note(&format!("event stream ended ({e:#}); resuming"));
                    self.stream = None;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Ok(id) = msg.id.parse::<i64>() {
                self.last_id = self.last_id.max(id);
            }
            if msg.event != "task.status" {
                continue;
            }
            let v = msg.json()?;
            let status = v
                .pointer("/data/status")
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string();
            let terminal = status.parse::<TaskStatus>().is_ok_and(|s| s.is_terminal());
            if terminal {
                let task = v
                    .get("taskId")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_string();
                return Ok((task, status));
            }
        }
    }
}

fn tracing_note(s: &str) {
    eprintln!("[soak] {s}");
}

/// Runs the plan and reports what happened. Fails only when the rig itself cannot run (a
/// process does not start, the run exceeds its deadline); what a user would call wrong goes
/// into [`SoakReport::problems`].
pub async fn run(plan: &SoakPlan) -> anyhow::Result<SoakReport> {
    tracing_note(&format!(
        "seed {} ({} tasks, daemons {:?}, relay {}, faults {})",
        plan.seed, plan.tasks, plan.capacities, plan.relay, plan.faults
    ));
    let git_fixture = GitFixture::new(&[])?;
    let mut rig = start_rig(plan).await?;
    let api = rig.server.api();
    let mut events = Events {
        url: rig.server.url(),
        key: rig.server.admin_key().to_string(),
        stream: None,
        last_id: 0,
    };
    events.connect().await?;

    let mut rng = Rng(plan.seed);
    let requests: Vec<CreateTask> = (0..plan.tasks)
        .map(|i| CreateTask {
            name: format!("soak-{i}"),
            prompt: script(rng.between(plan.run_ms.0, plan.run_ms.1)),
            agent: Some("sh".into()),
            repo: Some(RepoSpec {
                url: git_fixture.url(),
                base_branch: "main".into(),
            }),
            ..CreateTask::default()
        })
        .collect();
    let started = Instant::now();
    let submitted = join_all(requests.iter().map(|r| api.submit(r))).await;
    let mut ids = Vec::with_capacity(plan.tasks);
    for s in submitted {
        ids.push(s.context("a submit failed")?.id);
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();

    // The faults, in order, each at a share of finished tasks.
    let mut faults: Vec<(f64, &str)> = if plan.faults && rig.daemons.len() >= 2 {
        vec![
            (0.15, "kill -9 daemon 0"),
            (0.35, "kill -9 server"),
            (0.55, "SIGTERM daemon 1"),
        ]
    } else {
        Vec::new()
    };
    faults.reverse();
    let mut report = SoakReport {
        seed: plan.seed,
        tasks: plan.tasks,
        ..SoakReport::default()
    };
    let mut ended: HashMap<String, String> = HashMap::new();
    let until = started + plan.deadline;
    while ended.len() < wanted.len() {
        let left = until.saturating_duration_since(Instant::now());
        let (task, status) = events.next_end(left).await.with_context(|| {
            format!(
                "seed {}: {} of {} tasks finished before the run stalled",
                plan.seed,
                ended.len(),
                wanted.len()
            )
        })?;
        if !wanted.contains(task.as_str()) {
            continue;
        }
        ended.insert(task, status);
        let share = ended.len() as f64 / wanted.len() as f64;
        if let Some((at, what)) = faults.last().copied() {
            if share >= at {
                faults.pop();
                report
                    .faults
                    .push(format!("{what} after {} finished", ended.len()));
                tracing_note(&format!("fault: {what} ({} finished)", ended.len()));
                match what {
                    "kill -9 daemon 0" => {
                        rig.daemons[0].kill9().await?;
                        rig.daemons[0].start_again().await?;
                    }
                    "kill -9 server" => {
                        events.stream = None;
                        rig.server.restart().await?;
                    }
                    _ => {
                        let status = rig.daemons[1].terminate(Duration::from_secs(60)).await?;
                        if !status.success() {
                            report
                                .problems
                                .push(format!("daemon 1 exited {status:?} after SIGTERM"));
                        }
                        rig.daemons[1].start_again().await?;
                    }
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    check(plan, &rig, &git_fixture, &ids, &mut report).await?;
    Ok(report)
}

/// What a user would check once everything has finished.
async fn check(
    plan: &SoakPlan,
    rig: &Rig,
    git_fixture: &GitFixture,
    ids: &[String],
    report: &mut SoakReport,
) -> anyhow::Result<()> {
    let api = rig.server.api();
    let crashed_slots = plan.capacities.first().copied().unwrap_or(0) as u64;
    for id in ids {
        let d: TaskDetail = api.task(id).await?;
        let t = &d.task;
        if t.status == TaskStatus::Completed {
            report.completed += 1;
        } else {
            report.problems.push(format!(
                "task {id} ended {} after {} attempts: {}",
                t.status,
                t.attempt,
                t.error.as_deref().unwrap_or("-")
            ));
            continue;
        }
        for (i, a) in d.attempts.iter().enumerate() {
            *report.attempts.entry(a.status.to_string()).or_default() += 1;
            let err = a.error.as_deref().unwrap_or_default();
            if a.status == AttemptStatus::Rejected && err.contains("capacity") {
                report.capacity_refusals += 1;
            }
            if a.status == AttemptStatus::Lost && !err.contains("never received") {
                report.charged_losses += 1;
                tracing_note(&format!("task {id} attempt {} lost: {err}", a.attempt));
            }
            let last = i + 1 == d.attempts.len();
            // A crash loses an attempt, a clean stop returns it or refuses a spawn in flight.
            let fault = matches!(a.status, AttemptStatus::Lost | AttemptStatus::Returned)
                || (a.status == AttemptStatus::Rejected && err.contains("shutting down"));
            if !last && !fault {
                report.problems.push(format!(
                    "task {id} attempt {} ended {} ({err}); only faults may end an attempt \
                     before the last",
                    a.attempt, a.status
                ));
            }
        }
        if let Some(ms) = start_ms(&d) {
            report.start_ms.push(ms);
        }
        // Its branch holds exactly its file (and what main had).
        let branch = format!("kennel/{id}");
        match git(&git_fixture.remote(), &["ls-tree", "--name-only", &branch]) {
            Ok(files) => {
                let mut files: Vec<&str> = files.lines().collect();
                files.sort_unstable();
                let own = format!("{id}.txt");
                if files != ["README.md", own.as_str()] {
                    report
                        .problems
                        .push(format!("branch {branch} holds {files:?}"));
                } else if git_fixture.show(&branch, &own).ok().as_deref() != Some(id.as_str()) {
                    report
                        .problems
                        .push(format!("{own} on {branch} does not hold the task id"));
                }
            }
            Err(e) => report
                .problems
                .push(format!("branch {branch} is missing on the remote: {e:#}")),
        }
        // The completed attempt's output: complete, in order, once each.
        let page = api.output(id, Some(t.attempt), 0).await?;
        let mut seqs = page.items.iter().map(|c| c.seq);
        let contiguous = seqs.next().is_none_or(|first| {
            seqs.try_fold(first, |prev, s| (s == prev + 1).then_some(s))
                .is_some()
        });
        let stdout: Vec<&str> = page
            .items
            .iter()
            .filter(|c| c.stream == OutputStream::Stdout)
            .map(|c| c.output.as_str())
            .collect();
        if stdout != ["start", "middle", "end"] || !contiguous {
            report.problems.push(format!(
                "task {id} attempt {}: stdout {stdout:?}, seqs contiguous: {contiguous}",
                t.attempt
            ));
        }
    }
    if report.capacity_refusals > 0 {
        report.problems.push(format!(
            "{} attempts were refused for capacity",
            report.capacity_refusals
        ));
    }
    if report.charged_losses > crashed_slots {
        report.problems.push(format!(
            "{} attempts were lost and counted, more than the {crashed_slots} slots of the \
             daemon that was killed",
            report.charged_losses
        ));
    }
    Ok(())
}

/// Creation to the start of the first attempt that started, in milliseconds.
fn start_ms(d: &TaskDetail) -> Option<f64> {
    let created = parse_ms(&d.task.created_at)?;
    let started = d
        .attempts
        .iter()
        .find_map(|a| a.started_at.as_deref().and_then(parse_ms))?;
    Some((started - created) as f64)
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time as the store writes it
/// (`2026-12-06T02:54:03.185Z`, trailing zeros of the fraction cut).
fn parse_ms(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac_ms = format!("{frac:0<3}").get(..3)?.parse::<i64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + frac_ms)
}

/// A seed from the environment (`KENNEL_SOAK_SEED`) or from the clock.
pub fn seed_from_env() -> anyhow::Result<u64> {
    match std::env::var("KENNEL_SOAK_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| anyhow!("KENNEL_SOAK_SEED must be a number, not `{s}`")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_times() {
        assert_eq!(parse_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_ms("1970-01-02T00:00:01.5Z"), Some(86_401_500));
        let a = parse_ms("2026-12-06T02:54:03.185Z").unwrap_or_default();
        let b = parse_ms("2026-12-06T02:54:03.2Z").unwrap_or_default();
        assert_eq!(b - a, 15);
        assert_eq!(
            parse_ms("2024-03-01T00:00:00Z").unwrap_or_default() / 86_400_000,
            19_783
        );
    }

    #[test]
    fn a_seed_replays_the_same_times() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let xs: Vec<u64> = (0..5).map(|_| a.between(50, 500)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.between(50, 500)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (50..=500).contains(x)));
        assert_eq!(script(250), "echo start; sleep 0.125; echo middle; sleep 0.125; echo $KENNEL_TASK_ID > $KENNEL_TASK_ID.txt; echo end");
    }
}

//! Build agents (`kennel agent`) as real processes against a coordinator's rendezvous: they
//! join with one-time tokens, claim stories from the shared pipeline, build them with a
//! `command` profile in worktrees of a real (local bare) repository, push their branches and
//! advance the stories. Synchronised on the event stream and the agents' output, never on
//! sleeps.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kennel_testkit::sse::EventStream;
use kennel_testkit::{within, GitFixture, KennelAgent, KennelServer};

use crate::{bin, kennel_cli as kennel, server};

/// Twenty builds on a loaded machine, with process starts and pushes.
const SLOW: Duration = Duration::from_secs(120);

/// Agent config: a `build` profile that notes which story it built in `log` (one line per
/// run) and leaves a file in the worktree, so the branch has a commit; `gate` holds it until
/// `release` exists when the story is `held`.
fn agent_config(log: &Path, release: &Path) -> String {
    format!(
        r#"
[daemon]
max_concurrent_tasks = 2

[daemon.agents.build]
kind = "command"
command = ["sh", "-c", "echo \"$KENNEL_STORY\" >> '{log}'; if [ \"$KENNEL_STORY\" = held ]; then while [ ! -e '{release}' ]; do sleep 0.1; done; fi; echo \"built $KENNEL_STORY\" > built.txt"]
"#,
        log = log.display(),
        release = release.display(),
    )
}

async fn token(srv: &KennelServer, name: &str) -> anyhow::Result<String> {
    let out = kennel(srv, &["agent-tokens", "create", "--name", name]).await?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

async fn agent(
    srv: &KennelServer,
    name: &str,
    toml: &str,
    ttl: &str,
) -> anyhow::Result<KennelAgent> {
    let token = token(srv, name).await?;
    KennelAgent::start(
        bin(),
        &srv.url(),
        &token,
        toml,
        &["--tick", "300ms", "--claim-ttl", ttl],
    )
    .await
}

/// Adds story `id` building `repo`, in `2_current`.
async fn add_story(srv: &KennelServer, id: &str, repo: &str) -> anyhow::Result<()> {
    let added = kennel(
        srv,
        &[
            "story",
            "add",
            id,
            "--id",
            id,
            "--profile",
            "build",
            "--repo",
            repo,
        ],
    )
    .await?;
    anyhow::ensure!(added.status.success(), "{added:?}");
    let moved = kennel(srv, &["story", "move", id, "2_current"]).await?;
    anyhow::ensure!(moved.status.success(), "{moved:?}");
    Ok(())
}

async fn events(srv: &KennelServer) -> anyhow::Result<EventStream> {
    EventStream::connect(
        &format!("{}/api/v1/events", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await
}

/// Waits until every story of `ids` has moved to `3_qa` (as `story.stage` events say).
async fn wait_built(events: &mut EventStream, ids: &[String]) -> anyhow::Result<()> {
    let mut left: std::collections::BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    while !left.is_empty() {
        let m = events.wait_for(SLOW, |m| m.event == "story.stage").await?;
        let v = m.json()?;
        if v.pointer("/data/to").and_then(|t| t.as_str()) == Some("3_qa") {
            if let Some(id) = v.pointer("/data/storyId").and_then(|s| s.as_str()) {
                left.remove(id);
            }
        }
    }
    Ok(())
}

async fn stories(srv: &KennelServer) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let all: Vec<serde_json::Value> = srv.api().get("/api/v1/stories").await?;
    Ok(all
        .into_iter()
        .map(|s| (s["id"].as_str().unwrap_or_default().to_string(), s))
        .collect())
}

/// How many times each story was built, from the profile's log.
fn builds(log: &Path) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *n.entry(line.to_string()).or_insert(0) += 1;
    }
    n
}

#[tokio::test]
async fn three_agents_build_twenty_stories_each_once_and_push_their_branches() -> anyhow::Result<()>
{
    let srv = server().await?;
    let repo = GitFixture::new(&[])?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("built.log");
    let toml = agent_config(&log, &scratch.path().join("release"));
    let ids: Vec<String> = (0..20).map(|i| format!("s{i:02}")).collect();
    for id in &ids {
        add_story(&srv, id, &repo.url()).await?;
    }
    let mut events = events(&srv).await?;
    let mut agents = Vec::new();
    for name in ["a", "b", "c"] {
        agents.push(agent(&srv, name, &toml, "10m").await?);
    }
    wait_built(&mut events, &ids).await?;

    let n = builds(&log);
    let once: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(n, once, "each story built exactly once");
    let nodes: Vec<&str> = agents.iter().map(|a| a.node()).collect();
    let mut owners = std::collections::BTreeSet::new();
    for (id, s) in stories(&srv).await? {
        assert_eq!(s["stage"], "3_qa", "{id}: {s}");
        let owner = s["owner"].as_str().unwrap_or_default();
        assert!(
            nodes.contains(&owner),
            "{id} is owned by one of the agents: {s}"
        );
        owners.insert(owner.to_string());
        let branch = format!("kennel/{id}.{owner}");
        assert_eq!(s["branch"], branch.as_str(), "{id}: {s}");
        let commit = s["commit"].as_str().unwrap_or_default();
        assert_eq!(repo.rev(&branch).as_deref(), Some(commit), "{id}: pushed");
        assert_eq!(
            repo.show(&branch, "built.txt")?.trim(),
            format!("built {id}")
        );
        let log: Vec<&str> = s["attemptLog"]
            .as_array()
            .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
            .unwrap_or_default();
        let want = format!("attempt 1 on {owner}: built on {branch} (");
        assert!(log.len() == 1 && log[0].starts_with(&want), "{id}: {log:?}");
    }
    assert!(owners.len() > 1, "the work was shared: {owners:?}");
    Ok(())
}

#[tokio::test]
async fn a_story_of_a_killed_agent_is_taken_over_after_the_claim_ttl_and_built_by_another(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let repo = GitFixture::new(&[])?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("built.log");
    let release = scratch.path().join("release");
    let toml = agent_config(&log, &release);
    let mut events = events(&srv).await?;
    let mut first = agent(&srv, "first", &toml, "2s").await?;
    add_story(&srv, "held", &repo.url()).await?;
    // It starts building, and hangs there (its build has noted itself in the log).
    first
        .wait_line(SLOW, |l| l.starts_with("kennel: building held"))
        .await?;
    within(SLOW, "the first build to start", async {
        while !builds(&log).contains_key("held") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    first.kill9().await?;
    // Its build process outlives it, as after a real crash; let it end now.
    std::fs::write(&release, "")?;

    let second = agent(&srv, "second", &toml, "2s").await?;
    wait_built(&mut events, &["held".to_string()]).await?;
    let s = &stories(&srv).await?["held"];
    assert_eq!(s["owner"], second.node(), "{s}");
    let branch = format!("kennel/held.{}", second.node());
    assert_eq!(s["branch"], branch.as_str());
    assert_eq!(
        repo.rev(&branch).as_deref(),
        Some(s["commit"].as_str().unwrap_or_default())
    );
    assert_eq!(
        builds(&log)["held"],
        2,
        "started by the first, built by the second"
    );
    Ok(())
}

/// Agent config for the partition: capacity 1; its builds note `<name> <story>` in `log`;
/// stories whose id starts with `h` wait for `gates/h`, and story `s` waits for `gates/s` if
/// `hold_s`.
fn partition_config(name: &str, log: &Path, gates: &Path, hold_s: bool) -> String {
    let wait = |gate: &str| {
        format!(
            "while [ ! -e '{}' ]; do sleep 0.1; done",
            gates.join(gate).display()
        )
    };
    let s = if hold_s { wait("s") } else { ":".into() };
    format!(
        r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.build]
kind = "command"
command = ["sh", "-c", "echo \"{name} $KENNEL_STORY\" >> '{log}'; case \"$KENNEL_STORY\" in h*) {h};; s) {s};; esac; echo \"built $KENNEL_STORY\" > built.txt"]
"#,
        log = log.display(),
        h = wait("h"),
    )
}

#[tokio::test]
async fn two_agents_apart_claim_one_story_and_after_the_partition_heals_one_result_counts(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let repo = GitFixture::new(&[])?;
    let scratch = tempfile::tempdir()?;
    let (log, gates) = (
        scratch.path().join("built.log"),
        scratch.path().join("gates"),
    );
    std::fs::create_dir_all(&gates)?;
    let proxy = kennel_testkit::FaultProxy::start(srv.addr()).await?;
    // x reaches the rendezvous through the proxy; both hold on to their first build.
    let x_token = token(&srv, "x").await?;
    let x_toml = partition_config("x", &log, &gates, true);
    let args = ["--tick", "300ms", "--claim-ttl", "10m"];
    let x = KennelAgent::start(bin(), &proxy.url(), &x_token, &x_toml, &args).await?;
    let y_token = token(&srv, "y").await?;
    let y_toml = partition_config("y", &log, &gates, false);
    let y = KennelAgent::start(bin(), &srv.url(), &y_token, &y_toml, &args).await?;
    add_story(&srv, "h1", &repo.url()).await?;
    add_story(&srv, "h2", &repo.url()).await?;
    let building = |l: &str| l.starts_with("kennel: building h");
    x.wait_line(SLOW, building).await?;
    y.wait_line(SLOW, building).await?;
    // Both busy: the new story waits. Then x is cut off, and both get room.
    add_story(&srv, "s", &repo.url()).await?;
    proxy.cut();
    x.wait_line(SLOW, |l| l.contains("working offline")).await?;
    std::fs::write(gates.join("h"), "")?;

    // Both build it: y with the rendezvous's grant, x apart, on its rank alone.
    let mut events = events(&srv).await?;
    y.wait_line(SLOW, |l| l.starts_with("kennel: built s "))
        .await?;
    x.wait_line(SLOW, |l| l.starts_with("kennel: building s "))
        .await?;
    wait_built(&mut events, &["s".to_string()]).await?;

    // Healed: x learns that y's claim was granted, drops its build, and its result never
    // counts.
    proxy.heal();
    x.wait_line(SLOW, |l| {
        l == "kennel: dropped s: another agent's claim won"
    })
    .await?;
    std::fs::write(gates.join("s"), "")?;
    let s = &stories(&srv).await?["s"];
    assert_eq!(
        (s["owner"].as_str(), s["stage"].as_str()),
        (Some(y.node()), Some("3_qa")),
        "{s}"
    );
    let y_branch = format!("kennel/s.{}", y.node());
    assert_eq!(s["branch"], y_branch.as_str());
    assert_eq!(repo.rev(&y_branch).as_deref(), s["commit"].as_str());
    assert_eq!(
        repo.rev(&format!("kennel/s.{}", x.node())),
        None,
        "x never pushed"
    );
    let claimants: Vec<&str> = s["claimants"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    assert!(claimants.contains(&x.node()), "x's claim merged: {s}");
    let lines = std::fs::read_to_string(&log)?;
    assert!(lines.contains("x s") && lines.contains("y s"), "{lines}");
    Ok(())
}

#[tokio::test]
async fn after_every_process_is_killed_and_restarted_nothing_is_lost_or_resurrected(
) -> anyhow::Result<()> {
    let mut srv = server().await?;
    let repo = GitFixture::new(&[])?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("built.log");
    let toml = agent_config(&log, &scratch.path().join("release"));
    let ids: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    for id in &ids {
        add_story(&srv, id, &repo.url()).await?;
    }
    let mut first = events(&srv).await?;
    let mut a = agent(&srv, "a", &toml, "10m").await?;
    let mut b = agent(&srv, "b", &toml, "10m").await?;
    wait_built(&mut first, &ids).await?;
    let before = stories(&srv).await?;
    let deleted = kennel(&srv, &["story", "delete", "s1"]).await?;
    assert!(deleted.status.success(), "{deleted:?}");

    // Every process dies at once, then comes back on its data.
    for agent in [&mut a, &mut b] {
        agent.kill9().await?;
    }
    srv.restart().await?;
    a.start_again().await?;
    b.start_again().await?;
    let mut again = events(&srv).await?;
    add_story(&srv, "s4", &repo.url()).await?;
    wait_built(&mut again, &["s4".to_string()]).await?;

    let after = stories(&srv).await?;
    assert!(
        !after.contains_key("s1"),
        "the deleted story stays deleted: {after:?}"
    );
    for id in ["s0", "s2", "s3"] {
        for field in ["stage", "owner", "branch", "commit"] {
            assert_eq!(after[id][field], before[id][field], "{id}.{field}");
        }
    }
    assert_eq!(after["s4"]["stage"], "3_qa");
    let once: BTreeMap<String, usize> = ["s0", "s1", "s2", "s3", "s4"]
        .iter()
        .map(|id| (id.to_string(), 1))
        .collect();
    assert_eq!(builds(&log), once, "nothing was built again");
    Ok(())
}

#[tokio::test]
async fn claude_code_builds_a_story_and_its_file_lands_on_the_agents_branch() -> anyhow::Result<()>
{
    crate::claude::claude_binary()?;
    let upstream = kennel_testkit::ScriptedAnthropic::write_file("hello.txt", "hi\n").await?;
    let home = tempfile::Builder::new()
        .prefix("kennel-test-claude-home-")
        .tempdir()?;
    let repo = GitFixture::new(&[])?;
    let srv = server().await?;
    let toml = crate::claude::daemon_config(&upstream, home.path());
    let token = token(&srv, "claude").await?;
    let args = ["--tick", "300ms"];
    let agent = KennelAgent::start(bin(), &srv.url(), &token, &toml, &args).await?;
    let added = kennel(
        &srv,
        &[
            "story",
            "add",
            "Say hello",
            "--id",
            "hello",
            "--body",
            "Create hello.txt containing hi",
            "--profile",
            "claude",
            "--repo",
            &repo.url(),
        ],
    )
    .await?;
    assert!(added.status.success(), "{added:?}");
    let mut events = events(&srv).await?;
    let moved = kennel(&srv, &["story", "move", "hello", "2_current"]).await?;
    assert!(moved.status.success(), "{moved:?}");
    if let Err(e) = wait_built(&mut events, &["hello".to_string()]).await {
        let seen: Vec<String> = upstream
            .recorded()
            .iter()
            .map(|r| format!("{} {}", r.method, r.uri))
            .collect();
        anyhow::bail!("{e}\nupstream saw: {seen:?}");
    }
    let s = &stories(&srv).await?["hello"];
    let branch = format!("kennel/hello.{}", agent.node());
    assert_eq!(
        (s["owner"].as_str(), s["branch"].as_str()),
        (Some(agent.node()), Some(branch.as_str()))
    );
    assert_eq!(repo.rev(&branch).as_deref(), s["commit"].as_str());
    assert_eq!(repo.show(&branch, "hello.txt")?.trim(), "hi");
    // The prompt was the story's title and body.
    let asked = upstream.recorded().iter().any(|r| {
        r.body
            .to_string()
            .contains("Create hello.txt containing hi")
    });
    assert!(asked, "Claude Code was given the story's body");
    Ok(())
}

/// How many peers a `kennel: mesh peers: a, b, c` line names.
fn mesh_peers(line: &str) -> Option<usize> {
    let peers = line.strip_prefix("kennel: mesh peers: ")?;
    Some(if peers == "none" {
        0
    } else {
        peers.split(", ").count()
    })
}

#[tokio::test]
async fn with_the_rendezvous_down_six_agents_go_on_over_their_mesh_of_at_most_three_links_each(
) -> anyhow::Result<()> {
    let mut srv = server().await?;
    let repo = GitFixture::new(&[])?;
    let scratch = tempfile::tempdir()?;
    let (log, gate) = (
        scratch.path().join("built.log"),
        scratch.path().join("gate"),
    );
    let toml = format!(
        r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.build]
kind = "command"
command = ["sh", "-c", "echo \"$KENNEL_STORY\" >> '{log}'; while [ ! -e '{gate}' ]; do sleep 0.1; done; echo \"built $KENNEL_STORY\" > built.txt"]
"#,
        log = log.display(),
        gate = gate.display()
    );
    let mut agents = Vec::new();
    for n in 0..6 {
        let token = token(&srv, &format!("m{n}")).await?;
        let args = ["--tick", "300ms", "--listen", "127.0.0.1:0"];
        agents.push(KennelAgent::start(bin(), &srv.url(), &token, &toml, &args).await?);
    }
    // Each links to three of the five others, never more.
    for a in &agents {
        a.wait_line(SLOW, |l| mesh_peers(l) == Some(3)).await?;
    }
    let ids: Vec<String> = (0..12).map(|i| format!("m{i:02}")).collect();
    for id in &ids {
        add_story(&srv, id, &repo.url()).await?;
    }
    // Six builds run (one slot each) when the rendezvous goes down.
    within(SLOW, "six builds to start", async {
        while builds(&log).len() < 6 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    srv.kill9().await?;
    std::fs::write(&gate, "")?;
    // The other six are claimed and built over the mesh alone.
    within(
        SLOW,
        "every story to be built without the rendezvous",
        async {
            while builds(&log).len() < 12 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await?;
    // The rendezvous comes back and learns it all.
    srv.restart().await?;
    let mut events = events(&srv).await?;
    let all = stories(&srv).await?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| all.get(*id).is_none_or(|s| s["stage"] != "3_qa"))
        .cloned()
        .collect();
    wait_built(&mut events, &missing).await?;
    let once: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(builds(&log), once, "each story built once");
    for (id, s) in stories(&srv).await? {
        let branch = s["branch"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            repo.rev(&branch).as_deref(),
            s["commit"].as_str(),
            "{id}: {s}"
        );
    }
    for a in &agents {
        for line in a.lines() {
            assert!(
                mesh_peers(&line).is_none_or(|n| n <= 3),
                "{}: {line}",
                a.node()
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_story_that_keeps_failing_is_blocked_after_its_retries_with_the_reason(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("built.log");
    let toml = format!(
        r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.broken]
kind = "command"
command = ["sh", "-c", "echo \"$KENNEL_STORY\" >> '{log}'; echo 'no compiler here' >&2; exit 3"]
"#,
        log = log.display()
    );
    let agent = agent(&srv, "a", &toml, "10m").await?;
    let story = kennel_proto::api::CreateStory {
        id: Some("bad".into()),
        title: "Build it".into(),
        body: None,
        profile: Some("broken".into()),
        repo: None,
        depends_on: Vec::new(),
        max_retries: Some(2),
    };
    let _: serde_json::Value = srv.api().post("/api/v1/stories", &story).await?;
    let moved = kennel(&srv, &["story", "move", "bad", "2_current"]).await?;
    assert!(moved.status.success(), "{moved:?}");
    let blocked = agent
        .wait_line(SLOW, |l| l.starts_with("kennel: blocked bad: "))
        .await?;
    assert!(blocked.contains("2 attempts failed"), "{blocked}");
    // The rendezvous learns it with the agent's next sync (a block moves no stage: no event).
    let s = within(SLOW, "the rendezvous to see the story blocked", async {
        loop {
            if let Ok(all) = stories(&srv).await {
                if all["bad"]["blocked"].is_string() {
                    return all["bad"].clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    let s = &s;
    let reason = s["blocked"].as_str().unwrap_or_default();
    assert!(reason.starts_with("2 attempts failed; last: "), "{s}");
    assert!(
        reason.contains("3"),
        "the exit status is in the reason: {s}"
    );
    assert_eq!(
        (s["failures"].as_u64(), s["stage"].as_str()),
        (Some(2), Some("2_current"))
    );
    assert_eq!(builds(&log)["bad"], 2, "tried twice, then left alone");
    let attempts: Vec<&str> = s["attemptLog"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{s}");
    for (n, line) in attempts.iter().enumerate() {
        let want = format!("attempt {} on {} failed: ", n + 1, agent.node());
        assert!(line.starts_with(&want), "{line}");
    }
    // Each attempt's output is kept beside the agent, with why it failed.
    for attempt in [1, 2] {
        let path = agent
            .data_dir()
            .join("logs")
            .join(format!("bad.{}-{attempt}.log", agent.node()));
        let kept = std::fs::read_to_string(&path)?;
        assert!(
            kept.contains("no compiler here"),
            "{}: {kept}",
            path.display()
        );
        assert!(kept.contains("kennel agent: attempt failed: "), "{kept}");
    }
    Ok(())
}

#[tokio::test]
async fn a_join_token_past_its_expiry_starts_no_agent_and_says_why() -> anyhow::Result<()> {
    let srv = server().await?;
    let out = kennel(
        &srv,
        &[
            "--json",
            "agent-tokens",
            "create",
            "--name",
            "late",
            "--ttl",
            "1",
        ],
    )
    .await?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let token = created["token"].as_str().unwrap_or_default().to_string();
    let expires = time::OffsetDateTime::parse(
        created["expiresAt"].as_str().unwrap_or_default(),
        &time::format_description::well_known::Rfc3339,
    )?;
    // Expiry is a matter of time: wait until the clock has passed it.
    within(SLOW, "the token's expiry", async {
        while time::OffsetDateTime::now_utc() <= expires {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().display().to_string();
    let url = srv.url();
    let args = [
        "agent",
        "--rendezvous",
        url.as_str(),
        "--join-token",
        token.as_str(),
        "--data-dir",
        data.as_str(),
    ];
    let ran = kennel(&srv, &args).await?;
    assert_eq!(ran.status.code(), Some(1), "{ran:?}");
    let err = String::from_utf8_lossy(&ran.stderr);
    assert!(
        err.contains("this join token expired; ask an admin for a new one"),
        "{err}"
    );
    assert!(!dir.path().join("agent.key").exists(), "no key was kept");
    Ok(())
}

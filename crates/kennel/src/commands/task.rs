//! `kennel task`: submit, list, show, follow logs, cancel, pause, resume, message.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use futures_util::StreamExt;
use kennel_proto::api::{
    CreateTask, OutputChunk, OutputPage, Page, SendMessageRequest, Task, TaskDetail,
};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::TaskStatus;

use crate::client::Client;
use crate::commands::print_json;
use crate::table;
use crate::Global;

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Submit a task.
    Submit {
        /// What the agent should do.
        prompt: String,
        /// Short name (default: the start of the prompt).
        #[arg(long)]
        name: Option<String>,
        /// Repository URL or local path to work in.
        #[arg(long)]
        repo: Option<String>,
        /// Branch to start from (default: the remote's default branch, the one its HEAD names).
        #[arg(long, requires = "repo")]
        base: Option<String>,
        /// Agent profile (claude, codex, aider, command, ...). Default: the server's.
        #[arg(long)]
        agent: Option<String>,
        /// Required daemon label, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        /// Environment for the agent, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Time limit per attempt, in seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Attempts before the task fails (default: the server's).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Follow the task's output until it finishes (exit 0 if it completed, 2 if not). With
        /// --json, prints each output chunk and then the finished task as JSON lines.
        #[arg(long, short)]
        follow: bool,
    },
    /// List tasks, newest first.
    List {
        /// Only tasks in this state.
        #[arg(long)]
        status: Option<TaskStatus>,
        /// Only tasks held by this daemon.
        #[arg(long)]
        daemon: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page's cursor.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show a task and its attempts.
    Show { id: String },
    /// Print a task's output; with -f, keep following until it finishes.
    Logs {
        id: String,
        /// Follow live output (exit 0 if the task completed, 2 if not). With --json, prints
        /// each output chunk and then the finished task as JSON lines.
        #[arg(long, short)]
        follow: bool,
        /// Attempt to show (default: the current one).
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// Cancel a task (interrupts it if running). Exits 1, as pause and send do, when the task
    /// had already finished (completed, failed, cancelled or lost): there is nothing to cancel.
    Cancel { id: String },
    /// Pause a running task.
    Pause { id: String },
    /// Resume a paused task.
    Resume { id: String },
    /// Send a message to a running agent.
    Send { id: String, message: String },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))
}

/// A repository given as a relative local path is resolved here, where the user typed it: the
/// daemon runs elsewhere (another directory, another machine) and would read it from there.
/// URLs (`scheme://…`, scp-style `host:path`) and absolute paths are sent as given.
fn resolve_repo(repo: String) -> anyhow::Result<String> {
    let local = !repo.contains("://")
        && match repo.find(':') {
            None => true,
            Some(colon) => repo[..colon].contains('/'),
        };
    let path = std::path::Path::new(&repo);
    if !local || path.is_absolute() {
        return Ok(repo);
    }
    let resolved = std::fs::canonicalize(path).with_context(|| {
        format!(
            "--repo `{repo}` is a relative path, but there is no such directory here ({}); give \
             a path that exists from this directory, an absolute path, or a URL",
            std::env::current_dir()
                .map(|d| d.join(&repo).display().to_string())
                .unwrap_or_default()
        )
    })?;
    resolved
        .into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("the repository path {p:?} is not valid UTF-8"))
}

pub async fn run(c: &Client, g: &Global, cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCmd::Submit {
            prompt,
            name,
            repo,
            base,
            agent,
            labels,
            priority,
            env,
            timeout,
            max_attempts,
            follow,
        } => {
            let name = name.unwrap_or_else(|| {
                let first: String = prompt
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(60)
                    .collect();
                if first.trim().is_empty() {
                    "task".into()
                } else {
                    first
                }
            });
            let repo = repo.map(resolve_repo).transpose()?;
            let req = CreateTask {
                name,
                prompt,
                repo: repo.map(|url| RepoSpec {
                    url,
                    base_branch: base.unwrap_or_default(),
                }),
                agent,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                priority,
                env: env.into_iter().collect(),
                timeout_secs: timeout,
                max_attempts,
            };
            let task: Task = c.post("/api/v1/tasks", &req).await?;
            if g.json && !follow {
                print_json(&task)?;
            } else {
                eprintln!("submitted task {} ({})", task.id, task.status);
                if !g.json {
                    println!("{}", task.id);
                }
            }
            warn_if_never_offered(c, &task.agent).await;
            if let Some(w) = &task.waiting {
                eprintln!("kennel: waiting: {w}");
            }
            if follow {
                return follow_logs(c, &task.id, None, task.waiting, g.json).await;
            }
        }
        TaskCmd::List {
            status,
            daemon,
            limit,
            cursor,
        } => {
            let mut q = vec![format!("limit={limit}")];
            // The paging hint repeats what the user asked for, so the next page is of the same
            // list and the same size.
            let mut again = String::from("kennel task list");
            if let Some(s) = status {
                q.push(format!("status={s}"));
                again.push_str(&format!(" --status {s}"));
            }
            if let Some(d) = daemon {
                q.push(format!("daemon={d}"));
                again.push_str(&format!(" --daemon {d}"));
            }
            again.push_str(&format!(" --limit {limit}"));
            if let Some(cur) = cursor {
                q.push(format!("cursor={cur}"));
            }
            let page: Page<Task> = c.get(&format!("/api/v1/tasks?{}", q.join("&"))).await?;
            if g.json {
                print_json(&page)?;
            } else {
                let rows: Vec<Vec<String>> = page
                    .items
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.status.to_string(),
                            t.agent.clone(),
                            t.priority.to_string(),
                            t.attempt.to_string(),
                            t.daemon_id.clone().unwrap_or_else(|| "-".into()),
                            t.created_at.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(
                        &["ID", "NAME", "STATUS", "AGENT", "PRIO", "ATTEMPT", "DAEMON", "CREATED"],
                        &rows
                    )
                );
                if let Some(next) = page.next_cursor {
                    eprintln!("more: {again} --cursor {next}");
                }
            }
        }
        TaskCmd::Show { id } => {
            let d: TaskDetail = c.get(&format!("/api/v1/tasks/{id}")).await?;
            if g.json {
                print_json(&d)?;
            } else {
                show(&d);
            }
        }
        TaskCmd::Logs {
            id,
            follow,
            attempt,
        } => {
            if follow {
                return follow_logs(c, &id, attempt, None, g.json).await;
            }
            let mut printer = LogPrinter::new(g.json);
            let mut after = 0;
            loop {
                let mut path = format!("/api/v1/tasks/{id}/output?after_seq={after}&limit=1000");
                if let Some(a) = attempt {
                    path.push_str(&format!("&attempt={a}"));
                }
                let page: OutputPage = c.get(&path).await?;
                if page.items.is_empty() {
                    break;
                }
                for chunk in &page.items {
                    printer.print(chunk)?;
                }
                after = page.next_after_seq;
            }
        }
        TaskCmd::Cancel { id } => {
            // The API's cancel is idempotent (200 with the task as it is), which suits scripts
            // that retry; a person typing it is told when there was nothing to cancel, and
            // the exit code says so as pause's and send's 409 do.
            let before: TaskDetail = c.get(&format!("/api/v1/tasks/{id}")).await?;
            if before.task.status.is_terminal() {
                bail!(nothing_to_cancel(&before.task));
            }
            let t: Task = c.post_empty(&format!("/api/v1/tasks/{id}/cancel")).await?;
            // It may have finished on its own between the two calls.
            if t.status.is_terminal() && t.status != TaskStatus::Cancelled {
                bail!(nothing_to_cancel(&t));
            }
            print_task(g, t)?
        }
        TaskCmd::Pause { id } => {
            print_task(g, c.post_empty(&format!("/api/v1/tasks/{id}/pause")).await?)?
        }
        TaskCmd::Resume { id } => print_task(
            g,
            c.post_empty(&format!("/api/v1/tasks/{id}/resume")).await?,
        )?,
        TaskCmd::Send { id, message } => {
            c.post_no_content(
                &format!("/api/v1/tasks/{id}/messages"),
                &SendMessageRequest { message },
            )
            .await?;
            if !g.json {
                println!("message sent to task {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The refusal for cancelling a task that had already finished.
fn nothing_to_cancel(t: &Task) -> String {
    format!(
        "task {} already {}; nothing to cancel (`kennel task show {}` shows how it ended)",
        t.id, t.status, t.id
    )
}

fn print_task(g: &Global, t: Task) -> anyhow::Result<()> {
    if g.json {
        print_json(&t)
    } else {
        println!("task {} is {}", t.id, t.status);
        Ok(())
    }
}

fn show(d: &TaskDetail) {
    let t = &d.task;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("id         {}", t.id);
    println!("name       {}", t.name);
    println!("status     {}", t.status);
    if let Some(w) = &t.waiting {
        println!("waiting    {w}");
    }
    println!("agent      {}", t.agent);
    if let Some(r) = &t.repo {
        if r.base_branch.is_empty() {
            println!("repo       {} (from its default branch)", r.url);
        } else {
            println!("repo       {} (from {})", r.url, r.base_branch);
        }
    }
    println!("priority   {}", t.priority);
    if t.attempt > t.max_attempts {
        // Attempts a daemon handed back or refused for capacity do not count.
        println!(
            "attempt    {} ({} allowed; attempts returned by stopping daemons or refused for \
             capacity do not count)",
            t.attempt, t.max_attempts
        );
    } else {
        println!("attempt    {} of {}", t.attempt, t.max_attempts);
    }
    println!("daemon     {}", opt(&t.daemon_id));
    println!("created    {}", t.created_at);
    println!("finished   {}", opt(&t.finished_at));
    if let Some(b) = &t.branch {
        println!("branch     {b} @ {}", opt(&t.commit));
    }
    if let Some(code) = t.exit_code {
        println!("exit code  {code}");
    }
    if let Some(e) = &t.error {
        println!("error      {e}");
    }
    println!("prompt     {}", t.prompt.lines().next().unwrap_or(""));
    if !d.attempts.is_empty() {
        let rows: Vec<Vec<String>> = d
            .attempts
            .iter()
            .map(|a| {
                vec![
                    a.attempt.to_string(),
                    a.daemon_id.clone(),
                    a.status.to_string(),
                    a.dispatched_at.clone(),
                    opt(&a.finished_at),
                    opt(&a.error),
                ]
            })
            .collect();
        println!();
        print!(
            "{}",
            table::render(
                &[
                    "ATTEMPT",
                    "DAEMON",
                    "STATUS",
                    "DISPATCHED",
                    "FINISHED",
                    "ERROR"
                ],
                &rows
            )
        );
    }
}

/// Where a line of a task's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Stdout,
    Stderr,
}

/// Shows a task's output chunks, for `task logs` and `task submit -f`. With `--json`, every
/// chunk as stored. For a person: stdout and stderr as the agent wrote them and progress as
/// `» summary`, minus what is there for programs: progress entries marked `quiet`, and the
/// raw stream-json lines a progress entry was read from (the seqs in its `detail.rawSeqs`,
/// stored right after it), which the entry's summary stands in for.
#[derive(Debug)]
struct LogPrinter {
    json: bool,
    /// Attempt and first and last seq of the raw lines the last progress entry summarised.
    covered: Option<(u32, u64, u64)>,
}

impl LogPrinter {
    fn new(json: bool) -> Self {
        LogPrinter {
            json,
            covered: None,
        }
    }

    fn print(&mut self, chunk: &OutputChunk) -> anyhow::Result<()> {
        match self.render(chunk)? {
            Some((Sink::Stdout, text)) => std::io::stdout().lock().write_all(text.as_bytes())?,
            Some((Sink::Stderr, text)) => std::io::stderr().lock().write_all(text.as_bytes())?,
            None => {}
        }
        Ok(())
    }

    /// What to print for `chunk`, and where; `None` when a person need not see it.
    fn render(&mut self, chunk: &OutputChunk) -> anyhow::Result<Option<(Sink, String)>> {
        if self.json {
            return Ok(Some((
                Sink::Stdout,
                format!("{}\n", serde_json::to_string(chunk)?),
            )));
        }
        let end = if chunk.is_partial { "" } else { "\n" };
        Ok(match chunk.stream {
            OutputStream::Stdout if self.covers(chunk) => None,
            OutputStream::Stdout => Some((Sink::Stdout, format!("{}{end}", chunk.output))),
            OutputStream::Stderr => Some((Sink::Stderr, format!("{}{end}", chunk.output))),
            OutputStream::Progress => {
                let entry = serde_json::from_str::<serde_json::Value>(&chunk.output).ok();
                let detail = entry.as_ref().and_then(|e| e.get("detail"));
                self.covered = detail
                    .and_then(|d| d.get("rawSeqs"))
                    .and_then(|seqs| Some((seqs.get(0)?.as_u64()?, seqs.get(1)?.as_u64()?)))
                    .map(|(first, last)| (chunk.attempt, first, last));
                let quiet = detail
                    .and_then(|d| d.get("quiet"))
                    .and_then(serde_json::Value::as_bool)
                    == Some(true);
                let summary = entry
                    .as_ref()
                    .and_then(|e| e.get("summary"))
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or(&chunk.output);
                (!quiet).then(|| (Sink::Stdout, format!("» {summary}\n")))
            }
            OutputStream::Delivered => Some((
                Sink::Stdout,
                format!("« message {} handed to the agent\n", chunk.output),
            )),
            OutputStream::Message => {
                let m = serde_json::from_str::<serde_json::Value>(&chunk.output).ok();
                let field = |k: &str| {
                    m.as_ref()
                        .and_then(|m| m.get(k))
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned)
                };
                let to = field("to").unwrap_or_else(|| "user".into());
                let body = field("body").unwrap_or_else(|| chunk.output.clone());
                Some((Sink::Stdout, format!("» to {to}: {body}\n")))
            }
        })
    }

    /// Whether `chunk` is a raw line the last progress entry already summarised.
    fn covers(&self, chunk: &OutputChunk) -> bool {
        self.covered.is_some_and(|(attempt, first, last)| {
            chunk.attempt == attempt && (first..=last).contains(&chunk.seq)
        })
    }
}

/// Warns when no daemon, connected or not, has ever offered `agent`: most likely a typo, or an
/// agent CLI not installed where the daemons run. Best effort: a key without access to the
/// daemon list just skips the check.
async fn warn_if_never_offered(c: &Client, agent: &str) {
    let Ok(daemons) = c
        .get::<Vec<kennel_proto::api::Daemon>>("/api/v1/daemons")
        .await
    else {
        return;
    };
    if daemons.iter().any(|d| d.agents.iter().any(|a| a == agent)) {
        return;
    }
    let mut offered: Vec<&str> = daemons
        .iter()
        .flat_map(|d| d.agents.iter().map(String::as_str))
        .collect();
    offered.sort_unstable();
    offered.dedup();
    if daemons.is_empty() {
        eprintln!(
            "kennel: warning: no daemon has ever connected to this server; the task waits until one offering agent \"{agent}\" does"
        );
    } else {
        eprintln!(
            "kennel: warning: no daemon has ever offered agent \"{agent}\" (offered: {}); check the name, or install that agent where a daemon runs",
            if offered.is_empty() { "none".to_string() } else { offered.join(", ") }
        );
    }
}

/// Streams output until the task ends; the exit code says how it ended. `waiting` is the
/// waiting reason already printed, so it is not printed twice. With `json`, stdout carries
/// only JSON lines: each output chunk, then the finished task.
async fn follow_logs(
    c: &Client,
    id: &str,
    attempt: Option<u32>,
    mut waiting: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut path = format!("/api/v1/tasks/{id}/output/stream");
    if let Some(a) = attempt {
        path.push_str(&format!("?attempt={a}"));
    }
    let mut printer = LogPrinter::new(json);
    let mut last_id: Option<String> = None;
    let mut retries = 0;
    loop {
        let mut stream = match c.sse(&path, last_id.as_deref()).await {
            Ok(s) => s,
            Err(e) if retries < 5 && last_id.is_some() => {
                retries += 1;
                eprintln!("kennel: lost the stream ({e}); reconnecting");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    eprintln!("kennel: stream interrupted ({e}); reconnecting");
                    break;
                }
            };
            retries = 0;
            match ev.event.as_str() {
                "output" => {
                    let chunk: OutputChunk = serde_json::from_str(&ev.data)
                        .context("the server sent an output event that is not an output chunk")?;
                    printer.print(&chunk)?;
                    last_id = Some(ev.id);
                }
                "waiting" => {
                    let now = Some(ev.data.trim().to_string()).filter(|w| !w.is_empty());
                    if now != waiting {
                        match &now {
                            Some(w) => eprintln!("kennel: waiting: {w}"),
                            None if waiting.is_some() => {
                                eprintln!("kennel: a daemon that can run it is available now")
                            }
                            None => {}
                        }
                        waiting = now;
                    }
                }
                "attempt" => match ev.data.trim().parse::<u32>() {
                    Ok(1) => eprintln!("kennel: attempt 1 started"),
                    _ => eprintln!("kennel: retry started (attempt {})", ev.data.trim()),
                },
                "end" => {
                    let t: Task = serde_json::from_str(&ev.data)
                        .context("the server sent an end event that is not a task")?;
                    if json {
                        println!("{}", serde_json::to_string(&t)?);
                    }
                    eprintln!(
                        "kennel: task {} {}{}",
                        t.id,
                        t.status,
                        t.error
                            .as_ref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                    if let Some(b) = &t.branch {
                        eprintln!(
                            "kennel: branch {b} @ {}",
                            t.commit.as_deref().unwrap_or("-")
                        );
                    }
                    return Ok(if t.status == TaskStatus::Completed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(crate::exit::TASK_DID_NOT_COMPLETE)
                    });
                }
                "error" => bail!("the server ended the stream: {}", ev.data),
                _ => {}
            }
        }
        retries += 1;
        if retries > 5 {
            bail!("lost the output stream of task {id} repeatedly; try `kennel task logs -f {id}` again");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn chunk(seq: u64, stream: OutputStream, output: &str) -> OutputChunk {
        OutputChunk {
            task_id: "t-1".into(),
            attempt: 1,
            seq,
            stream,
            output: output.into(),
            is_partial: false,
            at: "2025-01-01T00:00:00Z".into(),
        }
    }

    /// What a person sees for `chunks`, in order.
    fn shown(printer: &mut LogPrinter, chunks: &[OutputChunk]) -> Vec<(Sink, String)> {
        chunks
            .iter()
            .filter_map(|c| printer.render(c).unwrap())
            .collect()
    }

    #[test]
    fn a_person_sees_summaries_instead_of_the_raw_events_they_were_read_from() {
        let chunks = [
            chunk(
                1,
                OutputStream::Progress,
                r#"{"summary":"session started","detail":{"event":"init","rawSeqs":[2,2]}}"#,
            ),
            chunk(
                2,
                OutputStream::Stdout,
                r#"{"type":"system","subtype":"init"}"#,
            ),
            chunk(
                3,
                OutputStream::Progress,
                r#"{"summary":"rate_limit_event","detail":{"event":"rate_limit_event","rawSeqs":[4,5],"quiet":true}}"#,
            ),
            chunk(4, OutputStream::Stdout, r#"{"type":"rate_limit_"#),
            chunk(5, OutputStream::Stdout, r#"event"}"#),
            chunk(6, OutputStream::Stdout, "plain text the agent printed"),
            chunk(7, OutputStream::Stderr, "kennel: the agent made no changes"),
            chunk(
                8,
                OutputStream::Progress,
                r#"{"summary":"from another daemon"}"#,
            ),
            chunk(9, OutputStream::Stdout, r#"{"type":"result"}"#),
        ];
        let mut printer = LogPrinter::new(false);
        assert_eq!(
            shown(&mut printer, &chunks),
            [
                (Sink::Stdout, "» session started\n".to_owned()),
                (Sink::Stdout, "plain text the agent printed\n".to_owned()),
                (
                    Sink::Stderr,
                    "kennel: the agent made no changes\n".to_owned()
                ),
                (Sink::Stdout, "» from another daemon\n".to_owned()),
                // Not named by any progress entry: shown as written.
                (Sink::Stdout, "{\"type\":\"result\"}\n".to_owned()),
            ]
        );

        // --json shows every chunk as stored.
        let mut printer = LogPrinter::new(true);
        let all = shown(&mut printer, &chunks);
        assert_eq!(all.len(), chunks.len());
        assert!(all[1].1.contains(r#"\"type\":\"system\""#), "{all:?}");
    }
}

//! Agent profiles: which CLI runs a task and with which arguments, whether it is installed
//! (preflight), and what its output means: Claude Code's stream-json becomes one-line progress
//! summaries, and a failed run's own reason becomes the task's error.
//!
//! Reading output ([`OutputReader`]): every line of Claude Code's stdout that is a stream-json
//! event (a JSON object with a string `type`) becomes one progress entry, stored just before
//! the raw line it was read from. Kinds kennel knows are summarised (`session started`,
//! `tool: Write src/lib.rs`, `result: error: Invalid API key · Please run /login`); any other
//! kind gets a generic `<type>: <subtype>` summary marked quiet, which views for people skip.
//! The raw line is kept in the stored output, so `--json` and the API still have the whole
//! transcript; views for people show the summary instead (the entry names the raw line's
//! seqs). Lines that are not events, stderr, and the output of other kinds stay plain output.
//!
//! A profile's command is an argument vector with `{prompt}`, `{task_id}` and `{worktree}`
//! placeholders. Substitution happens inside each argument and never splits or joins
//! arguments, so user text can never become a shell command or an extra flag. This module
//! does not run agents for tasks; [`crate::process`] does.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kennel_proto::link::OutputStream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::process::{find_program, Line};

/// How long `<agent> --version` may take during preflight.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Claude's permission mode when the profile does not name one: edit files without asking,
/// since nobody is at a terminal to answer.
pub const DEFAULT_CLAUDE_PERMISSION_MODE: &str = "acceptEdits";

/// Longest assistant text quoted in a progress summary, in characters.
const SUMMARY_TEXT_CHARS: usize = 200;
/// Longest tool input quoted in a progress summary, in characters.
const SUMMARY_INPUT_CHARS: usize = 120;
/// Longest failure reason (a result's message, a stderr line) quoted in a task's error, in
/// characters.
const REASON_CHARS: usize = 300;
/// Longest Claude stdout line held back to be read as one event, in bytes (1 MiB). Longer
/// lines (a huge file written in one tool call) pass through as plain output.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Which agent CLI a profile drives; decides the default command and how output is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// Claude Code (`claude`), streaming JSON events.
    Claude,
    /// OpenAI Codex CLI (`codex exec`).
    Codex,
    /// aider.
    Aider,
    /// Any other CLI, with a user-given command.
    Command,
}

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Claude => "claude",
            AgentKind::Codex => "codex",
            AgentKind::Aider => "aider",
            AgentKind::Command => "command",
        }
    }

    /// How to install the kind's CLI, for preflight errors.
    fn install_hint(self) -> Option<&'static str> {
        match self {
            AgentKind::Claude => Some("npm i -g @anthropic-ai/claude-code"),
            AgentKind::Codex => Some("npm i -g @openai/codex"),
            AgentKind::Aider => Some("python -m pip install aider-chat"),
            AgentKind::Command => None,
        }
    }
}

/// One `[agents.<name>]` entry of the daemon config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentProfile {
    /// Which CLI this is.
    pub kind: AgentKind,
    /// Argument vector template with `{prompt}`, `{task_id}`, `{worktree}` placeholders.
    /// Empty means the kind's default (see [`AgentProfile::command_template`]); required for
    /// the `command` kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Variables added to the agent's environment (e.g. `ANTHROPIC_BASE_URL` for a gateway).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit for one run (e.g. `"30m"`), unless the task sets its own.
    #[serde(default)]
    pub timeout: Option<kennel_proto::Span>,
    /// Claude's `--permission-mode`; [`DEFAULT_CLAUDE_PERMISSION_MODE`] when unset.
    #[serde(default)]
    pub permission_mode: Option<String>,
    /// Claude only: run with `--input-format stream-json` and send the prompt (and later
    /// messages) on stdin, so `sendMessage` reaches the running agent.
    #[serde(default)]
    pub stream_input: bool,
}

impl AgentProfile {
    /// The built-in profile for `kind`. Its command is empty, meaning the kind's default, so
    /// that changing `permission_mode` or `stream_input` afterwards still takes effect.
    pub fn default_for(kind: AgentKind) -> AgentProfile {
        AgentProfile {
            kind,
            command: Vec::new(),
            env: BTreeMap::new(),
            timeout: None,
            permission_mode: (kind == AgentKind::Claude)
                .then(|| DEFAULT_CLAUDE_PERMISSION_MODE.to_owned()),
            stream_input: false,
        }
    }

    /// The argument vector template this profile runs: its own `command`, or the kind's
    /// default. Empty only for a `command` profile without a command (see [`Self::validate`]).
    pub fn command_template(&self) -> Cow<'_, [String]> {
        if !self.command.is_empty() {
            return Cow::Borrowed(&self.command);
        }
        let words: Vec<&str> = match self.kind {
            AgentKind::Claude => {
                let mode = self
                    .permission_mode
                    .as_deref()
                    .unwrap_or(DEFAULT_CLAUDE_PERMISSION_MODE);
                let mut argv = vec!["claude", "-p"];
                if !self.stream_input {
                    argv.push("{prompt}");
                }
                argv.extend([
                    "--output-format",
                    "stream-json",
                    "--verbose",
                    "--permission-mode",
                    mode,
                ]);
                if self.stream_input {
                    argv.extend(["--input-format", "stream-json"]);
                }
                argv
            }
            AgentKind::Codex => vec!["codex", "exec", "--full-auto", "{prompt}"],
            AgentKind::Aider => vec![
                "aider",
                "--yes-always",
                "--no-auto-commits",
                "--message",
                "{prompt}",
            ],
            AgentKind::Command => Vec::new(),
        };
        Cow::Owned(words.into_iter().map(str::to_owned).collect())
    }

    /// Whether the prompt goes to the agent's stdin as a Claude stream-json message (see
    /// [`claude_user_message`]) instead of being an argument; such agents also accept later
    /// messages while they run.
    pub fn prompt_on_stdin(&self) -> bool {
        self.kind == AgentKind::Claude && self.stream_input
    }

    /// Checks what serde cannot: a `command` profile needs a command, and the program name
    /// must be a literal. Returns the reason, naming the profile.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let template = self.command_template();
        let Some(program) = template.first() else {
            return Err(format!(
                "agent profile `{name}`: kind `command` needs a command (set agents.{name}.command)"
            ));
        };
        if program.trim().is_empty() || program.contains('{') {
            return Err(format!(
                "agent profile `{name}`: the program name `{program}` must be a plain name or path, \
                 not empty or a placeholder (fix agents.{name}.command)"
            ));
        }
        if self.stream_input && self.kind != AgentKind::Claude {
            return Err(format!(
                "agent profile `{name}`: stream_input only works with kind `claude` \
                 (remove agents.{name}.stream_input)"
            ));
        }
        Ok(())
    }
}

/// One `[agents.<name>]` entry as the config file (or `KENNEL_*` variables) give it: an
/// [`AgentProfile`] whose `kind` may be left out when `name` is a built-in profile's, so that
/// `[agents.claude]` with only `env` (or one `KENNEL_DAEMON__AGENTS__CLAUDE__ENV__…` variable)
/// adjusts the built-in instead of failing on a missing kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentProfileEntry {
    /// See [`AgentProfile`]; default: the kind of the built-in profile of the same name.
    #[serde(default)]
    pub kind: Option<AgentKind>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout: Option<kennel_proto::Span>,
    #[serde(default)]
    pub permission_mode: Option<String>,
    #[serde(default)]
    pub stream_input: bool,
}

impl AgentProfileEntry {
    /// The profile this entry makes under `name`: its settings over the defaults of its kind
    /// (given, or the built-in's of the same name). The error names the profile and the key.
    pub fn resolve(self, name: &str) -> Result<AgentProfile, String> {
        // Destructured so that a field added to one struct and not the other does not compile.
        let AgentProfileEntry {
            kind,
            command,
            env,
            timeout,
            permission_mode,
            stream_input,
        } = self;
        let Some(kind) = kind.or_else(|| builtin_kind(name)) else {
            return Err(format!(
                "agent profile `{name}` has no kind and is not a built-in profile: \
                 set agents.{name}.kind to claude, codex, aider or command"
            ));
        };
        let base = AgentProfile::default_for(kind);
        Ok(AgentProfile {
            kind,
            command,
            env,
            timeout: timeout.or(base.timeout),
            permission_mode: permission_mode.or(base.permission_mode),
            stream_input,
        })
    }
}

/// The kinds that come with a built-in profile named after them.
const BUILTIN_KINDS: [AgentKind; 3] = [AgentKind::Claude, AgentKind::Codex, AgentKind::Aider];

/// The kind of the built-in profile called `name`, if there is one.
pub fn builtin_kind(name: &str) -> Option<AgentKind> {
    BUILTIN_KINDS.into_iter().find(|kind| kind.as_str() == name)
}

/// The built-in profiles, by name: `claude`, `codex` and `aider`.
pub fn default_profiles() -> BTreeMap<String, AgentProfile> {
    BUILTIN_KINDS
        .into_iter()
        .map(|kind| (kind.as_str().to_owned(), AgentProfile::default_for(kind)))
        .collect()
}

/// The argument vector for one run: the profile's template with `{prompt}`, `{task_id}` and
/// `{worktree}` replaced inside each argument. Each template argument stays exactly one
/// argument whatever the values contain, and replaced text is not scanned again, so a prompt
/// containing `{worktree}` stays literal.
pub fn render_argv(
    profile: &AgentProfile,
    prompt: &str,
    task_id: &str,
    worktree: &Path,
) -> Vec<String> {
    // Worktree paths are built by the daemon from validated ids, so they are UTF-8.
    let worktree = worktree.to_string_lossy();
    let values = [
        ("{prompt}", prompt),
        ("{task_id}", task_id),
        ("{worktree}", worktree.as_ref()),
    ];
    profile
        .command_template()
        .iter()
        .map(|arg| substitute(arg, &values))
        .collect()
}

fn substitute(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        match values.iter().find(|(key, _)| tail.starts_with(key)) {
            Some((key, value)) => {
                out.push_str(value);
                rest = &tail[key.len()..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// What preflight found out about an installed agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// Where the program was found.
    pub binary: PathBuf,
    /// First line of `--version`, or `unknown` for `command` profiles.
    pub version: String,
}

/// Checks that a profile can run on this machine: its program resolves (on `PATH`, or as a
/// path) and, except for `command` profiles, answers `--version` within 10 s. The error is a
/// reason a user can act on, naming the profile and the program.
pub async fn preflight(name: &str, profile: &AgentProfile) -> Result<Preflight, String> {
    let binary = locate(name, profile)?;
    if profile.kind == AgentKind::Command {
        // An arbitrary CLI may not know `--version`, or may start working when given it.
        return Ok(Preflight {
            binary,
            version: "unknown".to_owned(),
        });
    }
    let fix = fix_hint(name, profile);

    let run = tokio::process::Command::new(&binary)
        .arg("--version")
        .envs(&profile.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => {
            return Err(format!(
                "agent profile `{name}`: could not run `{} --version`: {err} ({fix})",
                binary.display()
            ))
        }
        Err(_) => {
            return Err(format!(
                "agent profile `{name}`: `{} --version` did not finish within {} s; \
                 check that the agent starts on this machine",
                binary.display(),
                VERSION_TIMEOUT.as_secs()
            ))
        }
    };
    let stdout = first_line(&output.stdout);
    let stderr = first_line(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "agent profile `{name}`: `{} --version` failed (exit code {}){}; \
             check that the agent runs on this machine",
            binary.display(),
            crate::process::exit_code(&output.status),
            stderr
                .or(stdout)
                .map(|line| format!(": {line}"))
                .unwrap_or_default()
        ));
    }
    Ok(Preflight {
        binary,
        version: stdout.or(stderr).unwrap_or_else(|| "unknown".to_owned()),
    })
}

fn fix_hint(name: &str, profile: &AgentProfile) -> String {
    match profile.kind.install_hint() {
        Some(hint) => format!("install it with {hint} or fix agents.{name}.command"),
        None => format!("install it or fix agents.{name}.command"),
    }
}

/// The quick half of [`preflight`], run for every task: the profile is valid and its program
/// resolves (on `PATH`, or as a path) to an executable. Cheap enough to repeat per task.
pub fn locate(name: &str, profile: &AgentProfile) -> Result<PathBuf, String> {
    profile.validate(name)?;
    let template = profile.command_template();
    let Some(program) = template.first() else {
        // validate() rejects an empty template; kept as an error rather than a panic.
        return Err(format!("agent profile `{name}`: the command is empty"));
    };
    // The agent runs with the profile's env on top of ours, so a PATH there is what counts.
    let path = profile
        .env
        .get("PATH")
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    let fix = fix_hint(name, profile);
    find_program(program, path.as_deref()).ok_or_else(|| {
        if program.contains('/') {
            format!(
                "agent profile `{name}`: `{program}` does not exist or is not executable ({fix})"
            )
        } else {
            format!("agent profile `{name}`: `{program}` is not on PATH ({fix})")
        }
    })
}

fn first_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}

/// A one-line account of an agent event, with structured detail for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What happened, for people (`tool: Write src/lib.rs`).
    pub summary: String,
    /// Small structured facts (tool names, cost, usage), never whole file contents.
    pub detail: Value,
    /// Nothing a person watching the task needs to read (an event kennel does not know, an
    /// assistant turn with no text); views for people skip it, `--json` keeps it.
    pub quiet: bool,
}

/// One event of Claude Code's `--output-format stream-json` output: a JSON object with a
/// string `type`, on one line.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaudeEvent(Value);

impl ClaudeEvent {
    /// Reads one line of Claude Code's stdout. `None` for anything that is not a stream-json
    /// event: plain text, or JSON that is not an object with a string `type`.
    pub fn parse(line: &str) -> Option<ClaudeEvent> {
        let event: Value = serde_json::from_str(line.trim()).ok()?;
        event.get("type")?.as_str()?;
        Some(ClaudeEvent(event))
    }

    fn kind(&self) -> &str {
        self.0
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    fn subtype(&self) -> Option<&str> {
        self.0.get("subtype").and_then(Value::as_str)
    }

    /// The event as a progress entry. Every event gets one, so none has to reach a person as
    /// raw JSON: the kinds kennel knows are summarised, any other gets a generic summary
    /// (`<type>` or `<type>: <subtype>`) marked quiet.
    pub fn progress(&self) -> Progress {
        let event = &self.0;
        let known = match (self.kind(), self.subtype()) {
            ("system", Some("init")) => Some(init_progress(event)),
            ("system", Some("api_retry")) => Some(retry_progress(event)),
            ("assistant", _) => assistant_progress(event),
            ("user", _) => tool_result_progress(event),
            ("result", _) => Some(result_progress(event)),
            _ => None,
        };
        known.unwrap_or_else(|| self.generic_progress())
    }

    fn generic_progress(&self) -> Progress {
        let kind = self.kind();
        let subtype = self.subtype();
        Progress {
            summary: match subtype {
                Some(subtype) => format!("{kind}: {subtype}"),
                None => kind.to_owned(),
            },
            detail: json!({ "event": kind, "subtype": subtype }),
            quiet: true,
        }
    }
}

/// The answer in a Claude Code stream-json `result` line: its `result` text, unless the turn
/// failed.
pub fn result_text(line: &str) -> Option<String> {
    let event: Value = serde_json::from_str(line).ok()?;
    if event.get("is_error").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    event
        .get("result")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn init_progress(event: &Value) -> Progress {
    let model = event.get("model").and_then(Value::as_str);
    Progress {
        summary: match model {
            Some(model) => format!("session started (model {model})"),
            None => "session started".to_owned(),
        },
        detail: json!({
            "event": "init",
            "model": model,
            "sessionId": event.get("session_id"),
        }),
        quiet: false,
    }
}

/// A failed API request Claude Code is about to retry: the only sign of life while it backs
/// off (a bad key is retried ten times over about three minutes).
fn retry_progress(event: &Value) -> Progress {
    let attempt = event.get("attempt").and_then(Value::as_u64);
    let max = event.get("max_retries").and_then(Value::as_u64);
    let error = event.get("error").and_then(Value::as_str);
    let status = event.get("error_status").and_then(Value::as_u64);
    let mut summary = match (attempt, max) {
        (Some(attempt), Some(max)) => format!("API request failed; retry {attempt} of {max}"),
        _ => "API request failed; retrying".to_owned(),
    };
    let why: Vec<String> = error
        .map(str::to_owned)
        .into_iter()
        .chain(status.map(|status| format!("HTTP {status}")))
        .collect();
    if !why.is_empty() {
        summary.push_str(&format!(" ({})", why.join(", ")));
    }
    Progress {
        summary,
        detail: json!({
            "event": "apiRetry",
            "attempt": attempt,
            "maxRetries": max,
            "error": error,
            "errorStatus": status,
            "retryDelayMs": event.get("retry_delay_ms"),
        }),
        quiet: false,
    }
}

fn content_blocks(event: &Value) -> &[Value] {
    event
        .pointer("/message/content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The text blocks of a message, on one line.
fn message_text(event: &Value, max: usize) -> String {
    let texts: Vec<&str> = content_blocks(event)
        .iter()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|block| block.get("text").and_then(Value::as_str))
        .collect();
    one_line(&texts.join(" "), max)
}

/// The error an assistant message carries (Claude Code sets `error`, e.g.
/// `authentication_failed`, on the message it makes up when the API refuses it), with the
/// message's text.
fn assistant_error(event: &Value) -> Option<(&str, String)> {
    let code = event.get("error").and_then(Value::as_str)?;
    Some((code, message_text(event, REASON_CHARS)))
}

fn assistant_progress(event: &Value) -> Option<Progress> {
    if let Some((code, text)) = assistant_error(event) {
        return Some(Progress {
            summary: if text.is_empty() {
                format!("assistant error: {code}")
            } else {
                format!("assistant error: {text} ({code})")
            },
            detail: json!({ "event": "assistant", "tools": [], "error": code }),
            quiet: false,
        });
    }
    let mut parts = Vec::new();
    let mut tools = Vec::new();
    for block in content_blocks(event) {
        match block.get("type").and_then(Value::as_str) {
            Some("tool_use") => {
                let name = block.get("name").and_then(Value::as_str).unwrap_or("?");
                let target = block.get("input").and_then(tool_target);
                parts.push(match &target {
                    Some(target) => format!("tool: {name} {target}"),
                    None => format!("tool: {name}"),
                });
                tools.push(json!({ "name": name, "target": target }));
            }
            Some("text") => {
                let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                let text = one_line(text, SUMMARY_TEXT_CHARS);
                if !text.is_empty() {
                    parts.push(format!("assistant: {text}"));
                }
            }
            _ => {}
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(Progress {
        summary: parts.join("; "),
        detail: json!({ "event": "assistant", "tools": tools }),
        quiet: false,
    })
}

/// The most telling field of a tool's input: the file it touches, the command it runs…
fn tool_target(input: &Value) -> Option<String> {
    const KEYS: [&str; 9] = [
        "file_path",
        "notebook_path",
        "path",
        "command",
        "pattern",
        "url",
        "query",
        "description",
        "prompt",
    ];
    KEYS.iter()
        .find_map(|key| input.get(*key).and_then(Value::as_str))
        .map(|value| one_line(value, SUMMARY_INPUT_CHARS))
        .filter(|value| !value.is_empty())
}

fn tool_result_progress(event: &Value) -> Option<Progress> {
    let results: Vec<&Value> = content_blocks(event)
        .iter()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("tool_result"))
        .collect();
    if results.is_empty() {
        return None;
    }
    let errors = results
        .iter()
        .filter(|block| block.get("is_error").and_then(Value::as_bool) == Some(true))
        .count();
    let summary = match (results.len(), errors) {
        (1, 0) => "tool result".to_owned(),
        (1, _) => "tool result (error)".to_owned(),
        (n, 0) => format!("{n} tool results"),
        (n, e) => format!("{n} tool results ({e} errors)"),
    };
    Some(Progress {
        summary,
        detail: json!({ "event": "toolResult", "count": results.len(), "errors": errors }),
        quiet: false,
    })
}

/// Whether a `result` event reports a failed run. Its `subtype` is not enough: Claude Code
/// reports a refused login as `subtype: "success"` with `is_error: true`.
fn result_failed(event: &Value) -> bool {
    event.get("is_error").and_then(Value::as_bool) == Some(true)
        || event
            .get("subtype")
            .and_then(Value::as_str)
            .is_some_and(|subtype| subtype.starts_with("error"))
}

/// Why a failed run failed, in the agent's words: its `result` text, else its `errors`, else
/// what the subtype means.
fn result_reason(event: &Value) -> String {
    let text = event
        .get("result")
        .and_then(Value::as_str)
        .map(|text| one_line(text, REASON_CHARS))
        .filter(|text| !text.is_empty());
    let errors = || {
        let errors: Vec<&str> = event
            .get("errors")
            .and_then(Value::as_array)?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        Some(one_line(&errors.join("; "), REASON_CHARS)).filter(|text| !text.is_empty())
    };
    text.or_else(errors)
        .unwrap_or_else(|| match event.get("subtype").and_then(Value::as_str) {
            Some("error_max_turns") => "it used up its turns (error_max_turns)".to_owned(),
            Some("error_max_budget_usd") => {
                "it used up its budget (error_max_budget_usd)".to_owned()
            }
            Some(subtype) if subtype != "success" => subtype.to_owned(),
            _ => "it reported an error without saying why".to_owned(),
        })
}

fn result_progress(event: &Value) -> Progress {
    let subtype = event
        .get("subtype")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let cost = event.get("total_cost_usd").and_then(Value::as_f64);
    let turns = event.get("num_turns").and_then(Value::as_u64);
    let failed = result_failed(event);
    let summary = if failed {
        format!("result: error: {}", result_reason(event))
    } else {
        let mut summary = format!("result: {subtype}");
        if let Some(cost) = cost {
            summary.push_str(&format!(" cost ${cost:.4}"));
        }
        if let Some(turns) = turns {
            summary.push_str(&format!(" turns {turns}"));
        }
        summary
    };
    Progress {
        summary,
        detail: json!({
            "event": "result",
            "subtype": subtype,
            "isError": failed,
            "totalCostUsd": cost,
            "numTurns": turns,
            "durationMs": event.get("duration_ms"),
            "usage": event.get("usage"),
            "result": event.get("result").and_then(Value::as_str).map(|r| one_line(r, SUMMARY_TEXT_CHARS)),
        }),
        quiet: false,
    }
}

/// What an agent said about its own run, gathered from its output while it runs: the reason
/// the task's error quotes when the agent fails.
#[derive(Debug, Default)]
struct AgentReport {
    /// Why the last `result` event said the run failed; `None` once a later one succeeds.
    failed_result: Option<String>,
    /// The last error an assistant message carried: its text, or its error code.
    assistant_error: Option<String>,
    /// The last non-empty line the agent wrote on stderr, cut to [`REASON_CHARS`].
    last_stderr: Option<String>,
}

impl AgentReport {
    fn observe(&mut self, event: &ClaudeEvent) {
        match event.kind() {
            "result" => {
                self.failed_result = result_failed(&event.0).then(|| result_reason(&event.0));
            }
            "assistant" => {
                if let Some((code, text)) = assistant_error(&event.0) {
                    self.assistant_error = Some(if text.is_empty() {
                        code.to_owned()
                    } else {
                        text
                    });
                }
            }
            _ => {}
        }
    }

    fn stderr(&mut self, text: &str) {
        let line = one_line(text, REASON_CHARS);
        if !line.is_empty() {
            self.last_stderr = Some(line);
        }
    }

    /// The task's error for a run that ended with `exit_code`, or `None` if it succeeded. A
    /// `result` that reports an error fails the run even with exit code 0: the agent itself
    /// says it did not do the work.
    fn failure(&self, exit_code: i32) -> Option<String> {
        let said = match (&self.failed_result, exit_code) {
            (Some(reason), _) => Some(reason),
            (None, 0) => return None,
            (None, _) => self.assistant_error.as_ref(),
        };
        Some(match (said, &self.last_stderr) {
            (Some(reason), _) => format!("the agent failed: {reason} (exit code {exit_code})"),
            (None, Some(line)) => format!("the agent exited with code {exit_code}: {line}"),
            (None, None) => format!("the agent exited with code {exit_code}"),
        })
    }
}

/// What [`OutputReader`] made of the agent's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Output to store and show as it is.
    Output(Line),
    /// A stream-json event: its progress entry, and the raw chunks it was read from (one,
    /// unless the line was longer than the daemon's line cap), to store after it.
    Event { progress: Progress, raw: Vec<Line> },
}

/// Reads one run's output as it arrives, for the agent's kind. For Claude Code, every stdout
/// line that is a stream-json event becomes a [`Reading::Event`] (a line cut into chunks is
/// held until it ends, up to [`MAX_EVENT_BYTES`]); every other line, and every line of other
/// kinds, is a [`Reading::Output`]. Meanwhile it remembers what the agent said about failing
/// (see [`OutputReader::failure`]).
#[derive(Debug)]
pub struct OutputReader {
    kind: AgentKind,
    /// Chunks of the current Claude stdout line, held until the line ends.
    held: Vec<Line>,
    /// Bytes of text in `held`.
    held_bytes: usize,
    /// The rest of the current stdout line passes through unread: it does not start like an
    /// event, or grew past [`MAX_EVENT_BYTES`].
    passing: bool,
    report: AgentReport,
}

impl OutputReader {
    pub fn new(kind: AgentKind) -> OutputReader {
        OutputReader {
            kind,
            held: Vec::new(),
            held_bytes: 0,
            passing: false,
            report: AgentReport::default(),
        }
    }

    /// Takes the next line (or chunk) the agent wrote.
    pub fn read(&mut self, line: Line) -> Vec<Reading> {
        if line.stream == OutputStream::Stderr {
            self.report.stderr(&line.text);
            return vec![Reading::Output(line)];
        }
        if self.kind != AgentKind::Claude {
            return vec![Reading::Output(line)];
        }
        if self.passing || (self.held.is_empty() && !line.text.trim_start().starts_with('{')) {
            self.passing = line.partial;
            return vec![Reading::Output(line)];
        }
        let partial = line.partial;
        self.held_bytes += line.text.len();
        self.held.push(line);
        if !partial {
            return self.release();
        }
        if self.held_bytes > MAX_EVENT_BYTES {
            self.passing = true;
            self.held_bytes = 0;
            return self.held.drain(..).map(Reading::Output).collect();
        }
        Vec::new()
    }

    /// The output has ended: what is still held (a last line without a newline).
    pub fn finish(&mut self) -> Vec<Reading> {
        self.passing = false;
        if self.held.is_empty() {
            return Vec::new();
        }
        self.release()
    }

    fn release(&mut self) -> Vec<Reading> {
        let raw = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let text: String = raw.iter().map(|chunk| chunk.text.as_str()).collect();
        match ClaudeEvent::parse(&text) {
            Some(event) => {
                self.report.observe(&event);
                vec![Reading::Event {
                    progress: event.progress(),
                    raw,
                }]
            }
            None => raw.into_iter().map(Reading::Output).collect(),
        }
    }

    /// The task's error for a run whose agent exited with `exit_code`, or `None` if the run
    /// succeeded. It quotes the agent's own reason: a Claude `result` that reports an error
    /// (`the agent failed: Invalid API key · Please run /login (exit code 1)`), else an
    /// assistant message's error, else the last line on stderr (`the agent exited with code
    /// 1: <line>`). A Claude `result` reporting an error fails the run even with exit code 0.
    pub fn failure(&self, exit_code: i32) -> Option<String> {
        self.report.failure(exit_code)
    }
}

/// `text` on one line (whitespace runs collapsed) and at most `max` characters, with `…` when
/// cut.
fn one_line(text: &str, max: usize) -> String {
    let mut words = text.split_whitespace();
    let mut out = String::new();
    let mut count = 0;
    let mut cut = false;
    if let Some(first) = words.next() {
        'outer: for word in std::iter::once(first).chain(words) {
            if count > 0 {
                if count == max {
                    cut = true;
                    break;
                }
                out.push(' ');
                count += 1;
            }
            for ch in word.chars() {
                if count == max {
                    cut = true;
                    break 'outer;
                }
                out.push(ch);
                count += 1;
            }
        }
    }
    if cut {
        out.push('…');
    }
    out
}

/// One stream-json input line carrying a user message, for agents run with
/// `--input-format stream-json` (see [`AgentProfile::prompt_on_stdin`]).
pub fn claude_user_message(text: &str) -> String {
    json!({
        "type": "user",
        "message": {
            "role": "user",
            "content": [{ "type": "text", "text": text }],
        },
    })
    .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn summary(line: &str) -> Option<String> {
        ClaudeEvent::parse(line).map(|event| event.progress().summary)
    }

    fn progress_of(line: &str) -> Progress {
        ClaudeEvent::parse(line)
            .map(|event| event.progress())
            .expect("a stream-json event")
    }

    #[test]
    fn hostile_prompt_stays_one_argument() {
        let prompt = "\"; rm -rf / $(x) 'q'";
        for profile in default_profiles().values() {
            let argv = render_argv(profile, prompt, "t-1", Path::new("/w/t-1"));
            assert_eq!(
                argv.iter().filter(|a| a.as_str() == prompt).count(),
                1,
                "{argv:?}"
            );
            assert_eq!(argv.len(), profile.command_template().len());
        }
    }

    #[test]
    fn claude_default_argv() {
        let profile = AgentProfile::default_for(AgentKind::Claude);
        assert_eq!(
            render_argv(&profile, "fix it", "t", Path::new("/w")),
            [
                "claude",
                "-p",
                "fix it",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-mode",
                "acceptEdits"
            ]
        );
        let streaming = AgentProfile {
            stream_input: true,
            permission_mode: Some("plan".into()),
            ..profile
        };
        assert!(streaming.prompt_on_stdin());
        let argv = render_argv(&streaming, "fix it", "t", Path::new("/w"));
        assert!(!argv.iter().any(|a| a == "fix it"));
        assert!(argv
            .windows(2)
            .any(|w| w == ["--input-format", "stream-json"]));
        assert!(argv.windows(2).any(|w| w == ["--permission-mode", "plan"]));
    }

    #[test]
    fn placeholders_are_replaced_inside_arguments_once() {
        let profile = AgentProfile {
            command: vec![
                "run".into(),
                "--out={worktree}/x".into(),
                "--id={task_id}{task_id}".into(),
                "{prompt}".into(),
                "{unknown} {".into(),
            ],
            ..AgentProfile::default_for(AgentKind::Command)
        };
        let argv = render_argv(&profile, "see {worktree}", "t1", Path::new("/w/t1"));
        assert_eq!(
            argv,
            [
                "run",
                "--out=/w/t1/x",
                "--id=t1t1",
                "see {worktree}",
                "{unknown} {"
            ]
        );
    }

    #[test]
    fn profiles_parse_from_config_and_reject_unknown_keys() {
        let profile: AgentProfile = serde_json::from_value(json!({
            "kind": "claude",
            "env": { "ANTHROPIC_BASE_URL": "http://127.0.0.1:4000" },
            "stream_input": true
        }))
        .unwrap();
        assert_eq!(profile.kind, AgentKind::Claude);
        assert!(profile.command.is_empty());
        assert!(profile.validate("claude").is_ok());

        let err = serde_json::from_value::<AgentProfile>(json!({ "kind": "aider", "comand": [] }))
            .unwrap_err();
        assert!(err.to_string().contains("comand"), "{err}");

        let bare: AgentProfile = serde_json::from_value(json!({ "kind": "command" })).unwrap();
        let reason = bare.validate("mine").unwrap_err();
        assert!(reason.contains("agents.mine.command"), "{reason}");
    }

    #[tokio::test]
    async fn preflight_names_a_missing_binary() {
        let profile = AgentProfile {
            command: vec!["kennel-no-such-claude".into(), "{prompt}".into()],
            ..AgentProfile::default_for(AgentKind::Claude)
        };
        let reason = preflight("claude", &profile).await.unwrap_err();
        assert!(reason.contains("agent profile `claude`"), "{reason}");
        assert!(
            reason.contains("`kennel-no-such-claude` is not on PATH"),
            "{reason}"
        );
        assert!(
            reason.contains("npm i -g @anthropic-ai/claude-code"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn preflight_accepts_a_command_profile() {
        let profile = AgentProfile {
            command: vec!["sh".into(), "-c".into(), "echo {prompt}".into()],
            ..AgentProfile::default_for(AgentKind::Command)
        };
        let found = preflight("script", &profile).await.unwrap();
        assert!(found.binary.ends_with("sh"), "{found:?}");
        assert_eq!(found.version, "unknown");
    }

    #[tokio::test]
    async fn preflight_reads_the_version_line() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("codex");
        std::fs::write(&fake, "#!/bin/sh\necho 'codex-cli 9.9.9'\necho extra\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let profile = AgentProfile {
            command: vec![fake.display().to_string(), "{prompt}".into()],
            ..AgentProfile::default_for(AgentKind::Codex)
        };
        let found = preflight("codex", &profile).await.unwrap();
        assert_eq!(found.binary, fake);
        assert_eq!(found.version, "codex-cli 9.9.9");
    }

    #[test]
    fn claude_stream_json_becomes_progress() {
        let init = r#"{"type":"system","subtype":"init","cwd":"/w/t1","session_id":"4f1c","tools":["Bash","Read","Write"],"mcp_servers":[],"model":"claude-sonnet-4-5-20250929","permissionMode":"acceptEdits","apiKeySource":"ANTHROPIC_API_KEY"}"#;
        assert_eq!(
            summary(init).unwrap(),
            "session started (model claude-sonnet-4-5-20250929)"
        );

        let text = r#"{"type":"assistant","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"I'll add the function to\nsrc/lib.rs."}],"stop_reason":null,"usage":{"input_tokens":4,"output_tokens":12}},"parent_tool_use_id":null,"session_id":"4f1c"}"#;
        assert_eq!(
            summary(text).unwrap(),
            "assistant: I'll add the function to src/lib.rs."
        );

        let tool = r#"{"type":"assistant","message":{"id":"msg_02","type":"message","role":"assistant","content":[{"type":"text","text":"Writing it now."},{"type":"tool_use","id":"toolu_01","name":"Write","input":{"file_path":"/w/t1/src/lib.rs","content":"pub fn add(a: i32, b: i32) -> i32 { a + b }\n"}}],"usage":{"input_tokens":9,"output_tokens":40}},"parent_tool_use_id":null,"session_id":"4f1c"}"#;
        let progress = progress_of(tool);
        assert_eq!(
            progress.summary,
            "assistant: Writing it now.; tool: Write /w/t1/src/lib.rs"
        );
        assert_eq!(progress.detail["tools"][0]["name"], "Write");
        assert!(!progress.detail.to_string().contains("pub fn add"));

        let result_line = r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_01","type":"tool_result","content":"File created successfully at: /w/t1/src/lib.rs"}]},"parent_tool_use_id":null,"session_id":"4f1c"}"#;
        assert_eq!(summary(result_line).unwrap(), "tool result");

        let done = r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":10234,"duration_api_ms":9876,"num_turns":3,"result":"Added add() to src/lib.rs.","session_id":"4f1c","total_cost_usd":0.0123456,"usage":{"input_tokens":13,"cache_creation_input_tokens":0,"cache_read_input_tokens":2048,"output_tokens":52}}"#;
        let progress = progress_of(done);
        assert_eq!(progress.summary, "result: success cost $0.0123 turns 3");
        assert_eq!(progress.detail["usage"]["output_tokens"], 52);
        assert_eq!(progress.detail["numTurns"], 3);

        assert!(!progress.quiet);

        assert!(ClaudeEvent::parse("not json at all").is_none());
        assert!(ClaudeEvent::parse(r#"[1,2]"#).is_none());
        assert!(ClaudeEvent::parse(r#"{"type":7}"#).is_none());
        assert!(ClaudeEvent::parse(r#"{"message":"no type"}"#).is_none());
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let long = format!(
            r#"{{"type":"assistant","message":{{"content":[{{"type":"text","text":"{}"}}]}}}}"#,
            "é".repeat(500)
        );
        let summary = summary(&long).unwrap();
        assert_eq!(
            summary,
            format!("assistant: {}…", "é".repeat(SUMMARY_TEXT_CHARS))
        );
    }

    #[test]
    fn user_message_is_one_json_line() {
        let line = claude_user_message("two\nlines \"quoted\"");
        assert!(!line.contains('\n'));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["type"], "user");
        assert_eq!(value["message"]["role"], "user");
        assert_eq!(
            value["message"]["content"][0]["text"],
            "two\nlines \"quoted\""
        );
    }
    /// What Claude Code 2.1.197 printed when it was not logged in (`claude -p hi
    /// --output-format stream-json --verbose` without a key; exit code 1), `init` shortened.
    const NOT_LOGGED_IN: [&str; 3] = [
        r#"{"type":"system","subtype":"init","cwd":"/tmp/cx","session_id":"df346129-de8b-4c26-ac1a-40131124cee4","tools":["Task","Bash","Edit","Read","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"acceptEdits","apiKeySource":"none","claude_code_version":"2.1.197","output_style":"default","uuid":"43a2341a-f3aa-44f0-b856-9e55ca557db2"}"#,
        r#"{"type":"assistant","message":{"id":"cd539500-53a5-45b5-a6e3-386f4d0e6533","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,"speed":null},"content":[{"type":"text","text":"Not logged in · Please run /login"}],"context_management":null},"parent_tool_use_id":null,"session_id":"df346129-de8b-4c26-ac1a-40131124cee4","uuid":"50c99303-332b-417c-8199-38ec78c3fd37","error":"authentication_failed"}"#,
        r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"duration_ms":176,"duration_api_ms":0,"num_turns":1,"result":"Not logged in · Please run /login","stop_reason":"stop_sequence","session_id":"df346129-de8b-4c26-ac1a-40131124cee4","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"89cc9bc0-20f8-4865-b362-eddf7138bfc9"}"#,
    ];

    /// A retry notice Claude Code printed while an upstream refused its key with 401.
    const API_RETRY: &str = r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":594.6126279581862,"error_status":401,"error":"authentication_failed","session_id":"857bac8a-e133-4e2d-977b-08f3ae9e6f48","uuid":"54fd4b44-9f02-4b49-9fca-4d2878bd6e42"}"#;

    fn stdout(text: &str, partial: bool) -> Line {
        Line {
            stream: OutputStream::Stdout,
            text: text.to_owned(),
            partial,
        }
    }

    fn stderr(text: &str) -> Line {
        Line {
            stream: OutputStream::Stderr,
            text: text.to_owned(),
            partial: false,
        }
    }

    /// Feeds whole stdout lines to a reader of `kind`, then ends the output.
    fn read_all(kind: AgentKind, lines: &[&str]) -> (OutputReader, Vec<Reading>) {
        let mut reader = OutputReader::new(kind);
        let mut readings: Vec<Reading> = lines
            .iter()
            .flat_map(|line| reader.read(stdout(line, false)))
            .collect();
        readings.extend(reader.finish());
        (reader, readings)
    }

    #[test]
    fn a_result_with_is_error_is_an_error_whatever_its_subtype() {
        let refused = progress_of(NOT_LOGGED_IN[2]);
        assert_eq!(
            refused.summary,
            "result: error: Not logged in · Please run /login"
        );
        assert_eq!(refused.detail["isError"], true);
        assert_eq!(refused.detail["subtype"], "success");
        assert!(!refused.quiet);

        let ok = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":2,"result":"Done.","total_cost_usd":0.5}"#;
        assert_eq!(
            progress_of(ok).summary,
            "result: success cost $0.5000 turns 2"
        );
        assert_eq!(progress_of(ok).detail["isError"], false);

        // Error subtypes, with and without a message of their own.
        let turns =
            r#"{"type":"result","subtype":"error_max_turns","is_error":true,"num_turns":3}"#;
        assert_eq!(
            progress_of(turns).summary,
            "result: error: it used up its turns (error_max_turns)"
        );
        let during = r#"{"type":"result","subtype":"error_during_execution","is_error":true,"errors":["Tool permission stream closed","aborted"]}"#;
        assert_eq!(
            progress_of(during).summary,
            "result: error: Tool permission stream closed; aborted"
        );
        let bare = r#"{"type":"result","subtype":"error_during_execution"}"#;
        assert_eq!(
            progress_of(bare).summary,
            "result: error: error_during_execution"
        );
        let unsaid = r#"{"type":"result","subtype":"success","is_error":true,"result":"  "}"#;
        assert_eq!(
            progress_of(unsaid).summary,
            "result: error: it reported an error without saying why"
        );
    }

    #[test]
    fn an_assistant_error_is_summarised_with_its_code() {
        let refused = progress_of(NOT_LOGGED_IN[1]);
        assert_eq!(
            refused.summary,
            "assistant error: Not logged in · Please run /login (authentication_failed)"
        );
        assert_eq!(refused.detail["error"], "authentication_failed");

        let silent = r#"{"type":"assistant","message":{"content":[]},"error":"rate_limit"}"#;
        assert_eq!(progress_of(silent).summary, "assistant error: rate_limit");
    }

    #[test]
    fn every_event_gets_a_summary_and_unknown_ones_are_quiet() {
        let retry = progress_of(API_RETRY);
        assert_eq!(
            retry.summary,
            "API request failed; retry 1 of 10 (authentication_failed, HTTP 401)"
        );
        assert!(!retry.quiet);
        assert_eq!(retry.detail["errorStatus"], 401);

        for (line, want) in [
            (
                r#"{"type":"rate_limit_event","rate_limit_info":{"status":"allowed"}}"#,
                "rate_limit_event",
            ),
            (
                r#"{"type":"system","subtype":"compact_boundary"}"#,
                "system: compact_boundary",
            ),
            (
                r#"{"type":"stream_event","event":{"type":"content_block_delta"}}"#,
                "stream_event",
            ),
            // Known kinds with nothing to say fall back to the generic summary too.
            (
                r#"{"type":"assistant","message":{"content":[{"type":"thinking","thinking":"hm"}]}}"#,
                "assistant",
            ),
            (
                r#"{"type":"user","message":{"content":[{"type":"text","text":"hi"}]}}"#,
                "user",
            ),
        ] {
            let p = progress_of(line);
            assert_eq!(p.summary, want, "{line}");
            assert!(p.quiet, "{line}");
        }
    }

    #[test]
    fn claude_events_become_progress_and_everything_else_stays_output() {
        let mut reader = OutputReader::new(AgentKind::Claude);
        let init = reader.read(stdout(NOT_LOGGED_IN[0], false));
        assert!(
            matches!(&init[..], [Reading::Event { progress, raw }]
                if progress.summary == "session started (model claude-opus-4-8[1m])"
                    && raw == &[stdout(NOT_LOGGED_IN[0], false)]),
            "{init:?}"
        );
        for line in [
            stdout("Warning: no stdin data received", false),
            stdout(r#"{"not":"an event"}"#, false),
            stdout("   ", false),
            // Claude Code prints events on stdout only.
            Line {
                stream: OutputStream::Stderr,
                ..stdout(API_RETRY, false)
            },
        ] {
            assert_eq!(reader.read(line.clone()), [Reading::Output(line)]);
        }
        assert!(reader.finish().is_empty());

        // Other kinds' output is never read as events.
        let (_, readings) = read_all(AgentKind::Codex, &[NOT_LOGGED_IN[2]]);
        assert_eq!(readings, [Reading::Output(stdout(NOT_LOGGED_IN[2], false))]);
    }

    #[test]
    fn an_event_cut_into_chunks_is_read_whole() {
        let line = NOT_LOGGED_IN[1];
        let cuts = [0, 300, 600, line.len()];
        let chunks: Vec<Line> = cuts
            .windows(2)
            .map(|w| stdout(&line[w[0]..w[1]], w[1] != line.len()))
            .collect();
        let mut reader = OutputReader::new(AgentKind::Claude);
        assert!(reader.read(chunks[0].clone()).is_empty());
        assert!(reader.read(chunks[1].clone()).is_empty());
        let readings = reader.read(chunks[2].clone());
        assert!(
            matches!(&readings[..], [Reading::Event { progress, raw }]
                if progress.summary.starts_with("assistant error: Not logged in") && raw == &chunks),
            "{readings:?}"
        );

        // A last line without a newline arrives partial; it is read when the output ends.
        let mut reader = OutputReader::new(AgentKind::Claude);
        assert!(reader.read(stdout(NOT_LOGGED_IN[2], true)).is_empty());
        let end = reader.finish();
        assert!(
            matches!(&end[..], [Reading::Event { progress, .. }] if progress.summary.starts_with("result: error")),
            "{end:?}"
        );
        assert!(reader.failure(1).is_some());

        // A long line that does not start like an event passes through chunk by chunk.
        let mut reader = OutputReader::new(AgentKind::Claude);
        for chunk in [
            stdout("plain ", true),
            stdout("{text", true),
            stdout("}", false),
        ] {
            assert_eq!(reader.read(chunk.clone()), [Reading::Output(chunk)]);
        }
    }

    #[test]
    fn a_line_past_the_event_cap_passes_through() {
        let mut reader = OutputReader::new(AgentKind::Claude);
        let chunk = format!("{{\"type\":\"assistant\",\"x\":\"{}", "a".repeat(16 * 1024));
        let mut held = 0;
        let mut released = Vec::new();
        while released.is_empty() {
            released = reader.read(stdout(&chunk, true));
            held += 1;
        }
        assert_eq!(held, MAX_EVENT_BYTES / chunk.len() + 1);
        assert_eq!(released.len(), held);
        assert!(released
            .iter()
            .all(|r| matches!(r, Reading::Output(l) if l.partial)));
        // The rest of that line, and its end, pass through too; the next line is read again.
        let tail = stdout("\"}", false);
        assert_eq!(reader.read(tail.clone()), [Reading::Output(tail)]);
        assert!(matches!(
            &reader.read(stdout(API_RETRY, false))[..],
            [Reading::Event { .. }]
        ));
    }

    #[test]
    fn the_task_error_quotes_the_agent_s_own_reason() {
        // Not logged in: the result's message, whatever the subtype says.
        let (reader, _) = read_all(AgentKind::Claude, &NOT_LOGGED_IN);
        assert_eq!(
            reader.failure(1).as_deref(),
            Some("the agent failed: Not logged in · Please run /login (exit code 1)")
        );
        // A result reporting an error fails the run even when the agent exits 0.
        assert_eq!(
            reader.failure(0).as_deref(),
            Some("the agent failed: Not logged in · Please run /login (exit code 0)")
        );

        // A later successful result (stream_input: one result per turn) clears it.
        let ok = r#"{"type":"result","subtype":"success","is_error":false,"result":"Done."}"#;
        let (reader, _) = read_all(AgentKind::Claude, &[NOT_LOGGED_IN[2], ok]);
        assert_eq!(reader.failure(0), None);

        // No result: the assistant's error, else the last stderr line, else the code alone.
        let (reader, _) = read_all(AgentKind::Claude, &NOT_LOGGED_IN[..2]);
        assert_eq!(
            reader.failure(1).as_deref(),
            Some("the agent failed: Not logged in · Please run /login (exit code 1)")
        );
        assert_eq!(
            reader.failure(0),
            None,
            "an exit code of 0 with no failed result"
        );
        let mut reader = OutputReader::new(AgentKind::Claude);
        reader.read(stderr("error: unknown option '--bogus'"));
        reader.read(stderr("  "));
        assert_eq!(
            reader.failure(1).as_deref(),
            Some("the agent exited with code 1: error: unknown option '--bogus'")
        );
        let (reader, _) = read_all(AgentKind::Claude, &[]);
        assert_eq!(
            reader.failure(137).as_deref(),
            Some("the agent exited with code 137")
        );
    }

    #[test]
    fn other_kinds_fail_with_their_last_stderr_line_cut_short() {
        let mut reader = OutputReader::new(AgentKind::Codex);
        reader.read(stderr("warning: slow network"));
        reader.read(stdout("working", false));
        reader.read(stderr(&format!("Error: {}", "x".repeat(500))));
        reader.read(stderr(""));
        let error = reader.failure(2).unwrap();
        assert_eq!(
            error,
            format!(
                "the agent exited with code 2: Error: {}…",
                "x".repeat(REASON_CHARS - 7)
            )
        );
        assert_eq!(reader.failure(0), None, "stderr alone does not fail a run");
    }
}

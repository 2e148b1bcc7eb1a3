//! Agent profiles: which CLI runs a task and with which arguments, whether it is installed
//! (preflight), and what its structured output means (Claude Code's stream-json becomes
//! one-line progress summaries).
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

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::process::find_program;

/// How long `<agent> --version` may take during preflight.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Claude's permission mode when the profile does not name one: edit files without asking,
/// since nobody is at a terminal to answer.
pub const DEFAULT_CLAUDE_PERMISSION_MODE: &str = "acceptEdits";

/// Longest assistant text quoted in a progress summary, in characters.
const SUMMARY_TEXT_CHARS: usize = 200;
/// Longest tool input quoted in a progress summary, in characters.
const SUMMARY_INPUT_CHARS: usize = 120;

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
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit for one run, in seconds, unless the task sets its own.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
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
            timeout_secs: None,
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

/// The built-in profiles, by name: `claude`, `codex` and `aider`.
pub fn default_profiles() -> BTreeMap<String, AgentProfile> {
    [AgentKind::Claude, AgentKind::Codex, AgentKind::Aider]
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
}

/// Reads one line of Claude Code's `--output-format stream-json` output. Returns `None` for
/// lines that are not JSON or events that say nothing worth a progress entry.
pub fn claude_progress(line: &str) -> Option<Progress> {
    let event: Value = serde_json::from_str(line.trim()).ok()?;
    match event.get("type")?.as_str()? {
        "system" if event.get("subtype").and_then(Value::as_str) == Some("init") => {
            let model = event.get("model").and_then(Value::as_str);
            Some(Progress {
                summary: match model {
                    Some(model) => format!("session started (model {model})"),
                    None => "session started".to_owned(),
                },
                detail: json!({
                    "event": "init",
                    "model": model,
                    "sessionId": event.get("session_id"),
                }),
            })
        }
        "assistant" => assistant_progress(&event),
        "user" => tool_result_progress(&event),
        "result" => Some(result_progress(&event)),
        _ => None,
    }
}

fn content_blocks(event: &Value) -> &[Value] {
    event
        .pointer("/message/content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn assistant_progress(event: &Value) -> Option<Progress> {
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
    })
}

fn result_progress(event: &Value) -> Progress {
    let subtype = event
        .get("subtype")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let cost = event.get("total_cost_usd").and_then(Value::as_f64);
    let turns = event.get("num_turns").and_then(Value::as_u64);
    let mut summary = format!("result: {subtype}");
    if let Some(cost) = cost {
        summary.push_str(&format!(" cost ${cost:.4}"));
    }
    if let Some(turns) = turns {
        summary.push_str(&format!(" turns {turns}"));
    }
    Progress {
        summary,
        detail: json!({
            "event": "result",
            "subtype": subtype,
            "isError": event.get("is_error"),
            "totalCostUsd": cost,
            "numTurns": turns,
            "durationMs": event.get("duration_ms"),
            "usage": event.get("usage"),
            "result": event.get("result").and_then(Value::as_str).map(|r| one_line(r, SUMMARY_TEXT_CHARS)),
        }),
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
        claude_progress(line).map(|p| p.summary)
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
        let progress = claude_progress(tool).unwrap();
        assert_eq!(
            progress.summary,
            "assistant: Writing it now.; tool: Write /w/t1/src/lib.rs"
        );
        assert_eq!(progress.detail["tools"][0]["name"], "Write");
        assert!(!progress.detail.to_string().contains("pub fn add"));

        let result_line = r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_01","type":"tool_result","content":"File created successfully at: /w/t1/src/lib.rs"}]},"parent_tool_use_id":null,"session_id":"4f1c"}"#;
        assert_eq!(summary(result_line).unwrap(), "tool result");

        let done = r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":10234,"duration_api_ms":9876,"num_turns":3,"result":"Added add() to src/lib.rs.","session_id":"4f1c","total_cost_usd":0.0123456,"usage":{"input_tokens":13,"cache_creation_input_tokens":0,"cache_read_input_tokens":2048,"output_tokens":52}}"#;
        let progress = claude_progress(done).unwrap();
        assert_eq!(progress.summary, "result: success cost $0.0123 turns 3");
        assert_eq!(progress.detail["usage"]["output_tokens"], 52);
        assert_eq!(progress.detail["numTurns"], 3);

        assert!(claude_progress("not json at all").is_none());
        assert!(claude_progress(r#"{"type":"stream_event","event":{}}"#).is_none());
        assert!(claude_progress(r#"[1,2]"#).is_none());
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
}

//! The daemon link, protocol v1: JSON text frames, one object each, tagged by `type`, with
//! camelCase fields. Message names follow Makima's daemon protocol.
//!
//! Delivery rules the types encode (see docs/protocol.md):
//! - every task-scoped message carries `attempt`, the fencing token; a stale attempt is refused;
//! - every task-scoped daemon message carries `seq`, counted per (task, attempt) from 1; the
//!   receiver applies each seq once, in order, and answers with a cumulative `ack`;
//! - frames larger than the negotiated limit, malformed JSON and missing required fields are
//!   answered with an `error`; unknown message types decode as [`Decoded::Unknown`] so that
//!   newer peers stay compatible.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

use crate::validate::{validate_id, InvalidId};

/// The protocol version this build speaks natively.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Default limit on one frame, in bytes (1 MiB). Configurable per server.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// A string that must never appear in logs (API keys). Serialises as the plain string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A task attempt a daemon holds, as reported in `authenticate` and `heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRef {
    pub task_id: String,
    pub attempt: u32,
}

/// Which stream a line of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// Structured progress summaries (`taskProgress`), stored beside the output.
    Progress,
    /// A session agent's answer (`agentMessage`), stored as JSON `{to, inReplyTo, body}`.
    Message,
    /// A message handed to a session agent (`messageDelivered`): the message's id.
    Delivered,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
            OutputStream::Progress => "progress",
            OutputStream::Message => "message",
            OutputStream::Delivered => "delivered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stdout" => Some(OutputStream::Stdout),
            "stderr" => Some(OutputStream::Stderr),
            "progress" => Some(OutputStream::Progress),
            "message" => Some(OutputStream::Message),
            "delivered" => Some(OutputStream::Delivered),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// daemon → upstream

/// First frame on every link. Must arrive within the server's authentication deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authenticate {
    pub api_key: Secret,
    /// Stable identity of the machine; a reconnect with the same id is the same daemon.
    pub machine_id: String,
    pub hostname: String,
    pub max_concurrent_tasks: u32,
    /// Highest protocol version the daemon speaks.
    pub protocol_version: u32,
    /// Lowest protocol version the daemon speaks (defaults to `protocolVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<u32>,
    /// The daemon's software version, for display.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Agent profiles that passed preflight on this machine.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Attempts still running on the daemon, so a reconnect within the grace re-attaches them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running_tasks: Vec<TaskRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    #[serde(default)]
    pub active_tasks: Vec<TaskRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAccepted {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
}

/// The daemon will not run this attempt. `code` says whether that is the task's fault or the
/// daemon's state: a refusal for capacity or shutdown is not charged to the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRejected {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub reason: String,
    /// Why, as a machine-readable code; absent means the task itself cannot run here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<RejectCode>,
}

/// Typed reasons for a `taskRejected`. Unknown codes from newer daemons decode as `other`,
/// which is treated like an untyped refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RejectCode {
    /// Every slot is busy. The upstream treats the daemon as full until it reports a free
    /// slot (a `taskComplete`, a heartbeat with fewer active tasks, or `capacity`), and the
    /// task goes back to the queue without using up an attempt.
    AtCapacity,
    /// The daemon is stopping and takes no new work; not charged to the task either.
    ShuttingDown,
    #[serde(other)]
    Other,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::AtCapacity => "atCapacity",
            RejectCode::ShuttingDown => "shuttingDown",
            RejectCode::Other => "other",
        }
    }

    /// Whether the refusal says something about the daemon rather than the task, so it must
    /// not count against the task's attempts.
    pub fn is_daemon_state(self) -> bool {
        matches!(self, RejectCode::AtCapacity | RejectCode::ShuttingDown)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskOutput {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub stream: OutputStream,
    pub output: String,
    /// The line was cut (too long, or the process exited mid-line); the next chunk continues it.
    #[serde(default)]
    pub is_partial: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskProgress {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub summary: String,
    /// Optional structured detail (tool name, cost, usage…), stored as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// A live attempt changed state on the daemon. `newStatus` is `paused` or `running` (pause and
/// resume), `lost` (the daemon restarted and the agent died with it: retried, charged) or
/// [`RETURNED`] (the daemon stopped cleanly before the agent finished and hands the attempt
/// back: retried, not charged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatusChange {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub old_status: String,
    pub new_status: String,
}

/// `taskStatusChange.newStatus` of an attempt handed back by a daemon that is shutting down.
pub const RETURNED: &str = "returned";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskComplete {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// A new capacity offer from a connected daemon: a relay sends it when its downstream daemons
/// come and go, so the coordinator schedules it like one daemon of that size; a daemon that
/// begins a clean stop sends `maxConcurrentTasks: 0` so nothing new is dispatched to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub max_concurrent_tasks: u32,
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A relay keeps an attempt in its own queue because none of its daemons can take it yet.
/// The server stops that attempt's accept deadline: the attempt stays with the relay until it
/// is accepted, rejected or lost. Not sequenced, not acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskQueued {
    pub task_id: String,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A session agent handed a message to its process: written to its stdin once per attempt,
/// whatever the redeliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageDelivered {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub message_id: String,
}

/// What a session agent said: one answer, to the sender of the message it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentMessage {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub body: String,
    /// Who it goes to (an address); absent: the sender of the last message delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The message it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
}

/// Everything a daemon (or a relay acting as one) sends upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum DaemonMessage {
    Authenticate(Authenticate),
    Heartbeat(Heartbeat),
    TaskAccepted(TaskAccepted),
    TaskRejected(TaskRejected),
    TaskOutput(TaskOutput),
    TaskProgress(TaskProgress),
    TaskStatusChange(TaskStatusChange),
    TaskComplete(TaskComplete),
    Capacity(Capacity),
    TaskQueued(TaskQueued),
    MessageDelivered(MessageDelivered),
    AgentMessage(AgentMessage),
}

/// The (task, attempt, seq) header of a task-scoped daemon message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqHeader<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    pub seq: u64,
}

impl DaemonMessage {
    pub fn type_name(&self) -> &'static str {
        match self {
            DaemonMessage::Authenticate(_) => "authenticate",
            DaemonMessage::Heartbeat(_) => "heartbeat",
            DaemonMessage::TaskAccepted(_) => "taskAccepted",
            DaemonMessage::TaskRejected(_) => "taskRejected",
            DaemonMessage::TaskOutput(_) => "taskOutput",
            DaemonMessage::TaskProgress(_) => "taskProgress",
            DaemonMessage::TaskStatusChange(_) => "taskStatusChange",
            DaemonMessage::TaskComplete(_) => "taskComplete",
            DaemonMessage::Capacity(_) => "capacity",
            DaemonMessage::TaskQueued(_) => "taskQueued",
            DaemonMessage::MessageDelivered(_) => "messageDelivered",
            DaemonMessage::AgentMessage(_) => "agentMessage",
        }
    }

    /// The sequencing header, for task-scoped messages.
    pub fn seq_header(&self) -> Option<SeqHeader<'_>> {
        let (task_id, attempt, seq) = match self {
            DaemonMessage::Authenticate(_)
            | DaemonMessage::Heartbeat(_)
            | DaemonMessage::Capacity(_)
            | DaemonMessage::TaskQueued(_) => return None,
            DaemonMessage::TaskAccepted(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::TaskRejected(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::TaskOutput(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::TaskProgress(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::TaskStatusChange(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::TaskComplete(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::MessageDelivered(m) => (&m.task_id, m.attempt, m.seq),
            DaemonMessage::AgentMessage(m) => (&m.task_id, m.attempt, m.seq),
        };
        Some(SeqHeader {
            task_id,
            attempt,
            seq,
        })
    }

    /// Checks what serde cannot: id formats, non-zero counters, sane sizes.
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            DaemonMessage::Authenticate(a) => {
                validate_id("machine id", &a.machine_id)?;
                if a.max_concurrent_tasks == 0 || a.max_concurrent_tasks > 10_000 {
                    return Err(FrameError::invalid(
                        "maxConcurrentTasks must be between 1 and 10000",
                    ));
                }
                if a.hostname.len() > 255 {
                    return Err(FrameError::invalid("hostname is longer than 255 bytes"));
                }
                if a.labels.len() > 64 || a.agents.len() > 64 {
                    return Err(FrameError::invalid("at most 64 labels and 64 agents"));
                }
                for t in &a.running_tasks {
                    validate_id("task id", &t.task_id)?;
                }
                Ok(())
            }
            DaemonMessage::Heartbeat(h) => {
                for t in &h.active_tasks {
                    validate_id("task id", &t.task_id)?;
                }
                Ok(())
            }
            DaemonMessage::Capacity(c) => {
                // 0 is allowed: a daemon that is stopping, or a relay with no daemon behind it.
                if c.max_concurrent_tasks > 10_000 {
                    return Err(FrameError::invalid(
                        "maxConcurrentTasks must be between 0 and 10000",
                    ));
                }
                if c.labels.len() > 64 || c.agents.len() > 64 {
                    return Err(FrameError::invalid("at most 64 labels and 64 agents"));
                }
                Ok(())
            }
            DaemonMessage::TaskQueued(q) => {
                validate_id("task id", &q.task_id)?;
                if q.attempt == 0 {
                    return Err(FrameError::invalid("attempt starts at 1"));
                }
                if q.reason.as_ref().is_some_and(|r| r.len() > 1024) {
                    return Err(FrameError::invalid("reason is longer than 1024 bytes"));
                }
                Ok(())
            }
            DaemonMessage::MessageDelivered(m) => {
                validate_id("message id", &m.message_id)?;
                task_scoped(self)
            }
            DaemonMessage::AgentMessage(m) => {
                if let Some(to) = &m.to {
                    crate::agents::Address::parse(to)
                        .map_err(|e| FrameError::invalid(&e.to_string()))?;
                }
                if let Some(id) = &m.in_reply_to {
                    validate_id("message id", id)?;
                }
                task_scoped(self)
            }
            other => task_scoped(other),
        }
    }
}

/// Checks the header of a task-scoped message.
fn task_scoped(m: &DaemonMessage) -> Result<(), FrameError> {
    // Every task-scoped variant has the header; the others have nothing to check here.
    let Some(h) = m.seq_header() else {
        return Ok(());
    };
    validate_id("task id", h.task_id)?;
    if h.attempt == 0 {
        return Err(FrameError::invalid("attempt starts at 1"));
    }
    if h.seq == 0 {
        return Err(FrameError::invalid("seq starts at 1"));
    }
    Ok(())
}

/// WebSocket close codes a server (coordinator or relay) ends a daemon link with
/// (docs/protocol.md, "Close codes").
pub mod close {
    /// A protocol violation before authentication.
    pub const PROTOCOL: u16 = 4000;
    /// The API key was refused.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No protocol version in common.
    pub const UNSUPPORTED_VERSION: u16 = 4002;
    /// No `authenticate` within the deadline.
    pub const AUTH_TIMEOUT: u16 = 4003;
    /// A newer connection authenticated with the same machine id.
    pub const REPLACED: u16 = 4004;
    /// Nothing arrived for three heartbeat intervals.
    pub const SILENT: u16 = 4005;
    /// Too many frames were waiting to be sent to the daemon: it is not reading them.
    pub const SLOW_READER: u16 = 4006;
    /// The side that sends it is shutting down (a coordinator, a relay, or a daemon that
    /// stops cleanly).
    pub const GOING_AWAY: u16 = 1001;
    /// The server could not record the daemon's messages; reconnect and replay.
    pub const STORE_UNAVAILABLE: u16 = 1011;
}

// ---------------------------------------------------------------------------------------------
// upstream → daemon

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authenticated {
    pub daemon_id: String,
    pub heartbeat_interval_secs: u64,
    /// The version both sides will speak: the highest one both support.
    pub protocol_version: u32,
    /// The largest frame the server accepts, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
}

fn default_max_frame() -> usize {
    DEFAULT_MAX_FRAME_BYTES
}

/// Where the agent's work happens: a git repository and the branch to start from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RepoSpec {
    /// A remote URL or a local path.
    pub url: String,
    /// The branch to start from. Empty (or absent on the wire) means the remote's default
    /// branch, the one its `HEAD` names, which the daemon looks up when it fetches.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_branch: String,
}

impl RepoSpec {
    /// Longest repository URL, in bytes.
    pub const MAX_URL: usize = 2048;

    /// Checks what a repository must be before it reaches `git`: a URL of 1 to 2048 bytes
    /// that is not blank and cannot be read as a flag, and a valid base branch. The error is
    /// the field (`repo.url`, `repo.baseBranch`) and what is wrong with it.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.url.trim().is_empty() || self.url.len() > Self::MAX_URL {
            let reason = format!("must be 1 to {} characters", Self::MAX_URL);
            return Err(("repo.url", reason));
        }
        if self.url.starts_with('-') {
            return Err(("repo.url", "must not start with `-`".into()));
        }
        crate::validate_base_branch(&self.base_branch)
            .map_err(|e| ("repo.baseBranch", e.reason.to_string()))
    }
}

/// Limits the daemon enforces on one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TaskLimits {
    /// Wall-clock limit for the agent, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnTask {
    pub task_id: String,
    pub attempt: u32,
    pub task_name: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    pub agent: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: TaskLimits,
    /// Present for a long-lived agent a spawn policy keeps running: the daemon keeps its stdin
    /// open for `deliverMessage` and sends its answers as `agentMessage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionSpec>,
}

/// What makes a spawned task a long-lived agent's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// The spawn policy it runs for.
    pub policy: String,
    /// The agent's id in the registry; its answers come from it.
    pub agent_id: String,
}

/// A message for a session agent, to write to its stdin. Sent again after a reconnect until
/// `messageDelivered` for it arrives; the daemon writes each message id once per attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliverMessage {
    pub task_id: String,
    pub attempt: u32,
    pub message_id: String,
    /// The sender, whom the answer goes to.
    pub from: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskCommand {
    pub task_id: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterruptTask {
    pub task_id: String,
    pub attempt: u32,
    /// Seconds between SIGINT and SIGTERM (and again before SIGKILL).
    pub grace_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMessage {
    pub task_id: String,
    pub attempt: u32,
    pub message: String,
}

/// Cumulative acknowledgement: every message of (task, attempt) up to and including `seq` is
/// applied; the sender may drop them from its outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
}

/// Machine-readable error codes sent in `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// The frame exceeded the size limit; it was dropped.
    FrameTooLarge,
    /// The frame was not JSON, or not an object with a string `type`.
    MalformedFrame,
    /// A known message type with missing or invalid fields.
    InvalidMessage,
    /// The first frame was not `authenticate`, or `authenticate` came twice.
    NotAuthenticated,
    /// The API key is missing, unknown, revoked or lacks the daemon scope.
    Unauthorized,
    /// No protocol version in common.
    UnsupportedVersion,
    /// The attempt is not the current one, or this daemon does not hold it. Drop it.
    StaleAttempt,
    /// A seq arrived ahead of the next expected one; resend from `expectedSeq`.
    SeqGap,
    /// Anything else; the message says what.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FrameTooLarge => "frameTooLarge",
            ErrorCode::MalformedFrame => "malformedFrame",
            ErrorCode::InvalidMessage => "invalidMessage",
            ErrorCode::NotAuthenticated => "notAuthenticated",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnsupportedVersion => "unsupportedVersion",
            ErrorCode::StaleAttempt => "staleAttempt",
            ErrorCode::SeqGap => "seqGap",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// For `seqGap`: the seq the receiver expects next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_seq: Option<u64>,
}

/// Everything the coordinator (or a relay acting as one) sends to a daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    Authenticated(Authenticated),
    SpawnTask(SpawnTask),
    PauseTask(TaskCommand),
    ResumeTask(TaskCommand),
    InterruptTask(InterruptTask),
    SendMessage(SendMessage),
    DeliverMessage(DeliverMessage),
    Ack(Ack),
    Error(ErrorFrame),
}

impl ServerMessage {
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMessage::Authenticated(_) => "authenticated",
            ServerMessage::SpawnTask(_) => "spawnTask",
            ServerMessage::PauseTask(_) => "pauseTask",
            ServerMessage::ResumeTask(_) => "resumeTask",
            ServerMessage::InterruptTask(_) => "interruptTask",
            ServerMessage::SendMessage(_) => "sendMessage",
            ServerMessage::DeliverMessage(_) => "deliverMessage",
            ServerMessage::Ack(_) => "ack",
            ServerMessage::Error(_) => "error",
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error(ErrorFrame {
            code,
            message: message.into(),
            task_id: None,
            attempt: None,
            expected_seq: None,
        })
    }

    /// Encodes the frame. Serialising these types cannot fail (no maps with non-string keys,
    /// no non-finite floats outside `serde_json::Value`), so an error here is a bug.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"encode failed: {e}"}}"#)
        })
    }
}

impl DaemonMessage {
    /// Encodes the frame; see [`ServerMessage::to_json`] for why this cannot fail.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// decoding

/// Why a frame could not be used. Each maps to the [`ErrorCode`] sent back.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("invalid `{type_name}` message: {detail}")]
    Invalid { type_name: String, detail: String },
}

impl FrameError {
    fn invalid(detail: &str) -> Self {
        FrameError::Invalid {
            type_name: String::new(),
            detail: detail.to_string(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) => ErrorCode::MalformedFrame,
            FrameError::Invalid { .. } => ErrorCode::InvalidMessage,
        }
    }
}

impl From<InvalidId> for FrameError {
    fn from(e: InvalidId) -> Self {
        FrameError::Invalid {
            type_name: String::new(),
            detail: e.to_string(),
        }
    }
}

/// A decoded frame: a known message, or one of a type this build does not know.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<M> {
    Known(M),
    /// Forward compatibility: relays forward these, servers log them.
    Unknown {
        type_name: String,
    },
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    type_name: String,
}

const DAEMON_TYPES: [&str; 12] = [
    "authenticate",
    "heartbeat",
    "taskAccepted",
    "taskRejected",
    "taskOutput",
    "taskProgress",
    "taskStatusChange",
    "taskComplete",
    "capacity",
    "taskQueued",
    "messageDelivered",
    "agentMessage",
];

const SERVER_TYPES: [&str; 9] = [
    "authenticated",
    "spawnTask",
    "pauseTask",
    "resumeTask",
    "interruptTask",
    "sendMessage",
    "deliverMessage",
    "ack",
    "error",
];

fn decode<M: serde::de::DeserializeOwned>(
    frame: &str,
    max_bytes: usize,
    known: &[&str],
) -> Result<Decoded<M>, FrameError> {
    if frame.len() > max_bytes {
        return Err(FrameError::TooLarge {
            size: frame.len(),
            limit: max_bytes,
        });
    }
    match serde_json::from_str::<M>(frame) {
        Ok(m) => Ok(Decoded::Known(m)),
        // The happy path parses once; only a failure pays for the second look that tells
        // "unknown type" from "bad fields" from "not JSON".
        Err(full) => match serde_json::from_str::<TypeOnly>(frame) {
            Ok(t) if known.contains(&t.type_name.as_str()) => Err(FrameError::Invalid {
                type_name: t.type_name,
                detail: full.to_string(),
            }),
            Ok(t) => Ok(Decoded::Unknown {
                type_name: t.type_name.chars().take(64).collect(),
            }),
            Err(_) if serde_json::from_str::<serde::de::IgnoredAny>(frame).is_ok() => Err(
                FrameError::Malformed("expected a JSON object with a string `type` field".into()),
            ),
            Err(e) => Err(FrameError::Malformed(e.to_string())),
        },
    }
}

/// Decodes and validates one frame sent by a daemon.
pub fn decode_daemon_frame(
    frame: &str,
    max_bytes: usize,
) -> Result<Decoded<DaemonMessage>, FrameError> {
    let decoded = decode::<DaemonMessage>(frame, max_bytes, &DAEMON_TYPES)?;
    if let Decoded::Known(m) = &decoded {
        m.validate().map_err(|e| match e {
            FrameError::Invalid { detail, .. } => FrameError::Invalid {
                type_name: m.type_name().to_string(),
                detail,
            },
            other => other,
        })?;
    }
    Ok(decoded)
}

/// Decodes one frame sent by a coordinator or relay.
pub fn decode_server_frame(
    frame: &str,
    max_bytes: usize,
) -> Result<Decoded<ServerMessage>, FrameError> {
    decode::<ServerMessage>(frame, max_bytes, &SERVER_TYPES)
}

/// Picks the protocol version for a daemon that speaks `[min, max]`, or `None` when there is
/// no overlap with this build.
pub fn negotiate_version(daemon_max: u32, daemon_min: Option<u32>) -> Option<u32> {
    let daemon_min = daemon_min.unwrap_or(daemon_max).min(daemon_max);
    let chosen = daemon_max.min(PROTOCOL_VERSION);
    (chosen >= MIN_PROTOCOL_VERSION && chosen >= daemon_min).then_some(chosen)
}

/// The path every daemon link lives at, on coordinators and relays alike.
pub const DAEMON_PATH: &str = "/ws/daemon";

/// Turns what users write for "the server a daemon or relay connects to" into the daemon link
/// URL: `http(s)` becomes `ws(s)`, and [`DAEMON_PATH`] is appended unless the URL already ends
/// with it, so a base path (`https://host/kennel`, behind a proxy) keeps working. The one rule
/// for the daemon and the relay; `Err` says what is wrong.
pub fn daemon_endpoint(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL; use ws://host:port or http://host:port"))?;
    let scheme = match scheme {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(format!(
                "unsupported scheme `{other}`; use ws, wss, http or https"
            ))
        }
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("`{url}` has no host"));
    }
    let rest = if rest.ends_with(DAEMON_PATH) {
        rest.to_string()
    } else {
        format!("{rest}{DAEMON_PATH}")
    };
    Ok(format!("{scheme}://{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_frames_are_refused_before_parsing() {
        let frame = format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "x".repeat(100));
        let err = decode_daemon_frame(&frame, 50).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert!(err.to_string().contains("exceeds the limit of 50 bytes"));
    }

    #[test]
    fn malformed_and_invalid_are_told_apart() {
        let e = decode_daemon_frame("{not json", 1024).unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedFrame);
        let e = decode_daemon_frame("[1,2]", 1024).unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedFrame);
        let e = decode_daemon_frame(r#"{"type":"taskOutput","taskId":"t1"}"#, 1024).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidMessage);
        assert!(e.to_string().contains("missing field"), "{e}");
        let e = decode_daemon_frame(
            r#"{"type":"taskAccepted","taskId":"../x","attempt":1,"seq":1}"#,
            1024,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("invalid `taskAccepted` message"),
            "{e}"
        );
        let e = decode_daemon_frame(
            r#"{"type":"taskAccepted","taskId":"t1","attempt":1,"seq":0}"#,
            1024,
        )
        .unwrap_err();
        assert!(e.to_string().contains("seq starts at 1"), "{e}");
    }

    #[test]
    fn unknown_types_are_forward_compatible() {
        let d = decode_daemon_frame(r#"{"type":"telemetry","cpu":0.5}"#, 1024).unwrap();
        assert_eq!(
            d,
            Decoded::Unknown {
                type_name: "telemetry".into()
            }
        );
        let d = decode_server_frame(r#"{"type":"rebalance"}"#, 1024).unwrap();
        assert!(matches!(d, Decoded::Unknown { .. }));
    }

    #[test]
    fn extra_fields_are_ignored() {
        let d = decode_daemon_frame(
            r#"{"type":"heartbeat","activeTasks":[],"loadAverage":1.5}"#,
            1024,
        )
        .unwrap();
        assert!(matches!(d, Decoded::Known(DaemonMessage::Heartbeat(_))));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(1, None), Some(1));
        assert_eq!(negotiate_version(7, Some(1)), Some(1));
        assert_eq!(negotiate_version(7, Some(3)), None);
        assert_eq!(negotiate_version(0, None), None);
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret("kn_abc_secret".into());
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }
}

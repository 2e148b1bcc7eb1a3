//! Long-lived agents on the API: the registry's records, messages between agents and their
//! addresses, commands to agents, and stored policies with their versions. Timestamps are RFC
//! 3339 strings in UTC; field names are camelCase.

use serde::{Deserialize, Serialize};

use crate::policy::SpawnPolicy;
use crate::validate::{validate_id, InvalidId};

/// An agent in the registry: spawned by a policy, or registered over the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// The machine it runs on.
    pub machine: String,
    /// The daemon running it, for a spawned agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_id: Option<String>,
    /// The policy that spawned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn_request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Channels it listens on (`channel:<name>` reaches it).
    #[serde(default)]
    pub channels: Vec<String>,
    /// The process instance that registered; with `epoch`, the session guard.
    pub instance_id: String,
    /// Bumped by every registration: calls carrying an older epoch come from a stale
    /// instance and are refused.
    pub epoch: i64,
    pub online: bool,
    pub registered_at: String,
    pub last_seen_at: String,
    /// Its latest message in or out (or its registration).
    pub last_active_at: String,
    /// Why it went offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_reason: Option<String>,
    /// The API key that registered it; only that key may act as it. Never sent.
    #[serde(skip)]
    pub key_id: Option<String>,
}

/// What an agent presents on every call after registering, to prove it is the current
/// instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionGuard {
    pub instance_id: String,
    pub epoch: i64,
}

/// Body of `POST /api/v1/agents`: an agent registering itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterAgent {
    pub id: String,
    pub name: String,
    pub machine: String,
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub channels: Vec<String>,
}

impl RegisterAgent {
    /// Checks every name that becomes an id or an address.
    pub fn validate(&self) -> Result<(), InvalidId> {
        validate_id("agent id", &self.id)?;
        validate_id("machine", &self.machine)?;
        validate_id("instance id", &self.instance_id)?;
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(InvalidId {
                what: "agent name",
                value: self.name.chars().take(80).collect(),
                reason: "must be 1 to 200 bytes",
            });
        }
        if let Some(l) = &self.label {
            validate_id("label", l)?;
        }
        for t in &self.tags {
            validate_id("tag", t)?;
        }
        for c in &self.capabilities {
            validate_id("capability", c)?;
        }
        for c in &self.channels {
            validate_id("channel", c)?;
        }
        Ok(())
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// One agent, by id.
    Agent(String),
    /// The agent of a policy; queued until it runs (which starts an on-demand policy).
    Policy(String),
    /// Every agent with this label.
    Label(String),
    /// Every agent with this tag.
    Tag(String),
    /// Every agent with this capability.
    Capability(String),
    /// Every agent listening on this channel.
    Channel(String),
}

impl Address {
    /// Reads `agent-id`, `policy:NAME`, `label:L`, `tag:T`, `cap:C` or `channel:C`.
    pub fn parse(s: &str) -> Result<Address, InvalidId> {
        let (kind, name) = match s.split_once(':') {
            Some((kind, name)) => (kind, name),
            None => ("", s),
        };
        let (what, make): (&'static str, fn(String) -> Address) = match kind {
            "" => ("agent id", Address::Agent),
            "policy" => ("policy name", Address::Policy),
            "label" => ("label", Address::Label),
            "tag" => ("tag", Address::Tag),
            "cap" => ("capability", Address::Capability),
            "channel" => ("channel", Address::Channel),
            _ => {
                return Err(InvalidId {
                    what: "address",
                    value: s.chars().take(80).collect(),
                    reason: "must be an agent id or one of policy:, label:, tag:, cap:, channel: \
                             followed by a name",
                })
            }
        };
        validate_id(what, name)?;
        Ok(make(name.to_string()))
    }

    /// Whether a message to this address goes to one agent only.
    pub fn is_single(&self) -> bool {
        matches!(self, Address::Agent(_) | Address::Policy(_))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Agent(id) => write!(f, "{id}"),
            Address::Policy(n) => write!(f, "policy:{n}"),
            Address::Label(n) => write!(f, "label:{n}"),
            Address::Tag(n) => write!(f, "tag:{n}"),
            Address::Capability(n) => write!(f, "cap:{n}"),
            Address::Channel(n) => write!(f, "channel:{n}"),
        }
    }
}

/// Where a message is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// Stored; no recipient has it yet (or, claimable, nobody has claimed it).
    Queued,
    /// Handed to a recipient (for a claimable message: claimed).
    Delivered,
    /// A recipient said it read it.
    Read,
    /// Its time to live ran out before it was read.
    Expired,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Delivered => "delivered",
            MessageState::Read => "read",
            MessageState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<MessageState> {
        [
            MessageState::Queued,
            MessageState::Delivered,
            MessageState::Read,
            MessageState::Expired,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// Body of `POST /api/v1/messages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessage {
    /// An address: an agent id, `policy:`, `label:`, `tag:`, `cap:` or `channel:` and a name.
    pub to: String,
    /// The sender: an agent id, or the user's name when a person sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// What kind of message (free text, `chat` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Sending again with the same key (from the same sender) returns the first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// One recipient takes it by claiming it; the first claim wins.
    #[serde(default)]
    pub claimable: bool,
    /// Seconds until it expires unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// The message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    /// Its place in the order messages were stored: inbox cursors count on it.
    pub seq: i64,
    pub from: String,
    pub to: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub claimable: bool,
    pub state: MessageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_expires_at: Option<String>,
    /// The first agent it was handed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at: Option<String>,
}

/// Where a command to an agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    Requested,
    Delivered,
    Running,
    Succeeded,
    Failed,
    Expired,
}

impl CommandState {
    pub const ALL: [CommandState; 6] = [
        CommandState::Requested,
        CommandState::Delivered,
        CommandState::Running,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Requested => "requested",
            CommandState::Delivered => "delivered",
            CommandState::Running => "running",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<CommandState> {
        CommandState::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Nothing moves a command on from here.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded | CommandState::Failed | CommandState::Expired
        )
    }

    /// Whether a command may go from `self` to `next`: forward along requested → delivered →
    /// running → succeeded | failed, and to failed or expired from any state not final.
    pub fn may_become(self, next: CommandState) -> bool {
        use CommandState::*;
        if self.is_final() {
            return false;
        }
        match next {
            Requested => false,
            Delivered => self == Requested,
            Running => matches!(self, Requested | Delivered),
            Succeeded => matches!(self, Delivered | Running),
            Failed | Expired => true,
        }
    }
}

/// A command to an agent (`agent.spawn`, `agent.shutdown`, `agent.restart`, `agent.prompt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Command {
    /// The correlation id: the answer to the command carries it.
    pub id: String,
    pub kind: String,
    /// The policy it is for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The agent instance it addresses (a spawn request id or an agent id).
    pub target: String,
    pub args: serde_json::Value,
    pub state: CommandState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// It expires unless finished by then.
    pub deadline_at: String,
}

/// A stored spawn policy: its document and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PolicyRecord {
    pub policy: SpawnPolicy,
    /// 1 for the first document stored under the name, one more for each change.
    pub version: i64,
    pub updated_at: String,
}

/// One version in a policy's history; `policy` is absent for the version that deleted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PolicyVersion {
    pub name: String,
    pub version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SpawnPolicy>,
    pub at: String,
}

/// A stored policy as the API shows it: the document, its version, and where the reconciler
/// has its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub policy: SpawnPolicy,
    pub version: i64,
    pub updated_at: String,
    /// `stopped`, `starting`, `running`, `stopping` or `backoff`; absent until reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The reconciler's state: agent, restarts, failures, backoff, last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub state: Option<serde_json::Value>,
}

/// A page of an inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct InboxPage {
    pub messages: Vec<Message>,
    /// Pass as `after` for the next page: the last message's `seq`, or `after` again when the
    /// page is empty.
    pub next_cursor: i64,
}

/// Who acts on a message: an agent, with its session guard when it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActAs {
    pub agent_id: String,
    /// With `epoch`: the agent's session guard; a stale one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
}

/// Body of `POST /api/v1/messages/{id}/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimMessage {
    pub agent_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// How long the claim holds before another agent may take the message (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_form_parses_and_prints_back() {
        for s in [
            "agent-1",
            "policy:reviewer",
            "label:triage",
            "tag:rust",
            "cap:review",
            "channel:builds",
        ] {
            let a = Address::parse(s).expect(s);
            assert_eq!(a.to_string(), s);
        }
        assert!(Address::parse("agent-1").expect("id").is_single());
        assert!(!Address::parse("tag:x").expect("tag").is_single());
        let err = Address::parse("team:x")
            .expect_err("unknown kind")
            .to_string();
        assert!(err.contains("policy:, label:"), "{err}");
        assert!(Address::parse("policy:../x").is_err());
        assert!(Address::parse("").is_err());
    }

    #[test]
    fn commands_move_forward_only_and_end_once() {
        use CommandState::*;
        assert!(Requested.may_become(Delivered));
        assert!(Delivered.may_become(Running));
        assert!(Running.may_become(Succeeded));
        assert!(Requested.may_become(Expired));
        assert!(Running.may_become(Failed));
        assert!(!Running.may_become(Delivered));
        assert!(!Requested.may_become(Succeeded));
        for end in [Succeeded, Failed, Expired] {
            for next in CommandState::ALL {
                assert!(!end.may_become(next), "{end:?} -> {next:?}");
            }
        }
        for s in CommandState::ALL {
            assert_eq!(CommandState::parse(s.as_str()), Some(s));
        }
    }
}

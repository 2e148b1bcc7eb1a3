//! The lifecycle manager's state: spawn policies with their history and reconciler state, the
//! agent registry, messages between agents, and commands to agents ([`AgentStore`]).
//!
//! Every operation is written once, here, as an async function over a [`Sql`] connection in a
//! transaction; [`impl_agent_store!`] implements the trait for a backend from its two ways of
//! running one (`write`: may record events; `read`). The rules that must hold under
//! concurrent callers are conditional statements: the first claim of a message wins, a stale
//! agent instance (older epoch) is refused, a command moves only forward. What the reconciler
//! decides is not stored here: its state is an opaque JSON text.

use std::collections::BTreeSet;

use async_trait::async_trait;
use kennel_proto::agents::{
    Address, Agent, Command, CommandState, Message, MessageState, PolicyRecord, PolicyVersion,
    RegisterAgent, SessionGuard,
};
use kennel_proto::api::Event;
use kennel_proto::policy::SpawnPolicy;

use crate::events::NewEvent;
use crate::rows::Columns;
use crate::sql::{params, Param, Sql};
use crate::{rfc3339, Millis, Result, StoreError};

/// A write's answer and the events it recorded, to publish once it returns (it is committed).
#[derive(Debug, Clone, PartialEq)]
pub struct Changed<T> {
    pub value: T,
    pub events: Vec<Event>,
}

/// What storing a policy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChange {
    Created,
    Updated,
    /// The stored document was the same: no new version.
    Unchanged,
}

/// How a spawned agent came to be: what the coordinator knows of it beyond what it says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spawned {
    pub daemon_id: String,
    pub policy: String,
    pub spawn_request_id: String,
}

/// The answer to a call that carries a session guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardCheck {
    /// The guard is the agent's current instance.
    Current,
    /// The agent registered again since: this instance is stale.
    Stale { epoch: i64 },
    /// No agent has this id.
    Unknown,
}

/// A message to store; the caller chose its id and checked its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub id: String,
    pub from: String,
    pub to: Address,
    pub kind: String,
    pub subject: Option<String>,
    pub body: String,
    pub payload: Option<serde_json::Value>,
    pub idempotency_key: Option<String>,
    pub claimable: bool,
    pub expires_at: Option<Millis>,
    pub reply_to: Option<String>,
}

/// What sending a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Stored and queued.
    New,
    /// The sender sent this message before with the same idempotency key: that one is
    /// returned and nothing is stored.
    Duplicate,
    /// The sender used the idempotency key for a different message (another recipient, body
    /// or kind): that one is returned and nothing is stored.
    KeyReused,
}

/// What redeeming a join token came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeem {
    /// Taken: the name it was made for.
    Taken { name: String },
    /// It was exchanged before.
    Used,
    /// Its time ran out.
    Expired,
    /// No such token (or the secret does not match).
    Unknown,
}

/// What a claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This agent holds the claim until `claim_expires_at`.
    Won(Box<Message>),
    /// Another agent holds it.
    Held {
        by: String,
        until: Millis,
    },
    /// The message is not claimable, or not addressed to this agent.
    NotClaimable,
    /// It was read or expired: nothing left to claim.
    Closed(MessageState),
    Missing,
}

/// A command to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCommand {
    pub id: String,
    pub kind: String,
    pub policy: Option<String>,
    pub target: String,
    pub args: serde_json::Value,
    pub deadline_at: Millis,
}

/// What moving a command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    Done(Box<Command>),
    /// The move is not allowed from the state it is in (a final one, or backwards).
    Refused(CommandState),
    Missing,
}

/// The lifecycle manager's persistent state. Both backends implement it with the same code.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    // Spawn policies.

    /// Stores `policy` as a new version (or leaves an equal one as it is).
    async fn put_policy(
        &self,
        policy: &SpawnPolicy,
        now: Millis,
    ) -> Result<Changed<(PolicyRecord, PolicyChange)>>;
    /// Deletes a policy, recording the deletion as its last version; false if there was none.
    async fn delete_policy(&self, name: &str, now: Millis) -> Result<Changed<bool>>;
    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>>;
    async fn list_policies(&self) -> Result<Vec<PolicyRecord>>;
    /// Every version of a policy, oldest first, the deletions included.
    async fn policy_history(&self, name: &str) -> Result<Vec<PolicyVersion>>;
    /// Stores the reconciler's state of a policy; with `changed`, records
    /// `policy.state.changed` with it.
    async fn save_policy_state(
        &self,
        name: &str,
        status: &str,
        state: &serde_json::Value,
        changed: bool,
        now: Millis,
    ) -> Result<Changed<()>>;
    /// Every stored reconciler state, by policy name.
    async fn policy_states(&self) -> Result<Vec<(String, serde_json::Value)>>;
    async fn forget_policy_state(&self, name: &str) -> Result<()>;

    // The agent registry.

    /// Registers (or registers again) an agent; its epoch goes up by one each time. `key_id`
    /// is the API key registering it (none for a spawned agent): an id registered by another
    /// key is not taken over (`None`).
    async fn register_agent(
        &self,
        agent: &RegisterAgent,
        spawned: Option<&Spawned>,
        key_id: Option<&str>,
        now: Millis,
    ) -> Result<Changed<Option<Agent>>>;
    /// Checks `guard` against the agent's current instance, and on success records it seen.
    async fn agent_heartbeat(
        &self,
        id: &str,
        guard: &SessionGuard,
        now: Millis,
    ) -> Result<GuardCheck>;
    /// Records that the agent sent or received a message at `now`.
    async fn agent_active(&self, id: &str, now: Millis) -> Result<()>;
    /// Marks an agent offline, for `reason`; `None` if it was not online.
    async fn agent_offline(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Changed<Option<Agent>>>;
    /// Marks offline every online agent that registered itself and was last seen before
    /// `before`. (A spawned agent lives as long as its process on the daemon.)
    async fn mark_stale_agents(&self, before: Millis, now: Millis) -> Result<Changed<Vec<Agent>>>;
    async fn get_agent(&self, id: &str) -> Result<Option<Agent>>;
    async fn list_agents(&self) -> Result<Vec<Agent>>;

    // Messages.

    /// Stores a message; with an idempotency key already used by its sender, returns the
    /// first message instead ([`Sent`] says whether it was the same) and records nothing.
    async fn send_message(
        &self,
        message: &NewMessage,
        now: Millis,
    ) -> Result<Changed<(Message, Sent)>>;
    async fn get_message(&self, id: &str) -> Result<Option<Message>>;
    /// The messages for agent `agent_id` after `after_seq`, oldest first: those to its id and
    /// to every address it answers to (only its id for a name not in the registry). A message
    /// still queued is listed whatever the cursor: with several coordinators, one stored
    /// before the cursor's message can become visible after it, and is not skipped. Those queued become delivered to it. Claimable messages
    /// are listed while unclaimed or claimed by it.
    async fn inbox(
        &self,
        agent_id: &str,
        after_seq: i64,
        limit: u32,
        now: Millis,
    ) -> Result<Changed<Vec<Message>>>;
    /// Messages for agent `agent_id` (to any address it answers to) still queued and not
    /// claimable, oldest first: what a session agent's daemon is to be handed.
    async fn pending_for(&self, agent_id: &str, limit: u32) -> Result<Vec<Message>>;
    /// Records that a queued message was handed to `agent_id` (its daemon confirmed it);
    /// false if it was not queued.
    async fn mark_delivered(&self, id: &str, agent_id: &str, now: Millis) -> Result<Changed<bool>>;
    /// Claims a claimable message for `ttl_ms`: the first claim wins; an expired claim can be
    /// taken over. With a `guard`, refused for a stale instance.
    async fn claim_message(
        &self,
        id: &str,
        agent_id: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Changed<Claim>>;
    /// Gives up `agent_id`'s claim; false if it held none.
    async fn release_claim(&self, id: &str, agent_id: &str, now: Millis) -> Result<Changed<bool>>;
    /// Releases every claim that ran out, so another agent can claim the message.
    async fn release_expired_claims(&self, now: Millis) -> Result<Changed<Vec<String>>>;
    /// Marks a message read by `agent_id` (it must be one of its recipients).
    async fn mark_read(
        &self,
        id: &str,
        agent_id: &str,
        now: Millis,
    ) -> Result<Changed<Option<Message>>>;
    /// Expires every unread message whose time to live ran out.
    async fn expire_messages(&self, now: Millis) -> Result<Changed<Vec<String>>>;
    async fn delete_message(&self, id: &str, now: Millis) -> Result<Changed<bool>>;
    /// How many messages are in each state, for metrics.
    async fn message_counts(&self) -> Result<Vec<(MessageState, u64)>>;
    /// Messages to `address` still queued: what an on-demand policy starts for.
    async fn queued_for(&self, address: &Address) -> Result<u32>;

    // Join tokens.

    /// Stores a join token's keyed hash (hex) under its id.
    async fn create_join_token(
        &self,
        id: &str,
        name: &str,
        hash_hex: &str,
        expires_at: Millis,
        now: Millis,
    ) -> Result<()>;
    /// The stored hash (hex) of a join token, for the caller to check the secret.
    async fn join_token_hash(&self, id: &str) -> Result<Option<String>>;
    /// Takes a join token once: refused when used or expired. `key_id` is the key it becomes.
    async fn redeem_join_token(&self, id: &str, key_id: &str, now: Millis) -> Result<Redeem>;

    // Commands.

    async fn create_command(&self, command: &NewCommand, now: Millis) -> Result<Changed<Command>>;
    /// Moves a command to `next` if [`CommandState::may_become`] allows it.
    async fn advance_command(
        &self,
        id: &str,
        next: CommandState,
        error: Option<&str>,
        now: Millis,
    ) -> Result<Changed<Advance>>;
    /// Expires every unfinished command past its deadline.
    async fn expire_commands(&self, now: Millis) -> Result<Changed<Vec<Command>>>;
    async fn get_command(&self, id: &str) -> Result<Option<Command>>;
    /// Commands, newest first; only the unfinished ones with `open`.
    async fn list_commands(&self, open: bool, limit: u32) -> Result<Vec<Command>>;
}

/// Implements [`AgentStore`] for `$store` from two macros of its own, each taking
/// `$self, $sql => $op`: `$write` runs the future `$op` (using `$sql: &mut impl Sql`) in a
/// transaction that may record events and returns its `Changed` answer once committed;
/// `$read` runs it in one that does not.
macro_rules! impl_agent_store {
    ($store:ty, $write:ident, $read:ident) => {
        #[async_trait::async_trait]
        impl $crate::agents::AgentStore for $store {
            async fn put_policy(
                &self,
                policy: &kennel_proto::policy::SpawnPolicy,
                now: $crate::Millis,
            ) -> $crate::Result<
                $crate::agents::Changed<(
                    kennel_proto::agents::PolicyRecord,
                    $crate::agents::PolicyChange,
                )>,
            > {
                let policy = policy.clone();
                $write!(self, s => $crate::agents::ops::put_policy(s, &policy, now))
            }
            async fn delete_policy(
                &self,
                name: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<bool>> {
                let name = name.to_string();
                $write!(self, s => $crate::agents::ops::delete_policy(s, &name, now))
            }
            async fn get_policy(
                &self,
                name: &str,
            ) -> $crate::Result<Option<kennel_proto::agents::PolicyRecord>> {
                let name = name.to_string();
                $read!(self, s => $crate::agents::ops::get_policy(s, &name))
            }
            async fn list_policies(
                &self,
            ) -> $crate::Result<Vec<kennel_proto::agents::PolicyRecord>> {
                $read!(self, s => $crate::agents::ops::list_policies(s))
            }
            async fn policy_history(
                &self,
                name: &str,
            ) -> $crate::Result<Vec<kennel_proto::agents::PolicyVersion>> {
                let name = name.to_string();
                $read!(self, s => $crate::agents::ops::policy_history(s, &name))
            }
            async fn save_policy_state(
                &self,
                name: &str,
                status: &str,
                state: &serde_json::Value,
                changed: bool,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<()>> {
                let (name, status, state) = (name.to_string(), status.to_string(), state.clone());
                $write!(self, s => $crate::agents::ops::save_policy_state(
                    s, &name, &status, &state, changed, now
                ))
            }
            async fn policy_states(&self) -> $crate::Result<Vec<(String, serde_json::Value)>> {
                $read!(self, s => $crate::agents::ops::policy_states(s))
            }
            async fn forget_policy_state(&self, name: &str) -> $crate::Result<()> {
                let name = name.to_string();
                $write!(self, s => $crate::agents::ops::forget_policy_state(s, &name))
                    .map(|c| c.value)
            }
            async fn register_agent(
                &self,
                agent: &kennel_proto::agents::RegisterAgent,
                spawned: Option<&$crate::agents::Spawned>,
                key_id: Option<&str>,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Option<kennel_proto::agents::Agent>>> {
                let (agent, spawned) = (agent.clone(), spawned.cloned());
                let key_id = key_id.map(str::to_string);
                $write!(self, s => $crate::agents::ops::register_agent(
                    s, &agent, spawned.as_ref(), key_id.as_deref(), now
                ))
            }
            async fn agent_heartbeat(
                &self,
                id: &str,
                guard: &kennel_proto::agents::SessionGuard,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::GuardCheck> {
                let (id, guard) = (id.to_string(), guard.clone());
                $write!(self, s => $crate::agents::ops::agent_heartbeat(s, &id, &guard, now))
                    .map(|c| c.value)
            }
            async fn agent_active(&self, id: &str, now: $crate::Millis) -> $crate::Result<()> {
                let id = id.to_string();
                $write!(self, s => $crate::agents::ops::agent_active(s, &id, now)).map(|c| c.value)
            }
            async fn agent_offline(
                &self,
                id: &str,
                reason: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Option<kennel_proto::agents::Agent>>> {
                let (id, reason) = (id.to_string(), reason.to_string());
                $write!(self, s => $crate::agents::ops::agent_offline(s, &id, &reason, now))
            }
            async fn mark_stale_agents(
                &self,
                before: $crate::Millis,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Vec<kennel_proto::agents::Agent>>> {
                $write!(self, s => $crate::agents::ops::mark_stale_agents(s, before, now))
            }
            async fn get_agent(
                &self,
                id: &str,
            ) -> $crate::Result<Option<kennel_proto::agents::Agent>> {
                let id = id.to_string();
                $read!(self, s => $crate::agents::ops::get_agent(s, &id))
            }
            async fn list_agents(&self) -> $crate::Result<Vec<kennel_proto::agents::Agent>> {
                $read!(self, s => $crate::agents::ops::list_agents(s))
            }
            async fn send_message(
                &self,
                message: &$crate::agents::NewMessage,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<(kennel_proto::agents::Message, $crate::agents::Sent)>> {
                let message = message.clone();
                $write!(self, s => $crate::agents::ops::send_message(s, &message, now))
            }
            async fn get_message(
                &self,
                id: &str,
            ) -> $crate::Result<Option<kennel_proto::agents::Message>> {
                let id = id.to_string();
                $read!(self, s => $crate::agents::ops::get_message(s, &id))
            }
            async fn inbox(
                &self,
                agent_id: &str,
                after_seq: i64,
                limit: u32,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Vec<kennel_proto::agents::Message>>> {
                let agent_id = agent_id.to_string();
                $write!(self, s => $crate::agents::ops::inbox(s, &agent_id, after_seq, limit, now))
            }
            async fn pending_for(
                &self,
                agent_id: &str,
                limit: u32,
            ) -> $crate::Result<Vec<kennel_proto::agents::Message>> {
                let agent_id = agent_id.to_string();
                $read!(self, s => $crate::agents::ops::pending_for(s, &agent_id, limit))
            }
            async fn mark_delivered(
                &self,
                id: &str,
                agent_id: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<bool>> {
                let (id, agent_id) = (id.to_string(), agent_id.to_string());
                $write!(self, s => $crate::agents::ops::mark_delivered(s, &id, &agent_id, now))
            }
            async fn claim_message(
                &self,
                id: &str,
                agent_id: &str,
                ttl_ms: i64,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<$crate::agents::Claim>> {
                let (id, agent_id) = (id.to_string(), agent_id.to_string());
                $write!(self, s => $crate::agents::ops::claim_message(s, &id, &agent_id, ttl_ms, now))
            }
            async fn release_claim(
                &self,
                id: &str,
                agent_id: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<bool>> {
                let (id, agent_id) = (id.to_string(), agent_id.to_string());
                $write!(self, s => $crate::agents::ops::release_claim(s, &id, &agent_id, now))
            }
            async fn release_expired_claims(
                &self,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Vec<String>>> {
                $write!(self, s => $crate::agents::ops::release_expired_claims(s, now))
            }
            async fn mark_read(
                &self,
                id: &str,
                agent_id: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Option<kennel_proto::agents::Message>>> {
                let (id, agent_id) = (id.to_string(), agent_id.to_string());
                $write!(self, s => $crate::agents::ops::mark_read(s, &id, &agent_id, now))
            }
            async fn expire_messages(
                &self,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Vec<String>>> {
                $write!(self, s => $crate::agents::ops::expire_messages(s, now))
            }
            async fn delete_message(
                &self,
                id: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<bool>> {
                let id = id.to_string();
                $write!(self, s => $crate::agents::ops::delete_message(s, &id, now))
            }
            async fn message_counts(
                &self,
            ) -> $crate::Result<Vec<(kennel_proto::agents::MessageState, u64)>> {
                $read!(self, s => $crate::agents::ops::message_counts(s))
            }
            async fn queued_for(
                &self,
                address: &kennel_proto::agents::Address,
            ) -> $crate::Result<u32> {
                let address = address.to_string();
                $read!(self, s => $crate::agents::ops::queued_for(s, &address))
            }
            async fn create_join_token(
                &self,
                id: &str,
                name: &str,
                hash_hex: &str,
                expires_at: $crate::Millis,
                now: $crate::Millis,
            ) -> $crate::Result<()> {
                let (id, name, hash) = (id.to_string(), name.to_string(), hash_hex.to_string());
                $write!(self, s => $crate::agents::ops::create_join_token(
                    s, &id, &name, &hash, expires_at, now
                ))
                .map(|c| c.value)
            }
            async fn join_token_hash(&self, id: &str) -> $crate::Result<Option<String>> {
                let id = id.to_string();
                $read!(self, s => $crate::agents::ops::join_token_hash(s, &id))
            }
            async fn redeem_join_token(
                &self,
                id: &str,
                key_id: &str,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Redeem> {
                let (id, key_id) = (id.to_string(), key_id.to_string());
                $write!(self, s => $crate::agents::ops::redeem_join_token(s, &id, &key_id, now))
                    .map(|c| c.value)
            }
            async fn create_command(
                &self,
                command: &$crate::agents::NewCommand,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<kennel_proto::agents::Command>> {
                let command = command.clone();
                $write!(self, s => $crate::agents::ops::create_command(s, &command, now))
            }
            async fn advance_command(
                &self,
                id: &str,
                next: kennel_proto::agents::CommandState,
                error: Option<&str>,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<$crate::agents::Advance>> {
                let (id, error) = (id.to_string(), error.map(str::to_string));
                $write!(self, s => $crate::agents::ops::advance_command(
                    s, &id, next, error.as_deref(), now
                ))
            }
            async fn expire_commands(
                &self,
                now: $crate::Millis,
            ) -> $crate::Result<$crate::agents::Changed<Vec<kennel_proto::agents::Command>>> {
                $write!(self, s => $crate::agents::ops::expire_commands(s, now))
            }
            async fn get_command(
                &self,
                id: &str,
            ) -> $crate::Result<Option<kennel_proto::agents::Command>> {
                let id = id.to_string();
                $read!(self, s => $crate::agents::ops::get_command(s, &id))
            }
            async fn list_commands(
                &self,
                open: bool,
                limit: u32,
            ) -> $crate::Result<Vec<kennel_proto::agents::Command>> {
                $read!(self, s => $crate::agents::ops::list_commands(s, open, limit))
            }
        }
    };
}
pub(crate) use impl_agent_store;

/// A transaction's events, gathered as the operation records them.
pub(crate) struct Recorder<'s, S> {
    pub sql: &'s mut S,
    pub events: Vec<Event>,
}

impl<S: Sql> Recorder<'_, S> {
    fn record(&mut self, kind: &str, data: serde_json::Value, now: Millis) -> Result<()> {
        let event = self.sql.event(NewEvent::new(kind, None, None, data), now)?;
        self.events.push(event);
        Ok(())
    }

    fn done<T>(self, value: T) -> Changed<T> {
        Changed {
            value,
            events: self.events,
        }
    }
}

/// The operations, once for both backends.
pub(crate) mod ops {
    use super::*;

    fn json_text(v: &impl serde::Serialize) -> String {
        serde_json::to_string(v).unwrap_or_else(|_| "null".into())
    }

    fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(format!("{what}: {e}"))
    }

    fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
        serde_json::from_str(text).map_err(|e| corrupt(what, e))
    }

    // Policies.

    const POLICY: &str = "SELECT name, version, doc, updated_at FROM policies";

    fn policy_record(row: &dyn Columns) -> Result<PolicyRecord> {
        Ok(PolicyRecord {
            policy: parse("stored policy", &row.text(2)?)?,
            version: row.int(1)?,
            updated_at: rfc3339(row.int(3)?),
        })
    }

    pub async fn put_policy<S: Sql>(
        sql: &mut S,
        policy: &SpawnPolicy,
        now: Millis,
    ) -> Result<Changed<(PolicyRecord, PolicyChange)>> {
        let doc = json_text(policy);
        let found = sql
            .fetch_one(&format!("{POLICY} WHERE name = ?1"), params![&policy.name])
            .await?;
        let (version, change) = match &found {
            Some(row) if row.text(2)? == doc => {
                let record = policy_record(row.as_ref())?;
                return Ok(Changed {
                    value: (record, PolicyChange::Unchanged),
                    events: Vec::new(),
                });
            }
            Some(row) => (row.int(1)? + 1, PolicyChange::Updated),
            None => {
                // A name deleted before goes on from its last version.
                let last = sql
                    .fetch_one(
                        "SELECT MAX(version) FROM policy_history WHERE name = ?1",
                        params![&policy.name],
                    )
                    .await?;
                let last = match last {
                    Some(row) => row.int_opt(0)?.unwrap_or(0),
                    None => 0,
                };
                (last + 1, PolicyChange::Created)
            }
        };
        sql.execute(
            "INSERT INTO policies (name, version, doc, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, doc = excluded.doc, \
             updated_at = excluded.updated_at",
            params![&policy.name, version, doc.clone(), now],
        )
        .await?;
        sql.execute(
            "INSERT INTO policy_history (name, version, doc, at) VALUES (?1, ?2, ?3, ?4)",
            params![&policy.name, version, doc, now],
        )
        .await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let kind = match change {
            PolicyChange::Created => "policy.created",
            _ => "policy.updated",
        };
        let data = serde_json::json!({ "policy": policy.name, "version": version });
        rec.record(kind, data, now)?;
        let record = PolicyRecord {
            policy: policy.clone(),
            version,
            updated_at: rfc3339(now),
        };
        Ok(rec.done((record, change)))
    }

    pub async fn delete_policy<S: Sql>(
        sql: &mut S,
        name: &str,
        now: Millis,
    ) -> Result<Changed<bool>> {
        let found = sql
            .fetch_one(
                "DELETE FROM policies WHERE name = ?1 RETURNING version",
                params![name],
            )
            .await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let Some(row) = found else {
            return Ok(rec.done(false));
        };
        let version = row.int(0)? + 1;
        rec.sql
            .execute(
                "INSERT INTO policy_history (name, version, doc, at) VALUES (?1, ?2, NULL, ?3)",
                params![name, version, now],
            )
            .await?;
        let data = serde_json::json!({ "policy": name, "version": version });
        rec.record("policy.deleted", data, now)?;
        Ok(rec.done(true))
    }

    pub async fn get_policy<S: Sql>(sql: &mut S, name: &str) -> Result<Option<PolicyRecord>> {
        let row = sql
            .fetch_one(&format!("{POLICY} WHERE name = ?1"), params![name])
            .await?;
        row.map(|r| policy_record(r.as_ref())).transpose()
    }

    pub async fn list_policies<S: Sql>(sql: &mut S) -> Result<Vec<PolicyRecord>> {
        let rows = sql.fetch(&format!("{POLICY} ORDER BY name"), &[]).await?;
        rows.iter().map(|r| policy_record(r.as_ref())).collect()
    }

    pub async fn policy_history<S: Sql>(sql: &mut S, name: &str) -> Result<Vec<PolicyVersion>> {
        let rows = sql
            .fetch(
                "SELECT name, version, doc, at FROM policy_history WHERE name = ?1 ORDER BY version",
                params![name],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(PolicyVersion {
                    name: r.text(0)?,
                    version: r.int(1)?,
                    policy: r
                        .text_opt(2)?
                        .map(|doc| parse("stored policy", &doc))
                        .transpose()?,
                    at: rfc3339(r.int(3)?),
                })
            })
            .collect()
    }

    pub async fn save_policy_state<S: Sql>(
        sql: &mut S,
        name: &str,
        status: &str,
        state: &serde_json::Value,
        changed: bool,
        now: Millis,
    ) -> Result<Changed<()>> {
        sql.execute(
            "INSERT INTO policy_states (name, status, state, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET status = excluded.status, state = excluded.state, \
             updated_at = excluded.updated_at",
            params![name, status, json_text(state), now],
        )
        .await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        if changed {
            let data = serde_json::json!({ "policy": name, "status": status, "state": state });
            rec.record("policy.state.changed", data, now)?;
        }
        Ok(rec.done(()))
    }

    pub async fn policy_states<S: Sql>(sql: &mut S) -> Result<Vec<(String, serde_json::Value)>> {
        let rows = sql
            .fetch("SELECT name, state FROM policy_states ORDER BY name", &[])
            .await?;
        rows.iter()
            .map(|r| Ok((r.text(0)?, parse("policy state", &r.text(1)?)?)))
            .collect()
    }

    pub async fn forget_policy_state<S: Sql>(sql: &mut S, name: &str) -> Result<Changed<()>> {
        sql.execute("DELETE FROM policy_states WHERE name = ?1", params![name])
            .await?;
        Ok(Changed {
            value: (),
            events: Vec::new(),
        })
    }

    // Agents.

    const AGENT: &str = "SELECT id, name, machine, daemon_id, policy, spawn_request_id, label, \
         tags, capabilities, channels, instance_id, epoch, online, registered_at, last_seen_at, \
         last_active_at, offline_reason, key_id FROM agents";

    fn agent(row: &dyn Columns) -> Result<Agent> {
        Ok(Agent {
            id: row.text(0)?,
            name: row.text(1)?,
            machine: row.text(2)?,
            daemon_id: row.text_opt(3)?,
            policy: row.text_opt(4)?,
            spawn_request_id: row.text_opt(5)?,
            label: row.text_opt(6)?,
            tags: parse("agent tags", &row.text(7)?)?,
            capabilities: parse("agent capabilities", &row.text(8)?)?,
            channels: parse("agent channels", &row.text(9)?)?,
            instance_id: row.text(10)?,
            epoch: row.int(11)?,
            online: row.flag(12)?,
            registered_at: rfc3339(row.int(13)?),
            last_seen_at: rfc3339(row.int(14)?),
            last_active_at: rfc3339(row.int(15)?),
            offline_reason: row.text_opt(16)?,
            key_id: row.text_opt(17)?,
        })
    }

    async fn load_agent<S: Sql>(sql: &mut S, id: &str) -> Result<Option<Agent>> {
        let row = sql
            .fetch_one(&format!("{AGENT} WHERE id = ?1"), params![id])
            .await?;
        row.map(|r| agent(r.as_ref())).transpose()
    }

    pub async fn register_agent<S: Sql>(
        sql: &mut S,
        a: &RegisterAgent,
        spawned: Option<&Spawned>,
        key_id: Option<&str>,
        now: Millis,
    ) -> Result<Changed<Option<Agent>>> {
        let n = sql.execute(
            "INSERT INTO agents (id, name, machine, daemon_id, policy, spawn_request_id, label, \
             tags, capabilities, channels, instance_id, epoch, online, registered_at, \
             last_seen_at, last_active_at, offline_reason, key_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1, TRUE, ?12, ?12, ?12, NULL, ?13) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, machine = excluded.machine, \
             daemon_id = excluded.daemon_id, policy = excluded.policy, \
             spawn_request_id = excluded.spawn_request_id, label = excluded.label, \
             tags = excluded.tags, capabilities = excluded.capabilities, \
             channels = excluded.channels, instance_id = excluded.instance_id, \
             epoch = agents.epoch + 1, online = TRUE, registered_at = excluded.registered_at, \
             last_seen_at = excluded.last_seen_at, last_active_at = excluded.last_active_at, \
             offline_reason = NULL \
             WHERE agents.key_id = excluded.key_id \
             OR (agents.key_id IS NULL AND excluded.key_id IS NULL)",
            params![
                &a.id,
                &a.name,
                &a.machine,
                spawned.map(|s| s.daemon_id.clone()),
                spawned.map(|s| s.policy.clone()),
                spawned.map(|s| s.spawn_request_id.clone()),
                a.label.clone(),
                json_text(&a.tags),
                json_text(&a.capabilities),
                json_text(&a.channels),
                &a.instance_id,
                now,
                key_id,
            ],
        )
        .await?;
        if n == 0 {
            return Ok(Changed {
                value: None,
                events: Vec::new(),
            });
        }
        let stored = load_agent(sql, &a.id)
            .await?
            .ok_or_else(|| corrupt("agent registry", "a registered agent vanished"))?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let data = serde_json::json!({
            "agentId": stored.id, "epoch": stored.epoch, "policy": stored.policy,
            "spawnRequestId": stored.spawn_request_id, "machine": stored.machine,
        });
        rec.record("agent.registered", data, now)?;
        Ok(rec.done(Some(stored)))
    }

    async fn guard<S: Sql>(sql: &mut S, id: &str, guard: &SessionGuard) -> Result<GuardCheck> {
        let row = sql
            .fetch_one(
                "SELECT instance_id, epoch FROM agents WHERE id = ?1",
                params![id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(GuardCheck::Unknown);
        };
        let (instance, epoch) = (row.text(0)?, row.int(1)?);
        Ok(if instance == guard.instance_id && epoch == guard.epoch {
            GuardCheck::Current
        } else {
            GuardCheck::Stale { epoch }
        })
    }

    pub async fn agent_heartbeat<S: Sql>(
        sql: &mut S,
        id: &str,
        g: &SessionGuard,
        now: Millis,
    ) -> Result<Changed<GuardCheck>> {
        let changed = sql
            .execute(
                "UPDATE agents SET last_seen_at = ?1, online = TRUE, offline_reason = NULL \
                 WHERE id = ?2 AND instance_id = ?3 AND epoch = ?4",
                params![now, id, &g.instance_id, g.epoch],
            )
            .await?;
        let value = if changed == 1 {
            GuardCheck::Current
        } else {
            guard(sql, id, g).await?
        };
        Ok(Changed {
            value,
            events: Vec::new(),
        })
    }

    pub async fn agent_active<S: Sql>(sql: &mut S, id: &str, now: Millis) -> Result<Changed<()>> {
        sql.execute(
            "UPDATE agents SET last_active_at = ?1 WHERE id = ?2 AND last_active_at < ?1",
            params![now, id],
        )
        .await?;
        Ok(Changed {
            value: (),
            events: Vec::new(),
        })
    }

    pub async fn agent_offline<S: Sql>(
        sql: &mut S,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Changed<Option<Agent>>> {
        let n = sql
            .execute(
                "UPDATE agents SET online = FALSE, offline_reason = ?1 WHERE id = ?2 AND online",
                params![reason, id],
            )
            .await?;
        if n == 0 {
            return Ok(Changed {
                value: None,
                events: Vec::new(),
            });
        }
        let stored = load_agent(sql, id).await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let data = serde_json::json!({ "agentId": id, "reason": reason });
        rec.record("agent.offline", data, now)?;
        Ok(rec.done(stored))
    }

    pub async fn mark_stale_agents<S: Sql>(
        sql: &mut S,
        before: Millis,
        now: Millis,
    ) -> Result<Changed<Vec<Agent>>> {
        let rows = sql
            .fetch(
                "SELECT id, last_seen_at FROM agents \
                 WHERE online AND daemon_id IS NULL AND last_seen_at < ?1 ORDER BY id",
                params![before],
            )
            .await?;
        let mut out = Vec::new();
        let mut events = Vec::new();
        for row in rows {
            let (id, seen) = (row.text(0)?, row.int(1)?);
            let reason = format!("no heartbeat since {}", rfc3339(seen));
            let changed = agent_offline(sql, &id, &reason, now).await?;
            events.extend(changed.events);
            out.extend(changed.value);
        }
        Ok(Changed { value: out, events })
    }

    pub async fn get_agent<S: Sql>(sql: &mut S, id: &str) -> Result<Option<Agent>> {
        load_agent(sql, id).await
    }

    pub async fn list_agents<S: Sql>(sql: &mut S) -> Result<Vec<Agent>> {
        let rows = sql.fetch(&format!("{AGENT} ORDER BY id"), &[]).await?;
        rows.iter().map(|r| agent(r.as_ref())).collect()
    }

    // Messages.

    const MESSAGE: &str = "SELECT id, seq, sender, recipient, kind, subject, body, payload, \
         idempotency_key, claimable, state, claimed_by, claim_expires_at, delivered_to, \
         reply_to, created_at, expires_at, delivered_at, read_at FROM messages";

    fn message(row: &dyn Columns) -> Result<Message> {
        let state = row.text(10)?;
        Ok(Message {
            id: row.text(0)?,
            seq: row.int(1)?,
            from: row.text(2)?,
            to: row.text(3)?,
            kind: row.text(4)?,
            subject: row.text_opt(5)?,
            body: row.text(6)?,
            payload: row
                .text_opt(7)?
                .map(|p| parse("message payload", &p))
                .transpose()?,
            idempotency_key: row.text_opt(8)?,
            claimable: row.flag(9)?,
            state: MessageState::parse(&state)
                .ok_or_else(|| corrupt("message state", format!("unknown state `{state}`")))?,
            claimed_by: row.text_opt(11)?,
            claim_expires_at: row.int_opt(12)?.map(rfc3339),
            delivered_to: row.text_opt(13)?,
            reply_to: row.text_opt(14)?,
            created_at: rfc3339(row.int(15)?),
            expires_at: row.int_opt(16)?.map(rfc3339),
            delivered_at: row.int_opt(17)?.map(rfc3339),
            read_at: row.int_opt(18)?.map(rfc3339),
        })
    }

    async fn load_message<S: Sql>(sql: &mut S, id: &str) -> Result<Option<Message>> {
        let row = sql
            .fetch_one(&format!("{MESSAGE} WHERE id = ?1"), params![id])
            .await?;
        row.map(|r| message(r.as_ref())).transpose()
    }

    pub async fn send_message<S: Sql>(
        sql: &mut S,
        m: &NewMessage,
        now: Millis,
    ) -> Result<Changed<(Message, Sent)>> {
        if let Some(key) = &m.idempotency_key {
            let first = sql
                .fetch_one(
                    &format!("{MESSAGE} WHERE sender = ?1 AND idempotency_key = ?2"),
                    params![&m.from, key],
                )
                .await?;
            if let Some(row) = first {
                let first = message(row.as_ref())?;
                let same = first.to == m.to.to_string()
                    && first.body == m.body
                    && first.kind == m.kind
                    && first.subject == m.subject
                    && first.claimable == m.claimable
                    && first.payload == m.payload
                    && first.reply_to == m.reply_to;
                let how = if same {
                    Sent::Duplicate
                } else {
                    Sent::KeyReused
                };
                return Ok(Changed {
                    value: (first, how),
                    events: Vec::new(),
                });
            }
        }
        sql.execute(
            "INSERT INTO messages (id, sender, recipient, kind, subject, body, payload, \
             idempotency_key, claimable, state, reply_to, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued', ?10, ?11, ?12)",
            params![
                &m.id,
                &m.from,
                m.to.to_string(),
                &m.kind,
                m.subject.clone(),
                &m.body,
                m.payload.as_ref().map(json_text),
                m.idempotency_key.clone(),
                m.claimable,
                m.reply_to.clone(),
                now,
                m.expires_at,
            ],
        )
        .await?;
        let stored = load_message(sql, &m.id)
            .await?
            .ok_or_else(|| corrupt("messages", "a stored message vanished"))?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let data = serde_json::json!({
            "messageId": m.id, "seq": stored.seq, "from": m.from, "to": m.to.to_string(),
            "claimable": m.claimable,
        });
        rec.record("message.available", data, now)?;
        Ok(rec.done((stored, Sent::New)))
    }

    pub async fn get_message<S: Sql>(sql: &mut S, id: &str) -> Result<Option<Message>> {
        load_message(sql, id).await
    }

    /// Every address an agent answers to.
    fn addresses(a: &Agent) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        out.insert(Address::Agent(a.id.clone()).to_string());
        if let Some(p) = &a.policy {
            out.insert(Address::Policy(p.clone()).to_string());
        }
        if let Some(l) = &a.label {
            out.insert(Address::Label(l.clone()).to_string());
        }
        out.extend(a.tags.iter().map(|t| Address::Tag(t.clone()).to_string()));
        out.extend(
            a.capabilities
                .iter()
                .map(|c| Address::Capability(c.clone()).to_string()),
        );
        out.extend(
            a.channels
                .iter()
                .map(|c| Address::Channel(c.clone()).to_string()),
        );
        out
    }

    /// `?first, ?first+1, …` for `n` parameters.
    fn placeholders(first: usize, n: usize) -> String {
        (first..first + n)
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub async fn inbox<S: Sql>(
        sql: &mut S,
        agent_id: &str,
        after_seq: i64,
        limit: u32,
        now: Millis,
    ) -> Result<Changed<Vec<Message>>> {
        // Someone not in the registry (a person sending from the CLI) gets what was sent to
        // their name.
        let to: Vec<String> = match load_agent(sql, agent_id).await? {
            Some(agent) => addresses(&agent).into_iter().collect(),
            None => vec![agent_id.to_string()],
        };
        let query = format!(
            "{MESSAGE} WHERE recipient IN ({}) AND state <> 'expired' \
             AND (seq > ?1 OR (state = 'queued' AND NOT claimable)) \
             AND (NOT claimable OR claimed_by IS NULL OR claimed_by = ?2 \
             OR claim_expires_at <= ?3) ORDER BY seq LIMIT ?4",
            placeholders(5, to.len())
        );
        let mut args: Vec<Param> = vec![
            after_seq.into(),
            agent_id.into(),
            now.into(),
            i64::from(limit).into(),
        ];
        args.extend(to.into_iter().map(Param::from));
        let rows = sql.fetch(&query, &args).await?;
        let mut found: Vec<Message> = rows
            .iter()
            .map(|r| message(r.as_ref()))
            .collect::<Result<_>>()?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        for m in found.iter_mut() {
            if m.claimable || m.state != MessageState::Queued {
                continue;
            }
            rec.sql
                .execute(
                    "UPDATE messages SET state = 'delivered', delivered_at = ?1, \
                     delivered_to = ?2 WHERE id = ?3 AND state = 'queued'",
                    params![now, agent_id, &m.id],
                )
                .await?;
            m.state = MessageState::Delivered;
            m.delivered_at = Some(rfc3339(now));
            m.delivered_to = Some(agent_id.to_string());
            let data = serde_json::json!({ "messageId": m.id, "agentId": agent_id });
            rec.record("message.delivered", data, now)?;
        }
        Ok(rec.done(found))
    }

    pub async fn pending_for<S: Sql>(
        sql: &mut S,
        agent_id: &str,
        limit: u32,
    ) -> Result<Vec<Message>> {
        let Some(agent) = load_agent(sql, agent_id).await? else {
            return Ok(Vec::new());
        };
        let to: Vec<String> = addresses(&agent).into_iter().collect();
        let query = format!(
            "{MESSAGE} WHERE recipient IN ({}) AND state = 'queued' AND NOT claimable \
             ORDER BY seq LIMIT ?1",
            placeholders(2, to.len())
        );
        let mut args: Vec<Param> = vec![i64::from(limit).into()];
        args.extend(to.into_iter().map(Param::from));
        let rows = sql.fetch(&query, &args).await?;
        rows.iter().map(|r| message(r.as_ref())).collect()
    }

    pub async fn mark_delivered<S: Sql>(
        sql: &mut S,
        id: &str,
        agent_id: &str,
        now: Millis,
    ) -> Result<Changed<bool>> {
        let n = sql
            .execute(
                "UPDATE messages SET state = 'delivered', delivered_at = ?1, delivered_to = ?2 \
                 WHERE id = ?3 AND state = 'queued'",
                params![now, agent_id, id],
            )
            .await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        if n > 0 {
            let data = serde_json::json!({ "messageId": id, "agentId": agent_id });
            rec.record("message.delivered", data, now)?;
        }
        Ok(rec.done(n > 0))
    }

    pub async fn claim_message<S: Sql>(
        sql: &mut S,
        id: &str,
        agent_id: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Changed<Claim>> {
        let none = |value| Changed {
            value,
            events: Vec::new(),
        };
        let Some(m) = load_message(sql, id).await? else {
            return Ok(none(Claim::Missing));
        };
        let Some(agent) = load_agent(sql, agent_id).await? else {
            return Ok(none(Claim::NotClaimable));
        };
        if !m.claimable || !addresses(&agent).contains(&m.to) {
            return Ok(none(Claim::NotClaimable));
        }
        if matches!(m.state, MessageState::Read | MessageState::Expired) {
            return Ok(none(Claim::Closed(m.state)));
        }
        let until = now.saturating_add(ttl_ms);
        // The condition decides between racing claims: one UPDATE finds the row free.
        let won = sql
            .execute(
                "UPDATE messages SET claimed_by = ?1, claim_expires_at = ?2, state = 'delivered', \
                 delivered_at = COALESCE(delivered_at, ?3), delivered_to = COALESCE(delivered_to, ?1) \
                 WHERE id = ?4 AND state IN ('queued', 'delivered') \
                 AND (claimed_by IS NULL OR claimed_by = ?1 OR claim_expires_at <= ?3)",
                params![agent_id, until, now, id],
            )
            .await?;
        let m = load_message(sql, id)
            .await?
            .ok_or_else(|| corrupt("messages", "a claimed message vanished"))?;
        if won == 0 {
            return Ok(none(match (&m.claimed_by, m.state) {
                (Some(by), MessageState::Delivered) => Claim::Held {
                    by: by.clone(),
                    until: m
                        .claim_expires_at
                        .as_deref()
                        .map(crate::millis_from_rfc3339)
                        .unwrap_or_default(),
                },
                (_, state) => Claim::Closed(state),
            }));
        }
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let data = serde_json::json!({
            "messageId": id, "agentId": agent_id, "until": rfc3339(until),
        });
        rec.record("message.claimed", data, now)?;
        Ok(rec.done(Claim::Won(Box::new(m))))
    }

    pub async fn release_claim<S: Sql>(
        sql: &mut S,
        id: &str,
        agent_id: &str,
        now: Millis,
    ) -> Result<Changed<bool>> {
        let n = sql
            .execute(
                "UPDATE messages SET claimed_by = NULL, claim_expires_at = NULL, state = 'queued' \
                 WHERE id = ?1 AND claimed_by = ?2 AND state = 'delivered'",
                params![id, agent_id],
            )
            .await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        if n > 0 {
            let data =
                serde_json::json!({ "messageId": id, "agentId": agent_id, "why": "released" });
            rec.record("message.claim.released", data, now)?;
        }
        Ok(rec.done(n > 0))
    }

    pub async fn release_expired_claims<S: Sql>(
        sql: &mut S,
        now: Millis,
    ) -> Result<Changed<Vec<String>>> {
        let rows = sql
            .fetch(
                "UPDATE messages SET claimed_by = NULL, claim_expires_at = NULL, state = 'queued' \
                 WHERE claimed_by IS NOT NULL AND claim_expires_at <= ?1 AND state = 'delivered' \
                 RETURNING id",
                params![now],
            )
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.text(0)).collect::<Result<_>>()?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        for id in &ids {
            let data = serde_json::json!({ "messageId": id, "why": "expired" });
            rec.record("message.claim.released", data, now)?;
        }
        Ok(rec.done(ids))
    }

    pub async fn mark_read<S: Sql>(
        sql: &mut S,
        id: &str,
        agent_id: &str,
        now: Millis,
    ) -> Result<Changed<Option<Message>>> {
        let none = || Changed {
            value: None,
            events: Vec::new(),
        };
        let (Some(m), Some(agent)) = (
            load_message(sql, id).await?,
            load_agent(sql, agent_id).await?,
        ) else {
            return Ok(none());
        };
        let mine = addresses(&agent).contains(&m.to)
            && (!m.claimable || m.claimed_by.as_deref() == Some(agent_id));
        if !mine || m.state == MessageState::Expired {
            return Ok(none());
        }
        if m.state == MessageState::Read {
            return Ok(Changed {
                value: Some(m),
                events: Vec::new(),
            });
        }
        sql.execute(
            "UPDATE messages SET state = 'read', read_at = ?1, \
             delivered_at = COALESCE(delivered_at, ?1), delivered_to = COALESCE(delivered_to, ?2) \
             WHERE id = ?3 AND state IN ('queued', 'delivered')",
            params![now, agent_id, id],
        )
        .await?;
        let m = load_message(sql, id).await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        let data = serde_json::json!({ "messageId": id, "agentId": agent_id });
        rec.record("message.read", data, now)?;
        Ok(rec.done(m))
    }

    pub async fn expire_messages<S: Sql>(sql: &mut S, now: Millis) -> Result<Changed<Vec<String>>> {
        let rows = sql
            .fetch(
                "UPDATE messages SET state = 'expired', claimed_by = NULL, claim_expires_at = NULL \
                 WHERE state IN ('queued', 'delivered') AND expires_at <= ?1 RETURNING id",
                params![now],
            )
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.text(0)).collect::<Result<_>>()?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        for id in &ids {
            rec.record(
                "message.expired",
                serde_json::json!({ "messageId": id }),
                now,
            )?;
        }
        Ok(rec.done(ids))
    }

    pub async fn delete_message<S: Sql>(
        sql: &mut S,
        id: &str,
        now: Millis,
    ) -> Result<Changed<bool>> {
        let n = sql
            .execute("DELETE FROM messages WHERE id = ?1", params![id])
            .await?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        if n > 0 {
            rec.record(
                "message.deleted",
                serde_json::json!({ "messageId": id }),
                now,
            )?;
        }
        Ok(rec.done(n > 0))
    }

    pub async fn message_counts<S: Sql>(sql: &mut S) -> Result<Vec<(MessageState, u64)>> {
        let rows = sql
            .fetch(
                "SELECT state, COUNT(*) FROM messages GROUP BY state ORDER BY state",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let state = r.text(0)?;
                let state = MessageState::parse(&state)
                    .ok_or_else(|| corrupt("message state", format!("unknown state `{state}`")))?;
                Ok((state, u64::try_from(r.int(1)?).unwrap_or(0)))
            })
            .collect()
    }

    pub async fn queued_for<S: Sql>(sql: &mut S, address: &str) -> Result<u32> {
        let row = sql
            .fetch_one(
                "SELECT COUNT(*) FROM messages WHERE recipient = ?1 AND state = 'queued'",
                params![address],
            )
            .await?;
        let n = match row {
            Some(r) => r.int(0)?,
            None => 0,
        };
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    // Join tokens.

    pub async fn create_join_token<S: Sql>(
        sql: &mut S,
        id: &str,
        name: &str,
        hash: &str,
        expires_at: Millis,
        now: Millis,
    ) -> Result<Changed<()>> {
        sql.execute(
            "INSERT INTO join_tokens (id, name, hash, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, name, hash, now, expires_at],
        )
        .await?;
        Ok(Changed {
            value: (),
            events: Vec::new(),
        })
    }

    pub async fn join_token_hash<S: Sql>(sql: &mut S, id: &str) -> Result<Option<String>> {
        let row = sql
            .fetch_one("SELECT hash FROM join_tokens WHERE id = ?1", params![id])
            .await?;
        row.map(|r| r.text(0)).transpose()
    }

    pub async fn redeem_join_token<S: Sql>(
        sql: &mut S,
        id: &str,
        key_id: &str,
        now: Millis,
    ) -> Result<Changed<Redeem>> {
        let done = |value| Changed {
            value,
            events: Vec::new(),
        };
        let Some(row) = sql
            .fetch_one(
                "SELECT name, expires_at, used_at FROM join_tokens WHERE id = ?1",
                params![id],
            )
            .await?
        else {
            return Ok(done(Redeem::Unknown));
        };
        let (name, expires_at, used_at) = (row.text(0)?, row.int(1)?, row.int_opt(2)?);
        if used_at.is_some() {
            return Ok(done(Redeem::Used));
        }
        if expires_at <= now {
            return Ok(done(Redeem::Expired));
        }
        // Conditional: of two exchanges at once, one takes it.
        let n = sql
            .execute(
                "UPDATE join_tokens SET used_at = ?1, key_id = ?2 \
                 WHERE id = ?3 AND used_at IS NULL AND expires_at > ?1",
                params![now, key_id, id],
            )
            .await?;
        Ok(done(if n == 1 {
            Redeem::Taken { name }
        } else {
            Redeem::Used
        }))
    }

    // Commands.

    const COMMAND: &str = "SELECT id, kind, policy, target, args, state, error, created_at, \
         updated_at, deadline_at FROM commands";

    fn command(row: &dyn Columns) -> Result<Command> {
        let state = row.text(5)?;
        Ok(Command {
            id: row.text(0)?,
            kind: row.text(1)?,
            policy: row.text_opt(2)?,
            target: row.text(3)?,
            args: parse("command arguments", &row.text(4)?)?,
            state: CommandState::parse(&state)
                .ok_or_else(|| corrupt("command state", format!("unknown state `{state}`")))?,
            error: row.text_opt(6)?,
            created_at: rfc3339(row.int(7)?),
            updated_at: rfc3339(row.int(8)?),
            deadline_at: rfc3339(row.int(9)?),
        })
    }

    async fn load_command<S: Sql>(sql: &mut S, id: &str) -> Result<Option<Command>> {
        let row = sql
            .fetch_one(&format!("{COMMAND} WHERE id = ?1"), params![id])
            .await?;
        row.map(|r| command(r.as_ref())).transpose()
    }

    fn command_event(c: &Command) -> serde_json::Value {
        serde_json::json!({
            "commandId": c.id, "kind": c.kind, "target": c.target, "policy": c.policy,
            "state": c.state, "error": c.error,
        })
    }

    pub async fn create_command<S: Sql>(
        sql: &mut S,
        c: &NewCommand,
        now: Millis,
    ) -> Result<Changed<Command>> {
        sql.execute(
            "INSERT INTO commands (id, kind, policy, target, args, state, created_at, updated_at, \
             deadline_at) VALUES (?1, ?2, ?3, ?4, ?5, 'requested', ?6, ?6, ?7)",
            params![
                &c.id,
                &c.kind,
                c.policy.clone(),
                &c.target,
                json_text(&c.args),
                now,
                c.deadline_at
            ],
        )
        .await?;
        let stored = load_command(sql, &c.id)
            .await?
            .ok_or_else(|| corrupt("commands", "a stored command vanished"))?;
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        rec.record("command.requested", command_event(&stored), now)?;
        Ok(rec.done(stored))
    }

    pub async fn advance_command<S: Sql>(
        sql: &mut S,
        id: &str,
        next: CommandState,
        error: Option<&str>,
        now: Millis,
    ) -> Result<Changed<Advance>> {
        let none = |value| Changed {
            value,
            events: Vec::new(),
        };
        let Some(c) = load_command(sql, id).await? else {
            return Ok(none(Advance::Missing));
        };
        if !c.state.may_become(next) {
            return Ok(none(Advance::Refused(c.state)));
        }
        // Conditional on the state read: a concurrent move makes this one a no-op.
        let n = sql
            .execute(
                "UPDATE commands SET state = ?1, error = ?2, updated_at = ?3 \
                 WHERE id = ?4 AND state = ?5",
                params![next.as_str(), error, now, id, c.state.as_str()],
            )
            .await?;
        let c = load_command(sql, id)
            .await?
            .ok_or_else(|| corrupt("commands", "a command vanished"))?;
        if n == 0 {
            return Ok(none(Advance::Refused(c.state)));
        }
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        rec.record("command.state.changed", command_event(&c), now)?;
        Ok(rec.done(Advance::Done(Box::new(c))))
    }

    pub async fn expire_commands<S: Sql>(
        sql: &mut S,
        now: Millis,
    ) -> Result<Changed<Vec<Command>>> {
        let rows = sql
            .fetch(
                "UPDATE commands SET state = 'expired', updated_at = ?1, \
                 error = 'its deadline passed before it finished' \
                 WHERE state IN ('requested', 'delivered', 'running') AND deadline_at <= ?1 \
                 RETURNING id",
                params![now],
            )
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.text(0)).collect::<Result<_>>()?;
        let mut out = Vec::new();
        for id in ids {
            out.extend(load_command(sql, &id).await?);
        }
        let mut rec = Recorder {
            sql,
            events: Vec::new(),
        };
        for c in &out {
            rec.record("command.state.changed", command_event(c), now)?;
        }
        Ok(rec.done(out))
    }

    pub async fn get_command<S: Sql>(sql: &mut S, id: &str) -> Result<Option<Command>> {
        load_command(sql, id).await
    }

    pub async fn list_commands<S: Sql>(
        sql: &mut S,
        open: bool,
        limit: u32,
    ) -> Result<Vec<Command>> {
        let filter = if open {
            " WHERE state IN ('requested', 'delivered', 'running')"
        } else {
            ""
        };
        let rows = sql
            .fetch(
                &format!("{COMMAND}{filter} ORDER BY created_at DESC, id LIMIT ?1"),
                params![i64::from(limit)],
            )
            .await?;
        rows.iter().map(|r| command(r.as_ref())).collect()
    }
}

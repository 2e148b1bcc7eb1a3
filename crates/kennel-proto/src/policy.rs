//! Spawn policies: the rules that keep a long-lived agent running. A policy is one document,
//! the same in a TOML file (`kennel policy apply -f FILE`, one `[[policy]]` table each) and
//! in the API's JSON; field names are camelCase in both.
//!
//! This module holds the document, its defaults and its validation. What the coordinator does
//! with a policy (the reconciler) is `kennel-lifecycle`'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::link::RepoSpec;
use crate::validate::validate_id;

/// Longest delay in a backoff schedule, and longest keepalive or timeout: a week, in seconds.
pub const MAX_POLICY_SECS: u64 = 7 * 24 * 3600;

/// Most steps in a backoff schedule.
pub const MAX_BACKOFF_STEPS: usize = 32;

/// Most target labels, tags and capabilities of a policy.
pub const MAX_NAMES: usize = 64;

/// Longest target label value, in characters.
pub const MAX_LABEL_VALUE: usize = 256;

/// Most provider arguments and environment variables of a policy.
pub const MAX_ARGS: usize = 256;

/// A spawn policy: which agent to keep running where, when, and how to restart it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpawnPolicy {
    /// Unique name; messages to `policy:<name>` go to this policy's agent.
    pub name: String,
    /// Which daemons may run the agent; any daemon offering the provider when empty.
    #[serde(default)]
    pub target: Target,
    /// Agent profile the daemon runs (`claude`, `command`, ...).
    pub provider: String,
    /// Repository (and base branch) the agent works in; none for an agent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    /// Label the agent registers with; messages to `label:<label>` reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Tags the agent registers with (`tag:<tag>` addresses it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Capabilities the agent registers with (`cap:<capability>` addresses it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Permission mode handed to the provider (Claude Code's `--permission-mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<String>,
    /// Extra arguments for the provider, one element each (never a shell string).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_args: Vec<String>,
    /// First user turn sent to the agent when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Extra environment for the agent process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `always-on`: kept running; `on-demand`: started when a message for it is queued,
    /// stopped when idle.
    pub mode: PolicyMode,
    /// Settings of `on-demand` mode.
    #[serde(default)]
    pub on_demand: OnDemand,
    /// Delays between restarts after failures.
    #[serde(default)]
    pub backoff: Backoff,
    /// Restart the agent (once idle for `restartOnUpdateIdleSecs`) after the coordinator's
    /// release changed (`server.agents.release`, by default kennel's version).
    #[serde(default)]
    pub restart_on_update: bool,
    /// Seconds without a message in or out before a restart for an update.
    #[serde(default = "default_update_idle")]
    pub restart_on_update_idle_secs: u64,
    /// Restart the agent once it has run for 24 hours (when idle for an hour).
    #[serde(default)]
    pub scheduled_daily_restart: bool,
    /// Seconds a started agent has to register before the start counts as failed.
    #[serde(default = "default_spawn_timeout")]
    pub spawn_timeout_secs: u64,
    /// Seconds a graceful stop may take before the agent is killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
}

fn default_update_idle() -> u64 {
    60
}

fn default_spawn_timeout() -> u64 {
    120
}

fn default_stop_timeout() -> u64 {
    10
}

/// Which daemons may run a policy's agent. To pin an agent to one machine, give that daemon a
/// label of its own (`[daemon] labels = { host = "box1" }`) and select it here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    /// Labels the daemon must carry, all of them with equal values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// When a policy's agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PolicyMode {
    /// Always running; restarted after every exit.
    AlwaysOn,
    /// Started when a message for it is queued; stopped after `onDemand.keepaliveSeconds`
    /// without a message in or out.
    OnDemand,
}

/// Settings of `on-demand` mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnDemand {
    /// Seconds without a message in or out after which the agent is stopped.
    #[serde(default = "default_keepalive")]
    pub keepalive_seconds: u64,
}

fn default_keepalive() -> u64 {
    300
}

impl Default for OnDemand {
    fn default() -> Self {
        OnDemand {
            keepalive_seconds: default_keepalive(),
        }
    }
}

/// Delays between restarts after failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// Seconds to wait after the 1st, 2nd, ... consecutive failure; the last repeats.
    #[serde(default = "default_schedule")]
    pub schedule: Vec<u64>,
    /// Seconds of healthy running after which the failure count starts again from zero.
    #[serde(default = "default_reset_after")]
    pub reset_after_seconds: u64,
}

fn default_schedule() -> Vec<u64> {
    vec![1, 5, 15, 60, 300]
}

fn default_reset_after() -> u64 {
    300
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            schedule: default_schedule(),
            reset_after_seconds: default_reset_after(),
        }
    }
}

impl Backoff {
    /// Seconds to wait after a failure when `failures` came before it without a reset.
    pub fn delay_secs(&self, failures: u32) -> u64 {
        let last = self.schedule.len().saturating_sub(1);
        let step = (failures as usize).min(last);
        self.schedule.get(step).copied().unwrap_or(0)
    }
}

/// Why a policy was refused: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid spawn policy `{policy}`: `{field}` {reason}")]
pub struct InvalidPolicy {
    pub policy: String,
    pub field: String,
    pub reason: String,
}

impl SpawnPolicy {
    /// Checks every field a user writes: names that become ids, bounds on every duration.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        let fail = |field: &str, reason: String| InvalidPolicy {
            policy: self.name.chars().take(80).collect(),
            field: field.to_string(),
            reason,
        };
        let id = |field: &str, value: &str| {
            validate_id("name", value).map_err(|e| fail(field, e.reason.to_string()))
        };
        id("name", &self.name)?;
        id("provider", &self.provider)?;
        for (k, v) in &self.target.labels {
            id("target.labels", k)?;
            if v.is_empty() || v.chars().count() > MAX_LABEL_VALUE {
                return Err(fail(
                    "target.labels",
                    format!("`{k}` must have a value of 1 to {MAX_LABEL_VALUE} characters"),
                ));
            }
        }
        for (field, n) in [
            ("target.labels", self.target.labels.len()),
            ("tags", self.tags.len()),
            ("capabilities", self.capabilities.len()),
        ] {
            if n > MAX_NAMES {
                return Err(fail(
                    field,
                    format!("has {n} entries; at most {MAX_NAMES} are allowed"),
                ));
            }
        }
        for (field, n) in [
            ("providerArgs", self.provider_args.len()),
            ("env", self.env.len()),
        ] {
            if n > MAX_ARGS {
                return Err(fail(
                    field,
                    format!("has {n} entries; at most {MAX_ARGS} are allowed"),
                ));
            }
        }
        if let Some(repo) = &self.repo {
            repo.check()
                .map_err(|(field, reason)| fail(field, reason))?;
        }
        if let Some(label) = &self.label {
            id("label", label)?;
        }
        for t in &self.tags {
            id("tags", t)?;
        }
        for c in &self.capabilities {
            id("capabilities", c)?;
        }
        if let Some(mode) = &self.permission_mode {
            id("permissionMode", mode)?;
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(fail(
                    "env",
                    format!("`{k}` is not an environment variable name (letters, digits, `_`)"),
                ));
            }
        }
        let secs = |field: &str, value: u64, min: u64| {
            if value < min || value > MAX_POLICY_SECS {
                Err(fail(
                    field,
                    format!("is {value}; it must be from {min} to {MAX_POLICY_SECS} seconds"),
                ))
            } else {
                Ok(())
            }
        };
        secs(
            "onDemand.keepaliveSeconds",
            self.on_demand.keepalive_seconds,
            1,
        )?;
        secs(
            "backoff.resetAfterSeconds",
            self.backoff.reset_after_seconds,
            1,
        )?;
        secs("spawnTimeoutSecs", self.spawn_timeout_secs, 1)?;
        secs(
            "restartOnUpdateIdleSecs",
            self.restart_on_update_idle_secs,
            1,
        )?;
        secs("stopTimeoutSecs", self.stop_timeout_secs, 1)?;
        if self.backoff.schedule.is_empty() || self.backoff.schedule.len() > MAX_BACKOFF_STEPS {
            return Err(fail(
                "backoff.schedule",
                format!("must list 1 to {MAX_BACKOFF_STEPS} delays in seconds"),
            ));
        }
        for &delay in &self.backoff.schedule {
            // A zero delay would restart a crashing agent in a tight loop.
            secs("backoff.schedule", delay, 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SpawnPolicy {
        serde_json::from_value(serde_json::json!({
            "name": "reviewer",
            "provider": "claude",
            "mode": "on-demand",
        }))
        .expect("a minimal policy")
    }

    #[test]
    fn a_minimal_policy_gets_the_documented_defaults() {
        let p = policy();
        assert_eq!(p.on_demand.keepalive_seconds, 300);
        assert_eq!(p.backoff.schedule, [1, 5, 15, 60, 300]);
        assert_eq!(p.backoff.reset_after_seconds, 300);
        assert_eq!((p.spawn_timeout_secs, p.stop_timeout_secs), (120, 10));
        assert!(!p.restart_on_update && !p.scheduled_daily_restart);
        p.validate().expect("valid");
    }

    #[test]
    fn the_backoff_delay_follows_the_schedule_and_repeats_its_last_step() {
        let b = Backoff {
            schedule: vec![2, 4, 8],
            reset_after_seconds: 60,
        };
        let delays: Vec<u64> = (0..5).map(|f| b.delay_secs(f)).collect();
        assert_eq!(delays, [2, 4, 8, 8, 8]);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = serde_json::from_value::<SpawnPolicy>(serde_json::json!({
            "name": "r", "provider": "claude", "mode": "always-on", "keepalive": 5,
        }))
        .expect_err("unknown field");
        assert!(
            err.to_string().contains("unknown field `keepalive`"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_field_and_the_rule() {
        type Case = (fn(&mut SpawnPolicy), &'static str);
        let cases: Vec<Case> = vec![
            (|p| p.name = "../x".into(), "`name`"),
            (
                |p| p.provider = String::new(),
                "`provider` must not be empty",
            ),
            (
                |p| p.backoff.schedule.clear(),
                "`backoff.schedule` must list",
            ),
            (|p| p.backoff.schedule = vec![0], "`backoff.schedule` is 0"),
            (|p| p.spawn_timeout_secs = 0, "`spawnTimeoutSecs` is 0"),
            (
                |p| p.on_demand.keepalive_seconds = 0,
                "`onDemand.keepaliveSeconds`",
            ),
            (|p| p.tags = vec!["a b".into()], "`tags`"),
            (
                |p| {
                    p.repo = Some(RepoSpec {
                        url: "--upload-pack=x".into(),
                        base_branch: String::new(),
                    })
                },
                "`repo.url` must not start with `-`",
            ),
            (
                |p| {
                    p.env.insert("1X".into(), "v".into());
                },
                "`env` `1X`",
            ),
            (
                |p| {
                    p.target.labels.insert("gpu".into(), String::new());
                },
                "`target.labels` `gpu` must have a value of 1 to 256 characters",
            ),
        ];
        for (change, expected) in cases {
            let mut p = policy();
            change(&mut p);
            let err = p.validate().expect_err(expected).to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
            assert!(err.starts_with("invalid spawn policy"), "{err}");
        }
    }
}

//! kennel's lifecycle manager for long-lived agents: spawn policies and what keeps their
//! agents alive.
//!
//! - [`reconcile`]: the reconciler, a pure function of (policy, state, facts, now); every
//!   transition is decided there and tested on plain numbers, without a clock or a database.
//! - [`parse_policies`]: a policy file as `kennel policy apply -f FILE` reads it.
//!
//! The policy document itself is a wire type (`kennel_proto::policy`), shared with the API and
//! the CLI. This crate does no I/O: storing policies and their state, and carrying out the
//! reconciler's actions on daemons, belong to the coordinator.

pub mod reconcile;

pub use kennel_proto::policy::{Backoff, InvalidPolicy, OnDemand, PolicyMode, SpawnPolicy, Target};
pub use reconcile::{
    reconcile, reconcile_retired, retire, Action, AgentFact, Decision, Facts, ManagedState, Millis,
    PolicyStatus, StopReason,
};

use serde::Deserialize;

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// Not TOML, or not policies: unknown keys, missing fields, wrong types (with the line).
    #[error("failed to read the policy file: {0}")]
    Syntax(String),
    /// A policy that parsed breaks a rule.
    #[error(transparent)]
    Invalid(#[from] InvalidPolicy),
    /// Two policies of the file have one name.
    #[error("the policy file names policy `{0}` twice; names must be unique")]
    Duplicate(String),
    /// The file holds no `[[policy]]` table.
    #[error("the policy file holds no policy; write each as a [[policy]] table")]
    Empty,
}

/// A policy file: `[[policy]]` tables, one per policy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: Vec<SpawnPolicy>,
}

/// Reads the policies of a TOML policy file and validates each.
pub fn parse_policies(text: &str) -> Result<Vec<SpawnPolicy>, PolicyFileError> {
    let file: PolicyFile =
        toml::from_str(text).map_err(|e| PolicyFileError::Syntax(e.to_string()))?;
    if file.policy.is_empty() {
        return Err(PolicyFileError::Empty);
    }
    let mut names = std::collections::BTreeSet::new();
    for p in &file.policy {
        p.validate()?;
        if !names.insert(p.name.as_str()) {
            return Err(PolicyFileError::Duplicate(p.name.clone()));
        }
    }
    Ok(file.policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_reads_every_policy_with_its_defaults() {
        let text = r#"
            [[policy]]
            name = "reviewer"
            provider = "claude"
            mode = "on-demand"
            tags = ["review"]
            onDemand = { keepaliveSeconds = 600 }
            target = { labels = { pool = "gpu" } }

            [[policy]]
            name = "triager"
            provider = "command"
            mode = "always-on"
            providerArgs = ["--verbose"]
            restartOnUpdate = true
            [policy.backoff]
            schedule = [2, 10]
            resetAfterSeconds = 60
        "#;
        let policies = parse_policies(text).expect("a valid file");
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[0].on_demand.keepalive_seconds, 600);
        assert_eq!(policies[0].target.labels["pool"], "gpu");
        assert_eq!(policies[0].backoff.schedule, [1, 5, 15, 60, 300]);
        assert_eq!(policies[1].mode, PolicyMode::AlwaysOn);
        assert_eq!(policies[1].backoff.schedule, [2, 10]);
        assert!(policies[1].restart_on_update);
    }

    #[test]
    fn a_bad_policy_file_says_what_is_wrong_and_where() {
        let unknown = "[[policy]]\nname = \"r\"\nprovider = \"claude\"\nmode = \"always-on\"\nkeepalive = 3\n";
        let err = parse_policies(unknown)
            .expect_err("unknown key")
            .to_string();
        assert!(
            err.contains("unknown field `keepalive`") && err.contains("line 5"),
            "{err}"
        );

        let mode = "[[policy]]\nname = \"r\"\nprovider = \"claude\"\nmode = \"sometimes\"\n";
        let err = parse_policies(mode).expect_err("bad mode").to_string();
        assert!(
            err.contains("always-on") && err.contains("on-demand"),
            "{err}"
        );

        let twice = "[[policy]]\nname = \"r\"\nprovider = \"c\"\nmode = \"always-on\"\n\
                     [[policy]]\nname = \"r\"\nprovider = \"c\"\nmode = \"on-demand\"\n";
        let err = parse_policies(twice).expect_err("duplicate").to_string();
        assert!(err.contains("names policy `r` twice"), "{err}");

        let invalid = "[[policy]]\nname = \"r\"\nprovider = \"c\"\nmode = \"always-on\"\nspawnTimeoutSecs = 0\n";
        let err = parse_policies(invalid).expect_err("invalid").to_string();
        assert!(err.contains("`spawnTimeoutSecs` is 0"), "{err}");

        let err = parse_policies("").expect_err("empty").to_string();
        assert!(err.contains("[[policy]]"), "{err}");
    }
}

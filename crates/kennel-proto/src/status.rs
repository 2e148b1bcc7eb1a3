//! The task and attempt lifecycles. Kept here so the server, the store and the CLI agree on
//! the names and on which states are terminal.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a task is in its life: `queued → dispatched → running ⇄ paused → completed | failed |
/// cancelled`, or `lost` when its daemon disappeared and no attempt is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum TaskStatus {
    Queued,
    Dispatched,
    Running,
    Paused,
    Completed,
    Failed,
    Cancelled,
    Lost,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 8] = [
        TaskStatus::Queued,
        TaskStatus::Dispatched,
        TaskStatus::Running,
        TaskStatus::Paused,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::Lost,
    ];

    /// A terminal task never changes state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::Lost
        )
    }

    /// True while an attempt is held by a daemon.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskStatus::Dispatched | TaskStatus::Running | TaskStatus::Paused
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Dispatched => "dispatched",
            TaskStatus::Running => "running",
            TaskStatus::Paused => "paused",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Lost => "lost",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a status name that is not one of [`TaskStatus::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown task status `{0}` (expected one of queued, dispatched, running, paused, completed, failed, cancelled, lost)")]
pub struct UnknownStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// How one attempt (one dispatch of a task to a daemon) ended, or that it is still live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum AttemptStatus {
    /// Sent to a daemon; waiting for `taskAccepted` within the lease.
    Dispatched,
    Running,
    Paused,
    Completed,
    Failed,
    /// The daemon refused the task (`taskRejected`).
    Rejected,
    /// No `taskAccepted` arrived before the lease ran out.
    Expired,
    /// The daemon disappeared and did not come back within the reattach grace.
    Lost,
    Cancelled,
    /// The daemon stopped cleanly before the agent finished and handed the attempt back; the
    /// task is retried without using up an attempt.
    Returned,
}

impl AttemptStatus {
    pub const ALL: [AttemptStatus; 10] = [
        AttemptStatus::Dispatched,
        AttemptStatus::Running,
        AttemptStatus::Paused,
        AttemptStatus::Completed,
        AttemptStatus::Failed,
        AttemptStatus::Rejected,
        AttemptStatus::Expired,
        AttemptStatus::Lost,
        AttemptStatus::Cancelled,
        AttemptStatus::Returned,
    ];

    pub fn is_live(self) -> bool {
        matches!(
            self,
            AttemptStatus::Dispatched | AttemptStatus::Running | AttemptStatus::Paused
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Dispatched => "dispatched",
            AttemptStatus::Running => "running",
            AttemptStatus::Paused => "paused",
            AttemptStatus::Completed => "completed",
            AttemptStatus::Failed => "failed",
            AttemptStatus::Rejected => "rejected",
            AttemptStatus::Expired => "expired",
            AttemptStatus::Lost => "lost",
            AttemptStatus::Cancelled => "cancelled",
            AttemptStatus::Returned => "returned",
        }
    }
}

impl fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttemptStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AttemptStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for st in TaskStatus::ALL {
            assert_eq!(st.as_str().parse::<TaskStatus>().ok(), Some(st));
            let json = serde_json::to_string(&st).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        for st in AttemptStatus::ALL {
            assert_eq!(st.as_str().parse::<AttemptStatus>().ok(), Some(st));
        }
        assert!("bogus".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = TaskStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            vec![
                TaskStatus::Completed,
                TaskStatus::Failed,
                TaskStatus::Cancelled,
                TaskStatus::Lost
            ]
        );
    }
}

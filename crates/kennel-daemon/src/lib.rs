//! The kennel daemon as a library: a link to a coordinator or relay (reconnecting forever,
//! with a persisted outbox so no task message is lost or duplicated), and an executor that
//! runs agent CLIs in per-attempt git worktrees, streams their output and pushes the result.
//!
//! `kennel daemon` runs it standalone; `kennel up` runs it beside a coordinator in one process.

pub mod agent;
pub mod config;
pub mod daemon;
pub mod executor;
pub mod link;
pub mod outbox;
pub mod process;
pub mod worktree;

//! The build agents' pipeline: one Automerge document of stories and nodes, shared by the
//! rendezvous and every agent, merged whenever they meet (`kennel-sync`).
//!
//! - [`pipeline`]: the document and every rule read from it. Stories and nodes are written so
//!   that concurrent edits merge without losing anything: each story and node is its own
//!   object under the root (no two peers ever create the same container), a deletion is a
//!   tombstone field (a concurrent edit cannot bring a story back), and claims and progress
//!   are kept per node, so the story's owner and stage are computed the same way by everyone
//!   from the merged document instead of being overwritten last-writer-wins.
//! - [`liveness`]: when a node counts as gone, judged by each observer's own clock from when
//!   it last saw the node's heartbeat counter move, never by comparing timestamps written on
//!   other machines.
//! - [`plan`]: what an agent does next (claim, start, stop, release a gone owner's claim,
//!   block), a pure function of its copy of the document, what it runs and what it saw.
//! - [`replica`]: a peer's copy, shared by its sync connections and its own edits.
//! - [`store`]: the document on disk, the one source of truth: an append-only file of
//!   incremental saves, compacted now and then.
//!
//! This crate does no networking and reads no clock: time is passed in, messages are bytes.

pub mod liveness;
pub mod pipeline;
pub mod plan;
pub mod replica;
pub mod store;

pub use liveness::Liveness;
pub use pipeline::{Pipeline, PipelineError, Stage, Story, StoryUpdate};
pub use plan::{plan, Situation, Step};
pub use replica::{Moved, Replica, ReplicaError};
pub use store::DocFile;

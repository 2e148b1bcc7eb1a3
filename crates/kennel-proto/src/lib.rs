//! Wire types shared by every kennel process: the daemon link protocol (v1), the REST API's
//! request and response bodies, the task lifecycle, limits and validation of ids.
//!
//! This crate does no I/O and knows nothing of tokio: it is the contract between the
//! coordinator, daemons, relays and the CLI, so a third-party daemon can depend on it alone.

pub mod agents;
pub mod api;
pub mod link;
pub mod policy;
pub mod span;
pub mod status;
pub mod validate;

pub use link::{
    decode_daemon_frame, decode_server_frame, DaemonMessage, Decoded, ErrorCode, FrameError,
    ServerMessage, DEFAULT_MAX_FRAME_BYTES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use span::Span;
pub use status::{AttemptStatus, TaskStatus};
pub use validate::{
    validate_base_branch, validate_branch_name, validate_id, ConfigError, InvalidId,
};

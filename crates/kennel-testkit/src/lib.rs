//! Support for kennel's end-to-end tests: start the real `kennel` binary on a free port
//! ([`KennelServer`]), talk to its REST API ([`Api`]) and event streams ([`EventStream`]), and
//! drive it as a protocol-level daemon over a real WebSocket ([`TestDaemon`]).
//!
//! Everything here waits on events with a deadline and never sleeps to synchronise: a test
//! either sees what it waited for or fails with a message that says what it saw instead. This
//! crate must not reach into the server's internals; it speaks only the public protocol and
//! API, as a user or a third-party daemon would.

pub mod anthropic;
pub mod api;
pub mod build_agent;
pub mod daemon;
pub mod deadline;
pub mod gateway;
pub mod git;
pub mod llm;
pub mod postgres;
pub mod proxy;
pub mod raw_http;
pub mod relay;
pub mod server;
pub mod soak;
pub mod sse;
pub mod up;
pub mod worker;

pub use anthropic::ScriptedAnthropic;
pub use api::Api;
pub use build_agent::KennelAgent;
pub use daemon::{DaemonOpts, SeqCounters, TestDaemon, WsMessage, ABNORMAL_CLOSE, NO_STATUS_CLOSE};
pub use deadline::within;
pub use gateway::KennelGateway;
pub use git::GitFixture;
pub use llm::{refused_addr, Behavior, ScriptedLlm};
pub use postgres::PgSchema;
pub use proxy::FaultProxy;
pub use relay::{KennelRelay, RELAY_ADMIN_KEY, RELAY_DAEMON_KEY};
pub use reqwest::{Method, StatusCode};
pub use server::KennelServer;
pub use sse::{is_task_status, wait_task_status, EventStream, SseMsg};
pub use up::{KennelUp, UpOptions};
pub use worker::KennelDaemon;

//! Integration tests of the daemon link, protocol v1 (docs/protocol.md).
//!
//! The golden fixtures under `tests/fixtures/{daemon,server}/<type>.json` document the full
//! shape of every message: each one must decode as the expected variant and re-encode to the
//! same JSON value, so no field can be lost, renamed or given a new default unnoticed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use kennel_proto::link::Authenticate;
use kennel_proto::{
    decode_daemon_frame, decode_server_frame, DaemonMessage, Decoded, ErrorCode, FrameError,
    ServerMessage, DEFAULT_MAX_FRAME_BYTES,
};
use serde_json::{json, Value};

mod props;

/// The fields of one message type besides `type`: the ones a peer must send and the ones it
/// may leave out. Every fixture carries all of them.
struct Shape {
    name: &'static str,
    required: &'static [&'static str],
    optional: &'static [&'static str],
}

const TASK_HEADER: [&str; 3] = ["taskId", "attempt", "seq"];

const DAEMON_SHAPES: &[Shape] = &[
    Shape {
        name: "authenticate",
        required: &[
            "apiKey",
            "machineId",
            "hostname",
            "maxConcurrentTasks",
            "protocolVersion",
        ],
        optional: &[
            "minProtocolVersion",
            "version",
            "labels",
            "agents",
            "runningTasks",
        ],
    },
    Shape {
        name: "heartbeat",
        required: &[],
        optional: &["activeTasks"],
    },
    Shape {
        name: "taskAccepted",
        required: &["taskId", "attempt", "seq"],
        optional: &[],
    },
    Shape {
        name: "taskRejected",
        required: &["taskId", "attempt", "seq", "reason"],
        optional: &["code"],
    },
    Shape {
        name: "taskOutput",
        required: &["taskId", "attempt", "seq", "stream", "output"],
        optional: &["isPartial"],
    },
    Shape {
        name: "taskProgress",
        required: &["taskId", "attempt", "seq", "summary"],
        optional: &["detail"],
    },
    Shape {
        name: "taskStatusChange",
        required: &["taskId", "attempt", "seq", "oldStatus", "newStatus"],
        optional: &[],
    },
    Shape {
        name: "taskComplete",
        required: &["taskId", "attempt", "seq", "success"],
        optional: &["error", "exitCode", "branch", "commit"],
    },
    Shape {
        name: "capacity",
        required: &["maxConcurrentTasks"],
        optional: &["agents", "labels"],
    },
    Shape {
        name: "taskQueued",
        required: &["taskId", "attempt"],
        optional: &["reason"],
    },
    Shape {
        name: "messageDelivered",
        required: &["taskId", "attempt", "seq", "messageId"],
        optional: &[],
    },
    Shape {
        name: "agentMessage",
        required: &["taskId", "attempt", "seq", "body"],
        optional: &["to", "inReplyTo"],
    },
];

const SERVER_SHAPES: &[Shape] = &[
    Shape {
        name: "authenticated",
        required: &["daemonId", "heartbeatIntervalSecs", "protocolVersion"],
        optional: &["maxFrameBytes"],
    },
    Shape {
        name: "spawnTask",
        required: &["taskId", "attempt", "taskName", "prompt", "agent"],
        optional: &["repo", "env", "limits", "session"],
    },
    Shape {
        name: "pauseTask",
        required: &["taskId", "attempt"],
        optional: &[],
    },
    Shape {
        name: "resumeTask",
        required: &["taskId", "attempt"],
        optional: &[],
    },
    Shape {
        name: "interruptTask",
        required: &["taskId", "attempt", "graceSecs"],
        optional: &[],
    },
    Shape {
        name: "sendMessage",
        required: &["taskId", "attempt", "message"],
        optional: &[],
    },
    Shape {
        name: "deliverMessage",
        required: &["taskId", "attempt", "messageId", "from", "body"],
        optional: &[],
    },
    Shape {
        name: "ack",
        required: &["taskId", "attempt", "seq"],
        optional: &[],
    },
    Shape {
        name: "error",
        required: &["code", "message"],
        optional: &["taskId", "attempt", "expectedSeq"],
    },
];

/// The wire name of each daemon variant, written out here rather than taken from
/// `type_name()`. The match is exhaustive, so a new variant does not compile until it is
/// named here, and then fails the fixture tests until it has a fixture and a shape.
fn daemon_variant(m: &DaemonMessage) -> &'static str {
    match m {
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

/// See [`daemon_variant`].
fn server_variant(m: &ServerMessage) -> &'static str {
    match m {
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

/// Every error code with its wire name; exhaustive for the same reason as [`daemon_variant`].
fn error_code_name(c: ErrorCode) -> &'static str {
    match c {
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

const ALL_ERROR_CODES: [ErrorCode; 9] = [
    ErrorCode::FrameTooLarge,
    ErrorCode::MalformedFrame,
    ErrorCode::InvalidMessage,
    ErrorCode::NotAuthenticated,
    ErrorCode::Unauthorized,
    ErrorCode::UnsupportedVersion,
    ErrorCode::StaleAttempt,
    ErrorCode::SeqGap,
    ErrorCode::Internal,
];

/// Which way a frame travels; picks the fixtures, the shapes and the decoder.
#[derive(Debug, Clone, Copy)]
enum Side {
    Daemon,
    Server,
}

const SIDES: [Side; 2] = [Side::Daemon, Side::Server];

impl Side {
    fn dir(self) -> PathBuf {
        let name = match self {
            Side::Daemon => "daemon",
            Side::Server => "server",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn shapes(self) -> &'static [Shape] {
        match self {
            Side::Daemon => DAEMON_SHAPES,
            Side::Server => SERVER_SHAPES,
        }
    }

    /// Decodes with the default limit; `Some(variant name)` for a known message, `None` for
    /// an unknown type.
    fn decode(self, frame: &str) -> Result<Option<&'static str>, FrameError> {
        self.decode_with_limit(frame, DEFAULT_MAX_FRAME_BYTES)
    }

    fn decode_with_limit(
        self,
        frame: &str,
        limit: usize,
    ) -> Result<Option<&'static str>, FrameError> {
        Ok(match self {
            Side::Daemon => match decode_daemon_frame(frame, limit)? {
                Decoded::Known(m) => Some(daemon_variant(&m)),
                Decoded::Unknown { .. } => None,
            },
            Side::Server => match decode_server_frame(frame, limit)? {
                Decoded::Known(m) => Some(server_variant(&m)),
                Decoded::Unknown { .. } => None,
            },
        })
    }

    /// Decodes a fixture that must be valid and re-encodes it with `to_json()`.
    fn round_trip(self, frame: &str) -> (&'static str, String) {
        match self {
            Side::Daemon => match decode_daemon_frame(frame, DEFAULT_MAX_FRAME_BYTES) {
                Ok(Decoded::Known(m)) => {
                    let json = m.to_json();
                    // The re-encoding must decode to the same message again.
                    let again = decode_daemon_frame(&json, DEFAULT_MAX_FRAME_BYTES);
                    assert_eq!(again, Ok(Decoded::Known(m.clone())), "{json}");
                    assert_eq!(m.type_name(), daemon_variant(&m));
                    (daemon_variant(&m), json)
                }
                other => panic!("expected a known daemon message, got {other:?}"),
            },
            Side::Server => match decode_server_frame(frame, DEFAULT_MAX_FRAME_BYTES) {
                Ok(Decoded::Known(m)) => {
                    let json = m.to_json();
                    let again = decode_server_frame(&json, DEFAULT_MAX_FRAME_BYTES);
                    assert_eq!(again, Ok(Decoded::Known(m.clone())), "{json}");
                    assert_eq!(m.type_name(), server_variant(&m));
                    (server_variant(&m), json)
                }
                other => panic!("expected a known server message, got {other:?}"),
            },
        }
    }
}

fn read_fixture(side: Side, name: &str) -> (String, Value) {
    let path = side.dir().join(format!("{name}.json"));
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fixture {} is not JSON: {e}", path.display()));
    assert!(
        value.is_object(),
        "fixture {} is not an object",
        path.display()
    );
    (text, value)
}

/// Encodes a fixture after `edit` changed its JSON value.
fn edited(side: Side, name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (_, mut value) = read_fixture(side, name);
    edit(&mut value);
    value.to_string()
}

fn remove(value: &mut Value, field: &str) {
    if let Some(object) = value.as_object_mut() {
        object.remove(field);
    }
}

fn expect_invalid(result: Result<Option<&'static str>, FrameError>) -> (String, String) {
    match result {
        Err(e @ FrameError::Invalid { .. }) => {
            assert_eq!(e.code(), ErrorCode::InvalidMessage);
            let FrameError::Invalid { type_name, detail } = e else {
                unreachable!()
            };
            (type_name, detail)
        }
        other => panic!("expected an invalid-message error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// golden fixtures

#[test]
fn each_fixture_directory_holds_exactly_one_file_per_message_type() {
    for side in SIDES {
        let found: BTreeSet<String> = fs::read_dir(side.dir())
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", side.dir().display()))
            .map(|entry| match entry {
                Ok(entry) => entry.file_name().to_string_lossy().into_owned(),
                Err(e) => panic!("cannot list {}: {e}", side.dir().display()),
            })
            .collect();
        let expected: BTreeSet<String> = side
            .shapes()
            .iter()
            .map(|s| format!("{}.json", s.name))
            .collect();
        assert_eq!(found, expected, "{side:?} fixtures");
        let types = match side {
            // `capacity` and `taskQueued` joined v1 for relays, `messageDelivered`,
            // `agentMessage` and `deliverMessage` for session agents; older daemons never send
            // them.
            Side::Daemon => 12,
            Side::Server => 9,
        };
        assert_eq!(
            expected.len(),
            types,
            "{side:?}: protocol v1 has {types} message types"
        );
    }
}

#[test]
fn every_fixture_round_trips_unchanged() {
    for side in SIDES {
        for shape in side.shapes() {
            let (text, value) = read_fixture(side, shape.name);
            assert_eq!(value["type"], json!(shape.name), "{side:?} {}", shape.name);
            let (variant, json) = side.round_trip(&text);
            assert_eq!(
                variant, shape.name,
                "{side:?} fixture decoded as another type"
            );
            let reencoded: Value = match serde_json::from_str(&json) {
                Ok(v) => v,
                Err(e) => panic!("to_json() of {} is not JSON: {e}: {json}", shape.name),
            };
            assert_eq!(
                reencoded, value,
                "{side:?} {} lost or renamed a field",
                shape.name
            );
        }
    }
}

#[test]
fn every_fixture_shows_every_field() {
    for side in SIDES {
        for shape in side.shapes() {
            let (_, value) = read_fixture(side, shape.name);
            let found: BTreeSet<&str> = value
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let expected: BTreeSet<&str> = std::iter::once("type")
                .chain(shape.required.iter().copied())
                .chain(shape.optional.iter().copied())
                .collect();
            assert_eq!(found, expected, "{side:?} {}", shape.name);
        }
    }
}

#[test]
fn nested_optional_fields_are_filled_and_kept() {
    let (text, value) = read_fixture(Side::Server, "spawnTask");
    assert!(value["repo"]["baseBranch"].is_string());
    assert!(value["limits"]["timeoutSecs"].is_u64());
    match decode_server_frame(&text, DEFAULT_MAX_FRAME_BYTES) {
        Ok(Decoded::Known(ServerMessage::SpawnTask(s))) => {
            let repo = s.repo.as_ref().map(|r| r.base_branch.as_str());
            assert_eq!(repo, Some("develop"));
            assert_eq!(s.limits.timeout_secs, Some(3600));
            assert_eq!(
                s.env.get("RUST_LOG").map(String::as_str),
                Some("kennel=debug")
            );
        }
        other => panic!("expected spawnTask, got {other:?}"),
    }
    // Without `baseBranch` the task starts from the remote's default branch: empty here, and
    // left out again when encoded.
    let frame = edited(Side::Server, "spawnTask", |v| {
        v["repo"] = json!({ "url": "https://git.example.net/platform/kennel.git" });
    });
    match decode_server_frame(&frame, DEFAULT_MAX_FRAME_BYTES) {
        Ok(Decoded::Known(ServerMessage::SpawnTask(s))) => {
            let repo = s.repo.clone().map(|r| r.base_branch);
            assert_eq!(repo, Some(String::new()));
            let encoded = serde_json::to_value(ServerMessage::SpawnTask(s)).unwrap();
            assert_eq!(
                encoded["repo"],
                json!({ "url": "https://git.example.net/platform/kennel.git" })
            );
        }
        other => panic!("expected spawnTask, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// required and optional fields

#[test]
fn leaving_out_a_required_field_is_an_invalid_message_naming_it() {
    for side in SIDES {
        for shape in side.shapes() {
            for field in shape.required {
                let frame = edited(side, shape.name, |v| {
                    remove(v, field);
                });
                let (type_name, detail) = expect_invalid(side.decode(&frame));
                assert_eq!(type_name, shape.name, "{side:?} without {field}");
                assert!(
                    detail.contains(&format!("missing field `{field}`")),
                    "{side:?} {} without {field}: {detail}",
                    shape.name
                );
            }
        }
    }
}

#[test]
fn leaving_out_an_optional_field_still_decodes() {
    for side in SIDES {
        for shape in side.shapes() {
            for field in shape.optional {
                let frame = edited(side, shape.name, |v| {
                    remove(v, field);
                });
                assert_eq!(
                    side.decode(&frame),
                    Ok(Some(shape.name)),
                    "{side:?} {} without {field}",
                    shape.name
                );
            }
        }
    }
}

#[test]
fn a_message_without_type_is_malformed() {
    for side in SIDES {
        for shape in side.shapes() {
            let frame = edited(side, shape.name, |v| {
                remove(v, "type");
            });
            let err = side.decode(&frame).expect_err("a frame without `type`");
            assert_eq!(
                err.code(),
                ErrorCode::MalformedFrame,
                "{side:?} {}",
                shape.name
            );
        }
    }
}

#[test]
fn a_field_of_the_wrong_type_is_an_invalid_message() {
    let frame = edited(Side::Daemon, "taskOutput", |v| v["stream"] = json!("stdin"));
    let (type_name, detail) = expect_invalid(Side::Daemon.decode(&frame));
    assert_eq!(type_name, "taskOutput");
    assert!(detail.contains("stdin"), "{detail}");

    let frame = edited(Side::Daemon, "taskAccepted", |v| v["attempt"] = json!(-1));
    let (type_name, _) = expect_invalid(Side::Daemon.decode(&frame));
    assert_eq!(type_name, "taskAccepted");

    let frame = edited(Side::Server, "error", |v| v["code"] = json!("SeqGap"));
    let (type_name, _) = expect_invalid(Side::Server.decode(&frame));
    assert_eq!(type_name, "error");
}

// ---------------------------------------------------------------------------------------------
// frame-level errors

#[test]
fn frames_over_the_limit_are_refused_and_frames_at_it_are_not() {
    let limit = DEFAULT_MAX_FRAME_BYTES;
    for (side, name, field) in [
        (Side::Daemon, "taskOutput", "output"),
        (Side::Server, "sendMessage", "message"),
    ] {
        let empty = edited(side, name, |v| v[field] = json!(""));
        // `x` needs no escaping, so each one adds exactly one byte to the frame.
        let pad = limit - empty.len();
        let at_limit = edited(side, name, |v| v[field] = json!("x".repeat(pad)));
        assert_eq!(at_limit.len(), limit);
        assert_eq!(
            side.decode(&at_limit),
            Ok(Some(name)),
            "{side:?} at the limit"
        );

        let over = edited(side, name, |v| v[field] = json!("x".repeat(pad + 1)));
        let err = side.decode(&over).expect_err("one byte over the limit");
        assert_eq!(
            err,
            FrameError::TooLarge {
                size: limit + 1,
                limit
            }
        );
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(
            err.to_string(),
            "frame of 1048577 bytes exceeds the limit of 1048576 bytes"
        );
    }
}

#[test]
fn the_size_limit_is_checked_before_parsing() {
    // Not JSON at all, but too large: the size is what gets reported.
    let junk = "{".repeat(65);
    for side in SIDES {
        let err = side.decode_with_limit(&junk, 64).expect_err("oversize");
        assert_eq!(err.code(), ErrorCode::FrameTooLarge, "{side:?}");
        let err = side
            .decode_with_limit(&junk[..64], 64)
            .expect_err("malformed");
        assert_eq!(err.code(), ErrorCode::MalformedFrame, "{side:?}");
    }
}

#[test]
fn malformed_frames_are_told_apart_from_invalid_messages() {
    for side in SIDES {
        for frame in [
            "",
            "{",
            "not json",
            r#"{"type":"heartbeat""#,
            "[]",
            "null",
            "42",
            r#""heartbeat""#,
            r#"{"type":7}"#,
            r#"{"type":null}"#,
            r#"{"taskId":"t-01J9Z3K6Q5"}"#,
        ] {
            let err = side.decode(frame).expect_err(frame);
            assert_eq!(err.code(), ErrorCode::MalformedFrame, "{side:?} {frame:?}");
        }
    }
}

#[test]
fn unknown_types_decode_as_unknown() {
    let d = decode_daemon_frame(
        r#"{"type":"taskTelemetry","taskId":"t-01J9Z3K6Q5","cpu":0.5}"#,
        DEFAULT_MAX_FRAME_BYTES,
    );
    assert_eq!(
        d,
        Ok(Decoded::Unknown {
            type_name: "taskTelemetry".into()
        })
    );
    let d = decode_server_frame(
        r#"{"type":"drainDaemon","deadlineSecs":60}"#,
        DEFAULT_MAX_FRAME_BYTES,
    );
    assert_eq!(
        d,
        Ok(Decoded::Unknown {
            type_name: "drainDaemon".into()
        })
    );
    // Type tags are case-sensitive: `TaskOutput` is not `taskOutput`.
    let d = decode_daemon_frame(r#"{"type":"TaskOutput"}"#, DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(
        d,
        Ok(Decoded::Unknown {
            type_name: "TaskOutput".into()
        })
    );
    // A server message sent upstream is unknown to the daemon decoder, and the reverse.
    let (ack, _) = read_fixture(Side::Server, "ack");
    assert_eq!(Side::Daemon.decode(&ack), Ok(None));
    let (accepted, _) = read_fixture(Side::Daemon, "taskAccepted");
    assert_eq!(Side::Server.decode(&accepted), Ok(None));
    // The reported name is cut to 64 characters, so a peer cannot flood the logs.
    let long = "x".repeat(500);
    let d = decode_daemon_frame(&format!(r#"{{"type":"{long}"}}"#), DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(
        d,
        Ok(Decoded::Unknown {
            type_name: "x".repeat(64)
        })
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let frame = edited(Side::Daemon, "taskOutput", |v| {
        v["lineNumber"] = json!(381);
    });
    assert_eq!(Side::Daemon.decode(&frame), Ok(Some("taskOutput")));
    let frame = edited(Side::Server, "spawnTask", |v| v["priority"] = json!(5));
    assert_eq!(Side::Server.decode(&frame), Ok(Some("spawnTask")));
}

// ---------------------------------------------------------------------------------------------
// validation of daemon frames

fn task_scoped_daemon_shapes() -> impl Iterator<Item = &'static Shape> {
    DAEMON_SHAPES
        .iter()
        .filter(|s| TASK_HEADER.iter().all(|f| s.required.contains(f)))
}

#[test]
fn eight_daemon_messages_are_task_scoped() {
    let names: Vec<&str> = task_scoped_daemon_shapes().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "taskAccepted",
            "taskRejected",
            "taskOutput",
            "taskProgress",
            "taskStatusChange",
            "taskComplete",
            "messageDelivered",
            "agentMessage"
        ]
    );
}

#[test]
fn attempt_zero_and_seq_zero_are_refused() {
    for shape in task_scoped_daemon_shapes() {
        let frame = edited(Side::Daemon, shape.name, |v| v["attempt"] = json!(0));
        let (type_name, detail) = expect_invalid(Side::Daemon.decode(&frame));
        assert_eq!(type_name, shape.name);
        assert_eq!(detail, "attempt starts at 1");

        let frame = edited(Side::Daemon, shape.name, |v| v["seq"] = json!(0));
        let (type_name, detail) = expect_invalid(Side::Daemon.decode(&frame));
        assert_eq!(type_name, shape.name);
        assert_eq!(detail, "seq starts at 1");

        // 1 is the first valid value of both.
        let frame = edited(Side::Daemon, shape.name, |v| {
            v["attempt"] = json!(1);
            v["seq"] = json!(1);
        });
        assert_eq!(Side::Daemon.decode(&frame), Ok(Some(shape.name)));
    }
}

#[test]
fn task_ids_with_a_slash_are_refused() {
    let bad = "t-01J9Z3K6Q5/../../etc";
    for shape in task_scoped_daemon_shapes() {
        let frame = edited(Side::Daemon, shape.name, |v| v["taskId"] = json!(bad));
        let (type_name, detail) = expect_invalid(Side::Daemon.decode(&frame));
        assert_eq!(type_name, shape.name);
        assert!(
            detail.starts_with("invalid task id `t-01J9Z3K6Q5/"),
            "{detail}"
        );
    }
    let frame = edited(Side::Daemon, "authenticate", |v| {
        v["runningTasks"][1]["taskId"] = json!(bad);
    });
    let (type_name, detail) = expect_invalid(Side::Daemon.decode(&frame));
    assert_eq!(type_name, "authenticate");
    assert!(detail.starts_with("invalid task id"), "{detail}");

    let frame = edited(Side::Daemon, "heartbeat", |v| {
        v["activeTasks"][0]["taskId"] = json!("a/b");
    });
    let (type_name, detail) = expect_invalid(Side::Daemon.decode(&frame));
    assert_eq!(type_name, "heartbeat");
    assert!(detail.starts_with("invalid task id `a/b`"), "{detail}");

    let frame = edited(Side::Daemon, "authenticate", |v| {
        v["machineId"] = json!("m/build-07");
    });
    let (_, detail) = expect_invalid(Side::Daemon.decode(&frame));
    assert!(detail.starts_with("invalid machine id"), "{detail}");
}

#[test]
fn authenticate_limits_are_enforced() {
    for (field, value) in [
        ("maxConcurrentTasks", json!(0)),
        ("maxConcurrentTasks", json!(10_001)),
        ("hostname", json!("h".repeat(256))),
    ] {
        let frame = edited(Side::Daemon, "authenticate", |v| v[field] = value.clone());
        let (type_name, _) = expect_invalid(Side::Daemon.decode(&frame));
        assert_eq!(type_name, "authenticate", "{field} = {value}");
    }
    let frame = edited(Side::Daemon, "authenticate", |v| {
        v["maxConcurrentTasks"] = json!(10_000);
        v["hostname"] = json!("h".repeat(255));
    });
    assert_eq!(Side::Daemon.decode(&frame), Ok(Some("authenticate")));
}

// ---------------------------------------------------------------------------------------------
// secrets

#[test]
fn the_api_key_never_appears_in_debug_output() {
    let (text, value) = read_fixture(Side::Daemon, "authenticate");
    let key = value["apiKey"].as_str().unwrap_or_default().to_string();
    assert!(key.len() > 20, "fixture needs a realistic key");
    // The random part of the key, which must not leak even without the prefix.
    let secret_part = &key[key.len() - 16..];

    let decoded = decode_daemon_frame(&text, DEFAULT_MAX_FRAME_BYTES);
    let auth: Authenticate = match &decoded {
        Ok(Decoded::Known(DaemonMessage::Authenticate(a))) => a.clone(),
        other => panic!("expected authenticate, got {other:?}"),
    };
    assert_eq!(auth.api_key.expose(), key);
    for printed in [
        format!("{decoded:?}"),
        format!("{decoded:#?}"),
        format!("{auth:?}"),
        format!("{:?}", auth.api_key),
    ] {
        assert!(!printed.contains(secret_part), "key leaked: {printed}");
        assert!(printed.contains("Secret(***)"), "{printed}");
    }
    // The key still goes on the wire.
    let json = DaemonMessage::Authenticate(auth).to_json();
    assert!(json.contains(&format!(r#""apiKey":"{key}""#)), "{json}");
}

#[test]
fn the_api_key_does_not_leak_through_decode_errors() {
    let (_, value) = read_fixture(Side::Daemon, "authenticate");
    let key = value["apiKey"].as_str().unwrap_or_default().to_string();
    let secret_part = &key[key.len() - 16..];
    let edits: [fn(&mut Value); 4] = [
        |v| remove(v, "hostname"),
        |v| v["maxConcurrentTasks"] = json!(0),
        |v| v["maxConcurrentTasks"] = json!("four"),
        |v| v["machineId"] = json!("../m"),
    ];
    for edit in edits {
        let frame = edited(Side::Daemon, "authenticate", edit);
        let err = Side::Daemon
            .decode(&frame)
            .expect_err("invalid authenticate");
        for printed in [err.to_string(), format!("{err:?}")] {
            assert!(!printed.contains(secret_part), "key leaked: {printed}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// error codes and documentation

#[test]
fn error_codes_have_stable_wire_names() {
    for code in ALL_ERROR_CODES {
        let name = error_code_name(code);
        assert_eq!(code.as_str(), name);
        assert_eq!(serde_json::to_value(code).ok(), Some(json!(name)));
        assert_eq!(
            serde_json::from_value::<ErrorCode>(json!(name)).ok(),
            Some(code)
        );
    }
    let frame = r#"{"type":"error","code":"staleAttempt","message":"attempt 1 of t-01J9Z3K6Q5 is not current","taskId":"t-01J9Z3K6Q5","attempt":1}"#;
    match decode_server_frame(frame, DEFAULT_MAX_FRAME_BYTES) {
        Ok(Decoded::Known(ServerMessage::Error(e))) => {
            assert_eq!(e.code, ErrorCode::StaleAttempt);
            assert_eq!(e.task_id.as_deref(), Some("t-01J9Z3K6Q5"));
            assert_eq!(e.attempt, Some(1));
            assert_eq!(e.expected_seq, None);
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    // The fallback `ServerMessage::error` leaves the optional fields out of the frame.
    let json = ServerMessage::error(ErrorCode::Unauthorized, "unknown API key").to_json();
    let value: Value = serde_json::from_str(&json).unwrap_or_default();
    assert_eq!(
        value,
        json!({"type": "error", "code": "unauthorized", "message": "unknown API key"})
    );
}

#[test]
fn the_protocol_document_covers_every_message_field_and_error_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md");
    let doc =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for side in SIDES {
        for shape in side.shapes() {
            assert!(
                doc.contains(&format!("### `{}`", shape.name)),
                "docs/protocol.md has no section for `{}`",
                shape.name
            );
            for field in shape.required.iter().chain(shape.optional) {
                assert!(
                    doc.contains(&format!("`{field}`")),
                    "docs/protocol.md does not mention `{field}` of `{}`",
                    shape.name
                );
            }
        }
    }
    for code in ALL_ERROR_CODES {
        let name = error_code_name(code);
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/protocol.md does not mention error code `{name}`"
        );
    }
}

/// Every JSON example in docs/protocol.md, and every frame of its example session, must be a
/// valid message in the direction it is shown.
#[test]
fn the_protocol_document_examples_decode() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md");
    let doc =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));

    let mut blocks = 0;
    let mut rest = doc.as_str();
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + "```json\n".len()..];
        let end = body.find("```").unwrap_or(body.len());
        let example = &body[..end];
        let daemon = Side::Daemon.decode(example);
        let server = Side::Server.decode(example);
        assert!(
            matches!(daemon, Ok(Some(_))) || matches!(server, Ok(Some(_))),
            "example does not decode: {daemon:?} / {server:?}\n{example}"
        );
        blocks += 1;
        rest = &body[end..];
    }
    assert_eq!(blocks, 21, "one example per message type");

    let (mut up, mut down) = (0, 0);
    for line in doc.lines() {
        if let Some(frame) = line.strip_prefix("→ ") {
            let d = Side::Daemon.decode(frame);
            assert!(matches!(d, Ok(Some(_))), "{d:?}: {frame}");
            up += 1;
        } else if let Some(frame) = line.strip_prefix("← ") {
            let d = Side::Server.decode(frame);
            assert!(matches!(d, Ok(Some(_))), "{d:?}: {frame}");
            down += 1;
        }
    }
    assert!(
        up >= 10 && down >= 10,
        "example session: {up} up, {down} down"
    );
}

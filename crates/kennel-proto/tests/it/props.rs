//! Property tests of the frame decoders: whatever a peer sends (random bytes, random text, or
//! a golden fixture mutated at the byte or the JSON level) `decode_daemon_frame` and
//! `decode_server_frame` return without panicking, and every frame they accept re-encodes to
//! JSON that decodes to the same value. Each property runs a fixed number of cases so the
//! whole file stays within a few seconds in a debug build.

use std::fs;
use std::path::Path;

use kennel_proto::{decode_daemon_frame, decode_server_frame, Decoded, DEFAULT_MAX_FRAME_BYTES};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::Value;

/// Every golden fixture, both sides, as text; read once.
fn fixtures() -> &'static [String] {
    static ALL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ALL.get_or_init(read_fixtures)
}

fn read_fixtures() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for side in ["daemon", "server"] {
        let mut paths: Vec<_> = fs::read_dir(root.join(side))
            .expect("the fixtures directory is readable")
            .map(|e| e.expect("a fixture entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        for p in paths {
            out.push(fs::read_to_string(&p).expect("a readable fixture"));
        }
    }
    assert!(
        out.len() >= 10,
        "fixtures not found under {}",
        root.display()
    );
    out
}

/// A decoder's verdict must be stable: an accepted frame re-encodes, and the re-encoding
/// decodes to the same message. Rejections are fine; panics are not (proptest reports them).
fn check_both(frame: &str, max: usize) -> Result<(), TestCaseError> {
    if let Ok(d) = decode_daemon_frame(frame, max) {
        let again = match &d {
            Decoded::Known(m) => decode_daemon_frame(
                &serde_json::to_string(m).expect("an accepted message encodes"),
                usize::MAX,
            ),
            Decoded::Unknown { type_name } => decode_daemon_frame(
                &serde_json::json!({ "type": type_name }).to_string(),
                usize::MAX,
            ),
        };
        prop_assert_eq!(
            again.as_ref().ok(),
            Some(&d),
            "daemon frame {:?}: {:?}",
            frame,
            again
        );
    }
    if let Ok(d) = decode_server_frame(frame, max) {
        let again = match &d {
            Decoded::Known(m) => decode_server_frame(
                &serde_json::to_string(m).expect("an accepted message encodes"),
                usize::MAX,
            ),
            Decoded::Unknown { type_name } => decode_server_frame(
                &serde_json::json!({ "type": type_name }).to_string(),
                usize::MAX,
            ),
        };
        prop_assert_eq!(
            again.as_ref().ok(),
            Some(&d),
            "server frame {:?}: {:?}",
            frame,
            again
        );
    }
    Ok(())
}

/// Frame limits worth trying: tiny, small, the default.
fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![Just(64usize), Just(1024), Just(DEFAULT_MAX_FRAME_BYTES)]
}

/// Marker strings replaced, after serialising, by number literals `serde_json::Value` cannot
/// hold (out of range, too precise) so the decoder meets them as text.
const RAW_NUMBERS: &[&str] = &[
    "1e400",
    "-1e400",
    "18446744073709551616",
    "-9223372036854775809",
    "340282366920938463463374607431768211456",
    "0.000000000000000000000000000000000000000000000001",
    "4294967296",
    "-1",
    "1.5",
    "-0",
];

/// A JSON value to put where another was: other types, extreme numbers, long or odd strings,
/// deep nesting.
fn replacement() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![Just(u64::MAX), Just(u32::MAX as u64 + 1), Just(0)].prop_map(Value::from),
        (0..RAW_NUMBERS.len()).prop_map(|i| Value::String(format!("__raw_number_{i}__"))),
        any::<String>().prop_map(Value::String),
        (1usize..9000).prop_map(|n| Value::String("é".repeat(n / 2))),
        "[a-zA-Z0-9_./-]{0,80}".prop_map(Value::String),
        (1usize..300).prop_map(nested),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `depth` arrays inside each other: beyond serde_json's recursion limit from 128 on.
fn nested(depth: usize) -> Value {
    let mut v = Value::Null;
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

/// Paths to every value in `v`, the root included.
fn paths(v: &Value, here: Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let mut p = here.clone();
                p.push(PathStep::Key(k.clone()));
                paths(c, p, out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let mut p = here.clone();
                p.push(PathStep::Index(i));
                paths(c, p, out);
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match step {
            PathStep::Key(k) => cur.get_mut(k.as_str())?,
            PathStep::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// What to do to one fixture's JSON.
#[derive(Clone, Debug)]
enum JsonMutation {
    /// Put `Value` at the path picked by the index.
    Replace(usize, Value),
    /// Put a value of the same JSON type there (so the frame often stays valid): the string,
    /// or a number of the same kind, or the bool.
    Similar(usize, String, u64, i64, bool),
    /// Remove the member or element at the path picked by the index.
    Remove(usize),
    /// Add a member to the object at the path picked by the index.
    Add(usize, String, Value),
    /// Make the frame claim to be another message type.
    Retype(String),
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    let types = prop_oneof![
        Just("authenticate"),
        Just("heartbeat"),
        Just("taskOutput"),
        Just("taskComplete"),
        Just("capacity"),
        Just("spawnTask"),
        Just("ack"),
        Just("error"),
        Just("authenticated"),
        Just("sendMessage"),
    ]
    .prop_map(str::to_string);
    prop_oneof![
        3 => (any::<usize>(), replacement()).prop_map(|(i, v)| JsonMutation::Replace(i, v)),
        4 => (
            any::<usize>(),
            prop_oneof![any::<String>(), "[a-z0-9-]{0,70}", (0usize..5000).prop_map(|n| "z".repeat(n))],
            prop_oneof![any::<u64>(), 0u64..10, Just(u64::MAX), Just(u32::MAX as u64)],
            prop_oneof![any::<i64>(), -10i64..10, Just(i64::MIN)],
            any::<bool>(),
        )
            .prop_map(|(i, s, u, n, b)| JsonMutation::Similar(i, s, u, n, b)),
        1 => any::<usize>().prop_map(JsonMutation::Remove),
        1 => (any::<usize>(), "[a-zA-Z]{1,12}", replacement())
            .prop_map(|(i, k, v)| JsonMutation::Add(i, k, v)),
        1 => prop_oneof![types, any::<String>()].prop_map(JsonMutation::Retype),
    ]
}

fn apply(fixture: &str, mutations: &[JsonMutation]) -> String {
    let mut v: Value = serde_json::from_str(fixture).expect("fixtures are JSON");
    for m in mutations {
        let mut all = Vec::new();
        paths(&v, Vec::new(), &mut all);
        let pick = |i: usize| all[i % all.len()].clone();
        match m {
            JsonMutation::Replace(i, new) => {
                if let Some(slot) = at(&mut v, &pick(*i)) {
                    *slot = new.clone();
                }
            }
            JsonMutation::Similar(i, text, unsigned, signed, flag) => {
                if let Some(slot) = at(&mut v, &pick(*i)) {
                    let similar = match &*slot {
                        Value::String(_) => Value::String(text.clone()),
                        Value::Number(n) if n.is_u64() => Value::from(*unsigned),
                        Value::Number(n) if n.is_i64() => Value::from(*signed),
                        Value::Number(_) => Value::from(*signed as f64 / 3.0),
                        Value::Bool(_) => Value::Bool(*flag),
                        other => other.clone(),
                    };
                    *slot = similar;
                }
            }
            JsonMutation::Remove(i) => {
                let path = pick(*i);
                if let Some((last, parent)) = path.split_last() {
                    match (at(&mut v, parent), last) {
                        (Some(Value::Object(m)), PathStep::Key(k)) => {
                            m.remove(k);
                        }
                        (Some(Value::Array(a)), PathStep::Index(i)) if *i < a.len() => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            JsonMutation::Add(i, k, new) => {
                if let Some(Value::Object(m)) = at(&mut v, &pick(*i)) {
                    m.insert(k.clone(), new.clone());
                }
            }
            JsonMutation::Retype(t) => {
                if let Value::Object(m) = &mut v {
                    m.insert("type".into(), Value::String(t.clone()));
                }
            }
        }
    }
    let mut text = v.to_string();
    for (i, raw) in RAW_NUMBERS.iter().enumerate() {
        text = text.replace(&format!("\"__raw_number_{i}__\""), raw);
    }
    text
}

/// What to do to one fixture's bytes.
#[derive(Clone, Debug)]
enum ByteMutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Truncate(usize),
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, x)| ByteMutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteMutation::Insert(i, b)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| ByteMutation::Delete(i, n)),
        any::<usize>().prop_map(ByteMutation::Truncate),
    ]
}

fn mutate_bytes(fixture: &str, mutations: &[ByteMutation]) -> String {
    let mut b = fixture.as_bytes().to_vec();
    for m in mutations {
        let len = b.len().max(1);
        match *m {
            ByteMutation::Flip(i, x) if !b.is_empty() => b[i % len] ^= x,
            ByteMutation::Insert(i, byte) => b.insert(i % (b.len() + 1), byte),
            ByteMutation::Delete(i, n) if !b.is_empty() => {
                let at = i % len;
                b.drain(at..(at + n).min(b.len()));
            }
            ByteMutation::Truncate(i) => b.truncate(i % (b.len() + 1)),
            _ => {}
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        // Failures print their minimal input; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), max in limit()) {
        check_both(&String::from_utf8_lossy(&bytes), max)?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>(), max in limit()) {
        check_both(&text, max)?;
    }

    #[test]
    fn json_like_text_never_panics(
        text in r#"\{("[a-zA-Z]{0,12}":(-?[0-9]{1,30}(\.[0-9]{1,5})?(e[0-9]{1,4})?|"[^"]{0,20}"|true|null|\[|\{|\]|\})[,]?){0,8}\}?"#,
        max in limit(),
    ) {
        check_both(&text, max)?;
    }

    #[test]
    fn fixtures_mutated_as_json_decode_consistently(
        pick in any::<usize>(),
        mutations in prop::collection::vec(json_mutation(), 1..3),
        max in limit(),
    ) {
        let all = fixtures();
        let frame = apply(&all[pick % all.len()], &mutations);
        check_both(&frame, max)?;
    }

    #[test]
    fn fixtures_mutated_as_bytes_decode_consistently(
        pick in any::<usize>(),
        mutations in prop::collection::vec(byte_mutation(), 1..6),
    ) {
        let all = fixtures();
        let frame = mutate_bytes(&all[pick % all.len()], &mutations);
        check_both(&frame, DEFAULT_MAX_FRAME_BYTES)?;
    }
}

/// The unmutated fixtures pass the same check (the properties above start from them).
#[test]
fn every_fixture_decodes_consistently() {
    for f in fixtures() {
        check_both(f, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let v: Value = serde_json::from_str(f).unwrap();
        assert!(
            decode_daemon_frame(f, DEFAULT_MAX_FRAME_BYTES).is_ok()
                || decode_server_frame(f, DEFAULT_MAX_FRAME_BYTES).is_ok(),
            "{v}"
        );
    }
}

/// A number in a progress detail reaches the next hop exactly: the coordinator and the relay
/// re-encode what a daemon sent, and a float that moved by one unit in the last place would be a
/// changed report. The first four are ones serde_json's default parser reads back one unit off
/// unless its exact float parsing (`float_roundtrip`) is on.
#[test]
fn floats_in_a_detail_survive_decode_and_encode_exactly() {
    for f in [
        215492859907334.66_f64,
        2.9867642218664106e-10,
        1.7802719962921167e-19,
        -4.199010356643058e-19,
        5e-324,
        1.7976931348623157e308,
    ] {
        let frame = serde_json::json!({
            "type": "taskProgress", "taskId": "t-1", "attempt": 1, "seq": 1,
            "summary": "s", "detail": { "costUsd": f },
        })
        .to_string();
        let Ok(Decoded::Known(m)) = decode_daemon_frame(&frame, DEFAULT_MAX_FRAME_BYTES) else {
            panic!("a progress frame decodes: {frame}");
        };
        let again: Value = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(again["detail"]["costUsd"].as_f64(), Some(f), "{frame}");
    }
}

//! Identity extraction checked against a full `serde_json` parse, on generated documents
//! with nested-id traps, whitespace, key order, escapes and unicode, and on the samples.

mod reference;

use proptest::prelude::*;
use reference::{reference, serde_accepts, unambiguous};
use serde_json::Value;
use tandem_core::{LineKind, identify, validate};

/// Writes JSON with random whitespace and random `\u` escapes, keys in the given order.
fn pad(ws: &mut impl Iterator<Item = u8>, out: &mut String) {
    for _ in 0..ws.next().unwrap_or(0) % 3 {
        out.push([' ', '\t', '\n', '\r'][(ws.next().unwrap_or(0) % 4) as usize]);
    }
}

fn write(v: &Value, ws: &mut impl Iterator<Item = u8>, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push('{');
            for (i, (k, val)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pad(ws, out);
                string(k, out, i % 2 == 0);
                pad(ws, out);
                out.push(':');
                pad(ws, out);
                write(val, ws, out);
                pad(ws, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, val) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(val, ws, out);
            }
            out.push(']');
        }
        Value::String(s) => string(s, out, s.len() % 3 == 0),
        other => out.push_str(&other.to_string()),
    }
}

fn string(s: &str, out: &mut String, escape_some: bool) {
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if escape_some && i % 2 == 1 && (c as u32) < 0x10000 => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ]{0,20}",
        "\\PC{0,12}",
        Just("日本語のテキスト😋✨".to_owned()),
        Just("quote \" back \\ slash".to_owned()),
    ]
}

/// A nested object full of ids that must never be taken.
fn trap() -> impl Strategy<Value = Value> {
    (any::<u64>(), text()).prop_map(|(n, t)| {
        serde_json::json!({ "id": n, "id_str": n.to_string(), "text": t, "user": { "id_str": (n / 3).to_string(), "id": n / 3 }, "data": { "id": n.to_string() } })
    })
}

#[derive(Debug, Clone)]
enum Kind {
    Post(u64),
    PostNumericOnly(u64),
    ActivityStreams(u64),
    Like(u128),
    V2(u64),
    Delete(u64, u64),
    Unlike(u64, u64, u64),
    Info,
    NoId,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        any::<u64>().prop_map(Kind::Post),
        any::<u64>().prop_map(Kind::PostNumericOnly),
        any::<u64>().prop_map(Kind::ActivityStreams),
        any::<u128>().prop_map(Kind::Like),
        any::<u64>().prop_map(Kind::V2),
        (any::<u64>(), 0u64..u64::MAX / 2).prop_map(|(a, b)| Kind::Delete(a, b)),
        (any::<u64>(), any::<u64>(), 0u64..u64::MAX / 2)
            .prop_map(|(a, b, c)| Kind::Unlike(a, b, c)),
        Just(Kind::Info),
        Just(Kind::NoId),
    ]
}

fn document() -> impl Strategy<Value = (Kind, String)> {
    (kind(), prop::collection::vec((text(), trap()), 0..4), prop::collection::vec(any::<u8>(), 64), any::<bool>()).prop_map(|(k, extras, ws, id_first)| {
        let mut m = serde_json::Map::new();
        let put_extras = |m: &mut serde_json::Map<String, Value>| {
            for (i, (t, trap)) in extras.iter().enumerate() {
                m.insert(format!("retweeted_status{i}"), trap.clone());
                m.insert(format!("text{i}"), Value::from(t.clone()));
            }
        };
        if !id_first {
            put_extras(&mut m);
        }
        match &k {
            Kind::Post(n) => {
                m.insert("id".into(), Value::from(*n));
                m.insert("id_str".into(), Value::from(n.to_string()));
            }
            Kind::PostNumericOnly(n) => {
                m.insert("id".into(), Value::from(*n));
            }
            Kind::ActivityStreams(n) => {
                m.insert("id".into(), Value::from(format!("tag:search.twitter.com,2005:{n}")));
                m.insert("object".into(), serde_json::json!({ "id": format!("object:search.twitter.com,2005:{}", n / 2) }));
            }
            Kind::Like(n) => {
                m.insert("id".into(), Value::from(format!("{n:032x}")));
                m.insert("favorited_status".into(), serde_json::json!({ "id": 5, "id_str": "5" }));
            }
            Kind::V2(n) => {
                m.insert("data".into(), serde_json::json!({ "text": "x", "id": n.to_string(), "author_id": "7" }));
            }
            Kind::Delete(s, ts) => {
                m.insert("delete".into(), serde_json::json!({ "status": { "id": s, "id_str": s.to_string() }, "timestamp_ms": ts.to_string() }));
            }
            Kind::Unlike(t, u, ts) => {
                m.insert("delete".into(), serde_json::json!({ "favorite": { "tweet_id_str": t.to_string(), "user_id_str": u.to_string() }, "timestamp_ms": ts }));
            }
            Kind::Info => {
                m.insert("info".into(), serde_json::json!({ "message": "Recovery Request Completed" }));
            }
            Kind::NoId => {}
        }
        if id_first {
            put_extras(&mut m);
        }
        let mut out = String::new();
        write(&Value::Object(m), &mut ws.into_iter().cycle(), &mut out);
        (k, out)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// identify() agrees with the full parse, never takes a nested id, and validate()
    /// accepts every generated (valid) document.
    #[test]
    fn agrees_with_a_full_parse((k, doc) in document()) {
        let line = doc.as_bytes();
        prop_assert!(validate(line).is_ok(), "{doc}");
        let got = identify(line);
        match (&k, reference(line), got) {
            (Kind::Info, _, Ok(LineKind::System(_))) => {}
            (Kind::PostNumericOnly(_), None, Err(e)) => prop_assert_eq!(e.label(), "numeric_id_only"),
            (Kind::NoId, None, Err(e)) => prop_assert_eq!(e.label(), "missing_id"),
            (_, Some(Ok(want)), Ok(LineKind::Activity(id))) => prop_assert_eq!(id, want, "{}", doc),
            (_, Some(Err(())), Err(_)) => {}
            (k, r, g) => prop_assert!(false, "{:?}: reference {:?}, identify {:?}\n{}", k, r, g, doc),
        }
    }

    /// Arbitrary bytes never panic either function, and a line identify() accepts as a
    /// post, that also validates, has the id a full parse gives.
    #[test]
    fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let got = identify(&bytes);
        if validate(&bytes).is_ok() && unambiguous(&bytes) && let Ok(LineKind::Activity(id)) = got && let Some(Ok(want)) = reference(&bytes) {
            prop_assert_eq!(id, want);
        }
    }

    /// Truncating a valid line anywhere never yields a different id, and validation
    /// rejects every strict prefix.
    #[test]
    fn truncation_is_caught((_k, doc) in document(), cut in 0usize..1000) {
        let line = doc.as_bytes();
        let cut = cut % line.len().max(1);
        let prefix = &line[..cut];
        if prefix.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if let (Ok(LineKind::Activity(a)), Ok(LineKind::Activity(b))) = (identify(prefix), identify(line)) {
            prop_assert_eq!(a, b);
        }
        prop_assert!(validate(prefix).is_err(), "a strict prefix validated: {:?}", String::from_utf8_lossy(prefix));
    }
}

/// Where key order decides (a repeated key, two deciding keys; the upstream sends neither),
/// the first occurrence in document order wins, the same on every path.
#[test]
fn the_first_deciding_key_wins() {
    use tandem_core::ActivityId::Post;
    for (line, want) in [
        (r#"{"id_str":"1","id_str":"2"}"#, 1),
        (r#"{"id":"tag:search.twitter.com,2005:3","id_str":"4"}"#, 3),
        (r#"{"data":{"id":"5","id":"6"}}"#, 5),
        (r#"{"id":7,"id_str":"7"}"#, 7),
    ] {
        assert_eq!(
            identify(line.as_bytes()).unwrap(),
            LineKind::Activity(Post(want))
        );
        assert_eq!(unambiguous(line.as_bytes()), want == 7, "{line}");
    }
}

/// Every real sample agrees with the full parse.
#[test]
fn samples_agree_with_a_full_parse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../samples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            match (reference(line.as_bytes()), identify(line.as_bytes())) {
                (Some(Ok(want)), Ok(LineKind::Activity(id))) => {
                    assert_eq!(id, want, "{}", path.display())
                }
                (None, Ok(LineKind::System(_))) => {}
                (r, g) => panic!("{}: reference {r:?}, identify {g:?}", path.display()),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    /// validate() accepts exactly what serde_json accepts, on valid documents mutated by a
    /// flipped, deleted or inserted byte.
    #[test]
    fn validation_agrees_with_serde_json((_k, doc) in document(), at in 0usize..10_000, op in 0u8..3, byte in prop::sample::select(vec![b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'0', b'-', b'e', b'.', b' ', b'\n', 0x01, 0x7f, 0xc3, 0xff, b'u', b'x'])) {
        let mut line = doc.into_bytes();
        let at = at % line.len().max(1);
        match op {
            0 => line[at] = byte,
            1 => { line.remove(at); }
            _ => line.insert(at, byte),
        }
        prop_assert_eq!(validate(&line).is_ok(), serde_accepts(&line), "{:?}", String::from_utf8_lossy(&line));
    }

    /// ... and on arbitrary short byte strings built from JSON's alphabet.
    #[test]
    fn validation_agrees_on_json_alphabet(bytes in prop::collection::vec(prop::sample::select(b"{}[]\",:0123456789-+.eEtrufalsn \\/u\"ab".to_vec()), 0..40)) {
        prop_assert_eq!(validate(&bytes).is_ok(), serde_accepts(&bytes), "{:?}", String::from_utf8_lossy(&bytes));
    }
}

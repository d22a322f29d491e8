//! The reference the identity tests and the fuzz target (`fuzz/`) check against: the
//! rules of UPSTREAM.md §3 applied to a full `serde_json` parse, and `serde_json`'s verdict
//! on whether a line is JSON.

use serde_json::Value;
use tandem_core::ActivityId;

/// The reference: the identity rules of UPSTREAM.md §3 applied to a full parse.
pub(crate) fn reference(line: &[u8]) -> Option<Result<ActivityId, ()>> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let obj = v.as_object()?;
    let decimal = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    if let Some(s) = obj.get("id_str").and_then(Value::as_str) {
        return Some(decimal(s).map(ActivityId::Post).ok_or(()));
    }
    if let Some(s) = obj.get("id").and_then(Value::as_str) {
        if s.starts_with("tag:") {
            return Some(
                decimal(s.rsplit(':').next().unwrap_or_default())
                    .map(ActivityId::Post)
                    .ok_or(()),
            );
        }
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(Ok(ActivityId::Like(u128::from_str_radix(s, 16).unwrap())));
        }
        return Some(decimal(s).map(ActivityId::Post).ok_or(()));
    }
    if let Some(data) = obj.get("data") {
        return Some(
            data.get("id")
                .and_then(Value::as_str)
                .and_then(decimal)
                .map(ActivityId::Post)
                .ok_or(()),
        );
    }
    if let Some(d) = obj.get("delete") {
        let ts = d
            .get("timestamp_ms")
            .and_then(|t| t.as_str().and_then(decimal).or_else(|| t.as_u64()))?;
        if let Some(s) = d.get("status") {
            return Some(
                s.get("id_str")
                    .and_then(Value::as_str)
                    .and_then(decimal)
                    .map(|status| ActivityId::Delete {
                        status,
                        timestamp_ms: ts,
                    })
                    .ok_or(()),
            );
        }
        let f = d.get("favorite")?;
        let t = f
            .get("tweet_id_str")
            .and_then(Value::as_str)
            .and_then(decimal);
        let u = f
            .get("user_id_str")
            .and_then(Value::as_str)
            .and_then(decimal);
        return Some(match (t, u) {
            (Some(tweet), Some(user)) => Ok(ActivityId::Unlike {
                tweet,
                user,
                timestamp_ms: ts,
            }),
            _ => Err(()),
        });
    }
    None
}

/// The reference verdict on a whole line: UTF-8, and serde_json accepts it as one value
/// (its `IgnoredAny` skips strings without checking UTF-8, hence the first test).
pub(crate) fn serde_accepts(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

/// Whether the reference is defined for `line`: no object in it repeats a key (RFC 8259
/// leaves the meaning of a repeated name open; `identify` takes the first occurrence, a
/// `serde_json::Value` the last), and at most one top-level key decides the identity
/// (`identify` takes the first in document order, the reference has a fixed precedence).
/// A numeric `id` next to `id_str` is the ordinary native post and stays in. Lines a
/// `serde_json::Value` cannot represent are out too.
pub(crate) fn unambiguous(line: &[u8]) -> bool {
    let top = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(top)) => top,
        Ok(_) => return true,
        // Valid JSON that a `Value` cannot hold (a number beyond f64, such as 5e369).
        Err(_) => return false,
    };
    let deciding = top
        .iter()
        .filter(|(k, v)| match k.as_str() {
            "id" => !v.is_number(),
            "id_str" | "data" | "delete" | "info" | "warn" | "error" => true,
            _ => false,
        })
        .count();
    deciding <= 1 && serde_json::from_slice::<NoRepeatedKeys>(line).is_ok()
}

/// Deserializes any JSON value and fails on an object that repeats a key.
struct NoRepeatedKeys;

impl<'de> serde::Deserialize<'de> for NoRepeatedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoRepeatedKeysVisitor)
    }
}

struct NoRepeatedKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoRepeatedKeysVisitor {
    type Value = NoRepeatedKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value without repeated keys")
    }

    fn visit_bool<E>(self, _: bool) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_unit<E>(self) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<NoRepeatedKeys, A::Error> {
        while a.next_element::<NoRepeatedKeys>()?.is_some() {}
        Ok(NoRepeatedKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<NoRepeatedKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = a.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("repeated key {key:?}")));
            }
            a.next_value::<NoRepeatedKeys>()?;
        }
        Ok(NoRepeatedKeys)
    }
}

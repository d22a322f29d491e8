//! What a raw line is: an activity (and which one), a system message, or malformed input.
//!
//! [`identify`] walks the top-level object lazily and stops at the first identity-bearing
//! key, so a 4.7 KB post costs about as much as its first few keys. Nested objects
//! (`retweeted_status`, `user`, `favorited_status`, entities) are skipped as opaque values,
//! which is what keeps their `id`s from ever being taken.
//!
//! [`identify`] does not check the part of the line after the id. [`validate`] does, fully
//! and strictly (JSON grammar and UTF-8); the merger runs it only on a first copy, before
//! remembering the id, so a corrupted copy on one path never hides the intact copy on the
//! other.
//!
//! Precedence when several identity keys occur at the top level: the first one in document
//! order wins, except that a numeric `id` is only a fallback signal (see
//! [`IdentityError::UntrustedNumericId`]).

use serde::Deserialize;

use crate::ids::ActivityId;

/// The kind of a line that carried a top-level object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// An activity with its identity.
    Activity(ActivityId),
    /// An `info`, `warn` or `error` message from the service: never an activity.
    System(SystemMessage),
}

/// A message from the upstream service itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemMessage {
    /// Which top-level key carried it.
    pub kind: SystemKind,
    /// The `message` field, or the raw value when there is none.
    pub message: String,
}

/// The top-level key of a [`SystemMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemKind {
    Info,
    Warn,
    Error,
}

impl SystemKind {
    /// The label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SystemKind::Info => "info",
            SystemKind::Warn => "warn",
            SystemKind::Error => "error",
        }
    }
}

/// Why a line is not a usable activity. Each variant is a dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The line is not valid JSON (the parser's message says where).
    #[error("invalid json: {0}")]
    InvalidJson(String),
    /// The line is not valid UTF-8.
    #[error("invalid utf-8: {0}")]
    InvalidUtf8(String),
    /// No top-level key that identifies an activity or a system message.
    #[error("no top-level activity id (id_str, id, data.id or delete)")]
    MissingId,
    /// A post carried only its numeric `id`, which JSON tooling can round (see the samples'
    /// README); `id_str` is required.
    #[error("post has only a numeric id, which may be imprecise; id_str is required")]
    UntrustedNumericId,
    /// An identity field had a value that cannot be an id.
    #[error("bad id in {field}: {value:?}")]
    BadId { field: &'static str, value: String },
}

impl IdentityError {
    /// A short fixed label for metrics (`reason` label of dead-letter counters).
    pub fn label(&self) -> &'static str {
        match self {
            IdentityError::InvalidJson(_) => "invalid_json",
            IdentityError::InvalidUtf8(_) => "invalid_utf8",
            IdentityError::MissingId => "missing_id",
            IdentityError::UntrustedNumericId => "numeric_id_only",
            IdentityError::BadId { .. } => "bad_id",
        }
    }
}

/// Identifies a line (without its `\r\n`) by its top-level keys.
pub fn identify(line: &[u8]) -> Result<LineKind, IdentityError> {
    let mut scan = Scan { b: line, i: 0 };
    scan.ws();
    if scan.peek() != Some(b'{') {
        return Err(IdentityError::InvalidJson("not a json object".to_owned()));
    }
    scan.i += 1;
    let mut saw_numeric_id = false;
    let mut delete_waiting_for_time: Option<DeleteBody> = None;
    let mut top_level_time: Option<u64> = None;
    // X API v2 error objects (`{"errors":[…]}`): a system message unless the object also
    // carries an activity (`data` with partial errors).
    let mut v2_errors: Option<SystemMessage> = None;
    let mut first = true;
    loop {
        scan.ws();
        match scan.peek() {
            Some(b'}') => break,
            Some(b',') if !first => {
                scan.i += 1;
                scan.ws();
            }
            _ if first => {}
            _ => return Err(scan.error("expected ',' or '}'")),
        }
        first = false;
        let key = scan.key()?;
        let (start, end) = scan.value()?;
        let raw = &line[start..end];
        match key.as_ref() {
            "id_str" => return post_id(string_value(raw), raw, "id_str").map(LineKind::Activity),
            "id" => match raw.first() {
                Some(b'"') => return string_id(raw).map(LineKind::Activity),
                Some(b'-' | b'0'..=b'9') => saw_numeric_id = true,
                _ => return Err(bad_id("id", raw)),
            },
            "data" => {
                let id = nested_string(raw, "id").ok_or(IdentityError::MissingId)?;
                return post_id(Some(id), raw, "data.id").map(LineKind::Activity);
            }
            "delete" => {
                let body: DeleteBody =
                    serde_json::from_slice(raw).map_err(|e| IdentityError::BadId {
                        field: "delete",
                        value: e.to_string(),
                    })?;
                match body.timestamp_ms.or(top_level_time) {
                    Some(ts) => return body.identity(ts).map(LineKind::Activity),
                    None => delete_waiting_for_time = Some(body),
                }
            }
            "timestamp_ms" => {
                let ts = match string_value(raw) {
                    Some(s) => parse_decimal(&s),
                    None => std::str::from_utf8(raw).ok().and_then(parse_decimal),
                };
                if let (Some(ts), Some(body)) = (ts, delete_waiting_for_time.as_ref()) {
                    return body.identity(ts).map(LineKind::Activity);
                }
                top_level_time = ts;
            }
            "info" => return Ok(LineKind::System(system(SystemKind::Info, raw))),
            "warn" => return Ok(LineKind::System(system(SystemKind::Warn, raw))),
            "error" => return Ok(LineKind::System(system(SystemKind::Error, raw))),
            "errors" => v2_errors = Some(v2_error(raw)),
            _ => {}
        }
    }
    if let Some(errors) = v2_errors {
        return Ok(LineKind::System(errors));
    }
    if delete_waiting_for_time.is_some() {
        return Err(IdentityError::BadId {
            field: "delete",
            value: "no timestamp_ms".to_owned(),
        });
    }
    if saw_numeric_id {
        return Err(IdentityError::UntrustedNumericId);
    }
    Err(IdentityError::MissingId)
}

/// The creation time of an activity line (ms since the Unix epoch): the time in its id
/// (post snowflake, unlike and delete `timestamp_ms`), or a like's top-level
/// `timestamp_ms`. `None` for system and error messages, unparseable lines and
/// activities that carry no time: such lines never advance coverage.
pub fn content_time_ms(line: &[u8]) -> Option<u64> {
    match identify(line) {
        Ok(LineKind::Activity(ActivityId::Like(_))) => {
            let fields = top_level_fields(line).ok()?;
            let (_, range) = fields.iter().find(|(k, _)| k == "timestamp_ms")?;
            let raw = line.get(range.clone())?;
            let digits = raw
                .strip_prefix(b"\"")
                .and_then(|r| r.strip_suffix(b"\""))
                .unwrap_or(raw);
            std::str::from_utf8(digits).ok()?.parse().ok()
        }
        Ok(LineKind::Activity(id)) => id.created_unix_ms(),
        _ => None,
    }
}

/// The top-level keys of a JSON object with the byte range of each raw value, in document
/// order (non-validating, like [`identify`]).
pub fn top_level_fields(
    line: &[u8],
) -> Result<Vec<(String, std::ops::Range<usize>)>, IdentityError> {
    let mut scan = Scan { b: line, i: 0 };
    scan.ws();
    if scan.peek() != Some(b'{') {
        return Err(IdentityError::InvalidJson("not a json object".to_owned()));
    }
    scan.i += 1;
    let mut out = Vec::new();
    loop {
        scan.ws();
        match scan.peek() {
            Some(b'}') => return Ok(out),
            Some(b',') if !out.is_empty() => {
                scan.i += 1;
                scan.ws();
            }
            _ if out.is_empty() => {}
            _ => return Err(scan.error("expected ',' or '}'")),
        }
        let key = scan.key()?.into_owned();
        let (start, end) = scan.value()?;
        out.push((key, start..end));
    }
}

/// A non-validating walk over the top level of an object: keys are decoded, values are
/// skipped as raw byte ranges (strings to their closing quote, containers by depth).
/// Garbage gives an error, never a panic; strict checking is [`validate`]'s job.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn error(&self, what: &str) -> IdentityError {
        IdentityError::InvalidJson(format!("{what} at byte {}", self.i))
    }

    /// Skips a string starting at its opening quote; returns the index after the closing
    /// quote.
    fn skip_string(&mut self) -> Result<(), IdentityError> {
        self.i += 1;
        loop {
            let rest = &self.b[self.i..];
            let Some(pos) = memchr::memchr2(b'"', b'\\', rest) else {
                return Err(self.error("unterminated string"));
            };
            self.i += pos;
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Ok(());
            }
            self.i += 2; // an escape: the next byte can never end the string
            if self.i > self.b.len() {
                return Err(self.error("unterminated string"));
            }
        }
    }

    /// A key and its colon; the key decoded.
    fn key(&mut self) -> Result<std::borrow::Cow<'a, str>, IdentityError> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a key"));
        }
        let start = self.i;
        self.skip_string()?;
        let b: &'a [u8] = self.b;
        let raw = &b[start..self.i];
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.error("expected ':'"));
        }
        self.i += 1;
        self.ws();
        let inner = &raw[1..raw.len() - 1];
        if !inner.contains(&b'\\') {
            return std::str::from_utf8(inner)
                .map(std::borrow::Cow::Borrowed)
                .map_err(|e| IdentityError::InvalidUtf8(e.to_string()));
        }
        serde_json::from_slice::<String>(raw)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| IdentityError::InvalidJson(e.to_string()))
    }

    /// Skips one value; returns its raw byte range.
    fn value(&mut self) -> Result<(usize, usize), IdentityError> {
        let start = self.i;
        match self.peek() {
            Some(b'"') => self.skip_string()?,
            Some(open @ (b'{' | b'[')) => {
                // Only this container's own bracket pair counts (the other kind nests
                // inside it balanced); strings are skipped whole.
                let close = if open == b'{' { b'}' } else { b']' };
                let mut depth = 0usize;
                loop {
                    let Some(pos) = memchr::memchr3(b'"', open, close, &self.b[self.i..]) else {
                        return Err(self.error("unterminated value"));
                    };
                    self.i += pos;
                    match self.b[self.i] {
                        b'"' => self.skip_string()?,
                        c if c == open => {
                            depth += 1;
                            self.i += 1;
                        }
                        _ => {
                            depth -= 1;
                            self.i += 1;
                            if depth == 0 {
                                break;
                            }
                        }
                    }
                }
            }
            Some(_) => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(self.error("expected a value"));
                }
            }
            None => return Err(self.error("expected a value")),
        }
        Ok((start, self.i))
    }
}

/// The decoded text of a raw JSON string value, or `None` if it is not a string.
fn string_value(raw: &[u8]) -> Option<String> {
    if raw.first() != Some(&b'"') {
        return None;
    }
    let inner = &raw[1..raw.len().saturating_sub(1)];
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(str::to_owned);
    }
    serde_json::from_slice::<String>(raw).ok()
}

/// A top-level string field of a nested object (given raw), e.g. `data.id`.
fn nested_string(raw: &[u8], field: &str) -> Option<String> {
    let mut scan = Scan { b: raw, i: 0 };
    if scan.peek() != Some(b'{') {
        return None;
    }
    scan.i += 1;
    let mut first = true;
    loop {
        scan.ws();
        match scan.peek() {
            Some(b'}') | None => return None,
            Some(b',') if !first => {
                scan.i += 1;
                scan.ws();
            }
            _ if first => {}
            _ => return None,
        }
        first = false;
        let key = scan.key().ok()?.into_owned();
        let (s, e) = scan.value().ok()?;
        if key == field {
            return string_value(&raw[s..e]);
        }
    }
}

/// Checks the whole line strictly: JSON grammar, a single value, and UTF-8.
pub fn validate(line: &[u8]) -> Result<(), IdentityError> {
    crate::validate::json(line)
}

fn bad_id(field: &'static str, raw: &[u8]) -> IdentityError {
    // At most 64 characters of the offending value (a byte cut could split a character).
    let value = String::from_utf8_lossy(raw).chars().take(64).collect();
    IdentityError::BadId { field, value }
}

fn post_id(
    text: Option<String>,
    raw: &[u8],
    field: &'static str,
) -> Result<ActivityId, IdentityError> {
    text.as_deref()
        .and_then(parse_decimal)
        .map(ActivityId::Post)
        .ok_or_else(|| bad_id(field, raw))
}

/// A top-level string `id`: Activity Streams (`tag:…:<n>`), a like (32 hex digits), or a
/// decimal post id.
fn string_id(raw: &[u8]) -> Result<ActivityId, IdentityError> {
    let text = string_value(raw).ok_or_else(|| bad_id("id", raw))?;
    if text.starts_with("tag:") {
        let tail = text.rsplit(':').next().unwrap_or_default();
        return parse_decimal(tail)
            .map(ActivityId::Post)
            .ok_or_else(|| bad_id("id", raw));
    }
    if text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return u128::from_str_radix(&text, 16)
            .map(ActivityId::Like)
            .map_err(|_| bad_id("id", raw));
    }
    parse_decimal(&text)
        .map(ActivityId::Post)
        .ok_or_else(|| bad_id("id", raw))
}

/// Strict decimal: digits only, no sign, no leading `+`, fits in 64 bits.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn system(kind: SystemKind, raw: &[u8]) -> SystemMessage {
    let message =
        nested_string(raw, "message").unwrap_or_else(|| String::from_utf8_lossy(raw).into_owned());
    SystemMessage { kind, message }
}

/// The message of an X API v2 error object: the first error's title and detail (and its
/// disconnect type or connection issue, which say why a stream ended).
fn v2_error(raw: &[u8]) -> SystemMessage {
    #[derive(Deserialize)]
    struct V2Error {
        title: Option<String>,
        detail: Option<String>,
        disconnect_type: Option<String>,
        connection_issue: Option<String>,
    }
    let message = match serde_json::from_slice::<Vec<V2Error>>(raw) {
        Ok(errors) if !errors.is_empty() => {
            let e = &errors[0];
            let parts: Vec<&str> = [&e.title, &e.disconnect_type, &e.connection_issue, &e.detail]
                .into_iter()
                .filter_map(|p| p.as_deref())
                .collect();
            let mut text = parts.join(": ");
            if errors.len() > 1 {
                text.push_str(&format!(" (and {} more)", errors.len() - 1));
            }
            text
        }
        _ => String::from_utf8_lossy(raw).into_owned(),
    };
    SystemMessage {
        kind: SystemKind::Error,
        message,
    }
}

/// The body of `{"delete": …}`: a post deletion (`status`) or an unlike (`favorite`).
#[derive(Debug, Deserialize)]
struct DeleteBody {
    status: Option<DeletedStatus>,
    favorite: Option<DeletedFavorite>,
    #[serde(default, deserialize_with = "number_or_string")]
    timestamp_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct DeletedStatus {
    id_str: String,
}

#[derive(Debug, Deserialize)]
struct DeletedFavorite {
    tweet_id_str: String,
    user_id_str: String,
}

impl DeleteBody {
    fn identity(&self, timestamp_ms: u64) -> Result<ActivityId, IdentityError> {
        let bad = |field: &'static str, v: &str| IdentityError::BadId {
            field,
            value: v.to_owned(),
        };
        match (&self.status, &self.favorite) {
            (Some(status), None) => Ok(ActivityId::Delete {
                status: parse_decimal(&status.id_str)
                    .ok_or_else(|| bad("delete.status.id_str", &status.id_str))?,
                timestamp_ms,
            }),
            (None, Some(fav)) => Ok(ActivityId::Unlike {
                tweet: parse_decimal(&fav.tweet_id_str)
                    .ok_or_else(|| bad("delete.favorite.tweet_id_str", &fav.tweet_id_str))?,
                user: parse_decimal(&fav.user_id_str)
                    .ok_or_else(|| bad("delete.favorite.user_id_str", &fav.user_id_str))?,
                timestamp_ms,
            }),
            _ => Err(bad("delete", "neither status nor favorite")),
        }
    }
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Num(u64),
        Text(String),
    }
    match Option::<Either>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Num(n)) => Ok(Some(n)),
        Some(Either::Text(t)) => parse_decimal(&t)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("timestamp_ms {t:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../samples");

    /// Only real creation times count as content time: a post's snowflake, a like's
    /// `timestamp_ms` (its id carries none), an unlike's; never a system message or a
    /// line that does not parse.
    #[test]
    fn content_time_is_a_creation_time_or_nothing() {
        let post = br#"{"id":804451830033948672,"id_str":"804451830033948672","text":"x"}"#;
        assert_eq!(content_time_ms(post), Some(1_480_631_236_929));
        let like = br#"{"id":"43560406e0ad9f68374445f5f30c33fc","timestamp_ms":1480631259353}"#;
        assert_eq!(content_time_ms(like), Some(1_480_631_259_353));
        let quoted = br#"{"id":"43560406e0ad9f68374445f5f30c33fc","timestamp_ms":"1480631259353"}"#;
        assert_eq!(content_time_ms(quoted), Some(1_480_631_259_353));
        let undated_like = br#"{"id":"43560406e0ad9f68374445f5f30c33fc"}"#;
        assert_eq!(content_time_ms(undated_like), None);
        let unlike = br#"{"delete":{"favorite":{"tweet_id_str":"1","user_id_str":"2"},"timestamp_ms":"1480631260000"}}"#;
        assert_eq!(content_time_ms(unlike), Some(1_480_631_260_000));
        assert_eq!(
            content_time_ms(br#"{"info":{"message":"Replay Request Completed"}}"#),
            None
        );
        assert_eq!(
            content_time_ms(br#"{"error":{"message":"Forced Disconnect"}}"#),
            None
        );
        assert_eq!(content_time_ms(b"{not json"), None);
    }

    /// Found by the fuzzer: a bad id whose 64th byte falls inside a character panicked
    /// while being quoted in the error.
    #[test]
    fn bad_id_with_a_long_multibyte_value_is_an_error() {
        let line = format!("{{\"data\":{{\"id\":\"{}éé\"}}}}", "1".repeat(63));
        match identify(line.as_bytes()) {
            Err(IdentityError::BadId { value, .. }) => assert_eq!(value.chars().count(), 64),
            other => panic!("{other:?}"),
        }
    }

    fn sample(name: &str) -> Vec<u8> {
        let text = std::fs::read(format!("{SAMPLES}/{name}")).unwrap();
        text.strip_suffix(b"\r\n").unwrap_or(&text).to_vec()
    }

    /// Every sample type yields the identity the upstream documents for it.
    #[test]
    fn samples_have_documented_identities() {
        assert_eq!(
            identify(&sample("activity-streams-post.json")),
            Ok(LineKind::Activity(ActivityId::Post(
                804_451_830_033_948_672
            )))
        );
        assert_eq!(
            identify(&sample("like.json")),
            Ok(LineKind::Activity(ActivityId::Like(
                0x4356_0406_e0ad_9f68_3744_45f5_f30c_33fc
            )))
        );
        assert_eq!(
            identify(&sample("unlike.json")),
            Ok(LineKind::Activity(ActivityId::Unlike {
                tweet: 696_615_514_970_279_937,
                user: 2_510_287_578,
                timestamp_ms: 1_480_437_031_205
            }))
        );
        assert_eq!(
            identify(&sample("post-delete.json")),
            Ok(LineKind::Activity(ActivityId::Delete {
                status: 1_067_094_924_124_872_705,
                timestamp_ms: 1_543_434_512_345
            }))
        );
        assert_eq!(
            identify(&sample("v2-post.json")),
            Ok(LineKind::Activity(ActivityId::Post(
                1_067_094_924_124_872_705
            )))
        );
    }

    /// Native posts use `id_str`, never the rounded number in front of it.
    #[test]
    fn native_posts_use_id_str() {
        let text = std::fs::read_to_string(format!("{SAMPLES}/native-posts.ndjson")).unwrap();
        let first = text.lines().next().unwrap();
        assert_eq!(
            identify(first.as_bytes()),
            Ok(LineKind::Activity(ActivityId::Post(
                505_874_924_095_815_681
            )))
        );
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            let Ok(LineKind::Activity(id)) = identify(line.as_bytes()) else {
                panic!("no identity in {line:.80}");
            };
            assert!(seen.insert(id), "duplicate id {id}");
            assert_eq!(validate(line.as_bytes()), Ok(()));
        }
        assert_eq!(seen.len(), 100);
    }

    /// Info and error messages are system messages with their text.
    #[test]
    fn system_messages() {
        let text = std::fs::read_to_string(format!("{SAMPLES}/system-messages.ndjson")).unwrap();
        let kinds: Vec<_> = text
            .lines()
            .map(|l| match identify(l.as_bytes()) {
                Ok(LineKind::System(m)) => (m.kind, m.message),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds[0],
            (SystemKind::Info, "Recovery Request Completed".into())
        );
        assert_eq!(kinds[1].0, SystemKind::Error);
        assert!(kinds[1].1.contains("maximum number of connections"));
    }

    /// X API v2 error objects are system errors; a payload with partial errors stays an
    /// activity.
    #[test]
    fn v2_error_objects() {
        let op = br#"{"errors":[{"title":"operational-disconnect","disconnect_type":"OperationalDisconnect","detail":"This stream has been disconnected for operational reasons.","type":"https://api.twitter.com/2/problems/operational-disconnect"}]}"#;
        match identify(op) {
            Ok(LineKind::System(m)) => {
                assert_eq!(m.kind, SystemKind::Error);
                assert!(m.message.contains("OperationalDisconnect"), "{}", m.message);
            }
            other => panic!("{other:?}"),
        }
        let partial = br#"{"data":{"id":"1067094924124872705","text":"x"},"errors":[{"title":"Not Found Error"}]}"#;
        assert!(matches!(identify(partial), Ok(LineKind::Activity(_))));
        let errors_first =
            br#"{"errors":[{"title":"Not Found Error"}],"data":{"id":"1067094924124872705"}}"#;
        assert!(matches!(identify(errors_first), Ok(LineKind::Activity(_))));
    }

    /// Malformed input is an error with a reason, never a panic or a wrong id.
    #[test]
    fn malformed_lines() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "invalid_json"),
            (b"[1,2]", "invalid_json"),
            (b"{\"text\":\"no id\"}", "missing_id"),
            (b"{\"id\":505874924095815700}", "numeric_id_only"),
            (b"{\"id_str\":\"12a\"}", "bad_id"),
            (b"{\"id_str\":-5}", "bad_id"),
            (b"{\"data\":{\"text\":\"x\"}}", "missing_id"),
            (b"{\"delete\":{\"status\":{\"id_str\":\"1\"}}}", "bad_id"),
            (b"", "invalid_json"),
        ];
        for (line, label) in cases {
            let got = identify(line).expect_err(&String::from_utf8_lossy(line));
            assert_eq!(got.label(), *label, "{}", String::from_utf8_lossy(line));
        }
    }

    /// A nested id never stands in for a missing top-level one.
    #[test]
    fn nested_ids_are_never_taken() {
        let line =
            br#"{"user":{"id_str":"1","id":1},"retweeted_status":{"id_str":"2"},"text":"x"}"#;
        assert_eq!(identify(line), Err(IdentityError::MissingId));
        let line = br#"{"user":{"id_str":"1"},"id_str":"3"}"#;
        assert_eq!(identify(line), Ok(LineKind::Activity(ActivityId::Post(3))));
    }

    /// Identification tolerates a broken tail; validation does not.
    #[test]
    fn validation_catches_what_identification_skips() {
        let truncated = br#"{"id_str":"42","text":"cut he"#;
        assert_eq!(
            identify(truncated),
            Ok(LineKind::Activity(ActivityId::Post(42)))
        );
        assert_eq!(validate(truncated).unwrap_err().label(), "invalid_json");
        let bad_utf8 = b"{\"id_str\":\"42\",\"text\":\"\xff\xfe\"}";
        assert_eq!(validate(bad_utf8).unwrap_err().label(), "invalid_utf8");
        assert_eq!(
            validate(br#"{"a":1} {"b":2}"#).unwrap_err().label(),
            "invalid_json"
        );
    }

    /// Escaped keys and whitespace are read as JSON defines them.
    #[test]
    fn escapes_and_whitespace() {
        let line = br#"  { "id\u005fstr" : "77" , "x": [ ] }"#;
        assert_eq!(identify(line), Ok(LineKind::Activity(ActivityId::Post(77))));
    }
}

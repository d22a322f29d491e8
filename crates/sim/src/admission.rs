//! Admission of a stream request: every check the upstream makes before it streams, in its
//! order. Injected rejections and the connect-rate limit come first (a request to a live
//! endpoint counts against the connect window even when it is refused later), then
//! credentials, compression, the query parameters (including which endpoint serves what:
//! Gnip recovery only on the recovery host, Gnip live streams only on the live host), and
//! for recovery the account's job slots.

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tandem_core::time::parse_rfc3339;

use crate::config::{Api, Content, StreamConfig};
use crate::http::json_error;
use crate::state::{Shared, StreamState};

/// The host a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// The live host: every stream, v2 recovery, the admin API.
    Live,
    /// The Gnip recovery host: Gnip recovery requests only.
    Recovery,
}

/// What admission settled for an accepted request.
#[derive(Debug)]
pub(crate) struct Admission {
    pub partition: u32,
    /// The client takes gzip (always so on Gnip, which refuses clients that do not).
    pub gzip: bool,
    /// Minutes to replay before going live (0: none).
    pub backfill_minutes: u64,
    /// The `[start, end)` creation-time range of a recovery request; `None` for live.
    pub range: Option<(u64, u64)>,
}

/// A refused request: the status and the message of its JSON error body.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
    /// The limit and the reset time (Unix seconds) a v2 stream reports with its 429.
    rate_limit: Option<(u64, u64)>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            rate_limit: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = json_error(self.status, &self.message);
        if let Some((limit, reset_secs)) = self.rate_limit {
            let h = resp.headers_mut();
            h.insert("x-rate-limit-limit", HeaderValue::from(limit));
            h.insert("x-rate-limit-remaining", HeaderValue::from(0u64));
            h.insert("x-rate-limit-reset", HeaderValue::from(reset_secs));
        }
        resp
    }
}

/// Runs the checks in the upstream's order. An admitted recovery request holds one of its
/// account's job slots, which its writer gives back when it ends.
pub(crate) fn admit(
    shared: &Shared,
    stream: &StreamState,
    endpoint: Endpoint,
    uri: &Uri,
    headers: &HeaderMap,
    now_ms: u64,
) -> Result<Admission, Refusal> {
    let cfg = &stream.cfg;
    let v2 = cfg.is_v2();
    let q = StreamQuery::parse(uri, v2);
    let has_range = q.start.is_some() || q.end.is_some();
    // v2 keeps recovery on its live endpoint; Gnip serves it on the recovery host only.
    let recovery = match endpoint {
        Endpoint::Recovery => true,
        Endpoint::Live => v2 && has_range,
    };
    // An unpartitioned stream serves everything as partition 1: a rejection aimed at
    // partition 1 applies to it.
    let partition_hint = match &cfg.api {
        Api::V2 {
            partitioned: false, ..
        } => Some(1),
        _ => q.partition.as_deref().and_then(|p| p.parse().ok()),
    };
    if recovery {
        injected_rejection(stream, partition_hint, now_ms)?;
    } else {
        connect_rate(stream, partition_hint, now_ms, v2)?;
    }
    if !authorized(
        &cfg.api,
        &stream.secret.lock().expect("secret lock"),
        headers,
    ) {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: the credentials were not accepted",
        ));
    }
    let gzip = accepts_gzip(headers);
    if !gzip && !v2 {
        return Err(Refusal::new(
            StatusCode::NOT_ACCEPTABLE,
            "This connection requires compression. Send the header 'Accept-Encoding: gzip' and decompress the stream as it is read.",
        ));
    }
    if let Some(message) = &q.malformed {
        return Err(Refusal::bad_request(message.clone()));
    }
    if !v2 {
        match (endpoint, has_range) {
            (Endpoint::Live, true) => {
                return Err(Refusal::bad_request(
                    "startTime and endTime are not accepted on the live stream: recovery is served on the recovery endpoint",
                ));
            }
            (Endpoint::Recovery, false) => {
                return Err(Refusal::bad_request(
                    "this is the recovery endpoint: a request needs startTime and endTime; the live stream is served on the live endpoint",
                ));
            }
            _ => {}
        }
    }
    let partition = partition(cfg, q.partition.as_deref())?;
    let backfill_minutes = backfill_minutes(cfg, q.backfill.as_deref(), v2)?;
    let range = if recovery {
        let range = recovery_range(cfg, &q, backfill_minutes, now_ms)?;
        reserve_recovery_job(shared, stream)?;
        Some(range)
    } else {
        None
    };
    Ok(Admission {
        partition,
        gzip,
        backfill_minutes,
        range,
    })
}

/// A live request: counted in the connect window, then injected rejections, then the
/// connect-rate limit (429; on v2 with the `x-rate-limit-*` headers).
fn connect_rate(
    stream: &StreamState,
    partition_hint: Option<u32>,
    now_ms: u64,
    v2: bool,
) -> Result<(), Refusal> {
    let cfg = &stream.cfg;
    let before = stream.record_request(now_ms);
    injected_rejection(stream, partition_hint, now_ms)?;
    if before < cfg.connect_limit {
        return Ok(());
    }
    let mut refusal = Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "This stream has exceeded its connection request limit of {} per {} s",
            cfg.connect_limit,
            cfg.connect_window_ms / 1000
        ),
    );
    if v2 {
        let reset_secs = stream.window_reset_ms().div_ceil(1000);
        refusal.rate_limit = Some((cfg.connect_limit as u64, reset_secs));
    }
    Err(refusal)
}

/// The status a `reject` fault forces on this request, if one applies.
fn injected_rejection(
    stream: &StreamState,
    partition_hint: Option<u32>,
    now_ms: u64,
) -> Result<(), Refusal> {
    match stream.forced_status(partition_hint, now_ms) {
        None => Ok(()),
        Some(status) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            Err(Refusal::new(code, format!("simulated {status}")))
        }
    }
}

/// The partition asked for: required on partitioned streams; an unpartitioned stream
/// serves everything as partition 1.
fn partition(cfg: &StreamConfig, asked: Option<&str>) -> Result<u32, Refusal> {
    let partitioned = match &cfg.api {
        Api::Gnip { .. } => true,
        Api::V2 { partitioned, .. } => *partitioned,
    };
    if !partitioned {
        return Ok(1);
    }
    match asked.map(str::parse::<u32>) {
        Some(Ok(p)) if (1..=cfg.partitions).contains(&p) => Ok(p),
        Some(_) => Err(Refusal::bad_request(format!(
            "partition must be a number from 1 to {}",
            cfg.partitions
        ))),
        None => Err(Refusal::bad_request("the partition parameter is required")),
    }
}

/// Backfill minutes: 1 to the maximum (v2 also takes 0); absent means none.
fn backfill_minutes(cfg: &StreamConfig, asked: Option<&str>, v2: bool) -> Result<u64, Refusal> {
    let max_backfill = cfg.max_backfill_minutes;
    match asked.map(str::parse::<u64>) {
        None => Ok(0),
        Some(Ok(m)) if (1..=max_backfill).contains(&m) || (v2 && m == 0) => Ok(m),
        Some(_) => Err(Refusal::bad_request(format!(
            "backfill minutes must be an integer from 1 to {max_backfill}"
        ))),
    }
}

/// The time range of a recovery request, checked in the order the messages document.
fn recovery_range(
    cfg: &StreamConfig,
    q: &StreamQuery,
    backfill_minutes: u64,
    now_ms: u64,
) -> Result<(u64, u64), Refusal> {
    let bad = |message: &str| Err(Refusal::bad_request(message));
    let (Some(start), Some(end)) = (q.start.as_deref(), q.end.as_deref()) else {
        return bad("recovery needs both a start time and an end time");
    };
    let (Some(start_ms), Some(end_ms)) = (parse_rfc3339(start), parse_rfc3339(end)) else {
        return bad("start and end times must be RFC 3339 UTC, e.g. 2023-07-05T17:09:12.070Z");
    };
    if start_ms >= end_ms {
        return bad("the start time must be before the end time");
    }
    if start_ms < now_ms.saturating_sub(cfg.retention_ms) {
        return bad("the start time is outside the recovery retention window");
    }
    if backfill_minutes > 0 {
        return bad("backfill and recovery cannot be combined");
    }
    if cfg.content == Content::Likes {
        return bad("recovery is not available for likes streams");
    }
    Ok((start_ms, end_ms))
}

/// Takes one of the account's recovery job slots, or refuses with 429 when all are taken.
fn reserve_recovery_job(shared: &Shared, stream: &StreamState) -> Result<(), Refusal> {
    let cfg = &stream.cfg;
    let mut jobs = shared.recovery_jobs.lock().expect("jobs lock");
    let running = jobs.entry(cfg.account()).or_default();
    if *running >= cfg.max_recovery_jobs {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "at most {} recovery jobs may run at once",
                cfg.max_recovery_jobs
            ),
        ));
    }
    *running += 1;
    stream.stats.lock().expect("stats lock").recovery_jobs += 1;
    Ok(())
}

/// The query parameters of a stream request, in either API's spelling. Parameters the
/// simulator does not know (a v2 client's `tweet.fields`, `expansions`, …) are ignored.
#[derive(Debug, Default)]
struct StreamQuery {
    partition: Option<String>,
    backfill: Option<String>,
    start: Option<String>,
    end: Option<String>,
    /// Why the query cannot be read, naming the parameter: a second `?`, as a client that
    /// appends `?partition=…` to a URL with its own query produces.
    malformed: Option<String>,
}

impl StreamQuery {
    fn parse(uri: &Uri, v2: bool) -> StreamQuery {
        let mut q = StreamQuery::default();
        for pair in uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            // (choice) A literal `?` is legal in a query, but no parameter of these APIs
            // holds one: a second `?` is a client that joined parameters wrongly, and
            // reading `a=1?partition=2` as `a` = `1?partition=2` would hide that.
            if let Some((before, after)) = pair.split_once('?') {
                if q.malformed.is_none() {
                    let param = before.split_once('=').map_or(before, |(k, _)| k);
                    let next = after.split_once('=').map_or(after, |(k, _)| k);
                    q.malformed = Some(format!(
                        "malformed query: a second '?' hides parameter {:?} in the value of {:?}; separate query parameters with '&'",
                        percent_decode(next),
                        percent_decode(param),
                    ));
                }
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match (k, v2) {
                ("partition", _) => q.partition = Some(v),
                ("backfillMinutes", false) | ("backfill_minutes", true) => q.backfill = Some(v),
                ("startTime", false) | ("start_time", true) => q.start = Some(v),
                ("endTime", false) | ("end_time", true) => q.end = Some(v),
                _ => {}
            }
        }
        q
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the request carries the stream's credentials; `secret` is the password or
/// token accepted now (it can be rotated at runtime).
fn authorized(api: &Api, secret: &str, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match api {
        Api::Gnip { username, .. } => value
            .strip_prefix("Basic ")
            .and_then(|b64| decode_base64(b64.trim()))
            .is_some_and(|decoded| decoded == format!("{username}:{secret}").as_bytes()),
        Api::V2 { .. } => value
            .strip_prefix("Bearer ")
            .is_some_and(|t| t.trim() == secret),
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let zero_q = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !zero_q
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Basic credentials decode as RFC 4648 base64.
    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert!(decode_base64("!!").is_none());
    }

    /// gzip is accepted unless refused with q=0.
    #[test]
    fn accept_encoding() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("deflate, gzip;q=0.5"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
    }

    /// Query values are percent-decoded (times carry `:`).
    #[test]
    fn query_decoding() {
        let uri: Uri = "/x?partition=2&startTime=2023-07-05T17%3A09%3A12.070Z&backfillMinutes=3"
            .parse()
            .unwrap();
        let q = StreamQuery::parse(&uri, false);
        assert_eq!(q.partition.as_deref(), Some("2"));
        assert_eq!(q.start.as_deref(), Some("2023-07-05T17:09:12.070Z"));
        assert_eq!(q.backfill.as_deref(), Some("3"));
        assert!(q.malformed.is_none());
    }

    /// A v2 client's own parameters are ignored, the known ones read in either order.
    #[test]
    fn client_parameters_are_ignored() {
        let uri: Uri = "/2/tweets/sample10/stream?tweet.fields=created_at,author_id&expansions=author_id&partition=2&backfill_minutes=1"
            .parse()
            .unwrap();
        let q = StreamQuery::parse(&uri, true);
        assert_eq!(q.partition.as_deref(), Some("2"));
        assert_eq!(q.backfill.as_deref(), Some("1"));
        assert!(q.malformed.is_none());
    }

    /// A second `?` is refused, naming the parameter it hides, wherever it appears.
    #[test]
    fn second_question_mark_is_malformed() {
        for (query, named) in [
            ("/x?a=1?partition=1", "\"partition\""),
            (
                "/x?tweet.fields=created_at?backfill_minutes=2",
                "\"backfill_minutes\"",
            ),
            ("/x?partition=1?backfillMinutes=2", "\"backfillMinutes\""),
        ] {
            let uri: Uri = query.parse().unwrap();
            let q = StreamQuery::parse(&uri, false);
            let message = q
                .malformed
                .unwrap_or_else(|| panic!("{query} was accepted"));
            assert!(message.contains(named), "{query}: {message}");
        }
    }
}

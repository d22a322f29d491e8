//! The HTTP side: the listener (plain or TLS), the stream endpoints with the upstream's
//! status codes, and the admin API.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use bytes::Bytes;
use serde::Deserialize;
use tandem_core::time::{parse_rfc3339, unix_ms_now};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{Api, RateProfile};
use crate::encode::Encoder;
use crate::fault::{Control, Fault};
use crate::state::{ConnEntry, ConnectionKind, Shared, StreamState};
use crate::writer::Writer;

/// The client address of a request, on plain and TLS connections alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// A plain or TLS connection.
#[derive(Debug)]
pub(crate) enum SimIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for SimIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SimIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            SimIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SimIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            SimIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SimIo::Plain(s) => Pin::new(s).poll_flush(cx),
            SimIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SimIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            SimIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes in their own tasks, so that a
/// client that never finishes its handshake cannot hold up the others.
#[derive(Debug)]
pub(crate) struct SimListener {
    rx: mpsc::Receiver<(SimIo, SocketAddr)>,
    local: SocketAddr,
}

impl SimListener {
    pub(crate) fn spawn(tcp: TcpListener, tls: Option<TlsAcceptor>) -> io::Result<SimListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let tx = tx.clone();
                match &tls {
                    None => {
                        if tx.send((SimIo::Plain(stream), peer)).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let hs = tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(stream),
                            )
                            .await;
                            match hs {
                                Ok(Ok(s)) => {
                                    let _ = tx.send((SimIo::Tls(Box::new(s)), peer)).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "tls handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                            }
                        });
                    }
                }
            }
        });
        Ok(SimListener { rx, local })
    }
}

impl Listener for SimListener {
    type Io = SimIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (SimIo, SocketAddr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task is gone: park this listener forever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, SimListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// A response body fed by a writer task.
#[derive(Debug)]
struct ChannelBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(http_body::Frame::data)))
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/admin/connections", get(admin_connections))
        .route("/admin/stats", get(admin_stats))
        .route("/admin/faults", post(admin_fault))
        .route("/admin/publish", post(admin_publish))
        .route("/admin/truth", get(admin_truth))
        .route("/admin/rate", post(admin_rate))
        .fallback(stream_request)
        .with_state(shared)
}

fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "message": message } }).to_string();
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// The query parameters of a stream request, in either API's spelling.
#[derive(Debug, Default)]
struct StreamQuery {
    partition: Option<String>,
    backfill: Option<String>,
    start: Option<String>,
    end: Option<String>,
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

fn authorized(api: &Api, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match api {
        Api::Gnip {
            username, password, ..
        } => value
            .strip_prefix("Basic ")
            .and_then(|b64| decode_base64(b64.trim()))
            .is_some_and(|decoded| decoded == format!("{username}:{password}").as_bytes()),
        Api::V2 { bearer_token, .. } => value
            .strip_prefix("Bearer ")
            .is_some_and(|t| t.trim() == bearer_token),
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

async fn stream_request(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(stream) = shared
        .streams
        .iter()
        .find(|s| s.cfg.url_path() == uri.path())
        .cloned()
    else {
        return json_error(StatusCode::NOT_FOUND, "no such stream");
    };
    if method != Method::GET {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "streams are read with GET");
    }
    let resp = serve_stream(&shared, &stream, client, &uri, &headers);
    stream.count_response(resp.status().as_u16());
    if !resp.status().is_success() {
        tracing::info!(stream = %stream.cfg.name, %client, status = resp.status().as_u16(), "simulator refused a connection");
    }
    resp
}

fn serve_stream(
    shared: &Arc<Shared>,
    stream: &Arc<StreamState>,
    client: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let v2 = matches!(stream.cfg.api, Api::V2 { .. });
    let cfg = &stream.cfg;
    let q = StreamQuery::parse(uri, v2);
    let now = unix_ms_now();
    let recovery = q.start.is_some() || q.end.is_some();
    let partition_hint = q.partition.as_deref().and_then(|p| p.parse().ok());

    if !recovery {
        let before = stream.record_request(now);
        if let Some(status) = stream.forced_status(partition_hint, now) {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return json_error(code, &format!("simulated {status}"));
        }
        if before >= cfg.connect_limit {
            let mut resp = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "This stream has exceeded its connection request limit of {} per {} s",
                    cfg.connect_limit,
                    cfg.connect_window_ms / 1000
                ),
            );
            if v2 {
                let reset_secs = stream.window_reset_ms().div_ceil(1000);
                let h = resp.headers_mut();
                h.insert(
                    "x-rate-limit-limit",
                    HeaderValue::from(cfg.connect_limit as u64),
                );
                h.insert("x-rate-limit-remaining", HeaderValue::from(0u64));
                h.insert("x-rate-limit-reset", HeaderValue::from(reset_secs));
            }
            return resp;
        }
    } else if let Some(status) = stream.forced_status(partition_hint, now) {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return json_error(code, &format!("simulated {status}"));
    }

    if !authorized(&cfg.api, headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: the credentials were not accepted",
        );
    }
    let gzip = accepts_gzip(headers);
    if !gzip && !v2 {
        return json_error(
            StatusCode::NOT_ACCEPTABLE,
            "This connection requires compression. Send the header 'Accept-Encoding: gzip' and decompress the stream as it is read.",
        );
    }

    let partitioned = match &cfg.api {
        Api::Gnip { .. } => true,
        Api::V2 { partitioned, .. } => *partitioned,
    };
    let partition = if partitioned {
        match q.partition.as_deref().map(str::parse::<u32>) {
            Some(Ok(p)) if (1..=cfg.partitions).contains(&p) => p,
            Some(_) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("partition must be a number from 1 to {}", cfg.partitions),
                );
            }
            None => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "the partition parameter is required",
                );
            }
        }
    } else {
        1
    };

    let max_backfill = cfg.max_backfill_minutes;
    let backfill_minutes = match q.backfill.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(m)) if (1..=max_backfill).contains(&m) || (v2 && m == 0) => m,
        Some(_) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("backfill minutes must be an integer from 1 to {max_backfill}"),
            );
        }
    };

    let range = if recovery {
        let (Some(start), Some(end)) = (q.start.as_deref(), q.end.as_deref()) else {
            return json_error(
                StatusCode::BAD_REQUEST,
                "recovery needs both a start time and an end time",
            );
        };
        let (Some(start_ms), Some(end_ms)) = (parse_rfc3339(start), parse_rfc3339(end)) else {
            return json_error(
                StatusCode::BAD_REQUEST,
                "start and end times must be RFC 3339 UTC, e.g. 2023-07-05T17:09:12.070Z",
            );
        };
        if start_ms >= end_ms {
            return json_error(
                StatusCode::BAD_REQUEST,
                "the start time must be before the end time",
            );
        }
        if start_ms < now.saturating_sub(cfg.retention_ms) {
            return json_error(
                StatusCode::BAD_REQUEST,
                "the start time is outside the recovery retention window",
            );
        }
        if backfill_minutes > 0 {
            return json_error(
                StatusCode::BAD_REQUEST,
                "backfill and recovery cannot be combined",
            );
        }
        if cfg.content == crate::config::Content::Likes {
            return json_error(
                StatusCode::BAD_REQUEST,
                "recovery is not available for likes streams",
            );
        }
        Some((start_ms, end_ms))
    } else {
        None
    };

    if range.is_some() {
        let mut jobs = shared.recovery_jobs.lock().expect("jobs lock");
        let running = jobs.entry(cfg.account()).or_default();
        if *running >= cfg.max_recovery_jobs {
            return json_error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "at most {} recovery jobs may run at once",
                    cfg.max_recovery_jobs
                ),
            );
        }
        *running += 1;
        stream.stats.lock().expect("stats lock").recovery_jobs += 1;
    }

    let entry = Arc::new(ConnEntry {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        partition,
        client,
        kind: if range.is_some() {
            ConnectionKind::Recovery
        } else {
            ConnectionKind::Live
        },
        opened_ms: now,
        control: Control::default(),
        bytes_sent: AtomicU64::new(0),
        activities_sent: AtomicU64::new(0),
    });
    tracing::info!(stream = %cfg.name, partition, %client, connection = entry.id, backfill_minutes, recovery = range.is_some(), "simulator connection opened");
    let (tx, rx) = mpsc::channel(4);
    let encoder = if gzip {
        Encoder::gzip()
    } else {
        Encoder::Identity
    };
    let writer = Writer::new(shared.clone(), stream.clone(), entry.clone(), tx, encoder);
    match range {
        Some((start_ms, end_ms)) => {
            if let Some(p) = stream.partition(partition) {
                p.conns.lock().expect("conns lock").push(entry);
            }
            tokio::spawn(writer.run_recovery(start_ms, end_ms));
        }
        None => {
            let cursor = stream.partition(partition).map_or(0, |p| {
                if backfill_minutes > 0 {
                    p.log
                        .cursor_at(now.saturating_sub(backfill_minutes * cfg.minute_ms))
                } else {
                    p.log.head()
                }
            });
            stream.admit(entry);
            match &stream.corpus {
                Some(corpus) => {
                    tokio::spawn(writer.run_corpus(corpus.clone()));
                }
                _ => {
                    tokio::spawn(writer.run_live(cursor));
                }
            }
        }
    }

    let mut resp = Response::new(Body::new(ChannelBody(rx)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

async fn admin_connections(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.connections()).into_response()
}

async fn admin_stats(State(shared): State<Arc<Shared>>) -> Response {
    let mut streams = serde_json::Map::new();
    for s in &shared.streams {
        streams.insert(
            s.cfg.name.clone(),
            serde_json::to_value(s.stats()).unwrap_or_default(),
        );
    }
    Json(serde_json::json!({ "streams": streams, "faults": shared.fault_counts() })).into_response()
}

async fn admin_fault(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let fault: Fault = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("bad fault: {e}")),
    };
    match shared.apply_fault(&fault) {
        Ok(matched) => Json(serde_json::json!({ "matched": matched })).into_response(),
        Err(e) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    stream: String,
    partition: u32,
    lines: Vec<String>,
}

async fn admin_publish(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: PublishBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("bad publish request: {e}"),
            );
        }
    };
    let stream = match shared.stream(&req.stream) {
        Ok(s) => s.clone(),
        Err(e) => return json_error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    if stream.partition(req.partition).is_none() {
        return json_error(StatusCode::BAD_REQUEST, "no such partition");
    }
    let lines = req.lines.into_iter().map(Bytes::from).collect();
    let activities = stream.publish(req.partition, lines, unix_ms_now());
    Json(serde_json::json!({ "activities": activities })).into_response()
}

async fn admin_truth(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(name) = q.get("stream") else {
        return json_error(StatusCode::BAD_REQUEST, "the stream parameter is required");
    };
    let stream = match shared.stream(name) {
        Ok(s) => s.clone(),
        Err(e) => return json_error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let partitions: Vec<u32> = match q.get("partition").map(|p| p.parse::<u32>()) {
        Some(Ok(p)) => vec![p],
        Some(Err(_)) => return json_error(StatusCode::BAD_REQUEST, "partition must be a number"),
        None => (1..=stream.cfg.partitions).collect(),
    };
    let mut out = String::new();
    for p in partitions {
        for r in stream.truth(p) {
            out.push_str(&serde_json::json!({"partition": p, "id": r.id.to_string(), "created_ms": r.created_ms, "published_ms": r.published_ms}).to_string());
            out.push('\n');
        }
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateBody {
    stream: String,
    rate: RateProfile,
}

async fn admin_rate(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: RateBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("bad rate request: {e}")),
    };
    match shared.stream(&req.stream) {
        Ok(s) => {
            *s.rate.lock().expect("rate lock") = req.rate;
            Json(serde_json::json!({ "ok": true })).into_response()
        }
        Err(e) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
    }
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
    }
}

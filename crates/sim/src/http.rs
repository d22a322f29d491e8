//! The HTTP side: the listeners (plain or TLS), the stream endpoints (admission in
//! `admission`, then a writer task per response) and the admin API.
//!
//! Two routers: the live host's (every stream, v2 recovery, the admin API) and the Gnip
//! recovery host's (Gnip streams' recovery requests under the live path shape, nothing
//! else).

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
use tandem_core::time::unix_ms_now;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::admission::{Admission, Endpoint, admit};
use crate::config::RateProfile;
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

/// The live host: the streams and the admin API.
pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/admin/connections", get(admin_connections))
        .route("/admin/stats", get(admin_stats))
        .route("/admin/faults", post(admin_fault))
        .route("/admin/publish", post(admin_publish))
        .route("/admin/truth", get(admin_truth))
        .route("/admin/rate", post(admin_rate))
        .route("/admin/credentials", post(admin_credentials))
        .fallback(live_request)
        .with_state(shared)
}

/// The Gnip recovery host: recovery requests, nothing else (no admin API, no v2 stream).
pub(crate) fn recovery_router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .fallback(recovery_request)
        .with_state(shared)
}

async fn live_request(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    stream_request(&shared, Endpoint::Live, client, &method, &uri, &headers)
}

async fn recovery_request(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    stream_request(&shared, Endpoint::Recovery, client, &method, &uri, &headers)
}

/// An error response with the upstream's JSON body: `{"error":{"message":…}}`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "message": message } }).to_string();
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A request for a stream path on either host; the recovery host knows Gnip streams only.
fn stream_request(
    shared: &Arc<Shared>,
    endpoint: Endpoint,
    client: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let Some(stream) = shared
        .streams
        .iter()
        .find(|s| s.cfg.url_path() == uri.path())
        .filter(|s| endpoint == Endpoint::Live || !s.cfg.is_v2())
        .cloned()
    else {
        return json_error(StatusCode::NOT_FOUND, "no such stream");
    };
    if method != Method::GET {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "streams are read with GET");
    }
    let resp = serve_stream(shared, &stream, endpoint, client, uri, headers);
    stream.count_response(resp.status().as_u16());
    if !resp.status().is_success() {
        tracing::info!(stream = %stream.cfg.name, %client, status = resp.status().as_u16(), "simulator refused a connection");
    }
    resp
}

/// Admits a stream request, then opens the live or the recovery stream it asked for.
fn serve_stream(
    shared: &Arc<Shared>,
    stream: &Arc<StreamState>,
    endpoint: Endpoint,
    client: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let now = unix_ms_now();
    let admission = match admit(shared, stream, endpoint, uri, headers, now) {
        Ok(admission) => admission,
        Err(refusal) => return refusal.into_response(),
    };
    let entry = open_connection(shared, stream, client, &admission, now);
    let (tx, rx) = mpsc::channel(4);
    let encoder = if admission.gzip {
        Encoder::gzip()
    } else {
        Encoder::Identity
    };
    let writer = Writer::new(shared.clone(), stream.clone(), entry.clone(), tx, encoder);
    match admission.range {
        Some((start_ms, end_ms)) => open_recovery(stream, entry, writer, start_ms, end_ms),
        None => open_live(stream, entry, writer, admission.backfill_minutes, now),
    }
    streaming_response(rx, admission.gzip)
}

/// The record of an admitted connection, as the admin API lists it.
fn open_connection(
    shared: &Shared,
    stream: &StreamState,
    client: SocketAddr,
    admission: &Admission,
    now_ms: u64,
) -> Arc<ConnEntry> {
    let entry = Arc::new(ConnEntry {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        partition: admission.partition,
        client,
        kind: if admission.range.is_some() {
            ConnectionKind::Recovery
        } else {
            ConnectionKind::Live
        },
        opened_ms: now_ms,
        control: Control::default(),
        bytes_sent: AtomicU64::new(0),
        activities_sent: AtomicU64::new(0),
    });
    tracing::info!(stream = %stream.cfg.name, partition = entry.partition, %client, connection = entry.id, backfill_minutes = admission.backfill_minutes, recovery = admission.range.is_some(), "simulator connection opened");
    entry
}

/// A live stream (or the corpus): its cursor is fixed at admission (the log head, or
/// `backfill_minutes` back), then the connection joins its partition, where the oldest
/// live connection over the per-partition limit is evicted.
fn open_live(
    stream: &StreamState,
    entry: Arc<ConnEntry>,
    writer: Writer,
    backfill_minutes: u64,
    now_ms: u64,
) {
    let cursor = stream.partition(entry.partition).map_or(0, |p| {
        if backfill_minutes > 0 {
            p.log
                .cursor_at(now_ms.saturating_sub(backfill_minutes * stream.cfg.minute_ms))
        } else {
            p.log.head()
        }
    });
    stream.admit(entry);
    match &stream.corpus {
        Some(corpus) => {
            tokio::spawn(writer.run_corpus(corpus.clone()));
        }
        None => {
            tokio::spawn(writer.run_live(cursor));
        }
    }
}

/// A recovery stream: listed with the partition's connections (faults reach it), never
/// counted against the live connection limit.
fn open_recovery(
    stream: &StreamState,
    entry: Arc<ConnEntry>,
    writer: Writer,
    start_ms: u64,
    end_ms: u64,
) {
    if let Some(p) = stream.partition(entry.partition) {
        p.conns.lock().expect("conns lock").push(entry);
    }
    tokio::spawn(writer.run_recovery(start_ms, end_ms));
}

/// The 200 response whose body the writer task feeds.
fn streaming_response(rx: mpsc::Receiver<Result<Bytes, io::Error>>, gzip: bool) -> Response {
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
struct CredentialsBody {
    stream: String,
    secret: String,
}

async fn admin_credentials(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: CredentialsBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("bad credentials request: {e}"),
            );
        }
    };
    match shared.set_secret(&req.stream, &req.secret) {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
    }
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

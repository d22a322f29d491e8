//! The NATS JetStream store: the shared store of a pair of consumers in two zones.
//!
//! Each activity is published to `<prefix>.<stream>.<partition>` with the header
//! `Nats-Msg-Id` = the activity id, so the server's duplicate window drops the copy the
//! other zone also publishes. An activity counts as stored when its publish ack arrives;
//! an ack marked duplicate also counts as stored (the server holds it) and is counted
//! separately: that is cross-zone dedup at work.
//!
//! Publishes are pipelined with a bounded number, and bounded bytes, awaiting their ack
//! (the in-flight window). A batch interrupted by a failed publish is resumed on the
//! driver's retry (the prefix already published is not sent again), which keeps `put`
//! all-or-nothing from the driver's point of view. A publish whose ack fails or times out
//! is published again with the same `Nats-Msg-Id`: the duplicate window makes that
//! idempotent. Those wait outside the window until the next collection republishes them;
//! every unacknowledged publish, in the window or not, is also held by the driver, whose
//! byte budget bounds them all.
//!
//! [`JetStreamIds`] reads back, headers only, which activity ids the stream holds for a
//! partition over an interval: gap repair skips those, so a zone that recovers an interval
//! the other zone already stored, longer ago than the duplicate window, stores nothing twice.
//!
//! The connection presents the token the configuration resolved (`token_env` or
//! `token_file`) and is TLS whenever a `tls://` URL, `tls_ca_file` or a client certificate
//! asks for it, never falling back to clear text. A server that refuses tandem (its
//! certificate does not verify, the token is wrong) is a fatal error at start; one that
//! cannot be reached yet is waited for in the background.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tandem_core::{ActivityId, Partition, StreamId, Unique, UniqueBatch};

use crate::store::{Ack, Store, StoreError, StreamNames};
use crate::window::{InFlight, Sent};

/// Settings of a JetStream sink. Field docs are the configuration reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URLs, comma-separated (`nats://nats-a:4222,nats://nats-b:4222`). A
    /// `tls://` URL requires TLS with every server; without `tls_ca_file` the system roots
    /// verify their certificates.
    pub url: String,
    /// The JetStream stream (created if missing and `create_stream` is true).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Activities go to `<subject_prefix>.<stream name>.<partition>`.
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// The stream's duplicate window, in seconds. Must exceed `merge.dedup_window_secs`,
    /// so that a copy the other zone publishes late is still recognised.
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window_secs: u64,
    /// Replicas when the stream is created (3 spread over the zones in production).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How long the stream keeps messages, in seconds (0: forever).
    #[serde(default)]
    pub max_age_secs: u64,
    /// Create the stream when it does not exist (otherwise it must exist).
    #[serde(default = "yes")]
    pub create_stream: bool,
    /// Publishes awaiting their acknowledgement at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Payload bytes of publishes awaiting their acknowledgement at most (besides
    /// `max_in_flight`), and never more than a quarter of `delivery.max_memory_bytes`:
    /// they are part of what the sink holds in memory, and the rest of that budget stays
    /// for the activities queued behind them.
    #[serde(default = "default_in_flight_bytes")]
    pub max_in_flight_bytes: u64,
    /// How long to wait for a publish acknowledgement before publishing again.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Environment variable holding a NATS token (optional; not with `token_file`).
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding a NATS token, trailing newline ignored (optional; not with
    /// `token_env`): a systemd credential (`/run/credentials/<unit>/<name>`) or a mounted
    /// Kubernetes Secret.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the servers' certificates, trusted instead
    /// of the system roots. Setting it requires TLS with every server, as `tls://` URLs do.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of a client certificate for servers that verify clients (with
    /// `tls_key_file`; requires TLS).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

fn default_stream() -> String {
    "TANDEM".to_owned()
}
fn default_prefix() -> String {
    "tandem".to_owned()
}
fn default_duplicate_window() -> u64 {
    1_200
}
fn default_replicas() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_in_flight() -> usize {
    4_096
}
fn default_in_flight_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}

impl NatsConfig {
    /// A configuration with defaults for `url`.
    pub fn new(url: &str) -> NatsConfig {
        NatsConfig {
            url: url.to_owned(),
            stream: default_stream(),
            subject_prefix: default_prefix(),
            duplicate_window_secs: default_duplicate_window(),
            replicas: default_replicas(),
            max_age_secs: 0,
            create_stream: true,
            max_in_flight: default_in_flight(),
            max_in_flight_bytes: default_in_flight_bytes(),
            ack_timeout_ms: default_ack_timeout_ms(),
            token_env: None,
            token_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }

    /// Whether every connection must be TLS: a `tls://` URL, a CA or a client certificate
    /// asks for it, and then no server is spoken to in clear.
    pub fn tls_required(&self) -> bool {
        self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self
                .url
                .split(',')
                .any(|u| u.trim().to_ascii_lowercase().starts_with("tls://"))
    }

    /// Every problem, as (field, message). `dedup_window_secs` is the merger's window.
    pub fn problems(&self, dedup_window_secs: u64) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.url.trim().is_empty() {
            out.push(("url", "must name at least one server".to_owned()));
        }
        if self.stream.is_empty() || self.stream.contains(['.', ' ', '*', '>']) {
            out.push((
                "stream",
                format!("{:?} is not a JetStream stream name", self.stream),
            ));
        }
        if self.subject_prefix.is_empty() || self.subject_prefix.contains([' ', '*', '>']) {
            out.push((
                "subject_prefix",
                format!("{:?} is not a subject prefix", self.subject_prefix),
            ));
        }
        if self.duplicate_window_secs <= dedup_window_secs {
            out.push((
                "duplicate_window_secs",
                format!(
                    "{} s does not exceed the dedup window ({dedup_window_secs} s): a copy published late by the other zone would be stored twice",
                    self.duplicate_window_secs
                ),
            ));
        }
        if self.max_in_flight == 0 {
            out.push(("max_in_flight", "must be positive".to_owned()));
        }
        if self.max_in_flight_bytes == 0 {
            out.push(("max_in_flight_bytes", "must be positive".to_owned()));
        }
        out.extend(self.tls_problems());
        out
    }

    /// The TLS files: readable PEM of the right kind, and a client certificate only with
    /// its key. Read here so that `tandem check` finds them, not the first connection.
    fn tls_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => out.push((
                "tls_key_file",
                "missing: tls_cert_file needs the private key of the client certificate".to_owned(),
            )),
            (None, Some(_)) => out.push((
                "tls_cert_file",
                "missing: tls_key_file is the key of a client certificate; set both or neither"
                    .to_owned(),
            )),
            _ => {}
        }
        for (field, path) in [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
        ] {
            if let Some(path) = path
                && let Err(message) = pem_certificates(path)
            {
                out.push((field, message));
            }
        }
        if let Some(path) = &self.tls_key_file
            && let Err(message) = pem_key(path)
        {
            out.push(("tls_key_file", message));
        }
        out
    }
}

/// At least one PEM certificate in the file at `path`.
pub(crate) fn pem_certificates(path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

/// A PEM private key in the file at `path`.
fn pem_key(path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map(drop)
        .map_err(|e| format!("{} holds no PEM private key: {e}", path.display()))
}

/// Publishes one activity with its id as `Nats-Msg-Id`; returns the future of its ack.
///
/// While the server is away the client buffers and then blocks; the timeout turns that
/// into an error, so the driver keeps accepting (and spools) instead of stalling the
/// pipeline. A publish the client still delivers later is harmless: the retry carries the
/// same `Nats-Msg-Id`.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    id: &ActivityId,
    line: &bytes::Bytes,
    timeout: Duration,
) -> Result<AckFuture, StoreError> {
    let message = jetstream::message::PublishMessage::build()
        .payload(line.clone())
        .message_id(id.to_string());
    let fut: PublishAckFuture =
        tokio::time::timeout(timeout, js.send_publish(subject.to_owned(), message))
            .await
            .map_err(|_| {
                err(format!(
                    "publish not accepted within {} ms",
                    timeout.as_millis()
                ))
            })?
            .map_err(|e| err(format!("publish: {e}")))?;
    Ok(fut.into_future())
}

type AckFuture = Pin<
    Box<
        dyn Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

struct Pending {
    stream: StreamId,
    partition: Partition,
    seq: u64,
    id: ActivityId,
    subject: String,
    line: bytes::Bytes,
    ack: AckFuture,
}

impl Sent for Pending {
    fn line_len(&self) -> usize {
        self.line.len()
    }
}

/// The JetStream store.
/// At most one line this often about unacknowledged publishes.
const UNACKED_LOG_EVERY: Duration = Duration::from_secs(5);

pub struct NatsStore {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
    names: StreamNames,
    /// Published, acknowledgement not seen yet: at most `max_in_flight` publishes and
    /// `max_in_flight_bytes` (or a quarter of the driver's budget, if less).
    pending: InFlight<Pending>,
    /// Acknowledged, not reported yet.
    done: Vec<Ack>,
    /// Acknowledgement failed: to be published again.
    retry: VecDeque<Pending>,
    /// Unacknowledged publishes not logged yet, and when that was last logged: one line
    /// per few seconds with a count, not one per activity (a blackholed server fails
    /// thousands).
    unacked: (u64, Option<tokio::time::Instant>),
    /// A batch a failed publish interrupted: (stream, partition, first id, items sent).
    partial: Option<(StreamId, Partition, ActivityId, usize)>,
    /// The stream was found (or created) and checked.
    ready: bool,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("stream", &self.cfg.stream)
            .field("pending", &self.pending.len())
            .finish()
    }
}

fn err(message: impl std::fmt::Display) -> StoreError {
    StoreError::transient("nats", message.to_string())
}

/// How long one attempt to reach a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection options of `cfg`: the token and TLS settings.
fn options(cfg: &NatsConfig, token: Option<String>) -> async_nats::ConnectOptions {
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .name("tandem");
    if let Some(t) = token {
        opts = opts.token(t);
    }
    if cfg.tls_required() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    opts
}

/// A client of the configured servers.
///
/// A first attempt tells an unreachable server from one that refuses tandem: a certificate
/// that does not verify or a token the server rejects would fail every retry the same way,
/// so it is a fatal error naming the cause instead of a sink that stays down in silence.
/// A server that cannot be reached is retried in the background: the sink starts, reports
/// down and spools until it is reachable.
pub async fn client(
    cfg: &NatsConfig,
    token: Option<String>,
) -> Result<async_nats::Client, StoreError> {
    let url = tandem_core::redact_url(&cfg.url);
    let servers: Vec<async_nats::ServerAddr> = cfg
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::fatal("nats", format!("url {url:?}: {e}")))?;
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        options(cfg, token.clone()).connect(servers.clone()),
    )
    .await;
    match first {
        Ok(Ok(client)) => return Ok(client),
        Ok(Err(e)) => {
            let why = tandem_core::redact_url(&e.to_string());
            if let Some(refusal) = refusal(&e) {
                return Err(StoreError::fatal(
                    "nats",
                    format!("{url} refused the connection: {why} ({refusal})"),
                ));
            }
            tracing::debug!(url = %url, error = %why, "first connection attempt failed");
        }
        Err(_) => tracing::debug!(url = %url, "first connection attempt timed out"),
    }
    options(cfg, token)
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .map_err(|e| {
            let e = tandem_core::redact_url(&e.to_string());
            err(format!("cannot connect to {url}: {e}"))
        })
}

/// What to check when the server refused the connection for a reason that retrying does
/// not change (TLS verification, the token), or `None` when it was not refused.
fn refusal(e: &async_nats::ConnectError) -> Option<&'static str> {
    use async_nats::ConnectErrorKind as Kind;
    use async_nats::rustls::Error as Tls;
    match e.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => {
            Some("the server does not accept the token: check token_env or token_file")
        }
        Kind::Tls => Some("the TLS settings cannot be used: check the tls_* files"),
        // A failed TLS handshake arrives as an I/O error that wraps the rustls error.
        Kind::Io => match tls_cause(e)? {
            Tls::InvalidCertificate(_) => Some(
                "the server's certificate does not verify: tls_ca_file must hold the CA that signed it, and the URL's host must be a name on it",
            ),
            Tls::AlertReceived(_) => Some(
                "the server refused the TLS handshake: does it require a client certificate (tls_cert_file, tls_key_file)?",
            ),
            _ => Some("TLS handshake failed: does the server speak TLS on this port?"),
        },
        _ => None,
    }
}

/// The rustls error among `e`'s causes.
fn tls_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a async_nats::rustls::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(tls) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>())
        {
            return Some(tls);
        }
        cause = c.source();
    }
    None
}

/// Reads back which activities the JetStream stream holds for a stream partition: in a pair of
/// consumers, what the other zone stored while this one was away, so that recovering the
/// same interval stores nothing twice however old it is (the duplicate window only
/// reaches `duplicate_window_secs` back).
#[derive(Debug, Clone)]
pub struct JetStreamIds {
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

impl JetStreamIds {
    pub async fn connect(
        cfg: &NatsConfig,
        token: Option<String>,
    ) -> Result<JetStreamIds, StoreError> {
        Ok(JetStreamIds {
            js: jetstream::new(client(cfg, token).await?),
            stream: cfg.stream.clone(),
            prefix: cfg.subject_prefix.clone(),
        })
    }

    /// Ids held on `stream`'s `partition` that were published from `since_ms` to
    /// `until_ms` (Unix ms, the server's clock). An activity is published after it
    /// happened, so this holds every activity of that interval stored by then.
    pub async fn between(
        &self,
        stream: &str,
        partition: Partition,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<std::collections::HashSet<ActivityId>, StoreError> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        use futures_util::StreamExt;
        let start =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
                .map_err(|e| StoreError::fatal("nats", format!("start time {since_ms}: {e}")))?;
        let s = self.js.get_stream(&self.stream).await.map_err(err)?;
        let consumer = s
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
                filter_subject: format!("{}.{stream}.{partition}", self.prefix),
                headers_only: true,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(err)?;
        let mut pending = consumer.cached_info().num_pending;
        // `pending` counts everything to the end of the stream, not to `until_ms`: the set
        // grows with what the interval holds, never sized by the whole stream.
        let mut ids = std::collections::HashSet::with_capacity((pending as usize).min(65_536));
        while pending > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(pending.min(10_000) as usize)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .map_err(err)?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(err)?;
                got += 1;
                let info = m.info().map_err(err)?;
                pending = info.pending;
                if info.published.unix_timestamp_nanos() > i128::from(until_ms) * 1_000_000 {
                    pending = 0;
                    break;
                }
                if let Some(id) = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .and_then(|v| v.as_str().parse::<ActivityId>().ok())
                {
                    ids.insert(id);
                }
            }
            if got == 0 {
                break;
            }
        }
        let _ = s.delete_consumer(&consumer.cached_info().name).await;
        Ok(ids)
    }
}

impl NatsStore {
    /// Reads what this store's stream holds, over the store's own connection.
    pub fn stored_ids(&self) -> JetStreamIds {
        JetStreamIds {
            js: self.js.clone(),
            stream: self.cfg.stream.clone(),
            prefix: self.cfg.subject_prefix.clone(),
        }
    }

    /// Connects, then creates or verifies the stream (its subjects and duplicate window).
    pub async fn connect(
        cfg: NatsConfig,
        names: StreamNames,
        token: Option<String>,
    ) -> Result<NatsStore, StoreError> {
        let client = client(&cfg, token).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(cfg.ack_timeout_ms))
            .max_ack_inflight(cfg.max_in_flight.max(1) * 2)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let pending = InFlight::new(cfg.max_in_flight, cfg.max_in_flight_bytes);
        let mut store = NatsStore {
            client,
            js,
            cfg,
            names,
            pending,
            done: Vec::new(),
            retry: VecDeque::new(),
            unacked: (0, None),
            partial: None,
            ready: false,
        };
        match store.prepare().await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!(url = %tandem_core::redact_url(&store.cfg.url), error = %e, "the NATS server is not reachable yet; the sink starts down, spools, and delivers once it is");
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// Checks (or creates) the JetStream stream, once the server is reachable.
    async fn prepare(&mut self) -> Result<(), StoreError> {
        if self.ready {
            return Ok(());
        }
        if !self.connected() {
            let url = tandem_core::redact_url(&self.cfg.url);
            return Err(err(format!("not connected to {url}")));
        }
        let (cfg, js) = (&self.cfg, &self.js);
        let subjects = vec![format!("{}.>", cfg.subject_prefix)];
        let want_window = Duration::from_secs(cfg.duplicate_window_secs);
        let found = tokio::time::timeout(self.timeout(), js.get_stream(&cfg.stream))
            .await
            .map_err(|_| err("no answer from the JetStream API"))?;
        let mut stream = match found {
            Ok(s) => s,
            Err(e) if cfg.create_stream => {
                tracing::info!(stream = %cfg.stream, reason = %e, "creating the JetStream stream");
                js.get_or_create_stream(stream::Config {
                    name: cfg.stream.clone(),
                    subjects: subjects.clone(),
                    duplicate_window: want_window,
                    num_replicas: cfg.replicas.max(1),
                    max_age: Duration::from_secs(cfg.max_age_secs),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| err(format!("creating stream {}: {e}", cfg.stream)))?
            }
            Err(e) => {
                return Err(StoreError::fatal(
                    "nats",
                    format!(
                        "stream {} not found and create_stream is false: {e}",
                        cfg.stream
                    ),
                ));
            }
        };
        let info = stream
            .info()
            .await
            .map_err(|e| err(format!("stream {} info: {e}", cfg.stream)))?;
        if info.config.duplicate_window < want_window {
            return Err(StoreError::fatal(
                "nats",
                format!(
                    "stream {} has a duplicate window of {} s; tandem needs at least {} s (duplicate_window_secs) so that copies from the other zone are recognised",
                    cfg.stream,
                    info.config.duplicate_window.as_secs(),
                    cfg.duplicate_window_secs
                ),
            ));
        }
        if !info.config.subjects.iter().any(|s| s == &subjects[0]) {
            return Err(StoreError::fatal(
                "nats",
                format!(
                    "stream {} does not capture subjects {}",
                    cfg.stream, subjects[0]
                ),
            ));
        }
        self.ready = true;
        tracing::info!(stream = %self.cfg.stream, "JetStream stream ready");
        Ok(())
    }

    /// Whether the client is connected now (publishing while it is not would only block).
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.ack_timeout_ms)
    }

    fn subject(&self, stream: StreamId, partition: Partition) -> String {
        let name = self
            .names
            .get(usize::from(stream.0))
            .map_or("unknown", |s| s);
        format!("{}.{}.{}", self.cfg.subject_prefix, name, partition)
    }

    fn record(&mut self, p: &Pending, ack: &jetstream::publish::PublishAck) {
        match self.done.last_mut() {
            Some(a) if a.stream == p.stream && a.partition == p.partition => {
                a.ids.push(p.id);
                a.seqs.push(p.seq);
                a.duplicates += usize::from(ack.duplicate);
            }
            _ => self.done.push(Ack {
                stream: p.stream,
                partition: p.partition,
                ids: vec![p.id],
                seqs: vec![p.seq],
                duplicates: usize::from(ack.duplicate),
            }),
        }
    }

    fn settle(
        &mut self,
        p: Pending,
        result: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) {
        match result {
            Ok(ack) => self.record(&p, &ack),
            Err(e) => {
                // Unknown whether the server stored it: publish again, same Nats-Msg-Id.
                let (count, last) = &mut self.unacked;
                *count += 1;
                let now = tokio::time::Instant::now();
                if last.is_none_or(|t| now.duration_since(t) >= UNACKED_LOG_EVERY) {
                    tracing::warn!(publishes = *count, last_id = %p.id, error = %e, "publishes not acknowledged; they will be published again");
                    *count = 0;
                    *last = Some(now);
                }
                self.retry.push_back(p);
            }
        }
    }

    /// Bounds the in-flight window's bytes by the driver's memory budget as well: the
    /// window is part of what the driver holds, and a quarter of its budget leaves the
    /// driver's queue its room (it asks for acknowledgements at half).
    pub fn with_memory_budget(mut self, max_memory_bytes: u64) -> NatsStore {
        self.pending.within_budget(max_memory_bytes);
        self
    }

    /// Moves the finished acknowledgements at the front of the window out of it, without
    /// waiting, up to the first one still awaited: the server answers a connection's
    /// publishes in order (and each times out in order), so what follows an unfinished one
    /// is almost always unfinished too. At full speed the window is full before every
    /// publish; polling all of it each time cost a poll per publish in the window.
    ///
    /// Each poll is unconstrained: tokio's cooperative budget (128 polls of its resources
    /// per task turn) would otherwise make every acknowledgement after the 128th look
    /// unfinished, and a window of thousands would drain 128 per collection.
    fn harvest(&mut self) {
        while let Some(front) = self.pending.front_mut()
            && let Some(result) = tokio::task::unconstrained(&mut front.ack).now_or_never()
            && let Some(p) = self.pending.pop_front()
        {
            self.settle(p, result);
        }
    }

    /// Waits for the oldest acknowledgement (bounded by the ack timeout).
    async fn wait_oldest(&mut self) -> Result<(), StoreError> {
        let Some(mut p) = self.pending.pop_front() else {
            return Ok(());
        };
        match tokio::time::timeout(self.timeout(), &mut p.ack).await {
            Ok(result) => {
                self.settle(p, result);
                Ok(())
            }
            Err(_) => {
                self.pending.push_front(p);
                Err(err("publish acknowledgements are not arriving"))
            }
        }
    }

    /// Publishes again what was not acknowledged; stops at the first failure.
    async fn republish(&mut self) -> Result<(), StoreError> {
        while let Some(mut p) = self.retry.pop_front() {
            if !self.connected() {
                self.retry.push_front(p);
                return Err(err("not connected to the NATS server"));
            }
            match publish(&self.js, &p.subject, &p.id, &p.line, self.timeout()).await {
                Ok(ack) => {
                    p.ack = ack;
                    self.pending.push_back(p);
                }
                Err(e) => {
                    self.retry.push_front(p);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// Starts a JetStream sink. The server may be down: the sink then starts down and spools.
pub(crate) async fn start(
    name: &str,
    cfg: &NatsConfig,
    ctx: crate::start::SinkContext,
) -> Result<crate::start::StartedSink, crate::start::SinkStartError> {
    let token = ctx.token.as_ref().map(|t| t.expose().to_owned());
    let store = NatsStore::connect(cfg.clone(), ctx.names.clone(), token)
        .await
        .map_err(|e| crate::start::SinkStartError::Store(e.to_string()))?
        .with_memory_budget(ctx.delivery.max_memory_bytes);
    let shared = store.stored_ids();
    let mut started = crate::start::with_store(name, store, ctx)?;
    started.shared = Some(crate::StoredIds::Nats(shared));
    Ok(started)
}

impl Store for NatsStore {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        if !self.connected() {
            // Fail fast: the driver keeps accepting and spools while the server is away.
            return Err(err("not connected to the NATS server"));
        }
        self.prepare().await?;
        let skip = match (&self.partial, batch.items.first()) {
            (Some((s, p, first, n)), Some(u))
                if *s == batch.stream && *p == batch.partition && *first == u.id =>
            {
                *n
            }
            _ => 0,
        };
        self.partial = None;
        let subject = self.subject(batch.stream, batch.partition);
        for (i, item) in batch.items.iter().enumerate().skip(skip) {
            let Unique { seq, id, line, .. } = item;
            if self.pending.full_for(line.len()) {
                self.harvest();
                while self.pending.full_for(line.len()) {
                    if let Err(e) = self.wait_oldest().await {
                        self.partial =
                            (i > 0).then(|| (batch.stream, batch.partition, batch.items[0].id, i));
                        return Err(e);
                    }
                }
            }
            match publish(&self.js, &subject, id, line, self.timeout()).await {
                Ok(ack) => self.pending.push_back(Pending {
                    stream: batch.stream,
                    partition: batch.partition,
                    seq: *seq,
                    id: *id,
                    subject: subject.clone(),
                    line: line.clone(),
                    ack,
                }),
                Err(e) => {
                    self.partial =
                        (i > 0).then(|| (batch.stream, batch.partition, batch.items[0].id, i));
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn acks(&mut self, force: bool) -> Result<Vec<Ack>, StoreError> {
        self.harvest();
        let republished = self.republish().await;
        if force {
            while !self.pending.is_empty() {
                if self.wait_oldest().await.is_err() {
                    break;
                }
            }
        }
        let done = std::mem::take(&mut self.done);
        match republished {
            Err(e) if done.is_empty() => Err(e),
            _ => Ok(done),
        }
    }

    async fn oldest_acks(&mut self) -> Result<Vec<Ack>, StoreError> {
        self.harvest();
        let republished = self.republish().await;
        if self.done.is_empty() && !self.pending.is_empty() {
            let _ = self.wait_oldest().await;
        }
        let done = std::mem::take(&mut self.done);
        match republished {
            Err(e) if done.is_empty() => Err(e),
            _ => Ok(done),
        }
    }

    fn unacknowledged(&self) -> usize {
        self.pending.len() + self.retry.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `nats-server -js` on a free loopback port (installed by `scripts/setup-test-deps`;
    /// missing is a failure), killed on drop.
    struct Server {
        child: std::process::Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Server {
        async fn start() -> Server {
            let binary = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
                .expect("nats-server not found: run scripts/setup-test-deps");
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let server = Server {
                child: std::process::Command::new(binary)
                    .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                    .arg(dir.path())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("nats-server starts"),
                port,
                _dir: dir,
            };
            // Up to 30 s: a loaded machine starts it slowly.
            for _ in 0..600 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("nats-server did not open port {port}");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn big_batch(n: u64, line_bytes: usize) -> UniqueBatch {
        UniqueBatch {
            stream: StreamId(0),
            partition: 1,
            items: (0..n)
                .map(|i| Unique {
                    seq: i + 1,
                    id: ActivityId::Post(i),
                    line: bytes::Bytes::from(vec![b'x'; line_bytes]),
                    path: tandem_core::PathId(0),
                    received: tokio::time::Instant::now(),
                })
                .collect(),
        }
    }

    /// Big activities far below `max_in_flight`: the publishes awaiting their ack never
    /// hold more than `max_in_flight_bytes` (nor a quarter of the driver's budget), and
    /// every one is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_in_flight_window_is_bounded_by_bytes() {
        let server = Server::start().await;
        let mut cfg = NatsConfig::new(&format!("nats://127.0.0.1:{}", server.port));
        cfg.duplicate_window_secs = 120;
        cfg.max_in_flight_bytes = 64 * 1024;
        let names: StreamNames = std::sync::Arc::new(vec!["decahose".into()]);
        let mut store = NatsStore::connect(cfg.clone(), names.clone(), None)
            .await
            .unwrap();
        let line = 16 * 1024;
        store.put(&big_batch(64, line)).await.unwrap();
        assert!(
            store.pending.bytes() <= 64 * 1024,
            "{} B await their ack; the bound is 64 KiB",
            store.pending.bytes()
        );
        let acked: usize = (store.acks(true).await.unwrap().iter())
            .map(|a| a.ids.len())
            .sum();
        assert_eq!(acked, 64);
        assert_eq!(store.pending.bytes(), 0);
        // A driver budget of 128 KiB leaves the window a quarter of it.
        let mut store = NatsStore::connect(cfg, names, None)
            .await
            .unwrap()
            .with_memory_budget(128 * 1024);
        let mut batch = big_batch(64, line);
        for u in &mut batch.items {
            u.id = ActivityId::Post(u.seq + 1_000);
        }
        store.put(&batch).await.unwrap();
        assert!(
            store.pending.bytes() <= 32 * 1024,
            "{}",
            store.pending.bytes()
        );
        let acked: usize = (store.acks(true).await.unwrap().iter())
            .map(|a| a.ids.len())
            .sum();
        assert_eq!(acked, 64);
    }

    /// A thousand publishes acknowledged meanwhile are all reported by one collection
    /// (tokio's cooperative budget once made it 128, so the tail of a burst trickled in
    /// at 128 per `ack_interval_ms`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_collection_reports_every_arrived_acknowledgement() {
        let server = Server::start().await;
        let url = format!("nats://127.0.0.1:{}", server.port);
        let mut cfg = NatsConfig::new(&url);
        cfg.duplicate_window_secs = 120;
        let names: StreamNames = std::sync::Arc::new(vec!["decahose".into()]);
        let mut store = NatsStore::connect(cfg.clone(), names, None).await.unwrap();
        let batch = UniqueBatch {
            stream: StreamId(0),
            partition: 1,
            items: (0..1_000u64)
                .map(|i| Unique {
                    seq: i + 1,
                    id: ActivityId::Post(i),
                    line: bytes::Bytes::from_static(b"{}"),
                    path: tandem_core::PathId(0),
                    received: tokio::time::Instant::now(),
                })
                .collect(),
        };
        store.put(&batch).await.unwrap();
        // Every publish stored, then a moment for the last acknowledgements to arrive.
        let js = jetstream::new(async_nats::connect(&url).await.unwrap());
        let mut stream = js.get_stream(&cfg.stream).await.unwrap();
        for _ in 0..200 {
            if stream.info().await.unwrap().state.messages == 1_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let acked: usize = (store.acks(false).await.unwrap().iter())
            .map(|a| a.ids.len())
            .sum();
        assert_eq!(acked, 1_000);
    }
}

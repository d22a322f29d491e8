//! The NATS JetStream store: the shared store of a pair of consumers in two zones.
//!
//! Each activity is published to `<prefix>.<stream>.<partition>` with the header
//! `Nats-Msg-Id` = the activity id, so the server's duplicate window drops the copy the
//! other zone also publishes. An activity counts as stored when its publish ack arrives;
//! an ack marked duplicate also counts as stored (the server holds it) and is counted
//! separately: that is cross-zone dedup at work.
//!
//! Publishes are pipelined with a bounded number awaiting their ack. A batch interrupted
//! by a failed publish is resumed on the driver's retry (the prefix already published is
//! not sent again), which keeps `put` all-or-nothing from the driver's point of view. A
//! publish whose ack fails or times out is published again with the same `Nats-Msg-Id`:
//! the duplicate window makes that idempotent.
//!
//! [`StoredIds`] reads back, headers only, which activity ids the stream holds for a
//! partition over an interval: gap repair skips those, so a zone that recovers an interval
//! the other zone already stored, longer ago than the duplicate window, stores nothing twice.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tandem_core::{ActivityId, Partition, StreamId, Unique, UniqueBatch};

use crate::store::{Ack, Store, StoreError, StreamNames};

/// Settings of a JetStream sink. Field docs are the configuration reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URLs, comma-separated (`nats://nats-a:4222,nats://nats-b:4222`).
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
    /// How long to wait for a publish acknowledgement before publishing again.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Environment variable holding a NATS token (optional).
    #[serde(default)]
    pub token_env: Option<String>,
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
            ack_timeout_ms: default_ack_timeout_ms(),
            token_env: None,
        }
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
        out
    }
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

/// The JetStream store.
pub struct NatsStore {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
    names: StreamNames,
    /// Published, acknowledgement not seen yet (the in-flight window).
    pending: VecDeque<Pending>,
    /// Acknowledged, not reported yet.
    done: Vec<Ack>,
    /// Acknowledgement failed: to be published again.
    retry: VecDeque<Pending>,
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

/// A client of the configured servers.
async fn client(cfg: &NatsConfig, token: Option<String>) -> Result<async_nats::Client, StoreError> {
    // A server that is down at start is retried in the background: the sink starts,
    // reports down and spools until it is reachable.
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .name("tandem");
    if let Some(t) = token {
        opts = opts.token(t);
    }
    let servers: Vec<async_nats::ServerAddr> = cfg
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            let url = tandem_core::redact_url(&cfg.url);
            StoreError::fatal("nats", format!("url {url:?}: {e}"))
        })?;
    tokio::time::timeout(Duration::from_secs(10), opts.connect(servers))
        .await
        .map_err(|_| {
            err(format!(
                "cannot reach {} within 10 s",
                tandem_core::redact_url(&cfg.url)
            ))
        })?
        .map_err(|e| {
            let url = tandem_core::redact_url(&cfg.url);
            let e = tandem_core::redact_url(&e.to_string());
            err(format!("cannot connect to {url}: {e}"))
        })
}

/// Reads back which activities the JetStream stream holds for a stream partition: in a pair of
/// consumers, what the other zone stored while this one was away, so that recovering the
/// same interval stores nothing twice however old it is (the duplicate window only
/// reaches `duplicate_window_secs` back).
#[derive(Debug, Clone)]
pub struct StoredIds {
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

impl StoredIds {
    pub async fn connect(cfg: &NatsConfig, token: Option<String>) -> Result<StoredIds, StoreError> {
        Ok(StoredIds {
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
    pub fn stored_ids(&self) -> StoredIds {
        StoredIds {
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
        let mut store = NatsStore {
            client,
            js,
            cfg,
            names,
            pending: VecDeque::new(),
            done: Vec::new(),
            retry: VecDeque::new(),
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
                tracing::warn!(id = %p.id, error = %e, "publish not acknowledged; it will be published again");
                self.retry.push_back(p);
            }
        }
    }

    /// Moves every finished acknowledgement out of the window, without waiting.
    fn harvest(&mut self) {
        let mut still = VecDeque::with_capacity(self.pending.len());
        while let Some(mut p) = self.pending.pop_front() {
            match (&mut p.ack).now_or_never() {
                Some(result) => self.settle(p, result),
                None => still.push_back(p),
            }
        }
        self.pending = still;
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
        .map_err(|e| crate::start::SinkStartError::Store(e.to_string()))?;
    let shared = store.stored_ids();
    let mut started = crate::start::with_store(name, store, ctx)?;
    started.shared = Some(shared);
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
            if self.pending.len() >= self.cfg.max_in_flight {
                self.harvest();
                if self.pending.len() >= self.cfg.max_in_flight
                    && let Err(e) = self.wait_oldest().await
                {
                    self.partial =
                        (i > 0).then(|| (batch.stream, batch.partition, batch.items[0].id, i));
                    return Err(e);
                }
            }
            let Unique { seq, id, line, .. } = item;
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

    fn unacknowledged(&self) -> usize {
        self.pending.len() + self.retry.len()
    }
}

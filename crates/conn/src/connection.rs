//! One supervised connection: a (stream, partition, path) kept connected for the life of
//! the process. The loop is mechanism only: whether and when to retry is the
//! [`ReconnectPolicy`]'s call, when a request may be sent is the [`ConnectBudget`]'s.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use tandem_core::metric as m;
use tandem_core::time::{rfc3339_ms, rfc3339_secs, unix_ms_now};
use tandem_core::{Batch, Origin, Partition, Secret, Tally};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};

use crate::budget::ConnectBudget;
use crate::config::{BackfillConfig, BackfillPolicy, LivenessConfig, ReadConfig, RetryConfig};
use crate::error::{ErrorKind, StreamError};
use crate::events::{ConnEvent, ConnKey, ConnPhase, ConnSnapshot, StaleReason};
use crate::liveness::PartitionLiveness;
use crate::policy::{Decision, ReconnectPolicy};
use crate::reader::{Frame, LineReader};

/// Credentials for the upstream. Never logged.
#[derive(Debug, Clone)]
pub enum Auth {
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

/// Which API's parameter names a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// Gnip 2.0: `partition`, `backfillMinutes`, `startTime`/`endTime` (with milliseconds).
    Gnip,
    /// X API v2: `partition`, `backfill_minutes`, `start_time`/`end_time` (seconds).
    V2,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    Live { backfill_minutes: u64 },
    Recovery { start_ms: u64, end_ms: u64 },
}

/// A stream endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The stream URL without query parameters.
    pub url: String,
    pub api: ApiKind,
    /// Whether the `partition` parameter is sent (Gnip always; v2 volume streams).
    pub partitioned: bool,
    pub auth: Auth,
}

impl Endpoint {
    /// The account whose recovery jobs this stream counts against: the Gnip account in
    /// the URL (`…/accounts/<account>/…`), or (X API v2) the URL itself.
    pub fn account(&self) -> String {
        let mut parts = self.url.split('/');
        while let Some(p) = parts.next() {
            if p == "accounts"
                && let Some(account) = parts.next()
            {
                return account.to_owned();
            }
        }
        self.url.split('?').next().unwrap_or(&self.url).to_owned()
    }

    /// The request URL for a partition and a query.
    pub fn request_url(&self, partition: Partition, query: Query) -> String {
        let mut params = Vec::new();
        if self.partitioned {
            params.push(format!("partition={partition}"));
        }
        match (query, self.api) {
            (
                Query::Live {
                    backfill_minutes: 0,
                },
                _,
            ) => {}
            (Query::Live { backfill_minutes }, ApiKind::Gnip) => {
                params.push(format!("backfillMinutes={backfill_minutes}"))
            }
            (Query::Live { backfill_minutes }, ApiKind::V2) => {
                params.push(format!("backfill_minutes={backfill_minutes}"))
            }
            (Query::Recovery { start_ms, end_ms }, ApiKind::Gnip) => {
                params.push(format!("startTime={}", rfc3339_ms(start_ms)));
                params.push(format!("endTime={}", rfc3339_ms(end_ms)));
            }
            (Query::Recovery { start_ms, end_ms }, ApiKind::V2) => {
                params.push(format!("start_time={}", rfc3339_secs(start_ms)));
                params.push(format!(
                    "end_time={}",
                    rfc3339_secs(end_ms.div_ceil(1000) * 1000)
                ));
            }
        }
        if params.is_empty() {
            self.url.clone()
        } else {
            format!("{}?{}", self.url, params.join("&"))
        }
    }

    /// Sends the request; a non-200 answer becomes a classified error.
    pub async fn open(
        &self,
        client: &reqwest::Client,
        partition: Partition,
        query: Query,
    ) -> Result<reqwest::Response, StreamError> {
        let mut req = client
            .get(self.request_url(partition, query))
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .header(reqwest::header::CONNECTION, "keep-alive");
        req = match &self.auth {
            Auth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
            Auth::Bearer(token) => req.bearer_auth(token.expose()),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| StreamError::from_reqwest(&e))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(resp);
        }
        let retry_after = retry_after(resp.headers());
        let body = tokio::time::timeout(Duration::from_secs(2), resp.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Err(StreamError::from_status(status, &body, retry_after))
    }
}

/// The content time of a batch: the creation time of its latest line that has one.
/// System, error and unparseable lines never count, so a batch of them advances nothing.
fn content_time(lines: &[bytes::Bytes]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| tandem_core::content_time_ms(l))
}

/// The upstream's clock minus the host's (ms), from a response's `Date` header. The header
/// has whole seconds, so offsets within a second and a half count as none.
pub fn clock_offset_ms(headers: &reqwest::header::HeaderMap, host_ms: u64) -> Option<i64> {
    let date = headers.get(reqwest::header::DATE)?.to_str().ok()?;
    let at = httpdate::parse_http_date(date).ok()?;
    let upstream_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64 + 500;
    let offset = upstream_ms - host_ms as i64;
    Some(if offset.abs() <= 1_500 { 0 } else { offset })
}

/// Resolves once `true` is (or has been) sent on the shutdown channel.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How long the upstream asks us to wait: `Retry-After` (seconds or HTTP date) or
/// `x-rate-limit-reset` (epoch seconds).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return at.duration_since(std::time::SystemTime::now()).ok();
        }
    }
    let reset = text("x-rate-limit-reset")?.parse::<u64>().ok()?;
    let now = unix_ms_now();
    Some(Duration::from_millis((reset * 1000).saturating_sub(now)))
}

/// Everything one connection needs.
#[derive(Debug, Clone)]
pub struct ConnectionSpec {
    pub key: ConnKey,
    pub origin: Origin,
    pub endpoint: Endpoint,
    pub client: reqwest::Client,
    pub retry: RetryConfig,
    pub liveness: LivenessConfig,
    pub backfill: BackfillConfig,
    pub read: ReadConfig,
    pub budget: Arc<ConnectBudget>,
    pub partition: Arc<PartitionLiveness>,
    /// The partition's shared counts (this connection adds to `raw`).
    pub tally: Arc<Tally>,
}

/// A running connection.
#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    pub state: watch::Receiver<ConnSnapshot>,
    task: JoinHandle<()>,
}

impl Connection {
    /// Starts the connection. Batches go to `out` (backpressure: reading waits while it is
    /// full); events go to `events`; a `true` on `shutdown` ends it.
    pub fn spawn(
        spec: ConnectionSpec,
        out: mpsc::Sender<Batch>,
        events: mpsc::UnboundedSender<ConnEvent>,
        shutdown: watch::Receiver<bool>,
    ) -> Connection {
        let (state_tx, state) = watch::channel(ConnSnapshot::default());
        let key = spec.key.clone();
        let meters = Meters::new(&spec.key);
        meters.register();
        let seed = u64::from(spec.origin.partition) << 8
            | u64::from(spec.origin.path.0)
            | (unix_ms_now() << 16);
        let runner = Runner {
            policy: ReconnectPolicy::new(spec.retry.clone(), seed),
            spec,
            out,
            events,
            shutdown,
            state: state_tx,
            meters,
            connections: 0,
        };
        Connection {
            key,
            state,
            task: tokio::spawn(runner.run()),
        }
    }

    /// Waits until the connection has stopped (after shutdown or a fatal error).
    pub async fn join(self) {
        let _ = self.task.await;
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Metric handles, resolved once per connection.
#[derive(Debug)]
struct Meters {
    labels: Vec<(&'static str, String)>,
    raw: Counter,
    heartbeats: Counter,
    bytes: Counter,
    oversize: Counter,
    partial: Counter,
    attempts: Counter,
    connects: Counter,
    up: Gauge,
    backoff: Gauge,
    heartbeat_gap: Gauge,
    silence: Gauge,
    budget: Gauge,
    clock_offset: Gauge,
    future: Counter,
}

impl Meters {
    fn new(key: &ConnKey) -> Meters {
        let labels = vec![
            (m::STREAM, key.stream.to_string()),
            (m::PARTITION, key.partition.to_string()),
            (m::PATH, key.path.to_string()),
        ];
        Meters {
            raw: metrics::counter!(m::RAW_ACTIVITIES, &labels),
            heartbeats: metrics::counter!(m::HEARTBEATS, &labels),
            bytes: metrics::counter!(m::RECEIVED_BYTES, &labels),
            oversize: metrics::counter!(m::OVERSIZE_LINES, &labels),
            partial: metrics::counter!(m::PARTIAL_LINES, &labels),
            attempts: metrics::counter!(m::CONNECT_ATTEMPTS, &labels),
            connects: metrics::counter!(m::CONNECTS, &labels),
            up: metrics::gauge!(m::CONNECTION_UP, &labels),
            backoff: metrics::gauge!(m::CONNECTION_BACKOFF, &labels),
            heartbeat_gap: metrics::gauge!(m::HEARTBEAT_GAP, &labels),
            silence: metrics::gauge!(m::DATA_SILENCE, &labels),
            budget: metrics::gauge!(m::CONNECT_BUDGET_REMAINING, m::STREAM => key.stream.to_string()),
            clock_offset: metrics::gauge!(m::UPSTREAM_CLOCK_OFFSET, &labels),
            future: metrics::counter!(m::FUTURE_CONTENT_TIMES, &labels),
            labels,
        }
    }

    /// Creates the labelled series at zero, so rules and dashboards see them from the start.
    fn register(&self) {
        use crate::error::ErrorKind::*;
        self.future.increment(0);
        self.clock_offset.set(0.0);
        for kind in [
            Connection,
            Timeout,
            ServerError,
            RateLimited,
            StreamInterrupted,
            Authentication,
            ClientError,
            Fatal,
        ] {
            let mut labels = self.labels.clone();
            labels.push((m::KIND, kind.label().to_owned()));
            metrics::counter!(m::DISCONNECTS, &labels).increment(0);
        }
        for reason in [StaleReason::HeartbeatGap, StaleReason::DataSilence] {
            let mut labels = self.labels.clone();
            labels.push((m::REASON, reason.label().to_owned()));
            metrics::counter!(m::STALE_CONNECTIONS, &labels).increment(0);
        }
    }

    fn disconnect(&self, kind: ErrorKind) {
        let mut labels = self.labels.clone();
        labels.push((m::KIND, kind.label().to_owned()));
        metrics::counter!(m::DISCONNECTS, &labels).increment(1);
    }

    fn stale(&self, reason: StaleReason) {
        let mut labels = self.labels.clone();
        labels.push((m::REASON, reason.label().to_owned()));
        metrics::counter!(m::STALE_CONNECTIONS, &labels).increment(1);
    }
}

struct Runner {
    spec: ConnectionSpec,
    policy: ReconnectPolicy,
    out: mpsc::Sender<Batch>,
    events: mpsc::UnboundedSender<ConnEvent>,
    shutdown: watch::Receiver<bool>,
    state: watch::Sender<ConnSnapshot>,
    meters: Meters,
    connections: u64,
}

/// How a read loop ended.
enum Ended {
    Error(StreamError),
    Shutdown,
}

impl Runner {
    fn emit(&self, event: ConnEvent) {
        let _ = self.events.send(event);
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn run(mut self) {
        loop {
            if self.shutting_down() {
                break;
            }
            self.state.send_modify(|s| {
                s.phase = ConnPhase::Connecting;
                s.current_backoff = None;
            });
            self.meters.backoff.set(0.0);
            let urgent = self.spec.partition.live_count() == 0;
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                () = self.spec.budget.acquire(urgent) => {}
                _ = stopped(&mut shutdown) => break,
            }
            self.meters.budget.set(self.spec.budget.remaining() as f64);
            let backfill = self.backfill_minutes();
            let attempt = self.policy.failures() + 1;
            self.emit(ConnEvent::Connecting {
                key: self.spec.key.clone(),
                attempt,
                backfill_minutes: backfill,
            });
            self.meters.attempts.increment(1);
            let opened = self
                .spec
                .endpoint
                .open(
                    &self.spec.client,
                    self.spec.origin.partition,
                    Query::Live {
                        backfill_minutes: backfill,
                    },
                )
                .await;
            let (error, live_for) = match opened {
                Err(e) => (e, None),
                Ok(resp) => {
                    let started = Instant::now();
                    match self.stream(resp, backfill).await {
                        Ended::Shutdown => break,
                        Ended::Error(e) => (e, Some(started.elapsed())),
                    }
                }
            };
            self.meters.disconnect(error.kind);
            tracing::warn!(
                stream = %self.spec.key.stream, partition = self.spec.key.partition, path = %self.spec.key.path,
                kind = error.kind.label(), status = error.status, live_secs = live_for.map(|d| d.as_secs_f64()),
                error = %error.message, "connection ended"
            );
            self.emit(ConnEvent::Disconnected {
                key: self.spec.key.clone(),
                error: error.clone(),
                live_for,
            });
            self.state
                .send_modify(|s| s.last_error = Some(error.clone()));
            match self.policy.decide(&error, live_for, Instant::now()) {
                Decision::GiveUp(fatal) => {
                    tracing::error!(
                        stream = %self.spec.key.stream, partition = self.spec.key.partition, path = %self.spec.key.path,
                        kind = fatal.kind.label(), error = %fatal.message, "connection stopped for good"
                    );
                    self.emit(ConnEvent::Fatal {
                        key: self.spec.key.clone(),
                        error: fatal.clone(),
                    });
                    self.state.send_modify(|s| {
                        s.phase = ConnPhase::Stopped;
                        s.last_error = Some(fatal);
                    });
                    return;
                }
                Decision::Retry { delay, attempt } => {
                    if let Some(persisted) = self.policy.escalation(Instant::now()) {
                        self.emit(ConnEvent::Escalated {
                            key: self.spec.key.clone(),
                            persisted,
                        });
                    }
                    self.state.send_modify(|s| {
                        s.phase = ConnPhase::Backoff;
                        s.retry_count = attempt;
                        s.current_backoff = Some(delay);
                    });
                    self.meters.backoff.set(delay.as_secs_f64());
                    self.emit(ConnEvent::Reconnecting {
                        key: self.spec.key.clone(),
                        attempt,
                        delay,
                    });
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        () = sleep(delay) => {}
                        _ = stopped(&mut shutdown) => break,
                    }
                }
            }
        }
        self.state.send_modify(|s| s.phase = ConnPhase::Stopped);
        self.meters.up.set(0.0);
    }

    /// How many minutes to replay on this connect (see [`BackfillPolicy`]).
    fn backfill_minutes(&self) -> u64 {
        let cfg: &BackfillConfig = &self.spec.backfill;
        match cfg.policy {
            BackfillPolicy::Never => 0,
            BackfillPolicy::Always => cfg.window_minutes,
            BackfillPolicy::Auto => {
                let now = self.spec.partition.upstream_now_ms();
                // A sibling that delivered within this window covers the partition.
                let fresh_ms = (self.spec.liveness.data_silence_ms / 2).clamp(100, 1_000);
                let path = usize::from(self.spec.origin.path.0);
                let Some(since) = self.spec.partition.backfill_from(path, now, fresh_ms) else {
                    return 0;
                };
                // Two seconds of slack for the time the request itself takes.
                let gap_ms = now.saturating_sub(since) + 2_000;
                let minutes = (gap_ms.div_ceil(cfg.minute_ms)).max(1);
                if minutes > cfg.window_minutes {
                    // The backfill reaches back to `now - reach`; the two seconds of
                    // slack let its start (taken when the answer comes) join the interval
                    // handed to recovery, which also adds a margin on each side.
                    let reach = cfg.window_minutes * cfg.minute_ms;
                    let end_ms = (now + 2_000).saturating_sub(reach);
                    self.spec.partition.hand_over(end_ms);
                    self.emit(ConnEvent::UncoveredBeyondBackfill {
                        stream: self.spec.key.stream.clone(),
                        partition: self.spec.key.partition,
                        start_ms: since,
                        end_ms,
                    });
                    cfg.window_minutes
                } else {
                    minutes
                }
            }
        }
    }

    /// Reads an established stream until it ends.
    async fn stream(&mut self, mut resp: reqwest::Response, backfill: u64) -> Ended {
        self.connections += 1;
        let connection = self.connections;
        let spec = &self.spec;
        let path = usize::from(spec.origin.path.0);
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let mut reader =
            LineReader::new(gzip, spec.read.chunk_size_bytes, spec.read.max_line_bytes);
        let host_ms = unix_ms_now();
        if let Some(offset) = clock_offset_ms(resp.headers(), host_ms) {
            self.meters.clock_offset.set(offset as f64 / 1000.0);
            if offset.unsigned_abs() > spec.liveness.max_clock_skew_ms {
                tracing::warn!(stream = %spec.key.stream, partition = spec.key.partition, path = %spec.key.path, offset_ms = offset, max_clock_skew_ms = spec.liveness.max_clock_skew_ms, "the upstream's clock is far from the host's; coverage uses the upstream's");
            }
            spec.partition.set_clock_offset(offset);
        }
        let now_wall = spec.partition.upstream_now_ms();
        // Content time from which this connection delivers continuously.
        let covered_from = now_wall.saturating_sub(backfill * spec.backfill.minute_ms);
        spec.partition.set_live(path, covered_from);
        self.meters.connects.increment(1);
        self.meters.up.set(1.0);
        self.state.send_modify(|s| {
            s.phase = ConnPhase::Live;
            s.connected_since_ms = Some(now_wall);
            s.connects += 1;
            s.current_backoff = None;
        });
        self.meters.backoff.set(0.0);
        tracing::info!(stream = %spec.key.stream, partition = spec.key.partition, path = %spec.key.path, connection, backfill_minutes = backfill, "connected");
        self.emit(ConnEvent::Connected {
            key: spec.key.clone(),
            connection,
            backfill_minutes: backfill,
        });

        let heartbeat_gap = Duration::from_millis(
            spec.liveness.heartbeat_interval_ms + spec.liveness.heartbeat_margin_ms,
        );
        let silence = Duration::from_millis(spec.liveness.data_silence_ms);
        let tick = (heartbeat_gap.min(silence) / 5)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        let mut watchdog = interval(tick);
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let started = Instant::now();
        let mut last_byte = started;
        let mut last_activity = started;
        let mut last_snapshot = started;
        let mut seq = 0u64;
        let mut frames = Vec::new();
        let mut oversize_seen = 0;
        let mut last_error_line: Option<String> = None;
        let (mut items, mut heartbeats, mut bytes) = (0u64, 0u64, 0u64);
        let mut shutdown = self.shutdown.clone();

        let ended = loop {
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break Ended::Shutdown,
                chunk = resp.chunk() => {
                    let chunk = match chunk {
                        Err(e) => break Ended::Error(StreamError::from_reqwest(&e)),
                        Ok(None) => {
                            let why = last_error_line.take().unwrap_or_else(|| "the server closed the stream".to_owned());
                            break Ended::Error(StreamError::new(ErrorKind::StreamInterrupted, why));
                        }
                        Ok(Some(c)) => c,
                    };
                    let now = Instant::now();
                    last_byte = now;
                    bytes += chunk.len() as u64;
                    self.meters.bytes.increment(chunk.len() as u64);
                    if let Err(e) = reader.feed(&chunk, &mut frames) {
                        break Ended::Error(StreamError::new(ErrorKind::StreamInterrupted, format!("undecodable stream: {e}")));
                    }
                    if reader.oversize > oversize_seen {
                        let n = reader.oversize - oversize_seen;
                        oversize_seen = reader.oversize;
                        self.meters.oversize.increment(n);
                        tracing::warn!(stream = %spec.key.stream, partition = spec.key.partition, path = %spec.key.path, lines = n, max_line_bytes = spec.read.max_line_bytes, "oversize line skipped");
                    }
                    let mut lines = Vec::with_capacity(frames.len());
                    for f in frames.drain(..) {
                        match f {
                            Frame::Heartbeat => heartbeats += 1,
                            Frame::Line(line) => {
                                if line.starts_with(b"{\"error\"") {
                                    last_error_line = Some(String::from_utf8_lossy(&line[..line.len().min(300)]).into_owned());
                                }
                                lines.push(line);
                            }
                        }
                    }
                    if !lines.is_empty() {
                        let n = lines.len() as u64;
                        items += n;
                        self.meters.raw.increment(n);
                        Tally::add(&spec.tally.raw, n);
                        last_activity = now;
                        let content_ms = content_time(&lines).map(|t| {
                            let bound = spec.partition.upstream_now_ms() + spec.liveness.max_clock_skew_ms;
                            if t > bound {
                                self.meters.future.increment(1);
                                tracing::warn!(stream = %spec.key.stream, partition = spec.key.partition, path = %spec.key.path, ahead_ms = t - bound + spec.liveness.max_clock_skew_ms, "an activity time ahead of the clock was clamped");
                                bound - spec.liveness.max_clock_skew_ms
                            } else {
                                t
                            }
                        });
                        let batch = Batch { origin: spec.origin, connection, received: now, first_seq: seq, lines };
                        seq += n;
                        let mut stopping = self.shutdown.clone();
                        tokio::select! {
                            sent = self.out.send(batch) => if sent.is_err() {
                                break Ended::Error(StreamError::new(ErrorKind::Fatal, "the merger stopped"));
                            },
                            _ = stopped(&mut stopping) => break Ended::Shutdown,
                        }
                        // Handed, then noted: coverage only counts lines the merger will see.
                        spec.tally.lanes.hand(path, n);
                        spec.partition.note_activity(path, now, content_ms);
                        // Time spent waiting for the merger is not the upstream's silence.
                        last_byte = Instant::now();
                    }
                }
                _ = watchdog.tick() => {
                    let now = Instant::now();
                    let quiet = now.duration_since(last_byte);
                    let silent = now.duration_since(last_activity);
                    self.meters.heartbeat_gap.set(quiet.as_secs_f64());
                    self.meters.silence.set(silent.as_secs_f64());
                    if quiet > heartbeat_gap {
                        self.meters.stale(StaleReason::HeartbeatGap);
                        self.emit(ConnEvent::Stale { key: spec.key.clone(), reason: StaleReason::HeartbeatGap, silent_for: quiet });
                        break Ended::Error(StreamError::new(ErrorKind::Timeout, format!("no byte for {:.1} s (heartbeat gap)", quiet.as_secs_f64())));
                    }
                    if silent >= silence && spec.partition.sibling_ahead(path, spec.liveness.data_silence_ms / 2, started) {
                        self.meters.stale(StaleReason::DataSilence);
                        self.emit(ConnEvent::Stale { key: spec.key.clone(), reason: StaleReason::DataSilence, silent_for: silent });
                        break Ended::Error(StreamError::new(ErrorKind::Timeout, format!("no activity for {:.1} s while a sibling path delivered (data silence)", silent.as_secs_f64())));
                    }
                    if now.duration_since(last_snapshot) >= Duration::from_secs(1) {
                        last_snapshot = now;
                        self.publish_counts(&mut items, &mut heartbeats, &mut bytes);
                    }
                }
            }
        };
        let partial = reader.finish();
        if partial > 0 {
            self.meters.partial.increment(1);
            tracing::warn!(stream = %spec.key.stream, partition = spec.key.partition, path = %spec.key.path, bytes = partial, "partial line discarded at disconnect");
        }
        self.meters.heartbeats.increment(0);
        self.publish_counts(&mut items, &mut heartbeats, &mut bytes);
        self.spec.partition.set_down(path);
        self.meters.up.set(0.0);
        self.state.send_modify(|s| s.connected_since_ms = None);
        ended
    }

    /// Moves the counts since the last call into the snapshot (and heartbeats into their
    /// counter).
    fn publish_counts(&self, items: &mut u64, heartbeats: &mut u64, bytes: &mut u64) {
        let (i, h, b) = (
            std::mem::take(items),
            std::mem::take(heartbeats),
            std::mem::take(bytes),
        );
        self.meters.heartbeats.increment(h);
        let now = unix_ms_now();
        self.state.send_modify(|s| {
            s.items_received += i;
            s.heartbeats += h;
            s.bytes_received += b;
            if i > 0 {
                s.last_activity_ms = Some(now);
            }
            if h > 0 {
                s.last_heartbeat_ms = Some(now);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(api: ApiKind, partitioned: bool) -> Endpoint {
        Endpoint {
            url:
                "https://gnip-stream.x.com/stream/sample10/accounts/a/publishers/twitter/prod.json"
                    .into(),
            api,
            partitioned,
            auth: Auth::Bearer(Secret::new("t")),
        }
    }

    /// Each API gets its own parameter spelling and time format.
    #[test]
    fn request_urls() {
        let g = endpoint(ApiKind::Gnip, true);
        assert!(
            g.request_url(
                2,
                Query::Live {
                    backfill_minutes: 0
                }
            )
            .ends_with("prod.json?partition=2")
        );
        assert!(
            g.request_url(
                1,
                Query::Live {
                    backfill_minutes: 3
                }
            )
            .ends_with("?partition=1&backfillMinutes=3")
        );
        assert!(
            g.request_url(
                1,
                Query::Recovery {
                    start_ms: 1_688_576_952_070,
                    end_ms: 1_688_580_552_070
                }
            )
            .ends_with(
                "?partition=1&startTime=2023-07-05T17:09:12.070Z&endTime=2023-07-05T18:09:12.070Z"
            )
        );
        let v = endpoint(ApiKind::V2, false);
        assert!(
            v.request_url(
                1,
                Query::Live {
                    backfill_minutes: 2
                }
            )
            .ends_with("prod.json?backfill_minutes=2")
        );
        assert!(
            v.request_url(
                1,
                Query::Recovery {
                    start_ms: 1_688_576_952_070,
                    end_ms: 1_688_580_552_070
                }
            )
            .ends_with("?start_time=2023-07-05T17:09:12Z&end_time=2023-07-05T18:09:13Z")
        );
    }

    /// Retry-After in seconds and x-rate-limit-reset in epoch seconds both count.
    #[test]
    fn retry_after_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let mut h = reqwest::header::HeaderMap::new();
        let reset = unix_ms_now() / 1000 + 90;
        h.insert("x-rate-limit-reset", reset.to_string().parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(85) && d <= Duration::from_secs(90),
            "{d:?}"
        );
    }
}

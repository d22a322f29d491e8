//! The supervised loop of one connection: wait for the connect budget, connect (with the
//! backfill the partition needs), read until the stream ends, ask the policy whether and
//! when to try again. Every lifecycle event goes through [`Runner::emit`], which counts it,
//! logs it and sends it on, so the three never drift; the connection's names come from
//! the span it runs in.

use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Gauge};
use tandem_core::metric as m;
use tandem_core::time::unix_ms_now;
use tandem_core::{Batch, LineKind, Tally};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval, sleep};

use crate::config::{BackfillConfig, BackfillPolicy};
use crate::connection::{ConnectionSpec, Query, clock_offset_ms, content_time, stopped};
use crate::error::{ErrorKind, StreamError};
use crate::events::{ConnEvent, ConnKey, ConnPhase, ConnSnapshot, StaleReason};
use crate::policy::{Decision, ReconnectPolicy};
use crate::reader::{Frame, LineReader};

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
        self.future.increment(0);
        self.clock_offset.set(0.0);
        for kind in ErrorKind::ALL {
            self.with(m::KIND, kind.label(), |l| {
                metrics::counter!(m::DISCONNECTS, l).increment(0)
            });
        }
        for reason in StaleReason::ALL {
            self.with(m::REASON, reason.label(), |l| {
                metrics::counter!(m::STALE_CONNECTIONS, l).increment(0)
            });
        }
    }

    fn with(&self, name: &'static str, value: &str, f: impl FnOnce(&[(&'static str, String)])) {
        let mut labels = self.labels.clone();
        labels.push((name, value.to_owned()));
        f(&labels);
    }

    /// What an event changes in the connection's metrics.
    fn record(&self, event: &ConnEvent) {
        match event {
            ConnEvent::Connecting { .. } => {
                self.attempts.increment(1);
                self.backoff.set(0.0);
            }
            ConnEvent::Connected { .. } => {
                self.connects.increment(1);
                self.up.set(1.0);
                self.backoff.set(0.0);
            }
            ConnEvent::Disconnected { error, .. } => {
                self.up.set(0.0);
                self.with(m::KIND, error.kind.label(), |l| {
                    metrics::counter!(m::DISCONNECTS, l).increment(1)
                });
            }
            ConnEvent::Reconnecting { delay, .. } => self.backoff.set(delay.as_secs_f64()),
            ConnEvent::Stale { reason, .. } => self.with(m::REASON, reason.label(), |l| {
                metrics::counter!(m::STALE_CONNECTIONS, l).increment(1)
            }),
            ConnEvent::Fatal { .. } => self.up.set(0.0),
            ConnEvent::Escalated { .. } | ConnEvent::UncoveredBeyondBackfill { .. } => {}
        }
    }
}

/// How a read loop (or an attempt) ended.
pub(crate) enum Ended<E = StreamError> {
    Error(E),
    Shutdown,
}

pub(crate) struct Runner {
    spec: ConnectionSpec,
    policy: ReconnectPolicy,
    out: mpsc::Sender<Batch>,
    events: mpsc::UnboundedSender<ConnEvent>,
    shutdown: watch::Receiver<bool>,
    state: watch::Sender<ConnSnapshot>,
    meters: Meters,
    connections: u64,
    /// Activities per second on this path, averaged over about half a minute (kept across
    /// reconnects), and the seconds of activity it was measured over.
    rate: f64,
    rate_secs: f64,
    /// After a connection was closed for rate silence: the partition's latest activity
    /// (content time) then. Silence is not judged by the rate again until a newer activity
    /// arrives: the reconnect replays (backfill) whatever the upstream published meanwhile,
    /// so a new connection that brings nothing newer shows the silence is the upstream's
    /// own, and judging it again would reconnect every few seconds for as long as the
    /// partition stays quiet (and soon past what backfill reaches).
    rate_silence_at_ms: Option<u64>,
}

/// How long the pair's other consumer's report of a partition counts as current.
const PEER_REPORT_FRESH: Duration = Duration::from_secs(3);

/// The time constant of a path's activity rate (seconds).
const RATE_TIME_CONSTANT_SECS: f64 = 30.0;

/// What a connect asks the upstream to replay.
#[derive(Debug, Clone, Copy)]
struct Backfill {
    minutes: u64,
    /// Asked to replay from the partition's complete prefix (no live sibling covered it):
    /// a replay that starts after it leaves a hole for gap repair.
    from_prefix: bool,
}

/// The state of one established stream while it is read.
struct Reading {
    connection: u64,
    path: usize,
    reader: LineReader,
    frames: Vec<Frame>,
    watchdog: Interval,
    started: Instant,
    last_byte: Instant,
    last_activity: Instant,
    last_snapshot: Instant,
    seq: u64,
    oversize_seen: u64,
    /// The last `{"error":…}` line: why the upstream is about to close.
    last_error_line: Option<String>,
    /// The lines counted towards the path's rate since it was last updated.
    rate_items: u64,
    rate_at: Instant,
    /// Counted since the last snapshot.
    items: u64,
    heartbeats: u64,
    bytes: u64,
}

impl Runner {
    pub(crate) fn new(
        spec: ConnectionSpec,
        out: mpsc::Sender<Batch>,
        events: mpsc::UnboundedSender<ConnEvent>,
        shutdown: watch::Receiver<bool>,
        state: watch::Sender<ConnSnapshot>,
    ) -> Runner {
        let meters = Meters::new(&spec.key);
        meters.register();
        let seed = u64::from(spec.origin.partition) << 8
            | u64::from(spec.origin.path.0)
            | (unix_ms_now() << 16);
        Runner {
            policy: ReconnectPolicy::new(spec.retry.clone(), seed),
            spec,
            out,
            events,
            shutdown,
            state,
            meters,
            connections: 0,
            rate: 0.0,
            rate_secs: 0.0,
            rate_silence_at_ms: None,
        }
    }

    /// Counts, logs and sends an event.
    fn emit(&self, event: ConnEvent) {
        self.meters.record(&event);
        event.log();
        let _ = self.events.send(event);
    }

    fn key(&self) -> ConnKey {
        self.spec.key.clone()
    }

    pub(crate) async fn run(mut self) {
        while !*self.shutdown.borrow() {
            self.state.send_modify(|s| {
                s.phase = ConnPhase::Connecting;
                s.current_backoff = None;
            });
            let urgent = self.spec.partition.live_count() == 0;
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                () = self.spec.budget.acquire(urgent) => {}
                _ = stopped(&mut shutdown) => break,
            }
            self.meters.budget.set(self.spec.budget.remaining() as f64);
            let (error, live_for) = match self.attempt().await {
                Ended::Shutdown => break,
                Ended::Error(e) => e,
            };
            if !self.after(error, live_for).await {
                return;
            }
        }
        self.state.send_modify(|s| s.phase = ConnPhase::Stopped);
        self.meters.up.set(0.0);
    }

    /// One connection request and, if it is answered, the stream until it ends.
    async fn attempt(&mut self) -> Ended<(StreamError, Option<Duration>)> {
        let backfill = self.backfill();
        self.emit(ConnEvent::Connecting {
            key: self.key(),
            attempt: self.policy.failures() + 1,
            backfill_minutes: backfill.minutes,
        });
        let query = Query::Live {
            backfill_minutes: backfill.minutes,
        };
        let opened = self
            .spec
            .endpoint
            .open(&self.spec.client, self.spec.origin.partition, query)
            .await;
        match opened {
            Err(e) => {
                if e.kind == ErrorKind::Local {
                    // It never reached the upstream: the stream's budget is not spent.
                    self.spec.budget.refund();
                }
                Ended::Error((e, None))
            }
            Ok(resp) => {
                let started = Instant::now();
                match self.stream(resp, backfill).await {
                    Ended::Shutdown => Ended::Shutdown,
                    Ended::Error(e) => Ended::Error((e, Some(started.elapsed()))),
                }
            }
        }
    }

    /// After a connection ended: false when it stops for good.
    async fn after(&mut self, error: StreamError, live_for: Option<Duration>) -> bool {
        self.emit(ConnEvent::Disconnected {
            key: self.key(),
            error: error.clone(),
            live_for,
        });
        self.state
            .send_modify(|s| s.last_error = Some(error.clone()));
        match self.policy.decide(&error, live_for, Instant::now()) {
            Decision::GiveUp(fatal) => {
                self.emit(ConnEvent::Fatal {
                    key: self.key(),
                    error: fatal.clone(),
                });
                self.state.send_modify(|s| {
                    s.phase = ConnPhase::Stopped;
                    s.last_error = Some(fatal);
                });
                false
            }
            Decision::Retry { delay, attempt } => {
                if let Some(persisted) = self.policy.escalation(Instant::now()) {
                    self.emit(ConnEvent::Escalated {
                        key: self.key(),
                        persisted,
                    });
                }
                self.state.send_modify(|s| {
                    s.phase = ConnPhase::Backoff;
                    s.retry_count = attempt;
                    s.current_backoff = Some(delay);
                });
                self.emit(ConnEvent::Reconnecting {
                    key: self.key(),
                    attempt,
                    delay,
                });
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    () = sleep(delay) => true,
                    _ = stopped(&mut shutdown) => false,
                }
            }
        }
    }

    /// How many minutes to replay on this connect (see [`BackfillPolicy`]).
    fn backfill(&self) -> Backfill {
        let cfg: &BackfillConfig = &self.spec.backfill;
        let minutes = |minutes| Backfill {
            minutes,
            from_prefix: false,
        };
        match cfg.policy {
            BackfillPolicy::Never => minutes(0),
            BackfillPolicy::Always => minutes(cfg.window_minutes),
            BackfillPolicy::Auto => {
                let now = self.spec.partition.upstream_now_ms();
                // A sibling that delivered within this window covers the partition.
                let fresh_ms = (self.spec.liveness.data_silence_ms / 2).clamp(100, 1_000);
                let path = usize::from(self.spec.origin.path.0);
                let Some(since) = self.spec.partition.backfill_from(path, now, fresh_ms) else {
                    return minutes(0);
                };
                // Two seconds of slack for the time the request itself takes. Beyond the
                // window, the replay falls short of `since`: what it leaves uncovered is
                // known when the upstream answers (see `go_live`).
                let gap_ms = now.saturating_sub(since) + 2_000;
                Backfill {
                    minutes: gap_ms.div_ceil(cfg.minute_ms).clamp(1, cfg.window_minutes),
                    from_prefix: true,
                }
            }
        }
    }

    /// Reads an established stream until it ends.
    async fn stream(&mut self, mut resp: reqwest::Response, backfill: Backfill) -> Ended {
        let mut r = self.go_live(&resp, backfill);
        let mut shutdown = self.shutdown.clone();
        let ended = loop {
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break Ended::Shutdown,
                chunk = resp.chunk() => {
                    let chunk = match chunk {
                        Err(e) => break Ended::Error(StreamError::from_reqwest(&e)),
                        Ok(None) => break Ended::Error(closed_by_server(r.last_error_line.take())),
                        Ok(Some(c)) => c,
                    };
                    if let Some(ended) = self.on_chunk(&mut r, &chunk).await {
                        break ended;
                    }
                }
                _ = r.watchdog.tick() => {
                    if let Some(ended) = self.on_tick(&mut r) {
                        break ended;
                    }
                }
            }
        };
        self.went_down(&mut r);
        ended
    }

    /// The upstream answered 200: the partition's coverage and the snapshot say so.
    fn go_live(&mut self, resp: &reqwest::Response, backfill: Backfill) -> Reading {
        self.connections += 1;
        let spec = &self.spec;
        let path = usize::from(spec.origin.path.0);
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        if let Some(offset) = clock_offset_ms(resp.headers(), unix_ms_now()) {
            self.meters.clock_offset.set(offset as f64 / 1000.0);
            if offset.unsigned_abs() > spec.liveness.max_clock_skew_ms {
                tracing::warn!(
                    offset_ms = offset,
                    max_clock_skew_ms = spec.liveness.max_clock_skew_ms,
                    "the upstream's clock is far from the host's; coverage uses the upstream's"
                );
            }
            spec.partition.set_clock_offset(offset);
        }
        let now_wall = spec.partition.upstream_now_ms();
        // Content time from which this connection delivers continuously.
        let covered_from = now_wall.saturating_sub(backfill.minutes * spec.backfill.minute_ms);
        if backfill.from_prefix {
            if let Some((start_ms, end_ms)) = spec.partition.set_live_replaying(path, covered_from)
            {
                self.emit(ConnEvent::UncoveredBeyondBackfill {
                    stream: spec.key.stream.clone(),
                    partition: spec.key.partition,
                    start_ms,
                    end_ms,
                });
            }
        } else {
            spec.partition.set_live(path, covered_from);
        }
        self.state.send_modify(|s| {
            s.phase = ConnPhase::Live;
            s.connected_since_ms = Some(now_wall);
            s.connects += 1;
            s.current_backoff = None;
        });
        self.emit(ConnEvent::Connected {
            key: self.key(),
            connection: self.connections,
            backfill_minutes: backfill.minutes,
        });
        let liveness = &self.spec.liveness;
        let quiet_limit = liveness.quiet_limit(self.spec.endpoint.api);
        let silence = Duration::from_millis(liveness.data_silence_ms);
        let tick = (quiet_limit.min(silence) / 5)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        let mut watchdog = interval(tick);
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let started = Instant::now();
        let read = &self.spec.read;
        Reading {
            connection: self.connections,
            path,
            reader: LineReader::new(gzip, read.chunk_size_bytes, read.max_line_bytes),
            frames: Vec::new(),
            watchdog,
            started,
            last_byte: started,
            last_activity: started,
            last_snapshot: started,
            seq: 0,
            oversize_seen: 0,
            last_error_line: None,
            rate_items: 0,
            rate_at: started,
            items: 0,
            heartbeats: 0,
            bytes: 0,
        }
    }

    /// A chunk of the body: its lines go to the merger. `Some` when the stream must end.
    async fn on_chunk(&mut self, r: &mut Reading, chunk: &Bytes) -> Option<Ended> {
        let now = Instant::now();
        r.last_byte = now;
        r.bytes += chunk.len() as u64;
        self.meters.bytes.increment(chunk.len() as u64);
        let mut decoded = r.reader.feed(chunk, &mut r.frames);
        // The reader decodes a bounded amount at a time: each part is handed on (and
        // waits for the merger) before the next is inflated.
        loop {
            if let Err(e) = decoded {
                let why = format!("undecodable stream: {e}");
                return Some(Ended::Error(StreamError::new(
                    ErrorKind::StreamInterrupted,
                    why,
                )));
            }
            let lines = self.frames_to_lines(r);
            if !lines.is_empty()
                && let Some(ended) = self.hand_over(r, lines, now).await
            {
                return Some(ended);
            }
            if !r.reader.has_pending() {
                return None;
            }
            decoded = r.reader.resume(&mut r.frames);
        }
    }

    /// The lines among the decoded frames; heartbeats and oversize lines are counted.
    fn frames_to_lines(&self, r: &mut Reading) -> Vec<Bytes> {
        if r.reader.oversize > r.oversize_seen {
            let n = r.reader.oversize - r.oversize_seen;
            r.oversize_seen = r.reader.oversize;
            self.meters.oversize.increment(n);
            let max_line_bytes = self.spec.read.max_line_bytes;
            tracing::warn!(lines = n, max_line_bytes, "oversize line skipped");
        }
        let mut lines = Vec::with_capacity(r.frames.len());
        for f in r.frames.drain(..) {
            match f {
                Frame::Heartbeat => r.heartbeats += 1,
                Frame::Line(line) => {
                    // Gnip `{"error":…}` and X API v2 `{"errors":[…]}`: the last one says
                    // why the stream is about to end.
                    if line.starts_with(b"{\"error")
                        && let Ok(LineKind::System(m)) = tandem_core::identify(&line)
                    {
                        r.last_error_line = Some(m.message.chars().take(300).collect());
                    }
                    lines.push(line);
                }
            }
        }
        lines
    }

    /// Counts lines, hands them to the merger, then notes their coverage.
    async fn hand_over(
        &mut self,
        r: &mut Reading,
        lines: Vec<Bytes>,
        now: Instant,
    ) -> Option<Ended> {
        let spec = &self.spec;
        let n = lines.len() as u64;
        r.items += n;
        r.rate_items += n;
        self.meters.raw.increment(n);
        Tally::add(&spec.tally.raw, n);
        r.last_activity = now;
        let content_ms = content_time(&lines).map(|t| self.clamp_future(t));
        if let (Some(at), Some(t)) = (self.rate_silence_at_ms, content_ms)
            && t > at
        {
            self.rate_silence_at_ms = None;
        }
        let batch = Batch {
            origin: spec.origin,
            connection: r.connection,
            received: now,
            first_seq: r.seq,
            lines,
        };
        r.seq += n;
        let mut stopping = self.shutdown.clone();
        tokio::select! {
            sent = self.out.send(batch) => if sent.is_err() {
                return Some(Ended::Error(StreamError::new(ErrorKind::Fatal, "the merger stopped")));
            },
            _ = stopped(&mut stopping) => return Some(Ended::Shutdown),
        }
        // Handed, then noted: coverage only counts lines the merger will see.
        spec.tally.lanes.hand(r.path, n);
        spec.partition.note_activity(r.path, now, content_ms);
        // Time spent waiting for the merger is not the upstream's silence.
        r.last_byte = Instant::now();
        None
    }

    /// An activity time further ahead of the (upstream's) clock than the bound is that
    /// clock instead, so coverage never runs into the future.
    fn clamp_future(&self, t: u64) -> u64 {
        let now = self.spec.partition.upstream_now_ms();
        let skew = self.spec.liveness.max_clock_skew_ms;
        if t <= now + skew {
            return t;
        }
        self.meters.future.increment(1);
        tracing::warn!(
            ahead_ms = t - now,
            "an activity time ahead of the clock was clamped"
        );
        now
    }

    /// The watchdog: heartbeat gap and data silence. `Some` when the stream must end.
    fn on_tick(&mut self, r: &mut Reading) -> Option<Ended> {
        let now = Instant::now();
        self.update_rate(r, now);
        let liveness = &self.spec.liveness;
        let quiet_limit = liveness.quiet_limit(self.spec.endpoint.api);
        let quiet = now.duration_since(r.last_byte);
        let silent = now.duration_since(r.last_activity);
        self.meters.heartbeat_gap.set(quiet.as_secs_f64());
        self.meters.silence.set(silent.as_secs_f64());
        if quiet > quiet_limit {
            self.stale(StaleReason::HeartbeatGap, quiet);
            let why = format!("no byte for {:.1} s (heartbeat gap)", quiet.as_secs_f64());
            return Some(Ended::Error(StreamError::new(ErrorKind::Timeout, why)));
        }
        let silence = Duration::from_millis(liveness.data_silence_ms);
        let lead_ms = liveness.data_silence_ms / 2;
        if silent >= silence
            && let Some(lead) =
                self.spec
                    .partition
                    .peer_ahead(r.path, liveness.data_silence_ms, PEER_REPORT_FRESH)
        {
            self.stale(StaleReason::PeerAhead, silent);
            let why = format!(
                "no activity for {:.1} s while the pair's other consumer received activities {:.1} s newer",
                silent.as_secs_f64(),
                lead as f64 / 1000.0
            );
            return Some(Ended::Error(StreamError::new(ErrorKind::Timeout, why)));
        }
        if let Some(limit) = self.rate_silence_limit()
            && silent >= limit
        {
            self.rate_silence_at_ms = Some(self.spec.partition.latest_ms());
            self.stale(StaleReason::RateSilence, silent);
            let why = format!(
                "no activity for {:.1} s on a partition averaging {:.1} activities/s (rate silence)",
                silent.as_secs_f64(),
                self.rate
            );
            return Some(Ended::Error(StreamError::new(ErrorKind::Timeout, why)));
        }
        if silent >= silence
            && self
                .spec
                .partition
                .sibling_ahead(r.path, lead_ms, r.started)
        {
            self.stale(StaleReason::DataSilence, silent);
            let why = format!(
                "no activity for {:.1} s while a sibling path delivered (data silence)",
                silent.as_secs_f64()
            );
            return Some(Ended::Error(StreamError::new(ErrorKind::Timeout, why)));
        }
        if now.duration_since(r.last_snapshot) >= Duration::from_secs(1) {
            r.last_snapshot = now;
            self.publish_counts(r);
        }
        None
    }

    /// Folds the lines counted since the last update into the path's rate: an average
    /// over about half a minute (over all the time so far, at first). A silence leaves the
    /// rate as it was, so that the silence is judged by the rate before it.
    fn update_rate(&mut self, r: &mut Reading, now: Instant) {
        let dt = now.duration_since(r.rate_at).as_secs_f64();
        if dt < 0.1 {
            return;
        }
        r.rate_at = now;
        let n = std::mem::take(&mut r.rate_items);
        if n == 0 {
            return;
        }
        self.rate_secs += dt;
        let alpha = (1.0 - (-dt / RATE_TIME_CONSTANT_SECS).exp()).max(dt / self.rate_secs);
        self.rate += alpha * (n as f64 / dt - self.rate);
    }

    /// How long a silence the connection's own rate makes unlikely, when it has no sibling
    /// path in this process to be judged against, its rate is high enough to judge, and
    /// the silence was not already judged so by the previous connection.
    fn rate_silence_limit(&self) -> Option<Duration> {
        let liveness = &self.spec.liveness;
        if self.rate_silence_at_ms.is_some()
            || self.spec.partition.paths() > 1
            || self.rate < liveness.silence_min_rate_per_sec
        {
            return None;
        }
        let secs = (liveness.silence_rate_multiple / self.rate)
            .max(liveness.data_silence_ms as f64 / 1000.0);
        Some(Duration::from_secs_f64(secs))
    }

    fn stale(&self, reason: StaleReason, silent_for: Duration) {
        self.emit(ConnEvent::Stale {
            key: self.key(),
            reason,
            silent_for,
        });
    }

    /// The stream ended: what was half received is dropped and counted; the partition
    /// learns this path is down.
    fn went_down(&mut self, r: &mut Reading) {
        let partial = r.reader.finish();
        if partial > 0 {
            self.meters.partial.increment(1);
            tracing::warn!(bytes = partial, "partial line discarded at disconnect");
        }
        self.publish_counts(r);
        self.spec.partition.set_down(r.path);
        self.meters.up.set(0.0);
        self.state.send_modify(|s| s.connected_since_ms = None);
    }

    /// Moves the counts since the last call into the snapshot (and heartbeats into their
    /// counter).
    fn publish_counts(&self, r: &mut Reading) {
        let (i, h, b) = (
            std::mem::take(&mut r.items),
            std::mem::take(&mut r.heartbeats),
            std::mem::take(&mut r.bytes),
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

/// The error of a stream the server closed, classified by the error message it sent last:
/// an eviction by a newer connection over the partition's limit (Gnip's message, v2's
/// `TooManyConnections`), an operational disconnect (v2), or an interruption.
fn closed_by_server(last_error: Option<String>) -> StreamError {
    let Some(message) = last_error else {
        return StreamError::new(ErrorKind::StreamInterrupted, "the server closed the stream");
    };
    let lower = message.to_ascii_lowercase();
    let kind = if lower.contains("maximum number of connections")
        || lower.contains("toomanyconnections")
        || lower.contains("maximum allowed connection")
    {
        ErrorKind::Evicted
    } else if lower.contains("operationaldisconnect") || lower.contains("operational-disconnect") {
        ErrorKind::Operational
    } else {
        ErrorKind::StreamInterrupted
    };
    StreamError::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last error line says why the server closed: evicted, operational, or neither.
    #[test]
    fn server_closes_are_classified_by_their_last_error() {
        let kind = |line: &[u8]| {
            let Ok(LineKind::System(m)) = tandem_core::identify(line) else {
                panic!("not a system line")
            };
            closed_by_server(Some(m.message)).kind
        };
        assert_eq!(
            kind(br#"{"error":{"message":"This stream has been disconnected because a new connection was made and the maximum number of connections has been reached"}}"#),
            ErrorKind::Evicted
        );
        assert_eq!(
            kind(br#"{"errors":[{"title":"ConnectionException","detail":"This stream is currently at the maximum allowed connection limit.","connection_issue":"TooManyConnections","type":"https://api.twitter.com/2/problems/streaming-connection"}]}"#),
            ErrorKind::Evicted
        );
        assert_eq!(
            kind(br#"{"errors":[{"title":"operational-disconnect","disconnect_type":"OperationalDisconnect","detail":"This stream has been disconnected for operational reasons."}]}"#),
            ErrorKind::Operational
        );
        assert_eq!(
            kind(br#"{"error":{"message":"Forced disconnect"}}"#),
            ErrorKind::StreamInterrupted
        );
        assert_eq!(closed_by_server(None).kind, ErrorKind::StreamInterrupted);
    }
}

//! The monitor loop: watches connection states, events and per-partition tallies; keeps
//! coverage gaps; evaluates the alert conditions; publishes a status snapshot. It only
//! observes (channels, `watch`, atomics) and never sits in the data path.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tandem_conn::{ConnEvent, ConnKey, ConnPhase, ConnSnapshot, StaleReason};
use tandem_core::metric as m;
use tandem_core::time::unix_ms_now;
use tandem_core::{GapState, GapView, Partition, Tally, TallySnapshot};
use tandem_merge::MergeEvent;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::alert::{AlertKey, AlertName, AlertView, Alerts, Resolved, Transition};
use crate::config::MonitorConfig;

/// One connection as the monitor sees it.
#[derive(Debug, Clone)]
pub struct ConnectionView {
    pub path: Arc<str>,
    pub state: watch::Receiver<ConnSnapshot>,
}

/// One partition.
#[derive(Debug, Clone)]
pub struct PartitionView {
    pub partition: Partition,
    pub tally: Arc<Tally>,
    pub connections: Vec<ConnectionView>,
    /// Gaps beyond backfill, as gap repair reports them.
    pub gaps: watch::Receiver<Vec<GapView>>,
}

/// One stream.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub name: Arc<str>,
    /// Connections the configuration asks for per partition.
    pub configured_per_partition: usize,
    pub partitions: Vec<PartitionView>,
}

/// One sink.
#[derive(Debug, Clone)]
pub struct SinkView {
    pub name: Arc<str>,
    pub up: Arc<AtomicBool>,
    /// False once the sink's task has ended: before shutdown, it died.
    pub alive: Arc<AtomicBool>,
}

/// Everything the monitor watches.
#[derive(Debug)]
pub struct MonitorInputs {
    pub streams: Vec<StreamView>,
    pub sinks: Vec<SinkView>,
    pub conn_events: mpsc::UnboundedReceiver<ConnEvent>,
    pub merge_events: mpsc::UnboundedReceiver<MergeEvent>,
    /// The merger's dedup window (a weakened horizon heals after one window without
    /// early evictions).
    pub dedup_window: Duration,
}

/// A partition coverage gap: an interval with no live connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoverageGap {
    pub start_ms: u64,
    /// `None` while the gap is open.
    pub end_ms: Option<u64>,
    pub secs: f64,
}

/// Status of one connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub path: String,
    pub phase: &'static str,
    pub retry_count: u32,
    pub backoff_secs: Option<f64>,
    pub connected_since_ms: Option<u64>,
    pub last_activity_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    pub items_received: u64,
    pub heartbeats: u64,
    pub bytes_received: u64,
    pub connects: u64,
    pub last_error: Option<String>,
}

/// Counts of one partition.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub raw: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub system: u64,
    /// Between the merger and the sink.
    pub queued: u64,
    pub stored: u64,
    pub store_duplicates: u64,
    pub in_flight: u64,
    /// Unique activities from a grace period ago that are neither stored nor in flight.
    pub unaccounted: u64,
}

/// Status of one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: Partition,
    pub live_connections: usize,
    pub configured_connections: usize,
    pub counts: Counts,
    pub connections: Vec<ConnectionStatus>,
    /// Intervals without a live connection (the latest 50).
    pub coverage_gaps: Vec<CoverageGap>,
    /// Gaps beyond backfill and their repair.
    pub repair_gaps: Vec<GapView>,
}

/// Status of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub stored_per_sec: f64,
    pub partitions: Vec<PartitionStatus>,
}

/// Status of one sink.
#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub up: bool,
    /// False when the sink's task has ended (`/healthz` fails: restart the process).
    pub alive: bool,
}

/// What `/status` serves and the demo prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub at_ms: u64,
    pub streams: Vec<StreamStatus>,
    pub sinks: Vec<SinkStatus>,
    pub alerts: Vec<AlertView>,
    pub resolved_alerts: Vec<Resolved>,
    /// Ready: every partition has a live connection and every sink writes.
    pub ready: bool,
    pub not_ready_because: Vec<String>,
}

/// A running monitor.
#[derive(Debug)]
pub struct MonitorHandle {
    pub status: watch::Receiver<Arc<Status>>,
    /// Every alert transition, for whoever listens (demo, tests, webhook).
    pub transitions: broadcast::Sender<Transition>,
    task: JoinHandle<()>,
}

impl MonitorHandle {
    pub fn stop(&self) {
        self.task.abort();
    }
}

#[derive(Debug, Default)]
struct PartitionTrack {
    ever_covered: bool,
    open_gap: Option<(Instant, u64)>,
    gaps: VecDeque<CoverageGap>,
    unique_history: VecDeque<(Instant, u64)>,
    raw_history: VecDeque<(Instant, u64)>,
    /// When each unrecoverable gap (by start) was first seen.
    lost_seen: HashMap<u64, Instant>,
}

#[derive(Debug, Default)]
struct StreamTrack {
    last: Option<(Instant, u64)>,
    fast: f64,
    baseline: f64,
    samples: u64,
}

struct Monitor {
    cfg: MonitorConfig,
    inputs: MonitorInputs,
    alerts: Alerts,
    partitions: HashMap<(Arc<str>, Partition), PartitionTrack>,
    streams: HashMap<Arc<str>, StreamTrack>,
    stale: HashMap<ConnKey, (StaleReason, f64)>,
    fatal: HashMap<ConnKey, String>,
    escalated: HashMap<ConnKey, f64>,
    horizon_weak_until: HashMap<(Arc<str>, Partition), (Instant, String)>,
    status: watch::Sender<Arc<Status>>,
    transitions: broadcast::Sender<Transition>,
}

/// Starts the monitor loop.
pub fn spawn(cfg: MonitorConfig, inputs: MonitorInputs) -> MonitorHandle {
    crate::alert::register();
    let (status, status_rx) = watch::channel(Arc::new(Status::default()));
    let (transitions, _) = broadcast::channel(256);
    let monitor = Monitor {
        cfg,
        inputs,
        alerts: Alerts::default(),
        partitions: HashMap::new(),
        streams: HashMap::new(),
        stale: HashMap::new(),
        fatal: HashMap::new(),
        escalated: HashMap::new(),
        horizon_weak_until: HashMap::new(),
        status,
        transitions: transitions.clone(),
    };
    MonitorHandle {
        status: status_rx,
        transitions,
        task: tokio::spawn(monitor.run()),
    }
}

fn key(
    name: AlertName,
    stream: &str,
    partition: Option<Partition>,
    path: Option<&str>,
) -> AlertKey {
    AlertKey {
        name,
        stream: stream.to_owned(),
        partition,
        path: path.map(str::to_owned),
    }
}

impl Monitor {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tick_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = self.inputs.conn_events.recv() => match ev {
                    Some(ev) => self.on_conn_event(ev),
                    None => std::future::pending::<()>().await,
                },
                ev = self.inputs.merge_events.recv() => if let Some(ev) = ev {
                    self.on_merge_event(ev);
                },
                _ = tick.tick() => self.evaluate(Instant::now()),
            }
        }
    }

    /// Event-driven conditions are observed when their event arrives, not only on the next
    /// tick: a connection can go stale and be live again between two ticks, and that must
    /// still fire (and resolve) its alert.
    fn on_conn_event(&mut self, ev: ConnEvent) {
        let now = Instant::now();
        let k =
            |name: AlertName, c: &ConnKey| key(name, &c.stream, Some(c.partition), Some(&c.path));
        match ev {
            ConnEvent::Stale {
                key: c,
                reason,
                silent_for,
            } => {
                let secs = silent_for.as_secs_f64();
                self.stale.insert(c.clone(), (reason, secs));
                self.observe(
                    k(AlertName::ConnectionStale, &c),
                    true,
                    Duration::ZERO,
                    || format!("closed after {secs:.1} s ({})", reason.label()),
                    now,
                );
            }
            ConnEvent::Connected { key: c, .. } => {
                if self.stale.remove(&c).is_some() {
                    self.observe(
                        k(AlertName::ConnectionStale, &c),
                        false,
                        Duration::ZERO,
                        String::new,
                        now,
                    );
                }
                if self.escalated.remove(&c).is_some() {
                    self.observe(
                        k(AlertName::UpstreamUnavailable, &c),
                        false,
                        Duration::ZERO,
                        String::new,
                        now,
                    );
                }
            }
            ConnEvent::Fatal { key: c, error } => {
                let text = error.to_string();
                self.fatal.insert(c.clone(), text.clone());
                self.observe(
                    k(AlertName::ConnectionFatal, &c),
                    true,
                    Duration::ZERO,
                    || text,
                    now,
                );
            }
            ConnEvent::Escalated { key: c, persisted } => {
                let secs = persisted.as_secs_f64();
                self.escalated.insert(c.clone(), secs);
                self.observe(
                    k(AlertName::UpstreamUnavailable, &c),
                    true,
                    Duration::ZERO,
                    || format!("503 for {secs:.0} s"),
                    now,
                );
            }
            _ => {}
        }
    }

    fn on_merge_event(&mut self, ev: MergeEvent) {
        if let MergeEvent::EvictedEarly {
            stream,
            partition,
            total,
            horizon,
        } = ev
        {
            let until = Instant::now() + self.inputs.dedup_window;
            let message = format!(
                "{total} ids forgotten before their window ended; the dedup horizon is {:.0} s of {:.0} s",
                horizon.as_secs_f64(),
                self.inputs.dedup_window.as_secs_f64()
            );
            self.horizon_weak_until
                .insert((stream, partition), (until, message));
        }
    }

    fn observe(
        &mut self,
        k: AlertKey,
        active: bool,
        pending: Duration,
        message: impl FnOnce() -> String,
        now: Instant,
    ) {
        if let Some(t) = self.alerts.observe(k, active, pending, message, now) {
            let _ = self.transitions.send(t);
        }
    }

    fn evaluate(&mut self, now: Instant) {
        let now_ms = unix_ms_now();
        let grace = Duration::from_secs(self.cfg.reconciliation_grace_secs);
        let down_wait = Duration::from_secs_f64(self.cfg.partition_down_pending_secs);
        let imbalance_wait = Duration::from_secs_f64(self.cfg.imbalance_pending_secs);
        let mut status = Status {
            at_ms: now_ms,
            ready: true,
            ..Status::default()
        };
        let streams = self.inputs.streams.clone();
        for stream in &streams {
            let mut stream_status = StreamStatus {
                name: stream.name.to_string(),
                stored_per_sec: 0.0,
                partitions: Vec::new(),
            };
            let mut stored_total = 0u64;
            for p in &stream.partitions {
                let snaps: Vec<(Arc<str>, ConnSnapshot)> = p
                    .connections
                    .iter()
                    .map(|c| (c.path.clone(), c.state.borrow().clone()))
                    .collect();
                let live = snaps
                    .iter()
                    .filter(|(_, s)| s.phase == ConnPhase::Live)
                    .count();
                let labels = [
                    (m::STREAM, stream.name.to_string()),
                    (m::PARTITION, p.partition.to_string()),
                ];
                metrics::gauge!(m::LIVE_CONNECTIONS, &labels).set(live as f64);
                metrics::gauge!(m::CONFIGURED_CONNECTIONS, &labels)
                    .set(stream.configured_per_partition as f64);
                metrics::gauge!(m::PARTITION_UNCOVERED, &labels).set(if live == 0 {
                    1.0
                } else {
                    0.0
                });
                metrics::counter!(m::COVERAGE_GAPS, &labels).increment(0);
                metrics::counter!(m::COVERAGE_GAP_SECONDS, &labels).increment(0);

                // Coverage gaps.
                let track = self
                    .partitions
                    .entry((stream.name.clone(), p.partition))
                    .or_default();
                if live > 0 {
                    track.ever_covered = true;
                    if let Some((since, start_ms)) = track.open_gap.take() {
                        let secs = now.duration_since(since).as_secs_f64();
                        metrics::counter!(m::COVERAGE_GAPS, &labels).increment(1);
                        metrics::counter!(m::COVERAGE_GAP_SECONDS, &labels)
                            .increment(secs.round() as u64);
                        tracing::warn!(stream = %stream.name, partition = p.partition, gap_secs = secs, "partition coverage gap closed");
                        track.gaps.push_front(CoverageGap {
                            start_ms,
                            end_ms: Some(now_ms),
                            secs,
                        });
                        track.gaps.truncate(50);
                    }
                } else if track.ever_covered && track.open_gap.is_none() {
                    tracing::warn!(stream = %stream.name, partition = p.partition, "partition coverage gap opened: no live connection");
                    track.open_gap = Some((now, now_ms));
                }
                let mut gaps: Vec<CoverageGap> = track.gaps.iter().cloned().collect();
                if let Some((since, start_ms)) = track.open_gap {
                    gaps.insert(
                        0,
                        CoverageGap {
                            start_ms,
                            end_ms: None,
                            secs: now.duration_since(since).as_secs_f64(),
                        },
                    );
                }

                // Reconciliation: what was unique a grace period ago must be stored or in
                // flight now; what was raw a grace period ago must be classified now.
                let t: TallySnapshot = p.tally.snapshot();
                track.unique_history.push_back((now, t.unique));
                track.raw_history.push_back((now, t.raw));
                let old_unique = settled(&mut track.unique_history, now, grace);
                let old_raw = settled(&mut track.raw_history, now, grace);
                let unaccounted = old_unique
                    .saturating_sub(t.stored + t.store_duplicates + t.in_flight + t.queued);
                let classified = t.unique + t.duplicates + t.dead_lettered + t.system;
                let unclassified = old_raw.saturating_sub(classified);
                metrics::gauge!(m::RECONCILIATION_DIFFERENCE, &labels)
                    .set((unaccounted + unclassified) as f64);
                stored_total += t.stored;

                let name = stream.name.clone();
                self.observe(
                    key(AlertName::PartitionDown, &name, Some(p.partition), None),
                    live == 0,
                    down_wait,
                    || "no live connection on this partition".to_owned(),
                    now,
                );
                let configured = stream.configured_per_partition;
                self.observe(
                    key(
                        AlertName::PartitionImbalance,
                        &name,
                        Some(p.partition),
                        None,
                    ),
                    live > 0 && live < configured,
                    imbalance_wait,
                    || format!("{live} of {configured} connections live"),
                    now,
                );
                let repair_gaps = p.gaps.borrow().clone();
                let notice = Duration::from_secs(self.cfg.unrecoverable_gap_alert_secs);
                let track = self
                    .partitions
                    .get_mut(&(stream.name.clone(), p.partition))
                    .expect("tracked above");
                let mut lost = Vec::new();
                for g in repair_gaps
                    .iter()
                    .filter(|g| g.state == GapState::Unrecoverable)
                {
                    let seen = *track.lost_seen.entry(g.start_ms).or_insert(now);
                    if now.duration_since(seen) < notice {
                        lost.push(g);
                    }
                }
                let lost_note = lost
                    .iter()
                    .map(|g| {
                        format!(
                            "{:.0} s from {} ({})",
                            (g.end_ms - g.start_ms) as f64 / 1000.0,
                            tandem_core::time::rfc3339_ms(g.start_ms),
                            g.reason.as_deref().unwrap_or("refused")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                self.observe(
                    key(AlertName::GapUnrecoverable, &name, Some(p.partition), None),
                    !lost.is_empty(),
                    Duration::ZERO,
                    || format!("coverage gap cannot be repaired: {lost_note}"),
                    now,
                );
                self.observe(key(AlertName::ReconciliationMismatch, &name, Some(p.partition), None), unaccounted + unclassified > 0, Duration::ZERO,
                    || format!("{unaccounted} unique activities neither stored nor in flight after {} s; {unclassified} raw lines unclassified", grace.as_secs()), now);
                let weak = self
                    .horizon_weak_until
                    .get(&(name.clone(), p.partition))
                    .filter(|(until, _)| now < *until)
                    .map(|(_, msg)| msg.clone());
                self.observe(
                    key(
                        AlertName::DedupHorizonWeakened,
                        &name,
                        Some(p.partition),
                        None,
                    ),
                    weak.is_some(),
                    Duration::ZERO,
                    || weak.clone().unwrap_or_default(),
                    now,
                );

                let mut conns = Vec::new();
                for (path, s) in &snaps {
                    let ck = ConnKey {
                        stream: name.clone(),
                        partition: p.partition,
                        path: path.clone(),
                    };
                    let stale = self.stale.get(&ck).copied();
                    self.observe(
                        key(
                            AlertName::ConnectionStale,
                            &name,
                            Some(p.partition),
                            Some(path),
                        ),
                        stale.is_some(),
                        Duration::ZERO,
                        || {
                            stale
                                .map(|(r, secs)| {
                                    format!("closed after {secs:.1} s ({})", r.label())
                                })
                                .unwrap_or_default()
                        },
                        now,
                    );
                    let fatal = self.fatal.get(&ck).cloned();
                    self.observe(
                        key(
                            AlertName::ConnectionFatal,
                            &name,
                            Some(p.partition),
                            Some(path),
                        ),
                        fatal.is_some(),
                        Duration::ZERO,
                        || fatal.clone().unwrap_or_default(),
                        now,
                    );
                    let escalated = self.escalated.get(&ck).copied();
                    self.observe(
                        key(
                            AlertName::UpstreamUnavailable,
                            &name,
                            Some(p.partition),
                            Some(path),
                        ),
                        escalated.is_some(),
                        Duration::ZERO,
                        || {
                            escalated
                                .map(|s| format!("503 for {s:.0} s"))
                                .unwrap_or_default()
                        },
                        now,
                    );
                    conns.push(ConnectionStatus {
                        path: path.to_string(),
                        phase: s.phase.label(),
                        retry_count: s.retry_count,
                        backoff_secs: s.current_backoff.map(|d| d.as_secs_f64()),
                        connected_since_ms: s.connected_since_ms,
                        last_activity_ms: s.last_activity_ms,
                        last_heartbeat_ms: s.last_heartbeat_ms,
                        items_received: s.items_received,
                        heartbeats: s.heartbeats,
                        bytes_received: s.bytes_received,
                        connects: s.connects,
                        last_error: s.last_error.as_ref().map(ToString::to_string),
                    });
                }
                if live == 0 {
                    status.ready = false;
                    status.not_ready_because.push(format!(
                        "{} partition {} has no live connection",
                        stream.name, p.partition
                    ));
                }
                stream_status.partitions.push(PartitionStatus {
                    partition: p.partition,
                    live_connections: live,
                    configured_connections: configured,
                    counts: Counts {
                        raw: t.raw,
                        unique: t.unique,
                        duplicates: t.duplicates,
                        dead_lettered: t.dead_lettered,
                        system: t.system,
                        queued: t.queued,
                        stored: t.stored,
                        store_duplicates: t.store_duplicates,
                        in_flight: t.in_flight,
                        unaccounted,
                    },
                    connections: conns,
                    coverage_gaps: gaps,
                    repair_gaps,
                });
            }
            stream_status.stored_per_sec = self.stored_rate(&stream.name, stored_total, now);
            status.streams.push(stream_status);
        }
        for sink in self.inputs.sinks.clone() {
            let alive = sink.alive.load(Ordering::Relaxed);
            let up = alive && sink.up.load(Ordering::Relaxed);
            self.observe(
                key(AlertName::SinkDown, &sink.name, None, None),
                !up,
                Duration::from_secs(1),
                || "the store refuses writes; activities are held and spooled".to_owned(),
                now,
            );
            if !up {
                status.ready = false;
                status
                    .not_ready_because
                    .push(format!("sink {} cannot write", sink.name));
            }
            status.sinks.push(SinkStatus {
                name: sink.name.to_string(),
                up,
                alive,
            });
        }
        status.alerts = self.alerts.active();
        status.resolved_alerts = self.alerts.recent();
        self.status.send_replace(Arc::new(status));
    }

    /// Tracks the stored rate of a stream against its baseline; returns the short-term rate.
    fn stored_rate(&mut self, stream: &Arc<str>, stored: u64, now: Instant) -> f64 {
        let cfg = &self.cfg;
        let track = self.streams.entry(stream.clone()).or_default();
        let Some((at, before)) = track.last.replace((now, stored)) else {
            return 0.0;
        };
        let dt = now.duration_since(at).as_secs_f64();
        if dt <= 0.0 {
            return track.fast;
        }
        let rate = stored.saturating_sub(before) as f64 / dt;
        let alpha = |tau: f64| 1.0 - (-dt / tau).exp();
        track.samples += 1;
        if track.samples == 1 {
            track.fast = rate;
            track.baseline = rate;
        } else {
            track.fast += alpha(5.0) * (rate - track.fast);
            track.baseline += alpha(cfg.stored_rate_baseline_secs) * (rate - track.baseline);
        }
        let (fast, baseline) = (track.fast, track.baseline);
        let dropped =
            baseline >= cfg.stored_rate_min_per_sec && fast < cfg.stored_rate_drop_ratio * baseline;
        let pending = Duration::from_secs_f64(cfg.stored_rate_pending_secs);
        self.observe(
            key(AlertName::StoredRateDrop, stream, None, None),
            dropped,
            pending,
            || format!("stored {fast:.1}/s against a baseline of {baseline:.1}/s"),
            now,
        );
        fast
    }
}

/// The newest value at least `grace` old (dropping older history), or 0.
fn settled(history: &mut VecDeque<(Instant, u64)>, now: Instant, grace: Duration) -> u64 {
    while history.len() >= 2 && now.duration_since(history[1].0) >= grace {
        history.pop_front();
    }
    match history.front() {
        Some(&(at, v)) if now.duration_since(at) >= grace => v,
        _ => 0,
    }
}

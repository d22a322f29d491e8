//! The monitor loop: takes in lifecycle events as they arrive and, on every tick, reads
//! each partition's connection states, tally and repair gaps once, hands them to each
//! concern in turn (coverage, reconciliation, event-reported conditions, stored rate,
//! sinks) and publishes the resulting [`Status`]. It only observes (channels, `watch`,
//! atomics) and never sits in the data path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_conn::{ConnEvent, ConnKey, ConnPhase, ConnSnapshot};
use tandem_core::Partition;
use tandem_core::metric as m;
use tandem_core::time::unix_ms_now;
use tandem_merge::MergeEvent;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::alert::{AlertBus, AlertKey, AlertName, Transition, key};
use crate::config::MonitorConfig;
use crate::coverage::Coverage;
use crate::events::Events;
use crate::reconciliation::Reconciliation;
use crate::stored_rate::StoredRate;

// The types that moved out of this module keep their old paths here as well
// (`tandem_monitor::monitor::Status`).
pub use crate::inputs::{ConnectionView, MonitorInputs, PartitionView, SinkView, StreamView};
pub use crate::status::{
    ConnectionStatus, Counts, CoverageGap, PartitionStatus, SinkStatus, Status, StreamStatus,
};

/// How long a sink may refuse writes before `sink_down` fires.
const SINK_DOWN_PENDING: Duration = Duration::from_secs(1);

/// A running monitor.
#[derive(Debug)]
pub struct MonitorHandle {
    pub status: watch::Receiver<Arc<Status>>,
    /// Every alert transition, for whoever listens (demo, tests, webhook).
    pub transitions: broadcast::Sender<Transition>,
    finish: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl MonitorHandle {
    /// Stops the monitor at once.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Stops the monitor after one last evaluation, so `/status` and the counts show
    /// the state everything ended in.
    pub async fn finish(self) {
        let _ = self.finish.send(());
        let _ = self.task.await;
    }
}

/// Starts the monitor loop.
pub fn spawn(cfg: MonitorConfig, inputs: MonitorInputs) -> MonitorHandle {
    crate::alert::register();
    let (status, status_rx) = watch::channel(Arc::new(Status::default()));
    let (transitions, _) = broadcast::channel(256);
    let MonitorInputs {
        streams,
        sinks,
        conn_events,
        merge_events,
        dedup_window,
        pair,
    } = inputs;
    let rate_limited_after = cfg.rate_limited_after;
    let monitor = Monitor {
        cfg,
        pair,
        streams,
        sinks,
        concerns: Concerns {
            alerts: AlertBus::new(transitions.clone()),
            coverage: Coverage::default(),
            reconciliation: Reconciliation::default(),
            events: Events::new(dedup_window, rate_limited_after),
            stored_rate: StoredRate::default(),
        },
        status,
    };
    let (finish, finished) = tokio::sync::oneshot::channel();
    MonitorHandle {
        status: status_rx,
        transitions,
        finish,
        task: tokio::spawn(monitor.run(conn_events, merge_events, finished)),
    }
}

struct Monitor {
    cfg: MonitorConfig,
    pair: Option<tandem_pair::Pair>,
    streams: Vec<StreamView>,
    sinks: Vec<SinkView>,
    concerns: Concerns,
    status: watch::Sender<Arc<Status>>,
}

/// What the monitor remembers between ticks, one field per concern, all raising their
/// alerts on the one bus.
#[derive(Debug)]
struct Concerns {
    alerts: AlertBus,
    coverage: Coverage,
    reconciliation: Reconciliation,
    events: Events,
    stored_rate: StoredRate,
}

/// One partition at one tick: what each concern judges.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartitionTick<'a> {
    pub(crate) stream: &'a Arc<str>,
    pub(crate) partition: Partition,
    pub(crate) now: Instant,
    /// The wall-clock time of the tick, for what `/status` shows.
    pub(crate) now_ms: u64,
}

impl PartitionTick<'_> {
    /// The key of the concerns' per-partition state.
    pub(crate) fn id(&self) -> (Arc<str>, Partition) {
        (self.stream.clone(), self.partition)
    }

    pub(crate) fn labels(&self) -> [(&'static str, String); 2] {
        [
            (m::STREAM, self.stream.to_string()),
            (m::PARTITION, self.partition.to_string()),
        ]
    }

    /// The key of a per-partition alert.
    pub(crate) fn alert_key(&self, name: AlertName) -> AlertKey {
        key(name, self.stream, Some(self.partition), None)
    }

    fn conn_key(&self, path: &Arc<str>) -> ConnKey {
        ConnKey {
            stream: self.stream.clone(),
            partition: self.partition,
            path: path.clone(),
        }
    }
}

impl Monitor {
    async fn run(
        mut self,
        mut conn_events: mpsc::UnboundedReceiver<ConnEvent>,
        mut merge_events: mpsc::UnboundedReceiver<MergeEvent>,
        mut finished: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tick_ms.max(10)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A closed channel stops being polled: it answers `None` at once, for ever, and
        // must neither block the loop nor starve the ticks (all connection tasks end when
        // the credentials are refused, and that is exactly when the alerts matter).
        let (mut conns_open, mut merges_open) = (true, true);
        // A handle dropped without `finish` leaves the monitor running.
        let mut finish_open = true;
        loop {
            tokio::select! {
                ev = conn_events.recv(), if conns_open => match ev {
                    Some(ev) => self.concerns.on_conn_event(ev, Instant::now()),
                    None => conns_open = false,
                },
                ev = merge_events.recv(), if merges_open => match ev {
                    Some(ev) => self.concerns.events.on_merge_event(ev, Instant::now()),
                    None => merges_open = false,
                },
                _ = tick.tick() => self.evaluate(Instant::now()),
                asked = &mut finished, if finish_open => match asked {
                    Ok(()) => {
                        self.evaluate(Instant::now());
                        return;
                    }
                    Err(_) => finish_open = false,
                },
            }
        }
    }

    /// One tick: judges every stream, then every sink, and publishes the status.
    fn evaluate(&mut self, now: Instant) {
        let now_ms = unix_ms_now();
        let (cfg, concerns, pair) = (&self.cfg, &mut self.concerns, self.pair.as_ref());
        let streams = self
            .streams
            .iter()
            .map(|s| concerns.stream(cfg, s, pair, now, now_ms))
            .collect();
        let pair_coordinated = pair.map(|p| concerns.pair(cfg, p, now));
        let sinks = self.sinks.iter().map(|k| concerns.sink(k, now)).collect();
        let mut status = Status {
            at_ms: now_ms,
            streams,
            sinks,
            alerts: concerns.alerts.alerts().active(),
            resolved_alerts: concerns.alerts.alerts().recent(),
            pair_coordinated,
            ..Status::default()
        };
        status.judge_readiness();
        self.status.send_replace(Arc::new(status));
    }
}

impl Concerns {
    /// Event-driven conditions are observed when their event arrives, not only on the
    /// next tick.
    fn on_conn_event(&mut self, ev: ConnEvent, now: Instant) {
        self.events.on_conn_event(&mut self.alerts, ev, now);
    }

    /// `pair_coordination_lost`: the bucket unreachable for longer than a partition may be
    /// down. Returns whether the pair is coordinated now.
    fn pair(&mut self, cfg: &MonitorConfig, pair: &tandem_pair::Pair, now: Instant) -> bool {
        let state = pair.state().borrow().clone();
        self.alerts.observe(
            key(
                AlertName::PairCoordinationLost,
                pair.consumer_id(),
                None,
                None,
            ),
            !state.coordinated,
            Duration::from_secs_f64(cfg.partition_down_pending_secs),
            || {
                let why = state.last_error.clone().unwrap_or_default();
                format!("the pair's coordination bucket cannot be reached: {why}")
            },
            now,
        );
        state.coordinated
    }

    fn stream(
        &mut self,
        cfg: &MonitorConfig,
        stream: &StreamView,
        pair: Option<&tandem_pair::Pair>,
        now: Instant,
        now_ms: u64,
    ) -> StreamStatus {
        let partitions: Vec<PartitionStatus> = stream
            .partitions
            .iter()
            .map(|p| {
                let tick = PartitionTick {
                    stream: &stream.name,
                    partition: p.partition,
                    now,
                    now_ms,
                };
                let mut status = self.partition(cfg, &tick, stream.configured_per_partition, p);
                status.peer = pair.and_then(|pair| peer_status(pair, &stream.name, p.partition));
                status
            })
            .collect();
        let stored = partitions.iter().map(|p| p.counts.stored).sum();
        let rate = &mut self.stored_rate;
        let stored_per_sec = rate.evaluate(&mut self.alerts, cfg, &stream.name, stored, now);
        StreamStatus {
            name: stream.name.to_string(),
            stored_per_sec,
            partitions,
        }
    }

    /// Reads a partition once and lets each concern judge it, in a fixed order (the order
    /// in which its alerts change within a tick).
    fn partition(
        &mut self,
        cfg: &MonitorConfig,
        tick: &PartitionTick<'_>,
        configured: usize,
        p: &PartitionView,
    ) -> PartitionStatus {
        let conns: Vec<(Arc<str>, ConnSnapshot)> = p
            .connections
            .iter()
            .map(|c| (c.path.clone(), c.state.borrow().clone()))
            .collect();
        let live = conns
            .iter()
            .filter(|(_, s)| s.phase == ConnPhase::Live)
            .count();
        let tally = p.tally.snapshot();
        let repair_gaps = p.gaps.borrow().clone();
        let Concerns {
            alerts,
            coverage,
            reconciliation,
            events,
            ..
        } = self;
        let coverage_gaps = coverage.evaluate(alerts, cfg, tick, live, configured, &repair_gaps);
        let unaccounted = reconciliation.evaluate(alerts, cfg, tick, &tally);
        events.judge_partition(alerts, tick);
        for (path, _) in &conns {
            events.judge_connection(alerts, &tick.conn_key(path), tick.now);
        }
        PartitionStatus {
            partition: tick.partition,
            live_connections: live,
            configured_connections: configured,
            counts: Counts::new(&tally, unaccounted),
            connections: conns
                .iter()
                .map(|(path, s)| ConnectionStatus::new(path, s))
                .collect(),
            coverage_gaps,
            repair_gaps,
            peer: None,
        }
    }

    fn sink(&mut self, sink: &SinkView, now: Instant) -> SinkStatus {
        let alive = sink.alive.load(Ordering::Relaxed);
        let up = alive && sink.up.load(Ordering::Relaxed);
        self.alerts.observe(
            key(AlertName::SinkDown, &sink.name, None, None),
            !up,
            SINK_DOWN_PENDING,
            || "the store refuses writes; activities are held and spooled".to_owned(),
            now,
        );
        SinkStatus {
            name: sink.name.to_string(),
            up,
            alive,
        }
    }
}

/// The freshest report of the pair's other consumer on a partition.
fn peer_status(
    pair: &tandem_pair::Pair,
    stream: &Arc<str>,
    partition: Partition,
) -> Option<crate::status::PeerStatus> {
    let id = tandem_pair::PartitionId::new(stream.clone(), partition);
    let p = pair.peers(&id).into_iter().min_by_key(|p| p.age)?;
    Some(crate::status::PeerStatus {
        consumer: p.consumer,
        latest_ms: p.progress.latest_ms,
        stored_until_ms: p.progress.stored_until_ms,
        live_connections: p.progress.live,
        open_gaps: p.progress.open_gaps,
        age_secs: p.age.as_secs_f64(),
    })
}

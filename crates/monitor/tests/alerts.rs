//! Every alert driven through pending, firing and resolved by the real monitor loop, with
//! paused time and scripted inputs (connection states, events, tallies, sink health).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_conn::{
    ConnEvent, ConnKey, ConnPhase, ConnSnapshot, ErrorKind, StaleReason, StreamError,
};
use tandem_core::{GapState, GapView, Tally};
use tandem_merge::MergeEvent;
use tandem_monitor::*;
use tokio::sync::{broadcast, mpsc, watch};

struct Fixture {
    /// conns[partition - 1][path]
    conns: Vec<Vec<watch::Sender<ConnSnapshot>>>,
    tallies: Vec<Arc<Tally>>,
    /// gaps[partition - 1]
    gaps: Vec<watch::Sender<Vec<GapView>>>,
    sink_up: Arc<AtomicBool>,
    conn_events: mpsc::UnboundedSender<ConnEvent>,
    merge_events: mpsc::UnboundedSender<MergeEvent>,
    transitions: broadcast::Receiver<Transition>,
    _handle: MonitorHandle,
}

fn live() -> ConnSnapshot {
    ConnSnapshot {
        phase: ConnPhase::Live,
        ..ConnSnapshot::default()
    }
}

fn key(partition: u32, path: &str) -> ConnKey {
    ConnKey {
        stream: "d".into(),
        partition,
        path: path.into(),
    }
}

fn fixture() -> Fixture {
    let mut conns = Vec::new();
    let mut tallies = Vec::new();
    let mut partitions = Vec::new();
    let mut gaps = Vec::new();
    for p in 1..=2u32 {
        let (gaps_tx, gaps_rx) = watch::channel(Vec::new());
        gaps.push(gaps_tx);
        let tally = Arc::new(Tally::default());
        let mut senders = Vec::new();
        let mut views = Vec::new();
        for path in ["a", "b"] {
            let (tx, rx) = watch::channel(live());
            senders.push(tx);
            views.push(ConnectionView {
                path: path.into(),
                state: rx,
            });
        }
        partitions.push(PartitionView {
            partition: p,
            tally: tally.clone(),
            connections: views,
            gaps: gaps_rx,
        });
        conns.push(senders);
        tallies.push(tally);
    }
    let sink_up = Arc::new(AtomicBool::new(true));
    let (conn_events, conn_rx) = mpsc::unbounded_channel();
    let (merge_events, merge_rx) = mpsc::unbounded_channel();
    let handle = spawn(
        MonitorConfig::default(),
        MonitorInputs {
            streams: vec![StreamView {
                name: "d".into(),
                configured_per_partition: 2,
                partitions,
            }],
            sinks: vec![SinkView {
                name: "files".into(),
                up: sink_up.clone(),
                alive: Arc::new(AtomicBool::new(true)),
            }],
            conn_events: conn_rx,
            merge_events: merge_rx,
            dedup_window: Duration::from_secs(900),
            pair: None,
        },
    );
    let transitions = handle.transitions.subscribe();
    Fixture {
        conns,
        tallies,
        gaps,
        sink_up,
        conn_events,
        merge_events,
        transitions,
        _handle: handle,
    }
}

impl Fixture {
    /// The next transition of `name`, waiting at most `within` of (paused) time.
    async fn next(&mut self, name: AlertName, within: Duration) -> Option<Transition> {
        tokio::time::timeout(within, async {
            loop {
                match self.transitions.recv().await {
                    Ok(t) => {
                        let n = match &t {
                            Transition::Fired(v) => v.key.name,
                            Transition::Resolved(r) => r.key.name,
                        };
                        if n == name {
                            return t;
                        }
                    }
                    Err(e) => panic!("transitions stopped: {e}"),
                }
            }
        })
        .await
        .ok()
    }

    async fn fires(&mut self, name: AlertName, within: Duration) -> AlertView {
        match self.next(name, within).await {
            Some(Transition::Fired(v)) => v,
            other => panic!("{name:?} did not fire within {within:?}: {other:?}"),
        }
    }

    async fn resolves(&mut self, name: AlertName, within: Duration) -> Resolved {
        match self.next(name, within).await {
            Some(Transition::Resolved(r)) => r,
            other => panic!("{name:?} did not resolve within {within:?}: {other:?}"),
        }
    }

    async fn quiet(&mut self, name: AlertName, within: Duration) {
        if let Some(t) = self.next(name, within).await {
            panic!("{name:?} moved too early: {t:?}");
        }
    }
}

/// No live connection on a partition: pending for 5 s, then firing, resolved when a
/// connection is back.
#[tokio::test(start_paused = true)]
async fn partition_down() {
    let mut f = fixture();
    for c in &f.conns[0] {
        c.send_replace(ConnSnapshot::default());
    }
    f.quiet(AlertName::PartitionDown, Duration::from_secs(4))
        .await;
    let v = f
        .fires(AlertName::PartitionDown, Duration::from_secs(2))
        .await;
    assert_eq!(v.key.partition, Some(1));
    f.conns[0][1].send_replace(live());
    let r = f
        .resolves(AlertName::PartitionDown, Duration::from_secs(1))
        .await;
    assert!(r.firing_secs >= 0.0);
}

/// Fewer live connections than configured: pending for 10 s, then firing, resolved.
#[tokio::test(start_paused = true)]
async fn partition_imbalance() {
    let mut f = fixture();
    f.conns[1][0].send_replace(ConnSnapshot::default());
    f.quiet(AlertName::PartitionImbalance, Duration::from_secs(9))
        .await;
    let v = f
        .fires(AlertName::PartitionImbalance, Duration::from_secs(2))
        .await;
    assert_eq!(v.key.partition, Some(2));
    assert!(v.message.contains("1 of 2"), "{}", v.message);
    f.conns[1][0].send_replace(live());
    f.resolves(AlertName::PartitionImbalance, Duration::from_secs(1))
        .await;
}

/// A stale connection fires at once and resolves when it is connected again, even when
/// both happen between two ticks.
#[tokio::test(start_paused = true)]
async fn connection_stale() {
    let mut f = fixture();
    f.conn_events
        .send(ConnEvent::Stale {
            key: key(1, "b"),
            reason: StaleReason::DataSilence,
            silent_for: Duration::from_secs(5),
        })
        .unwrap();
    f.conn_events
        .send(ConnEvent::Connected {
            key: key(1, "b"),
            connection: 2,
            backfill_minutes: 0,
        })
        .unwrap();
    let v = f
        .fires(AlertName::ConnectionStale, Duration::from_secs(1))
        .await;
    assert_eq!(v.key.path.as_deref(), Some("b"));
    assert!(v.message.contains("data_silence"));
    f.resolves(AlertName::ConnectionStale, Duration::from_secs(1))
        .await;
}

/// A fatal connection error fires and stays firing (it needs an operator).
#[tokio::test(start_paused = true)]
async fn connection_fatal() {
    let mut f = fixture();
    let error = StreamError::from_status(401, "bad credentials", None);
    f.conn_events
        .send(ConnEvent::Fatal {
            key: key(2, "a"),
            error,
        })
        .unwrap();
    let v = f
        .fires(AlertName::ConnectionFatal, Duration::from_secs(1))
        .await;
    assert_eq!(v.severity, Severity::Critical);
    assert!(v.message.contains("401"));
    f.quiet(AlertName::ConnectionFatal, Duration::from_secs(60))
        .await;
    let _ = ErrorKind::Authentication;
}

/// 503 persisting past its threshold fires; the next successful connection resolves it.
#[tokio::test(start_paused = true)]
async fn upstream_unavailable() {
    let mut f = fixture();
    f.conn_events
        .send(ConnEvent::Escalated {
            key: key(1, "a"),
            persisted: Duration::from_secs(601),
        })
        .unwrap();
    f.fires(AlertName::UpstreamUnavailable, Duration::from_secs(1))
        .await;
    f.conn_events
        .send(ConnEvent::Connected {
            key: key(1, "a"),
            connection: 3,
            backfill_minutes: 0,
        })
        .unwrap();
    f.resolves(AlertName::UpstreamUnavailable, Duration::from_secs(1))
        .await;
}

/// 429 answers in a row fire from the second on (a single one is the upstream's normal
/// pacing); the next successful connection resolves it.
#[tokio::test(start_paused = true)]
async fn upstream_rate_limited() {
    let mut f = fixture();
    let refused = || ConnEvent::Disconnected {
        key: key(1, "b"),
        error: StreamError::from_status(429, "Too Many Requests", None),
        live_for: None,
    };
    f.conn_events.send(refused()).unwrap();
    f.quiet(AlertName::UpstreamRateLimited, Duration::from_secs(5))
        .await;
    f.conn_events.send(refused()).unwrap();
    let v = f
        .fires(AlertName::UpstreamRateLimited, Duration::from_secs(1))
        .await;
    assert_eq!(v.severity, Severity::Warning);
    assert_eq!(v.key.path.as_deref(), Some("b"));
    assert!(v.message.contains("429"), "{}", v.message);
    f.conn_events
        .send(ConnEvent::Connected {
            key: key(1, "b"),
            connection: 2,
            backfill_minutes: 1,
        })
        .unwrap();
    f.resolves(AlertName::UpstreamRateLimited, Duration::from_secs(1))
        .await;
}

/// Unique activities that are neither queued, in flight nor stored a grace period (30 s)
/// later fire; storing them resolves it.
#[tokio::test(start_paused = true)]
async fn reconciliation_mismatch() {
    let mut f = fixture();
    Tally::add(&f.tallies[0].unique, 100);
    f.quiet(AlertName::ReconciliationMismatch, Duration::from_secs(29))
        .await;
    let v = f
        .fires(AlertName::ReconciliationMismatch, Duration::from_secs(3))
        .await;
    assert!(v.message.starts_with("100 unique"), "{}", v.message);
    Tally::add(&f.tallies[0].stored, 100);
    f.resolves(AlertName::ReconciliationMismatch, Duration::from_secs(1))
        .await;
}

/// The stored rate falling below half its baseline for 30 s warns; recovering resolves.
#[tokio::test(start_paused = true)]
async fn stored_rate_drop() {
    let mut f = fixture();
    let store = |f: &Fixture, n: u64| Tally::add(&f.tallies[0].stored, n);
    for _ in 0..600 {
        store(&f, 100);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The rate drops to 10 %.
    let mut fired = None;
    for _ in 0..60 {
        store(&f, 10);
        if let Some(Transition::Fired(v)) = f
            .next(AlertName::StoredRateDrop, Duration::from_secs(1))
            .await
        {
            fired = Some(v);
            break;
        }
    }
    let v = fired.expect("stored_rate_drop fired");
    assert_eq!(v.severity, Severity::Warning);
    let mut resolved = false;
    for _ in 0..60 {
        store(&f, 100);
        if let Some(Transition::Resolved(_)) = f
            .next(AlertName::StoredRateDrop, Duration::from_secs(1))
            .await
        {
            resolved = true;
            break;
        }
    }
    assert!(
        resolved,
        "stored_rate_drop resolved once the rate recovered"
    );
}

/// Early evictions from the dedup cache fire; a full window without any resolves.
#[tokio::test(start_paused = true)]
async fn dedup_horizon_weakened() {
    let mut f = fixture();
    f.merge_events
        .send(MergeEvent::EvictedEarly {
            stream: "d".into(),
            partition: 2,
            total: 5_000,
            horizon: Duration::from_secs(300),
        })
        .unwrap();
    let v = f
        .fires(AlertName::DedupHorizonWeakened, Duration::from_secs(1))
        .await;
    assert!(v.message.contains("5000 ids"), "{}", v.message);
    f.quiet(AlertName::DedupHorizonWeakened, Duration::from_secs(890))
        .await;
    f.resolves(AlertName::DedupHorizonWeakened, Duration::from_secs(20))
        .await;
}

/// A sink refusing writes for over a second fires; writing again resolves.
#[tokio::test(start_paused = true)]
async fn sink_down() {
    let mut f = fixture();
    f.sink_up.store(false, Ordering::SeqCst);
    let v = f.fires(AlertName::SinkDown, Duration::from_secs(3)).await;
    assert_eq!(v.key.stream, "files");
    f.sink_up.store(true, Ordering::SeqCst);
    f.resolves(AlertName::SinkDown, Duration::from_secs(1))
        .await;
}

/// A gap the upstream cannot replay: fires at once, as a notice that resolves after
/// `unrecoverable_gap_alert_secs` (1 h by default).
#[tokio::test(start_paused = true)]
async fn gap_unrecoverable() {
    let mut f = fixture();
    f.gaps[1].send_replace(vec![GapView {
        start_ms: 1_000_000,
        end_ms: 1_600_000,
        state: GapState::Unrecoverable,
        found_ms: 1_700_000,
        repaired_ms: None,
        chunks_done: 0,
        chunks: 0,
        reason: Some("likes streams have no recovery".into()),
    }]);
    let v = f
        .fires(AlertName::GapUnrecoverable, Duration::from_secs(1))
        .await;
    assert_eq!(v.key.partition, Some(2));
    assert!(v.message.contains("600 s"), "{}", v.message);
    assert!(v.message.contains("likes"), "{}", v.message);
    f.quiet(AlertName::GapUnrecoverable, Duration::from_secs(3_590))
        .await;
    f.resolves(AlertName::GapUnrecoverable, Duration::from_secs(20))
        .await;
}

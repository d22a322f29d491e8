//! Alerts: a state machine per (alert, stream, partition, path) — inactive, pending,
//! firing, resolved — where every transition is one structured log line and one metric
//! change, so the two never drift.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;
use tandem_core::Partition;
use tandem_core::metric as m;
use tandem_core::time::unix_ms_now;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// How bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// The alerts tandem raises. The same conditions exist as Prometheus rules in
/// `deploy/prometheus/`, so that a pair of consumers is also judged as one system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertName {
    /// A partition has no live connection.
    PartitionDown,
    /// Live connections per partition differ across partitions or fall below the
    /// configured count.
    PartitionImbalance,
    /// A connection was closed as stale (heartbeat gap or data silence) and is not live
    /// again yet.
    ConnectionStale,
    /// A connection is refused (401, 403, 406, other 4xx, evicted by a newer connection
    /// over the partition's limit) and retried on the slow schedule until a connect
    /// succeeds, or stopped for good (retries exhausted): an operator should look.
    ConnectionFatal,
    /// 503 answers persisted past the escalation threshold.
    UpstreamUnavailable,
    /// A connection was refused with 429 several times in a row (`rate_limited_after`):
    /// the account's connect rate or connection limit is exhausted.
    UpstreamRateLimited,
    /// Unique activities neither stored nor in flight, past the grace period.
    ReconciliationMismatch,
    /// The stored rate dropped well below its recent baseline.
    StoredRateDrop,
    /// The dedup cache forgot ids before their window ended.
    DedupHorizonWeakened,
    /// A sink cannot write.
    SinkDown,
    /// A coverage gap cannot be repaired (likes streams, older than the upstream's
    /// recovery retention, or refused): its activities are missing from the store.
    GapUnrecoverable,
    /// The pair's coordination bucket cannot be reached: this consumer works alone, with
    /// a static share of the connect budget and recovery jobs.
    PairCoordinationLost,
}

impl AlertName {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertName::PartitionDown => "partition_down",
            AlertName::PartitionImbalance => "partition_imbalance",
            AlertName::ConnectionStale => "connection_stale",
            AlertName::ConnectionFatal => "connection_fatal",
            AlertName::UpstreamUnavailable => "upstream_unavailable",
            AlertName::UpstreamRateLimited => "upstream_rate_limited",
            AlertName::ReconciliationMismatch => "reconciliation_mismatch",
            AlertName::StoredRateDrop => "stored_rate_drop",
            AlertName::DedupHorizonWeakened => "dedup_horizon_weakened",
            AlertName::SinkDown => "sink_down",
            AlertName::GapUnrecoverable => "gap_unrecoverable",
            AlertName::PairCoordinationLost => "pair_coordination_lost",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            AlertName::PartitionDown
            | AlertName::ConnectionFatal
            | AlertName::ReconciliationMismatch
            | AlertName::SinkDown
            | AlertName::GapUnrecoverable
            | AlertName::UpstreamUnavailable => Severity::Critical,
            AlertName::PartitionImbalance
            | AlertName::ConnectionStale
            | AlertName::UpstreamRateLimited
            | AlertName::StoredRateDrop
            | AlertName::DedupHorizonWeakened
            | AlertName::PairCoordinationLost => Severity::Warning,
        }
    }
}

impl AlertName {
    /// Every alert, for registering their series at zero.
    pub const ALL: [AlertName; 12] = [
        AlertName::PartitionDown,
        AlertName::PartitionImbalance,
        AlertName::ConnectionStale,
        AlertName::ConnectionFatal,
        AlertName::UpstreamUnavailable,
        AlertName::UpstreamRateLimited,
        AlertName::ReconciliationMismatch,
        AlertName::StoredRateDrop,
        AlertName::DedupHorizonWeakened,
        AlertName::SinkDown,
        AlertName::GapUnrecoverable,
        AlertName::PairCoordinationLost,
    ];
}

/// Registers the alert counters at zero.
pub fn register() {
    for a in AlertName::ALL {
        metrics::counter!(m::ALERTS_FIRED, m::ALERT => a.as_str(), m::SEVERITY => a.severity().as_str()).increment(0);
    }
}

/// What an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AlertKey {
    pub name: AlertName,
    pub stream: String,
    pub partition: Option<u32>,
    pub path: Option<String>,
}

/// The key of `name` about a stream (or sink), a partition of it, a path of that.
pub(crate) fn key(
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

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    Pending { since_ms: u64 },
    Firing { since_ms: u64 },
}

/// An alert as reported by `/status` and the demo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertView {
    #[serde(flatten)]
    pub key: AlertKey,
    pub severity: Severity,
    #[serde(flatten)]
    pub phase: Phase,
    pub message: String,
}

/// A resolved alert: it fired, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolved {
    #[serde(flatten)]
    pub key: AlertKey,
    pub severity: Severity,
    pub fired_ms: u64,
    pub resolved_ms: u64,
    pub firing_secs: f64,
    pub message: String,
}

/// A transition worth telling the world (logs, metrics, webhook).
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Fired(AlertView),
    Resolved(Resolved),
}

#[derive(Debug)]
struct State {
    pending_since: Instant,
    pending_since_ms: u64,
    firing_since: Option<(Instant, u64)>,
    message: String,
}

/// All alerts of one process.
#[derive(Debug, Default)]
pub struct Alerts {
    states: BTreeMap<AlertKey, State>,
    recent: VecDeque<Resolved>,
}

impl Alerts {
    /// Feeds one evaluation of a condition. `pending_for`: how long it must hold before
    /// firing (zero fires at once).
    pub fn observe(
        &mut self,
        key: AlertKey,
        active: bool,
        pending_for: Duration,
        message: impl FnOnce() -> String,
        now: Instant,
    ) -> Option<Transition> {
        match (self.states.get_mut(&key), active) {
            (None, false) => None,
            (None, true) => {
                let state = State {
                    pending_since: now,
                    pending_since_ms: unix_ms_now(),
                    firing_since: None,
                    message: message(),
                };
                self.states.insert(key.clone(), state);
                self.promote(&key, pending_for, now)
            }
            (Some(state), true) => {
                let text = message();
                if !text.is_empty() {
                    state.message = text;
                }
                self.promote(&key, pending_for, now)
            }
            (Some(_), false) => self.resolve(key, now),
        }
    }

    /// Ends an alert; a transition only if it was firing (a pending one just lapses).
    fn resolve(&mut self, key: AlertKey, now: Instant) -> Option<Transition> {
        let state = self.states.remove(&key)?;
        let (fired_at, fired_ms) = state.firing_since?;
        let resolved = Resolved {
            severity: key.name.severity(),
            firing_secs: now.duration_since(fired_at).as_secs_f64(),
            fired_ms,
            resolved_ms: unix_ms_now(),
            message: state.message,
            key,
        };
        set_gauge(&resolved.key, 0.0);
        tracing::info!(
            alert = resolved.key.name.as_str(), severity = resolved.severity.as_str(), stream = %resolved.key.stream,
            partition = resolved.key.partition, path = resolved.key.path.as_deref(), firing_secs = resolved.firing_secs,
            "alert resolved"
        );
        self.recent.push_front(resolved.clone());
        self.recent.truncate(100);
        Some(Transition::Resolved(resolved))
    }

    fn promote(
        &mut self,
        key: &AlertKey,
        pending_for: Duration,
        now: Instant,
    ) -> Option<Transition> {
        let state = self.states.get_mut(key).expect("present");
        if state.firing_since.is_some() || now.duration_since(state.pending_since) < pending_for {
            return None;
        }
        let ms = unix_ms_now();
        state.firing_since = Some((now, ms));
        let view = AlertView {
            key: key.clone(),
            severity: key.name.severity(),
            phase: Phase::Firing { since_ms: ms },
            message: state.message.clone(),
        };
        set_gauge(key, 1.0);
        metrics::counter!(m::ALERTS_FIRED, m::ALERT => key.name.as_str(), m::SEVERITY => key.name.severity().as_str()).increment(1);
        tracing::warn!(
            alert = key.name.as_str(), severity = view.severity.as_str(), stream = %key.stream, partition = key.partition,
            path = key.path.as_deref(), message = %view.message, "alert firing"
        );
        Some(Transition::Fired(view))
    }

    /// Alerts pending or firing.
    pub fn active(&self) -> Vec<AlertView> {
        self.states
            .iter()
            .map(|(key, s)| AlertView {
                key: key.clone(),
                severity: key.name.severity(),
                phase: match s.firing_since {
                    Some((_, ms)) => Phase::Firing { since_ms: ms },
                    None => Phase::Pending {
                        since_ms: s.pending_since_ms,
                    },
                },
                message: s.message.clone(),
            })
            .collect()
    }

    /// The most recently resolved alerts, newest first.
    pub fn recent(&self) -> Vec<Resolved> {
        self.recent.iter().cloned().collect()
    }

    /// Keys of alerts currently pending or firing for `name`.
    pub fn keys(&self, name: AlertName) -> Vec<AlertKey> {
        self.states
            .keys()
            .filter(|k| k.name == name)
            .cloned()
            .collect()
    }
}

/// The monitor's alerts together with the channel their transitions are published on, so
/// that no concern can change an alert without telling the listeners.
#[derive(Debug)]
pub(crate) struct AlertBus {
    alerts: Alerts,
    transitions: broadcast::Sender<Transition>,
}

impl AlertBus {
    pub(crate) fn new(transitions: broadcast::Sender<Transition>) -> AlertBus {
        AlertBus {
            alerts: Alerts::default(),
            transitions,
        }
    }

    /// [`Alerts::observe`], publishing the transition if there is one.
    pub(crate) fn observe(
        &mut self,
        key: AlertKey,
        active: bool,
        pending_for: Duration,
        message: impl FnOnce() -> String,
        now: Instant,
    ) {
        if let Some(t) = self.alerts.observe(key, active, pending_for, message, now) {
            // Nobody listening is fine: the state is in `/status` as well.
            let _ = self.transitions.send(t);
        }
    }

    pub(crate) fn alerts(&self) -> &Alerts {
        &self.alerts
    }
}

fn set_gauge(key: &AlertKey, value: f64) {
    metrics::gauge!(m::ALERT_FIRING,
        m::ALERT => key.name.as_str(),
        m::SEVERITY => key.name.severity().as_str(),
        m::STREAM => key.stream.clone(),
        m::PARTITION => key.partition.map(|p| p.to_string()).unwrap_or_default())
    .set(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AlertKey {
        AlertKey {
            name: AlertName::PartitionDown,
            stream: "d".into(),
            partition: Some(1),
            path: None,
        }
    }

    /// pending → firing after the pending time → resolved with its firing duration.
    #[tokio::test(start_paused = true)]
    async fn pending_firing_resolved() {
        let mut a = Alerts::default();
        let wait = Duration::from_secs(5);
        assert_eq!(
            a.observe(key(), true, wait, || "down".into(), Instant::now()),
            None
        );
        assert!(matches!(a.active()[0].phase, Phase::Pending { .. }));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            a.observe(key(), true, wait, String::new, Instant::now()),
            None
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let fired = a.observe(key(), true, wait, String::new, Instant::now());
        assert!(matches!(fired, Some(Transition::Fired(v)) if v.message == "down"));
        assert!(matches!(a.active()[0].phase, Phase::Firing { .. }));
        tokio::time::advance(Duration::from_secs(30)).await;
        match a.observe(key(), false, wait, String::new, Instant::now()) {
            Some(Transition::Resolved(r)) => assert_eq!(r.firing_secs, 30.0),
            other => panic!("{other:?}"),
        }
        assert!(a.active().is_empty());
        assert_eq!(a.recent().len(), 1);
    }

    /// A condition that clears while pending never fires.
    #[tokio::test(start_paused = true)]
    async fn short_blips_do_not_fire() {
        let mut a = Alerts::default();
        a.observe(
            key(),
            true,
            Duration::from_secs(5),
            String::new,
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            a.observe(
                key(),
                false,
                Duration::from_secs(5),
                String::new,
                Instant::now()
            ),
            None
        );
        assert!(a.active().is_empty() && a.recent().is_empty());
    }
}

//! Conditions that lifecycle events report rather than state shows: a connection closed as
//! stale (`connection_stale`), stopped for good (`connection_fatal`) or refused with 503
//! past the escalation threshold (`upstream_unavailable`) or with 429 several times in a row
//! (`upstream_rate_limited`), and ids evicted from the dedup
//! cache before their window ended (`dedup_horizon_weakened`). Each event is judged when it
//! arrives — a connection can go stale and be live again between two ticks, and that must
//! still fire and resolve its alert — and what it left behind is judged again every tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_conn::{ConnEvent, ConnKey, ErrorKind, StaleReason};
use tandem_core::Partition;
use tandem_merge::MergeEvent;
use tokio::time::Instant;

use crate::alert::{AlertBus, AlertName, key};
use crate::monitor::PartitionTick;

/// What the lifecycle events have reported and not yet taken back.
#[derive(Debug)]
pub(crate) struct Events {
    /// The merger's dedup window: a weakened horizon heals after one window without early
    /// evictions.
    dedup_window: Duration,
    /// Why, and after how many seconds of silence, a connection was closed as stale.
    stale: HashMap<ConnKey, (StaleReason, f64)>,
    fatal: HashMap<ConnKey, String>,
    /// For how many seconds 503 answers had persisted.
    escalated: HashMap<ConnKey, f64>,
    /// 429 answers in a row since the connection was last live, and how many fire.
    rate_limited: HashMap<ConnKey, u32>,
    rate_limited_after: u32,
    /// Until when, and why, a partition's dedup horizon counts as weakened.
    horizon_weak_until: HashMap<(Arc<str>, Partition), (Instant, String)>,
}

impl Events {
    pub(crate) fn new(dedup_window: Duration, rate_limited_after: u32) -> Events {
        Events {
            dedup_window,
            stale: HashMap::new(),
            fatal: HashMap::new(),
            escalated: HashMap::new(),
            rate_limited: HashMap::new(),
            rate_limited_after: rate_limited_after.max(1),
            horizon_weak_until: HashMap::new(),
        }
    }

    pub(crate) fn on_conn_event(&mut self, alerts: &mut AlertBus, ev: ConnEvent, now: Instant) {
        match ev {
            ConnEvent::Stale {
                key: c,
                reason,
                silent_for,
            } => {
                let secs = silent_for.as_secs_f64();
                self.stale.insert(c.clone(), (reason, secs));
                let message = stale_message(reason, secs);
                judge(alerts, AlertName::ConnectionStale, &c, Some(message), now);
            }
            ConnEvent::Connected { key: c, .. } => {
                if self.stale.remove(&c).is_some() {
                    judge(alerts, AlertName::ConnectionStale, &c, None, now);
                }
                if self.escalated.remove(&c).is_some() {
                    judge(alerts, AlertName::UpstreamUnavailable, &c, None, now);
                }
                if self.rate_limited.remove(&c).is_some() {
                    judge(alerts, AlertName::UpstreamRateLimited, &c, None, now);
                }
                if self.fatal.remove(&c).is_some() {
                    judge(alerts, AlertName::ConnectionFatal, &c, None, now);
                }
            }
            // Refused (401, 403, 406, other 4xx, evicted): retried slowly, and an operator
            // should look until a connect succeeds.
            ConnEvent::Disconnected { key: c, error, .. } if error.kind.is_refusal() => {
                let text = error.to_string();
                self.fatal.insert(c.clone(), text.clone());
                judge(alerts, AlertName::ConnectionFatal, &c, Some(text), now);
            }
            ConnEvent::Disconnected { key: c, error, .. }
                if error.kind == ErrorKind::RateLimited =>
            {
                let n = self.rate_limited.entry(c.clone()).or_default();
                *n += 1;
                let message = self.rate_limited_message(&c);
                judge(alerts, AlertName::UpstreamRateLimited, &c, message, now);
            }
            ConnEvent::Fatal { key: c, error } => {
                let text = error.to_string();
                self.fatal.insert(c.clone(), text.clone());
                judge(alerts, AlertName::ConnectionFatal, &c, Some(text), now);
            }
            ConnEvent::Escalated { key: c, persisted } => {
                let secs = persisted.as_secs_f64();
                self.escalated.insert(c.clone(), secs);
                let message = escalated_message(secs);
                judge(
                    alerts,
                    AlertName::UpstreamUnavailable,
                    &c,
                    Some(message),
                    now,
                );
            }
            _ => {}
        }
    }

    pub(crate) fn on_merge_event(&mut self, ev: MergeEvent, now: Instant) {
        if let MergeEvent::EvictedEarly {
            stream,
            partition,
            total,
            horizon,
        } = ev
        {
            let message = format!(
                "{total} ids forgotten before their window ended; the dedup horizon is {:.0} s of {:.0} s",
                horizon.as_secs_f64(),
                self.dedup_window.as_secs_f64()
            );
            self.horizon_weak_until
                .insert((stream, partition), (now + self.dedup_window, message));
        }
    }

    /// Judges `dedup_horizon_weakened` for a partition.
    pub(crate) fn judge_partition(&self, alerts: &mut AlertBus, tick: &PartitionTick<'_>) {
        let weak = self
            .horizon_weak_until
            .get(&tick.id())
            .filter(|(until, _)| tick.now < *until)
            .map(|(_, message)| message.clone());
        alerts.observe(
            tick.alert_key(AlertName::DedupHorizonWeakened),
            weak.is_some(),
            Duration::ZERO,
            || weak.unwrap_or_default(),
            tick.now,
        );
    }

    /// Judges the per-connection alerts of a connection.
    pub(crate) fn judge_connection(&self, alerts: &mut AlertBus, c: &ConnKey, now: Instant) {
        let stale = self.stale.get(c).map(|&(r, secs)| stale_message(r, secs));
        judge(alerts, AlertName::ConnectionStale, c, stale, now);
        let fatal = self.fatal.get(c).cloned();
        judge(alerts, AlertName::ConnectionFatal, c, fatal, now);
        let escalated = self.escalated.get(c).map(|&secs| escalated_message(secs));
        judge(alerts, AlertName::UpstreamUnavailable, c, escalated, now);
        let rate_limited = self.rate_limited_message(c);
        judge(alerts, AlertName::UpstreamRateLimited, c, rate_limited, now);
    }

    /// The alert's message once a connection's 429s in a row reach the threshold.
    fn rate_limited_message(&self, c: &ConnKey) -> Option<String> {
        let n = *self.rate_limited.get(c)?;
        (n >= self.rate_limited_after).then(|| format!("429 answers in a row: {n}"))
    }
}

/// Observes a per-connection alert that fires at once: active while it has a message.
fn judge(
    alerts: &mut AlertBus,
    name: AlertName,
    c: &ConnKey,
    message: Option<String>,
    now: Instant,
) {
    alerts.observe(
        key(name, &c.stream, Some(c.partition), Some(&c.path)),
        message.is_some(),
        Duration::ZERO,
        || message.unwrap_or_default(),
        now,
    );
}

fn stale_message(reason: StaleReason, secs: f64) -> String {
    format!("closed after {secs:.1} s ({})", reason.label())
}

fn escalated_message(secs: f64) -> String {
    format!("503 for {secs:.0} s")
}

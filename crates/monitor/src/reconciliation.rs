//! Reconciliation: every activity counted unique must, a grace period later, be stored
//! (or a store duplicate), in flight or queued; every raw line must by then be classified
//! (unique, duplicate, dead-lettered or system). The counts of now are compared with the
//! counts of a grace period ago, so that work in progress is never taken for loss. What is
//! missing is exported as `tandem_reconciliation_difference` and raises
//! `reconciliation_mismatch`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tandem_core::metric as m;
use tandem_core::{Partition, TallySnapshot};
use tokio::time::Instant;

use crate::alert::{AlertBus, AlertName};
use crate::config::MonitorConfig;
use crate::monitor::PartitionTick;

/// The count history of every partition.
#[derive(Debug, Default)]
pub(crate) struct Reconciliation {
    partitions: HashMap<(Arc<str>, Partition), History>,
}

/// Unique and raw counts by tick, back to one grace period.
#[derive(Debug, Default)]
struct History {
    unique: VecDeque<(Instant, u64)>,
    raw: VecDeque<(Instant, u64)>,
}

/// What a grace period has not accounted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Missing {
    /// Unique activities neither stored nor in flight.
    unaccounted: u64,
    /// Raw lines not classified.
    unclassified: u64,
}

impl Reconciliation {
    /// Reconciles one partition's tally for a tick and judges `reconciliation_mismatch`.
    /// Returns the unique activities unaccounted for.
    pub(crate) fn evaluate(
        &mut self,
        alerts: &mut AlertBus,
        cfg: &MonitorConfig,
        tick: &PartitionTick<'_>,
        tally: &TallySnapshot,
    ) -> u64 {
        let grace = Duration::from_secs(cfg.reconciliation_grace_secs);
        let history = self.partitions.entry(tick.id()).or_default();
        let Missing {
            unaccounted,
            unclassified,
        } = history.reconcile(tally, tick.now, grace);
        let missing = unaccounted + unclassified;
        metrics::gauge!(m::RECONCILIATION_DIFFERENCE, &tick.labels()).set(missing as f64);
        alerts.observe(
            tick.alert_key(AlertName::ReconciliationMismatch),
            missing > 0,
            Duration::ZERO,
            || {
                format!(
                    "{unaccounted} unique activities neither stored nor in flight after {} s; {unclassified} raw lines unclassified",
                    grace.as_secs()
                )
            },
            tick.now,
        );
        unaccounted
    }
}

impl History {
    /// Records the tally of `now`; compares it with the counts of a grace period ago.
    fn reconcile(&mut self, t: &TallySnapshot, now: Instant, grace: Duration) -> Missing {
        self.unique.push_back((now, t.unique));
        self.raw.push_back((now, t.raw));
        let old_unique = settled(&mut self.unique, now, grace);
        let old_raw = settled(&mut self.raw, now, grace);
        let accounted = t.stored + t.store_duplicates + t.in_flight + t.queued;
        let classified = t.unique + t.duplicates + t.dead_lettered + t.system;
        Missing {
            unaccounted: old_unique.saturating_sub(accounted),
            unclassified: old_raw.saturating_sub(classified),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Unique activities count as missing only once a grace period has passed without
    /// them being stored; raw lines likewise without being classified.
    #[tokio::test(start_paused = true)]
    async fn missing_only_after_the_grace_period() {
        let grace = Duration::from_secs(30);
        let mut h = History::default();
        let seen = TallySnapshot {
            raw: 10,
            unique: 7,
            ..TallySnapshot::default()
        };
        let none = Missing {
            unaccounted: 0,
            unclassified: 0,
        };
        assert_eq!(h.reconcile(&seen, Instant::now(), grace), none);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(h.reconcile(&seen, Instant::now(), grace), none);
        tokio::time::advance(Duration::from_secs(1)).await;
        let stored_some = TallySnapshot { stored: 5, ..seen };
        let missing = h.reconcile(&stored_some, Instant::now(), grace);
        assert_eq!(
            missing,
            Missing {
                unaccounted: 2,
                unclassified: 3,
            }
        );
    }
}

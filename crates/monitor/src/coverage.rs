//! Coverage: how many connections of each partition are live, the intervals in which none
//! was (coverage gaps, with their metrics and log lines), and the alerts that judge it:
//! `partition_down` (none live), `partition_imbalance` (fewer live than configured) and
//! `gap_unrecoverable` (a gap beyond backfill that the upstream cannot replay).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tandem_core::metric as m;
use tandem_core::time::rfc3339_ms;
use tandem_core::{GapState, GapView, Partition};
use tokio::time::Instant;

use crate::alert::{AlertBus, AlertName};
use crate::config::MonitorConfig;
use crate::monitor::PartitionTick;
use crate::status::CoverageGap;

/// Closed gaps kept per partition for `/status`.
const KEPT_GAPS: usize = 50;

/// The coverage of every partition.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    partitions: HashMap<(Arc<str>, Partition), Track>,
}

#[derive(Debug, Default)]
struct Track {
    /// A partition that has never been live is starting, not in a gap.
    ever_covered: bool,
    /// Since when (monotonic, wall-clock ms) no connection has been live.
    open_gap: Option<(Instant, u64)>,
    /// Closed gaps, newest first.
    gaps: VecDeque<CoverageGap>,
    /// When each unrecoverable repair gap (by start) was first seen: the alert is a
    /// notice for a while, not a state that lasts as long as the gap is listed.
    lost_seen: HashMap<u64, Instant>,
}

impl Coverage {
    /// Follows one partition for a tick: exports its connection metrics, opens or closes
    /// its coverage gap and judges the coverage alerts. Returns its coverage gaps, newest
    /// (the open one) first.
    pub(crate) fn evaluate(
        &mut self,
        alerts: &mut AlertBus,
        cfg: &MonitorConfig,
        tick: &PartitionTick<'_>,
        live: usize,
        configured: usize,
        repair_gaps: &[GapView],
    ) -> Vec<CoverageGap> {
        export(tick, live, configured);
        let track = self.partitions.entry(tick.id()).or_default();
        track.follow(tick, live);
        let notice = Duration::from_secs(cfg.unrecoverable_gap_alert_secs);
        let lost = track.lost(repair_gaps, notice, tick.now);
        judge(alerts, cfg, tick, live, configured, &lost);
        track.gaps(tick.now)
    }
}

/// Exports the connection gauges of a partition, and its gap counters at zero so that
/// they exist before the first gap.
fn export(tick: &PartitionTick<'_>, live: usize, configured: usize) {
    let labels = tick.labels();
    metrics::gauge!(m::LIVE_CONNECTIONS, &labels).set(live as f64);
    metrics::gauge!(m::CONFIGURED_CONNECTIONS, &labels).set(configured as f64);
    metrics::gauge!(m::PARTITION_UNCOVERED, &labels).set(if live == 0 { 1.0 } else { 0.0 });
    metrics::counter!(m::COVERAGE_GAPS, &labels).increment(0);
    metrics::counter!(m::COVERAGE_GAP_SECONDS, &labels).increment(0);
}

impl Track {
    /// Opens a gap when a covered partition has no live connection; closes it when one is
    /// live again.
    fn follow(&mut self, tick: &PartitionTick<'_>, live: usize) {
        if live == 0 {
            if self.ever_covered && self.open_gap.is_none() {
                tracing::warn!(stream = %tick.stream, partition = tick.partition, "partition coverage gap opened: no live connection");
                self.open_gap = Some((tick.now, tick.now_ms));
            }
            return;
        }
        self.ever_covered = true;
        let Some((since, start_ms)) = self.open_gap.take() else {
            return;
        };
        let secs = tick.now.duration_since(since).as_secs_f64();
        let labels = tick.labels();
        metrics::counter!(m::COVERAGE_GAPS, &labels).increment(1);
        metrics::counter!(m::COVERAGE_GAP_SECONDS, &labels).increment(secs.round() as u64);
        tracing::warn!(stream = %tick.stream, partition = tick.partition, gap_secs = secs, "partition coverage gap closed");
        self.gaps.push_front(CoverageGap {
            start_ms,
            end_ms: Some(tick.now_ms),
            secs,
        });
        self.gaps.truncate(KEPT_GAPS);
    }

    /// The open gap, if any, then the closed ones, newest first.
    fn gaps(&self, now: Instant) -> Vec<CoverageGap> {
        let open = self.open_gap.map(|(since, start_ms)| CoverageGap {
            start_ms,
            end_ms: None,
            secs: now.duration_since(since).as_secs_f64(),
        });
        open.into_iter().chain(self.gaps.iter().cloned()).collect()
    }

    /// The unrecoverable repair gaps first seen less than `notice` ago.
    fn lost<'g>(
        &mut self,
        repair_gaps: &'g [GapView],
        notice: Duration,
        now: Instant,
    ) -> Vec<&'g GapView> {
        repair_gaps
            .iter()
            .filter(|g| g.state == GapState::Unrecoverable)
            .filter(|g| {
                let seen = *self.lost_seen.entry(g.start_ms).or_insert(now);
                now.duration_since(seen) < notice
            })
            .collect()
    }
}

fn judge(
    alerts: &mut AlertBus,
    cfg: &MonitorConfig,
    tick: &PartitionTick<'_>,
    live: usize,
    configured: usize,
    lost: &[&GapView],
) {
    alerts.observe(
        tick.alert_key(AlertName::PartitionDown),
        live == 0,
        Duration::from_secs_f64(cfg.partition_down_pending_secs),
        || "no live connection on this partition".to_owned(),
        tick.now,
    );
    alerts.observe(
        tick.alert_key(AlertName::PartitionImbalance),
        live > 0 && live < configured,
        Duration::from_secs_f64(cfg.imbalance_pending_secs),
        || format!("{live} of {configured} connections live"),
        tick.now,
    );
    alerts.observe(
        tick.alert_key(AlertName::GapUnrecoverable),
        !lost.is_empty(),
        Duration::ZERO,
        || format!("coverage gap cannot be repaired: {}", lost_note(lost)),
        tick.now,
    );
}

/// `600 s from 2024-05-01T10:00:00.000Z (reason); …`
fn lost_note(lost: &[&GapView]) -> String {
    lost.iter()
        .map(|g| {
            format!(
                "{:.0} s from {} ({})",
                (g.end_ms - g.start_ms) as f64 / 1000.0,
                rfc3339_ms(g.start_ms),
                g.reason.as_deref().unwrap_or("refused")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

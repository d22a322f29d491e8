//! What the connections of one partition know about each other: which are live, when each
//! last received an activity, and since when the partition has had no live connection.
//!
//! This is what makes data silence a relative judgement (a path is stale when its sibling
//! keeps delivering) and what backfill is sized from (the partition's uncovered time, not
//! one connection's).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::time::Instant;

#[derive(Debug)]
struct PathLive {
    live: AtomicBool,
    /// Last activity received, in ms since `base` (tokio clock); 0 = never.
    last_activity: AtomicU64,
    /// Last byte received, wall-clock ms; 0 = never.
    last_rx_wall_ms: AtomicU64,
}

/// Shared by the connections of one partition.
#[derive(Debug)]
pub struct PartitionLiveness {
    base: Instant,
    paths: Vec<PathLive>,
    /// Wall-clock ms since when no connection has been live; 0 = covered or never covered.
    uncovered_since_ms: AtomicU64,
    /// Start of the interval a backfilling connection is still replaying; 0 = none.
    backfill_from_ms: AtomicU64,
    ever_covered: AtomicBool,
}

impl PartitionLiveness {
    pub fn new(paths: usize) -> PartitionLiveness {
        PartitionLiveness {
            base: Instant::now(),
            paths: (0..paths)
                .map(|_| PathLive {
                    live: AtomicBool::new(false),
                    last_activity: AtomicU64::new(0),
                    last_rx_wall_ms: AtomicU64::new(0),
                })
                .collect(),
            uncovered_since_ms: AtomicU64::new(0),
            backfill_from_ms: AtomicU64::new(0),
            ever_covered: AtomicBool::new(false),
        }
    }

    /// A partition that had coverage before this process started (from the coverage
    /// ledger) starts out uncovered since that instant.
    pub fn with_uncovered_since(self, wall_ms: Option<u64>) -> PartitionLiveness {
        if let Some(ms) = wall_ms.filter(|&ms| ms > 0) {
            self.uncovered_since_ms.store(ms, Ordering::SeqCst);
            self.ever_covered.store(true, Ordering::SeqCst);
        }
        self
    }

    pub fn live_count(&self) -> usize {
        self.paths
            .iter()
            .filter(|p| p.live.load(Ordering::SeqCst))
            .count()
    }

    /// Since when the partition has had no live connection (wall ms), if it has had one
    /// before.
    pub fn uncovered_since(&self) -> Option<u64> {
        if self.live_count() > 0 {
            return None;
        }
        let since = self.uncovered_since_ms.load(Ordering::SeqCst);
        (since > 0).then_some(since)
    }

    /// A connection became live. `backfill_from_ms`: the start of the interval it was asked
    /// to replay, if any.
    pub fn set_live(&self, path: usize, backfill_from_ms: Option<u64>) {
        self.paths[path].live.store(true, Ordering::SeqCst);
        self.ever_covered.store(true, Ordering::SeqCst);
        self.uncovered_since_ms.store(0, Ordering::SeqCst);
        if let Some(from) = backfill_from_ms {
            self.backfill_from_ms.store(from, Ordering::SeqCst);
        }
    }

    /// The backfilling connection has been live long enough to have replayed its window.
    pub fn backfill_done(&self) {
        self.backfill_from_ms.store(0, Ordering::SeqCst);
    }

    /// A connection ended. When it was the last live one, the partition is uncovered from
    /// the last byte any path received (or from the start of an unfinished backfill).
    pub fn set_down(&self, path: usize, now_wall_ms: u64) {
        self.paths[path].live.store(false, Ordering::SeqCst);
        if self.live_count() == 0 {
            let pending = self.backfill_from_ms.swap(0, Ordering::SeqCst);
            let last_rx = self
                .paths
                .iter()
                .map(|p| p.last_rx_wall_ms.load(Ordering::SeqCst))
                .max()
                .filter(|&t| t > 0)
                .unwrap_or(now_wall_ms);
            let since = if pending > 0 {
                pending.min(last_rx)
            } else {
                last_rx
            };
            self.uncovered_since_ms.store(since, Ordering::SeqCst);
        }
    }

    /// Any byte arrived on `path`.
    pub fn note_rx(&self, path: usize, now_wall_ms: u64) {
        self.paths[path]
            .last_rx_wall_ms
            .store(now_wall_ms, Ordering::Relaxed);
    }

    /// An activity arrived on `path`.
    pub fn note_activity(&self, path: usize, now: Instant) {
        let ms = now.duration_since(self.base).as_millis() as u64 + 1;
        self.paths[path].last_activity.store(ms, Ordering::Relaxed);
    }

    /// Whether a live sibling of `path` received an activity at least `lead_ms` after
    /// `path` last did: the evidence that `path`'s silence is its own fault.
    pub fn sibling_ahead(&self, path: usize, lead_ms: u64) -> bool {
        let mine = self.paths[path].last_activity.load(Ordering::Relaxed);
        self.paths.iter().enumerate().any(|(i, p)| {
            i != path
                && p.live.load(Ordering::SeqCst)
                && p.last_activity.load(Ordering::Relaxed) >= mine.saturating_add(lead_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partition is uncovered from the last byte received when its last connection
    /// drops, and covered again when one comes back.
    #[test]
    fn coverage_follows_the_last_connection() {
        let p = PartitionLiveness::new(2);
        assert_eq!(p.uncovered_since(), None);
        p.set_live(0, None);
        p.set_live(1, None);
        p.note_rx(0, 1_000);
        p.note_rx(1, 1_500);
        p.set_down(0, 2_000);
        assert_eq!(p.uncovered_since(), None);
        p.set_down(1, 9_000);
        assert_eq!(p.uncovered_since(), Some(1_500));
        p.set_live(1, None);
        assert_eq!(p.uncovered_since(), None);
    }

    /// An unfinished backfill keeps the earlier gap start.
    #[test]
    fn unfinished_backfill_keeps_the_gap_start() {
        let p = PartitionLiveness::new(1);
        p.set_live(0, Some(500));
        p.note_rx(0, 3_000);
        p.set_down(0, 3_100);
        assert_eq!(p.uncovered_since(), Some(500));
        p.set_live(0, Some(500));
        p.backfill_done();
        p.note_rx(0, 4_000);
        p.set_down(0, 4_100);
        assert_eq!(p.uncovered_since(), Some(4_000));
    }

    /// A silent path is judged against a live sibling that kept delivering.
    #[tokio::test(start_paused = true)]
    async fn sibling_judgement() {
        let p = PartitionLiveness::new(2);
        p.set_live(0, None);
        p.set_live(1, None);
        p.note_activity(0, Instant::now());
        p.note_activity(1, Instant::now());
        assert!(!p.sibling_ahead(0, 1_000));
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        p.note_activity(1, Instant::now());
        assert!(p.sibling_ahead(0, 1_000));
        assert!(!p.sibling_ahead(1, 1_000));
        p.set_down(1, 0);
        assert!(!p.sibling_ahead(0, 1_000), "a dead sibling proves nothing");
    }
}

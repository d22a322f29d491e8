//! What the pair's other consumer has stored of a partition, as gap repair uses it: an
//! interval the peer stored is in the shared store already, so it is never requested from
//! the upstream's recovery (whose jobs are few and whose time is slow).

use std::time::Duration;

/// The peer's stored coverage of one partition, from its latest progress report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStored {
    /// Content time from which the peer's current run has been storing the partition.
    pub from_ms: u64,
    /// Content time up to which it has stored the partition (its coverage ledger).
    pub until_ms: u64,
    /// Intervals inside `[from_ms, until_ms)` it has not stored (its own open gaps).
    pub open_gaps: Vec<(u64, u64)>,
    /// Whether the peer has a live connection on the partition (its coverage is moving).
    pub live: bool,
}

impl PeerStored {
    /// The parts of `[start_ms, end_ms)` the peer has not stored, in order.
    pub fn uncovered(&self, start_ms: u64, end_ms: u64) -> Vec<(u64, u64)> {
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut add = |s: u64, e: u64| {
            let (s, e) = (s.max(start_ms), e.min(end_ms));
            if s < e {
                holes.push((s, e));
            }
        };
        add(start_ms, self.from_ms);
        add(self.until_ms.max(self.from_ms), end_ms);
        for &(s, e) in &self.open_gaps {
            add(s, e);
        }
        holes.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in holes {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }
}

/// What the pair's other consumer can say about a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnswer {
    /// Its stored coverage.
    Stored(PeerStored),
    /// Nothing yet: the coordination is starting (a gap found now waits a while).
    NotYet,
    /// No peer (none reports, or coordination is lost): repair works alone.
    Alone,
}

/// The pair's other consumer, as gap repair asks it.
pub trait PeerCoverage: Send + Sync + std::fmt::Debug {
    /// What it stored of this partition.
    fn stored(&self) -> PeerAnswer;
}

/// How long a new gap waits for a live peer whose stored coverage has not reached it yet
/// (its stored watermark trails what it received by the store's latency) before recovery
/// is requested for what it still lacks.
pub const PEER_GRACE: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    /// What the peer lacks: before its start, after its end, and its own gaps.
    #[test]
    fn uncovered_parts() {
        let p = PeerStored {
            from_ms: 100,
            until_ms: 1_000,
            open_gaps: vec![(400, 500), (450, 600)],
            live: true,
        };
        assert_eq!(p.uncovered(200, 300), vec![]);
        assert_eq!(p.uncovered(50, 300), vec![(50, 100)]);
        assert_eq!(p.uncovered(300, 700), vec![(400, 600)]);
        assert_eq!(p.uncovered(900, 1_200), vec![(1_000, 1_200)]);
        assert_eq!(
            p.uncovered(0, 2_000),
            vec![(0, 100), (400, 600), (1_000, 2_000)]
        );
        assert_eq!(PeerStored::default().uncovered(5, 9), vec![(5, 9)]);
    }
}

//! What the connections of one partition know about each other: which are live, what each
//! has delivered, and up to when the partition is known complete.
//!
//! Each path's current connection delivers its stream continuously from where it started
//! (the connect time, or the start of its backfill) up to the latest activity it
//! received. Times here are *content* times: the creation time in the activity's id
//! (snowflake), falling back to the receive time where the id carries none. Content time
//! makes an interrupted backfill exact: a replay that died half-way covers only as far as
//! it got, not up to the moment it died.
//!
//! The partition is complete up to `C`, the end of the chain of path intervals that join
//! without a hole. A reconnecting path needs no backfill only if a live *sibling* is fresh
//! and inside that complete prefix; otherwise it replays from `C`. A sibling that looked
//! fresh but was silently stalling leaves a hole that its own reconnect then fills, since
//! its interval no longer joins `C`. With a single path, every reconnect backfills.
//!
//! Data silence is judged here too: a path is stale when a live sibling keeps delivering.

use std::sync::Mutex;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
struct PathState {
    live: bool,
    /// Content time from which the current (or last) connection delivered continuously.
    covered_from_ms: u64,
    /// Content time up to which its current interval reaches: the latest activity
    /// received, or where its replay starts until one arrives; 0 = none yet.
    latest_ms: u64,
    /// Content time of the latest activity actually received on it (never a replay's
    /// start): what the pair's other consumer is compared with. 0 = none yet.
    received_ms: u64,
    /// Receive time of the latest activity (tokio clock), for silence judgements.
    last_activity: Option<Instant>,
}

#[derive(Debug)]
struct State {
    paths: Vec<PathState>,
    /// Content time up to which the partition is known complete; 0 = unknown.
    complete_until_ms: u64,
    /// The latest activity (content time) the pair's other consumer reported for this
    /// partition, and when its report arrived here.
    peer: Option<(u64, Instant)>,
}

impl State {
    /// Extends the complete prefix with every path interval that joins it.
    fn settle(&mut self) -> u64 {
        loop {
            let before = self.complete_until_ms;
            for p in &self.paths {
                if p.latest_ms > self.complete_until_ms
                    && p.covered_from_ms <= self.complete_until_ms
                {
                    self.complete_until_ms = p.latest_ms;
                }
            }
            if self.complete_until_ms == before {
                return before;
            }
        }
    }
}

/// Shared by the connections of one partition.
#[derive(Debug)]
pub struct PartitionLiveness {
    state: Mutex<State>,
    /// The upstream's clock minus the host's (ms), from the latest connect's `Date`.
    clock_offset_ms: std::sync::atomic::AtomicI64,
    /// Where coverage began in a run without history (the first connect): nothing
    /// before it was ever this consumer's to store. 0: not yet, or history was given.
    origin_ms: std::sync::atomic::AtomicU64,
}

impl PartitionLiveness {
    pub fn new(paths: usize) -> PartitionLiveness {
        PartitionLiveness {
            state: Mutex::new(State {
                paths: vec![PathState::default(); paths],
                complete_until_ms: 0,
                peer: None,
            }),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            origin_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Where coverage began, when this run started without history (see `origin_ms`):
    /// the coverage ledger records it at once, so a crash before anything is stored
    /// replays from there instead of from the next start.
    pub fn origin_ms(&self) -> Option<u64> {
        let o = self.origin_ms.load(std::sync::atomic::Ordering::SeqCst);
        (o > 0).then_some(o)
    }

    /// Records the upstream's clock offset (see [`crate::connection::clock_offset_ms`]).
    pub fn set_clock_offset(&self, offset_ms: i64) {
        self.clock_offset_ms
            .store(offset_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Now on the upstream's clock: content times and gaps are measured against it, so a
    /// host clock running behind cannot shrink a gap.
    pub fn upstream_now_ms(&self) -> u64 {
        let offset = self
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        tandem_core::time::unix_ms_now().saturating_add_signed(offset)
    }

    /// The partition was complete up to `wall_ms` before this process started (from the
    /// coverage ledger): the first connection replays from there.
    pub fn with_complete_until(self, wall_ms: Option<u64>) -> PartitionLiveness {
        if let Some(ms) = wall_ms {
            self.state.lock().expect("liveness lock").complete_until_ms = ms;
        }
        self
    }

    /// How many paths the partition has in this process.
    pub fn paths(&self) -> usize {
        self.state.lock().expect("liveness lock").paths.len()
    }

    pub fn live_count(&self) -> usize {
        self.state
            .lock()
            .expect("liveness lock")
            .paths
            .iter()
            .filter(|p| p.live)
            .count()
    }

    /// Content time up to which the partition is known complete (0: unknown).
    pub fn complete_until(&self) -> u64 {
        self.state.lock().expect("liveness lock").settle()
    }

    /// A connection became live, delivering from `from_ms` (content time: the connect time,
    /// or where its backfill starts).
    pub fn set_live(&self, path: usize, from_ms: u64) {
        let mut st = self.state.lock().expect("liveness lock");
        if st.complete_until_ms == 0 {
            // The first connection of a run without history: nothing before it matters.
            st.complete_until_ms = from_ms;
            self.origin_ms
                .store(from_ms, std::sync::atomic::Ordering::SeqCst);
        }
        let received_ms = st.paths[path].received_ms;
        st.paths[path] = PathState {
            live: true,
            covered_from_ms: from_ms,
            latest_ms: from_ms,
            received_ms,
            last_activity: None,
        };
        st.settle();
    }

    /// A connection became live delivering from `from_ms` after it asked to replay from
    /// the complete prefix: the part of `[complete, from_ms)` that its replay does not
    /// reach and that no live sibling joined to the prefix will deliver is uncovered. It
    /// is handed over (the prefix moves to `from_ms`) and returned, for gap repair.
    ///
    /// Judged here, when the upstream has answered and the replay's start is known, rather
    /// than when the request was made: a request that fails leaves nothing to hand over,
    /// and two paths replaying after the same outage report one gap between them, not a
    /// second one as long as the milliseconds between their answers.
    pub fn set_live_replaying(&self, path: usize, from_ms: u64) -> Option<(u64, u64)> {
        let mut st = self.state.lock().expect("liveness lock");
        let complete = st.settle();
        let joined_sibling = st
            .paths
            .iter()
            .enumerate()
            .any(|(i, p)| i != path && p.live && p.covered_from_ms <= complete);
        let hole = (complete > 0 && from_ms > complete && !joined_sibling).then(|| {
            st.complete_until_ms = from_ms;
            (complete, from_ms)
        });
        drop(st);
        self.set_live(path, from_ms);
        hole
    }

    /// The live path that received an activity most recently (`None`: no path is live).
    /// Recovery requests leave through it: it is the one known to work now.
    pub fn freshest_live_path(&self) -> Option<usize> {
        let st = self.state.lock().expect("liveness lock");
        st.paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.live)
            .max_by_key(|(_, p)| p.last_activity)
            .map(|(i, _)| i)
    }

    /// A connection ended.
    pub fn set_down(&self, path: usize) {
        let mut st = self.state.lock().expect("liveness lock");
        st.settle();
        st.paths[path].live = false;
    }

    /// Lines arrived on `path` and were handed to the merger; `content_ms` is the creation
    /// time of the latest activity among them, `None` when none had one (system
    /// messages, unparseable lines): those keep the path fresh but cover nothing.
    pub fn note_activity(&self, path: usize, now: Instant, content_ms: Option<u64>) {
        let mut st = self.state.lock().expect("liveness lock");
        let p = &mut st.paths[path];
        if let Some(t) = content_ms {
            p.latest_ms = p.latest_ms.max(t);
            p.received_ms = p.received_ms.max(t);
        }
        p.last_activity = Some(now);
    }

    /// Whether a live sibling of `path` received an activity at least `lead_ms` after
    /// `path` last did: the evidence that `path`'s silence is its own fault.
    pub fn sibling_ahead(&self, path: usize, lead_ms: u64, connected_at: Instant) -> bool {
        let st = self.state.lock().expect("liveness lock");
        let mine = st.paths[path]
            .last_activity
            .unwrap_or(connected_at)
            .max(connected_at);
        st.paths.iter().enumerate().any(|(i, p)| {
            i != path
                && p.live
                && p.last_activity
                    .is_some_and(|t| t >= mine + std::time::Duration::from_millis(lead_ms))
        })
    }

    /// The pair's other consumer reports the latest activity it received of this partition
    /// (content time); `None`: there is no peer, or it went quiet.
    pub fn set_peer_latest(&self, latest_ms: Option<u64>) {
        let mut st = self.state.lock().expect("liveness lock");
        st.peer = latest_ms.map(|ms| (ms, Instant::now()));
    }

    /// How far (ms of content time) the peer's latest activity is ahead of `path`'s, when
    /// it is ahead by more than `lead_ms` and its report is younger than `fresh`: the
    /// evidence that `path`'s silence is its own fault.
    pub fn peer_ahead(&self, path: usize, lead_ms: u64, fresh: std::time::Duration) -> Option<u64> {
        let st = self.state.lock().expect("liveness lock");
        let (peer_ms, at) = st.peer?;
        let mine = st.paths[path].received_ms;
        let lead = peer_ms.saturating_sub(mine);
        (at.elapsed() <= fresh && mine > 0 && lead > lead_ms).then_some(lead)
    }

    /// The latest activity (content time) any path of this partition received; 0: none.
    pub fn latest_ms(&self) -> u64 {
        let st = self.state.lock().expect("liveness lock");
        st.paths.iter().map(|p| p.received_ms).max().unwrap_or(0)
    }

    /// Where a connection of `path` about to connect at `now_ms` must replay from (content
    /// time), or `None` when a live, fresh sibling inside the complete prefix covers the
    /// partition (or nothing is known yet).
    pub fn backfill_from(&self, path: usize, now_ms: u64, fresh_ms: u64) -> Option<u64> {
        let mut st = self.state.lock().expect("liveness lock");
        let complete = st.settle();
        if complete == 0 {
            return None;
        }
        let covered = st.paths.iter().enumerate().any(|(i, p)| {
            i != path
                && p.live
                && p.latest_ms <= complete
                && now_ms.saturating_sub(p.latest_ms) <= fresh_ms
        });
        (!covered).then_some(complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A path dropping while its sibling delivers needs no backfill.
    #[test]
    fn delivering_sibling_covers() {
        let p = PartitionLiveness::new(2);
        assert_eq!(p.backfill_from(0, 1_000, 500), None, "nothing known yet");
        p.set_live(0, 1_000);
        p.set_live(1, 1_000);
        p.note_activity(0, Instant::now(), Some(2_000));
        p.note_activity(1, Instant::now(), Some(2_100));
        p.set_down(0);
        assert_eq!(p.backfill_from(0, 2_200, 500), None);
        assert_eq!(p.complete_until(), 2_100);
    }

    /// The case that lost data: a sibling that looks fresh but is stalling. The hole the
    /// reconnect leaves is filled when the stalled sibling reconnects, because the new
    /// interval does not join the complete prefix.
    #[test]
    fn stalled_sibling_leaves_a_hole_its_reconnect_fills() {
        let p = PartitionLiveness::new(2);
        p.set_live(0, 10_000);
        p.set_live(1, 10_000);
        p.note_activity(1, Instant::now(), Some(10_500)); // path 1 stalls after 10 500
        p.note_activity(0, Instant::now(), Some(10_600)); // path 0 drops after 10 600
        p.set_down(0);
        // At 10 700 path 1 still looks fresh: path 0 reconnects without backfill...
        assert_eq!(p.backfill_from(0, 10_700, 500), None);
        p.set_live(0, 10_700);
        p.note_activity(0, Instant::now(), Some(11_500));
        // ...and leaves [10 600, 10 700) uncovered: the prefix stays at 10 600.
        assert_eq!(p.complete_until(), 10_600);
        // Path 1 is found stale and reconnects: path 0 is fresh but not attached.
        p.set_down(1);
        assert_eq!(p.backfill_from(1, 11_500, 500), Some(10_600));
        p.set_live(1, 10_600 - 2_000);
        p.note_activity(1, Instant::now(), Some(11_500));
        assert_eq!(p.complete_until(), 11_500, "the replay closed the hole");
    }

    /// A single path always backfills its own gap.
    #[test]
    fn single_path_always_backfills() {
        let p = PartitionLiveness::new(1);
        p.set_live(0, 0);
        p.note_activity(0, Instant::now(), Some(900));
        p.set_down(0);
        assert_eq!(p.backfill_from(0, 950, 500), Some(900));
    }

    /// An interrupted replay covers only as far as it got.
    #[test]
    fn interrupted_backfill_covers_what_it_replayed() {
        let p = PartitionLiveness::new(1).with_complete_until(Some(1_000));
        assert_eq!(
            p.backfill_from(0, 5_000, 500),
            Some(1_000),
            "a ledger hint makes the first connection replay"
        );
        p.set_live(0, 900);
        p.note_activity(0, Instant::now(), Some(2_000)); // replayed up to 2 000, then died
        p.set_down(0);
        assert_eq!(p.backfill_from(0, 6_000, 500), Some(2_000));
    }

    /// A replay that starts after the complete prefix leaves a hole, reported once even
    /// when both paths replay after the same outage.
    #[test]
    fn replay_short_of_the_prefix_leaves_one_hole() {
        let p = PartitionLiveness::new(2).with_complete_until(Some(1_000));
        assert_eq!(p.set_live_replaying(0, 5_000), Some((1_000, 5_000)));
        assert_eq!(p.complete_until(), 5_000);
        // Path 1 answers 7 ms later: its replay starts 7 ms later, but path 0 joined the
        // prefix and delivers from there.
        assert_eq!(p.set_live_replaying(1, 5_007), None);
        p.note_activity(0, Instant::now(), Some(9_000));
        assert_eq!(p.complete_until(), 9_000);
    }

    /// A replay that reaches the prefix leaves nothing to repair.
    #[test]
    fn replay_reaching_the_prefix_leaves_no_hole() {
        let p = PartitionLiveness::new(1).with_complete_until(Some(1_000));
        assert_eq!(p.set_live_replaying(0, 1_000), None);
        assert_eq!(p.set_live_replaying(0, 900), None);
        let fresh = PartitionLiveness::new(1);
        assert_eq!(
            fresh.set_live_replaying(0, 900),
            None,
            "no history, no hole"
        );
    }

    /// The peer's report counts only while fresh and ahead by more than the lead.
    #[tokio::test(start_paused = true)]
    async fn peer_judgement() {
        let p = PartitionLiveness::new(1);
        p.set_live(0, 1_000);
        p.note_activity(0, Instant::now(), Some(2_000));
        let fresh = Duration::from_secs(3);
        assert_eq!(p.peer_ahead(0, 1_000, fresh), None, "no peer");
        p.set_peer_latest(Some(2_500));
        assert_eq!(p.peer_ahead(0, 1_000, fresh), None, "within the lead");
        p.set_peer_latest(Some(5_000));
        assert_eq!(p.peer_ahead(0, 1_000, fresh), Some(3_000));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            p.peer_ahead(0, 1_000, fresh),
            None,
            "a stale report proves nothing"
        );
        p.set_peer_latest(None);
        assert_eq!(p.peer_ahead(0, 1_000, fresh), None);
        // A reconnect replaying from far back is not an activity received: the path is
        // compared with what it last received.
        p.set_live(0, 100);
        p.set_peer_latest(Some(2_500));
        assert_eq!(p.peer_ahead(0, 1_000, fresh), None);
        assert_eq!(p.latest_ms(), 2_000);
    }

    /// A silent path is judged against a live sibling that kept delivering.
    #[tokio::test(start_paused = true)]
    async fn sibling_judgement() {
        let start = Instant::now();
        let p = PartitionLiveness::new(2);
        p.set_live(0, 1);
        p.set_live(1, 1);
        p.note_activity(0, Instant::now(), Some(1));
        p.note_activity(1, Instant::now(), Some(1));
        assert!(!p.sibling_ahead(0, 1_000, start));
        tokio::time::advance(Duration::from_secs(3)).await;
        p.note_activity(1, Instant::now(), Some(3_001));
        assert!(p.sibling_ahead(0, 1_000, start));
        assert!(!p.sibling_ahead(1, 1_000, start));
        p.set_down(1);
        assert!(
            !p.sibling_ahead(0, 1_000, start),
            "a dead sibling proves nothing"
        );
    }
}

//! Counts shared by the stages of one partition, read by the monitor to reconcile them.
//!
//! Accounting (per partition, exact once the channels between stages are drained):
//! - every line a connection hands on is `raw` (heartbeats are not lines);
//! - the merger puts each raw line in exactly one of `unique`, `duplicates`,
//!   `dead_lettered`, `system`: raw = unique + duplicates + dead_lettered + system;
//! - between the merger and the sink each unique activity waits in a bounded channel
//!   (`queued`), then the sink holds it until the store acknowledges it:
//!   unique = queued + in_flight + stored, where `in_flight` is what the sink actually
//!   holds (memory, spool, awaiting acknowledgement), counted at each structure operation,
//!   so that a loss between the merger and the store shows up as a difference.
//!
//! Every move downstream adds to the next counter before subtracting from the previous
//! one, and [`Tally::snapshot`] reads upstream counters first: an activity in motion may
//! be counted twice in a snapshot, never missed.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counts of one partition.
#[derive(Debug, Default)]
pub struct Tally {
    pub raw: AtomicU64,
    pub unique: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub system: AtomicU64,
    /// Unique activities between the merger and the sink (in the channel).
    pub queued: AtomicU64,
    pub stored: AtomicU64,
    /// Activities the store acknowledged as duplicates of what it already held.
    pub store_duplicates: AtomicU64,
    pub in_flight: AtomicU64,
}

/// A consistent-enough copy of a [`Tally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TallySnapshot {
    pub raw: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub system: u64,
    pub queued: u64,
    pub stored: u64,
    pub store_duplicates: u64,
    pub in_flight: u64,
}

impl Tally {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::SeqCst);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> TallySnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        // Upstream first: what moves downstream meanwhile is counted twice, never missed.
        let raw = get(&self.raw);
        let unique = get(&self.unique);
        let duplicates = get(&self.duplicates);
        let dead_lettered = get(&self.dead_lettered);
        let system = get(&self.system);
        let queued = get(&self.queued);
        let in_flight = get(&self.in_flight);
        let stored = get(&self.stored);
        TallySnapshot {
            raw,
            unique,
            duplicates,
            dead_lettered,
            system,
            queued,
            stored,
            store_duplicates: get(&self.store_duplicates),
            in_flight,
        }
    }
}

impl TallySnapshot {
    /// Raw lines not yet classified by the merger (in the channel between them).
    pub fn unclassified(&self) -> i64 {
        self.raw as i64 - (self.unique + self.duplicates + self.dead_lettered + self.system) as i64
    }

    /// Unique activities neither queued, held by the sink nor stored: 0 when nothing is
    /// lost (an activity in motion can make it briefly negative, never positive).
    pub fn unaccounted(&self) -> i64 {
        self.unique as i64 - self.queued as i64 - self.in_flight as i64 - self.stored as i64
    }
}

//! Counts shared by the stages of one partition, read by the monitor to reconcile them.
//!
//! Accounting (per partition, exact once the channels between stages are drained):
//! - every line a connection hands on is `raw` (heartbeats are not lines);
//! - the merger puts each raw line in exactly one of `unique`, `duplicates`,
//!   `dead_lettered`, `system`: raw = unique + duplicates + dead_lettered + system;
//! - the sink holds each unique activity until the store acknowledges it:
//!   unique = stored + in_flight, where `in_flight` is what the sink actually holds
//!   (memory, spool, awaiting acknowledgement), counted from its own structures, so that a
//!   loss between the merger and the store shows up as a difference.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counts of one partition.
#[derive(Debug, Default)]
pub struct Tally {
    pub raw: AtomicU64,
    pub unique: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub system: AtomicU64,
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
    pub stored: u64,
    pub store_duplicates: u64,
    pub in_flight: u64,
}

impl Tally {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TallySnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TallySnapshot {
            // Read downstream counts first, so a line in motion is never counted by two
            // stages in one snapshot.
            stored: get(&self.stored),
            store_duplicates: get(&self.store_duplicates),
            in_flight: get(&self.in_flight),
            unique: get(&self.unique),
            duplicates: get(&self.duplicates),
            dead_lettered: get(&self.dead_lettered),
            system: get(&self.system),
            raw: get(&self.raw),
        }
    }
}

impl TallySnapshot {
    /// Raw lines not yet classified by the merger (in the channel between them).
    pub fn unclassified(&self) -> i64 {
        self.raw as i64 - (self.unique + self.duplicates + self.dead_lettered + self.system) as i64
    }

    /// Unique activities neither stored nor held by the sink: 0 when nothing is lost
    /// (positive while activities travel from the merger to the sink).
    pub fn unaccounted(&self) -> i64 {
        self.unique as i64 - self.stored as i64 - self.in_flight as i64
    }
}

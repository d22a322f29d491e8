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
//!
//! Counts are for alerts; decisions (the coverage ledger, a recovery chunk's "done", a
//! spool segment's deletion) use watermarks instead, which cannot stand in for each other:
//! - every unique activity gets a sequence number of its partition, in the order the
//!   merger accepted it (`numbered` is the highest given out);
//! - `stored_through` is the contiguous watermark of store acknowledgements: every
//!   activity numbered up to it is acknowledged;
//! - [`Lanes`] count, per input of the merger (each path, and recovery), the lines handed
//!   to the merger's channel and the lines it has classified. Each lane is one FIFO
//!   sender, so `classified >= handed-at-some-instant` proves that every line handed
//!   before that instant went through the merger.

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
    /// The highest sequence number given to a unique activity of the partition.
    pub numbered: AtomicU64,
    /// Every activity numbered up to this is acknowledged by the store.
    pub stored_through: AtomicU64,
    /// Lines handed to and classified by the merger, per input.
    pub lanes: Lanes,
}

/// Per input of a merger (a path, or recovery): lines handed to its channel and lines it
/// classified. Indices out of range are ignored (a tally built without lanes).
#[derive(Debug, Default)]
pub struct Lanes {
    handed: Box<[AtomicU64]>,
    classified: Box<[AtomicU64]>,
}

impl Lanes {
    pub fn new(inputs: usize) -> Lanes {
        let zeros = || (0..inputs).map(|_| AtomicU64::new(0)).collect();
        Lanes {
            handed: zeros(),
            classified: zeros(),
        }
    }

    /// `n` lines of input `lane` are in the merger's channel (called after the send).
    pub fn hand(&self, lane: usize, n: u64) {
        if let Some(c) = self.handed.get(lane) {
            c.fetch_add(n, Ordering::SeqCst);
        }
    }

    /// The merger classified `n` lines of input `lane`.
    pub fn classify(&self, lane: usize, n: u64) {
        if let Some(c) = self.classified.get(lane) {
            c.fetch_add(n, Ordering::SeqCst);
        }
    }

    /// Lines handed so far, per input.
    pub fn handed(&self) -> Vec<u64> {
        self.handed
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }

    /// Whether the merger has classified at least `handed[i]` lines of every input `i`.
    pub fn classified_all(&self, handed: &[u64]) -> bool {
        handed.iter().enumerate().all(|(i, &h)| {
            self.classified
                .get(i)
                .is_none_or(|c| c.load(Ordering::SeqCst) >= h)
        })
    }
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
    /// A tally whose merger has `inputs` inputs (paths plus recovery).
    pub fn with_lanes(inputs: usize) -> Tally {
        Tally {
            lanes: Lanes::new(inputs),
            ..Tally::default()
        }
    }

    /// Gives out `n` sequence numbers; returns the first.
    pub fn number(&self, n: u64) -> u64 {
        self.numbered.fetch_add(n, Ordering::SeqCst) + 1
    }

    /// Whether every activity numbered up to `seq` is acknowledged by the store.
    pub fn stored_through(&self, seq: u64) -> bool {
        self.stored_through.load(Ordering::SeqCst) >= seq
    }

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

    /// Unique activities neither queued, held by the sink, stored, nor acknowledged as
    /// already held by the store: 0 when nothing is lost (an activity in motion can make
    /// it briefly negative, never positive).
    pub fn unaccounted(&self) -> i64 {
        self.unique as i64
            - self.queued as i64
            - self.in_flight as i64
            - self.stored as i64
            - self.store_duplicates as i64
    }
}

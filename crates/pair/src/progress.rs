//! What a consumer tells its peer about each partition.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One partition of one stream, named as the configuration names it (both consumers of
/// a pair configure the same streams).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId {
    pub stream: Arc<str>,
    pub partition: u32,
}

impl PartitionId {
    pub fn new(stream: impl Into<Arc<str>>, partition: u32) -> PartitionId {
        PartitionId {
            stream: stream.into(),
            partition,
        }
    }
}

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.stream, self.partition)
    }
}

/// A consumer's progress on one partition: the body of its beacon. Content times are
/// the upstream's (milliseconds since the epoch), never a host clock, so the two zones
/// compare them without trusting each other's clocks.
///
/// Fields missing from a peer's beacon (a peer of another version) take their defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// Content time of the latest activity received (0: none).
    pub latest_ms: u64,
    /// Content time up to which the partition is stored: the coverage ledger's
    /// complete-until (0: unknown).
    pub stored_until_ms: u64,
    /// Content time from which this consumer's current run has stored the partition
    /// (the complete-until it started from, or its first connect; 0: unknown): its
    /// stored coverage is `[stored_from_ms, stored_until_ms)` less `open_gaps`.
    pub stored_from_ms: u64,
    /// Live connections of the partition in this consumer.
    pub live: usize,
    /// Gaps this consumer has not stored yet, `[start, end)` in content milliseconds.
    pub open_gaps: Vec<(u64, u64)>,
}

/// The latest beacon of another consumer for a partition.
#[derive(Clone, Debug)]
pub struct PeerProgress {
    /// The peer's `consumer_id`.
    pub consumer: String,
    pub progress: Progress,
    /// Since the beacon was received here, on this host's monotonic clock.
    pub age: Duration,
}

//! How lines travel: a [`Batch`] of raw lines from one connection read, and the
//! [`Unique`] activities the merger passes to a sink.
//!
//! Lines are `Bytes` slices of the inflated stream: no per-activity copy is made between
//! the socket and the sink.

use bytes::Bytes;
use tokio::time::Instant;

use crate::Partition;
use crate::ids::ActivityId;

/// Index of a configured stream in the process (its name lives in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u16);

/// Index of a configured network path within its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u8);

/// Where a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub stream: StreamId,
    pub partition: Partition,
    pub path: PathId,
}

/// The complete lines decoded from one read of one connection.
///
/// Every line shares the batch's origin and receive time; line `i` has the per-connection
/// sequence number `first_seq + i`. Heartbeats are not in here: the connection counts them.
#[derive(Debug, Clone)]
pub struct Batch {
    pub origin: Origin,
    /// Which connection of the path delivered it (a new number after each reconnect).
    pub connection: u64,
    pub received: Instant,
    pub first_seq: u64,
    pub lines: Vec<Bytes>,
}

/// An activity after deduplication: the first copy that arrived.
#[derive(Debug, Clone)]
pub struct Unique {
    /// The partition's sequence number, in the order the merger accepted it: the stored
    /// watermark is made of these (see [`crate::tally`]).
    pub seq: u64,
    pub id: ActivityId,
    pub line: Bytes,
    /// The path whose copy won.
    pub path: PathId,
    /// When the winning copy was received.
    pub received: Instant,
}

/// Unique activities of one partition, in the order the merger accepted them.
#[derive(Debug, Clone)]
pub struct UniqueBatch {
    pub stream: StreamId,
    pub partition: Partition,
    pub items: Vec<Unique>,
}

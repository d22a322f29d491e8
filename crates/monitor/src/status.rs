//! What `/status` serves and the demo prints: a snapshot per stream, partition, connection
//! and sink, with the alerts, built afresh on every tick. The field names here are the JSON
//! field names of `/status`, so renaming one is a change of the endpoint.

use serde::Serialize;
use tandem_conn::ConnSnapshot;
use tandem_core::{GapView, Partition, TallySnapshot};

use crate::alert::{AlertView, Resolved};

/// A partition coverage gap: an interval with no live connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoverageGap {
    pub start_ms: u64,
    /// `None` while the gap is open.
    pub end_ms: Option<u64>,
    pub secs: f64,
}

/// Status of one connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub path: String,
    pub phase: &'static str,
    pub retry_count: u32,
    pub backoff_secs: Option<f64>,
    pub connected_since_ms: Option<u64>,
    pub last_activity_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    pub items_received: u64,
    pub heartbeats: u64,
    pub bytes_received: u64,
    pub connects: u64,
    pub last_error: Option<String>,
}

impl ConnectionStatus {
    pub(crate) fn new(path: &str, s: &ConnSnapshot) -> ConnectionStatus {
        ConnectionStatus {
            path: path.to_owned(),
            phase: s.phase.label(),
            retry_count: s.retry_count,
            backoff_secs: s.current_backoff.map(|d| d.as_secs_f64()),
            connected_since_ms: s.connected_since_ms,
            last_activity_ms: s.last_activity_ms,
            last_heartbeat_ms: s.last_heartbeat_ms,
            items_received: s.items_received,
            heartbeats: s.heartbeats,
            bytes_received: s.bytes_received,
            connects: s.connects,
            last_error: s.last_error.as_ref().map(ToString::to_string),
        }
    }
}

/// Counts of one partition.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub raw: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub system: u64,
    /// Between the merger and the sink.
    pub queued: u64,
    pub stored: u64,
    pub store_duplicates: u64,
    pub in_flight: u64,
    /// Unique activities from a grace period ago that are neither stored nor in flight.
    pub unaccounted: u64,
}

impl Counts {
    pub(crate) fn new(t: &TallySnapshot, unaccounted: u64) -> Counts {
        Counts {
            raw: t.raw,
            unique: t.unique,
            duplicates: t.duplicates,
            dead_lettered: t.dead_lettered,
            system: t.system,
            queued: t.queued,
            stored: t.stored,
            store_duplicates: t.store_duplicates,
            in_flight: t.in_flight,
            unaccounted,
        }
    }
}

/// Status of one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: Partition,
    pub live_connections: usize,
    pub configured_connections: usize,
    pub counts: Counts,
    pub connections: Vec<ConnectionStatus>,
    /// Intervals without a live connection (the latest 50).
    pub coverage_gaps: Vec<CoverageGap>,
    /// Gaps beyond backfill and their repair.
    pub repair_gaps: Vec<GapView>,
    /// The pair's other consumer's latest report of this partition.
    pub peer: Option<PeerStatus>,
}

/// What the pair's other consumer reported of a partition.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub consumer: String,
    /// Content time of its latest activity, and up to which it stored the partition.
    pub latest_ms: u64,
    pub stored_until_ms: u64,
    pub live_connections: usize,
    pub open_gaps: Vec<(u64, u64)>,
    /// Seconds since its report arrived.
    pub age_secs: f64,
}

/// Status of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub stored_per_sec: f64,
    pub partitions: Vec<PartitionStatus>,
}

/// Status of one sink.
#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub up: bool,
    /// False when the sink's task has ended (`/healthz` fails: restart the process).
    pub alive: bool,
}

/// What `/status` serves and the demo prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub at_ms: u64,
    pub streams: Vec<StreamStatus>,
    pub sinks: Vec<SinkStatus>,
    pub alerts: Vec<AlertView>,
    pub resolved_alerts: Vec<Resolved>,
    /// Whether the pair's coordination bucket is reachable (`None`: not one of a pair).
    pub pair_coordinated: Option<bool>,
    /// Ready: every partition has a live connection and every sink writes.
    pub ready: bool,
    pub not_ready_because: Vec<String>,
}

impl Status {
    /// Sets `ready` and `not_ready_because` from the streams and sinks.
    pub(crate) fn judge_readiness(&mut self) {
        let uncovered = self.streams.iter().flat_map(|s| {
            s.partitions
                .iter()
                .filter(|p| p.live_connections == 0)
                .map(move |p| {
                    format!(
                        "{} partition {} has no live connection",
                        s.name, p.partition
                    )
                })
        });
        let refusing = self
            .sinks
            .iter()
            .filter(|k| !k.up)
            .map(|k| format!("sink {} cannot write", k.name));
        self.not_ready_because = uncovered.chain(refusing).collect();
        self.ready = self.not_ready_because.is_empty();
    }
}

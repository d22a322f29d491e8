//! Every metric tandem exports, named in one place.
//!
//! Names follow Prometheus conventions: a `tandem_` prefix, base units in the name,
//! `_total` for counters. Label values come from small fixed sets: configured stream,
//! path and sink names, partition numbers, and the fixed vocabularies documented per
//! metric. The README's metrics table lists the same names; a test scrapes a running
//! pipeline and checks that each one is exported with its labels.

// Labels.
pub const STREAM: &str = "stream";
pub const PARTITION: &str = "partition";
pub const PATH: &str = "path";
pub const KIND: &str = "kind";
pub const REASON: &str = "reason";
pub const SINK: &str = "sink";
pub const ALERT: &str = "alert";
pub const SEVERITY: &str = "severity";

// Connections (labels: stream, partition, path).
/// Activities received at the very front, before deduplication.
pub const RAW_ACTIVITIES: &str = "tandem_raw_activities_total";
/// Heartbeats (`\r\n`) received.
pub const HEARTBEATS: &str = "tandem_heartbeats_total";
/// Compressed bytes received.
pub const RECEIVED_BYTES: &str = "tandem_received_bytes_total";
/// Lines longer than the configured maximum, skipped.
pub const OVERSIZE_LINES: &str = "tandem_oversize_lines_total";
/// Incomplete lines discarded when a connection ended.
pub const PARTIAL_LINES: &str = "tandem_partial_lines_total";
/// Connection requests sent (any outcome).
pub const CONNECT_ATTEMPTS: &str = "tandem_connect_attempts_total";
/// Connections established (200).
pub const CONNECTS: &str = "tandem_connects_total";
/// Connections ended, by error kind (label `kind`: connection, timeout, server_error,
/// rate_limited, stream_interrupted, authentication, client_error, fatal).
pub const DISCONNECTS: &str = "tandem_disconnects_total";
/// Connections closed by tandem as stale (label `reason`: data_silence, heartbeat_gap).
pub const STALE_CONNECTIONS: &str = "tandem_stale_connections_total";
/// 1 while the connection is live, else 0.
pub const CONNECTION_UP: &str = "tandem_connection_up";
/// The backoff delay currently being waited, in seconds (0 when not backing off).
pub const CONNECTION_BACKOFF: &str = "tandem_connection_backoff_seconds";
/// Seconds since the connection last received any byte (heartbeat gap).
pub const HEARTBEAT_GAP: &str = "tandem_heartbeat_gap_seconds";
/// Seconds since the connection last received an activity (data silence).
pub const DATA_SILENCE: &str = "tandem_data_silence_seconds";
/// Connection requests the stream's shared budget still allows in its window (label: stream).
pub const CONNECT_BUDGET_REMAINING: &str = "tandem_connect_budget_remaining";
/// Gauge (stream, partition, path): the upstream's clock minus the host's, estimated from
/// the `Date` header of the latest connect (seconds).
pub const UPSTREAM_CLOCK_OFFSET: &str = "tandem_upstream_clock_offset_seconds";
/// Counter (stream, partition, path): activity times too far ahead of the (corrected)
/// host clock, clamped before they counted as coverage.
pub const FUTURE_CONTENT_TIMES: &str = "tandem_future_content_times_total";

// Merger (labels: stream, partition; path where noted).
/// Unique activities: first copies accepted.
pub const UNIQUE_ACTIVITIES: &str = "tandem_unique_activities_total";
/// Later copies removed (label path: the path that delivered the copy).
pub const DUPLICATES: &str = "tandem_duplicates_total";
/// First copies by the path that delivered them.
pub const FIRST_ARRIVALS: &str = "tandem_first_arrivals_total";
/// How far behind the first copy a later copy arrived (histogram; label path: the
/// lagging path).
pub const PATH_LAG: &str = "tandem_path_lag_seconds";
/// Lines that were not usable activities, written to the dead-letter file (label reason).
pub const DEAD_LETTERS: &str = "tandem_dead_letters_total";
/// System messages from the upstream (label kind: info, warn, error).
pub const SYSTEM_MESSAGES: &str = "tandem_system_messages_total";
/// Ids currently remembered by the dedup cache.
pub const DEDUP_IDS: &str = "tandem_dedup_ids";
/// Ids forgotten before their dedup window ended because the cache hit its cap.
pub const DEDUP_EVICTED_EARLY: &str = "tandem_dedup_evicted_early_total";
/// Seconds the oldest remembered id has been kept (the dedup horizon actually covered).
pub const DEDUP_HORIZON: &str = "tandem_dedup_horizon_seconds";

// Sinks (labels: stream, partition, sink).
/// Activities acknowledged by the store.
pub const STORED_ACTIVITIES: &str = "tandem_stored_activities_total";
/// Publishes the store acknowledged as duplicates (cross-zone dedup at work).
pub const SINK_DUPLICATE_ACKS: &str = "tandem_sink_duplicate_acks_total";
/// Activities handed to the sink and not yet acknowledged (memory and spool).
pub const IN_FLIGHT: &str = "tandem_in_flight_activities";
/// Activities held in the on-disk spool while the store is unavailable.
pub const SPOOLED: &str = "tandem_spooled_activities";
/// Failed store operations, by kind (label kind: transient, fatal).
pub const SINK_ERRORS: &str = "tandem_sink_errors_total";
/// 1 while the store accepts writes, else 0 (label: sink).
pub const SINK_UP: &str = "tandem_sink_up";
/// Time from an activity's first receipt to its handoff to the store (histogram; label:
/// sink).
pub const HANDOFF_LATENCY: &str = "tandem_handoff_latency_seconds";

// Monitor (labels: stream, partition).
/// Live connections of a partition.
pub const LIVE_CONNECTIONS: &str = "tandem_live_connections";
/// Connections the configuration asks for per partition.
pub const CONFIGURED_CONNECTIONS: &str = "tandem_configured_connections";
/// 1 while no connection of the partition is live.
pub const PARTITION_UNCOVERED: &str = "tandem_partition_uncovered";
/// Partition coverage gaps that ended.
pub const COVERAGE_GAPS: &str = "tandem_coverage_gaps_total";
/// Total length of ended partition coverage gaps, in seconds.
pub const COVERAGE_GAP_SECONDS: &str = "tandem_coverage_gap_seconds_total";
/// unique − stored − in flight − dead-lettered; 0 when every activity is accounted for.
pub const RECONCILIATION_DIFFERENCE: &str = "tandem_reconciliation_difference";
/// 1 while an alert fires (labels: alert, severity, stream, partition).
pub const ALERT_FIRING: &str = "tandem_alert_firing";
/// Alerts that started firing (labels: alert, severity).
pub const ALERTS_FIRED: &str = "tandem_alerts_fired_total";

// Gap repair (labels: stream, partition).
/// Coverage gaps waiting for or under repair.
pub const GAPS_OPEN: &str = "tandem_gaps_open";
/// Coverage gaps repaired (label kind: backfill, recovery).
pub const GAPS_REPAIRED: &str = "tandem_gaps_repaired_total";
/// Gaps that cannot be repaired (e.g. likes streams have no recovery).
pub const GAPS_UNRECOVERABLE: &str = "tandem_gaps_unrecoverable_total";
/// Time from a gap's end to its repair, in seconds (histogram).
pub const GAP_REPAIR_DURATION: &str = "tandem_gap_repair_duration_seconds";

//! What a connection tells the rest of the process: lifecycle events on a channel and its
//! state on a `watch`. An observer can never block or break the reconnect loop.

use std::sync::Arc;
use std::time::Duration;

use tandem_core::Partition;

use crate::error::StreamError;

/// Names of one connection, for events, logs and metric labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub stream: Arc<str>,
    pub partition: Partition,
    pub path: Arc<str>,
}

/// Why a connection was judged stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// No byte at all for the heartbeat interval plus margin.
    HeartbeatGap,
    /// No activity while a sibling path kept delivering.
    DataSilence,
    /// No activity while the pair's other consumer received newer activities of the
    /// partition (its progress beacon is the evidence).
    PeerAhead,
    /// No activity for far longer than the partition's own rate makes likely, with no
    /// sibling in this process to judge against (one path per process).
    RateSilence,
}

impl StaleReason {
    pub fn label(self) -> &'static str {
        match self {
            StaleReason::HeartbeatGap => "heartbeat_gap",
            StaleReason::DataSilence => "data_silence",
            StaleReason::PeerAhead => "peer_ahead",
            StaleReason::RateSilence => "rate_silence",
        }
    }

    pub const ALL: [StaleReason; 4] = [
        StaleReason::HeartbeatGap,
        StaleReason::DataSilence,
        StaleReason::PeerAhead,
        StaleReason::RateSilence,
    ];
}

/// A lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnEvent {
    /// A connection request is about to be sent.
    Connecting {
        key: ConnKey,
        attempt: u32,
        backfill_minutes: u64,
    },
    /// The upstream answered 200.
    Connected {
        key: ConnKey,
        connection: u64,
        backfill_minutes: u64,
    },
    /// The connection ended (or the attempt failed) with this error.
    Disconnected {
        key: ConnKey,
        error: StreamError,
        live_for: Option<Duration>,
    },
    /// Waiting `delay` before attempt `attempt`.
    Reconnecting {
        key: ConnKey,
        attempt: u32,
        delay: Duration,
    },
    /// The connection was closed by tandem because it was stale.
    Stale {
        key: ConnKey,
        reason: StaleReason,
        silent_for: Duration,
    },
    /// The connection stopped for good (fatal error or retries exhausted).
    Fatal { key: ConnKey, error: StreamError },
    /// 503 answers persisted past the escalation threshold.
    Escalated { key: ConnKey, persisted: Duration },
    /// The partition was uncovered for longer than backfill reaches: `[start_ms, end_ms)`
    /// (content time, ms) must come from recovery. The partition's complete prefix now
    /// runs past it: the interval is gap repair's to close.
    UncoveredBeyondBackfill {
        stream: Arc<str>,
        partition: Partition,
        start_ms: u64,
        end_ms: u64,
    },
}

impl ConnEvent {
    /// Writes the event's log line. The connection's names come from the span it runs in
    /// (`conn{stream, partition, path}`), so they are not repeated here.
    pub fn log(&self) {
        match self {
            ConnEvent::Connecting {
                attempt,
                backfill_minutes,
                ..
            } => tracing::debug!(attempt, backfill_minutes, "connecting"),
            ConnEvent::Connected {
                connection,
                backfill_minutes,
                ..
            } => tracing::info!(connection, backfill_minutes, "connected"),
            ConnEvent::Disconnected {
                error, live_for, ..
            } => tracing::warn!(
                kind = error.kind.label(), status = error.status,
                live_secs = live_for.map(|d| d.as_secs_f64()), error = %error.message,
                "connection ended"
            ),
            ConnEvent::Reconnecting { attempt, delay, .. } => {
                tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, "reconnecting")
            }
            ConnEvent::Stale {
                reason, silent_for, ..
            } => tracing::warn!(
                reason = reason.label(),
                silent_secs = silent_for.as_secs_f64(),
                "stale connection closed"
            ),
            ConnEvent::Fatal { error, .. } => tracing::error!(
                kind = error.kind.label(), status = error.status, error = %error.message,
                "connection stopped for good"
            ),
            ConnEvent::Escalated { persisted, .. } => tracing::warn!(
                persisted_secs = persisted.as_secs_f64(),
                "the upstream has refused for a long time"
            ),
            ConnEvent::UncoveredBeyondBackfill {
                start_ms, end_ms, ..
            } => tracing::debug!(
                start_ms,
                end_ms,
                "uncovered beyond backfill: handed to gap repair"
            ),
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConnPhase {
    /// Waiting for the shared connect budget or for the answer.
    #[default]
    Connecting,
    Live,
    /// Waiting before the next attempt.
    Backoff,
    /// Stopped for good.
    Stopped,
}

impl ConnPhase {
    pub fn label(self) -> &'static str {
        match self {
            ConnPhase::Connecting => "connecting",
            ConnPhase::Live => "live",
            ConnPhase::Backoff => "backoff",
            ConnPhase::Stopped => "stopped",
        }
    }
}

/// A connection's state (the X SDK's `StreamState`, plus what the monitor needs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnSnapshot {
    pub phase: ConnPhase,
    /// Consecutive failed attempts.
    pub retry_count: u32,
    /// The delay being waited in `Backoff`.
    pub current_backoff: Option<Duration>,
    /// Wall-clock ms when the current connection became live.
    pub connected_since_ms: Option<u64>,
    /// Wall-clock ms of the last activity and heartbeat received.
    pub last_activity_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    /// Totals over the connection's whole life (all reconnects).
    pub items_received: u64,
    pub heartbeats: u64,
    pub bytes_received: u64,
    pub connects: u64,
    pub last_error: Option<StreamError>,
}

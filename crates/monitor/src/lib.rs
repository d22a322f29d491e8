//! Operators learn about trouble here before their users do: raw versus unique versus
//! stored counts, heartbeat and data-silence gaps, partition coverage gaps, partition
//! connection imbalance, stored-volume drops; alerts with a pending → firing → resolved
//! life; Prometheus metrics and the `/status`, `/healthz`, `/readyz` endpoints.
//!
//! The monitor only observes — lifecycle events on channels, connection states on
//! `watch`, per-partition [`tandem_core::Tally`] atomics — and never sits in the data
//! path.
//!
//! # Layout
//! - [`config`]: [`MonitorConfig`], thresholds and the endpoint address.
//! - [`inputs`]: what the monitor watches ([`MonitorInputs`] and the stream, partition,
//!   connection and sink views).
//! - [`monitor`]: the loop ([`spawn`], [`MonitorHandle`]): events as they arrive, and
//!   each tick a short sequence of the concerns below.
//! - `coverage`: live connections per partition, coverage gaps, `partition_down`,
//!   `partition_imbalance`, `gap_unrecoverable`.
//! - `reconciliation`: raw, unique and stored counts a grace period apart,
//!   `reconciliation_mismatch`.
//! - `events`: conditions reported by lifecycle events (stale, fatal, upstream
//!   unavailable, dedup horizon weakened).
//! - `stored_rate`: each stream's stored rate against its baseline, `stored_rate_drop`.
//! - [`alert`]: the alert names, severities and state machine ([`Alerts`]).
//! - [`status`]: what `/status` serves ([`Status`] and its parts).
//! - [`http`]: the endpoint and the process-wide Prometheus recorder.
//! - [`webhook`]: Alertmanager-compatible delivery.

pub mod alert;
pub mod config;
mod coverage;
mod events;
pub mod http;
pub mod inputs;
pub mod monitor;
mod reconciliation;
pub mod status;
mod stored_rate;
pub mod webhook;

pub use alert::{AlertKey, AlertName, AlertView, Alerts, Phase, Resolved, Severity, Transition};
pub use config::MonitorConfig;
pub use http::{prometheus, serve};
pub use inputs::{ConnectionView, MonitorInputs, PartitionView, SinkView, StreamView};
pub use monitor::{MonitorHandle, spawn};
pub use status::{
    ConnectionStatus, Counts, CoverageGap, PartitionStatus, SinkStatus, Status, StreamStatus,
};

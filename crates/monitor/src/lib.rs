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
//! - [`alert`]: the alert names, severities and state machine ([`Alerts`]).
//! - [`monitor`]: the loop ([`spawn`]), coverage gaps, reconciliation, [`Status`].
//! - [`http`]: the endpoint and the process-wide Prometheus recorder.
//! - [`webhook`]: Alertmanager-compatible delivery.

pub mod alert;
pub mod config;
pub mod http;
pub mod monitor;
pub mod webhook;

pub use alert::{AlertKey, AlertName, AlertView, Alerts, Phase, Resolved, Severity, Transition};
pub use config::MonitorConfig;
pub use http::{prometheus, serve};
pub use monitor::{
    ConnectionStatus, ConnectionView, Counts, CoverageGap, MonitorHandle, MonitorInputs,
    PartitionStatus, PartitionView, SinkStatus, SinkView, Status, StreamStatus, StreamView, spawn,
};

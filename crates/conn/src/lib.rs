//! Redundant streaming connections to the X/Gnip APIs, each kept alive for the life of the
//! process: two (or more) per partition, each over its own network path.
//!
//! A [`Connection`] is one (stream, partition, path). It reads the gzip body itself,
//! frames `\r\n` lines into zero-copy [`tandem_core::Batch`]es for the merger, and when the
//! connection ends it asks a [`ReconnectPolicy`] whether and when to retry, and the
//! stream's shared [`ConnectBudget`] when it may send the next request. Stale connections
//! are noticed by heartbeat gap and by data silence judged against the sibling path
//! ([`PartitionLiveness`]), and reconnect with the backfill the partition's uncovered time
//! calls for. Lifecycle [`ConnEvent`]s go out on a channel and a [`ConnSnapshot`] on a
//! `watch`.
//!
//! # Layout
//! - [`config`]: paths, retry schedule, liveness, backfill, connect budget, buffers.
//! - [`error`]: [`StreamError`] and its [`ErrorKind`] (`is_retryable`, `is_refusal`).
//! - [`policy`]: the reconnect schedule per error class (every non-200 is retried;
//!   refusals on a slow schedule, a v2 operational disconnect at once).
//! - [`budget`]: the per-stream sliding-window connect budget with partition priority.
//! - [`reader`]: gzip inflate and line framing into `Bytes` slices.
//! - [`client`]: one HTTP client per path (source address, interface, proxy, pinned IP).
//! - [`liveness`]: what a partition's connections know about each other.
//! - [`events`]: lifecycle events and state snapshots.
//! - [`connection`]: endpoints (live and recovery URLs, each API's parameters, heartbeat
//!   and retention), requests (credentials read per request) and the [`Connection`]
//!   handle.
//! - `runner`: the supervised loop; every event is counted, logged and sent in one place.

pub mod budget;
pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod events;
pub mod liveness;
pub mod policy;
pub mod reader;
mod runner;

pub use budget::{ConnectBudget, SharedBudget};
pub use client::{TlsSettings, build_client, install_crypto_provider, path_clients};
pub use config::{
    BackfillConfig, BackfillPolicy, BudgetConfig, LivenessConfig, PathConfig, ReadConfig,
    RetryConfig,
};
pub use connection::{ApiKind, Auth, Connection, ConnectionSpec, Endpoint, Query};
pub use error::{ErrorKind, StreamError};
pub use events::{ConnEvent, ConnKey, ConnPhase, ConnSnapshot, StaleReason};
pub use liveness::PartitionLiveness;
pub use policy::{Decision, ReconnectPolicy};

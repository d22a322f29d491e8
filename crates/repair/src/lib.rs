//! Gap repair: a durable coverage ledger per stream partition, and recovery requests for
//! every interval both connections of a partition missed for longer than backfill
//! reaches, so that the store ends up with every activity exactly once.
//!
//! Backfill is the connections' own business (they reconnect with the minutes the
//! partition was uncovered). What backfill cannot reach is handed over here, split into
//! chunks and recovered in parallel with the live stream, at most two jobs at once per
//! account; the recovered lines go through the same merger and sink as live ones.
//!
//! # Layout
//! - [`config`]: [`RepairConfig`] (ledger directory, chunk size, margin, retention, jobs).
//! - [`gate`]: [`CoverageGate`] and [`Stored`] tickets: coverage and chunks wait for the
//!   stored watermark.
//! - [`ledger`]: the persisted [`PartitionLedger`] (complete-until, gaps, chunks) and the
//!   edge id files.
//! - [`peer`]: what the pair's other consumer stored ([`PeerCoverage`]): gap repair
//!   never requests an interval the peer stored.
//! - [`recovery`]: one recovery chunk: request, read, resume, completion; the account's
//!   job slots ([`JobSlots`]: local, or leased across the pair).
//! - [`repairer`]: the per-partition loop ([`spawn`]); with a store shared by two
//!   consumers ([`StoredIdsSince`]), recovery skips the posts the store already holds.

pub mod config;
pub mod gate;
pub mod ledger;
pub mod peer;
pub mod recovery;
pub mod repairer;

pub use config::RepairConfig;
pub use gate::{CoverageGate, Stored};
pub use ledger::PartitionLedger;
pub use peer::{PeerAnswer, PeerCoverage, PeerStored};
pub use recovery::{ChunkOutcome, JobPermit, JobSlots, LocalJobs, RecoverySpec};
pub use repairer::{PartitionRepair, ReadBack, ReadBackError, RepairHandle, StoredIdsSince, spawn};

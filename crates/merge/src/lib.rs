//! Exact deduplication of redundant activity streams: N copies in, one out, first copy
//! wins, in bounded memory.
//!
//! Each partition has its own [`Shard`] (partitions carry disjoint data). A shard
//! identifies each line by its top-level id (`tandem_core::identify`, no full parse),
//! drops copies whose id its [`DedupCache`] remembers, validates a first copy before
//! remembering it, sends unique activities on to the sink, and writes unusable lines to
//! the [`DeadLetters`] file. Per path it counts duplicates and first arrivals and samples
//! how far each path lags the first copy.
//!
//! # Layout
//! - [`config`]: [`MergeConfig`], the dedup window, cap and dead-letter directory.
//! - [`cache`]: [`GenerationalSet`] and [`DedupCache`], the time-bounded id sets.
//! - [`shard`]: [`Shard`], the per-partition merger task, and [`MergeEvent`].
//! - [`deadletter`]: the dead-letter file.
//!
//! Why the window must exceed the backfill window: see `DEDUP-WINDOW.md` beside this file.

pub mod cache;
pub mod config;
pub mod deadletter;
pub mod shard;

pub use cache::{DedupCache, GenerationalSet};
pub use config::MergeConfig;
pub use deadletter::DeadLetters;
pub use shard::{MergeEvent, Shard, ShardControl, ShardSpec};

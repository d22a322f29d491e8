//! Shared vocabulary of tandem: what an activity is, how it is identified, and the envelope
//! it travels in from a connection through the merger to a sink.
//!
//! Every other crate speaks these types, so none of them has to depend on another just to
//! name an activity or a partition.
//!
//! # Layout
//! - [`ids`]: [`ActivityId`] (post, like, unlike, delete), its dedup key and snowflake time.
//! - [`identity`]: finds the top-level identity of a raw line without parsing the whole
//!   document, tells system messages apart, and validates JSON strictly when asked.
//! - [`envelope`]: [`Batch`] of raw lines with their origin (stream, partition, path,
//!   receive time, sequence) and [`Unique`] activities after deduplication.
//! - [`time`]: wall-clock helpers (milliseconds since the Unix epoch, RFC 3339).
//! - [`secret`]: [`Secret`], a credential that never prints.
//! - [`metric`]: every metric name tandem exports, in one place.
//! - [`retry`]: the [`Retryable`] trait every retried error implements, and
//!   [`ExponentialBackoff`].
//! - [`tally`]: per-partition counts shared by the stages, for reconciliation.
//! - [`gap`]: coverage gaps beyond backfill as gap repair reports them ([`GapView`]).
//! - [`latency`]: a lock-free latency histogram (receipt to sink handoff).
//! - [`crash`]: named crash points for durability tests (compiled in only for tests).

pub mod crash;
pub mod envelope;
pub mod gap;
pub mod identity;
pub mod ids;
pub mod latency;
pub mod metric;
pub mod retry;
pub mod secret;
pub mod tally;
pub mod time;
mod validate;

pub use envelope::{Batch, Origin, PathId, StreamId, Unique, UniqueBatch};
pub use gap::{GapState, GapView};
pub use identity::{
    IdentityError, LineKind, SystemKind, SystemMessage, content_time_ms, identify, validate,
};
pub use ids::{ActivityId, DedupKey};
pub use retry::{ExponentialBackoff, InvalidBackoff, Retryable};
pub use secret::{Secret, SecretSource, redact_url};
pub use tally::{Lanes, Tally, TallySnapshot};

/// Runs blocking file I/O from async code: on a multi-threaded runtime the worker hands
/// its other tasks to the rest first (`block_in_place`), so a slow or hung disk stalls
/// only the caller; elsewhere (single-threaded tests) it simply runs.
pub fn blocking_io<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A partition number as the upstream numbers them (from 1).
pub type Partition = u32;

//! The two consumers of a pair (one per zone, storing into one JetStream stream)
//! coordinating through a JetStream key-value bucket on the NATS cluster they already
//! share: no new infrastructure.
//!
//! [`Pair::start`] connects with the NATS sink's settings and, every `beacon_ms`, puts
//! this consumer's [`Progress`] per partition (latest activity, stored watermark, live
//! connections, open gaps) and watches the other consumer's, which [`Pair::peers`]
//! returns while fresh. [`Pair::job_lease`] shares the account's recovery-job slots and
//! [`Pair::connect_token`] the stream's connect budget across the pair;
//! [`Pair::writer_lease`] makes one consumer at a time the writer of a partition. When the bucket
//! cannot be reached, [`Pair::coordinated`] is false, the `watch` of [`PairState`] says
//! why, and those two return [`Lost`]: callers fall back to their local behaviour. The
//! bucket's `max_age` is the only expiry (nats-server 2.9 has no per-key TTL); see
//! `COORDINATION.md` beside this file for what it implies.
//!
//! # Layout
//! - [`config`]: [`PairConfig`], the `[pair]` section.
//! - [`progress`]: [`PartitionId`], [`Progress`] (a beacon's body) and [`PeerProgress`].
//! - [`mod@pair`]: the [`Pair`] handle, [`PairState`], [`Lost`], and the state its tasks
//!   share (peers heard, the coordinated verdict).
//! - `beacon`: the coordination task: connection, beacons, the watch of the peers'.
//! - [`lease`]: [`JobLease`], recovery-job slots shared by the pair.
//! - `tokens`: the connect budget shared by the pair (urgent requests keep a reserve).
//! - [`writer`]: [`WriterLease`], one writer per partition of a store that cannot tell
//!   copies apart (a Kafka topic).
//! - `bucket`: opening a bucket, creating it when missing.
//! - `keys`: key and bucket names (escaped stream and account names).
//! - [`events`]: log lines and metrics ([`metric`]), one place per event.

mod beacon;
mod bucket;
pub mod config;
pub mod events;
mod keys;
pub mod lease;
pub mod pair;
pub mod progress;
mod tokens;
pub mod writer;

pub use config::PairConfig;
pub use events::metric;
pub use lease::JobLease;
pub use pair::{LocalProgress, Lost, Pair, PairState};
pub use progress::{PartitionId, PeerProgress, Progress};
pub use writer::WriterLease;

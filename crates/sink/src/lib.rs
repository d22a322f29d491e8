//! Durable sinks. "Stored" means acknowledged by the store, never merely handed to a
//! buffer: the monitor's raw-versus-stored comparison rests on these acknowledgements.
//!
//! A [`Store`] takes whole batches and acknowledges them once durable. The driver
//! ([`driver::spawn`]) sits between the mergers and a store: it keeps batches in order
//! (memory, bounded by activities and by bytes, then the disk [`Spool`]), retries with
//! backoff while the store is down or stalled (so the connections never stall on it), holds
//! the input back while the store acknowledges but is slower than it, turns acknowledgements into a contiguous stored
//! watermark per partition (what gap repair waits on), keeps every batch until it is
//! acknowledged (a store that lost writes gets them again; at shutdown the rest is
//! spooled), and drains at shutdown.
//!
//! # Layout
//! - [`config`]: [`SinkConfig`], the `[sinks.<name>]` section (one arm per kind).
//! - [`mod@start`]: [`start()`] builds a sink of any kind from its configuration.
//! - [`store`]: the [`Store`] trait, [`Ack`] (with sequence numbers), [`StoreError`] and
//!   its [`ErrorClass`] (`Lost`: put it again).
//! - [`driver`]: ordering, retry, acknowledgements and the stored watermark, drain
//!   ([`DriverConfig`]).
//! - [`spool`]: the on-disk overflow queue: checksummed records in segments, deleted only
//!   once stored.
//! - [`mod@file`]: [`FileStore`], NDJSON files per stream, partition and time bucket.
//! - [`nats`]: [`NatsStore`], NATS JetStream with `Nats-Msg-Id` dedup across zones, and
//!   [`JetStreamIds`], what the stream already holds (for gap repair in a pair).
//! - [`kafka`]: [`KafkaStore`], a Kafka-protocol service (Apache Kafka, OCI Streaming),
//!   keyed by activity id, one writer per partition in a pair ([`WriterGate`]), and
//!   [`TopicIds`], what the topic holds.
//! - [`StoredIds`]: what a shared store holds, whichever kind it is (for gap repair).
//! - [`simple`]: [`StdoutStore`] and [`NullStore`].
//! - `window`: the in-flight window, bounded by count and bytes, that JetStream and Kafka
//!   share.

pub mod config;
pub mod driver;
pub mod file;
pub mod kafka;
pub mod nats;
pub mod simple;
pub mod spool;
pub mod start;
pub mod store;
mod window;

pub use config::SinkConfig;
pub use driver::{DrainReport, DriverConfig, SinkHandle, spawn};
pub use file::{FileConfig, FileStore, Repair, StoredFile, recent_ids, stored_files};
pub use kafka::{KafkaConfig, KafkaStore, TopicIds, WriterGate};
pub use nats::{JetStreamIds, NatsConfig, NatsStore, client as nats_client};
pub use simple::{NullStore, StdoutStore};
pub use spool::{Spool, SpooledBatch};
pub use start::{IdsByPartition, SinkContext, SinkStartError, StartedSink, StoredIds, start};
pub use store::{Ack, ErrorClass, Store, StoreError, StreamNames};

//! The Kafka-protocol store: Apache Kafka, OCI Streaming, Redpanda, MSK, Event Hubs.
//!
//! Each activity is one record: key = the activity id (the service routes it to a topic
//! partition by the key, so every copy of an activity lands on the same one), value = the
//! line as received, headers `tandem-stream`, `tandem-partition`, `tandem-path` (the path
//! whose copy was stored) and `tandem-received-ms`. Every replica acknowledges every record
//! (`acks=all`), with the idempotent producer unless it is turned off; an activity counts as
//! stored when its delivery report says so. A line that would make a record larger than
//! `max_message_bytes` never gets here: the merger dead-letters it.
//!
//! Kafka has no duplicate window like JetStream's, so the store keeps what it sends unique
//! itself:
//! - A record whose delivery failed may have been stored all the same: it is looked for in
//!   the topic ([`TopicIds::between`]) and sent again only when it is not there.
//! - A [`TopicFollower`] reads the topic from the start of the dedup window on: nothing is
//!   sent before it has read what the topic held at start, and a record it has seen is
//!   acknowledged as a duplicate instead of sent, so a spool or an upstream replay after a
//!   restart stores nothing twice. A single consumer stops following once its own memory
//!   reaches back as far; a pair follows all along.
//! - **A pair writes each partition from one consumer at a time**: the holder of the
//!   partition's writer lease in the pair's bucket ([`WriterGate`]). The other consumer
//!   holds what it receives and acknowledges it when the follower sees the writer's record
//!   of it. When the writer dies its lease expires; the other consumer takes it, waits
//!   until its follower has read the topic as of that moment (a record the old writer sent
//!   is delivered or failed before its lease can expire: the delivery timeout is capped by
//!   [`WriterGate::fence`]), then writes what the topic still lacks.
//!
//! # Layout
//! - [`config`]: [`KafkaConfig`], the sink's section (SASL, TLS, batching, limits).
//! - [`store`]: [`KafkaStore`], the producer and its delivery reports, the standby.
//! - [`topic`]: [`TopicIds`] (read-back by time) and [`TopicFollower`].

pub mod config;
pub mod store;
pub mod topic;

use std::time::Duration;

use tokio::time::Instant;

use tandem_core::Partition;
use tandem_core::time::unix_ms_now;

pub use config::{Compression, KafkaConfig, SaslMechanism, SecurityProtocol};
pub use store::KafkaStore;
pub use topic::{HeldIds, TopicFollower, TopicIds};

/// Which consumer of a pair writes a partition (a lease in the pair's bucket).
pub trait WriterGate: Send + Sync + std::fmt::Debug {
    /// Since when this consumer holds the writer lease of the partition, while it holds it
    /// with time to spare; `None` while another consumer does (or nobody can tell).
    fn writer_since(&self, stream: &str, partition: Partition) -> Option<Instant>;

    /// How long after it was sent a record may still be delivered without landing after
    /// the lease it was sent under has passed on: caps the producer's delivery timeout.
    fn fence(&self) -> Duration;
}

/// How long what the follower read is kept, at least.
const MIN_KEEP: Duration = Duration::from_secs(600);
/// How far back the follower starts reading at most.
const MAX_FOLLOW: Duration = Duration::from_secs(3_600);

/// Starts a Kafka sink. The brokers may be down: the sink then starts down and spools.
pub(crate) fn start(
    name: &str,
    cfg: &KafkaConfig,
    ctx: crate::start::SinkContext,
) -> Result<crate::start::StartedSink, crate::start::SinkStartError> {
    let password = ctx.token.as_ref().map(|t| t.expose().to_owned());
    // From the start of the merger's memory on, but never further back than MAX_FOLLOW:
    // after a long stop the ledger's coverage edge may lie days back, and the follower
    // holds every id it reads for `keep`.
    let now = unix_ms_now();
    let since = (ctx.remember_since_ms).max(now.saturating_sub(MAX_FOLLOW.as_millis() as u64));
    let keep = Duration::from_millis(now.saturating_sub(since)).max(MIN_KEEP);
    let store = KafkaStore::new(
        cfg.clone(),
        ctx.names.clone(),
        password,
        ctx.writer.clone(),
        since,
        keep,
    )
    .map_err(|e| crate::start::SinkStartError::Store(e.to_string()))?
    .with_memory_budget(ctx.delivery.max_memory_bytes);
    let ids = store.topic_ids();
    let mut started = crate::start::with_store(name, store, ctx)?;
    started.shared = Some(crate::StoredIds::Kafka(ids));
    Ok(started)
}

/// What the topic holds of one upstream partition (for gap repair).
pub(crate) async fn between(
    ids: &TopicIds,
    stream: &str,
    partition: Partition,
    since_ms: u64,
    until_ms: u64,
) -> Result<std::collections::HashSet<tandem_core::ActivityId>, crate::StoreError> {
    let mut held = ids
        .between(Some((stream, partition)), since_ms, until_ms)
        .await?;
    Ok(held
        .remove(&(stream.to_owned(), partition))
        .unwrap_or_default())
}

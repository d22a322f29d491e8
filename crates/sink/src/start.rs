//! Starting a sink from its configuration: the store of its kind, behind a driver, and
//! what the mergers must remember from it (ids recently stored, ids waiting in the spool).

use std::collections::HashMap;
use std::sync::Arc;

use tandem_core::{ActivityId, Partition, Secret, StreamId, Tally, UniqueBatch};
use tokio::sync::mpsc;

use crate::config::SinkConfig;
use crate::driver::{DriverConfig, SinkHandle, spawn};
use crate::kafka::TopicIds;
use crate::nats::JetStreamIds;
use crate::simple::{NullStore, StdoutStore};
use crate::store::StreamNames;

/// Batches a merger may queue for a sink before it waits.
const CHANNEL_BATCHES: usize = 64;

/// What every sink is started with.
#[derive(Debug)]
pub struct SinkContext {
    /// The configured streams, by index.
    pub names: StreamNames,
    /// The driver's settings; `spool_dir` is this sink's own.
    pub delivery: DriverConfig,
    /// The counts of the partitions routed to this sink.
    pub tallies: HashMap<(StreamId, Partition), Arc<Tally>>,
    /// Ids stored since then (Unix ms) are remembered by the mergers after a restart.
    pub remember_since_ms: u64,
    /// The credential the configuration names (`token_env`/`token_file`,
    /// `password_env`/`password_file`), resolved.
    pub token: Option<Secret>,
    /// In a pair, who writes each partition to a store that cannot tell copies apart
    /// (Kafka); `None` for a single consumer.
    pub writer: Option<std::sync::Arc<dyn crate::kafka::WriterGate>>,
}

/// What a store that other consumers write to as well holds, for gap repair.
#[derive(Debug, Clone)]
pub enum StoredIds {
    Nats(JetStreamIds),
    Kafka(TopicIds),
}

impl StoredIds {
    /// Ids held on `stream`'s `partition`, written from `since_ms` to `until_ms` (Unix ms).
    pub async fn between(
        &self,
        stream: &str,
        partition: Partition,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<std::collections::HashSet<ActivityId>, crate::StoreError> {
        match self {
            StoredIds::Nats(ids) => ids.between(stream, partition, since_ms, until_ms).await,
            StoredIds::Kafka(ids) => {
                crate::kafka::between(ids, stream, partition, since_ms, until_ms).await
            }
        }
    }
}

/// Ids per (stream name, partition).
pub type IdsByPartition = HashMap<(String, Partition), Vec<ActivityId>>;

/// A running sink and what the rest of the pipeline needs from it.
#[derive(Debug)]
pub struct StartedSink {
    /// Where the mergers send unique batches.
    pub tx: mpsc::Sender<UniqueBatch>,
    pub handle: SinkHandle,
    /// Ids the mergers remember: stored recently (the restart rebuild) and waiting in
    /// the spool (so that an upstream replay does not store them twice).
    pub remembered: IdsByPartition,
    /// A store other consumers write to as well: recovery asks it what it already holds.
    pub shared: Option<StoredIds>,
}

/// A sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkStartError {
    #[error("{0}")]
    Store(String),
    #[error("spool: {0}")]
    Spool(std::io::Error),
}

/// Starts the sink `name` of kind `cfg`.
pub async fn start(
    name: &str,
    cfg: &SinkConfig,
    ctx: SinkContext,
) -> Result<StartedSink, SinkStartError> {
    let mut started = match cfg {
        SinkConfig::File(f) => crate::file::start(name, f, ctx)?,
        SinkConfig::Nats(n) => crate::nats::start(name, n, ctx).await?,
        SinkConfig::Kafka(k) => crate::kafka::start(name, k, ctx)?,
        SinkConfig::Stdout => with_store(name, StdoutStore::default(), ctx)?,
        SinkConfig::Null => with_store(name, NullStore::default(), ctx)?,
    };
    for (k, ids) in std::mem::take(&mut started.handle.waiting) {
        started.remembered.entry(k).or_default().extend(ids);
    }
    Ok(started)
}

/// A driver over `store`, with nothing to remember but the spool.
pub(crate) fn with_store<S: crate::Store>(
    name: &str,
    store: S,
    ctx: SinkContext,
) -> Result<StartedSink, SinkStartError> {
    with_known(name, store, ctx, IdsByPartition::new())
}

/// A driver over `store`; `recent` are the ids the store holds from
/// `ctx.remember_since_ms` on: remembered by the mergers, and skipped when the spool
/// replays them.
pub(crate) fn with_known<S: crate::Store>(
    name: &str,
    store: S,
    ctx: SinkContext,
    recent: IdsByPartition,
) -> Result<StartedSink, SinkStartError> {
    let known: std::collections::HashSet<(String, Partition, ActivityId)> = recent
        .iter()
        .flat_map(|((s, p), ids)| ids.iter().map(move |id| (s.clone(), *p, *id)))
        .collect();
    let already_stored = move |sb: &crate::SpooledBatch, u: &tandem_core::Unique| {
        !known.is_empty() && known.contains(&(sb.stream.clone(), sb.batch.partition, u.id))
    };
    let (tx, handle) = spawn(
        name,
        store,
        ctx.delivery,
        ctx.names,
        ctx.tallies,
        already_stored,
        CHANNEL_BATCHES,
    )
    .map_err(SinkStartError::Spool)?;
    Ok(StartedSink {
        tx,
        handle,
        remembered: recent,
        shared: None,
    })
}

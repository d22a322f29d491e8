//! Every configured sink that a stream routes to, started from its configuration.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_config::Config;
use tandem_core::{Partition, Secret, StreamId, Tally, UniqueBatch};
use tandem_sink::{IdsByPartition, SinkContext, SinkHandle, StoredIds, StreamNames};
use tokio::sync::mpsc;

use crate::StartError;

/// The running sinks and what the rest of the pipeline needs from them.
#[derive(Debug, Default)]
pub(crate) struct Sinks {
    pub tx: HashMap<String, mpsc::Sender<UniqueBatch>>,
    pub handles: Vec<SinkHandle>,
    /// Ids the mergers remember (stored recently, or waiting in a spool).
    pub remembered: IdsByPartition,
    /// Stores other consumers write to as well, by sink name.
    pub shared: HashMap<String, StoredIds>,
}

pub(crate) async fn start(
    config: &Config,
    names: &StreamNames,
    tallies: &HashMap<(StreamId, Partition), Arc<Tally>>,
    tokens: &std::collections::BTreeMap<String, Secret>,
    remember_since_ms: u64,
    pair: Option<&tandem_pair::Pair>,
) -> Result<Sinks, StartError> {
    let mut sinks = Sinks::default();
    for (name, sink) in &config.sinks {
        let routed: HashMap<(StreamId, Partition), Arc<Tally>> = tallies
            .iter()
            .filter(|((sid, _), _)| config.streams[usize::from(sid.0)].sink == *name)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        if routed.is_empty() {
            continue;
        }
        let mut delivery = config.delivery.clone();
        delivery.spool_dir = delivery.spool_dir.join(name);
        // A pair writes a Kafka topic from one consumer per partition at a time.
        let writer = match (sink, pair) {
            (tandem_config::SinkConfig::Kafka(_), Some(pair)) => {
                let partitions = routed
                    .keys()
                    .map(|(sid, p)| (names[usize::from(sid.0)].to_string(), *p));
                Some(
                    Arc::new(crate::pair::PairWriters::start(pair, name, partitions))
                        as Arc<dyn tandem_sink::WriterGate>,
                )
            }
            _ => None,
        };
        let ctx = SinkContext {
            names: names.clone(),
            delivery,
            tallies: routed,
            remember_since_ms,
            token: tokens.get(name).cloned(),
            writer,
        };
        let started = tandem_sink::start(name, sink, ctx)
            .await
            .map_err(|e| StartError::Sink {
                sink: name.clone(),
                message: e.to_string(),
            })?;
        for (k, ids) in started.remembered {
            sinks.remembered.entry(k).or_default().extend(ids);
        }
        if let Some(shared) = started.shared {
            sinks.shared.insert(name.clone(), shared);
        }
        sinks.tx.insert(name.clone(), started.tx);
        sinks.handles.push(started.handle);
    }
    Ok(sinks)
}

//! The coverage ledgers: where each partition was known complete and stored when the last
//! run stopped, and the gaps it left open.

use std::collections::HashMap;
use std::path::PathBuf;

use tandem_config::Config;
use tandem_core::{Partition, StreamId};
use tandem_repair::PartitionLedger;

use crate::StartError;

/// Every partition's ledger, and how far back the mergers must remember stored ids.
#[derive(Debug)]
pub(crate) struct Ledgers {
    pub by_partition: HashMap<(StreamId, Partition), (PathBuf, PartitionLedger)>,
    /// The oldest instant (Unix ms) a replay after this start can reach back to: the
    /// earliest complete-until or open gap, less the recovery margin.
    pub oldest_edge_ms: u64,
}

/// The partitions a stream consumes.
pub(crate) fn partitions(s: &tandem_config::StreamConfig) -> Vec<Partition> {
    s.only_partitions
        .clone()
        .unwrap_or_else(|| (1..=s.partitions).collect())
}

pub(crate) fn load(config: &Config) -> Result<Ledgers, StartError> {
    let margin_ms = config.repair.margin_secs * 1000;
    let mut ledgers = Ledgers {
        by_partition: HashMap::new(),
        oldest_edge_ms: u64::MAX,
    };
    for (i, s) in config.streams.iter().enumerate() {
        for p in partitions(s) {
            let path = tandem_repair::ledger::path(&config.repair.ledger_dir, &s.name, p);
            let ledger = PartitionLedger::load(&path).map_err(|e| StartError::Ledger {
                file: path.display().to_string(),
                message: e.to_string(),
            })?;
            let edges = (ledger.complete_until_ms > 0)
                .then_some(ledger.complete_until_ms)
                .into_iter()
                .chain(ledger.open_gaps().map(|g| g.start_ms));
            for edge in edges {
                let edge = edge.saturating_sub(margin_ms);
                ledgers.oldest_edge_ms = ledgers.oldest_edge_ms.min(edge);
            }
            ledgers
                .by_partition
                .insert((StreamId(i as u16), p), (path, ledger));
        }
    }
    Ok(ledgers)
}

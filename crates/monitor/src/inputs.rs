//! What the monitor watches, as the pipeline hands it over: per stream and partition the
//! tally and the connections' `watch` states, the sinks' health flags, and the lifecycle
//! event channels. All of it is read-only to the monitor.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tandem_conn::{ConnEvent, ConnSnapshot};
use tandem_core::{GapView, Partition, Tally};
use tandem_merge::MergeEvent;
use tokio::sync::{mpsc, watch};

/// One connection as the monitor sees it.
#[derive(Debug, Clone)]
pub struct ConnectionView {
    pub path: Arc<str>,
    pub state: watch::Receiver<ConnSnapshot>,
}

/// One partition.
#[derive(Debug, Clone)]
pub struct PartitionView {
    pub partition: Partition,
    pub tally: Arc<Tally>,
    pub connections: Vec<ConnectionView>,
    /// Gaps beyond backfill, as gap repair reports them.
    pub gaps: watch::Receiver<Vec<GapView>>,
}

/// One stream.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub name: Arc<str>,
    /// Connections the configuration asks for per partition.
    pub configured_per_partition: usize,
    pub partitions: Vec<PartitionView>,
}

/// One sink.
#[derive(Debug, Clone)]
pub struct SinkView {
    pub name: Arc<str>,
    pub up: Arc<AtomicBool>,
    /// False once the sink's task has ended: before shutdown, it died.
    pub alive: Arc<AtomicBool>,
}

/// Everything the monitor watches.
#[derive(Debug)]
pub struct MonitorInputs {
    pub streams: Vec<StreamView>,
    pub sinks: Vec<SinkView>,
    pub conn_events: mpsc::UnboundedReceiver<ConnEvent>,
    pub merge_events: mpsc::UnboundedReceiver<MergeEvent>,
    /// The merger's dedup window (a weakened horizon heals after one window without
    /// early evictions).
    pub dedup_window: Duration,
    /// The pair's coordination, when this consumer is one of a pair: `/status` shows the
    /// peer's view of each partition, and `pair_coordination_lost` fires while the bucket
    /// cannot be reached.
    pub pair: Option<tandem_pair::Pair>,
}

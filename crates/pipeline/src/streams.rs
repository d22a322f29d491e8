//! Per stream: one HTTP client per path and a shared connect budget; per partition: a
//! liveness record seeded from the ledger, a merger shard, gap repair and one connection
//! per path.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_config::{Config, StreamConfig};
use tandem_conn::{
    ApiKind, Auth, ConnEvent, ConnKey, ConnectBudget, Connection, ConnectionSpec, Endpoint,
    PartitionLiveness, TlsSettings,
};
use tandem_core::{Batch, Origin, Partition, PathId, StreamId, Tally};
use tandem_merge::{DeadLetters, MergeEvent, Shard, ShardSpec};
use tandem_monitor::{ConnectionView, PartitionView, StreamView};
use tandem_repair::{PartitionRepair, RecoverySpec, RepairHandle};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ledgers::{Ledgers, partitions};
use crate::sinks::Sinks;
use crate::{RECOVERY_PATH, StartError};

/// What every stream is wired to.
pub(crate) struct Wiring<'a> {
    pub config: &'a Config,
    pub auth: &'a [Auth],
    pub tallies: &'a HashMap<(StreamId, Partition), Arc<Tally>>,
    pub ledgers: Ledgers,
    pub sinks: &'a mut Sinks,
    pub dead_letters: Arc<DeadLetters>,
    pub shutdown: watch::Receiver<bool>,
    pub conn_events: mpsc::UnboundedSender<ConnEvent>,
    pub merge_events: mpsc::UnboundedSender<MergeEvent>,
    /// The recovery jobs of each account (the upstream runs 2 at once).
    pub recovery_jobs: HashMap<String, Arc<Semaphore>>,
    /// The pair's coordination, when this consumer is one of a pair.
    pub pair: Option<tandem_pair::Pair>,
    /// What each partition reports to the pair.
    pub probes: crate::pair::Probes,
}

/// What the streams' tasks are, for the monitor and shutdown.
#[derive(Debug, Default)]
pub(crate) struct Running {
    pub connections: Vec<Connection>,
    pub shards: Vec<JoinHandle<Shard>>,
    pub repairs: Vec<RepairHandle>,
    /// Each partition's gap repair hears its own connection events.
    pub repair_events: HashMap<(Arc<str>, Partition), mpsc::UnboundedSender<ConnEvent>>,
    pub views: Vec<StreamView>,
    pub tallies: Vec<(Arc<str>, Partition, Arc<Tally>)>,
    /// The pair's coordination, for the monitor.
    pub pair: Option<tandem_pair::Pair>,
}

/// One stream's shared parts, handed to each of its partitions.
struct Stream {
    id: StreamId,
    name: Arc<str>,
    endpoint: Endpoint,
    clients: Vec<reqwest::Client>,
    path_names: Vec<Arc<str>>,
    budget: Arc<ConnectBudget>,
    jobs: Arc<dyn tandem_repair::JobSlots>,
    sink: mpsc::Sender<tandem_core::UniqueBatch>,
}

pub(crate) fn api_kind(s: &StreamConfig) -> ApiKind {
    s.api.kind()
}

pub(crate) fn start(w: &mut Wiring<'_>, running: &mut Running) -> Result<(), StartError> {
    for (i, s) in w.config.streams.iter().enumerate() {
        let stream = stream(w, i, s)?;
        let mut partition_views = Vec::new();
        for p in partitions(s) {
            partition_views.push(partition(w, running, &stream, s, p));
        }
        running.views.push(StreamView {
            name: stream.name.clone(),
            configured_per_partition: s.paths.len(),
            partitions: partition_views,
        });
    }
    Ok(())
}

fn stream(w: &mut Wiring<'_>, i: usize, s: &StreamConfig) -> Result<Stream, StartError> {
    let err = |message: String| StartError::Stream {
        stream: s.name.clone(),
        message,
    };
    let extra_ca_pem = match &s.ca_file {
        Some(p) => {
            Some(std::fs::read(p).map_err(|e| err(format!("ca_file {}: {e}", p.display())))?)
        }
        None => None,
    };
    let tls = TlsSettings {
        extra_ca_pem,
        allow_plain_http: s.allow_plain_http,
    };
    let paths = s
        .paths
        .iter()
        .map(|name| {
            w.config
                .paths
                .iter()
                .find(|p| &p.name == name)
                .ok_or_else(|| err(format!("no path {name}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let clients = tandem_conn::path_clients(&s.url, &paths, &tls, &s.liveness)
        .map_err(|e| err(e.to_string()))?;
    let endpoint = Endpoint {
        url: s.url.clone(),
        recovery_url: s.recovery_url().to_owned(),
        api: api_kind(s),
        partitioned: s.partitioned,
        auth: w.auth[i].clone(),
    };
    let max_jobs = w.config.repair.max_jobs_per_account;
    let local_jobs = w
        .recovery_jobs
        .entry(endpoint.account())
        .or_insert_with(|| Arc::new(Semaphore::new(max_jobs)))
        .clone();
    let jobs: Arc<dyn tandem_repair::JobSlots> = match &w.pair {
        Some(pair) => Arc::new(crate::pair::PairJobs::new(
            pair.clone(),
            endpoint.account(),
            local_jobs,
            max_jobs,
        )),
        None => Arc::new(tandem_repair::LocalJobs(local_jobs)),
    };
    let budget = Arc::new(ConnectBudget::new(&s.budget));
    if let Some(pair) = &w.pair {
        budget.share_with(Arc::new(crate::pair::PairBudget {
            pair: pair.clone(),
            stream: Arc::from(s.name.as_str()),
            limit: s.budget.requests as usize,
            window: std::time::Duration::from_millis(s.budget.window_ms),
        }));
    }
    let sink = w
        .sinks
        .tx
        .get(&s.sink)
        .ok_or_else(|| err(format!("no sink {}", s.sink)))?
        .clone();
    Ok(Stream {
        id: StreamId(i as u16),
        name: Arc::from(s.name.as_str()),
        endpoint,
        clients,
        path_names: s
            .paths
            .iter()
            .map(|p| Arc::<str>::from(p.as_str()))
            .collect(),
        budget,
        jobs,
        sink,
    })
}

/// Wires one partition: merger shard, gap repair, one connection per path.
fn partition(
    w: &mut Wiring<'_>,
    running: &mut Running,
    stream: &Stream,
    s: &StreamConfig,
    p: Partition,
) -> PartitionView {
    let tally = w.tallies[&(stream.id, p)].clone();
    running
        .tallies
        .push((stream.name.clone(), p, tally.clone()));
    let (ledger_path, ledger) = w
        .ledgers
        .by_partition
        .remove(&(stream.id, p))
        .unwrap_or_default();
    let hint = (ledger.complete_until_ms > 0).then_some(ledger.complete_until_ms);
    let liveness = Arc::new(PartitionLiveness::new(s.paths.len()).with_complete_until(hint));
    let (batch_tx, control_tx) = shard(w, running, stream, p, &tally);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    running
        .repair_events
        .insert((stream.name.clone(), p), events_tx);
    let recovery = (!s.likes).then(|| {
        Arc::new(RecoverySpec {
            key: ConnKey {
                stream: stream.name.clone(),
                partition: p,
                path: Arc::from(RECOVERY_PATH),
            },
            origin: Origin {
                stream: stream.id,
                partition: p,
                path: PathId(stream.path_names.len() as u8),
            },
            endpoint: stream.endpoint.clone(),
            clients: stream.clients.clone(),
            partition: liveness.clone(),
            retry: s.retry.clone(),
            liveness: s.liveness.clone(),
            read: s.read.clone(),
            tally: tally.clone(),
            out: batch_tx.clone(),
            send_lock: Arc::default(),
            jobs: stream.jobs.clone(),
        })
    });
    let stored = w.sinks.shared.get(&s.sink).map(|ids| {
        Arc::new(crate::StoreIds {
            ids: ids.clone(),
            stream: s.name.clone(),
            partition: p,
        }) as Arc<dyn tandem_repair::StoredIdsSince>
    });
    let repair = tandem_repair::spawn(
        PartitionRepair {
            stream: stream.name.clone(),
            partition: p,
            api: stream.endpoint.api,
            config: w.config.repair.clone(),
            ledger_path,
            ledger,
            liveness: liveness.clone(),
            tally: tally.clone(),
            control: control_tx,
            recovery,
            stored,
            peer: w.pair.as_ref().map(|pair| {
                Arc::new(crate::pair::PairPeer {
                    pair: pair.clone(),
                    id: tandem_pair::PartitionId::new(stream.name.clone(), p),
                    started: Instant::now(),
                }) as Arc<dyn tandem_repair::PeerCoverage>
            }),
        },
        events_rx,
        w.shutdown.clone(),
    );
    let gaps = repair.gaps.clone();
    w.probes.lock().expect("probes lock").insert(
        tandem_pair::PartitionId::new(stream.name.clone(), p),
        crate::pair::Probe {
            liveness: liveness.clone(),
            stored_until: repair.stored_until.clone(),
            gaps: gaps.clone(),
            stored_from_ms: hint.unwrap_or(0),
        },
    );
    running.repairs.push(repair);
    let connections = connections(w, running, stream, s, p, (&liveness, &tally), &batch_tx);
    PartitionView {
        partition: p,
        tally,
        connections,
        gaps,
    }
}

/// The partition's merger shard, remembering what the sink already holds.
fn shard(
    w: &mut Wiring<'_>,
    running: &mut Running,
    stream: &Stream,
    p: Partition,
    tally: &Arc<Tally>,
) -> (
    mpsc::Sender<Batch>,
    mpsc::UnboundedSender<tandem_merge::ShardControl>,
) {
    let s = &w.config.streams[usize::from(stream.id.0)];
    // The merger names recovered lines' origin after a path of its own.
    let mut merger_paths = stream.path_names.clone();
    merger_paths.push(Arc::from(RECOVERY_PATH));
    let mut shard = Shard::new(
        ShardSpec {
            stream: stream.id,
            stream_name: stream.name.clone(),
            partition: p,
            paths: merger_paths,
            config: w.config.merge.clone(),
            tally: tally.clone(),
            dead_letters: w.dead_letters.clone(),
            events: w.merge_events.clone(),
            max_line_bytes: w.config.sinks.get(&s.sink).and_then(|k| k.max_line_bytes()),
        },
        Instant::now(),
    );
    if let Some(ids) = w.sinks.remembered.remove(&(s.name.clone(), p)) {
        let n = shard.remember(ids, Instant::now());
        tracing::info!(stream = %s.name, partition = p, ids = n, "dedup cache rebuilt from the store");
    }
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(s.read.channel_batches);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    running
        .shards
        .push(shard.spawn_with_control(batch_rx, stream.sink.clone(), control_rx));
    (batch_tx, control_tx)
}

/// One connection per path of the partition.
fn connections(
    w: &Wiring<'_>,
    running: &mut Running,
    stream: &Stream,
    s: &StreamConfig,
    p: Partition,
    (liveness, tally): (&Arc<PartitionLiveness>, &Arc<Tally>),
    batch_tx: &mpsc::Sender<Batch>,
) -> Vec<ConnectionView> {
    let mut views = Vec::new();
    for (j, client) in stream.clients.iter().enumerate() {
        let spec = ConnectionSpec {
            key: ConnKey {
                stream: stream.name.clone(),
                partition: p,
                path: stream.path_names[j].clone(),
            },
            origin: Origin {
                stream: stream.id,
                partition: p,
                path: PathId(j as u8),
            },
            endpoint: stream.endpoint.clone(),
            client: client.clone(),
            retry: s.retry.clone(),
            liveness: s.liveness.clone(),
            backfill: s.backfill.clone(),
            read: s.read.clone(),
            budget: stream.budget.clone(),
            partition: liveness.clone(),
            tally: tally.clone(),
        };
        let conn = Connection::spawn(
            spec,
            batch_tx.clone(),
            w.conn_events.clone(),
            w.shutdown.clone(),
        );
        views.push(ConnectionView {
            path: stream.path_names[j].clone(),
            state: conn.state.clone(),
        });
        running.connections.push(conn);
    }
    views
}

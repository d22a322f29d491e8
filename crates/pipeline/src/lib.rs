//! Wires the stages into a running consumer: connections → merger shards → sinks, with
//! the monitor watching, from a loaded configuration.
//!
//! [`Pipeline::start`] loads the coverage ledgers, builds, per sink, a store and its driver
//! (rebuilding the merger's memory from what the store holds since the dedup window or the
//! ledger's last complete instant, whichever is older), per stream a connect budget and
//! one HTTP client per path, per partition a tally, a liveness record seeded from the
//! ledger, a merger shard, one connection per path and gap repair; then the monitor and
//! its HTTP endpoint. [`Pipeline::shutdown`] stops in data-flow order so that nothing in
//! flight is lost: connections and recoveries stop, shards drain into the sinks, sinks
//! drain into their stores, and the ledgers are written last.
//!
//! # Layout
//! - this file: [`Pipeline`], [`StartError`], [`ShutdownReport`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::{Loaded, SinkConfig, StreamConfig};
use tandem_conn::{
    ApiKind, ConnEvent, ConnKey, ConnectBudget, Connection, ConnectionSpec, Endpoint,
    PartitionLiveness, TlsSettings, build_client, install_crypto_provider,
};
use tandem_core::time::unix_ms_now;
use tandem_core::{ActivityId, Batch, Origin, Partition, PathId, StreamId, Tally, UniqueBatch};
use tandem_merge::{DeadLetters, MergeEvent, Shard, ShardSpec};
use tandem_monitor::{
    ConnectionView, MonitorHandle, MonitorInputs, PartitionView, SinkView, Status, StreamView,
};
use tandem_repair::{PartitionLedger, PartitionRepair, RecoverySpec, RepairHandle};
use tandem_sink::{
    DrainReport, FileStore, NatsStore, NullStore, SinkHandle, StdoutStore, StreamNames,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("sink {sink}: {message}")]
    Sink { sink: String, message: String },
    #[error("coverage ledger {file}: {message}")]
    Ledger { file: String, message: String },
    #[error("dead-letter directory {dir}: {source}")]
    DeadLetters { dir: String, source: std::io::Error },
    #[error("monitor endpoint {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What shutdown did.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    /// Per sink: what it drained and what waits in its spool.
    pub sinks: Vec<(String, DrainReport)>,
    /// Ids the merger shards remembered, and the bytes their sets occupied.
    pub dedup_ids: usize,
    pub dedup_bytes: usize,
    pub elapsed: Duration,
}

/// A running consumer.
#[derive(Debug)]
pub struct Pipeline {
    shutdown: watch::Sender<bool>,
    connections: Vec<Connection>,
    shards: Vec<JoinHandle<Shard>>,
    sinks: Vec<SinkHandle>,
    monitor: MonitorHandle,
    http: JoinHandle<()>,
    http_addr: SocketAddr,
    tallies: Vec<(Arc<str>, Partition, Arc<Tally>)>,
    /// Lifecycle events, re-broadcast for observers other than the monitor.
    conn_events: tokio::sync::broadcast::Sender<ConnEvent>,
    repairs: Vec<RepairHandle>,
}

/// The path name recovered lines carry (in metrics and dead letters).
pub const RECOVERY_PATH: &str = "recovery";

/// The account whose recovery jobs a stream's count against: the Gnip account in the URL,
/// or (X API v2) the URL itself.
fn account_of(url: &str) -> String {
    let mut parts = url.split('/');
    while let Some(p) = parts.next() {
        if p == "accounts"
            && let Some(account) = parts.next()
        {
            return account.to_owned();
        }
    }
    url.split('?').next().unwrap_or(url).to_owned()
}

fn api_kind(s: &StreamConfig) -> ApiKind {
    match s.api {
        tandem_config::ApiConfig::Gnip => ApiKind::Gnip,
        tandem_config::ApiConfig::XV2 => ApiKind::V2,
    }
}

impl Pipeline {
    /// Builds and starts everything. Must run inside a multi-threaded tokio runtime.
    pub async fn start(loaded: Loaded) -> Result<Pipeline, StartError> {
        install_crypto_provider();
        let _ = tandem_monitor::prometheus();
        let Loaded {
            config,
            auth,
            sink_tokens,
        } = loaded;
        let names: StreamNames = Arc::new(
            config
                .streams
                .iter()
                .map(|s| Arc::<str>::from(s.name.as_str()))
                .collect(),
        );
        let window = Duration::from_secs(config.merge.dedup_window_secs);

        // Coverage ledgers: where each partition was known complete when the last run
        // stopped, and the gaps it left open.
        let mut ledgers: HashMap<(StreamId, Partition), (std::path::PathBuf, PartitionLedger)> =
            HashMap::new();
        let margin_ms = config.repair.margin_secs * 1000;
        let mut oldest_edge_ms = u64::MAX;
        for (i, s) in config.streams.iter().enumerate() {
            let parts: Vec<Partition> = s
                .only_partitions
                .clone()
                .unwrap_or_else(|| (1..=s.partitions).collect());
            for p in parts {
                let path = tandem_repair::ledger::path(&config.repair.ledger_dir, &s.name, p);
                let ledger = PartitionLedger::load(&path).map_err(|e| StartError::Ledger {
                    file: path.display().to_string(),
                    message: e.to_string(),
                })?;
                if ledger.complete_until_ms > 0 {
                    oldest_edge_ms =
                        oldest_edge_ms.min(ledger.complete_until_ms.saturating_sub(margin_ms));
                }
                for g in ledger.open_gaps() {
                    oldest_edge_ms = oldest_edge_ms.min(g.start_ms.saturating_sub(margin_ms));
                }
                ledgers.insert((StreamId(i as u16), p), (path, ledger));
            }
        }

        // Partitions and their tallies.
        let mut tallies: HashMap<(StreamId, Partition), Arc<Tally>> = HashMap::new();
        let mut partitions_of: Vec<Vec<Partition>> = Vec::new();
        for (i, s) in config.streams.iter().enumerate() {
            let parts: Vec<Partition> = s
                .only_partitions
                .clone()
                .unwrap_or_else(|| (1..=s.partitions).collect());
            for &p in &parts {
                // One lane per path, and one for recovery.
                let lanes = s.paths.len() + 1;
                tallies.insert((StreamId(i as u16), p), Arc::new(Tally::with_lanes(lanes)));
            }
            partitions_of.push(parts);
        }

        // Sinks, each with the ids its store already holds (the merger's rebuild).
        let mut sink_tx: HashMap<String, mpsc::Sender<UniqueBatch>> = HashMap::new();
        let mut sinks = Vec::new();
        let mut stored_ids: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
        let mut shared_stores: HashMap<String, tandem_sink::StoredIds> = HashMap::new();
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
            let err = |message: String| StartError::Sink {
                sink: name.clone(),
                message,
            };
            let (tx, handle) = match sink {
                SinkConfig::File(f) => {
                    let (store, _repair) = FileStore::open(f.clone(), names.clone())
                        .map_err(|e| err(format!("{}: {e}", f.dir.display())))?;
                    // Ids stored within the dedup window, and since the edge of the last
                    // coverage the ledger knows (what a replay after a restart repeats).
                    let since = unix_ms_now()
                        .saturating_sub(window.as_millis() as u64)
                        .min(oldest_edge_ms);
                    let recent = tandem_sink::recent_ids(&f.dir, since, f.bucket_secs)
                        .map_err(|e| err(format!("reading recent ids: {e}")))?;
                    for (k, ids) in recent {
                        stored_ids.entry(k).or_default().extend(ids);
                    }
                    let known: std::collections::HashSet<(String, Partition, ActivityId)> =
                        stored_ids
                            .iter()
                            .flat_map(|((s, p), ids)| {
                                ids.iter().map(move |id| (s.clone(), *p, *id))
                            })
                            .collect();
                    tandem_sink::spawn(
                        name,
                        store,
                        delivery,
                        names.clone(),
                        routed,
                        move |sb, u| known.contains(&(sb.stream.clone(), sb.batch.partition, u.id)),
                        64,
                    )
                }
                SinkConfig::Nats(n) => {
                    let token = sink_tokens.get(name).map(|t| t.expose().to_owned());
                    let store = NatsStore::connect(n.clone(), names.clone(), token)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    // Another consumer (the other zone) writes to this store too: recovery
                    // asks it what it already holds.
                    shared_stores.insert(name.clone(), store.stored_ids());
                    tandem_sink::spawn(
                        name,
                        store,
                        delivery,
                        names.clone(),
                        routed,
                        |_, _| false,
                        64,
                    )
                }
                SinkConfig::Stdout => tandem_sink::spawn(
                    name,
                    StdoutStore::default(),
                    delivery,
                    names.clone(),
                    routed,
                    |_, _| false,
                    64,
                ),
                SinkConfig::Null => tandem_sink::spawn(
                    name,
                    NullStore::default(),
                    delivery,
                    names.clone(),
                    routed,
                    |_, _| false,
                    64,
                ),
            }
            .map_err(|e| err(format!("spool: {e}")))?;
            let mut handle = handle;
            // Activities waiting in the spool are remembered by the mergers, so that a
            // replay from upstream does not store them a second time.
            for (k, ids) in std::mem::take(&mut handle.waiting) {
                stored_ids.entry(k).or_default().extend(ids);
            }
            sink_tx.insert(name.clone(), tx);
            sinks.push(handle);
        }

        let dead_letters = Arc::new(DeadLetters::open(&config.merge.dead_letter_dir).map_err(
            |source| StartError::DeadLetters {
                dir: config.merge.dead_letter_dir.display().to_string(),
                source,
            },
        )?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (conn_events_tx, mut conn_events_rx) = mpsc::unbounded_channel::<ConnEvent>();
        let (merge_events_tx, merge_events_rx) = mpsc::unbounded_channel::<MergeEvent>();
        let (monitor_conn_tx, monitor_conn_rx) = mpsc::unbounded_channel::<ConnEvent>();
        let (broadcast_tx, _) = tokio::sync::broadcast::channel(1024);
        let mut repair_events: HashMap<(Arc<str>, Partition), mpsc::UnboundedSender<ConnEvent>> =
            HashMap::new();
        let mut repairs = Vec::new();
        let mut recovery_jobs: HashMap<String, Arc<tokio::sync::Semaphore>> = HashMap::new();

        let mut connections = Vec::new();
        let mut shards = Vec::new();
        let mut stream_views = Vec::new();
        let mut tally_list = Vec::new();
        for (i, s) in config.streams.iter().enumerate() {
            let sid = StreamId(i as u16);
            let sname = names[i].clone();
            let err = |message: String| StartError::Stream {
                stream: s.name.clone(),
                message,
            };
            let url = reqwest::Url::parse(&s.url).map_err(|e| err(format!("url: {e}")))?;
            let host = url.host_str().unwrap_or_default().to_owned();
            let port = url.port_or_known_default().unwrap_or(443);
            let extra_ca_pem = match &s.ca_file {
                Some(p) => Some(
                    std::fs::read(p).map_err(|e| err(format!("ca_file {}: {e}", p.display())))?,
                ),
                None => None,
            };
            let tls = TlsSettings {
                extra_ca_pem,
                allow_plain_http: s.allow_plain_http,
            };
            let mut clients = Vec::new();
            for path_name in &s.paths {
                let path = config
                    .paths
                    .iter()
                    .find(|p| &p.name == path_name)
                    .ok_or_else(|| err(format!("no path {path_name}")))?;
                clients.push(
                    build_client(path, &tls, &s.liveness, &host, port)
                        .map_err(|e| err(e.to_string()))?,
                );
            }
            let budget = Arc::new(ConnectBudget::new(&s.budget));
            let endpoint = Endpoint {
                url: s.url.clone(),
                api: api_kind(s),
                partitioned: s.partitioned,
                auth: auth[i].clone(),
            };
            let path_names: Vec<Arc<str>> = s
                .paths
                .iter()
                .map(|p| Arc::<str>::from(p.as_str()))
                .collect();
            // The merger names recovered lines' origin after a path of its own.
            let recovery_path = PathId(path_names.len() as u8);
            let mut merger_paths = path_names.clone();
            merger_paths.push(Arc::from(RECOVERY_PATH));
            let jobs = recovery_jobs
                .entry(account_of(&s.url))
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(
                        config.repair.max_jobs_per_account,
                    ))
                })
                .clone();
            let sink = sink_tx
                .get(&s.sink)
                .ok_or_else(|| err(format!("no sink {}", s.sink)))?;
            let mut partition_views = Vec::new();
            for &p in &partitions_of[i] {
                let tally = tallies[&(sid, p)].clone();
                tally_list.push((sname.clone(), p, tally.clone()));
                let (ledger_path, ledger) = ledgers
                    .remove(&(sid, p))
                    .expect("a ledger was loaded for every partition");
                let hint = (ledger.complete_until_ms > 0).then_some(ledger.complete_until_ms);
                let liveness =
                    Arc::new(PartitionLiveness::new(s.paths.len()).with_complete_until(hint));
                let mut shard = Shard::new(
                    ShardSpec {
                        stream: sid,
                        stream_name: sname.clone(),
                        partition: p,
                        paths: merger_paths.clone(),
                        config: config.merge.clone(),
                        tally: tally.clone(),
                        dead_letters: dead_letters.clone(),
                        events: merge_events_tx.clone(),
                    },
                    Instant::now(),
                );
                if let Some(ids) = stored_ids.remove(&(s.name.clone(), p)) {
                    let n = shard.remember(ids, Instant::now());
                    tracing::info!(stream = %s.name, partition = p, ids = n, "dedup cache rebuilt from the store");
                }
                let (batch_tx, batch_rx) = mpsc::channel::<Batch>(s.read.channel_batches);
                let (control_tx, control_rx) = mpsc::unbounded_channel();
                shards.push(shard.spawn_with_control(batch_rx, sink.clone(), control_rx));
                let (events_tx, events_rx) = mpsc::unbounded_channel();
                repair_events.insert((sname.clone(), p), events_tx);
                let repair = tandem_repair::spawn(
                    PartitionRepair {
                        stream: sname.clone(),
                        partition: p,
                        config: config.repair.clone(),
                        ledger_path,
                        ledger,
                        liveness: liveness.clone(),
                        tally: tally.clone(),
                        control: control_tx,
                        recovery: (!s.likes).then(|| {
                            Arc::new(RecoverySpec {
                                key: ConnKey {
                                    stream: sname.clone(),
                                    partition: p,
                                    path: Arc::from(RECOVERY_PATH),
                                },
                                origin: Origin {
                                    stream: sid,
                                    partition: p,
                                    path: recovery_path,
                                },
                                endpoint: endpoint.clone(),
                                client: clients[0].clone(),
                                retry: s.retry.clone(),
                                liveness: s.liveness.clone(),
                                read: s.read.clone(),
                                tally: tally.clone(),
                                out: batch_tx.clone(),
                                send_lock: Arc::default(),
                                jobs: jobs.clone(),
                            })
                        }),
                        stored: shared_stores.get(&s.sink).map(|ids| {
                            Arc::new(StoreIds {
                                ids: ids.clone(),
                                stream: s.name.clone(),
                                partition: p,
                            }) as Arc<dyn tandem_repair::StoredIdsSince>
                        }),
                    },
                    events_rx,
                    shutdown_rx.clone(),
                );
                let gaps = repair.gaps.clone();
                repairs.push(repair);
                let mut views = Vec::new();
                for (j, client) in clients.iter().enumerate() {
                    let key = ConnKey {
                        stream: sname.clone(),
                        partition: p,
                        path: path_names[j].clone(),
                    };
                    let spec = ConnectionSpec {
                        key,
                        origin: Origin {
                            stream: sid,
                            partition: p,
                            path: PathId(j as u8),
                        },
                        endpoint: endpoint.clone(),
                        client: client.clone(),
                        retry: s.retry.clone(),
                        liveness: s.liveness.clone(),
                        backfill: s.backfill.clone(),
                        read: s.read.clone(),
                        budget: budget.clone(),
                        partition: liveness.clone(),
                        tally: tally.clone(),
                    };
                    let conn = Connection::spawn(
                        spec,
                        batch_tx.clone(),
                        conn_events_tx.clone(),
                        shutdown_rx.clone(),
                    );
                    views.push(ConnectionView {
                        path: path_names[j].clone(),
                        state: conn.state.clone(),
                    });
                    connections.push(conn);
                }
                partition_views.push(PartitionView {
                    partition: p,
                    tally,
                    connections: views,
                    gaps,
                });
            }
            stream_views.push(StreamView {
                name: sname.clone(),
                configured_per_partition: s.paths.len(),
                partitions: partition_views,
            });
        }
        drop(sink_tx);
        drop(merge_events_tx);
        {
            // Every observer gets every event; gap repair only its partition's.
            let broadcast_tx = broadcast_tx.clone();
            tokio::spawn(async move {
                while let Some(ev) = conn_events_rx.recv().await {
                    let partition = match &ev {
                        ConnEvent::Connected { key, .. } => {
                            Some((key.stream.clone(), key.partition))
                        }
                        ConnEvent::UncoveredBeyondBackfill {
                            stream, partition, ..
                        } => Some((stream.clone(), *partition)),
                        _ => None,
                    };
                    if let Some(k) = partition
                        && let Some(tx) = repair_events.get(&k)
                    {
                        let _ = tx.send(ev.clone());
                    }
                    let _ = broadcast_tx.send(ev.clone());
                    let _ = monitor_conn_tx.send(ev);
                }
            });
        }

        let monitor = tandem_monitor::spawn(
            config.monitor.clone(),
            MonitorInputs {
                streams: stream_views,
                sinks: sinks
                    .iter()
                    .map(|h| SinkView {
                        name: h.name.clone(),
                        up: h.up.clone(),
                        alive: h.alive.clone(),
                    })
                    .collect(),
                conn_events: monitor_conn_rx,
                merge_events: merge_events_rx,
                dedup_window: window,
            },
        );
        if let Some(url) = &config.monitor.webhook_url {
            tandem_monitor::webhook::spawn(url.clone(), monitor.transitions.subscribe());
        }
        let listener = tokio::net::TcpListener::bind(config.monitor.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.monitor.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.monitor.listen,
            source,
        })?;
        let status = monitor.status.clone();
        let http = tokio::spawn(async move {
            if let Err(e) = tandem_monitor::serve(listener, status).await {
                tracing::error!(error = %e, "monitor endpoint stopped");
            }
        });
        tracing::info!(streams = config.streams.len(), connections = connections.len(), endpoint = %http_addr, "pipeline started");
        Ok(Pipeline {
            shutdown,
            connections,
            shards,
            sinks,
            monitor,
            http,
            http_addr,
            tallies: tally_list,
            conn_events: broadcast_tx,
            repairs,
        })
    }

    /// Where `/metrics`, `/status`, `/healthz` and `/readyz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The monitor's latest status.
    pub fn status(&self) -> Arc<Status> {
        self.monitor.status.borrow().clone()
    }

    /// A receiver of the monitor's status snapshots.
    pub fn status_watch(&self) -> watch::Receiver<Arc<Status>> {
        self.monitor.status.clone()
    }

    /// The monitor's alert transitions.
    pub fn alert_transitions(
        &self,
    ) -> tokio::sync::broadcast::Receiver<tandem_monitor::Transition> {
        self.monitor.transitions.subscribe()
    }

    /// Time from first receipt to handoff to the store, per sink.
    pub fn handoff_latency(&self) -> Vec<(Arc<str>, Arc<tandem_core::latency::LatencyHistogram>)> {
        self.sinks
            .iter()
            .map(|s| (s.name.clone(), s.handoff.clone()))
            .collect()
    }

    /// Connection lifecycle events.
    pub fn connection_events(&self) -> tokio::sync::broadcast::Receiver<ConnEvent> {
        self.conn_events.subscribe()
    }

    /// The tally of every partition: (stream, partition, counts).
    pub fn tallies(&self) -> &[(Arc<str>, Partition, Arc<Tally>)] {
        &self.tallies
    }

    /// Stops in data-flow order: connections, then shards (draining into the sinks), then
    /// sinks (draining into their stores, up to their deadline).
    pub async fn shutdown(self) -> ShutdownReport {
        let started = Instant::now();
        self.shutdown.send_replace(true);
        for c in self.connections {
            c.join().await;
        }
        let mut report = ShutdownReport::default();
        for s in self.shards {
            if let Ok(shard) = s.await {
                report.dedup_ids += shard.cache().len();
                report.dedup_bytes += shard.cache().allocated_bytes();
            }
        }
        for sink in self.sinks {
            let name = sink.name.to_string();
            report.sinks.push((name, sink.finish().await));
        }
        for r in self.repairs {
            r.finish().await;
        }
        // One last evaluation so /status and the counts reflect the drained state.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.monitor.stop();
        self.http.abort();
        report.elapsed = started.elapsed();
        report
    }
}

/// What a shared store (JetStream) holds for one stream partition, for recovery.
#[derive(Debug)]
struct StoreIds {
    ids: tandem_sink::StoredIds,
    stream: String,
    partition: Partition,
}

impl tandem_repair::StoredIdsSince for StoreIds {
    fn between(
        &self,
        since_ms: u64,
        until_ms: u64,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<std::collections::HashSet<ActivityId>, String>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            self.ids
                .between(&self.stream, self.partition, since_ms, until_ms)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

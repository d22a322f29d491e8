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
//! - this file: [`Pipeline`] (start, accessors, shutdown), [`StartError`],
//!   [`ShutdownReport`].
//! - `ledgers`: the coverage ledgers loaded at start.
//! - `sinks`: every routed sink, started from its configuration.
//! - `streams`: per stream clients and budget; per partition shard, repair, connections.
//! - `events`: the fan-out of connection events.
//! - `pair`: the pair's coordination adapted into each stage (shared connect budget,
//!   leased recovery jobs, the peer's coverage and latest activity) and this consumer's
//!   progress reports.

mod events;
mod ledgers;
mod pair;
mod sinks;
mod streams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::Loaded;
use tandem_conn::{ConnEvent, Connection, install_crypto_provider};
use tandem_core::time::unix_ms_now;
use tandem_core::{Partition, StreamId, Tally};
use tandem_merge::{DeadLetters, MergeEvent, Shard};
use tandem_monitor::{MonitorHandle, MonitorInputs, SinkView, Status};
use tandem_repair::RepairHandle;
use tandem_sink::{DrainReport, SinkHandle, StreamNames};
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
    // The I/O error is part of the message, not a `source`: a caller printing the chain
    // would say it twice.
    #[error("merge.dead_letter_dir {dir}: {error}")]
    DeadLetters { dir: String, error: std::io::Error },
    #[error("monitor.listen {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
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
        let names: StreamNames =
            Arc::new(config.streams.iter().map(|s| s.name[..].into()).collect());
        let window = Duration::from_secs(config.merge.dedup_window_secs);
        let ledgers = ledgers::load(&config)?;
        let tallies = tallies(&config);
        // Ids stored within the dedup window, and since the edge of the last coverage the
        // ledgers know (what a replay after a restart repeats), are remembered again; never
        // from before the upstream's recovery retention, which no replay reaches.
        let now = unix_ms_now();
        let retention_secs = (config.streams.iter())
            .map(|s| config.repair.retention_secs(streams::api_kind(s)))
            .max()
            .unwrap_or(0);
        let retention = now.saturating_sub(retention_secs * 1000);
        let since = now
            .saturating_sub(window.as_millis() as u64)
            .min(ledgers.oldest_edge_ms.max(retention));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let probes = pair::Probes::default();
        let pair = start_pair(&config, &sink_tokens, &probes, &shutdown_rx)?;
        let mut sinks = sinks::start(
            &config,
            &names,
            &tallies,
            &sink_tokens,
            since,
            pair.as_ref(),
        )
        .await?;
        let (conn_events_tx, conn_events_rx) = mpsc::unbounded_channel::<ConnEvent>();
        let (merge_events_tx, merge_events_rx) = mpsc::unbounded_channel::<MergeEvent>();
        let mut running = streams::Running::default();
        let mut wiring = streams::Wiring {
            config: &config,
            auth: &auth,
            tallies: &tallies,
            ledgers,
            sinks: &mut sinks,
            dead_letters: dead_letters(&config)?,
            shutdown: shutdown_rx,
            conn_events: conn_events_tx,
            merge_events: merge_events_tx,
            recovery_jobs: HashMap::new(),
            pair: pair.clone(),
            probes,
        };
        streams::start(&mut wiring, &mut running)?;
        running.pair = pair;
        drop(wiring);
        drop(sinks.tx);
        let events = (conn_events_rx, merge_events_rx);
        let (monitor, broadcast_tx) = observe(&config, &mut running, &sinks.handles, events);
        let (http, http_addr) = serve(&config, &monitor).await?;
        tracing::info!(streams = config.streams.len(), connections = running.connections.len(), endpoint = %http_addr, "pipeline started");
        Ok(Pipeline {
            shutdown,
            connections: running.connections,
            shards: running.shards,
            sinks: sinks.handles,
            monitor,
            http,
            http_addr,
            tallies: running.tallies,
            conn_events: broadcast_tx,
            repairs: running.repairs,
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

    /// Time from first receipt to the store's acknowledgement, per sink.
    pub fn ack_latency(&self) -> Vec<(Arc<str>, Arc<tandem_core::latency::LatencyHistogram>)> {
        self.sinks
            .iter()
            .map(|s| (s.name.clone(), s.acked.clone()))
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
        self.monitor.finish().await;
        self.http.abort();
        report.elapsed = started.elapsed();
        report
    }
}

/// The monitor over everything running, and the connection events fanned out to it, to
/// gap repair and to a broadcast for other observers.
fn observe(
    config: &tandem_config::Config,
    running: &mut streams::Running,
    sinks: &[SinkHandle],
    (conn_events, merge_events): (
        mpsc::UnboundedReceiver<ConnEvent>,
        mpsc::UnboundedReceiver<MergeEvent>,
    ),
) -> (MonitorHandle, tokio::sync::broadcast::Sender<ConnEvent>) {
    let (monitor_tx, monitor_rx) = mpsc::unbounded_channel::<ConnEvent>();
    let (broadcast_tx, _) = tokio::sync::broadcast::channel(1024);
    let repair_events = std::mem::take(&mut running.repair_events);
    events::fan_out(conn_events, repair_events, monitor_tx, broadcast_tx.clone());
    let monitor = tandem_monitor::spawn(
        config.monitor.clone(),
        MonitorInputs {
            streams: std::mem::take(&mut running.views),
            sinks: sinks.iter().map(sink_view).collect(),
            conn_events: monitor_rx,
            merge_events,
            dedup_window: Duration::from_secs(config.merge.dedup_window_secs),
            pair: running.pair.clone(),
        },
    );
    if let Some(url) = &config.monitor.webhook_url {
        tandem_monitor::webhook::spawn(url.clone(), monitor.transitions.subscribe());
    }
    (monitor, broadcast_tx)
}

/// What the monitor watches of a sink.
fn sink_view(h: &SinkHandle) -> SinkView {
    SinkView {
        name: h.name.clone(),
        up: h.up.clone(),
        alive: h.alive.clone(),
    }
}

/// One tally per partition, with a lane per path and one for recovery.
fn tallies(config: &tandem_config::Config) -> HashMap<(StreamId, Partition), Arc<Tally>> {
    let mut out = HashMap::new();
    for (i, s) in config.streams.iter().enumerate() {
        for p in ledgers::partitions(s) {
            let tally = Tally::with_lanes(s.paths.len() + 1);
            out.insert((StreamId(i as u16), p), Arc::new(tally));
        }
    }
    out
}

fn dead_letters(config: &tandem_config::Config) -> Result<Arc<DeadLetters>, StartError> {
    let dir = &config.merge.dead_letter_dir;
    DeadLetters::with_limit(dir, config.merge.max_dead_letter_bytes)
        .map(Arc::new)
        .map_err(|error| StartError::DeadLetters {
            dir: dir.display().to_string(),
            error,
        })
}

/// The monitor's HTTP endpoint.
async fn serve(
    config: &tandem_config::Config,
    monitor: &MonitorHandle,
) -> Result<(JoinHandle<()>, SocketAddr), StartError> {
    let addr = config.monitor.listen;
    let listen_err = |error| StartError::Listen { addr, error };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(listen_err)?;
    let http_addr = listener.local_addr().map_err(listen_err)?;
    let status = monitor.status.clone();
    let http = tokio::spawn(async move {
        if let Err(e) = tandem_monitor::serve(listener, status).await {
            tracing::error!(error = %e, "monitor endpoint stopped");
        }
    });
    Ok((http, http_addr))
}

/// What a shared store (JetStream, Kafka) holds for one stream partition, for recovery.
#[derive(Debug)]
pub(crate) struct StoreIds {
    pub ids: tandem_sink::StoredIds,
    pub stream: String,
    pub partition: Partition,
}

impl tandem_repair::StoredIdsSince for StoreIds {
    fn between(&self, since_ms: u64, until_ms: u64) -> tandem_repair::ReadBack<'_> {
        Box::pin(async move {
            self.ids
                .between(&self.stream, self.partition, since_ms, until_ms)
                .await
                .map_err(Into::into)
        })
    }
}

/// Starts the pair's coordination when the configuration has a `[pair]`: through the
/// connection of its NATS sink, reporting every partition this consumer reads. The
/// connections learn the peer's latest activity every beacon.
fn start_pair(
    config: &tandem_config::Config,
    sink_tokens: &std::collections::BTreeMap<String, tandem_core::Secret>,
    probes: &pair::Probes,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<tandem_pair::Pair>, StartError> {
    let Some(cfg) = config.pair.clone() else {
        return Ok(None);
    };
    let sink_error = |message: String| StartError::Sink {
        sink: "pair".to_owned(),
        message,
    };
    let name = tandem_config::pair_sink(config).map_err(sink_error)?;
    let Some(tandem_config::SinkConfig::Nats(nats)) = config.sinks.get(&name) else {
        return Err(sink_error(format!("{name:?} is not a NATS sink")));
    };
    let partitions = (config.streams.iter())
        .flat_map(|s| {
            ledgers::partitions(s)
                .into_iter()
                .map(move |p| tandem_pair::PartitionId::new(s.name.as_str(), p))
        })
        .collect();
    let token = sink_tokens.get(&name).map(|t| t.expose().to_owned());
    let every = Duration::from_millis(cfg.beacon_ms.max(100));
    let pair = tandem_pair::Pair::start(
        cfg,
        nats.clone(),
        token,
        partitions,
        pair::local_progress(probes),
        shutdown.clone(),
    );
    tokio::spawn(pair::relay_peer_latest(
        pair.clone(),
        probes.clone(),
        every,
        shutdown.clone(),
    ));
    Ok(Some(pair))
}

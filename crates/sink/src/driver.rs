//! The sink driver: takes unique batches from the mergers, keeps them in order (memory,
//! then the disk spool), puts them to the store with retry and backoff, and turns the
//! store's acknowledgements into stored counts. A store outage never blocks the mergers
//! for longer than one attempt: while it backs off, the driver keeps accepting batches
//! and spools what memory cannot hold. Nothing is dropped.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::Gauge;
use serde::{Deserialize, Serialize};
use tandem_core::metric as m;
use tandem_core::{Partition, StreamId, Tally, UniqueBatch};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::spool::{Spool, SpooledBatch};
use crate::store::{Ack, Store, StreamNames};

/// Settings of the driver shared by every sink. Field docs are the configuration
/// reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverConfig {
    /// Unique activities held in memory while the store is slow or down; past this they
    /// are spooled to disk.
    #[serde(default = "default_memory")]
    pub max_memory_activities: usize,
    /// Directory of the spool.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// First delay after a failed store operation.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest delay between store retries.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// How often acknowledgements are collected.
    #[serde(default = "default_ack_interval_ms")]
    pub ack_interval_ms: u64,
    /// At shutdown, how long to keep delivering before what is left is spooled for the
    /// next start.
    #[serde(default = "default_drain_ms")]
    pub drain_deadline_ms: u64,
}

fn default_memory() -> usize {
    100_000
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("./tandem-data/spool")
}
fn default_retry_initial_ms() -> u64 {
    100
}
fn default_retry_max_ms() -> u64 {
    10_000
}
fn default_ack_interval_ms() -> u64 {
    100
}
fn default_drain_ms() -> u64 {
    30_000
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            max_memory_activities: default_memory(),
            spool_dir: default_spool_dir(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            ack_interval_ms: default_ack_interval_ms(),
            drain_deadline_ms: default_drain_ms(),
        }
    }
}

/// What a sink did at shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Activities stored after shutdown began.
    pub drained: u64,
    /// Activities that could not be stored before the deadline and wait in the spool.
    pub left_in_spool: u64,
    /// Activities stored over the sink's life.
    pub stored_total: u64,
    pub elapsed: Duration,
}

/// A running sink.
#[derive(Debug)]
pub struct SinkHandle {
    pub name: Arc<str>,
    /// False while the store refuses writes.
    pub up: Arc<AtomicBool>,
    /// Time from first receipt to handoff to the store, over the sink's life.
    pub handoff: Arc<tandem_core::latency::LatencyHistogram>,
    task: JoinHandle<DrainReport>,
}

impl SinkHandle {
    /// Waits for the sink to finish: it does once every sender of its input is dropped
    /// and it has drained (or the deadline passed).
    pub async fn finish(self) -> DrainReport {
        self.task.await.unwrap_or_default()
    }
}

type Key = (StreamId, Partition);

/// Where a partition's activities are inside the sink. Each count changes with the
/// structure operation itself, so a batch lost between two structures shows up in the
/// monitor's reconciliation instead of cancelling out.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    memory: u64,
    spool: u64,
    unacknowledged: u64,
}

impl Held {
    fn total(self) -> u64 {
        self.memory + self.spool + self.unacknowledged
    }
}

struct Meters {
    up: Gauge,
    spooled: Gauge,
    sink: String,
}

struct Driver<S: Store> {
    name: Arc<str>,
    store: S,
    cfg: DriverConfig,
    names: StreamNames,
    tallies: HashMap<Key, Arc<Tally>>,
    memory: VecDeque<UniqueBatch>,
    memory_items: usize,
    spool: Spool,
    held: HashMap<Key, Held>,
    stored_total: u64,
    meters: Meters,
    up: Arc<AtomicBool>,
    handoff: Arc<tandem_core::latency::LatencyHistogram>,
    handoff_metric: metrics::Histogram,
}

/// Starts a sink: `store` fed from the returned sender. `tallies` are the partitions'
/// shared counts (the driver maintains `stored`, `store_duplicates` and `in_flight`).
/// Batches a crash left in the spool are delivered first, minus `already_stored`.
pub fn spawn<S: Store>(
    name: &str,
    store: S,
    cfg: DriverConfig,
    names: StreamNames,
    tallies: HashMap<Key, Arc<Tally>>,
    already_stored: impl Fn(&SpooledBatch, &tandem_core::Unique) -> bool,
    capacity: usize,
) -> std::io::Result<(mpsc::Sender<UniqueBatch>, SinkHandle)> {
    let index_names = names.clone();
    let index = move |s: &str| {
        index_names
            .iter()
            .position(|n| &**n == s)
            .map(|i| StreamId(i as u16))
    };
    let (spool, leftover) = Spool::open(&cfg.spool_dir, &index)?;
    let sink = name.to_owned();
    let meters = Meters {
        up: metrics::gauge!(m::SINK_UP, m::SINK => sink.clone()),
        spooled: metrics::gauge!(m::SPOOLED, m::SINK => sink.clone()),
        sink,
    };
    // Series exist from the start (at zero), so rules and dashboards see them.
    for kind in ["transient", "fatal"] {
        metrics::counter!(m::SINK_ERRORS, m::SINK => name.to_owned(), m::KIND => kind).increment(0);
    }
    for (sid, partition) in tallies.keys() {
        let labels = [
            (
                m::STREAM,
                names
                    .get(usize::from(sid.0))
                    .map_or_else(String::new, |s| s.to_string()),
            ),
            (m::PARTITION, partition.to_string()),
            (m::SINK, name.to_owned()),
        ];
        metrics::counter!(m::STORED_ACTIVITIES, &labels).increment(0);
        metrics::counter!(m::SINK_DUPLICATE_ACKS, &labels).increment(0);
        metrics::gauge!(m::IN_FLIGHT, &labels).set(0.0);
    }
    let mut driver = Driver {
        name: name.into(),
        store,
        cfg,
        names,
        tallies,
        memory: VecDeque::new(),
        memory_items: 0,
        spool,
        held: HashMap::new(),
        stored_total: 0,
        meters,
        up: Arc::new(AtomicBool::new(true)),
        handoff: Arc::new(tandem_core::latency::LatencyHistogram::default()),
        handoff_metric: metrics::histogram!(m::HANDOFF_LATENCY, m::SINK => name.to_owned()),
    };
    let mut replayed = 0usize;
    for mut sb in leftover {
        if sb.batch.stream.0 == u16::MAX {
            tracing::error!(stream = %sb.stream, "spooled activities of a stream no longer configured are kept in the spool");
        }
        let before = sb.batch.items.len();
        let keep: Vec<_> = sb
            .batch
            .items
            .iter()
            .filter(|u| !already_stored(&sb, u))
            .cloned()
            .collect();
        sb.batch.items = keep;
        replayed += sb.batch.items.len();
        tracing::info!(stream = %sb.stream, partition = sb.batch.partition, spooled = before, replaying = sb.batch.items.len(), "replaying the spool of an earlier run");
        if !sb.batch.items.is_empty() {
            driver.accept(sb.batch);
        }
    }
    if replayed > 0 {
        tracing::info!(activities = replayed, "spool replay queued");
    }
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let handle = SinkHandle {
        name: driver.name.clone(),
        up: driver.up.clone(),
        handoff: driver.handoff.clone(),
        task: tokio::spawn(driver.run(rx)),
    };
    Ok((tx, handle))
}

impl<S: Store> Driver<S> {
    fn stream_name(&self, id: StreamId) -> String {
        self.names
            .get(usize::from(id.0))
            .map_or_else(|| format!("stream-{}", id.0), |s| s.to_string())
    }

    fn held(&mut self, key: Key, change: impl FnOnce(&mut Held)) {
        change(self.held.entry(key).or_default());
        self.set_in_flight(key);
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.meters.up.set(if up { 1.0 } else { 0.0 });
    }

    fn set_in_flight(&self, key: Key) {
        if let Some(t) = self.tallies.get(&key) {
            let held = self.held.get(&key).copied().unwrap_or_default().total();
            t.in_flight
                .store(held, std::sync::atomic::Ordering::Relaxed);
            metrics::gauge!(m::IN_FLIGHT,
                m::STREAM => self.stream_name(key.0), m::PARTITION => key.1.to_string(), m::SINK => self.meters.sink.clone())
            .set(held as f64);
        }
    }

    /// Takes a batch from a merger: into memory, or the spool when memory is full or the
    /// spool already holds older batches (order is kept).
    /// Takes a batch from a merger: it leaves the channel (`queued`) once the driver
    /// holds it.
    fn receive(&mut self, batch: UniqueBatch) {
        let (key, n) = ((batch.stream, batch.partition), batch.items.len() as u64);
        self.accept(batch);
        if let Some(t) = self.tallies.get(&key) {
            Tally::sub(&t.queued, n);
        }
    }

    fn accept(&mut self, batch: UniqueBatch) {
        let key = (batch.stream, batch.partition);
        let n = batch.items.len();
        if self.spool.is_empty() && self.memory_items + n <= self.cfg.max_memory_activities {
            self.memory_items += n;
            self.memory.push_back(batch);
            self.held(key, |h| h.memory += n as u64);
            return;
        }
        let stream = self.stream_name(batch.stream);
        if let Err(e) = self.spool.push(&stream, &batch) {
            // The disk refused: keep the batch in memory rather than lose it.
            tracing::error!(error = %e, dir = %self.cfg.spool_dir.display(), "cannot spool; holding in memory beyond the limit");
            self.memory_items += n;
            self.memory.push_back(batch);
            self.held(key, |h| h.memory += n as u64);
        } else {
            self.held(key, |h| h.spool += n as u64);
        }
        self.meters.spooled.set(self.spool.len() as f64);
    }

    /// The next batch to store, oldest first.
    fn next(&mut self) -> Option<UniqueBatch> {
        if let Some(b) = self.memory.pop_front() {
            let n = b.items.len() as u64;
            self.memory_items -= b.items.len();
            self.held((b.stream, b.partition), |h| h.memory -= n);
            return Some(b);
        }
        let names = self.names.clone();
        let index = move |s: &str| {
            names
                .iter()
                .position(|n| &**n == s)
                .map(|i| StreamId(i as u16))
        };
        match self.spool.pop(index) {
            Ok(b) => {
                self.meters.spooled.set(self.spool.len() as f64);
                let batch = b.map(|sb| sb.batch)?;
                let n = batch.items.len() as u64;
                self.held((batch.stream, batch.partition), |h| {
                    h.spool = h.spool.saturating_sub(n)
                });
                Some(batch)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spool");
                None
            }
        }
    }

    fn pending(&self) -> bool {
        !self.memory.is_empty() || !self.spool.is_empty()
    }

    fn apply(&mut self, acks: Vec<Ack>) -> u64 {
        let mut total = 0;
        for ack in acks {
            let key = (ack.stream, ack.partition);
            let n = ack.ids.len() as u64;
            total += n;
            let labels = [
                (m::STREAM, self.stream_name(ack.stream)),
                (m::PARTITION, ack.partition.to_string()),
                (m::SINK, self.meters.sink.clone()),
            ];
            metrics::counter!(m::STORED_ACTIVITIES, &labels).increment(n);
            metrics::counter!(m::SINK_DUPLICATE_ACKS, &labels).increment(ack.duplicates as u64);
            // Stored first, then out of flight: never counted in neither place.
            if let Some(t) = self.tallies.get(&key) {
                Tally::add(&t.stored, n);
                Tally::add(&t.store_duplicates, ack.duplicates as u64);
            }
            self.held(key, |h| {
                h.unacknowledged = h.unacknowledged.saturating_sub(n)
            });
        }
        self.stored_total += total;
        total
    }

    fn error(&self, kind: &'static str) {
        metrics::counter!(m::SINK_ERRORS, m::SINK => self.meters.sink.clone(), m::KIND => kind)
            .increment(1);
    }

    async fn collect(&mut self, force: bool) -> Result<u64, ()> {
        match self.store.acks(force).await {
            Ok(acks) => Ok(self.apply(acks)),
            Err(e) => {
                self.error(if e.is_retryable() {
                    "transient"
                } else {
                    "fatal"
                });
                tracing::warn!(sink = %self.name, error = %e, "collecting acknowledgements failed");
                Err(())
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<UniqueBatch>) -> DrainReport {
        let ack_every = Duration::from_millis(self.cfg.ack_interval_ms.max(1));
        let mut next_ack = Instant::now() + ack_every;
        let mut backoff = Duration::from_millis(self.cfg.retry_initial_ms);
        let mut retry_at: Option<Instant> = None;
        let mut open = true;
        let mut drain_started: Option<(Instant, u64)> = None;
        self.set_up(true);
        loop {
            if !open && drain_started.is_none() {
                drain_started = Some((Instant::now(), self.stored_total));
                tracing::info!(sink = %self.name, queued = self.memory_items as u64 + self.spool.len(), unacknowledged = self.store.unacknowledged(), "draining before exit");
            }
            if let Some((since, _)) = drain_started {
                let done = !self.pending() && self.store.unacknowledged() == 0;
                let late = since.elapsed() >= Duration::from_millis(self.cfg.drain_deadline_ms);
                if done || late {
                    break;
                }
            }
            let ready = self.pending() && retry_at.is_none_or(|t| Instant::now() >= t);
            if ready {
                // Take what arrived meanwhile first, so the store sees batches in order.
                while let Ok(b) = rx.try_recv() {
                    self.receive(b);
                }
                let batch = self.next().expect("pending");
                let (key, n) = ((batch.stream, batch.partition), batch.items.len() as u64);
                // Added latency: first receipt to handoff, for every activity; the
                // exported histogram takes the batch's oldest (its worst) only.
                let handed = Instant::now();
                for item in &batch.items {
                    self.handoff
                        .record(handed.saturating_duration_since(item.received));
                }
                if let Some(first) = batch.items.first() {
                    self.handoff_metric.record(
                        handed
                            .saturating_duration_since(first.received)
                            .as_secs_f64(),
                    );
                }
                match self.store.put(&batch).await {
                    Ok(()) => {
                        self.held(key, |h| h.unacknowledged += n);
                        if retry_at.take().is_some() {
                            tracing::info!(sink = %self.name, "store is back");
                        }
                        self.set_up(true);
                        backoff = Duration::from_millis(self.cfg.retry_initial_ms);
                    }
                    Err(e) => {
                        self.error(if e.is_retryable() {
                            "transient"
                        } else {
                            "fatal"
                        });
                        tracing::warn!(sink = %self.name, error = %e, retry_in_ms = backoff.as_millis() as u64, "store write failed; retrying");
                        self.set_up(false);
                        // Back to the front: order is kept and nothing is lost.
                        self.memory_items += batch.items.len();
                        self.memory.push_front(batch);
                        self.held(key, |h| h.memory += n);
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(self.cfg.retry_max_ms));
                    }
                }
                if Instant::now() >= next_ack {
                    let _ = self.collect(false).await;
                    next_ack = Instant::now() + ack_every;
                }
                continue;
            }
            let wake = match retry_at {
                Some(t) if self.pending() => t.min(next_ack),
                _ => next_ack,
            };
            tokio::select! {
                batch = rx.recv(), if open => match batch {
                    Some(b) => self.receive(b),
                    None => open = false,
                },
                () = sleep_until(wake) => {
                    if Instant::now() >= next_ack {
                        let force = drain_started.is_some();
                        let _ = self.collect(force).await;
                        next_ack = Instant::now() + ack_every;
                    }
                }
            }
        }
        match self.store.close().await {
            Ok(acks) => {
                self.apply(acks);
            }
            Err(e) => tracing::warn!(sink = %self.name, error = %e, "closing the store failed"),
        }
        let (since, stored_before) = drain_started.unwrap_or((Instant::now(), self.stored_total));
        // Whatever is still queued goes to the spool for the next start.
        let mut left = 0u64;
        while let Some(b) = self.memory.pop_front() {
            let n = b.items.len() as u64;
            left += n;
            let stream = self.stream_name(b.stream);
            if let Err(e) = self.spool.push(&stream, &b) {
                tracing::error!(error = %e, activities = b.items.len(), "cannot spool at exit: these activities are lost to this run");
            } else {
                self.held((b.stream, b.partition), |h| {
                    h.memory -= n;
                    h.spool += n;
                });
            }
        }
        left += self.spool.len().saturating_sub(left);
        let report = DrainReport {
            drained: self.stored_total - stored_before,
            left_in_spool: left,
            stored_total: self.stored_total,
            elapsed: since.elapsed(),
        };
        tracing::info!(sink = %self.name, drained = report.drained, left_in_spool = report.left_in_spool, stored_total = report.stored_total, "sink finished");
        report
    }
}

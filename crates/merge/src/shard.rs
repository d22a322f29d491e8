//! One merger shard per (stream, partition): partitions carry disjoint data, so shards
//! share nothing and merging scales across cores.
//!
//! For each line: identify it; a known id is a duplicate (counted for the path that
//! delivered it); an unknown id is validated first and only then remembered and passed
//! on, so that a corrupted copy on one path never hides the intact copy on the other.

use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tandem_core::metric as m;
use tandem_core::{
    ActivityId, Batch, DedupKey, LineKind, Partition, PathId, StreamId, SystemMessage, Tally,
    Unique, UniqueBatch, identify, validate,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cache::DedupCache;
use crate::config::MergeConfig;
use crate::deadletter::{DeadLetters, Source};

/// Orders for a running shard (from gap repair).
#[derive(Debug)]
pub enum ShardControl {
    /// Reply with the remembered post ids created at or after `since_ms`.
    PostsSince {
        since_ms: u64,
        reply: tokio::sync::oneshot::Sender<Vec<ActivityId>>,
    },
}

/// What a shard tells the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeEvent {
    /// The upstream sent an info, warn or error message.
    System {
        stream: Arc<str>,
        partition: Partition,
        path: Arc<str>,
        message: SystemMessage,
    },
    /// Ids were forgotten before their window ended (the cache hit its cap).
    EvictedEarly {
        stream: Arc<str>,
        partition: Partition,
        total: u64,
        horizon: Duration,
    },
}

/// Everything a shard needs.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    pub stream: StreamId,
    pub stream_name: Arc<str>,
    pub partition: Partition,
    /// Path names, indexed by `PathId`.
    pub paths: Vec<Arc<str>>,
    pub config: MergeConfig,
    pub tally: Arc<Tally>,
    pub dead_letters: Arc<DeadLetters>,
    pub events: mpsc::UnboundedSender<MergeEvent>,
    /// The longest line the partition's sink stores (a Kafka record's limit); a longer
    /// first copy is dead-lettered (`oversize`), never truncated.
    pub max_line_bytes: Option<usize>,
}

#[derive(Debug)]
struct PathMeters {
    duplicates: Counter,
    first: Counter,
    lag: metrics::Histogram,
}

/// The dedup state of one partition.
#[derive(Debug)]
pub struct Shard {
    spec: ShardSpec,
    cache: DedupCache,
    lag: moka::sync::Cache<DedupKeyHash, (u8, Instant)>,
    paths: Vec<PathMeters>,
    unique: Counter,
    ids_gauge: metrics::Gauge,
    horizon_gauge: metrics::Gauge,
    evicted_counter: Counter,
    evicted_reported: u64,
    /// The sequence number the next unique activity gets.
    next_seq: u64,
}

type DedupKeyHash = u64;

/// What became of the lines of one batch.
#[derive(Debug, Default, Clone, Copy)]
struct Classified {
    unique: u64,
    duplicates: u64,
    dead: u64,
    system: u64,
}

/// What one activity line is.
enum Copy {
    First(Unique),
    Duplicate,
    /// Its first copy failed validation (dead-lettered).
    Invalid,
}

fn key_hash(key: &DedupKey) -> u64 {
    let x = match *key {
        DedupKey::Narrow(k) => k,
        DedupKey::Wide(k) => (k as u64) ^ ((k >> 64) as u64),
    };
    let x = (x ^ (x >> 31)).wrapping_mul(0x7fb5_d329_728e_a185);
    x ^ (x >> 27)
}

impl Shard {
    pub fn new(spec: ShardSpec, now: Instant) -> Shard {
        let labels = [
            (m::STREAM, spec.stream_name.to_string()),
            (m::PARTITION, spec.partition.to_string()),
        ];
        let paths = spec
            .paths
            .iter()
            .map(|p| {
                let l = [
                    (m::STREAM, spec.stream_name.to_string()),
                    (m::PARTITION, spec.partition.to_string()),
                    (m::PATH, p.to_string()),
                ];
                PathMeters {
                    duplicates: metrics::counter!(m::DUPLICATES, &l),
                    first: metrics::counter!(m::FIRST_ARRIVALS, &l),
                    lag: metrics::histogram!(m::PATH_LAG, &l),
                }
            })
            .collect();
        // Series with small fixed label sets exist from the start, at zero.
        for kind in [
            tandem_core::SystemKind::Info,
            tandem_core::SystemKind::Warn,
            tandem_core::SystemKind::Error,
        ] {
            metrics::counter!(m::SYSTEM_MESSAGES,
                m::STREAM => spec.stream_name.to_string(),
                m::PARTITION => spec.partition.to_string(),
                m::KIND => kind.as_str())
            .increment(0);
        }
        let window = Duration::from_secs(spec.config.dedup_window_secs);
        Shard {
            cache: DedupCache::new(
                window,
                spec.config.generations,
                spec.config.max_ids_per_partition,
                now,
            ),
            lag: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(120))
                .build(),
            paths,
            unique: metrics::counter!(m::UNIQUE_ACTIVITIES, &labels),
            ids_gauge: metrics::gauge!(m::DEDUP_IDS, &labels),
            horizon_gauge: metrics::gauge!(m::DEDUP_HORIZON, &labels),
            evicted_counter: metrics::counter!(m::DEDUP_EVICTED_EARLY, &labels),
            evicted_reported: 0,
            // Numbers the sink gave to a spool left by an earlier run come first.
            next_seq: spec
                .tally
                .numbered
                .load(std::sync::atomic::Ordering::SeqCst)
                + 1,
            spec,
        }
    }

    /// Remembers ids already stored (the restart rebuild from the sink's recent output).
    pub fn remember(&mut self, ids: impl IntoIterator<Item = ActivityId>, now: Instant) -> usize {
        let mut n = 0;
        for id in ids {
            n += usize::from(self.cache.insert(id.dedup_key(), now));
        }
        n
    }

    pub fn cache(&self) -> &DedupCache {
        &self.cache
    }

    fn path_name(&self, i: u8) -> &str {
        self.spec.paths.get(usize::from(i)).map_or("?", |p| p)
    }

    /// Classifies every line of a batch; first copies are appended to `out`.
    pub fn process(&mut self, batch: Batch, out: &mut Vec<Unique>) {
        let Batch {
            origin,
            connection,
            received,
            lines,
            ..
        } = batch;
        let path = origin.path.0;
        let handed = lines.len() as u64;
        let mut n = Classified::default();
        for line in lines {
            match identify(&line) {
                Ok(LineKind::Activity(id)) => {
                    match self.activity(id, line, origin.path, received, connection) {
                        Copy::First(u) => {
                            n.unique += 1;
                            out.push(u);
                        }
                        Copy::Duplicate => n.duplicates += 1,
                        Copy::Invalid => n.dead += 1,
                    }
                }
                Ok(LineKind::System(message)) => {
                    n.system += 1;
                    self.system_message(path, message);
                }
                Err(e) => {
                    n.dead += 1;
                    self.dead_letter(path, connection, e.label(), &e.to_string(), &line);
                }
            }
        }
        self.count(path, handed, n);
    }

    /// An activity: a duplicate if its id is remembered (the path's lag sampled), else
    /// validated, remembered and numbered.
    fn activity(
        &mut self,
        id: ActivityId,
        line: bytes::Bytes,
        origin_path: PathId,
        received: Instant,
        connection: u64,
    ) -> Copy {
        let path = origin_path.0;
        let key = id.dedup_key();
        let sampled = key_hash(&key).is_multiple_of(self.spec.config.lag_sample_every);
        if self.cache.contains(&key) {
            if sampled
                && let Some((first, at)) = self.lag.get(&key_hash(&key))
                && first != path
                && let Some(p) = self.paths.get(usize::from(path))
            {
                p.lag
                    .record(received.saturating_duration_since(at).as_secs_f64());
            }
            return Copy::Duplicate;
        }
        if let Some(max) = self.spec.max_line_bytes
            && line.len() > max
        {
            let why = format!(
                "{} bytes: over the sink's limit of {max} bytes per line (its max_message_bytes less room for the key and headers)",
                line.len()
            );
            self.dead_letter(path, connection, "oversize", &why, &line);
            return Copy::Invalid;
        }
        if let Err(e) = validate(&line) {
            self.dead_letter(path, connection, e.label(), &e.to_string(), &line);
            return Copy::Invalid;
        }
        self.cache.insert_absent(key, received);
        if sampled {
            self.lag
                .entry(key_hash(&key))
                .or_insert_with(|| (path, received));
        }
        self.next_seq += 1;
        Copy::First(Unique {
            seq: self.next_seq - 1,
            id,
            line,
            path: origin_path,
            received,
        })
    }

    /// An info, warn or error message from the upstream: counted, logged, reported.
    fn system_message(&self, path: u8, message: SystemMessage) {
        metrics::counter!(m::SYSTEM_MESSAGES,
            m::STREAM => self.spec.stream_name.to_string(),
            m::PARTITION => self.spec.partition.to_string(),
            m::KIND => message.kind.as_str())
        .increment(1);
        tracing::info!(
            path = self.path_name(path),
            kind = message.kind.as_str(), message = %message.message, "system message from the upstream"
        );
        let path = self.spec.paths.get(usize::from(path)).cloned();
        let _ = self.spec.events.send(MergeEvent::System {
            stream: self.spec.stream_name.clone(),
            partition: self.spec.partition,
            path: path.unwrap_or_else(|| "?".into()),
            message,
        });
    }

    /// Counts what a batch of `handed` lines of `path` became.
    fn count(&self, path: u8, handed: u64, n: Classified) {
        let t = &self.spec.tally;
        // Downstream first: the channel to the sink, then the unique count.
        Tally::add(&t.queued, n.unique);
        Tally::add(&t.unique, n.unique);
        Tally::add(&t.duplicates, n.duplicates);
        Tally::add(&t.dead_lettered, n.dead);
        Tally::add(&t.system, n.system);
        self.unique.increment(n.unique);
        if let Some(p) = self.paths.get(usize::from(path)) {
            p.duplicates.increment(n.duplicates);
            p.first.increment(n.unique);
        }
        // Numbers first, then the lane: whoever sees the lines classified sees their numbers.
        t.numbered
            .store(self.next_seq - 1, std::sync::atomic::Ordering::SeqCst);
        t.lanes.classify(usize::from(path), handed);
    }

    fn dead_letter(&self, path: u8, connection: u64, reason: &str, detail: &str, line: &[u8]) {
        let path = self.path_name(path);
        metrics::counter!(m::DEAD_LETTERS,
            m::STREAM => self.spec.stream_name.to_string(),
            m::PARTITION => self.spec.partition.to_string(),
            m::REASON => reason.to_owned())
        .increment(1);
        tracing::warn!(path, reason, detail, "dead letter");
        let source = Source {
            stream: &self.spec.stream_name,
            partition: self.spec.partition,
            path,
            connection,
        };
        let letters = &self.spec.dead_letters;
        if let Err(e) = tandem_core::blocking_io(|| letters.record(source, reason, detail, line)) {
            tracing::error!(error = %e, file = %self.spec.dead_letters.path().display(), "cannot write the dead-letter file");
        }
    }

    /// Publishes cache gauges and reports early evictions.
    pub fn report(&mut self, now: Instant) {
        self.ids_gauge.set(self.cache.len() as f64);
        let horizon = self.cache.horizon(now);
        self.horizon_gauge.set(horizon.as_secs_f64());
        let evicted = self.cache.evicted_early();
        if evicted > self.evicted_reported {
            self.evicted_counter
                .increment(evicted - self.evicted_reported);
            self.evicted_reported = evicted;
            tracing::warn!(
                total = evicted,
                horizon_secs = horizon.as_secs_f64(),
                "dedup cache at its cap: ids forgotten before their window ended"
            );
            let _ = self.spec.events.send(MergeEvent::EvictedEarly {
                stream: self.spec.stream_name.clone(),
                partition: self.spec.partition,
                total: evicted,
                horizon,
            });
        }
    }

    /// Runs the shard: batches in, unique batches out (waiting when the sink is slow).
    /// Ends when every sender of `rx` is gone; returns the shard for inspection.
    pub fn spawn(
        self,
        rx: mpsc::Receiver<Batch>,
        tx: mpsc::Sender<UniqueBatch>,
    ) -> JoinHandle<Shard> {
        let (_control_tx, control) = mpsc::unbounded_channel();
        self.spawn_with_control(rx, tx, control)
    }

    /// Runs the shard with a control channel for gap repair.
    pub fn spawn_with_control(
        mut self,
        mut rx: mpsc::Receiver<Batch>,
        tx: mpsc::Sender<UniqueBatch>,
        mut control: mpsc::UnboundedReceiver<ShardControl>,
    ) -> JoinHandle<Shard> {
        use tracing::Instrument;
        let span = tracing::info_span!("shard", stream = %self.spec.stream_name, partition = self.spec.partition);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let max_batch = self.spec.config.max_batch;
            let mut out = Vec::with_capacity(max_batch);
            loop {
                tokio::select! {
                    batch = rx.recv() => {
                        let Some(batch) = batch else { break };
                        self.process(batch, &mut out);
                        while out.len() < max_batch {
                            match rx.try_recv() {
                                Ok(b) => self.process(b, &mut out),
                                Err(_) => break,
                            }
                        }
                        if !out.is_empty() {
                            let items = std::mem::replace(&mut out, Vec::with_capacity(max_batch));
                            let batch = UniqueBatch { stream: self.spec.stream, partition: self.spec.partition, items };
                            if tx.send(batch).await.is_err() {
                                tracing::error!("the sink stopped; merger shard ends");
                                break;
                            }
                        }
                    }
                    Some(order) = control.recv() => match order {
                        ShardControl::PostsSince { since_ms, reply } => {
                            let _ = reply.send(self.cache.posts_since(since_ms));
                        }

                    },
                    _ = tick.tick() => self.report(Instant::now()),
                }
            }
            self.report(Instant::now());
            self
        }.instrument(span))
    }
}

//! The sink driver: takes unique batches from the mergers, keeps them in order (memory,
//! then the disk spool), puts them to the store with retry and backoff, and turns the
//! store's acknowledgements into stored counts and a contiguous **stored watermark** per
//! partition. A store outage never blocks the mergers for longer than one attempt: while
//! it backs off, the driver keeps accepting batches and spools what memory cannot hold.
//!
//! Nothing leaves the driver's hands before the store acknowledges it: a batch put to the
//! store stays retained until every activity in it is behind the watermark. When the store
//! says it lost what it had not acknowledged (a failed fsync), the driver puts it again;
//! at shutdown, whatever is unacknowledged goes to the spool. A spool that cannot be
//! written (a full disk) keeps batches in memory up to a second `max_memory_activities`
//! and `max_memory_bytes`, then stops taking batches (backpressure up to the connections)
//! and reports the sink down until the disk takes writes again.
//!
//! # Memory
//! What the driver holds in memory is bounded twice: by activities (`max_memory_activities`,
//! the queue waiting for the store) and by bytes (`max_memory_bytes`, the queue *and*
//! what was put but is not acknowledged yet, the store's in-flight window included).
//! Activities are a poor measure on their own: they range from a few hundred bytes to
//! tens of kilobytes, and a slow store keeps everything it was handed until it
//! acknowledges it. So that unacknowledged writes never crowd the queue out, the stores
//! acknowledge early (the JetStream and Kafka stores keep at most a quarter of the bytes
//! in flight, the file store fsyncs every quarter written), and once they hold half the
//! bytes the driver collects acknowledgements at once, waiting for the oldest
//! ([`Store::oldest_acks`]: the running fsync, the oldest publish) if that is not
//! enough. A batch read back from the spool is read only while the held bytes are under
//! the budget, so they can pass it by that one batch (`merge.max_batch` activities) at
//! most; a batch larger than the whole budget is delivered alone.
//!
//! # Puts
//! The mergers hand over what they have when they have it, often a few dozen activities.
//! The oldest batch in memory takes the later queued batches of its partition along (in
//! their order, up to 1 MiB), so a store that is behind gets fewer, larger puts: one write
//! and one syscall for the file store instead of one per merger batch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::Gauge;
use serde::{Deserialize, Serialize};
use tandem_core::metric as m;
use tandem_core::{
    ActivityId, ExponentialBackoff, Partition, StreamId, Tally, Unique, UniqueBatch,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::spool::{Popped, Spool, SpooledBatch};
use crate::store::{Ack, ErrorClass, Store, StoreError, StreamNames};

/// Settings of the driver shared by every sink. Field docs are the configuration
/// reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverConfig {
    /// Unique activities held in memory while the store is slow or down; past this they
    /// are spooled to disk. While the spool cannot be written (a full disk), up to as
    /// many again wait in memory, then the sink stops taking activities (backpressure).
    #[serde(default = "default_memory")]
    pub max_memory_activities: usize,
    /// Bytes of activities held in memory (their lines plus about 100 bytes each):
    /// waiting for the store, and put to it but not yet acknowledged. Past this, as past
    /// `max_memory_activities`, activities are spooled to disk; while the spool cannot be
    /// written, up to as many bytes again wait in memory, then the sink stops taking
    /// activities (backpressure). Stores acknowledge early to stay within it: JetStream
    /// keeps at most a quarter in flight, the file sink fsyncs every quarter written, and
    /// at half unacknowledged the sink waits for acknowledgements.
    #[serde(default = "default_memory_bytes")]
    pub max_memory_bytes: u64,
    /// Directory of the spool.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// First delay after a failed store operation.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest delay between store retries.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// While memory is full and the store is up, how long it may go without acknowledging
    /// anything before activities overflow to the spool. Until then the input waits
    /// (backpressure up to the connections): a store slower than the stream gains nothing
    /// from a spool that writes and reads the same activities again; a stalled one (a hung
    /// disk, a server that takes publishes and never acknowledges) does.
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
    /// How often acknowledgements are collected: a store's acknowledgement counts as
    /// stored (and the stored watermark moves) at most this much later.
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
fn default_memory_bytes() -> u64 {
    32 * 1024 * 1024
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
fn default_stall_ms() -> u64 {
    5_000
}
fn default_ack_interval_ms() -> u64 {
    10
}
fn default_drain_ms() -> u64 {
    30_000
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            max_memory_activities: default_memory(),
            max_memory_bytes: default_memory_bytes(),
            spool_dir: default_spool_dir(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            stall_ms: default_stall_ms(),
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
    /// The most bytes of activities held in memory at once over the sink's life (waiting
    /// for the store or the spool, or put and unacknowledged), as `max_memory_bytes`
    /// counts them.
    pub peak_memory_bytes: u64,
}

/// A running sink.
#[derive(Debug)]
pub struct SinkHandle {
    pub name: Arc<str>,
    /// False while the store refuses writes or the spool cannot be written.
    pub up: Arc<AtomicBool>,
    /// False once the sink's task has ended (at shutdown, or if it died).
    pub alive: Arc<AtomicBool>,
    /// Time from first receipt to handoff to the store, over the sink's life.
    pub handoff: Arc<tandem_core::latency::LatencyHistogram>,
    /// Time from first receipt to the store's acknowledgement (the stored watermark
    /// passing the activity's batch), over the sink's life.
    pub acked: Arc<tandem_core::latency::LatencyHistogram>,
    /// Ids waiting in the spool an earlier run left, per (stream name, partition): the
    /// merger remembers them, so that the replay a restart asks upstream for does not
    /// store them a second time.
    pub waiting: HashMap<(String, Partition), Vec<ActivityId>>,
    done: tokio::sync::oneshot::Receiver<DrainReport>,
}

impl SinkHandle {
    /// Waits for the sink to finish: it does once every sender of its input is dropped
    /// and it has drained (or the deadline passed).
    pub async fn finish(self) -> DrainReport {
        self.done.await.unwrap_or_default()
    }
}

type Key = (StreamId, Partition);

/// Whether the store already holds a spooled activity (the file store's recent ids).
type AlreadyStored = dyn Fn(&SpooledBatch, &Unique) -> bool + Send;

/// The acknowledged sequence numbers of a partition: everything up to `through`, plus
/// the runs acknowledged beyond it (out of order, e.g. a republished JetStream message).
#[derive(Debug, Default)]
struct Watermark {
    through: u64,
    /// Run start → run end (inclusive), all above `through + 1`.
    above: BTreeMap<u64, u64>,
}

impl Watermark {
    fn ack(&mut self, seq: u64) {
        if seq <= self.through || self.acked(seq) {
            return;
        }
        if seq == self.through + 1 {
            self.through = seq;
            while let Some(entry) = self.above.first_entry() {
                if *entry.key() > self.through + 1 {
                    break;
                }
                let end = entry.remove();
                self.through = self.through.max(end);
            }
            return;
        }
        // A run ending right before `seq` grows; one starting right after it joins.
        let mut start = seq;
        if let Some((&s, e)) = self.above.range_mut(..seq).next_back()
            && *e + 1 == seq
        {
            *e = seq;
            start = s;
        } else {
            self.above.insert(seq, seq);
        }
        if let Some(next_end) = self.above.remove(&(seq + 1))
            && let Some(e) = self.above.get_mut(&start)
        {
            *e = next_end;
        }
    }

    fn acked(&self, seq: u64) -> bool {
        seq <= self.through
            || self
                .above
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &e)| seq <= e)
    }
}

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
    /// Oldest first: memory, then the spool, then `overflow` (waiting to be spooled).
    memory: VecDeque<UniqueBatch>,
    memory_items: usize,
    memory_bytes: u64,
    spool: Spool,
    overflow: VecDeque<UniqueBatch>,
    overflow_items: usize,
    overflow_bytes: u64,
    /// Put to the store, not yet entirely behind the watermark.
    retained: HashMap<Key, VecDeque<UniqueBatch>>,
    retained_bytes: u64,
    /// The most `memory_bytes + overflow_bytes + retained_bytes` held at once.
    peak_bytes: u64,
    marks: HashMap<Key, Watermark>,
    /// Numbers reserved for the spool of an earlier run: the next one to give, per
    /// partition.
    replay_seq: HashMap<Key, u64>,
    already_stored: Box<AlreadyStored>,
    /// Spooled activities of streams no longer configured, kept aside.
    orphans: Option<Spool>,
    held: HashMap<Key, Held>,
    stored_total: u64,
    store_up: bool,
    /// The last time the store acknowledged something, or activities began to wait for
    /// it when nothing did.
    last_progress: Instant,
    spool_ok: bool,
    /// The store refused for good (a configuration it cannot work with): nothing more is
    /// put to it; everything waits in memory and the spool for a restart.
    fatal: Option<String>,
    backoff: ExponentialBackoff,
    meters: Meters,
    up: Arc<AtomicBool>,
    handoff: Arc<tandem_core::latency::LatencyHistogram>,
    handoff_metric: metrics::Histogram,
    acked: Arc<tandem_core::latency::LatencyHistogram>,
}

/// Sets `alive` to false when the sink's task ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Starts a sink: `store` fed from the returned sender. `tallies` are the partitions'
/// shared counts (the driver maintains `stored`, `store_duplicates`, `in_flight` and
/// `stored_through`). Batches a crash left in the spool are delivered first (numbered
/// before anything the mergers number), minus those `already_stored` says the store
/// holds.
pub fn spawn<S: Store>(
    name: &str,
    store: S,
    cfg: DriverConfig,
    names: StreamNames,
    tallies: HashMap<Key, Arc<Tally>>,
    already_stored: impl Fn(&SpooledBatch, &Unique) -> bool + Send + 'static,
    capacity: usize,
) -> std::io::Result<(mpsc::Sender<UniqueBatch>, SinkHandle)> {
    let (spool, found) = Spool::open(&cfg.spool_dir)?;
    tandem_core::crash::point("sink.spool_opened");
    if found.cut_records > 0 {
        tracing::warn!(
            sink = name,
            cut_records = found.cut_records,
            cut_bytes = found.cut_bytes,
            "the spool ended in a torn or damaged record; cut"
        );
    }
    register_series(name, &names, &tallies);
    let backoff = backoff(&(cfg.retry_initial_ms, cfg.retry_max_ms));
    let mut driver = Driver {
        name: name.into(),
        store,
        cfg,
        names,
        tallies,
        memory: VecDeque::new(),
        memory_items: 0,
        memory_bytes: 0,
        spool,
        overflow: VecDeque::new(),
        overflow_items: 0,
        overflow_bytes: 0,
        retained: HashMap::new(),
        retained_bytes: 0,
        peak_bytes: 0,
        marks: HashMap::new(),
        replay_seq: HashMap::new(),
        already_stored: Box::new(already_stored),
        orphans: None,
        held: HashMap::new(),
        stored_total: 0,
        store_up: true,
        last_progress: Instant::now(),
        spool_ok: true,
        fatal: None,
        backoff,
        meters: Meters {
            up: metrics::gauge!(m::SINK_UP, m::SINK => name.to_owned()),
            spooled: metrics::gauge!(m::SPOOLED, m::SINK => name.to_owned()),
            sink: name.to_owned(),
        },
        up: Arc::new(AtomicBool::new(true)),
        handoff: Arc::new(tandem_core::latency::LatencyHistogram::default()),
        handoff_metric: metrics::histogram!(m::HANDOFF_LATENCY, m::SINK => name.to_owned()),
        acked: Arc::new(tandem_core::latency::LatencyHistogram::default()),
    };
    driver.reserve_replay(&found.waiting);
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let alive = Arc::new(AtomicBool::new(true));
    let guard = AliveGuard(alive.clone());
    let (report, done) = tokio::sync::oneshot::channel();
    let (up, handoff, acked) = (
        driver.up.clone(),
        driver.handoff.clone(),
        driver.acked.clone(),
    );
    let span = tracing::info_span!("sink", sink = name);
    // A thread and a runtime of its own: the spool's and the store's file I/O can block
    // (a hung or full disk) without taking a worker from the connections' runtime; the
    // mergers then wait on the sink's channel, asynchronously.
    std::thread::Builder::new()
        .name(format!("sink-{name}"))
        .spawn(move || {
            let _guard = guard;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let drained = match runtime {
                Ok(rt) => rt.block_on(driver.run(rx).instrument(span)),
                Err(e) => {
                    tracing::error!(error = %e, "the sink's runtime could not start");
                    DrainReport::default()
                }
            };
            let _ = report.send(drained);
        })?;
    let handle = SinkHandle {
        name: name.into(),
        up,
        alive,
        handoff,
        acked,
        waiting: found.waiting,
        done,
    };
    Ok((tx, handle))
}

/// Creates the sink's series at zero, so rules and dashboards see them from the start.
fn register_series(name: &str, names: &StreamNames, tallies: &HashMap<Key, Arc<Tally>>) {
    for kind in ["transient", "fatal"] {
        metrics::counter!(m::SINK_ERRORS, m::SINK => name.to_owned(), m::KIND => kind).increment(0);
    }
    for (sid, partition) in tallies.keys() {
        let stream = names
            .get(usize::from(sid.0))
            .map_or_else(String::new, |s| s.to_string());
        let labels = [
            (m::STREAM, stream),
            (m::PARTITION, partition.to_string()),
            (m::SINK, name.to_owned()),
        ];
        metrics::counter!(m::STORED_ACTIVITIES, &labels).increment(0);
        metrics::counter!(m::SINK_DUPLICATE_ACKS, &labels).increment(0);
        metrics::gauge!(m::IN_FLIGHT, &labels).set(0.0);
    }
}

/// The driver's retry pacing (bounds that cannot work are refused by the configuration's
/// validation, [`DriverConfig::problems`]).
fn backoff((initial_ms, max_ms): &(u64, u64)) -> ExponentialBackoff {
    ExponentialBackoff::clamped(
        Duration::from_millis(*initial_ms),
        Duration::from_millis(*max_ms),
    )
}

impl DriverConfig {
    /// What cannot work, by field.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let ms = Duration::from_millis;
        let mut out = Vec::new();
        if let Err(e) =
            ExponentialBackoff::try_new(ms(self.retry_initial_ms), ms(self.retry_max_ms))
        {
            out.push(("retry_initial_ms", e.to_string()));
        }
        if self.max_memory_activities == 0 {
            out.push(("max_memory_activities", "must be positive".to_owned()));
        }
        if self.max_memory_bytes == 0 {
            out.push(("max_memory_bytes", "must be positive".to_owned()));
        }
        if self.spool_dir.exists() && !self.spool_dir.is_dir() {
            let dir = self.spool_dir.display();
            out.push(("spool_dir", format!("{dir} exists and is not a directory")));
        }
        out
    }
}

/// What an activity held in memory costs beside its line (its id, numbers and the line's
/// handle).
const ITEM_BYTES: u64 = std::mem::size_of::<Unique>() as u64;

/// Queued batches of one partition are put together up to this many bytes (as
/// `max_memory_bytes` counts them).
const MAX_PUT_BYTES: u64 = 1024 * 1024;

/// The bytes `max_memory_bytes` counts for a batch.
fn bytes_of(batch: &UniqueBatch) -> u64 {
    batch
        .items
        .iter()
        .map(|u| u.line.len() as u64 + ITEM_BYTES)
        .sum()
}

/// How the put of one batch went.
enum Put {
    Done,
    Nothing,
    Failed,
}

impl<S: Store> Driver<S> {
    fn stream_name(&self, id: StreamId) -> String {
        self.names
            .get(usize::from(id.0))
            .map_or_else(|| format!("stream-{}", id.0), |s| s.to_string())
    }

    /// The spool an earlier run left is numbered before anything the mergers number, and
    /// counts as held.
    fn reserve_replay(&mut self, waiting: &HashMap<(String, Partition), Vec<ActivityId>>) {
        for ((stream, partition), ids) in waiting {
            let Some(i) = self.names.iter().position(|n| **n == **stream) else {
                continue;
            };
            let key = (StreamId(i as u16), *partition);
            let n = ids.len() as u64;
            let first = self.tallies.get(&key).map_or(1, |t| t.number(n));
            self.replay_seq.insert(key, first);
            self.held(key, |h| h.spool += n);
            tracing::info!(sink = %self.name, %stream, partition, activities = n, "the spool of an earlier run is replayed first");
        }
        self.meters.spooled.set(self.spool.len() as f64);
    }

    fn held(&mut self, key: Key, change: impl FnOnce(&mut Held)) {
        change(self.held.entry(key).or_default());
        self.set_in_flight(key);
    }

    fn set_up(&mut self, store_up: Option<bool>, spool_ok: Option<bool>) {
        self.store_up = store_up.unwrap_or(self.store_up);
        self.spool_ok = spool_ok.unwrap_or(self.spool_ok);
        let up = self.store_up && self.spool_ok;
        self.up.store(up, Ordering::Relaxed);
        self.meters.up.set(if up { 1.0 } else { 0.0 });
    }

    fn set_in_flight(&self, key: Key) {
        if let Some(t) = self.tallies.get(&key) {
            let held = self.held.get(&key).copied().unwrap_or_default().total();
            t.in_flight.store(held, Ordering::Relaxed);
            metrics::gauge!(m::IN_FLIGHT,
                m::STREAM => self.stream_name(key.0), m::PARTITION => key.1.to_string(), m::SINK => self.meters.sink.clone())
            .set(held as f64);
        }
    }

    /// Takes a batch from a merger: it leaves the channel (`queued`) once the driver
    /// holds it.
    fn receive(&mut self, batch: UniqueBatch) {
        let (key, n) = ((batch.stream, batch.partition), batch.items.len() as u64);
        self.accept(batch);
        if let Some(t) = self.tallies.get(&key) {
            Tally::sub(&t.queued, n);
        }
    }

    /// Queues a batch behind everything older: in memory while nothing waits on disk and
    /// memory has room, otherwise behind the spool.
    fn accept(&mut self, batch: UniqueBatch) {
        let key = (batch.stream, batch.partition);
        let n = batch.items.len();
        let bytes = bytes_of(&batch);
        if self.memory.is_empty() && self.retained_bytes == 0 {
            // Nothing was waiting for the store: its stall clock starts now.
            self.last_progress = Instant::now();
        }
        // While the store keeps up, `can_take` stopped intake at the budget: this batch,
        // taken below it, stays in memory even if it passes the budget a little.
        let room = self.memory_items + n <= self.cfg.max_memory_activities
            && self.memory_bytes + self.retained_bytes + bytes <= self.cfg.max_memory_bytes;
        if self.spool.is_empty() && self.overflow.is_empty() && (room || self.keeping_up()) {
            self.memory_items += n;
            self.memory_bytes += bytes;
            self.memory.push_back(batch);
            self.held(key, |h| h.memory += n as u64);
            self.note_peak();
            return;
        }
        self.overflow_items += n;
        self.overflow_bytes += bytes;
        self.overflow.push_back(batch);
        self.held(key, |h| h.memory += n as u64);
        self.flush_overflow();
        self.note_peak();
    }

    fn note_peak(&mut self) {
        let held = self.memory_bytes + self.overflow_bytes + self.retained_bytes;
        self.peak_bytes = self.peak_bytes.max(held);
    }

    /// Whether the next batch may be put now. One from memory is held already; one read
    /// back from the spool (or waiting for it) needs room under the byte budget, or
    /// nothing else held, so that a batch larger than the budget still goes, alone.
    fn room_to_put(&self) -> bool {
        !self.memory.is_empty()
            || self.retained_bytes == 0
            || self.retained_bytes + self.memory_bytes < self.cfg.max_memory_bytes
    }

    /// Whether what was put and is not acknowledged holds half the byte budget: then
    /// acknowledgements are asked for at once, so that they do not crowd out the queue.
    fn unacknowledged_heavy(&self) -> bool {
        self.retained_bytes.saturating_mul(2) >= self.cfg.max_memory_bytes
    }

    /// Moves waiting batches into the spool, oldest first, until the disk refuses.
    fn flush_overflow(&mut self) {
        while let Some(batch) = self.overflow.front() {
            let key = (batch.stream, batch.partition);
            let n = batch.items.len() as u64;
            let stream = self.stream_name(batch.stream);
            if let Err(e) = self.spool.push(&stream, batch) {
                if self.spool_ok {
                    tracing::error!(error = %e, dir = %self.cfg.spool_dir.display(), "cannot write the spool; holding activities in memory, the sink reports down until the disk takes writes again");
                    self.error("transient");
                }
                self.set_up(None, Some(false));
                break;
            }
            if let Some(b) = self.overflow.pop_front() {
                self.overflow_bytes -= bytes_of(&b);
            }
            self.overflow_items -= n as usize;
            self.held(key, |h| {
                h.memory -= n;
                h.spool += n;
            });
            if !self.spool_ok {
                tracing::info!("the spool takes writes again");
                self.set_up(None, Some(true));
            }
        }
        self.meters.spooled.set(self.spool.len() as f64);
    }

    /// Whether the mergers may hand over more: not while batches that could not be
    /// spooled fill a second memory's worth (of activities or of bytes).
    fn can_take(&self) -> bool {
        self.overflow_items < self.cfg.max_memory_activities.max(1)
            && self.overflow_bytes < self.cfg.max_memory_bytes.max(1)
            && !(self.keeping_up() && self.memory_full())
    }

    /// Whether the store is up and moving (it acknowledged something within `stall_ms`)
    /// with nothing spooled: then a full memory means the input is faster than the store,
    /// and the driver waits for room (backpressure up to the connections, which do not
    /// count that wait as silence) instead of spooling, which would only add the spool's
    /// writes and reads to a store already at its limit. The spool is for a store that is
    /// down or stalled.
    fn keeping_up(&self) -> bool {
        self.store_up
            && self.fatal.is_none()
            && self.spool.is_empty()
            && self.overflow.is_empty()
            && self.last_progress.elapsed() < Duration::from_millis(self.cfg.stall_ms)
    }

    /// Whether memory holds its budget of activities or bytes (the queue and what was put
    /// and is not acknowledged).
    fn memory_full(&self) -> bool {
        self.memory_items >= self.cfg.max_memory_activities
            || self.memory_bytes + self.retained_bytes >= self.cfg.max_memory_bytes
    }

    /// Takes a batch out of the memory queue's counts.
    fn taken_from_memory(&mut self, b: &UniqueBatch, bytes: u64) {
        let n = b.items.len();
        self.memory_items -= n;
        self.memory_bytes -= bytes;
        self.held((b.stream, b.partition), |h| h.memory -= n as u64);
    }

    /// The next batch to store, oldest first. From memory, the oldest batch takes the
    /// later queued batches of its partition along (in their order, up to
    /// `MAX_PUT_BYTES`): one put, one write and one hand-off to the store's thread for
    /// what the mergers handed over in many small batches.
    fn next(&mut self) -> Option<UniqueBatch> {
        if let Some(mut b) = self.memory.pop_front() {
            let mut bytes = bytes_of(&b);
            self.taken_from_memory(&b, bytes);
            let key = (b.stream, b.partition);
            let mut i = 0;
            while i < self.memory.len() && bytes < MAX_PUT_BYTES {
                let later = &self.memory[i];
                if (later.stream, later.partition) != key {
                    i += 1;
                    continue;
                }
                let later_bytes = bytes_of(later);
                if bytes + later_bytes > MAX_PUT_BYTES {
                    break;
                }
                let Some(later) = self.memory.remove(i) else {
                    break;
                };
                self.taken_from_memory(&later, later_bytes);
                bytes += later_bytes;
                b.items.extend(later.items);
            }
            return Some(b);
        }
        // A replayed batch may come to nothing (all stored already, or kept aside): the
        // next record follows at once, not after a retry delay.
        while !self.spool.is_empty() {
            let names = self.names.clone();
            let index = move |s: &str| {
                names
                    .iter()
                    .position(|n| &**n == s)
                    .map(|i| StreamId(i as u16))
            };
            match self.spool.pop(index) {
                Ok(Some(popped)) => {
                    self.meters.spooled.set(self.spool.len() as f64);
                    if let Some(batch) = self.replayed(popped) {
                        return Some(batch);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    self.error("transient");
                    return None;
                }
            }
        }
        let b = self.overflow.pop_front()?;
        let n = b.items.len() as u64;
        self.overflow_items -= b.items.len();
        self.overflow_bytes -= bytes_of(&b);
        self.held((b.stream, b.partition), |h| h.memory -= n);
        Some(b)
    }

    /// A batch read back from the spool: numbered again if an earlier run wrote it,
    /// without what the store already holds.
    fn replayed(&mut self, popped: Popped) -> Option<UniqueBatch> {
        let Popped {
            spooled,
            renumber,
            segment,
        } = popped;
        let key = (spooled.batch.stream, spooled.batch.partition);
        let n = spooled.batch.items.len() as u64;
        self.held(key, |h| h.spool = h.spool.saturating_sub(n));
        if !renumber {
            return Some(spooled.batch);
        }
        let Some(next) = self.replay_seq.get_mut(&key) else {
            if !self.keep_orphan(&spooled) {
                // Not kept aside: the segment must stay until it can be.
                self.spool.renumbered(segment, key, u64::MAX);
            }
            return None;
        };
        let first = *next;
        *next += n;
        let mut batch = spooled.batch.clone();
        for (i, u) in batch.items.iter_mut().enumerate() {
            u.seq = first + i as u64;
        }
        self.spool.renumbered(segment, key, first + n - 1);
        let (stored, keep): (Vec<Unique>, Vec<Unique>) = batch
            .items
            .into_iter()
            .partition(|u| (self.already_stored)(&spooled, u));
        let mark = self.marks.entry(key).or_default();
        for u in &stored {
            mark.ack(u.seq);
        }
        if !stored.is_empty() {
            self.publish_watermark(key);
        }
        tracing::info!(stream = %spooled.stream, partition = key.1, replaying = keep.len(), already_stored = stored.len(), "replaying spooled activities of an earlier run");
        batch.items = keep;
        (!batch.items.is_empty()).then_some(batch)
    }

    /// Spooled activities of a stream no longer configured: kept in a spool of their own.
    /// Whether they are now durably in that spool.
    fn keep_orphan(&mut self, spooled: &SpooledBatch) -> bool {
        if self.orphans.is_none() {
            match Spool::open(&self.cfg.spool_dir.join("orphaned")) {
                Ok((s, _)) => self.orphans = Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot open the spool for streams no longer configured");
                    return false;
                }
            }
        }
        let Some(o) = self.orphans.as_mut() else {
            return false;
        };
        match o
            .push(&spooled.stream, &spooled.batch)
            .and_then(|()| o.sync())
        {
            Ok(()) => {
                tracing::error!(stream = %spooled.stream, partition = spooled.batch.partition, activities = spooled.batch.items.len(), dir = %self.cfg.spool_dir.join("orphaned").display(), "spooled activities of a stream or partition no longer configured are kept aside");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot keep spooled activities of a stream no longer configured");
                false
            }
        }
    }

    fn pending(&self) -> bool {
        !self.memory.is_empty() || !self.spool.is_empty() || !self.overflow.is_empty()
    }

    /// Activities put and not yet acknowledged.
    fn unacknowledged(&self) -> u64 {
        self.held.values().map(|h| h.unacknowledged).sum()
    }

    fn publish_watermark(&self, key: Key) {
        if let (Some(t), Some(mark)) = (self.tallies.get(&key), self.marks.get(&key)) {
            t.stored_through.store(mark.through, Ordering::SeqCst);
        }
    }

    fn apply(&mut self, acks: Vec<Ack>) -> u64 {
        if !acks.is_empty() {
            self.last_progress = Instant::now();
        }
        let mut total = 0;
        let mut touched = Vec::new();
        for ack in acks {
            let key = (ack.stream, ack.partition);
            let n = ack.ids.len() as u64;
            let dups = ack.duplicates as u64;
            total += n;
            let labels = [
                (m::STREAM, self.stream_name(ack.stream)),
                (m::PARTITION, ack.partition.to_string()),
                (m::SINK, self.meters.sink.clone()),
            ];
            // An activity the store already held was stored by someone else: counted
            // once, as a duplicate acknowledgement.
            metrics::counter!(m::STORED_ACTIVITIES, &labels).increment(n - dups);
            metrics::counter!(m::SINK_DUPLICATE_ACKS, &labels).increment(dups);
            if let Some(t) = self.tallies.get(&key) {
                Tally::add(&t.stored, n - dups);
                Tally::add(&t.store_duplicates, dups);
            }
            let mark = self.marks.entry(key).or_default();
            for &seq in &ack.seqs {
                mark.ack(seq);
            }
            self.held(key, |h| {
                h.unacknowledged = h.unacknowledged.saturating_sub(n)
            });
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        for key in touched {
            self.publish_watermark(key);
            self.release(key);
        }
        self.stored_total += total;
        if let Err(e) = self
            .spool
            .release(|k, seq| self.marks.get(&k).is_some_and(|m| m.through >= seq))
        {
            tracing::warn!(error = %e, "cannot delete a stored spool segment");
        }
        total
    }

    /// Lets go of the put batches whose activities are all acknowledged.
    fn release(&mut self, key: Key) {
        let (Some(q), Some(mark)) = (self.retained.get_mut(&key), self.marks.get(&key)) else {
            return;
        };
        while q
            .front()
            .is_some_and(|b| b.items.iter().all(|u| mark.acked(u.seq)))
        {
            if let Some(b) = q.pop_front() {
                self.retained_bytes -= bytes_of(&b);
                let now = Instant::now();
                for u in &b.items {
                    self.acked.record(now.saturating_duration_since(u.received));
                }
            }
        }
    }

    /// The store lost what it had not acknowledged: put it again, before anything newer.
    fn put_again(&mut self) {
        let mut again = Vec::new();
        for (key, q) in &mut self.retained {
            let mark = self.marks.get(key);
            for mut b in q.drain(..) {
                b.items.retain(|u| mark.is_none_or(|m| !m.acked(u.seq)));
                if !b.items.is_empty() {
                    again.push(b);
                }
            }
        }
        self.retained_bytes = 0;
        let mut n_again = 0;
        for b in again.into_iter().rev() {
            let (key, n) = ((b.stream, b.partition), b.items.len() as u64);
            n_again += n;
            self.memory_items += b.items.len();
            self.memory_bytes += bytes_of(&b);
            self.memory.push_front(b);
            self.held(key, |h| {
                h.unacknowledged = h.unacknowledged.saturating_sub(n);
                h.memory += n;
            });
        }
        tracing::warn!(
            activities = n_again,
            "the store lost unacknowledged writes; putting them again"
        );
    }

    fn error(&self, kind: &'static str) {
        metrics::counter!(m::SINK_ERRORS, m::SINK => self.meters.sink.clone(), m::KIND => kind)
            .increment(1);
    }

    fn failed(&mut self, e: &StoreError, what: &str) {
        match e.class {
            ErrorClass::Fatal => {
                self.error("fatal");
                tracing::error!(error = %e, "the store refused for good; nothing more is sent to it, activities wait in memory and the spool until a restart");
                self.fatal = Some(e.to_string());
                self.set_up(Some(false), None);
            }
            ErrorClass::Lost => {
                self.error("transient");
                tracing::warn!(error = %e, "{what}");
                self.put_again();
            }
            ErrorClass::Transient => {
                self.error("transient");
                tracing::warn!(error = %e, "{what}");
            }
        }
    }

    async fn collect(&mut self, force: bool) {
        match self.store.acks(force).await {
            Ok(acks) => {
                self.apply(acks);
            }
            Err(e) => self.failed(&e, "collecting acknowledgements failed"),
        }
    }

    /// Waits for the store to acknowledge the oldest of what it holds.
    async fn collect_oldest(&mut self) {
        match self.store.oldest_acks().await {
            Ok(acks) => {
                self.apply(acks);
            }
            Err(e) => self.failed(&e, "collecting acknowledgements failed"),
        }
    }

    /// Puts the oldest waiting batch to the store.
    async fn put_next(&mut self) -> Put {
        let Some(batch) = self.next() else {
            return Put::Nothing;
        };
        let (key, n) = ((batch.stream, batch.partition), batch.items.len() as u64);
        let bytes = bytes_of(&batch);
        // Added latency: first receipt to handoff, for every activity; the exported
        // histogram takes the batch's oldest (its worst) only.
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
                self.retained_bytes += bytes;
                self.note_peak();
                self.retained.entry(key).or_default().push_back(batch);
                if !self.store_up {
                    tracing::info!("store is back");
                }
                self.set_up(Some(true), None);
                tandem_core::crash::point("sink.put");
                Put::Done
            }
            Err(e) => {
                // Back to the front: order is kept and nothing is lost (what the store
                // lost, if it did, goes in front of it).
                self.memory_items += batch.items.len();
                self.memory_bytes += bytes;
                self.note_peak();
                self.memory.push_front(batch);
                self.held(key, |h| h.memory += n);
                self.failed(&e, "store write failed; retrying");
                self.set_up(Some(false), None);
                Put::Failed
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<UniqueBatch>) -> DrainReport {
        let ack_every = Duration::from_millis(self.cfg.ack_interval_ms.max(1));
        let mut next_ack = Instant::now() + ack_every;
        let mut retry_at: Option<Instant> = None;
        let mut open = true;
        let mut drain_started: Option<(Instant, u64)> = None;
        self.set_up(Some(true), Some(true));
        loop {
            if !open && drain_started.is_none() {
                drain_started = Some((Instant::now(), self.stored_total));
                tandem_core::crash::point("sink.drain");
                tracing::info!(
                    queued =
                        self.memory_items as u64 + self.spool.len() + self.overflow_items as u64,
                    unacknowledged = self.unacknowledged(),
                    "draining before exit"
                );
            }
            if let Some((since, _)) = drain_started {
                let done = (!self.pending() || self.fatal.is_some()) && self.unacknowledged() == 0;
                let late = since.elapsed() >= Duration::from_millis(self.cfg.drain_deadline_ms);
                if done || late {
                    break;
                }
            }
            if !self.overflow.is_empty() && retry_at.is_none_or(|t| Instant::now() >= t) {
                self.flush_overflow();
            } else if self.overflow.is_empty() && !self.spool_ok {
                // Nothing waits for the spool any more (the store took it directly): the
                // full disk no longer holds anything back.
                tracing::info!("nothing waits for the spool any more");
                self.set_up(None, Some(true));
            }
            let ready = self.fatal.is_none()
                && self.pending()
                && self.room_to_put()
                && retry_at.is_none_or(|t| Instant::now() >= t);
            if ready {
                // Take what arrived meanwhile first, so the store sees batches in order.
                while self.can_take()
                    && let Ok(b) = rx.try_recv()
                {
                    self.receive(b);
                }
                match self.put_next().await {
                    Put::Done => {
                        retry_at = None;
                        self.backoff.reset();
                        if self.unacknowledged_heavy() {
                            self.collect(false).await;
                            if self.unacknowledged_heavy() {
                                self.collect_oldest().await;
                            }
                            next_ack = Instant::now() + ack_every;
                        }
                    }
                    // Nothing came although something waits: the spool could not be read.
                    Put::Failed | Put::Nothing if self.pending() => {
                        retry_at = Some(Instant::now() + self.backoff.next_delay());
                    }
                    Put::Failed | Put::Nothing => {}
                }
                if Instant::now() >= next_ack {
                    self.collect(false).await;
                    next_ack = Instant::now() + ack_every;
                }
                continue;
            }
            let wake = match retry_at {
                Some(t) if self.pending() => t.min(next_ack),
                _ => next_ack,
            };
            let take = open && self.can_take();
            tokio::select! {
                batch = rx.recv(), if take => match batch {
                    Some(b) => self.receive(b),
                    None => open = false,
                },
                () = sleep_until(wake) => {
                    if Instant::now() >= next_ack {
                        self.collect(drain_started.is_some()).await;
                        next_ack = Instant::now() + ack_every;
                    }
                }
            }
        }
        self.finish(drain_started).await
    }

    /// Closes the store and spools whatever it did not acknowledge, then everything that
    /// waited: the next start delivers it.
    async fn finish(mut self, drain_started: Option<(Instant, u64)>) -> DrainReport {
        match self.store.close().await {
            Ok(acks) => {
                self.apply(acks);
            }
            Err(e) => tracing::warn!(error = %e, "closing the store failed"),
        }
        let (since, stored_before) = drain_started.unwrap_or((Instant::now(), self.stored_total));
        let mut leftover: Vec<UniqueBatch> = Vec::new();
        let retained = std::mem::take(&mut self.retained);
        for (key, q) in retained {
            for mut b in q {
                let mark = self.marks.get(&key);
                b.items.retain(|u| mark.is_none_or(|m| !m.acked(u.seq)));
                if !b.items.is_empty() {
                    let n = b.items.len() as u64;
                    self.held(key, |h| {
                        h.unacknowledged = h.unacknowledged.saturating_sub(n);
                        h.memory += n;
                    });
                    leftover.push(b);
                }
            }
        }
        leftover.extend(self.memory.drain(..));
        leftover.extend(self.overflow.drain(..));
        let mut left = self.spool.len();
        for b in leftover {
            let (key, n) = ((b.stream, b.partition), b.items.len() as u64);
            let stream = self.stream_name(b.stream);
            match self.spool.push(&stream, &b) {
                Ok(()) => {
                    left += n;
                    self.held(key, |h| {
                        h.memory = h.memory.saturating_sub(n);
                        h.spool += n;
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, activities = n, "cannot spool at exit: the coverage ledger has not passed them, so the next start asks upstream for them again");
                }
            }
        }
        if let Err(e) = self.spool.sync() {
            tracing::error!(error = %e, "cannot sync the spool at exit");
        }
        let report = DrainReport {
            drained: self.stored_total - stored_before,
            left_in_spool: left,
            stored_total: self.stored_total,
            elapsed: since.elapsed(),
            peak_memory_bytes: self.peak_bytes,
        };
        tracing::info!(
            drained = report.drained,
            left_in_spool = report.left_in_spool,
            stored_total = report.stored_total,
            "sink finished"
        );
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watermark is the end of the contiguous prefix, whatever order acks come in.
    #[test]
    fn watermark_is_contiguous() {
        let mut w = Watermark::default();
        for s in [1, 2, 5, 4, 7, 3] {
            w.ack(s);
        }
        assert_eq!(w.through, 5);
        assert!(w.acked(7) && !w.acked(6) && !w.acked(8));
        w.ack(6);
        assert_eq!(w.through, 7);
        assert!(w.above.is_empty());
        w.ack(3);
        assert_eq!(w.through, 7, "an old ack changes nothing");
    }

    use std::sync::Mutex;

    use bytes::Bytes;
    use tandem_core::PathId;

    type PutIds = (Partition, Vec<ActivityId>);

    /// A store that takes every write and acknowledges only while `open` (or, with
    /// `on_force`, whenever it is forced, as the file store fsyncs), recording what it
    /// acknowledged, in order, and how often it was forced.
    #[derive(Default)]
    struct Gated {
        held: Vec<UniqueBatch>,
        open: Arc<AtomicBool>,
        on_force: bool,
        forced: Arc<std::sync::atomic::AtomicUsize>,
        acked: Arc<Mutex<Vec<ActivityId>>>,
        /// Every put: its partition and ids.
        puts: Arc<Mutex<Vec<PutIds>>>,
    }

    impl Store for Gated {
        fn kind(&self) -> &'static str {
            "gated"
        }
        async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
            let ids = batch.items.iter().map(|u| u.id).collect();
            self.puts.lock().unwrap().push((batch.partition, ids));
            self.held.push(batch.clone());
            Ok(())
        }
        async fn acks(&mut self, force: bool) -> Result<Vec<Ack>, StoreError> {
            if force {
                self.forced.fetch_add(1, Ordering::SeqCst);
            }
            if !(self.open.load(Ordering::SeqCst) || force && self.on_force) {
                return Ok(Vec::new());
            }
            let mut acked = self.acked.lock().unwrap();
            Ok(self
                .held
                .drain(..)
                .map(|b| {
                    acked.extend(b.items.iter().map(|u| u.id));
                    Ack::of(&b)
                })
                .collect())
        }
        fn unacknowledged(&self) -> usize {
            self.held.iter().map(|b| b.items.len()).sum()
        }
    }

    /// Big activities: `per` lines of `line_bytes` each, numbered from `first`.
    fn big_batch(first: u64, per: u64, line_bytes: usize) -> UniqueBatch {
        UniqueBatch {
            stream: StreamId(0),
            partition: 1,
            items: (first..first + per)
                .map(|i| Unique {
                    seq: i + 1,
                    id: ActivityId::Post(i),
                    line: Bytes::from(vec![b'x'; line_bytes]),
                    path: PathId(0),
                    received: Instant::now(),
                })
                .collect(),
        }
    }

    fn spool_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            })
            .count()
        })
    }

    /// The verdict of the byte-budget tests: `n` activities stored once each, in order,
    /// nothing left in the spool, and never more than `most` bytes held in memory.
    fn stored_once_in_order_within(
        report: &DrainReport,
        acked: &Mutex<Vec<ActivityId>>,
        n: u64,
        most: u64,
    ) {
        assert_eq!((report.stored_total, report.left_in_spool), (n, 0));
        assert_eq!(
            *acked.lock().unwrap(),
            (0..n).map(ActivityId::Post).collect::<Vec<_>>(),
            "stored once each, in order"
        );
        assert!(
            report.peak_memory_bytes <= most,
            "held {} B in memory; at most {most} B (the budget and one batch)",
            report.peak_memory_bytes
        );
    }

    fn small_budget(dir: &std::path::Path, bytes: u64) -> DriverConfig {
        DriverConfig {
            max_memory_bytes: bytes,
            spool_dir: dir.join("spool"),
            retry_initial_ms: 20,
            retry_max_ms: 100,
            ack_interval_ms: 20,
            stall_ms: 50,
            ..DriverConfig::default()
        }
    }

    fn names() -> StreamNames {
        Arc::new(vec!["decahose".into()])
    }

    /// Batches queued behind each other go to the store together, a partition's in its
    /// order and up to `MAX_PUT_BYTES` a put, whatever other partitions queued between
    /// them.
    #[tokio::test]
    async fn queued_batches_of_a_partition_are_put_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Gated::default();
        let (open, acked, puts) = (store.open.clone(), store.acked.clone(), store.puts.clone());
        let cfg = DriverConfig {
            spool_dir: dir.path().join("spool"),
            ..DriverConfig::default()
        };
        let mut tallies = HashMap::new();
        for p in [1, 2] {
            tallies.insert((StreamId(0), p), Arc::new(Tally::default()));
        }
        let (tx, handle) = spawn("test", store, cfg, names(), tallies, |_, _| false, 8).unwrap();
        let on = |partition, b: UniqueBatch| UniqueBatch { partition, ..b };
        // Four batches of 300 KiB for partition 1 between small ones for partition 2, all
        // queued before the driver first runs (the channel holds eight).
        let big = 100 * 1024;
        let mut sent = Vec::new();
        for i in 0..4 {
            sent.push(on(1, big_batch(i * 3, 3, big)));
            sent.push(on(2, big_batch(100 + i * 3, 3, 10)));
        }
        for b in sent {
            tx.send(b).await.unwrap();
        }
        open.store(true, Ordering::SeqCst);
        drop(tx);
        let report = handle.finish().await;
        assert_eq!(report.stored_total, 24);
        let ids = |r: std::ops::Range<u64>| r.map(ActivityId::Post).collect::<Vec<_>>();
        // Three of partition 1 fill a put (a fourth would pass 1 MiB); partition 2's four
        // go in one; partition 1's last follows.
        assert_eq!(
            *puts.lock().unwrap(),
            vec![(1, ids(0..9)), (2, ids(100..112)), (1, ids(9..12))]
        );
        assert_eq!(acked.lock().unwrap().len(), 24);
    }

    /// Activities far below the count bound but large: the bytes held in memory (queued
    /// and put unacknowledged) stay within the byte budget (plus one batch read back), the
    /// rest is spooled, and once the store acknowledges everything is stored once, in
    /// order.
    #[tokio::test]
    async fn big_activities_are_bounded_by_bytes_and_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 256 * 1024;
        let one = bytes_of(&big_batch(0, 4, 8 * 1024));
        let store = Gated::default();
        let (open, acked) = (store.open.clone(), store.acked.clone());
        let cfg = small_budget(dir.path(), budget);
        let (tx, handle) =
            spawn("test", store, cfg, names(), HashMap::new(), |_, _| false, 4).unwrap();
        for i in 0..40 {
            tokio::time::timeout(
                Duration::from_millis(500),
                tx.send(big_batch(i * 4, 4, 8 * 1024)),
            )
            .await
            .expect("the spool takes what memory cannot hold: sending never blocks long")
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            spool_files(&dir.path().join("spool")) > 0,
            "40 batches of {one} B overflow a budget of {budget} B to the spool"
        );
        open.store(true, Ordering::SeqCst);
        drop(tx);
        let report = handle.finish().await;
        stored_once_in_order_within(&report, &acked, 160, budget + one);
    }

    /// A store that is up and acknowledging, only slower than the input: a full memory
    /// holds the input back (sending waits) instead of spooling; memory stays within the
    /// byte budget, no spool segment is ever written, and everything is stored once, in
    /// order.
    #[tokio::test]
    async fn a_store_that_keeps_up_pushes_back_instead_of_spooling() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 128 * 1024;
        let one = bytes_of(&big_batch(0, 4, 8 * 1024));
        // Acknowledges only when asked to at once (as the file store fsyncs early).
        let store = Gated {
            on_force: true,
            ..Gated::default()
        };
        let acked = store.acked.clone();
        let cfg = DriverConfig {
            stall_ms: 600_000,
            ..small_budget(dir.path(), budget)
        };
        let spool = cfg.spool_dir.clone();
        let (tx, handle) =
            spawn("test", store, cfg, names(), HashMap::new(), |_, _| false, 4).unwrap();
        for i in 0..40 {
            tx.send(big_batch(i * 4, 4, 8 * 1024)).await.unwrap();
            assert_eq!(spool_files(&spool), 0, "batch {i}: nothing spooled");
        }
        drop(tx);
        let report = handle.finish().await;
        stored_once_in_order_within(&report, &acked, 160, budget + one);
    }

    /// While the spool cannot be written, memory holds up to a second byte budget, then
    /// the sink takes no more (backpressure); once the disk takes writes again, everything
    /// is stored once, in order.
    #[tokio::test]
    async fn an_unwritable_spool_holds_a_second_byte_budget_then_pushes_back() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 128 * 1024;
        let one = bytes_of(&big_batch(0, 4, 8 * 1024));
        let store = Gated::default();
        let (open, acked) = (store.open.clone(), store.acked.clone());
        let cfg = small_budget(dir.path(), budget);
        let spool = cfg.spool_dir.clone();
        let capacity = 4;
        let (tx, handle) = spawn(
            "test",
            store,
            cfg,
            names(),
            HashMap::new(),
            |_, _| false,
            capacity,
        )
        .unwrap();
        // No segment can be created: the disk is "full".
        std::fs::remove_dir_all(&spool).unwrap();
        let mut sent = 0;
        while sent < 40 {
            let b = big_batch(sent * 4, 4, 8 * 1024);
            if tokio::time::timeout(Duration::from_millis(300), tx.send(b))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        // Memory and the store's unacknowledged (one budget), waiting for the spool (a
        // second), the batch over each, the channel's and the one in hand.
        let most = (2 * budget / one) + 2 + capacity as u64 + 1;
        assert!(
            sent < 40 && sent <= most,
            "the sink took {sent} batches of {one} B with a budget of {budget} B (at most {most})"
        );
        assert!(
            !handle.up.load(Ordering::SeqCst),
            "down while the spool is full"
        );
        std::fs::create_dir_all(&spool).unwrap();
        open.store(true, Ordering::SeqCst);
        for i in sent..40 {
            tx.send(big_batch(i * 4, 4, 8 * 1024)).await.unwrap();
        }
        drop(tx);
        let report = handle.finish().await;
        assert_eq!((report.stored_total, report.left_in_spool), (160, 0));
        assert_eq!(
            *acked.lock().unwrap(),
            (0..160).map(ActivityId::Post).collect::<Vec<_>>()
        );
        assert!(
            report.peak_memory_bytes <= 2 * (budget + one),
            "held {} B with a budget of {budget} B",
            report.peak_memory_bytes
        );
    }

    /// A store that acknowledges only when forced (a file store with a long fsync
    /// interval) is forced once half the budget is unacknowledged: the queue keeps its
    /// room and nothing is spooled while the store keeps up.
    #[tokio::test]
    async fn unacknowledged_writes_are_forced_before_they_crowd_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 256 * 1024;
        let store = Gated {
            on_force: true,
            ..Gated::default()
        };
        let (forced, acked) = (store.forced.clone(), store.acked.clone());
        let mut cfg = small_budget(dir.path(), budget);
        // Acknowledgements are not collected on the interval during the test.
        cfg.ack_interval_ms = 60_000;
        let spool = cfg.spool_dir.clone();
        let (tx, handle) =
            spawn("test", store, cfg, names(), HashMap::new(), |_, _| false, 1).unwrap();
        for i in 0..40 {
            tx.send(big_batch(i * 4, 4, 8 * 1024)).await.unwrap();
            // The driver keeps up with the sender, as with a store that keeps up.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(spool_files(&spool), 0, "nothing was spooled");
        assert!(forced.load(Ordering::SeqCst) > 0, "the store was forced");
        let one = bytes_of(&big_batch(0, 4, 8 * 1024));
        let unacknowledged = 160 - acked.lock().unwrap().len() as u64;
        assert!(
            unacknowledged * one / 4 < budget / 2,
            "{unacknowledged} activities are still unacknowledged"
        );
        drop(tx);
        let report = handle.finish().await;
        assert_eq!((report.stored_total, report.left_in_spool), (160, 0));
        assert!(report.peak_memory_bytes <= budget);
    }

    use proptest::prelude::*;

    proptest! {
        /// Any permutation of 1..=n acknowledged one by one: the watermark never passes
        /// an unacknowledged number and ends at n.
        #[test]
        fn watermark_never_passes_a_hole(order in proptest::sample::subsequence((1u64..=60).collect::<Vec<_>>(), 0..=60).prop_shuffle()) {
            let mut w = Watermark::default();
            let mut seen = std::collections::HashSet::new();
            for s in &order {
                w.ack(*s);
                seen.insert(*s);
                for t in 1..=w.through {
                    prop_assert!(seen.contains(&t));
                }
                for t in 1..=61u64 {
                    prop_assert_eq!(w.acked(t), seen.contains(&t));
                }
            }
        }
    }
}

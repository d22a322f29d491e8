// Compiled only for tests: `#[cfg(test)] mod tests;` in repairer.rs.
//! The repairer's decisions, judged by order and outcome, never by wall-clock time.
//!
//! Most tests build a [`Repairer`] without its loop and drive it by hand the way `run`
//! does (a gap event, a chunk's end, a tick), so every step happens in a known order. The
//! merger and the sink are played by the test through the partition's [`Tally`], as
//! production does: the merger numbers what it classified, then counts it on its lane; the
//! sink moves `stored_through`. Where a chunk must end, recovery runs against the real
//! simulator; elsewhere the account has no free job slot, so chunks start (as far as the
//! repairer knows) and never reach the network. Two tests run the loop itself ([`spawn`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tandem_conn::{ApiKind, Auth, ConnKey, Endpoint, LivenessConfig, ReadConfig, RetryConfig};
use tandem_core::ids::snowflake;
use tandem_core::{Batch, LineKind, Origin, PathId, Secret, SecretSource, StreamId};
use tandem_sim::{Fault, RateProfile, SimConfig, Simulator, StreamConfig};
use tokio::sync::Semaphore;

use super::*;
use crate::ledger::Chunk;

const STREAM: &str = "decahose";
const USER: &str = "repair@example.com";
const PASSWORD: &str = "repair-password";
/// Merger inputs: two paths, then recovery.
const RECOVERY_LANE: u8 = 2;
const SEC: u64 = 1_000;
/// How long one awaited step may take before the test fails: a bound, not a pace.
const PATIENCE: Duration = Duration::from_secs(60);

/// Chunks of a minute, 10 s margins, a day of retention, two jobs at once.
fn config() -> RepairConfig {
    RepairConfig {
        ledger_dir: PathBuf::new(),
        chunk_secs: 60,
        margin_secs: 10,
        retention_secs: Some(24 * 3_600),
        max_jobs_per_account: 2,
        ledger_flush_ms: 50,
    }
}

fn with_jobs(jobs: usize) -> RepairConfig {
    RepairConfig {
        max_jobs_per_account: jobs,
        ..config()
    }
}

/// An hour ago on a whole second: well inside every retention used here.
fn an_hour_ago() -> u64 {
    (unix_ms_now() - 3_600 * SEC) / SEC * SEC
}

/// Where the partition's recovery requests go.
enum Upstream {
    /// A likes stream: no recovery API.
    None,
    /// An account whose job slots are all taken: chunks start and wait, never sending.
    Busy,
    /// The simulator's stream at `url`, with the account's job slots.
    Sim { url: String, slots: Arc<Semaphore> },
}

impl Upstream {
    fn sim(sim: &Simulator, slots: &Arc<Semaphore>) -> Upstream {
        Upstream::Sim {
            url: sim.recovery_url(STREAM).expect("the stream is served"),
            slots: slots.clone(),
        }
    }
}

/// What surrounds one partition's repair, played by the test.
struct Around {
    _dir: tempfile::TempDir,
    ledger_path: PathBuf,
    tally: Arc<Tally>,
    liveness: Arc<PartitionLiveness>,
    /// The merger's input: recovered lines arrive here.
    merger: mpsc::Receiver<Batch>,
    shutdown: watch::Sender<bool>,
}

/// A recovery spec like the pipeline's, except that any retryable failure ends the chunk
/// at once: a test sees it instead of waiting out a backoff.
fn spec(
    (url, slots): (String, Arc<Semaphore>),
    partition: Partition,
    (tally, liveness): (&Arc<Tally>, &Arc<PartitionLiveness>),
    out: mpsc::Sender<Batch>,
) -> RecoverySpec {
    tandem_conn::install_crypto_provider();
    RecoverySpec {
        key: ConnKey {
            stream: STREAM.into(),
            partition,
            path: "recovery".into(),
        },
        origin: Origin {
            stream: StreamId(0),
            partition,
            path: PathId(RECOVERY_LANE),
        },
        endpoint: Endpoint {
            recovery_url: url.clone(),
            url,
            api: ApiKind::Gnip,
            partitioned: true,
            auth: Auth::Basic {
                username: USER.to_owned(),
                password: SecretSource::Value(Secret::new(PASSWORD)),
            },
        },
        clients: vec![
            reqwest::Client::builder()
                .http1_only()
                .build()
                .expect("an http client"),
        ],
        partition: liveness.clone(),
        retry: RetryConfig {
            max_retries: Some(0),
            ..RetryConfig::default()
        },
        liveness: LivenessConfig::default(),
        read: ReadConfig::default(),
        tally: tally.clone(),
        out,
        send_lock: Arc::default(),
        jobs: Arc::new(crate::LocalJobs(slots)),
    }
}

/// The repair of `partition` and what surrounds it. The merger's control channel is
/// closed: the ids at a gap's edges are none.
fn parts(
    config: RepairConfig,
    ledger: PartitionLedger,
    upstream: Upstream,
    partition: Partition,
) -> (PartitionRepair, Around) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ledger_path = ledger::path(dir.path(), STREAM, partition);
    let tally = Arc::new(Tally::with_lanes(usize::from(RECOVERY_LANE) + 1));
    let liveness = Arc::new(PartitionLiveness::new(2));
    let (out, merger) = mpsc::channel(10_000);
    let recovery = match upstream {
        Upstream::None => None,
        Upstream::Busy => {
            let url = "http://127.0.0.1:9/never-contacted".to_owned();
            Some((url, Arc::new(Semaphore::new(0))))
        }
        Upstream::Sim { url, slots } => Some((url, slots)),
    }
    .map(|target| Arc::new(spec(target, partition, (&tally, &liveness), out)));
    let repair = PartitionRepair {
        stream: STREAM.into(),
        partition,
        api: ApiKind::Gnip,
        config,
        ledger_path: ledger_path.clone(),
        ledger,
        liveness: liveness.clone(),
        tally: tally.clone(),
        control: mpsc::unbounded_channel().0,
        recovery,
        stored: None,
        peer: None,
    };
    let around = Around {
        _dir: dir,
        ledger_path,
        tally,
        liveness,
        merger,
        shutdown: watch::channel(false).0,
    };
    (repair, around)
}

/// A repairer driven by hand, with the watch of its gaps and metrics of its own.
struct Bench {
    r: Repairer,
    gaps: watch::Receiver<Vec<GapView>>,
    a: Around,
    metrics: PrometheusHandle,
}

fn bench_of(
    config: RepairConfig,
    ledger: PartitionLedger,
    upstream: Upstream,
    partition: Partition,
) -> Bench {
    let (repair, a) = parts(config, ledger, upstream, partition);
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let (r, gaps) =
        metrics::with_local_recorder(&recorder, || Repairer::new(repair, a.shutdown.subscribe()));
    Bench {
        r,
        gaps,
        a,
        metrics,
    }
}

fn bench(config: RepairConfig, upstream: Upstream) -> Bench {
    bench_of(config, PartitionLedger::default(), upstream, 1)
}

type Ended = Result<(tokio::task::Id, (ChunkKey, ChunkOutcome)), tokio::task::JoinError>;

impl Bench {
    /// The next chunk that ends, as `run` receives it.
    async fn next_end(&mut self) -> Ended {
        tokio::time::timeout(PATIENCE, self.r.jobs.join_next_with_id())
            .await
            .expect("a chunk ended within the patience")
            .expect("a chunk was running")
    }

    /// Waits for the next chunk to end, checks how, and hands it to the repairer.
    async fn end_next(&mut self, want: fn(&ChunkOutcome) -> bool) -> ChunkKey {
        let ended = self.next_end().await;
        let (_, (key, outcome)) = ended.as_ref().expect("the chunk's task did not fail");
        assert!(want(outcome), "chunk {key:?} ended {outcome:?}");
        let key = *key;
        self.r.chunk_ended(ended);
        key
    }

    /// Plays the merger: classifies every batch waiting (all unique), numbering first and
    /// counting the lane second, as production does. Returns the activities' times.
    fn merge_waiting(&mut self) -> Vec<u64> {
        let mut times = Vec::new();
        while let Ok(b) = self.a.merger.try_recv() {
            let n = b.lines.len() as u64;
            self.a.tally.number(n);
            self.a.tally.lanes.classify(usize::from(b.origin.path.0), n);
            times.extend(b.lines.iter().filter_map(|l| created(l)));
        }
        times.sort_unstable();
        times
    }

    /// Plays the sink: the store acknowledged everything numbered up to `seq`.
    fn store_through(&self, seq: u64) {
        self.a.tally.stored_through.store(seq, Ordering::SeqCst);
    }

    fn gap(&self, i: usize) -> &Gap {
        &self.r.ledger_gaps()[i]
    }

    /// The ledger as written to disk.
    fn saved(&self) -> PartitionLedger {
        PartitionLedger::load(&self.a.ledger_path).expect("the ledger reads back")
    }

    /// The value of counter `name` (the series whose labels include `label`).
    fn counter(&self, name: &str, label: &str) -> f64 {
        counter(&self.metrics, name, label)
    }
}

impl Repairer {
    fn ledger_gaps(&self) -> &[Gap] {
        &self.r.ledger.gaps
    }
}

fn completed(o: &ChunkOutcome) -> bool {
    matches!(o, ChunkOutcome::Completed { .. })
}

fn created(line: &[u8]) -> Option<u64> {
    match tandem_core::identify(line) {
        Ok(LineKind::Activity(id)) => id.created_unix_ms(),
        _ => None,
    }
}

fn counter(h: &PrometheusHandle, name: &str, label: &str) -> f64 {
    h.render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn spans(g: &Gap) -> Vec<(u64, u64)> {
    g.chunks.iter().map(|c| (c.start_ms, c.end_ms)).collect()
}

fn done(g: &Gap) -> Vec<bool> {
    g.chunks.iter().map(|c| c.done).collect()
}

/// A simulator serving one Decahose stream that publishes nothing by itself.
async fn simulator(tweak: impl FnOnce(&mut StreamConfig)) -> Simulator {
    let mut s = StreamConfig::decahose(STREAM, "repair", USER, PASSWORD);
    s.rate = RateProfile::Constant { per_sec: 0.0 };
    tweak(&mut s);
    Simulator::start(SimConfig {
        streams: vec![s],
        ..SimConfig::default()
    })
    .await
    .expect("the simulator starts")
}

/// Publishes to `partition` one activity created at each of `times`.
fn publish(sim: &Simulator, partition: Partition, times: &[u64]) {
    let lines = times
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let id = snowflake(t, partition as u16, i as u16);
            Bytes::from(format!(r#"{{"id_str":"{id}","text":"recovered"}}"#))
        })
        .collect();
    let n = sim.publish(STREAM, partition, lines).expect("published");
    assert_eq!(n, times.len(), "every line is an activity");
}

/// A gap becomes chunks over it plus both margins, split at `chunk_secs`; the oldest start.
#[tokio::test]
async fn gap_becomes_chunks_over_gap_and_margins() {
    let mut b = bench(with_jobs(2), Upstream::Busy);
    let s = an_hour_ago();
    b.r.gap_found(s, s + 150 * SEC).await;
    let want = [
        (s - 10 * SEC, s + 50 * SEC),
        (s + 50 * SEC, s + 110 * SEC),
        (s + 110 * SEC, s + 160 * SEC),
    ];
    assert_eq!(spans(b.gap(0)), want);
    assert_eq!(b.gap(0).state, GapState::Open);
    let running = HashSet::from([(s, want[0].0), (s, want[1].0)]);
    assert_eq!(b.r.running, running, "the two oldest chunks run");
    assert_eq!(b.saved().gaps, b.r.ledger_gaps(), "the plan is on disk");
    let views = b.gaps.borrow().clone();
    assert_eq!(views.len(), 1);
    assert_eq!((views[0].start_ms, views[0].end_ms), (s, s + 150 * SEC));
    assert_eq!((views[0].chunks, views[0].chunks_done), (3, 0));
}

/// An adjacent gap grows the unstarted last chunk up to a chunk's length, then adds chunks.
#[tokio::test]
async fn adjacent_gap_grows_the_last_unstarted_chunk() {
    let mut b = bench(with_jobs(1), Upstream::Busy);
    let s = an_hour_ago();
    b.r.gap_found(s, s + 60 * SEC).await;
    let first = (s - 10 * SEC, s + 50 * SEC);
    assert_eq!(spans(b.gap(0)), [first, (s + 50 * SEC, s + 70 * SEC)]);
    assert_eq!(b.r.running, HashSet::from([(s, first.0)]));

    b.r.gap_found(s + 60 * SEC, s + 90 * SEC).await;
    assert_eq!(spans(b.gap(0)), [first, (s + 50 * SEC, s + 100 * SEC)]);
    assert_eq!(b.gap(0).end_ms, s + 90 * SEC);

    // Starts 5 s after the gap's end (within the margin); growing would pass a chunk.
    b.r.gap_found(s + 95 * SEC, s + 130 * SEC).await;
    let grown = [
        first,
        (s + 50 * SEC, s + 100 * SEC),
        (s + 100 * SEC, s + 140 * SEC),
    ];
    assert_eq!(spans(b.gap(0)), grown);
    assert_eq!(b.gap(0).end_ms, s + 130 * SEC);

    b.r.gap_found(s + 141 * SEC, s + 150 * SEC).await;
    assert_eq!(
        b.r.ledger_gaps().len(),
        2,
        "past the margin: a gap of its own"
    );
    assert_eq!(spans(b.gap(0)), grown, "the first gap is untouched");
    assert_eq!(b.saved().gaps, b.r.ledger_gaps());
}

/// An adjacent gap adds a chunk rather than change what a running chunk asked for.
#[tokio::test]
async fn adjacent_gap_onto_a_running_chunk_adds_chunks() {
    let mut b = bench(with_jobs(2), Upstream::Busy);
    let s = an_hour_ago();
    b.r.gap_found(s, s + 30 * SEC).await;
    let first = (s - 10 * SEC, s + 40 * SEC);
    assert_eq!(spans(b.gap(0)), [first]);
    assert!(b.r.running.contains(&(s, first.0)));
    b.r.gap_found(s + 30 * SEC, s + 40 * SEC).await;
    assert_eq!(spans(b.gap(0)), [first, (s + 40 * SEC, s + 50 * SEC)]);
    assert_eq!(b.r.running.len(), 2, "the new chunk starts too");
}

/// An adjacent gap adds a chunk rather than grow one received but not stored yet.
#[tokio::test]
async fn adjacent_gap_onto_a_received_chunk_is_recovered_too() {
    let sim = simulator(|_| {}).await;
    let s = an_hour_ago();
    publish(&sim, 1, &[s + 20 * SEC, s + 45 * SEC]);
    let slots = Arc::new(Semaphore::new(2));
    let mut b = bench(with_jobs(1), Upstream::sim(&sim, &slots));
    b.r.gap_found(s, s + 30 * SEC).await;
    b.end_next(completed).await;
    assert_eq!(b.merge_waiting(), [s + 20 * SEC]);

    // The first chunk waits for the store. Were it grown over the new part, storing it
    // would mark that part done without a request: the activity at +45 s would be lost.
    b.r.gap_found(s + 30 * SEC, s + 40 * SEC).await;
    let want = [(s - 10 * SEC, s + 40 * SEC), (s + 40 * SEC, s + 50 * SEC)];
    assert_eq!(spans(b.gap(0)), want, "the received chunk keeps its range");
    b.end_next(completed).await;
    assert_eq!(
        b.merge_waiting(),
        [s + 45 * SEC],
        "the new part was requested"
    );
    b.store_through(2);
    b.r.tick().await;
    assert_eq!(b.gap(0).state, GapState::Repaired);
    assert_eq!(done(b.gap(0)), [true, true]);
}

/// A gap wholly older than the retention is unrecoverable: no chunk, counted once.
#[tokio::test]
async fn gap_older_than_retention_is_unrecoverable() {
    let config = RepairConfig {
        retention_secs: Some(3_600),
        ..config()
    };
    let mut b = bench(config, Upstream::Busy);
    let now = unix_ms_now();
    let (start, end) = (now - 3 * 3_600 * SEC, now - 2 * 3_600 * SEC);
    b.r.gap_found(start, end).await;
    assert_eq!(b.r.ledger_gaps().len(), 1);
    let g = b.gap(0);
    assert_eq!(
        (g.start_ms, g.end_ms, g.state),
        (start, end, GapState::Unrecoverable)
    );
    assert!(g.chunks.is_empty() && b.r.running.is_empty());
    let reason = g.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("retention"), "{reason}");
    assert_eq!(b.counter(m::GAPS_UNRECOVERABLE, "partition=\"1\""), 1.0);
    assert_eq!(b.gaps.borrow()[0].state, GapState::Unrecoverable);
}

/// A gap reaching past the retention is split: unrecoverable before, recovered after.
#[tokio::test]
async fn gap_reaching_past_retention_is_split() {
    let config = RepairConfig {
        retention_secs: Some(3_600),
        ..config()
    };
    let mut b = bench(config, Upstream::Busy);
    let before = unix_ms_now();
    let (start, end) = (before - 2 * 3_600 * SEC, before - 1_800 * SEC);
    b.r.gap_found(start, end).await;
    let after = unix_ms_now();
    assert_eq!(b.r.ledger_gaps().len(), 2);
    let (lost, open) = (b.gap(0), b.gap(1));
    let split = lost.end_ms;
    let bound = |found: u64| found - 3_600 * SEC + 60 * SEC;
    assert!(
        (bound(before)..=bound(after)).contains(&split),
        "split at {split}"
    );
    assert_eq!(
        (lost.start_ms, lost.state),
        (start, GapState::Unrecoverable)
    );
    assert!(lost.chunks.is_empty());
    assert_eq!((open.start_ms, open.end_ms), (split, end));
    assert_eq!(open.state, GapState::Open);
    assert_eq!(
        open.chunks[0].start_ms,
        split - 10 * SEC,
        "margin before the split"
    );
    assert_eq!(open.chunks.last().map(|c| c.end_ms), Some(end + 10 * SEC));
    assert_eq!(b.counter(m::GAPS_UNRECOVERABLE, "partition=\"1\""), 1.0);
}

/// On a likes stream every gap is unrecoverable: in the watch, counted once per gap.
#[tokio::test(start_paused = true)]
async fn likes_gaps_are_unrecoverable_counted_and_watched() {
    let (repair, a) = parts(config(), PartitionLedger::default(), Upstream::None, 1);
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let (events, events_rx) = mpsc::unbounded_channel();
    let handle = metrics::with_local_recorder(&recorder, || {
        spawn(repair, events_rx, a.shutdown.subscribe())
    });
    let mut gaps = handle.gaps.clone();
    let unrecoverable = || counter(&metrics, m::GAPS_UNRECOVERABLE, "partition=\"1\"");
    let s = an_hour_ago();
    let gap = |start_ms, end_ms| ConnEvent::UncoveredBeyondBackfill {
        stream: STREAM.into(),
        partition: 1,
        start_ms,
        end_ms,
    };
    events.send(gap(s, s + 600 * SEC)).expect("the repair runs");
    let v = wait_gaps(&mut gaps, |v| !v.is_empty()).await;
    assert_eq!((v[0].state, v[0].chunks), (GapState::Unrecoverable, 0));
    assert!(v[0].reason.as_deref().unwrap_or_default().contains("likes"));
    assert_eq!(unrecoverable(), 1.0);

    events
        .send(gap(s + 600 * SEC, s + 900 * SEC))
        .expect("sent");
    let v = wait_gaps(&mut gaps, |v| v[0].end_ms == s + 900 * SEC).await;
    assert_eq!(v.len(), 1, "the next failed reconnect extends the gap");
    assert_eq!(unrecoverable(), 1.0);

    events
        .send(gap(s + 2_000 * SEC, s + 2_100 * SEC))
        .expect("sent");
    let v = wait_gaps(&mut gaps, |v| v.len() == 2).await;
    assert_eq!(v[1].state, GapState::Unrecoverable);
    assert_eq!(unrecoverable(), 2.0);
    a.shutdown.send_replace(true);
    handle.finish().await;
    let saved = PartitionLedger::load(&a.ledger_path).expect("the ledger reads back");
    assert_eq!(saved.gaps.len(), 2);
}

/// Waits until the gaps published satisfy `ok`, and returns them.
async fn wait_gaps(
    gaps: &mut watch::Receiver<Vec<GapView>>,
    ok: impl FnMut(&Vec<GapView>) -> bool,
) -> Vec<GapView> {
    tokio::time::timeout(PATIENCE, gaps.wait_for(ok))
        .await
        .expect("the gaps changed within the patience")
        .expect("the repair runs")
        .clone()
}

/// Two partitions of an account never run more chunks at once than its job slots.
#[tokio::test]
async fn jobs_per_account_never_exceed_the_slots() {
    // The simulator admits two recovery jobs per account and answers a third with 429,
    // which ends a chunk here. It gives a slot back in the same poll that sends the
    // completion, so on this current-thread runtime the next request never finds the
    // finished job's slot still taken.
    let sim = simulator(|s| s.recovery_rate_per_sec = 200).await;
    let s = an_hour_ago();
    // 40 activities per chunk: each request lasts a few of the simulator's 50 ms ticks.
    let times: Vec<u64> = (0..80).map(|i| s + i * 1_500).collect();
    let slots = Arc::new(Semaphore::new(2));
    let mut benches = Vec::new();
    for p in [1, 2] {
        publish(&sim, p, &times);
        let mut b = bench_of(
            with_jobs(2),
            PartitionLedger::default(),
            Upstream::sim(&sim, &slots),
            p,
        );
        b.r.gap_found(s + 10 * SEC, s + 110 * SEC).await;
        assert_eq!(b.r.running.len(), 2, "partition {p} starts its two chunks");
        benches.push(b);
    }
    for b in &mut benches {
        b.end_next(completed).await;
        b.end_next(completed).await;
        assert_eq!(b.merge_waiting().len(), times.len());
    }
    let stats = sim.stats(STREAM).expect("stats");
    assert_eq!(stats.recovery_jobs, 4);
    assert_eq!(stats.responses.get(&429), None, "{:?}", stats.responses);
}

/// A chunk is done only once the store acknowledged its lines, not when merged.
#[tokio::test]
async fn chunk_is_done_only_once_its_lines_are_stored() {
    let sim = simulator(|_| {}).await;
    let s = an_hour_ago();
    let secs = [-15, -5, 20, 70, 105, 115].map(|x: i64| s.saturating_add_signed(x * 1_000));
    publish(&sim, 1, &secs);
    let slots = Arc::new(Semaphore::new(2));
    let mut b = bench(with_jobs(1), Upstream::sim(&sim, &slots));
    b.r.gap_found(s, s + 100 * SEC).await;
    b.end_next(completed).await;
    assert_eq!(
        b.merge_waiting(),
        secs[1..3],
        "the first chunk's lines, margin included"
    );
    assert_not_done_after_ticks(&mut b, [false, false]).await;
    b.store_through(1);
    assert_not_done_after_ticks(&mut b, [false, false]).await;
    b.store_through(2);
    b.r.tick().await;
    assert_eq!(done(b.gap(0)), [true, false]);
    assert_eq!(b.gaps.borrow()[0].chunks_done, 1);

    // The second chunk ends before the merger has classified its lines.
    b.end_next(completed).await;
    assert_not_done_after_ticks(&mut b, [true, false]).await;
    assert_eq!(b.merge_waiting(), secs[3..5]);
    assert_not_done_after_ticks(&mut b, [true, false]).await;
    b.store_through(4);
    b.r.tick().await;
    assert_eq!(b.gap(0).state, GapState::Repaired);
    assert_eq!(b.saved().gaps[0].state, GapState::Repaired);
    assert_eq!(b.gaps.borrow()[0].state, GapState::Repaired);
    assert_eq!(b.counter(m::GAPS_REPAIRED, "kind=\"recovery\""), 1.0);
}

/// Ticks a few times; the chunks' `done` stays `want`, in memory, on disk and in the
/// watch, and the gap stays open.
async fn assert_not_done_after_ticks(b: &mut Bench, want: [bool; 2]) {
    for _ in 0..3 {
        b.r.tick().await;
    }
    assert_eq!(done(b.gap(0)), want);
    assert_eq!(b.gap(0).state, GapState::Open);
    assert_eq!(done(&b.saved().gaps[0]), want, "the ledger on disk");
    let done_count = want.iter().filter(|d| **d).count();
    assert_eq!(b.gaps.borrow()[0].chunks_done, done_count);
}

/// A chunk refused for good (401) is failed, and its gap ends unrecoverable.
#[tokio::test]
async fn refused_chunk_fails_and_its_gap_is_unrecoverable() {
    let sim = simulator(|_| {}).await;
    let s = an_hour_ago();
    publish(&sim, 1, &[s + 70 * SEC]);
    sim.fault(Fault::Reject {
        stream: STREAM.to_owned(),
        partition: Some(1),
        status: 401,
        count: Some(1),
        for_ms: None,
    })
    .expect("the fault is set");
    let slots = Arc::new(Semaphore::new(2));
    let mut b = bench(with_jobs(1), Upstream::sim(&sim, &slots));
    b.r.gap_found(s, s + 100 * SEC).await;
    b.end_next(|o| matches!(o, ChunkOutcome::Unrecoverable(e) if e.status == Some(401)))
        .await;
    let failed = b.gap(0).chunks[0].failed.clone().unwrap_or_default();
    assert!(failed.starts_with("401: "), "{failed}");
    assert_eq!(b.gap(0).state, GapState::Open, "the other chunk still runs");

    b.end_next(completed).await;
    assert_eq!(b.merge_waiting(), [s + 70 * SEC]);
    b.store_through(1);
    b.r.tick().await;
    let g = b.gap(0);
    assert_eq!(g.state, GapState::Unrecoverable);
    assert_eq!(g.reason.as_deref(), Some(failed.as_str()));
    assert_eq!(done(g), [false, true]);
    assert_eq!(b.counter(m::GAPS_UNRECOVERABLE, "partition=\"1\""), 1.0);
    assert_eq!(b.counter(m::GAPS_REPAIRED, "kind=\"recovery\""), 0.0);
    assert_eq!(b.gaps.borrow()[0].state, GapState::Unrecoverable);
}

/// A range past the upstream's own retention (400) makes the gap unrecoverable.
#[tokio::test]
async fn range_outside_upstream_retention_is_unrecoverable() {
    let sim = simulator(|s| s.retention_ms = 1_800 * SEC).await;
    let slots = Arc::new(Semaphore::new(2));
    let mut b = bench(with_jobs(2), Upstream::sim(&sim, &slots));
    let s = an_hour_ago();
    b.r.gap_found(s, s + 100 * SEC).await;
    let refused =
        |o: &ChunkOutcome| matches!(o, ChunkOutcome::Unrecoverable(e) if e.status == Some(400));
    b.end_next(refused).await;
    assert_eq!(b.gap(0).state, GapState::Open);
    b.end_next(refused).await;
    let g = b.gap(0);
    assert_eq!(g.state, GapState::Unrecoverable);
    assert!(g.reason.as_deref().unwrap_or_default().starts_with("400: "));
    assert!(g.chunks.iter().all(|c| c.failed.is_some()));
    assert_eq!(b.saved().gaps[0].state, GapState::Unrecoverable);
    assert_eq!(b.counter(m::GAPS_UNRECOVERABLE, "partition=\"1\""), 1.0);
}

fn chunk(start_ms: u64, end_ms: u64, done: bool, failed: Option<&str>) -> Chunk {
    Chunk {
        start_ms,
        end_ms,
        done,
        failed: failed.map(str::to_owned),
        by_peer: false,
    }
}

fn open_gap(start_ms: u64, end_ms: u64, chunks: Vec<Chunk>) -> Gap {
    Gap {
        start_ms,
        end_ms,
        state: GapState::Open,
        found_ms: unix_ms_now(),
        repaired_ms: None,
        chunks,
        reason: None,
        end_edge_saved: false,
    }
}

/// A resumed ledger requests only the chunks neither done nor failed.
#[tokio::test]
async fn resume_starts_only_the_missing_chunks() {
    let sim = simulator(|_| {}).await;
    let s = an_hour_ago();
    publish(&sim, 1, &[20, 80, 130, 660].map(|x| s + x * SEC));
    let at = |x: u64| s + x * SEC;
    let ledger = PartitionLedger {
        complete_until_ms: at(700),
        gaps: vec![
            open_gap(
                at(0),
                at(150),
                vec![
                    chunk(s - 10 * SEC, at(50), true, None),
                    chunk(at(50), at(110), false, None),
                    chunk(at(110), at(160), true, None),
                ],
            ),
            open_gap(
                at(600),
                at(660),
                vec![
                    chunk(at(590), at(650), false, Some("401: refused")),
                    chunk(at(650), at(670), false, None),
                ],
            ),
        ],
    };
    let slots = Arc::new(Semaphore::new(2));
    let mut b = bench_of(with_jobs(4), ledger, Upstream::sim(&sim, &slots), 1);
    b.r.schedule();
    assert_eq!(
        b.r.running,
        HashSet::from([(at(0), at(50)), (at(600), at(650))])
    );
    b.end_next(completed).await;
    b.end_next(completed).await;
    assert_eq!(
        b.merge_waiting(),
        [at(80), at(660)],
        "nothing of the done chunks"
    );
    b.store_through(2);
    b.r.tick().await;
    assert_eq!(b.gap(0).state, GapState::Repaired);
    assert_eq!(b.gap(1).state, GapState::Unrecoverable);
    assert_eq!(b.gap(1).reason.as_deref(), Some("401: refused"));
    assert_eq!(sim.stats(STREAM).expect("stats").recovery_jobs, 2);
}

/// The ledger's coverage starts at the first connect, then follows the stored watermark.
#[tokio::test]
async fn coverage_moves_only_behind_the_stored_watermark() {
    let mut b = bench(config(), Upstream::None);
    let (t0, live, tally) = (an_hour_ago(), b.a.liveness.clone(), b.a.tally.clone());
    live.set_live(0, t0);
    live.set_live(1, t0);
    // Path a hands 3 lines covering up to t0 + 1 s; the merger has not seen them. The
    // first run's coverage starts where it connected: nothing before was ours to store.
    tally.lanes.hand(0, 3);
    live.note_activity(0, tokio::time::Instant::now(), Some(t0 + SEC));
    assert_coverage_after_ticks(&mut b, t0).await;
    tally.number(3);
    tally.lanes.classify(0, 3);
    assert_coverage_after_ticks(&mut b, t0).await;
    b.store_through(2);
    assert_coverage_after_ticks(&mut b, t0).await;

    // Path b hands 2 more covering up to t0 + 2 s; all five are classified.
    tally.lanes.hand(1, 2);
    live.note_activity(1, tokio::time::Instant::now(), Some(t0 + 2 * SEC));
    tally.number(2);
    tally.lanes.classify(1, 2);
    b.store_through(3);
    assert_coverage_after_ticks(&mut b, t0 + SEC).await;
    b.store_through(4);
    assert_coverage_after_ticks(&mut b, t0 + SEC).await;
    b.store_through(5);
    assert_coverage_after_ticks(&mut b, t0 + 2 * SEC).await;
}

/// Ticks a few times; the coverage in the ledger, in memory and on disk, is `want`.
async fn assert_coverage_after_ticks(b: &mut Bench, want: u64) {
    for _ in 0..3 {
        b.r.tick().await;
    }
    assert_eq!(b.r.r.ledger.complete_until_ms, want);
    assert_eq!(b.saved().complete_until_ms, want, "the ledger on disk");
}

/// A chunk stopped by shutdown is not started again (it resumes at the next start).
#[tokio::test]
async fn chunk_stopped_by_shutdown_is_not_started_again() {
    let mut b = bench(with_jobs(2), Upstream::Busy);
    let s = an_hour_ago();
    b.r.gap_found(s, s + 150 * SEC).await;
    assert_eq!(b.r.running.len(), 2);
    b.a.shutdown.send_replace(true);
    for _ in 0..2 {
        b.end_next(|o| *o == ChunkOutcome::Shutdown).await;
    }
    assert!(b.r.running.is_empty(), "restarted: {:?}", b.r.running);
    assert!(b.r.jobs.is_empty());
    assert_eq!(done(b.gap(0)), [false, false, false]);
}

/// Through the running loop, a gap is repaired only once the store acknowledged it.
#[tokio::test]
async fn spawned_repair_marks_the_gap_repaired_once_stored() {
    // One job at a time: the second chunk's line proves the first chunk's end was handled.
    let sim = simulator(|_| {}).await;
    let s = an_hour_ago();
    publish(&sim, 1, &[s + 20 * SEC, s + 70 * SEC]);
    let slots = Arc::new(Semaphore::new(2));
    let (repair, a) = parts(
        with_jobs(1),
        PartitionLedger::default(),
        Upstream::sim(&sim, &slots),
        1,
    );
    let (events, events_rx) = mpsc::unbounded_channel();
    let handle = spawn(repair, events_rx, a.shutdown.subscribe());
    let mut gaps = handle.gaps.clone();
    let Around {
        merger,
        tally,
        shutdown,
        ledger_path,
        _dir,
        ..
    } = a;
    let mut times = spawn_merger(merger, tally.clone());
    events
        .send(ConnEvent::UncoveredBeyondBackfill {
            stream: STREAM.into(),
            partition: 1,
            start_ms: s,
            end_ms: s + 100 * SEC,
        })
        .expect("the repair runs");
    assert_eq!(next_merged(&mut times).await, s + 20 * SEC);
    // The first chunk ended and was merged, but nothing is stored: not done.
    assert_eq!(next_merged(&mut times).await, s + 70 * SEC);
    let v = gaps.borrow().clone();
    assert_eq!(
        (v[0].state, v[0].chunks, v[0].chunks_done),
        (GapState::Open, 2, 0)
    );
    tally.stored_through.store(2, Ordering::SeqCst);
    let v = wait_gaps(&mut gaps, |v| v[0].state == GapState::Repaired).await;
    assert_eq!(v[0].chunks_done, 2);
    shutdown.send_replace(true);
    handle.finish().await;
    let saved = PartitionLedger::load(&ledger_path).expect("the ledger reads back");
    assert_eq!(saved.gaps[0].state, GapState::Repaired);
}

/// Plays the merger in a task of its own, as production runs it: numbers and classifies
/// every batch, then reports the creation times of its activities.
fn spawn_merger(
    mut merger: mpsc::Receiver<Batch>,
    tally: Arc<Tally>,
) -> mpsc::UnboundedReceiver<u64> {
    let (merged, times) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(b) = merger.recv().await {
            let n = b.lines.len() as u64;
            tally.number(n);
            tally.lanes.classify(usize::from(b.origin.path.0), n);
            for t in b.lines.iter().filter_map(|l| created(l)) {
                let _ = merged.send(t);
            }
        }
    });
    times
}

/// The creation time of the next activity the test's merger numbered.
async fn next_merged(times: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    tokio::time::timeout(PATIENCE, times.recv())
        .await
        .expect("merged within the patience")
        .expect("the merger runs")
}

/// The pair's other consumer as a test sets it: a fixed report of what it stored.
#[derive(Debug)]
struct FixedPeer(std::sync::Mutex<Option<crate::PeerStored>>);

impl crate::PeerCoverage for FixedPeer {
    fn stored(&self) -> crate::PeerAnswer {
        match self.0.lock().unwrap().clone() {
            Some(p) => crate::PeerAnswer::Stored(p),
            None => crate::PeerAnswer::Alone,
        }
    }
}

/// A gap the pair's other consumer stored whole is closed as `covered_by_peer` without a
/// single recovery request; one it stored only the start of is requested for the rest.
#[tokio::test]
async fn what_the_peer_stored_is_never_requested() {
    let sim = simulator(|_| {}).await;
    let s = an_hour_ago();
    publish(&sim, 1, &[s + 20 * SEC, s + 150 * SEC]);
    let slots = Arc::new(Semaphore::new(2));
    let (mut repair, a) = parts(
        with_jobs(2),
        PartitionLedger::default(),
        Upstream::sim(&sim, &slots),
        1,
    );
    let peer = Arc::new(FixedPeer(std::sync::Mutex::new(Some(crate::PeerStored {
        from_ms: s - 3_600 * SEC,
        until_ms: s + 120 * SEC,
        open_gaps: Vec::new(),
        live: false,
    }))));
    repair.peer = Some(peer.clone());
    let (events, events_rx) = mpsc::unbounded_channel();
    let handle = spawn(repair, events_rx, a.shutdown.subscribe());
    let mut gaps = handle.gaps.clone();
    let Around {
        merger,
        tally,
        shutdown,
        _dir,
        ..
    } = a;
    let mut times = spawn_merger(merger, tally.clone());
    let gap = |start_ms, end_ms| ConnEvent::UncoveredBeyondBackfill {
        stream: STREAM.into(),
        partition: 1,
        start_ms,
        end_ms,
    };
    // Inside what the peer stored: closed at once, nothing requested.
    events.send(gap(s, s + 100 * SEC)).expect("the repair runs");
    let v = wait_gaps(&mut gaps, |v| {
        v.first().is_some_and(|g| g.state == GapState::Repaired)
    })
    .await;
    assert_eq!(v[0].chunks_done, v[0].chunks);
    assert_eq!(
        sim.stats(STREAM).unwrap().recovery_jobs,
        0,
        "nothing requested"
    );
    // Past its end (chunks of [+100 s, +210 s) with the margins): the first chunk is cut
    // to what the peer lacks, [+120 s, +160 s), which brings the line at +150 s; the
    // second is requested whole.
    events
        .send(gap(s + 110 * SEC, s + 200 * SEC))
        .expect("the repair runs");
    assert_eq!(next_merged(&mut times).await, s + 150 * SEC);
    tally.stored_through.store(1, Ordering::SeqCst);
    let v = wait_gaps(&mut gaps, |v| {
        v.len() == 2 && v[1].state == GapState::Repaired
    })
    .await;
    assert_eq!(v[1].chunks_done, v[1].chunks);
    assert_eq!(sim.stats(STREAM).unwrap().recovery_jobs, 2);
    shutdown.send_replace(true);
    handle.finish().await;
}

/// An interval both consumers of a pair missed is recovered by one of them: the one whose
/// gap comes first (start, then end) recovers it while the other holds back for as long as
/// the peer reports the gap open (within `PEER_RECOVERY_WAIT`); a young gap also waits for
/// a peer that is away over it and has not found its gap yet; what the peer never had
/// (before its coverage began) is never left to it.
#[test]
fn the_earlier_gap_of_the_pair_recovers_a_shared_interval() {
    let s = an_hour_ago();
    let at = |x: u64| s + x * SEC;
    let c = chunk(at(0), at(60), false, None);
    let ours = (at(10), at(50));
    let live_with = |gap: (u64, u64)| PeerStored {
        from_ms: s - 600 * SEC,
        until_ms: at(100),
        open_gaps: vec![gap],
        live: true,
    };
    let recovers = |peer: &PeerStored, young: bool, waited_ms: u64| {
        peer_recovers(peer, ours, &c, young, waited_ms)
    };
    assert!(
        recovers(&live_with((at(9), at(49))), true, 0),
        "the peer's starts first"
    );
    assert!(
        recovers(&live_with((at(9), at(49))), false, 60_000),
        "held while it is open"
    );
    assert!(
        !recovers(&live_with((at(11), at(49))), true, 0),
        "ours starts first"
    );
    assert!(
        !recovers(&live_with((at(10), at(51))), true, 0),
        "same start, ours ends first"
    );
    let waited = PEER_RECOVERY_WAIT.as_millis() as u64;
    assert!(
        !recovers(&live_with((at(9), at(49))), false, waited),
        "waited long enough"
    );
    let stored_all = PeerStored {
        open_gaps: Vec::new(),
        ..live_with((0, 0))
    };
    assert!(
        !recovers(&stored_all, true, 0),
        "nothing lacking: covered, not held"
    );

    let away = PeerStored {
        from_ms: s - 600 * SEC,
        until_ms: at(5),
        open_gaps: Vec::new(),
        live: false,
    };
    assert!(
        recovers(&away, true, 0),
        "a young gap waits for the away peer's report"
    );
    assert!(!recovers(&away, false, 30_000), "an old one does not");
    let started_later = PeerStored {
        from_ms: at(5),
        ..live_with((at(5), at(49)))
    };
    assert!(
        !recovers(&started_later, true, 0),
        "the peer never had what came before its coverage"
    );
}

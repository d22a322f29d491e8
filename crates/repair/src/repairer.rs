//! Gap repair of one stream partition: keeps its coverage ledger, and closes every gap
//! backfill could not reach with recovery requests.
//!
//! - The connections decide between backfill and recovery (they know when they reconnect
//!   and how long the partition was uncovered). A gap backfill cannot reach arrives here
//!   as [`ConnEvent::UncoveredBeyondBackfill`]; reconnects with backfill are counted as
//!   backfill repairs.
//! - A gap becomes recovery chunks over the gap plus a margin on each side, run at most
//!   `max_jobs_per_account` at once (the account's semaphore is shared by all partitions),
//!   in parallel with the live stream. Each finished chunk is marked in the ledger, so a
//!   restart resumes with the chunks still missing.
//! - Before the first chunk runs, the post ids stored since the gap's start minus the
//!   margin are saved next to the ledger (the *edge file*); once the live stream has run
//!   past the gap's end, so are those stored after it. Recovered copies of them are
//!   removed however old they are ([`crate::recovery`]).
//! - The ledger's `complete_until_ms`, and a chunk's `done`, move only behind the stored
//!   watermark: a coverage sample `C` (or a finished chunk) records how many lines each
//!   input had handed to the merger; once the merger has classified them all, the highest
//!   sequence number it gave out is what must be stored; once the store's contiguous
//!   watermark reaches it, `C` is durable (or the chunk done). No count stands in for
//!   another, so a crash at any point replays whatever was not stored.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tandem_conn::{ApiKind, ConnEvent, PartitionLiveness};
use tandem_core::metric as m;
use tandem_core::time::{rfc3339_ms, unix_ms_now};
use tandem_core::{ActivityId, GapState, GapView, Partition, Tally};
use tandem_merge::ShardControl;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::RepairConfig;
use crate::gate::{CoverageGate, Stored};
use crate::ledger::{self, Gap, PartitionLedger};
use crate::peer::{PEER_GRACE, PeerAnswer, PeerCoverage, PeerStored};
use crate::recovery::{ChunkOutcome, EdgeIds, RecoverySpec, recover};

/// Everything the repair of one partition needs.
#[derive(Debug)]
pub struct PartitionRepair {
    pub stream: Arc<str>,
    pub partition: Partition,
    /// The upstream API (its recovery retention and how a recovery request completes).
    pub api: ApiKind,
    pub config: RepairConfig,
    pub ledger_path: PathBuf,
    /// The ledger as loaded at start.
    pub ledger: PartitionLedger,
    pub liveness: Arc<PartitionLiveness>,
    pub tally: Arc<Tally>,
    /// The partition's merger, asked for the ids stored around a gap's edges.
    pub control: mpsc::UnboundedSender<ShardControl>,
    /// How to recover; `None` for streams without a recovery API (likes), whose gaps
    /// beyond backfill are unrecoverable. Dropped at shutdown: it holds a sender of the
    /// merger's channel.
    pub recovery: Option<Arc<RecoverySpec>>,
    /// The store's own record of what it holds, when another consumer writes to it too (a
    /// pair in two zones sharing JetStream): a recovered activity already there (the other
    /// zone stored it while this one was away) is dropped like an edge id.
    pub stored: Option<Arc<dyn StoredIdsSince>>,
    /// The pair's other consumer: what it stored is never requested from recovery.
    pub peer: Option<Arc<dyn PeerCoverage>>,
}

/// Reading back what a shared store holds failed (recovery then relies on the store's
/// duplicate window).
pub type ReadBackError = Box<dyn std::error::Error + Send + Sync>;

/// A store that can say which activities of this partition it holds, stored between two
/// times (Unix ms).
pub trait StoredIdsSince: Send + Sync + std::fmt::Debug {
    fn between(&self, since_ms: u64, until_ms: u64) -> ReadBack<'_>;
}

/// What [`StoredIdsSince::between`] answers, once read.
pub type ReadBack<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<HashSet<ActivityId>, ReadBackError>> + Send + 'a>,
>;

/// How long after a chunk's end the store is still searched for its activities: what the
/// other consumer stored late (its own backfill or recovery) within this is found too, and
/// the ids held in memory stay bounded by the chunk's length plus this.
const STORED_LATE_MS: u64 = 3_600_000;

/// The chunk's edge ids plus what the store already holds of `[start_ms, end_ms)`.
async fn with_stored(
    edge: EdgeIds,
    stored: &dyn StoredIdsSince,
    (start_ms, end_ms): (u64, u64),
    stream: &str,
    partition: Partition,
) -> EdgeIds {
    // A minute of slack for the clocks of the upstream and the store.
    let since = start_ms.saturating_sub(60_000);
    match stored.between(since, end_ms + STORED_LATE_MS).await {
        Ok(held) if !held.is_empty() => {
            tracing::info!(%stream, partition, ids = held.len(), "activities already in the store are skipped by recovery");
            Arc::new(edge.iter().copied().chain(held).collect())
        }
        Ok(_) => edge,
        Err(e) => {
            tracing::warn!(%stream, partition, error = %e, "cannot read what the store holds; recovery relies on its duplicate window");
            edge
        }
    }
}

/// A running repair.
#[derive(Debug)]
pub struct RepairHandle {
    /// The partition's gaps, for `/status`.
    pub gaps: watch::Receiver<Vec<GapView>>,
    /// Content time up to which the partition is stored (the ledger's complete-until),
    /// for the pair's other consumer.
    pub stored_until: watch::Receiver<u64>,
    drained: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RepairHandle {
    /// Writes the ledger one last time, after the sinks have drained (so that the coverage
    /// it records includes everything they stored), and waits until it is written.
    pub async fn finish(self) {
        let _ = self.drained.send(());
        let _ = self.task.await;
    }
}

/// Starts the repair of a partition. `events` carries the partition's connection events;
/// a `true` on `shutdown` stops it: running recoveries stop where they are (they resume
/// at the next start) and let go of the merger's channel, then the repair waits for
/// [`RepairHandle::finish`] to write the ledger.
pub fn spawn(
    repair: PartitionRepair,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    shutdown: watch::Receiver<bool>,
) -> RepairHandle {
    let span = tracing::info_span!("repair", stream = %repair.stream, partition = repair.partition);
    let (r, gaps) = Repairer::new(repair, shutdown.clone());
    let stored_until = r.stored_until.subscribe();
    let (drained, drained_rx) = oneshot::channel();
    RepairHandle {
        gaps,
        stored_until,
        drained,
        task: tokio::spawn(r.run(events, shutdown, drained_rx).instrument(span)),
    }
}

#[derive(Debug)]
struct Meters {
    open: Gauge,
    by_backfill: Counter,
    by_recovery: Counter,
    by_peer: Counter,
    unrecoverable: Counter,
    duration: Histogram,
}

impl Meters {
    /// The repair metrics of a partition; the counters are exported from the start.
    fn new(stream: &str, partition: Partition) -> Meters {
        let labels = vec![
            (m::STREAM, stream.to_owned()),
            (m::PARTITION, partition.to_string()),
        ];
        let with_kind = |kind: &str| {
            let mut l = labels.clone();
            l.push((m::KIND, kind.to_owned()));
            metrics::counter!(m::GAPS_REPAIRED, &l)
        };
        let meters = Meters {
            open: metrics::gauge!(m::GAPS_OPEN, &labels),
            by_backfill: with_kind("backfill"),
            by_recovery: with_kind("recovery"),
            by_peer: with_kind("covered_by_peer"),
            unrecoverable: metrics::counter!(m::GAPS_UNRECOVERABLE, &labels),
            duration: metrics::histogram!(m::GAP_REPAIR_DURATION, &labels),
        };
        meters.by_backfill.increment(0);
        meters.by_recovery.increment(0);
        meters.by_peer.increment(0);
        meters.unrecoverable.increment(0);
        meters
    }

    /// Counts and logs what became of a gap, in one place.
    fn emit(&self, event: GapEvent<'_>) {
        match event {
            GapEvent::Backfilled => self.by_backfill.increment(1),
            GapEvent::Recovered { gap, repair_secs } => {
                self.by_recovery.increment(1);
                self.duration.record(repair_secs);
                tracing::info!(
                    start = %rfc3339_ms(gap.start_ms), end = %rfc3339_ms(gap.end_ms),
                    repair_secs, "coverage gap repaired"
                );
            }
            GapEvent::CoveredByPeer { gap, repair_secs } => {
                self.by_peer.increment(1);
                self.duration.record(repair_secs);
                tracing::info!(
                    start = %rfc3339_ms(gap.start_ms), end = %rfc3339_ms(gap.end_ms),
                    repair_secs, "coverage gap closed: the pair's other consumer stored it"
                );
            }
            GapEvent::Unrecoverable { gap } => {
                self.unrecoverable.increment(1);
                tracing::error!(
                    start = %rfc3339_ms(gap.start_ms), end = %rfc3339_ms(gap.end_ms),
                    reason = gap.reason.as_deref().unwrap_or(""), "coverage gap cannot be repaired"
                );
            }
        }
    }
}

/// What became of a coverage gap.
enum GapEvent<'a> {
    /// A reconnect replayed it (backfill).
    Backfilled,
    /// Recovery brought it back and the store holds it.
    Recovered { gap: &'a Gap, repair_secs: f64 },
    /// The pair's other consumer had stored all of it: nothing was requested.
    CoveredByPeer { gap: &'a Gap, repair_secs: f64 },
    /// It cannot be repaired (likes, past retention, refused).
    Unrecoverable { gap: &'a Gap },
}

/// A chunk by its gap's start and its own start.
type ChunkKey = (u64, u64);

struct Repairer {
    r: PartitionRepair,
    shutdown: watch::Receiver<bool>,
    running: HashSet<ChunkKey>,
    tasks: HashMap<tokio::task::Id, ChunkKey>,
    jobs: JoinSet<(ChunkKey, ChunkOutcome)>,
    /// Edge ids of open gaps, loaded when a chunk of the gap first runs.
    edges: HashMap<u64, EdgeIds>,
    /// Coverage samples waiting for the store.
    gate: CoverageGate,
    /// Chunks whose lines all went to the merger, waiting for the store.
    settling: Vec<(ChunkKey, Stored)>,
    dirty: bool,
    views: watch::Sender<Vec<GapView>>,
    stored_until: watch::Sender<u64>,
    meters: Meters,
}

impl Repairer {
    /// The repair of a partition, not yet running, and the watch of its gaps.
    fn new(
        r: PartitionRepair,
        shutdown: watch::Receiver<bool>,
    ) -> (Repairer, watch::Receiver<Vec<GapView>>) {
        let (views, gaps) = watch::channel(Vec::new());
        let meters = Meters::new(&r.stream, r.partition);
        let stored_until = watch::Sender::new(r.ledger.complete_until_ms);
        let repairer = Repairer {
            stored_until,
            r,
            shutdown,
            running: HashSet::new(),
            tasks: HashMap::new(),
            jobs: JoinSet::new(),
            edges: HashMap::new(),
            gate: CoverageGate::default(),
            settling: Vec::new(),
            dirty: false,
            views,
            meters,
        };
        (repairer, gaps)
    }

    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<ConnEvent>,
        mut shutdown: watch::Receiver<bool>,
        drained: oneshot::Receiver<()>,
    ) {
        let open = self.r.ledger.open_gaps().count();
        if open > 0 {
            tracing::info!(gaps = open, "resuming the repair of open gaps");
        }
        self.publish();
        self.schedule();
        let every = Duration::from_millis(self.r.config.ledger_flush_ms.max(50));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(ev) = events.recv() => match ev {
                    ConnEvent::UncoveredBeyondBackfill { start_ms, end_ms, .. } => {
                        self.gap_found(start_ms, end_ms).await;
                    }
                    ConnEvent::Connected { backfill_minutes, .. } if backfill_minutes > 0 => {
                        self.meters.emit(GapEvent::Backfilled);
                    }
                    _ => {}
                },
                Some(done) = self.jobs.join_next_with_id() => self.chunk_ended(done),
                _ = tick.tick() => self.tick().await,
                () = tandem_conn::connection::stopped(&mut shutdown) => break,
            }
        }
        // Running chunks see the shutdown themselves; give them a moment to say so.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.jobs.is_empty() {
            match tokio::time::timeout_at(deadline, self.jobs.join_next_with_id()).await {
                Ok(Some(done)) => self.chunk_ended(done),
                _ => break,
            }
        }
        self.jobs.abort_all();
        while self.jobs.join_next().await.is_some() {}
        self.r.recovery = None;
        self.save();
        let _ = drained.await;
        self.settle();
        self.save();
    }

    /// A gap beyond backfill `[start_ms, end_ms)`.
    async fn gap_found(&mut self, start_ms: u64, end_ms: u64) {
        if end_ms <= start_ms {
            return;
        }
        tracing::warn!(
            start = %rfc3339_ms(start_ms), end = %rfc3339_ms(end_ms),
            secs = (end_ms - start_ms) as f64 / 1000.0, "coverage gap beyond backfill"
        );
        if !self.extend_latest_gap(start_ms, end_ms) {
            let gap = Gap {
                start_ms,
                end_ms,
                state: GapState::Open,
                found_ms: unix_ms_now(),
                repaired_ms: None,
                chunks: Vec::new(),
                reason: None,
                end_edge_saved: false,
            };
            if let Some(gap) = self.within_retention(gap) {
                self.plan(gap).await;
            }
        }
        self.save();
        self.publish();
        self.schedule();
    }

    /// A gap adjacent to the latest one (a reconnect that failed again) extends it, with
    /// chunks for the new part. False when there is no such gap.
    fn extend_latest_gap(&mut self, start_ms: u64, end_ms: u64) -> bool {
        let margin = self.r.config.margin_secs * 1000;
        let chunk_ms = self.r.config.chunk_secs * 1000;
        let Some(g) = self
            .r
            .ledger
            .gaps
            .iter_mut()
            .rev()
            .find(|g| g.state != GapState::Repaired)
            .filter(|g| start_ms >= g.start_ms && start_ms <= g.end_ms + margin)
        else {
            return false;
        };
        if g.state == GapState::Unrecoverable {
            g.end_ms = g.end_ms.max(end_ms);
            return true;
        }
        if end_ms <= g.end_ms {
            return true;
        }
        let (from, to) = (g.end_ms + margin, end_ms + margin);
        let gap_start = g.start_ms;
        g.end_ms = end_ms;
        g.end_edge_saved = false;
        let mut rest = ledger::chunks(from, to, chunk_ms);
        // A last chunk not started yet grows instead, while it stays within a chunk. One
        // received and waiting for the store is started: growing it would mark the new
        // part done without requesting it.
        if let Some(last) = g.chunks.last_mut()
            && !last.done
            && last.failed.is_none()
            && !self.running.contains(&(gap_start, last.start_ms))
            && !self
                .settling
                .iter()
                .any(|(k, _)| *k == (gap_start, last.start_ms))
            && to - last.start_ms <= chunk_ms
        {
            last.end_ms = to;
            rest.clear();
        }
        g.chunks.extend(rest);
        true
    }

    /// What of a new gap can still be recovered: a likes stream has no recovery, and the
    /// part older than the upstream's retention is lost (recorded as unrecoverable).
    fn within_retention(&mut self, mut gap: Gap) -> Option<Gap> {
        let retention_secs = self.r.config.retention_secs(self.r.api);
        let oldest = gap.found_ms.saturating_sub(retention_secs * 1000) + 60_000;
        let too_old = format!("older than the upstream's recovery retention ({retention_secs} s)");
        let lost = if self.r.recovery.is_none() {
            Some((gap.end_ms, "likes streams have no recovery".to_owned()))
        } else if gap.end_ms <= oldest {
            Some((gap.end_ms, too_old))
        } else if gap.start_ms < oldest {
            Some((oldest, too_old))
        } else {
            None
        };
        let Some((lost_until, reason)) = lost else {
            return Some(gap);
        };
        let lost = Gap {
            end_ms: lost_until,
            state: GapState::Unrecoverable,
            reason: Some(reason),
            ..gap.clone()
        };
        self.unrecoverable(&lost);
        self.r.ledger.gaps.push(lost);
        gap.start_ms = lost_until;
        (gap.start_ms < gap.end_ms).then_some(gap)
    }

    /// Saves the ids stored at the gap's start edge, then splits it into chunks.
    async fn plan(&mut self, mut gap: Gap) {
        let margin = self.r.config.margin_secs * 1000;
        let ids = self.posts_since(gap.start_ms.saturating_sub(margin)).await;
        let file = ledger::edge_ids_path(&self.r.ledger_path, gap.start_ms);
        if let Err(e) = ledger::append_edge_ids(&file, &ids) {
            tracing::error!(file = %file.display(), error = %e, "cannot save the ids at a gap's start edge; its margin may store duplicates");
        }
        let chunk_ms = self.r.config.chunk_secs * 1000;
        gap.chunks = ledger::chunks(
            gap.start_ms.saturating_sub(margin),
            gap.end_ms + margin,
            chunk_ms,
        );
        tracing::info!(
            chunks = gap.chunks.len(),
            edge_ids = ids.len(),
            "recovery planned"
        );
        self.r.ledger.gaps.push(gap);
    }

    fn unrecoverable(&self, gap: &Gap) {
        self.meters.emit(GapEvent::Unrecoverable { gap });
    }

    /// Post ids the merger remembers created at or after `since_ms`.
    async fn posts_since(&self, since_ms: u64) -> Vec<ActivityId> {
        let (reply, answer) = oneshot::channel();
        if self
            .r
            .control
            .send(ShardControl::PostsSince { since_ms, reply })
            .is_err()
        {
            return Vec::new();
        }
        match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(ids)) => ids,
            _ => {
                tracing::warn!("the merger did not answer with the ids at a gap's edge");
                Vec::new()
            }
        }
    }

    /// Starts chunks of open gaps, oldest first, up to the job limit. Nothing starts once
    /// stopping: a chunk ended by the shutdown resumes at the next start.
    fn schedule(&mut self) {
        if *self.shutdown.borrow() {
            return;
        }
        let limit = self.r.config.max_jobs_per_account;
        let waiting_for_peer = self.leave_to_peer();
        let mut wanted = Vec::new();
        for g in self.r.ledger.open_gaps() {
            for c in &g.chunks {
                let key = (g.start_ms, c.start_ms);
                if !c.done
                    && c.failed.is_none()
                    && !self.running.contains(&key)
                    && !self.settling.iter().any(|(k, _)| *k == key)
                    && !waiting_for_peer.contains(&key)
                {
                    wanted.push((key, c.end_ms));
                }
            }
        }
        let Some(spec) = self.r.recovery.clone() else {
            return;
        };
        for (key, end_ms) in wanted {
            if self.running.len() >= limit {
                break;
            }
            let mut edge = self.edge_ids(key.0);
            let spec = spec.clone();
            let shutdown = self.shutdown.clone();
            let stored = self.r.stored.clone();
            let (stream, partition) = (self.r.stream.clone(), self.r.partition);
            let span = tracing::info_span!("recovery", start = %rfc3339_ms(key.1));
            let job = async move {
                if let Some(stored) = stored {
                    edge = with_stored(edge, &*stored, (key.1, end_ms), &stream, partition).await;
                }
                let outcome = recover(&spec, key.1, end_ms, edge, shutdown).await;
                (key, outcome)
            };
            // A child of the repair's span: the chunk's lines carry stream and partition.
            let handle = self.jobs.spawn(job.instrument(span.or_current()));
            self.tasks.insert(handle.id(), key);
            self.running.insert(key);
        }
    }

    /// Takes from the chunks not yet running what the pair's other consumer stored: a
    /// chunk it stored whole is done (`by_peer`), one it stored at one end is cut to the
    /// rest. Returns the chunks to hold back a while: the peer is live and its stored
    /// coverage has not reached them yet.
    fn leave_to_peer(&mut self) -> HashSet<ChunkKey> {
        let mut hold = HashSet::new();
        let now = unix_ms_now();
        let peer = match self.r.peer.as_ref().map(|p| p.stored()) {
            None | Some(PeerAnswer::Alone) => return hold,
            Some(PeerAnswer::Stored(peer)) => peer,
            Some(PeerAnswer::NotYet) => {
                // The coordination is starting: young gaps wait for the peer's report.
                for g in self.r.ledger.open_gaps() {
                    if now.saturating_sub(g.found_ms) < PEER_GRACE.as_millis() as u64 {
                        hold.extend(g.chunks.iter().map(|c| (g.start_ms, c.start_ms)));
                    }
                }
                return hold;
            }
        };
        let mut covered = Vec::new();
        for g in self
            .r
            .ledger
            .gaps
            .iter_mut()
            .filter(|g| g.state == GapState::Open)
        {
            let waited_ms = now.saturating_sub(g.found_ms);
            let young = waited_ms < PEER_GRACE.as_millis() as u64;
            let gap = (g.start_ms, g.end_ms);
            for c in g
                .chunks
                .iter_mut()
                .filter(|c| !c.done && c.failed.is_none())
            {
                let key = (g.start_ms, c.start_ms);
                if self.running.contains(&key) || self.settling.iter().any(|(k, _)| *k == key) {
                    continue;
                }
                match peer.uncovered(c.start_ms, c.end_ms)[..] {
                    [] => {
                        c.by_peer = true;
                        covered.push(key);
                    }
                    [(s, e)] if (s, e) != (c.start_ms, c.end_ms) => {
                        tracing::info!(
                            start = %rfc3339_ms(s), end = %rfc3339_ms(e),
                            "the pair's other consumer stored part of a recovery chunk; the rest is requested"
                        );
                        c.start_ms = s;
                        c.end_ms = e;
                        self.dirty = true;
                    }
                    _ => {}
                }
                let key = (g.start_ms, c.start_ms);
                if c.by_peer {
                    continue;
                }
                // The peer's stored coverage is moving and has not reached the chunk yet.
                let catching_up = young && peer.live && peer.until_ms < c.end_ms;
                if catching_up || peer_recovers(&peer, gap, c, young, waited_ms) {
                    hold.insert(key);
                }
            }
        }
        for key in covered {
            self.chunk_settled(key, Ok(()));
        }
        hold
    }

    fn edge_ids(&mut self, gap_start: u64) -> EdgeIds {
        let path = ledger::edge_ids_path(&self.r.ledger_path, gap_start);
        self.edges
            .entry(gap_start)
            .or_insert_with(|| {
                let ids = ledger::load_edge_ids(&path).unwrap_or_else(|e| {
                    tracing::error!(file = %path.display(), error = %e, "cannot read a gap's edge ids");
                    Vec::new()
                });
                Arc::new(ids.into_iter().collect())
            })
            .clone()
    }

    fn chunk_ended(
        &mut self,
        done: Result<(tokio::task::Id, (ChunkKey, ChunkOutcome)), tokio::task::JoinError>,
    ) {
        let (key, outcome) = match done {
            Ok((id, (key, outcome))) => {
                self.tasks.remove(&id);
                (key, outcome)
            }
            Err(e) => {
                let key = self.tasks.remove(&e.id());
                tracing::error!(error = %e, "a recovery task failed");
                if let Some(key) = key {
                    self.running.remove(&key);
                    self.schedule();
                }
                return;
            }
        };
        self.running.remove(&key);
        match outcome {
            ChunkOutcome::Completed {
                activities,
                requests,
            } => {
                tracing::info!(
                                        start = %rfc3339_ms(key.1), activities, requests,
                    "recovery chunk received; done once stored"
                );
                self.settling.push((key, Stored::ticket(&self.r.tally)));
                self.settle();
            }
            ChunkOutcome::Unrecoverable(e) => {
                tracing::error!(
                                        start = %rfc3339_ms(key.1), status = e.status, error = %e, "recovery chunk refused"
                );
                // The ledger keeps the reason as text: it outlives the process.
                let status = e.status.map(|s| format!("{s}: ")).unwrap_or_default();
                self.chunk_settled(key, Err(format!("{status}{}", e.message)));
            }
            ChunkOutcome::Shutdown => {}
        }
        self.schedule();
    }

    /// A chunk is stored (`Ok`) or refused for good (`Err`): marks it, and its gap once
    /// every chunk ended.
    fn chunk_settled(&mut self, key: ChunkKey, result: Result<(), String>) {
        let Some(g) = self
            .r
            .ledger
            .gaps
            .iter_mut()
            .find(|g| g.start_ms == key.0 && g.state == GapState::Open)
        else {
            return;
        };
        let Some(c) = g.chunks.iter_mut().find(|c| c.start_ms == key.1) else {
            return;
        };
        match result {
            Ok(()) => {
                c.done = true;
                tracing::info!(
                                        start = %rfc3339_ms(c.start_ms), end = %rfc3339_ms(c.end_ms),
                    "recovery chunk stored"
                );
            }
            Err(reason) => c.failed = Some(reason),
        }
        let all_done = g.chunks.iter().all(|c| c.done);
        let ended = g.chunks.iter().all(|c| c.done || c.failed.is_some());
        if all_done {
            let now = unix_ms_now();
            g.state = GapState::Repaired;
            g.repaired_ms = Some(now);
            let repair_secs = now.saturating_sub(g.found_ms) as f64 / 1000.0;
            self.meters.emit(if g.chunks.iter().all(|c| c.by_peer) {
                GapEvent::CoveredByPeer {
                    gap: g,
                    repair_secs,
                }
            } else {
                GapEvent::Recovered {
                    gap: g,
                    repair_secs,
                }
            });
        } else if ended {
            g.state = GapState::Unrecoverable;
            g.reason = g.chunks.iter().find_map(|c| c.failed.clone());
            let gap = g.clone();
            self.unrecoverable(&gap);
        }
        if all_done || ended {
            let start = key.0;
            self.edges.remove(&start);
            let file = ledger::edge_ids_path(&self.r.ledger_path, start);
            let _ = std::fs::remove_file(file);
        }
        self.save();
        self.publish();
    }

    /// Moves the durable coverage on, saves edge ids past gaps' ends, writes the ledger.
    async fn tick(&mut self) {
        if self.r.ledger.complete_until_ms == 0
            && let Some(origin) = self.r.liveness.origin_ms()
        {
            // A first run: nothing before its first connect is ours to store, and what
            // it receives from there on must come back if it dies before storing it.
            self.r.ledger.complete_until_ms = origin;
            self.stored_until.send_replace(origin);
            self.dirty = true;
        }
        let complete = self.r.liveness.complete_until();
        // The ticket is taken after `complete` was read: the lines behind it were handed
        // to the merger before it moved.
        self.gate.sample(complete, &self.r.tally);
        self.settle();
        self.schedule();

        let margin = self.r.config.margin_secs * 1000;
        let due: Vec<(u64, u64)> = self
            .r
            .ledger
            .open_gaps()
            .filter(|g| !g.end_edge_saved && complete >= g.end_ms + 2 * margin)
            .map(|g| (g.start_ms, g.end_ms))
            .collect();
        for (start, end) in due {
            let ids: Vec<ActivityId> = self
                .posts_since(end.saturating_sub(margin))
                .await
                .into_iter()
                .filter(|id| id.created_unix_ms().is_some_and(|t| t <= end + 2 * margin))
                .collect();
            let file = ledger::edge_ids_path(&self.r.ledger_path, start);
            match ledger::append_edge_ids(&file, &ids) {
                Ok(()) => {
                    self.edges.remove(&start);
                    if let Some(g) = self.r.ledger.gaps.iter_mut().find(|g| g.start_ms == start) {
                        g.end_edge_saved = true;
                    }
                    self.dirty = true;
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "cannot save the ids at a gap's end edge")
                }
            }
        }

        let before = self.r.ledger.gaps.len();
        let keep_from =
            unix_ms_now().saturating_sub(self.r.config.retention_secs(self.r.api) * 1000);
        self.r.ledger.prune(keep_from);
        if self.r.ledger.gaps.len() != before {
            self.dirty = true;
            self.publish();
        }
        if self.dirty {
            self.save();
        }
    }

    /// Takes the coverage samples and finished chunks the store now holds.
    fn settle(&mut self) {
        let tally = self.r.tally.clone();
        if let Some(complete) = self.gate.advance(&tally)
            && complete > self.r.ledger.complete_until_ms
        {
            self.r.ledger.complete_until_ms = complete;
            self.stored_until.send_replace(complete);
            self.dirty = true;
        }
        let mut stored = Vec::new();
        self.settling.retain_mut(|(key, stage)| {
            let done = stage.advance(&tally);
            if done {
                stored.push(*key);
            }
            !done
        });
        for key in stored {
            self.chunk_settled(key, Ok(()));
        }
    }

    fn save(&mut self) {
        let (ledger, path) = (&self.r.ledger, &self.r.ledger_path);
        match tandem_core::blocking_io(|| ledger.save(path)) {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::error!(file = %self.r.ledger_path.display(), error = %e, "cannot write the coverage ledger")
            }
        }
    }

    fn publish(&self) {
        let open = self.r.ledger.open_gaps().count();
        self.meters.open.set(open as f64);
        let views = self.r.ledger.gaps.iter().map(Gap::view).collect();
        self.views.send_replace(views);
    }
}

/// How long a gap waits for the peer to recover the same interval (it reports the gap open
/// while it works on it) before this consumer requests it itself.
const PEER_RECOVERY_WAIT: Duration = Duration::from_secs(300);

/// Whether the peer, which lacks what the chunk `c` of `gap` still needs too, is the one
/// to recover it, so that each interval both consumers missed is requested once across the
/// pair. Each consumer compares its own gap with the peer's open gap over the same
/// interval, `(start, end)`, and the earlier one recovers: both see the same two gaps, so
/// exactly one of them holds back (equal gaps: both recover, and the store's duplicate
/// check removes the copies). A peer that is away over the interval (not live, its coverage
/// short of it) has not found its gap yet: a young gap waits for its report. A held chunk
/// closes as `covered_by_peer` once the peer stored it, or is requested here when the peer
/// goes quiet or after [`PEER_RECOVERY_WAIT`].
fn peer_recovers(
    peer: &PeerStored,
    gap: (u64, u64),
    c: &ledger::Chunk,
    young: bool,
    waited_ms: u64,
) -> bool {
    if waited_ms >= PEER_RECOVERY_WAIT.as_millis() as u64 {
        return false;
    }
    let lacking = peer.uncovered(c.start_ms, c.end_ms);
    !lacking.is_empty()
        && lacking.iter().all(|&(s, e)| {
            let goes_first = peer
                .open_gaps
                .iter()
                .any(|&(ps, pe)| ps < e && s < pe && (ps, pe) < gap);
            let yet_to_find = young && !peer.live && s >= peer.until_ms;
            s >= peer.from_ms && (goes_first || yet_to_find)
        })
}

#[cfg(test)]
mod tests;

//! The pair of consumers as the stages see it: the coordination ([`tandem_pair::Pair`])
//! adapted into what each stage asks — the connect budget shared across the pair
//! ([`SharedBudget`]), recovery jobs leased across it ([`JobSlots`]), the peer's stored
//! coverage for gap repair ([`PeerCoverage`]), the peer's latest activity for the
//! connections' silence judgement — and this consumer's progress for the peer's beacons.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_conn::{PartitionLiveness, SharedBudget};
use tandem_core::{GapState, GapView, Partition};
use tandem_pair::{Pair, PartitionId, Progress};
use tandem_repair::{JobPermit, JobSlots, PeerAnswer, PeerCoverage, PeerStored};
use tokio::sync::{Semaphore, watch};

/// What this consumer reports of one partition, read when a beacon is due.
#[derive(Debug)]
pub(crate) struct Probe {
    pub liveness: Arc<PartitionLiveness>,
    /// The ledger's complete-until (stored coverage).
    pub stored_until: watch::Receiver<u64>,
    pub gaps: watch::Receiver<Vec<GapView>>,
    /// Where this run's stored coverage began: the ledger's complete-until at start, or
    /// the first connect of a run without history (0 until known).
    pub stored_from_ms: u64,
}

impl Probe {
    fn progress(&self) -> Progress {
        let stored_from_ms = match self.stored_from_ms {
            0 => self.liveness.origin_ms().unwrap_or(0),
            ms => ms,
        };
        Progress {
            latest_ms: self.liveness.latest_ms(),
            stored_until_ms: *self.stored_until.borrow(),
            stored_from_ms,
            live: self.liveness.live_count(),
            open_gaps: (self.gaps.borrow().iter())
                .filter(|g| g.state != GapState::Repaired)
                .map(|g| (g.start_ms, g.end_ms))
                .collect(),
        }
    }
}

/// Every partition's probe, filled as the partitions are wired.
pub(crate) type Probes = Arc<Mutex<HashMap<PartitionId, Probe>>>;

/// This consumer's progress on a partition, for its beacon (nothing known yet: empty).
pub(crate) fn local_progress(
    probes: &Probes,
) -> Arc<dyn Fn(&PartitionId) -> Progress + Send + Sync> {
    let probes = probes.clone();
    Arc::new(move |id| {
        (probes.lock().expect("probes lock").get(id))
            .map(Probe::progress)
            .unwrap_or_default()
    })
}

/// Tells each partition's connections, every `every`, the latest activity the peer
/// received (their silence is judged against it), until `shutdown`.
pub(crate) async fn relay_peer_latest(
    pair: Pair,
    probes: Probes,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tandem_conn::connection::stopped(&mut shutdown) => return,
        }
        let probes: Vec<(PartitionId, Arc<PartitionLiveness>)> =
            (probes.lock().expect("probes lock").iter())
                .map(|(id, p)| (id.clone(), p.liveness.clone()))
                .collect();
        for (id, liveness) in probes {
            let latest = (pair.peers(&id).iter())
                .map(|p| p.progress.latest_ms)
                .filter(|&ms| ms > 0)
                .max();
            liveness.set_peer_latest(latest);
        }
    }
}

/// The peer's stored coverage of one partition.
#[derive(Debug)]
pub(crate) struct PairPeer {
    pub pair: Pair,
    pub id: PartitionId,
    /// When this consumer started: until a peer report arrives (or the grace passes), a
    /// gap waits for one instead of going to recovery at once.
    pub started: tokio::time::Instant,
}

impl PeerCoverage for PairPeer {
    fn stored(&self) -> PeerAnswer {
        let starting = self.started.elapsed() < tandem_repair::peer::PEER_GRACE;
        let peers = self.pair.peers(&self.id);
        if !self.pair.coordinated() || peers.is_empty() {
            return if starting {
                PeerAnswer::NotYet
            } else {
                PeerAnswer::Alone
            };
        }
        // The peer that stored furthest (a pair has one; more would be a larger group).
        // A peer that has stored nothing yet (a start not connected so far) is still there
        // and lacks what it did not store: an empty coverage, not `Alone`, so that an
        // interval both missed is recovered by one of them.
        let best = (peers.into_iter())
            .map(|p| p.progress)
            .max_by_key(|p| p.stored_until_ms);
        match best {
            Some(p) => {
                // An unknown start (0) claims nothing before the stored watermark.
                let from_ms = match p.stored_from_ms {
                    0 => p.stored_until_ms,
                    ms => ms,
                };
                PeerAnswer::Stored(PeerStored {
                    from_ms,
                    until_ms: p.stored_until_ms.max(from_ms),
                    open_gaps: p.open_gaps,
                    live: p.live > 0,
                })
            }
            None => PeerAnswer::Alone,
        }
    }
}

/// A stream's connection requests, counted across the pair.
#[derive(Debug)]
pub(crate) struct PairBudget {
    pub pair: Pair,
    pub stream: Arc<str>,
    pub limit: usize,
    pub window: Duration,
}

/// How long a shared operation (a connection request, a recovery job) of a consumer that
/// has just started waits for the pair's first verdict before it falls back to its local
/// share: a beacon round or two.
const FIRST_VERDICT_WAIT: Duration = Duration::from_secs(5);

impl SharedBudget for PairBudget {
    fn take(&self, urgent: bool) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            self.pair.decided(FIRST_VERDICT_WAIT).await;
            self.pair
                .connect_token(&self.stream, self.limit, self.window, urgent)
                .await
                .is_ok()
        })
    }
}

/// An account's recovery jobs, leased across the pair: at most `slots` at once in both
/// zones. While the pair cannot be asked, this consumer keeps to its static share (half,
/// at least one).
#[derive(Debug)]
pub(crate) struct PairJobs {
    pub pair: Pair,
    pub account: String,
    pub slots: usize,
    /// This process's own limit.
    pub local: Arc<Semaphore>,
    /// The static share, used while coordination is lost.
    pub share: Arc<Semaphore>,
}

impl PairJobs {
    pub(crate) fn new(
        pair: Pair,
        account: String,
        local: Arc<Semaphore>,
        slots: usize,
    ) -> PairJobs {
        PairJobs {
            pair,
            account,
            slots,
            local,
            share: Arc::new(Semaphore::new(slots.div_ceil(2))),
        }
    }
}

impl JobSlots for PairJobs {
    fn acquire(&self) -> Pin<Box<dyn Future<Output = Option<JobPermit>> + Send + '_>> {
        Box::pin(async move {
            let local = self.local.clone().acquire_owned().await.ok()?;
            self.pair.decided(FIRST_VERDICT_WAIT).await;
            match self.pair.job_lease(&self.account, self.slots).await {
                Ok(lease) => Some(JobPermit::new((local, lease))),
                Err(_) => {
                    tracing::warn!(account = %self.account, "recovery job without the pair's lease (coordination lost): within this zone's share");
                    let share = self.share.clone().acquire_owned().await.ok()?;
                    Some(JobPermit::new((local, share)))
                }
            }
        })
    }
}

/// Which consumer of the pair writes each partition of a Kafka sink: the holder of the
/// partition's writer lease.
#[derive(Debug)]
pub(crate) struct PairWriters {
    leases: HashMap<(String, Partition), tandem_pair::WriterLease>,
    fence: Duration,
}

impl PairWriters {
    /// Starts taking the writer leases of `partitions` (stream name, partition) of `sink`.
    pub(crate) fn start(
        pair: &tandem_pair::Pair,
        sink: &str,
        partitions: impl IntoIterator<Item = (String, Partition)>,
    ) -> PairWriters {
        let leases: HashMap<_, _> = partitions
            .into_iter()
            .map(|(s, p)| {
                let lease = pair.writer_lease(sink, &s, p);
                ((s, p), lease)
            })
            .collect();
        let fence = (leases.values().map(tandem_pair::WriterLease::fence))
            .min()
            .unwrap_or(Duration::from_secs(1));
        PairWriters { leases, fence }
    }
}

impl tandem_sink::WriterGate for PairWriters {
    fn writer_since(&self, stream: &str, partition: Partition) -> Option<tokio::time::Instant> {
        self.leases
            .get(&(stream.to_owned(), partition))
            .and_then(tandem_pair::WriterLease::held_since)
    }

    fn fence(&self) -> Duration {
        self.fence
    }
}

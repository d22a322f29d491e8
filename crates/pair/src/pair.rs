//! The [`Pair`] handle and the state its tasks share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tandem_sink::NatsConfig;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::PairConfig;
use crate::events::{CoordinationLost, CoordinationStopped, CoordinationUp, Meters, Op, OpFailed};
use crate::keys::{self, BeaconKey};
use crate::lease::{self, JobLease};
use crate::progress::{PartitionId, PeerProgress, Progress};
use crate::{beacon, tokens};

/// How long one bucket operation may take before the bucket counts as unreachable:
/// a caller never waits on a dead server for longer.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// What this consumer reports about a partition, asked at every beacon.
pub type LocalProgress = Arc<dyn Fn(&PartitionId) -> Progress + Send + Sync>;

/// Whether the pair is coordinated, published on a `watch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairState {
    /// This consumer's beacons are being stored in the bucket.
    pub coordinated: bool,
    /// Why coordination is unavailable (the latest failure); `None` while coordinated or
    /// before the first attempt ended.
    pub last_error: Option<String>,
}

/// Coordination is unavailable: the bucket cannot be reached (or the pair stopped). The
/// caller falls back to local behaviour: its own share of the recovery jobs and of the
/// connect budget. Nothing is lost by that; the pair only does some work twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pair coordination is unavailable")]
pub struct Lost;

/// This consumer's side of the pair's coordination. Cheap to clone.
#[derive(Clone)]
pub struct Pair {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("consumer_id", &self.inner.cfg.consumer_id)
            .field("bucket", &self.inner.cfg.bucket)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Pair {
    /// Starts the coordination task; never fails: until the bucket is reachable,
    /// `state().coordinated` is false. A configuration with [`PairConfig::problems`]
    /// never coordinates (its state says why). Must be called inside a tokio runtime.
    ///
    /// `partitions` are the partitions this consumer publishes beacons for; `local` tells
    /// their progress, asked at every beacon. A `true` on `shutdown` stops the beacons and
    /// the renewal of held leases (they expire after `lease_ttl_ms`).
    pub fn start(
        cfg: PairConfig,
        nats: NatsConfig,
        token: Option<String>,
        partitions: Vec<PartitionId>,
        local: LocalProgress,
        shutdown: watch::Receiver<bool>,
    ) -> Pair {
        let problems = cfg.problems();
        let inner = Arc::new(Inner {
            meters: Meters::register(),
            cfg,
            nats: OnceLock::new(),
            kv: RwLock::new(None),
            connects: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            state: watch::Sender::new(PairState {
                coordinated: false,
                last_error: None,
            }),
            shutdown: shutdown.clone(),
        });
        let span = tracing::info_span!("pair", consumer = %inner.cfg.consumer_id);
        if problems.is_empty() {
            let task = beacon::run(inner.clone(), nats, token, partitions, local, shutdown);
            tokio::spawn(task.instrument(span));
        } else {
            let why = problems
                .iter()
                .map(|(field, why)| format!("pair.{field}: {why}"))
                .collect::<Vec<_>>()
                .join("; ");
            span.in_scope(|| {
                tracing::error!(problems = %why, "pair coordination cannot start");
                inner.lost(&format!("invalid configuration: {why}"));
            });
        }
        Pair { inner }
    }

    pub fn consumer_id(&self) -> &str {
        &self.inner.cfg.consumer_id
    }

    /// Whether the pair is coordinated, as it changes.
    pub fn state(&self) -> watch::Receiver<PairState> {
        self.inner.state.subscribe()
    }

    pub fn coordinated(&self) -> bool {
        self.inner.coordinated()
    }

    /// Waits, at most `within`, until coordination is decided: up, or failed at least once
    /// (or stopped). A consumer that has just started asks this before its first shared
    /// operation: until its first beacon round ends it is neither coordinated nor lost, and
    /// falling back to the local share then would spend a restart's requests outside the
    /// pair's budget.
    pub async fn decided(&self, within: Duration) {
        let mut state = self.inner.state.subscribe();
        let decided = state.wait_for(|s| s.coordinated || s.last_error.is_some());
        let _ = tokio::time::timeout(within, decided).await;
    }

    /// The freshest beacon of each other consumer for this partition, younger than
    /// `peer_stale_ms`, in the order of their ids.
    pub fn peers(&self, id: &PartitionId) -> Vec<PeerProgress> {
        let stale = Duration::from_millis(self.inner.cfg.peer_stale_ms);
        let now = Instant::now();
        let peers = lock(&self.inner.peers);
        let Some(heard) = peers.get(&(keys::escape(&id.stream), id.partition)) else {
            return Vec::new();
        };
        let mut out: Vec<PeerProgress> = heard
            .iter()
            .filter_map(|(consumer, h)| {
                let age = now.saturating_duration_since(h.at);
                (age < stale).then(|| PeerProgress {
                    consumer: consumer.clone(),
                    progress: h.progress.clone(),
                    age,
                })
            })
            .collect();
        out.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        out
    }

    /// A recovery-job lease on one of `slots` slots of `account`, shared by the pair:
    /// waits while all are held; renews itself every `lease_ttl_ms / 3` while the
    /// returned guard lives; dropping it deletes the key (best effort). `Err(Lost)` when
    /// the bucket is unreachable (within about 2 s), so the caller falls back to a local
    /// share.
    pub async fn job_lease(&self, account: &str, slots: usize) -> Result<JobLease, Lost> {
        lease::acquire(&self.inner, account, slots).await
    }

    /// The writer lease of `stream`'s `partition` into `sink`: taken as soon as it is free
    /// and renewed from then on, in a task of its own, until shutdown.
    pub fn writer_lease(&self, sink: &str, stream: &str, partition: u32) -> crate::WriterLease {
        crate::writer::start(&self.inner, sink, stream, partition)
    }

    /// One connection request of `stream` within a limit shared by the pair: `limit`
    /// requests per `window` (sliding: each request creates a token key in the bucket
    /// `<bucket>_connects_<stream>`, whose `max_age` is `window`, and tokens are never
    /// deleted). Waits until a token is free. A non-urgent request leaves the last
    /// `max(1, limit / 5)` tokens (never all of them) to urgent ones: partitions with no
    /// live connection go first. The stream's bucket is created with the `window` of its
    /// first request. `Err(Lost)` when the bucket is unreachable.
    pub async fn connect_token(
        &self,
        stream: &str,
        limit: usize,
        window: Duration,
        urgent: bool,
    ) -> Result<(), Lost> {
        tokens::take(&self.inner, stream, limit, window, urgent).await
    }
}

/// A peer's beacon and when it arrived here.
#[derive(Debug)]
struct Heard {
    progress: Progress,
    at: Instant,
}

/// The state the handle, the beacon task, the watch and the lease renewals share.
pub(crate) struct Inner {
    pub(crate) cfg: PairConfig,
    pub(crate) meters: Meters,
    /// The client and its JetStream context, once the first connection attempt ended.
    nats: OnceLock<(async_nats::Client, jetstream::Context)>,
    /// The pair's bucket, once opened.
    kv: RwLock<Option<kv::Store>>,
    /// The connect-budget buckets opened so far, by stream.
    connects: Mutex<HashMap<String, kv::Store>>,
    /// Other consumers' latest beacons by (escaped stream, partition), then consumer.
    peers: Mutex<HashMap<(String, u32), HashMap<String, Heard>>>,
    state: watch::Sender<PairState>,
    shutdown: watch::Receiver<bool>,
}

impl Inner {
    pub(crate) fn stopped(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn coordinated(&self) -> bool {
        self.state.borrow().coordinated
    }

    pub(crate) fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    pub(crate) fn set_nats(&self, client: async_nats::Client) -> &jetstream::Context {
        let js = jetstream::ContextBuilder::new()
            .timeout(OP_TIMEOUT)
            .build(client.clone());
        &self.nats.get_or_init(|| (client, js)).1
    }

    pub(crate) fn js(&self) -> Option<&jetstream::Context> {
        self.nats.get().map(|(_, js)| js)
    }

    /// Whether the client is connected now: an operation while it is not would only
    /// wait for its timeout, and be sent late (after the caller gave up) on reconnect.
    pub(crate) fn connected(&self) -> bool {
        self.nats.get().is_some_and(|(client, _)| {
            client.connection_state() == async_nats::connection::State::Connected
        })
    }

    /// The pair's bucket if opened, reachable or not.
    pub(crate) fn bucket(&self) -> Option<kv::Store> {
        self.kv
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_bucket(&self, store: kv::Store) {
        *self.kv.write().unwrap_or_else(PoisonError::into_inner) = Some(store);
    }

    /// Opens the buckets again at their next use: a server that lost its store (a new
    /// cluster, a deleted bucket) gets them created again.
    pub(crate) fn forget_buckets(&self) {
        *self.kv.write().unwrap_or_else(PoisonError::into_inner) = None;
        lock(&self.connects).clear();
    }

    /// The pair's bucket for an operation now, or `Lost`.
    pub(crate) fn reachable_bucket(&self) -> Result<kv::Store, Lost> {
        if self.stopped() || !self.connected() {
            return Err(Lost);
        }
        self.bucket().ok_or(Lost)
    }

    pub(crate) fn connects_bucket(&self, stream: &str) -> Option<kv::Store> {
        lock(&self.connects).get(stream).cloned()
    }

    pub(crate) fn set_connects_bucket(&self, stream: &str, store: kv::Store) {
        lock(&self.connects).insert(stream.to_owned(), store);
    }

    /// Records a beacon from the watch; true when it is this consumer's own.
    pub(crate) fn heard(&self, entry: &kv::Entry) -> bool {
        let Some(key) = BeaconKey::parse(&entry.key) else {
            return false;
        };
        if key.consumer() == self.cfg.consumer_id {
            return true;
        }
        let BeaconKey::Partition {
            consumer,
            stream,
            partition,
        } = key
        else {
            return false;
        };
        let mut peers = lock(&self.peers);
        let heard = peers.entry((stream.to_owned(), partition)).or_default();
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Progress>(&entry.value) {
                Ok(progress) => {
                    heard.insert(
                        consumer.to_owned(),
                        Heard {
                            progress,
                            at: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    tracing::debug!(key = %entry.key, error = %e, "unreadable peer beacon ignored");
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                heard.remove(consumer);
            }
        }
        false
    }

    /// A beacon round stored every beacon.
    pub(crate) fn succeeded(&self) {
        let changed = self.state.send_if_modified(|s| {
            let was = s.coordinated;
            s.coordinated = true;
            s.last_error = None;
            !was
        });
        if changed {
            CoordinationUp.emit(&self.meters);
        }
    }

    /// A bucket operation failed; a failed beacon means coordination is lost.
    pub(crate) fn failed(&self, op: Op, error: &str) {
        OpFailed { op, error }.emit(&self.meters);
        if op == Op::Beacon {
            self.lost(error);
        }
    }

    /// Coordination is unavailable for this reason.
    pub(crate) fn lost(&self, error: &str) {
        let mut announce = false;
        self.state.send_if_modified(|s| {
            // The first failure is announced too, when coordination was never up.
            announce = s.coordinated || s.last_error.is_none();
            s.coordinated = false;
            let changed = announce || s.last_error.as_deref() != Some(error);
            s.last_error = Some(error.to_owned());
            changed
        });
        if announce {
            CoordinationLost { error }.emit(&self.meters);
        }
    }

    /// Coordination ended at shutdown.
    pub(crate) fn stop(&self) {
        self.state.send_modify(|s| {
            s.coordinated = false;
            s.last_error = Some("stopped".to_owned());
        });
        CoordinationStopped.emit(&self.meters);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Resolves once `true` is (or has been) sent on the shutdown channel; never when the
/// sender goes away without it.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

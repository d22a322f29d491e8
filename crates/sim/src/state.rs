//! The simulator's shared state: streams, their partitions and live connections, connect
//! accounting, recovery jobs and the fault log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use tandem_core::time::unix_ms_now;
use tandem_core::{ActivityId, DedupKey, LineKind, identify};
use tokio::sync::watch;

use crate::SimError;
use crate::config::{RateProfile, StreamConfig};
use crate::corpus::Corpus;
use crate::fault::{Command, Control, Disconnect, Fault, RejectRule, Target};
use crate::generate::Generator;
use crate::log::{PartitionLog, TruthRecord};

/// What kind of request a connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    Live,
    Recovery,
}

/// One open streaming response.
#[derive(Debug)]
pub(crate) struct ConnEntry {
    pub id: u64,
    pub partition: u32,
    pub client: SocketAddr,
    pub kind: ConnectionKind,
    pub opened_ms: u64,
    pub control: Control,
    pub bytes_sent: AtomicU64,
    pub activities_sent: AtomicU64,
}

/// A connection as reported by the handle and `/admin/connections`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub stream: String,
    pub partition: u32,
    pub client: SocketAddr,
    pub kind: ConnectionKind,
    pub opened_ms: u64,
    pub bytes_sent: u64,
    pub activities_sent: u64,
}

#[derive(Debug)]
pub(crate) struct PartitionState {
    pub log: PartitionLog,
    pub conns: Mutex<Vec<Arc<ConnEntry>>>,
}

/// Per-stream counters, as reported by the handle and `/admin/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StreamStats {
    /// Live connection requests received.
    pub requests: u64,
    /// The most live connection requests seen within any one connect window.
    pub max_requests_per_window: usize,
    /// Responses by status code (live and recovery).
    pub responses: BTreeMap<u16, u64>,
    /// Connections evicted because a newer one exceeded the per-partition limit.
    pub evictions: u64,
    /// Recovery jobs started.
    pub recovery_jobs: u64,
    /// Open live connections per partition (index 0 is partition 1).
    pub live_connections: Vec<usize>,
    /// Activities published per partition.
    pub published: Vec<usize>,
}

#[derive(Debug)]
pub(crate) struct StreamState {
    pub idx: usize,
    pub cfg: StreamConfig,
    pub partitions: Vec<PartitionState>,
    pub requests: Mutex<VecDeque<u64>>,
    pub stats: Mutex<StreamStats>,
    pub reject: Mutex<Vec<RejectRule>>,
    pub generator: Mutex<Generator>,
    pub rate: Mutex<RateProfile>,
    /// The Gnip password or v2 bearer token accepted now (rotated at runtime).
    pub secret: Mutex<String>,
    pub corpus: Option<Arc<Corpus>>,
    /// First id of the corpus sequence (corpus mode).
    pub corpus_base: u64,
}

/// Everything the server, the writers, the generator and the handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub streams: Vec<Arc<StreamState>>,
    pub next_conn: AtomicU64,
    pub shutdown: watch::Sender<bool>,
    pub recovery_jobs: Mutex<HashMap<String, usize>>,
    pub faults: Mutex<BTreeMap<&'static str, u64>>,
}

impl Shared {
    pub(crate) fn new(configs: Vec<StreamConfig>) -> Shared {
        let streams = configs
            .into_iter()
            .enumerate()
            .map(|(idx, cfg)| {
                let partitions = (0..cfg.partitions.max(1))
                    .map(|_| PartitionState {
                        log: PartitionLog::new(cfg.retention_ms, cfg.max_retained_per_partition),
                        conns: Mutex::new(Vec::new()),
                    })
                    .collect();
                let corpus_base = tandem_core::ids::snowflake(unix_ms_now(), idx as u16, 0);
                let corpus = cfg.corpus.as_ref().map(|c| {
                    Arc::new(Corpus::build(
                        cfg.content,
                        cfg.partitions,
                        c.activities_per_partition,
                        corpus_base,
                        c.rate_per_sec.filter(|r| *r > 0.0),
                    ))
                });
                Arc::new(StreamState {
                    idx,
                    generator: Mutex::new(Generator::new(cfg.content, idx as u16, cfg.info_every)),
                    rate: Mutex::new(cfg.rate.clone()),
                    secret: Mutex::new(cfg.secret().to_owned()),
                    partitions,
                    requests: Mutex::new(VecDeque::new()),
                    stats: Mutex::new(StreamStats::default()),
                    reject: Mutex::new(Vec::new()),
                    corpus,
                    corpus_base,
                    cfg,
                })
            })
            .collect();
        Shared {
            streams,
            next_conn: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            recovery_jobs: Mutex::new(HashMap::new()),
            faults: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn stream(&self, name: &str) -> Result<&Arc<StreamState>, SimError> {
        self.streams
            .iter()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| SimError::UnknownStream(name.to_owned()))
    }

    /// Applies a fault; returns how many connections (or rules) it affected.
    pub(crate) fn apply_fault(&self, fault: &Fault) -> Result<usize, SimError> {
        let matched = match fault {
            Fault::Reject {
                stream,
                partition,
                status,
                count,
                for_ms,
            } => {
                let s = self.stream(stream)?;
                s.reject.lock().expect("reject lock").push(RejectRule {
                    partition: *partition,
                    status: *status,
                    remaining: *count,
                    until_ms: for_ms.map(|ms| unix_ms_now() + ms),
                });
                1
            }
            Fault::Drop { target }
            | Fault::Stall { target }
            | Fault::HeartbeatsOnly { target }
            | Fault::Delay { target, .. }
            | Fault::Throttle { target, .. }
            | Fault::Resume { target }
            | Fault::Inject { target, .. }
            | Fault::OperationalDisconnect { target } => {
                if let Some(name) = &target.stream {
                    self.stream(name)?;
                }
                let conns = self.matching(target);
                for c in &conns {
                    c.control.apply(fault);
                }
                conns.len()
            }
        };
        *self
            .faults
            .lock()
            .expect("fault lock")
            .entry(fault.kind())
            .or_default() += 1;
        tracing::info!(fault = fault.kind(), matched, detail = ?fault, "simulator fault injected");
        Ok(matched)
    }

    /// Replaces a stream's password (Gnip) or bearer token (v2): requests with the old one
    /// get 401 from now on; open connections are left alone.
    pub(crate) fn set_secret(&self, stream: &str, secret: &str) -> Result<(), SimError> {
        let s = self.stream(stream)?;
        *s.secret.lock().expect("secret lock") = secret.to_owned();
        tracing::info!(stream, "simulator credentials rotated");
        Ok(())
    }

    fn matching(&self, target: &Target) -> Vec<Arc<ConnEntry>> {
        let mut out = Vec::new();
        for s in &self.streams {
            if target.stream.as_ref().is_some_and(|n| *n != s.cfg.name) {
                continue;
            }
            for (i, p) in s.partitions.iter().enumerate() {
                if target.partition.is_some_and(|n| n != i as u32 + 1) {
                    continue;
                }
                for c in p.conns.lock().expect("conns lock").iter() {
                    let ip_ok = target.client_ip.is_none_or(|ip| ip == c.client.ip());
                    let id_ok = target.connection.is_none_or(|id| id == c.id);
                    if ip_ok && id_ok {
                        out.push(c.clone());
                    }
                }
            }
        }
        out
    }

    pub(crate) fn connections(&self) -> Vec<ConnectionInfo> {
        let mut out = Vec::new();
        for s in &self.streams {
            for p in &s.partitions {
                for c in p.conns.lock().expect("conns lock").iter() {
                    out.push(ConnectionInfo {
                        id: c.id,
                        stream: s.cfg.name.clone(),
                        partition: c.partition,
                        client: c.client,
                        kind: c.kind,
                        opened_ms: c.opened_ms,
                        bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
                        activities_sent: c.activities_sent.load(Ordering::Relaxed),
                    });
                }
            }
        }
        out.sort_by_key(|c| c.id);
        out
    }

    pub(crate) fn fault_counts(&self) -> BTreeMap<&'static str, u64> {
        self.faults.lock().expect("fault lock").clone()
    }
}

impl StreamState {
    pub(crate) fn partition(&self, partition: u32) -> Option<&PartitionState> {
        partition
            .checked_sub(1)
            .and_then(|i| self.partitions.get(i as usize))
    }

    /// Records a live connection request; returns how many fell in the current window
    /// before this one.
    pub(crate) fn record_request(&self, now_ms: u64) -> usize {
        let mut window = self.requests.lock().expect("requests lock");
        let horizon = now_ms.saturating_sub(self.cfg.connect_window_ms);
        while window.front().is_some_and(|&t| t <= horizon) {
            window.pop_front();
        }
        let before = window.len();
        window.push_back(now_ms);
        let mut stats = self.stats.lock().expect("stats lock");
        stats.requests += 1;
        stats.max_requests_per_window = stats.max_requests_per_window.max(window.len());
        before
    }

    /// When the oldest request of the window leaves it (for `x-rate-limit-reset`).
    pub(crate) fn window_reset_ms(&self) -> u64 {
        let window = self.requests.lock().expect("requests lock");
        window.front().map_or(0, |t| t + self.cfg.connect_window_ms)
    }

    /// A forced status for this request, if a reject rule applies.
    pub(crate) fn forced_status(&self, partition: Option<u32>, now_ms: u64) -> Option<u16> {
        let mut rules = self.reject.lock().expect("reject lock");
        rules.retain(|r| r.remaining != Some(0) && r.until_ms.is_none_or(|u| now_ms < u));
        let rule = rules
            .iter_mut()
            .find(|r| r.partition.is_none() || r.partition == partition)?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        Some(rule.status)
    }

    pub(crate) fn count_response(&self, status: u16) {
        *self
            .stats
            .lock()
            .expect("stats lock")
            .responses
            .entry(status)
            .or_default() += 1;
    }

    /// Publishes lines to a partition; returns how many were activities.
    pub(crate) fn publish(&self, partition: u32, lines: Vec<Bytes>, now_ms: u64) -> usize {
        let Some(p) = self.partition(partition) else {
            return 0;
        };
        let mut activities = 0;
        let entries: Vec<_> = lines
            .into_iter()
            .map(|line| {
                let id = match identify(&line) {
                    Ok(LineKind::Activity(id)) => Some(id),
                    _ => None,
                };
                activities += usize::from(id.is_some());
                let created = id.and_then(|i| i.created_unix_ms()).unwrap_or(now_ms);
                (line, id, created)
            })
            .collect();
        p.log.append(now_ms, entries);
        activities
    }

    /// The partition an activity belongs to (partitions carry disjoint data).
    pub(crate) fn partition_of(&self, id: &ActivityId) -> u32 {
        let bits = match id.dedup_key() {
            DedupKey::Narrow(x) => x,
            DedupKey::Wide(x) => (x as u64) ^ ((x >> 64) as u64),
        };
        let mut x = bits ^ (bits >> 33);
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        (x % u64::from(self.cfg.partitions.max(1))) as u32 + 1
    }

    /// Registers a live connection and evicts the oldest ones over the limit.
    pub(crate) fn admit(&self, entry: Arc<ConnEntry>) {
        let Some(p) = self.partition(entry.partition) else {
            return;
        };
        let mut conns = p.conns.lock().expect("conns lock");
        conns.push(entry);
        let live: Vec<Arc<ConnEntry>> = conns
            .iter()
            .filter(|c| c.kind == ConnectionKind::Live)
            .cloned()
            .collect();
        let excess = live
            .len()
            .saturating_sub(self.cfg.max_connections_per_partition);
        for old in live.iter().take(excess) {
            old.control
                .order(Command::Close(Disconnect::ConnectionLimit));
            self.stats.lock().expect("stats lock").evictions += 1;
            tracing::info!(stream = %self.cfg.name, partition = old.partition, connection = old.id, "evicting oldest connection over the limit");
        }
    }

    pub(crate) fn release(&self, id: u64, partition: u32) {
        if let Some(p) = self.partition(partition) {
            p.conns.lock().expect("conns lock").retain(|c| c.id != id);
        }
    }

    pub(crate) fn stats(&self) -> StreamStats {
        let mut stats = self.stats.lock().expect("stats lock").clone();
        stats.live_connections = self
            .partitions
            .iter()
            .map(|p| {
                p.conns
                    .lock()
                    .expect("conns lock")
                    .iter()
                    .filter(|c| c.kind == ConnectionKind::Live)
                    .count()
            })
            .collect();
        stats.published = self.partitions.iter().map(|p| p.log.truth_len()).collect();
        stats
    }

    pub(crate) fn truth(&self, partition: u32) -> Vec<TruthRecord> {
        self.partition(partition)
            .map(|p| p.log.truth())
            .unwrap_or_default()
    }
}

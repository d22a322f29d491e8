//! The simulator and the consumer side by side, configured alike, and the verdict.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_core::{ActivityId, Partition};
use tandem_monitor::Status;
use tandem_pipeline::{Pipeline, ShutdownReport};
use tandem_sim::{RateProfile, SimConfig, Simulator, StreamConfig};

/// The simulator's credentials; the consumer reads the password from this variable.
pub const PASSWORD_VAR: &str = "TANDEM_SIM_PASSWORD";
const USER: &str = "demo@example.com";
/// The simulator's password (a consumer run as a process gets it in [`PASSWORD_VAR`]).
pub const PASSWORD: &str = "demo-password";

/// How a run is set up. Times are in milliseconds unless named otherwise.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// Everything the consumer writes goes under here.
    pub run_dir: PathBuf,
    pub stream: String,
    pub partitions: u32,
    /// One connection per path; `Some(ip)` binds that source address.
    pub paths: Vec<Option<IpAddr>>,
    pub rate_per_sec: f64,
    /// The simulator's heartbeat interval (and the consumer's expectation of it).
    pub heartbeat_ms: u64,
    pub heartbeat_margin_ms: u64,
    pub data_silence_ms: u64,
    /// Length of a backfill minute on both sides.
    pub minute_ms: u64,
    pub dedup_window_secs: u64,
    pub alert_pending_secs: f64,
    pub reconciliation_grace_secs: u64,
    pub monitor_listen: SocketAddr,
    /// Store gzip files.
    pub gzip: bool,
    /// Connect budget (requests per window) on both sides.
    pub connect_limit: u32,
    pub connect_window_ms: u64,
    /// Use second-scale backoffs instead of the upstream's published schedule.
    pub fast_retry: bool,
    /// Store in this NATS JetStream server (stream `TANDEM`) instead of files.
    pub nats_url: Option<String>,
    /// Discard instead of storing (benchmarks of the pipeline alone).
    pub null_sink: bool,
    /// Live connections the simulator allows per partition (two zones need four).
    pub max_connections_per_partition: usize,
    /// Unique activities the sink holds in memory before spooling.
    pub max_memory_activities: usize,
    /// Recovery margin on each side of a gap, and chunk length, in seconds.
    pub repair_margin_secs: u64,
    pub repair_chunk_secs: u64,
    /// The stream is a likes stream (no recovery).
    pub likes: bool,
    /// Activities per second the simulator's recovery delivers.
    pub recovery_rate_per_sec: u64,
}

impl HarnessConfig {
    /// A small, fast setup for tests: seconds instead of minutes.
    pub fn fast(run_dir: PathBuf) -> HarnessConfig {
        HarnessConfig {
            run_dir,
            stream: "decahose".to_owned(),
            partitions: 2,
            paths: vec![Some([127, 0, 0, 2].into()), Some([127, 0, 0, 3].into())],
            rate_per_sec: 200.0,
            heartbeat_ms: 300,
            heartbeat_margin_ms: 400,
            data_silence_ms: 1_000,
            minute_ms: 1_000,
            dedup_window_secs: 30,
            alert_pending_secs: 0.0,
            reconciliation_grace_secs: 5,
            monitor_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            gzip: false,
            connect_limit: 1_000,
            connect_window_ms: 10_000,
            fast_retry: true,
            nats_url: None,
            null_sink: false,
            max_connections_per_partition: 2,
            max_memory_activities: 100_000,
            repair_margin_secs: 1,
            repair_chunk_secs: 3_600,
            likes: false,
            recovery_rate_per_sec: 5_000,
        }
    }

    /// The simulator's stream, configured like the consumer.
    pub fn sim_stream(&self) -> StreamConfig {
        let mut s = StreamConfig::decahose(&self.stream, "demo", USER, PASSWORD);
        s.partitions = self.partitions;
        // Generation starts once the consumer is connected: what was published before
        // its first connection was never offered to it.
        s.rate = RateProfile::Constant { per_sec: 0.0 };
        s.heartbeat_interval_ms = Some(self.heartbeat_ms);
        s.minute_ms = self.minute_ms;
        s.connect_limit = self.connect_limit as usize;
        s.connect_window_ms = self.connect_window_ms.saturating_sub(1_000).max(1);
        s.max_connections_per_partition = self.max_connections_per_partition;
        s.recovery_rate_per_sec = self.recovery_rate_per_sec;
        if self.likes {
            s.content = tandem_sim::Content::Likes;
        }
        s
    }

    /// The consumer's configuration, as TOML (what a user would write).
    pub fn consumer_toml(&self, stream_url: &str) -> String {
        let sink = match &self.nats_url {
            _ if self.null_sink => "kind = \"null\"".to_owned(),
            Some(url) => format!(
                "kind = \"nats\"\nurl = \"{url}\"\nstream = \"TANDEM\"\nduplicate_window_secs = {}\nack_timeout_ms = 2000",
                self.dedup_window_secs * 2
            ),
            None => format!(
                "kind = \"file\"\ndir = \"{}/store\"\ngzip = {}\nfsync_interval_ms = 200",
                self.run_dir.display(),
                self.gzip
            ),
        };
        let mut t = String::new();
        let mut names = Vec::new();
        for (i, ip) in self.paths.iter().enumerate() {
            let name = ["a", "b", "c", "d"]
                .get(i)
                .map_or_else(|| format!("p{i}"), |s| (*s).to_owned());
            let _ = writeln!(t, "[[path]]\nname = \"{name}\"");
            if let Some(ip) = ip {
                let _ = writeln!(t, "source_address = \"{ip}\"");
            }
            names.push(format!("\"{name}\""));
        }
        let retry = if self.fast_retry {
            "network_initial_backoff_ms = 100\nnetwork_backoff_step_ms = 100\nnetwork_max_backoff_ms = 1000\nhttp_initial_backoff_ms = 300\nhttp_max_backoff_ms = 2000\nhealthy_after_ms = 2000\n"
        } else {
            ""
        };
        let dir = self.run_dir.display();
        let _ = write!(
            t,
            r#"
[[stream]]
name = "{stream}"
api = "gnip"
url = "{stream_url}"
partitions = {partitions}
paths = [{paths}]
sink = "store"
allow_plain_http = true
likes = {likes}

[stream.auth]
username = "{USER}"
password_env = "{PASSWORD_VAR}"

[stream.retry]
{retry}
[stream.liveness]
heartbeat_interval_ms = {hb}
heartbeat_margin_ms = {margin}
data_silence_ms = {silence}
read_timeout_ms = 35000

[stream.backfill]
minute_ms = {minute}

[stream.budget]
requests = {limit}
window_ms = {window}

[sinks.store]
{sink}

[merge]
dedup_window_secs = {dedup}
dead_letter_dir = "{dir}/dead-letters"

[delivery]
spool_dir = "{dir}/spool"
drain_deadline_ms = 10000
max_memory_activities = {memory}
retry_max_ms = 1000

[monitor]
listen = "{listen}"
tick_ms = 100
reconciliation_grace_secs = {grace}
partition_down_pending_secs = {pending}
imbalance_pending_secs = {pending}
stored_rate_pending_secs = 5.0
stored_rate_baseline_secs = 60.0

[repair]
ledger_dir = "{dir}/ledger"
margin_secs = {repair_margin}
chunk_secs = {repair_chunk}
ledger_flush_ms = 200
"#,
            stream = self.stream,
            partitions = self.partitions,
            paths = names.join(", "),
            hb = self.heartbeat_ms,
            margin = self.heartbeat_margin_ms,
            silence = self.data_silence_ms,
            minute = self.minute_ms,
            limit = self.connect_limit,
            window = self.connect_window_ms,
            dedup = self.dedup_window_secs,
            memory = self.max_memory_activities,
            listen = self.monitor_listen,
            grace = self.reconciliation_grace_secs,
            pending = self.alert_pending_secs,
            likes = self.likes,
            repair_margin = self.repair_margin_secs,
            repair_chunk = self.repair_chunk_secs,
        );
        t
    }
}

/// The run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("simulator: {0}")]
    Sim(#[from] tandem_sim::SimError),
    #[error("configuration:\n{0}")]
    Config(#[from] tandem_config::Problems),
    #[error("pipeline: {0}")]
    Pipeline(#[from] tandem_pipeline::StartError),
}

/// A simulator and a consumer of it.
#[derive(Debug)]
pub struct Harness {
    pub sim: Simulator,
    pub pipeline: Pipeline,
    pub cfg: HarnessConfig,
    pub config_text: String,
}

/// What the store holds against what the simulator published.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Distinct activities the simulator published (ground truth).
    pub published: usize,
    /// Activity lines in the store.
    pub stored_lines: usize,
    /// Distinct activities in the store.
    pub stored_distinct: usize,
    /// Published and not stored.
    pub lost: usize,
    /// Stored more than once (extra copies).
    pub stored_twice: usize,
    /// Stored and never published.
    pub not_published: usize,
    /// Copies the merger removed.
    pub duplicates_removed: u64,
    pub dead_lettered: u64,
    pub lost_examples: Vec<ActivityId>,
    /// The first few lost activities, as the ground truth recorded them.
    pub lost_detail: Vec<(Partition, tandem_sim::TruthRecord)>,
    pub shutdown: ShutdownReport,
    /// Whether the consumer had caught up with the simulator before shutdown.
    pub settled: bool,
}

impl Verdict {
    /// Nothing lost, nothing stored twice, nothing invented.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.stored_twice == 0 && self.not_published == 0
    }

    /// One line, as the fault matrix prints it.
    pub fn line(&self) -> String {
        format!(
            "published {} stored {} (distinct {}) lost {} stored-twice {} not-published {} duplicates-removed {} dead-lettered {}",
            self.published,
            self.stored_lines,
            self.stored_distinct,
            self.lost,
            self.stored_twice,
            self.not_published,
            self.duplicates_removed,
            self.dead_lettered
        )
    }
}

impl Harness {
    /// Starts the simulator (on an ephemeral loopback port) and a consumer of it.
    pub async fn start(cfg: HarnessConfig) -> Result<Harness, HarnessError> {
        tandem_conn::install_crypto_provider();
        let sim = Simulator::start(SimConfig {
            streams: vec![cfg.sim_stream()],
            ..SimConfig::default()
        })
        .await?;
        let url = sim.stream_url(&cfg.stream)?;
        let config_text = cfg.consumer_toml(&url);
        let loaded = tandem_config::load(&config_text, &|name| {
            (name == PASSWORD_VAR).then(|| PASSWORD.to_owned())
        })?;
        let pipeline = Pipeline::start(loaded).await?;
        let h = Harness {
            sim,
            pipeline,
            cfg,
            config_text,
        };
        if !h.wait_connected(Duration::from_secs(15)).await {
            tracing::warn!("not every connection came up within 15 s; generating anyway");
        }
        h.sim.set_rate(
            &h.cfg.stream,
            RateProfile::Constant {
                per_sec: h.cfg.rate_per_sec,
            },
        )?;
        Ok(h)
    }

    pub fn status(&self) -> Arc<Status> {
        self.pipeline.status()
    }

    /// Waits until every partition has a live connection on every path.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let want = self.cfg.paths.len();
        let partitions = self.cfg.partitions as usize;
        // A status with no partitions yet (before the monitor's first evaluation) proves
        // nothing: every partition must be present and fully connected.
        self.wait(timeout, |s| {
            s.streams
                .iter()
                .map(|st| st.partitions.len())
                .sum::<usize>()
                == partitions
                && s.streams
                    .iter()
                    .all(|st| st.partitions.iter().all(|p| p.live_connections == want))
        })
        .await
    }

    /// Waits until `done` holds for the monitor's status.
    pub async fn wait(&self, timeout: Duration, mut done: impl FnMut(&Status) -> bool) -> bool {
        let mut rx = self.pipeline.status_watch();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&rx.borrow_and_update()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Distinct published activities per partition.
    fn truth(&self) -> HashMap<Partition, HashSet<ActivityId>> {
        (1..=self.cfg.partitions)
            .map(|p| {
                (
                    p,
                    self.sim
                        .truth(&self.cfg.stream, p)
                        .unwrap_or_default()
                        .iter()
                        .map(|r| r.id)
                        .collect(),
                )
            })
            .collect()
    }

    /// Starts another consumer of the same simulator (another zone), writing under
    /// `run_dir`, through `paths`.
    pub async fn another_consumer(
        &self,
        run_dir: PathBuf,
        paths: Vec<Option<IpAddr>>,
    ) -> Result<Pipeline, HarnessError> {
        let cfg = HarnessConfig {
            run_dir,
            paths,
            monitor_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..self.cfg.clone()
        };
        let text = cfg.consumer_toml(&self.sim.stream_url(&self.cfg.stream)?);
        let loaded = tandem_config::load(&text, &|name| {
            (name == PASSWORD_VAR).then(|| PASSWORD.to_owned())
        })?;
        Ok(Pipeline::start(loaded).await?)
    }

    /// Stops generation and waits until the consumer has stored everything published.
    pub async fn quiesce(&self, timeout: Duration) -> bool {
        let _ = self
            .sim
            .set_rate(&self.cfg.stream, RateProfile::Constant { per_sec: 0.0 });
        let deadline = tokio::time::Instant::now() + timeout;
        let mut stable_since: Option<tokio::time::Instant> = None;
        loop {
            let truth = self.truth();
            let settled = self.pipeline.tallies().iter().all(|(_, p, t)| {
                let s = t.snapshot();
                let published = truth.get(p).map_or(0, HashSet::len) as u64;
                s.unique >= published
                    && s.stored == s.unique
                    && s.in_flight == 0
                    && s.unclassified() == 0
            });
            let now = tokio::time::Instant::now();
            match (settled, stable_since) {
                (true, Some(since)) if now.duration_since(since) >= Duration::from_millis(500) => {
                    return true;
                }
                (true, None) => stable_since = Some(now),
                (false, _) => stable_since = None,
                _ => {}
            }
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Quiesces, shuts the consumer down and compares the store with the ground truth.
    pub async fn finish(self, settle: Duration) -> Verdict {
        let settled = self.quiesce(settle).await;
        let (mut dups, mut dead) = (0, 0);
        for (_, _, t) in self.pipeline.tallies() {
            let s = t.snapshot();
            dups += s.duplicates;
            dead += s.dead_lettered;
        }
        let shutdown = self.pipeline.shutdown().await;
        let stored = match &self.cfg.nats_url {
            Some(url) => crate::nats::stored_ids(url, "TANDEM")
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot read the JetStream stream back");
                    Default::default()
                }),
            None => crate::store::stored_ids(&self.cfg.run_dir.join("store")).unwrap_or_default(),
        };
        let mut v = compare(&self.cfg, &self.sim, &stored);
        v.duplicates_removed = dups;
        v.dead_lettered = dead;
        v.shutdown = shutdown;
        v.settled = settled;
        v
    }
}

/// Compares what the simulator published with what the store holds.
pub fn compare(
    cfg: &HarnessConfig,
    sim: &Simulator,
    stored: &HashMap<(String, Partition), Vec<ActivityId>>,
) -> Verdict {
    let mut v = Verdict::default();
    let records: Vec<(Partition, tandem_sim::TruthRecord)> = (1..=cfg.partitions)
        .flat_map(|p| {
            sim.truth(&cfg.stream, p)
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (p, r))
        })
        .collect();
    {
        let truth: HashMap<Partition, HashSet<ActivityId>> = (1..=cfg.partitions)
            .map(|p| {
                (
                    p,
                    records
                        .iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, r)| r.id)
                        .collect(),
                )
            })
            .collect();
        for p in 1..=cfg.partitions {
            let published = truth.get(&p).cloned().unwrap_or_default();
            let lines = stored
                .get(&(cfg.stream.clone(), p))
                .cloned()
                .unwrap_or_default();
            let distinct: HashSet<ActivityId> = lines.iter().copied().collect();
            v.published += published.len();
            v.stored_lines += lines.len();
            v.stored_distinct += distinct.len();
            v.stored_twice += lines.len() - distinct.len();
            let lost: Vec<ActivityId> = published.difference(&distinct).copied().collect();
            v.lost += lost.len();
            for id in lost.iter().take(5) {
                if let Some(r) = records.iter().find(|(q, r)| *q == p && r.id == *id) {
                    v.lost_detail.push(*r);
                }
            }
            v.lost_examples.extend(lost.into_iter().take(5));
            v.not_published += distinct.difference(&published).count();
        }
        v
    }
}

//! The simulator and the consumer side by side, configured alike, and the verdict.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::Loaded;
use tandem_core::{ActivityId, Partition};
use tandem_monitor::Status;
use tandem_pipeline::{Pipeline, ShutdownReport};
use tandem_sim::{RateProfile, SimConfig, Simulator, StreamConfig};

/// The simulator's credentials; the consumer reads the password from this variable.
pub const PASSWORD_VAR: &str = "TANDEM_SIM_PASSWORD";
const USER: &str = "demo@example.com";
/// The simulator's password (a consumer run as a process gets it in [`PASSWORD_VAR`]).
pub const PASSWORD: &str = "demo-password";
/// The simulator's bearer token for X API v2 streams; the consumer reads it from
/// [`HarnessConfig::token_file`], again before each request.
pub const TOKEN: &str = "demo-bearer-token";

/// Which upstream API the run speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HarnessApi {
    /// A Gnip Decahose (`sample10`), recovery on its own listener.
    Gnip,
    /// The X API v2 partitioned sample stream (`/2/tweets/sample10/stream`).
    V2Sample10,
    /// The X API v2 filtered stream (`/2/tweets/search/stream`): one unpartitioned
    /// partition.
    V2Filtered,
}

/// Where a stream is served: its live URL and its recovery URL (Gnip: another listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamUrls {
    pub live: String,
    pub recovery: String,
}

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
    /// Store in this Kafka-protocol broker (`host:port`, topic `tandem`, created with 3
    /// partitions) instead of files. With `pair_consumer`, `nats_url` is then the pair's
    /// coordination server only.
    pub kafka_bootstrap: Option<String>,
    /// Lines added to the Kafka sink's section (`max_message_bytes = …`).
    pub kafka_extra: String,
    /// librdkafka settings the final read-back of the topic adds to `bootstrap.servers`
    /// (`crate::kafka::sasl_ssl_settings`), for a broker that requires them.
    pub kafka_read_back: Vec<(String, String)>,
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
    /// Further streams of the same shape, on the same simulator and consumer (a stream that
    /// fails alone while `stream` keeps running).
    pub extra_streams: Vec<String>,
    /// The merger's cap on remembered ids per partition (`None`: the default).
    pub max_ids_per_partition: Option<usize>,
    /// Where the simulator listens (port 0: any free port).
    pub sim_listen: SocketAddr,
    /// The host name in the stream URLs instead of the simulator's address, so that a
    /// path's `resolve_ip` applies (paths reaching the simulator over different links).
    pub url_host: Option<String>,
    /// Per path, the address the upstream host resolves to on that path (`resolve_ip`);
    /// empty or `None`: ordinary resolution.
    pub resolve_ips: Vec<Option<IpAddr>>,
    /// The simulator serves HTTPS (a generated CA the consumer trusts) instead of plain
    /// HTTP, which the consumer only allows to loopback.
    pub tls: bool,
    /// The upstream API (Gnip unless set).
    pub api: HarnessApi,
    /// This consumer's id in a pair coordinated through the NATS sink's server (`[pair]`,
    /// with beacons every 250 ms and leases of 3 s); `None`: not one of a pair.
    pub pair_consumer: Option<String>,
    /// The pair's `lease_ttl_ms` (3 s unless set).
    pub pair_lease_ttl_ms: u64,
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
            kafka_bootstrap: None,
            kafka_extra: String::new(),
            kafka_read_back: Vec::new(),
            null_sink: false,
            max_connections_per_partition: 2,
            max_memory_activities: 100_000,
            repair_margin_secs: 1,
            repair_chunk_secs: 3_600,
            likes: false,
            recovery_rate_per_sec: 5_000,
            extra_streams: Vec::new(),
            max_ids_per_partition: None,
            sim_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            url_host: None,
            resolve_ips: Vec::new(),
            tls: false,
            api: HarnessApi::Gnip,
            pair_consumer: None,
            pair_lease_ttl_ms: 3_000,
        }
    }

    /// Where the consumer reads the bearer token of a v2 stream (written at start; a test
    /// rewrites it to rotate the token).
    pub fn token_file(&self) -> PathBuf {
        self.run_dir.join("bearer-token")
    }

    /// Every stream the consumer reads: `stream` first, then `extra_streams`.
    pub fn stream_names(&self) -> Vec<String> {
        std::iter::once(self.stream.clone())
            .chain(self.extra_streams.iter().cloned())
            .collect()
    }

    /// The simulator's streams, configured like the consumer.
    pub fn sim_streams(&self) -> Vec<StreamConfig> {
        self.stream_names()
            .iter()
            .map(|name| self.sim_stream(name))
            .collect()
    }

    /// The live and recovery URLs of each of [`HarnessConfig::stream_names`] on `sim`.
    pub fn stream_urls(&self, sim: &Simulator) -> Result<Vec<StreamUrls>, tandem_sim::SimError> {
        // With `url_host`, the URL names the host and the port stays the simulator's.
        let named = |url: String, base: &str, port: u16| match &self.url_host {
            Some(host) => {
                let scheme = base.split("://").next().unwrap_or("http");
                format!("{scheme}://{host}:{port}{}", &url[base.len()..])
            }
            None => url,
        };
        self.stream_names()
            .iter()
            .map(|name| {
                Ok(StreamUrls {
                    live: named(sim.stream_url(name)?, &sim.base_url(), sim.addr().port()),
                    recovery: named(
                        sim.recovery_url(name)?,
                        &sim.recovery_base_url(),
                        sim.recovery_addr().port(),
                    ),
                })
            })
            .collect()
    }

    /// The simulator's stream `name`, configured like the consumer.
    pub fn sim_stream(&self, name: &str) -> StreamConfig {
        let mut s = match self.api {
            HarnessApi::Gnip => StreamConfig::decahose(name, "demo", USER, PASSWORD),
            HarnessApi::V2Sample10 => StreamConfig::v2_sample10(name, TOKEN),
            HarnessApi::V2Filtered => {
                assert_eq!(self.partitions, 1, "the filtered stream has one partition");
                StreamConfig::v2_filtered(name, TOKEN)
            }
        };
        assert!(
            self.api == HarnessApi::Gnip || self.extra_streams.is_empty(),
            "a v2 stream's path is fixed: one v2 stream per simulator"
        );
        // Further streams of the account get their own label (and so their own URL).
        if name != self.stream
            && let tandem_sim::Api::Gnip { label, .. } = &mut s.api
        {
            *label = name.to_owned();
        }
        s.partitions = self.partitions;
        // Generation starts once the consumer is connected: what was published before
        // its first connection was never offered to it.
        s.rate = RateProfile::Constant { per_sec: 0.0 };
        s.heartbeat_interval_ms = (self.heartbeat_ms > 0).then_some(self.heartbeat_ms);
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

    /// The consumer's configuration, as TOML (what a user would write); `urls` holds the
    /// URLs of each of [`HarnessConfig::stream_names`], in order.
    pub fn consumer_toml(&self, urls: &[StreamUrls]) -> String {
        assert_eq!(urls.len(), self.stream_names().len(), "one URL per stream");
        let mut t = self.paths_toml();
        for (name, url) in self.stream_names().iter().zip(urls) {
            t.push_str(&self.stream_toml(name, url));
        }
        t.push_str(&self.shared_toml());
        t
    }

    /// The name of the `i`th path: `a` to `d`, then `p4`, `p5`, ….
    fn path_name(i: usize) -> String {
        ["a", "b", "c", "d"]
            .get(i)
            .map_or_else(|| format!("p{i}"), |s| (*s).to_owned())
    }

    /// One `[[path]]` per path, with its source address and resolved IP where set.
    fn paths_toml(&self) -> String {
        let mut t = String::new();
        for (i, ip) in self.paths.iter().enumerate() {
            let _ = writeln!(t, "[[path]]\nname = \"{}\"", Self::path_name(i));
            if let Some(ip) = ip {
                let _ = writeln!(t, "source_address = \"{ip}\"");
            }
            if let Some(Some(ip)) = self.resolve_ips.get(i) {
                let _ = writeln!(t, "resolve_ip = \"{ip}\"");
            }
        }
        t
    }

    /// The `[[stream]]` table of stream `name`, with its auth, retry, liveness, backfill
    /// and budget.
    fn stream_toml(&self, name: &str, urls: &StreamUrls) -> String {
        let paths: Vec<String> = (0..self.paths.len())
            .map(|i| format!("\"{}\"", Self::path_name(i)))
            .collect();
        let retry = if self.fast_retry {
            "network_initial_backoff_ms = 100\nnetwork_backoff_step_ms = 100\nnetwork_max_backoff_ms = 1000\nhttp_initial_backoff_ms = 300\nhttp_max_backoff_ms = 2000\nrefused_initial_backoff_ms = 1000\nrefused_max_backoff_ms = 2000\nhealthy_after_ms = 2000\n"
        } else {
            ""
        };
        format!(
            r#"
[[stream]]
name = "{name}"
{endpoint}
partitions = {partitions}
paths = [{paths}]
sink = "store"
{transport}
likes = {likes}

[stream.auth]
{auth}

[stream.retry]
{retry}rate_limit_initial_backoff_ms = {minute}
rate_limit_max_backoff_ms = {minute_x16}
[stream.liveness]
{hb}heartbeat_margin_ms = {margin}
data_silence_ms = {silence}
read_timeout_ms = 35000

[stream.backfill]
minute_ms = {minute}

[stream.budget]
requests = {limit}
window_ms = {window}
"#,
            endpoint = self.endpoint_toml(urls),
            auth = self.auth_toml(),
            partitions = self.partitions,
            paths = paths.join(", "),
            hb = if self.heartbeat_ms > 0 {
                format!("heartbeat_interval_ms = {}\n", self.heartbeat_ms)
            } else {
                String::new()
            },
            margin = self.heartbeat_margin_ms,
            silence = self.data_silence_ms,
            minute = self.minute_ms,
            minute_x16 = self.minute_ms * 16,
            limit = self.connect_limit,
            window = self.connect_window_ms,
            likes = self.likes,
            transport = self.transport_toml(),
        )
    }

    /// The API and its URLs: Gnip names its recovery endpoint; v2 recovers on the live
    /// URL (the default).
    fn endpoint_toml(&self, urls: &StreamUrls) -> String {
        match self.api {
            HarnessApi::Gnip => format!(
                "api = \"gnip\"\nurl = \"{}\"\nrecovery_url = \"{}\"",
                urls.live, urls.recovery
            ),
            HarnessApi::V2Sample10 => format!("api = \"x_v2\"\nurl = \"{}\"", urls.live),
            HarnessApi::V2Filtered => format!(
                "api = \"x_v2\"\nurl = \"{}\"\npartitioned = false",
                urls.live
            ),
        }
    }

    /// The credentials: Gnip's password from the environment, v2's token from its file.
    fn auth_toml(&self) -> String {
        match self.api {
            HarnessApi::Gnip => format!("username = \"{USER}\"\npassword_env = \"{PASSWORD_VAR}\""),
            _ => format!("bearer_token_file = \"{}\"", self.token_file().display()),
        }
    }

    /// How the consumer reaches the simulator: trusting its generated CA over HTTPS, or
    /// plain HTTP (loopback only).
    fn transport_toml(&self) -> String {
        if self.tls {
            format!("ca_file = \"{}\"", self.ca_file().display())
        } else {
            "allow_plain_http = true".to_owned()
        }
    }

    /// Where the simulator writes its CA certificate when it serves HTTPS.
    pub fn ca_file(&self) -> PathBuf {
        self.run_dir.join("simulator-ca.pem")
    }

    /// The simulator's HTTPS settings, when it serves HTTPS: its certificate names the
    /// URLs' host.
    pub fn sim_tls(&self) -> Option<tandem_sim::TlsConfig> {
        self.tls.then(|| tandem_sim::TlsConfig {
            names: [
                self.url_host.as_deref(),
                Some("localhost"),
                Some("127.0.0.1"),
            ]
            .into_iter()
            .flatten()
            .map(str::to_owned)
            .collect(),
            ca_file: self.ca_file(),
        })
    }

    /// The sink's settings (`kind` and what it takes): null, NATS or files.
    fn sink_toml(&self) -> String {
        if let Some(bootstrap) = &self.kafka_bootstrap {
            return format!(
                "kind = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{KAFKA_TOPIC}\"\ncreate_topic = true\ntopic_partitions = 3\n{}\n{}",
                self.kafka_extra,
                match &self.nats_url {
                    // The pair's coordination server, which no stream stores to.
                    Some(url) if self.pair_consumer.is_some() => format!(
                        "\n[sinks.coordination]\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"TANDEM\"\nduplicate_window_secs = {}\n",
                        self.dedup_window_secs * 2
                    ),
                    _ => String::new(),
                }
            );
        }
        match &self.nats_url {
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
        }
    }

    /// The sections every stream shares: the sink, merge, delivery, monitor and repair.
    fn shared_toml(&self) -> String {
        let max_ids = self
            .max_ids_per_partition
            .map_or_else(String::new, |n| format!("max_ids_per_partition = {n}\n"));
        let dir = self.run_dir.display();
        format!(
            r#"
[sinks.store]
{sink}

[merge]
dedup_window_secs = {dedup}
{max_ids}dead_letter_dir = "{dir}/dead-letters"

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
{pair}"#,
            sink = self.sink_toml(),
            dedup = self.dedup_window_secs,
            memory = self.max_memory_activities,
            listen = self.monitor_listen,
            grace = self.reconciliation_grace_secs,
            pending = self.alert_pending_secs,
            repair_margin = self.repair_margin_secs,
            repair_chunk = self.repair_chunk_secs,
            pair = self.pair_toml(),
        )
    }

    /// The `[pair]` section of a consumer of a pair.
    fn pair_toml(&self) -> String {
        match &self.pair_consumer {
            Some(id) => format!(
                "\n[pair]\nconsumer_id = \"{id}\"\nbeacon_ms = 250\nlease_ttl_ms = {}\npeer_stale_ms = 2000\n",
                self.pair_lease_ttl_ms
            ),
            None => String::new(),
        }
    }
}

/// The topic a harness with `kafka_bootstrap` stores into.
pub const KAFKA_TOPIC: &str = "tandem";

/// The run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("simulator: {0}")]
    Sim(#[from] tandem_sim::SimError),
    #[error("configuration:\n{0}")]
    Config(#[from] tandem_config::Problems),
    #[error("pipeline: {0}")]
    Pipeline(#[from] tandem_pipeline::StartError),
    #[error("run directory: {0}")]
    RunDir(#[from] std::io::Error),
}

/// A simulator and a consumer of it.
#[derive(Debug)]
pub struct Harness {
    pub sim: Simulator,
    pub pipeline: Pipeline,
    pub cfg: HarnessConfig,
    pub config_text: String,
    /// Activities stored by earlier runs of the consumer (before a restart), per stream
    /// and partition: the current run's tallies start from zero.
    stored_before: HashMap<(String, Partition), u64>,
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

/// Loads a consumer's configuration text, with the simulator's credentials.
pub(crate) fn load_consumer(config_text: &str) -> Result<Loaded, tandem_config::Problems> {
    tandem_config::load(config_text, &|name| {
        (name == PASSWORD_VAR).then(|| PASSWORD.to_owned())
    })
}

/// Starts a consumer from its configuration text, with the simulator's credentials.
async fn start_consumer(config_text: &str) -> Result<Pipeline, HarnessError> {
    Ok(Pipeline::start(load_consumer(config_text)?).await?)
}

impl Harness {
    /// Starts the simulator (on an ephemeral loopback port) and a consumer of it.
    pub async fn start(cfg: HarnessConfig) -> Result<Harness, HarnessError> {
        tandem_conn::install_crypto_provider();
        std::fs::create_dir_all(&cfg.run_dir).ok();
        if cfg.api != HarnessApi::Gnip {
            std::fs::write(cfg.token_file(), format!("{TOKEN}\n"))?;
        }
        let sim = Simulator::start(SimConfig {
            listen: cfg.sim_listen,
            recovery_listen: SocketAddr::new(cfg.sim_listen.ip(), 0),
            streams: cfg.sim_streams(),
            tls: cfg.sim_tls(),
        })
        .await?;
        let config_text = cfg.consumer_toml(&cfg.stream_urls(&sim)?);
        let h = Harness::with_consumer(sim, cfg, config_text, HashMap::new()).await?;
        if !h.wait_connected(Duration::from_secs(15)).await {
            tracing::warn!("not every connection came up within 15 s; generating anyway");
        }
        for name in h.cfg.stream_names() {
            h.sim.set_rate(
                &name,
                RateProfile::Constant {
                    per_sec: h.cfg.rate_per_sec,
                },
            )?;
        }
        Ok(h)
    }

    /// Stops the consumer (an orderly shutdown, as after SIGTERM) and starts it again with
    /// the same configuration: what an operator does after fixing credentials.
    pub async fn restart(self) -> Result<(Harness, ShutdownReport), HarnessError> {
        let Harness {
            sim,
            pipeline,
            cfg,
            config_text,
            mut stored_before,
        } = self;
        // Read after the drain: shutdown stores what was still in flight.
        let tallies = pipeline.tallies().to_vec();
        let report = pipeline.shutdown().await;
        for (stream, p, t) in tallies {
            let t = t.snapshot();
            *stored_before.entry((stream.to_string(), p)).or_default() +=
                t.stored + t.store_duplicates;
        }
        let h = Harness::with_consumer(sim, cfg, config_text, stored_before).await?;
        Ok((h, report))
    }

    /// Starts a consumer from `config_text` and holds it beside `sim`.
    async fn with_consumer(
        sim: Simulator,
        cfg: HarnessConfig,
        config_text: String,
        stored_before: HashMap<(String, Partition), u64>,
    ) -> Result<Harness, HarnessError> {
        let pipeline = start_consumer(&config_text).await?;
        Ok(Harness {
            sim,
            pipeline,
            cfg,
            config_text,
            stored_before,
        })
    }

    pub fn status(&self) -> Arc<Status> {
        self.pipeline.status()
    }

    /// Waits until every partition has a live connection on every path.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let want = self.cfg.paths.len();
        let partitions = self.cfg.partitions as usize * self.cfg.stream_names().len();
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

    /// Distinct published activities per stream and partition.
    fn truth(&self) -> HashMap<(String, Partition), HashSet<ActivityId>> {
        let mut out = HashMap::new();
        for stream in self.cfg.stream_names() {
            for p in 1..=self.cfg.partitions {
                let ids = self
                    .sim
                    .truth(&stream, p)
                    .unwrap_or_default()
                    .iter()
                    .map(|r| r.id)
                    .collect();
                out.insert((stream.clone(), p), ids);
            }
        }
        out
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
            // The other consumer of a pair has an id of its own.
            pair_consumer: (self.cfg.pair_consumer.as_ref()).map(|id| format!("{id}-peer")),
            ..self.cfg.clone()
        };
        start_consumer(&cfg.consumer_toml(&cfg.stream_urls(&self.sim)?)).await
    }

    /// Stops generation and waits until the consumer has stored everything published.
    pub async fn quiesce(&self, timeout: Duration) -> bool {
        for name in self.cfg.stream_names() {
            let _ = self
                .sim
                .set_rate(&name, RateProfile::Constant { per_sec: 0.0 });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut stable_since: Option<tokio::time::Instant> = None;
        loop {
            let truth = self.truth();
            let settled = self.pipeline.tallies().iter().all(|(stream, p, t)| {
                let s = t.snapshot();
                let key = (stream.to_string(), *p);
                let published = truth.get(&key).map_or(0, HashSet::len) as u64;
                let before = self.stored_before.get(&key).copied().unwrap_or(0);
                s.unique + before >= published
                    && s.stored + s.store_duplicates == s.unique
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
        let stored = match (&self.cfg.kafka_bootstrap, &self.cfg.nats_url) {
            (Some(bootstrap), _) => {
                crate::kafka::stored_ids_with(bootstrap, &self.cfg.kafka_read_back, KAFKA_TOPIC)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "cannot read the Kafka topic back");
                        Default::default()
                    })
            }
            (None, Some(url)) => crate::nats::stored_ids(url, "TANDEM")
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot read the JetStream stream back");
                    Default::default()
                }),
            (None, None) => {
                crate::store::stored_ids(&self.cfg.run_dir.join("store")).unwrap_or_default()
            }
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
    for stream in cfg.stream_names() {
        for p in 1..=cfg.partitions {
            let records = sim.truth(&stream, p).unwrap_or_default();
            let published: HashSet<ActivityId> = records.iter().map(|r| r.id).collect();
            let lines = stored
                .get(&(stream.clone(), p))
                .map_or(&[][..], Vec::as_slice);
            let distinct: HashSet<ActivityId> = lines.iter().copied().collect();
            v.published += published.len();
            v.stored_lines += lines.len();
            v.stored_distinct += distinct.len();
            v.stored_twice += lines.len() - distinct.len();
            let lost: Vec<ActivityId> = published.difference(&distinct).copied().collect();
            v.lost += lost.len();
            for id in lost.iter().take(5) {
                if let Some(r) = records.iter().find(|r| r.id == *id) {
                    v.lost_detail.push((p, *r));
                }
            }
            v.lost_examples.extend(lost.into_iter().take(5));
            v.not_published += distinct.difference(&published).count();
        }
    }
    v
}

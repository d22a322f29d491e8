//! What the simulator serves: its streams, their APIs, rates and limits.
//!
//! Every limit the real services have is a field here with the real value as its default,
//! so that a test can shrink it (seconds instead of minutes) without changing behaviour.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole simulator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Address to listen on; port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS with a generated certificate instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The streams served.
    #[serde(default = "default_streams", rename = "stream")]
    pub streams: Vec<StreamConfig>,
}

/// HTTPS settings: a CA and a server certificate are generated at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Names (DNS or IP) the server certificate is valid for.
    #[serde(default = "default_tls_names")]
    pub names: Vec<String>,
    /// Where to write the CA certificate (PEM) for clients to trust.
    pub ca_file: PathBuf,
}

/// One stream endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Name used by the admin API and the control handle.
    pub name: String,
    /// Which API and URL the stream is served under, with its credentials.
    pub api: Api,
    /// Number of partitions (numbered from 1). Gnip Decahose has 2, the Firehose 20.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// What the generator produces.
    #[serde(default)]
    pub content: Content,
    /// How fast the generator produces, over all partitions together.
    #[serde(default)]
    pub rate: RateProfile,
    /// Send one `info` message every this many generated activities (0: never).
    #[serde(default = "default_info_every")]
    pub info_every: u64,
    /// Idle time after which a heartbeat (`\r\n`) is sent. Gnip: 10 s; X API v2: 20 s.
    pub heartbeat_interval_ms: Option<u64>,
    /// Live connections allowed per partition; a new one past it evicts the oldest.
    #[serde(default = "default_max_connections")]
    pub max_connections_per_partition: usize,
    /// Connection requests allowed per window (Gnip volume streams: 10 per 60 s).
    #[serde(default = "default_connect_limit")]
    pub connect_limit: usize,
    /// The window of `connect_limit`.
    #[serde(default = "default_connect_window_ms")]
    pub connect_window_ms: u64,
    /// Length of a backfill minute. 60 000 on the real service; tests shrink it.
    #[serde(default = "default_minute_ms")]
    pub minute_ms: u64,
    /// Largest `backfillMinutes` accepted (the real services: 5).
    #[serde(default = "default_max_backfill_minutes")]
    pub max_backfill_minutes: u64,
    /// How far back recovery can reach (5 days on Gnip; tests shrink it).
    #[serde(default = "default_retention_ms")]
    pub retention_ms: u64,
    /// Memory bound on retained activities per partition (oldest dropped first).
    #[serde(default = "default_max_retained")]
    pub max_retained_per_partition: usize,
    /// Recovery jobs that may run at once per account (the real services: 2).
    #[serde(default = "default_recovery_jobs")]
    pub max_recovery_jobs: usize,
    /// Recovery delivers at most this many activities per second ("slower than live").
    #[serde(default = "default_recovery_rate")]
    pub recovery_rate_per_sec: u64,
    /// Stream a pre-encoded corpus at full speed instead of generating (benchmarks).
    #[serde(default)]
    pub corpus: Option<CorpusConfig>,
}

/// The API a stream speaks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Api {
    /// Gnip 2.0: `/stream/{stream_type}/accounts/{account}/publishers/twitter/{label}.json`,
    /// Basic auth, gzip required, `partition` required.
    Gnip {
        stream_type: String,
        account: String,
        label: String,
        username: String,
        password: String,
    },
    /// X API v2: a path such as `/2/tweets/sample10/stream`, Bearer auth, gzip optional.
    /// Unpartitioned paths (the filtered stream) have one partition and take no parameter.
    V2 {
        path: String,
        bearer_token: String,
        #[serde(default)]
        partitioned: bool,
    },
}

/// What activities look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Native-format posts and retweets with occasional post deletions.
    #[default]
    Posts,
    /// Posts in Activity Streams format.
    ActivityStreams,
    /// Likes with occasional unlikes.
    Likes,
    /// X API v2 payloads (`data.id`).
    V2Posts,
}

/// Generation rate over time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case", deny_unknown_fields)]
pub enum RateProfile {
    /// A steady rate.
    Constant { per_sec: f64 },
    /// A base rate with a burst of `burst_per_sec` for `burst_ms` every `every_ms`.
    Bursts {
        per_sec: f64,
        burst_per_sec: f64,
        every_ms: u64,
        burst_ms: u64,
    },
    /// A steady rate with nothing at all for `quiet_ms` every `every_ms`.
    Quiet {
        per_sec: f64,
        every_ms: u64,
        quiet_ms: u64,
    },
}

impl Default for RateProfile {
    fn default() -> Self {
        RateProfile::Constant { per_sec: 200.0 }
    }
}

impl RateProfile {
    /// The rate in effect `elapsed_ms` after the generator started.
    pub fn rate_at(&self, elapsed_ms: u64) -> f64 {
        match *self {
            RateProfile::Constant { per_sec } => per_sec,
            RateProfile::Bursts {
                per_sec,
                burst_per_sec,
                every_ms,
                burst_ms,
            } => {
                if every_ms > 0 && elapsed_ms % every_ms < burst_ms {
                    burst_per_sec
                } else {
                    per_sec
                }
            }
            RateProfile::Quiet {
                per_sec,
                every_ms,
                quiet_ms,
            } => {
                if every_ms > 0 && elapsed_ms % every_ms >= every_ms.saturating_sub(quiet_ms) {
                    0.0
                } else {
                    per_sec
                }
            }
        }
    }
}

/// Full-speed streaming of a pre-encoded corpus, for benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// Activities each connection sends per partition before going idle (heartbeats only).
    pub activities_per_partition: u64,
}

impl StreamConfig {
    /// A Gnip Decahose stream (`sample10`, 2 partitions) with the given credentials.
    pub fn decahose(name: &str, account: &str, username: &str, password: &str) -> Self {
        StreamConfig {
            name: name.to_owned(),
            api: Api::Gnip {
                stream_type: "sample10".to_owned(),
                account: account.to_owned(),
                label: "prod".to_owned(),
                username: username.to_owned(),
                password: password.to_owned(),
            },
            partitions: 2,
            content: Content::Posts,
            rate: RateProfile::default(),
            info_every: default_info_every(),
            heartbeat_interval_ms: None,
            max_connections_per_partition: default_max_connections(),
            connect_limit: default_connect_limit(),
            connect_window_ms: default_connect_window_ms(),
            minute_ms: default_minute_ms(),
            max_backfill_minutes: default_max_backfill_minutes(),
            retention_ms: default_retention_ms(),
            max_retained_per_partition: default_max_retained(),
            max_recovery_jobs: default_recovery_jobs(),
            recovery_rate_per_sec: default_recovery_rate(),
            corpus: None,
        }
    }

    /// An X API v2 stream at `path` with a bearer token.
    pub fn v2(name: &str, path: &str, bearer_token: &str, partitions: u32) -> Self {
        StreamConfig {
            api: Api::V2 {
                path: path.to_owned(),
                bearer_token: bearer_token.to_owned(),
                partitioned: partitions > 1
                    || path.contains("sample10")
                    || path.contains("firehose"),
            },
            partitions,
            content: Content::V2Posts,
            ..StreamConfig::decahose(name, "", "", "")
        }
    }

    /// The URL path the stream is served under.
    pub fn url_path(&self) -> String {
        match &self.api {
            Api::Gnip {
                stream_type,
                account,
                label,
                ..
            } => {
                format!("/stream/{stream_type}/accounts/{account}/publishers/twitter/{label}.json")
            }
            Api::V2 { path, .. } => path.clone(),
        }
    }

    /// The heartbeat interval in effect: configured, or the API's documented one.
    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_interval_ms.unwrap_or(match self.api {
            Api::Gnip { .. } => 10_000,
            Api::V2 { .. } => 20_000,
        })
    }

    /// The account recovery jobs are limited by (v2: the stream itself).
    pub fn account(&self) -> String {
        match &self.api {
            Api::Gnip { account, .. } => account.clone(),
            Api::V2 { path, .. } => path.clone(),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: default_listen(),
            tls: None,
            streams: default_streams(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_streams() -> Vec<StreamConfig> {
    vec![StreamConfig::decahose(
        "decahose",
        "demo",
        "demo@example.com",
        "demo-password",
    )]
}
fn default_tls_names() -> Vec<String> {
    vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
}
fn default_partitions() -> u32 {
    2
}
fn default_info_every() -> u64 {
    5_000
}
fn default_max_connections() -> usize {
    2
}
fn default_connect_limit() -> usize {
    10
}
fn default_connect_window_ms() -> u64 {
    60_000
}
fn default_minute_ms() -> u64 {
    60_000
}
fn default_max_backfill_minutes() -> u64 {
    5
}
fn default_retention_ms() -> u64 {
    5 * 24 * 3600 * 1000
}
fn default_max_retained() -> usize {
    1_000_000
}
fn default_recovery_jobs() -> usize {
    2
}
fn default_recovery_rate() -> u64 {
    5_000
}

//! The configuration document. Every field's `///` doc is its reference entry.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_conn::{
    BackfillConfig, BudgetConfig, LivenessConfig, PathConfig, ReadConfig, RetryConfig,
};
use tandem_merge::MergeConfig;
use tandem_monitor::MonitorConfig;
use tandem_pair::PairConfig;
use tandem_repair::RepairConfig;
use tandem_sink::DriverConfig;
pub use tandem_sink::SinkConfig;

/// A tandem process: its streams, network paths, sinks and the shared stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The upstream streams this process consumes (`[[stream]]`).
    #[serde(rename = "stream", default)]
    pub streams: Vec<StreamConfig>,
    /// The network paths connections leave through (`[[path]]`), referenced by name.
    #[serde(rename = "path", default)]
    pub paths: Vec<PathConfig>,
    /// Where unique activities are stored (`[sinks.<name>]`), referenced by name.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Deduplication settings, shared by every stream.
    #[serde(default)]
    pub merge: MergeConfig,
    /// Buffering, spooling and retry between the mergers and the stores.
    #[serde(default)]
    pub delivery: DriverConfig,
    /// Alert thresholds and the HTTP endpoint.
    #[serde(default)]
    pub monitor: MonitorConfig,
    /// The coverage ledger and recovery of gaps longer than backfill reaches.
    #[serde(default)]
    pub repair: RepairConfig,
    /// This consumer as one of a pair in two zones, coordinated through the NATS cluster
    /// they share (`[pair]`): shared liveness, coverage, recovery jobs and connect budget.
    #[serde(default)]
    pub pair: Option<PairConfig>,
}

/// Which upstream API a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiConfig {
    /// Gnip 2.0 volume streams (Decahose, Firehose, Likes): Basic auth.
    Gnip,
    /// X API v2 streams: Bearer auth.
    XV2,
}

/// One upstream stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Name of the stream: the `stream` label, file directory and subject part. Letters,
    /// digits, `-` and `_`.
    pub name: String,
    /// `gnip` or `x_v2`.
    pub api: ApiConfig,
    /// The live stream URL, e.g.
    /// `https://gnip-stream.x.com/stream/sample10/accounts/ACME/publishers/twitter/prod.json`.
    /// Query parameters of its own (X API v2 `tweet.fields`, `expansions`) are kept on
    /// every request.
    pub url: String,
    /// Where recovery requests go. Gnip serves recovery on its own host and path, e.g.
    /// `https://stream-data-api.x.com/stream/powertrack/accounts/ACME/publishers/twitter/powertrack.json`:
    /// required for Gnip streams other than likes. X API v2 recovers on the live URL,
    /// the default there.
    #[serde(default)]
    pub recovery_url: Option<String>,
    /// Number of partitions, numbered from 1 (Decahose: 2, Firehose: 20). For an
    /// unpartitioned v2 stream (the filtered stream) set 1 and `partitioned = false`.
    pub partitions: u32,
    /// Only these partitions (when partitions are split across consumer pairs);
    /// default: all.
    #[serde(default)]
    pub only_partitions: Option<Vec<u32>>,
    /// Whether the `partition` parameter is sent (always for Gnip).
    #[serde(default = "yes")]
    pub partitioned: bool,
    /// Names of the paths the connections of each partition use, one connection per path.
    pub paths: Vec<String>,
    /// Name of the sink the stream's unique activities go to.
    pub sink: String,
    /// A likes stream: there is no recovery API, so gaps beyond backfill are reported as
    /// unrecoverable.
    #[serde(default)]
    pub likes: bool,
    /// Credentials (never inline: from environment variables or files).
    pub auth: AuthConfig,
    /// An extra CA certificate (PEM file) to trust besides the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` URLs: only for test peers on loopback.
    #[serde(default)]
    pub allow_plain_http: bool,
    /// Reconnect schedule.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Heartbeat, silence and timeout thresholds.
    #[serde(default)]
    pub liveness: LivenessConfig,
    /// Backfill on reconnect.
    #[serde(default)]
    pub backfill: BackfillConfig,
    /// The connect budget shared by all connections of the stream.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// Read buffers and line limits.
    #[serde(default)]
    pub read: ReadConfig,
}

impl ApiConfig {
    /// The connection crate's name for the API.
    pub fn kind(self) -> tandem_conn::ApiKind {
        match self {
            ApiConfig::Gnip => tandem_conn::ApiKind::Gnip,
            ApiConfig::XV2 => tandem_conn::ApiKind::V2,
        }
    }
}

impl StreamConfig {
    /// Where recovery requests go: `recovery_url`, or the live URL where the API recovers
    /// there (X API v2).
    pub fn recovery_url(&self) -> &str {
        self.recovery_url.as_deref().unwrap_or(&self.url)
    }
}

fn yes() -> bool {
    true
}

/// Where credentials come from. Exactly one source per secret.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Basic-auth user name (Gnip: the account e-mail).
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the Basic-auth password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the Basic-auth password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the bearer token (X API v2).
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// File holding the bearer token.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
}

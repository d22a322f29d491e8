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
    /// Address of the live host (streams and the admin API); port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the recovery host, which serves Gnip recovery requests only (the real
    /// service's `stream-data-api.x.com`, another host than the live stream); port 0
    /// picks a free port. X API v2 keeps recovery on its live endpoint.
    #[serde(default = "default_listen")]
    pub recovery_listen: SocketAddr,
    /// Serve HTTPS with a generated certificate instead of plain HTTP, on both listeners
    /// (one certificate, valid for every name in `names`).
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
    /// Activities per second each connection sends (a fixed offered rate, for latency);
    /// none: as fast as the client reads. The corpus goes in chunks of about 14
    /// activities, each when its first activity is due, with no heartbeat in between: keep
    /// a chunk's interval under the heartbeat interval.
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
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

    /// The X API v2 filtered stream (`/2/tweets/search/stream`): one unpartitioned
    /// partition.
    pub fn v2_filtered(name: &str, bearer_token: &str) -> Self {
        StreamConfig::v2_at(name, "/2/tweets/search/stream", bearer_token, 1, false)
    }

    /// The X API v2 Decahose (`/2/tweets/sample10/stream`): 2 partitions, `partition`
    /// required.
    pub fn v2_sample10(name: &str, bearer_token: &str) -> Self {
        StreamConfig::v2_at(name, "/2/tweets/sample10/stream", bearer_token, 2, true)
    }

    /// The X API v2 Firehose (`/2/tweets/firehose/stream`): 20 partitions, `partition`
    /// required.
    pub fn v2_firehose(name: &str, bearer_token: &str) -> Self {
        StreamConfig::v2_at(name, "/2/tweets/firehose/stream", bearer_token, 20, true)
    }

    fn v2_at(
        name: &str,
        path: &str,
        bearer_token: &str,
        partitions: u32,
        partitioned: bool,
    ) -> Self {
        StreamConfig {
            api: Api::V2 {
                path: path.to_owned(),
                bearer_token: bearer_token.to_owned(),
                partitioned,
            },
            partitions,
            content: Content::V2Posts,
            // The v2 documents: recovery reaches the last 24 hours.
            retention_ms: 24 * 3600 * 1000,
            ..StreamConfig::decahose(name, "", "", "")
        }
    }

    /// An X API v2 stream at `path` with a bearer token; partitioned when it has more than
    /// one partition or its path is a volume stream's.
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

    /// Whether the stream speaks X API v2.
    pub fn is_v2(&self) -> bool {
        matches!(self.api, Api::V2 { .. })
    }

    /// The secret a client must present: the Gnip password or the v2 bearer token.
    pub fn secret(&self) -> &str {
        match &self.api {
            Api::Gnip { password, .. } => password,
            Api::V2 { bearer_token, .. } => bearer_token,
        }
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
            recovery_listen: default_listen(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each API heartbeats at its documented interval unless configured otherwise.
    #[test]
    fn heartbeat_defaults_per_api() {
        assert_eq!(
            StreamConfig::decahose("d", "a", "u", "p").heartbeat_ms(),
            10_000
        );
        for v2 in [
            StreamConfig::v2_filtered("f", "t"),
            StreamConfig::v2_sample10("s", "t"),
            StreamConfig::v2_firehose("h", "t"),
            StreamConfig::v2("x", "/2/tweets/search/stream", "t", 1),
        ] {
            assert_eq!(v2.heartbeat_ms(), 20_000, "{}", v2.url_path());
        }
        let mut fast = StreamConfig::v2_filtered("f", "t");
        fast.heartbeat_interval_ms = Some(500);
        assert_eq!(fast.heartbeat_ms(), 500);
    }

    /// The recovery listener defaults to an ephemeral loopback port, like the live one.
    #[test]
    fn recovery_listen_defaults_to_loopback() {
        let cfg: SimConfig = serde_json::from_str(r#"{"listen":"127.0.0.1:8080"}"#).unwrap();
        assert_eq!(cfg.listen.port(), 8080);
        assert_eq!(cfg.recovery_listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(SimConfig::default().recovery_listen.port(), 0);
    }
}

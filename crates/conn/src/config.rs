//! Connection settings: network paths, the retry schedule, liveness thresholds, backfill
//! policy and the shared connect budget. Field docs are the configuration reference.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::connection::ApiKind;

/// A way out of this host to the upstream. Each path gets its own HTTP client, so two
/// connections of a partition share no socket, pool or resolver result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// Name of the path, used as the `path` label and in logs.
    pub name: String,
    /// Local source address to bind outgoing connections to.
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// Network interface to bind to (SO_BINDTODEVICE; Linux, needs CAP_NET_RAW).
    #[serde(default)]
    pub interface: Option<String>,
    /// HTTP or HTTPS proxy URL for this path (`http://proxy-a:3128`).
    #[serde(default)]
    pub proxy: Option<String>,
    /// Connect to this IP instead of resolving the upstream host; the host name is kept
    /// for TLS (SNI and certificate verification).
    #[serde(default)]
    pub resolve_ip: Option<IpAddr>,
}

/// The reconnect schedule, per error class (UPSTREAM.md, "Reconnect timing"). Mirrors the
/// X SDK's `StreamConfig` (`max_retries`, backoffs, multiplier, jitter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Consecutive failed attempts before a connection gives up; absent: retry forever.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Reconnect at once (no delay) the first time a connection that had been healthy
    /// drops.
    #[serde(default = "yes")]
    pub immediate_first_reconnect: bool,
    /// A connection counts as healthy once it has been live this long; only then are the
    /// retry counters reset (a connection that dies within seconds does not reset them).
    #[serde(default = "default_healthy_after_ms")]
    pub healthy_after_ms: u64,
    /// Network errors (TCP/TLS errors, resets, EOF, timeouts, stale connections): the first
    /// delay of the linear schedule.
    #[serde(default = "default_network_initial_ms")]
    pub network_initial_backoff_ms: u64,
    /// Network errors: the delay grows by this much per attempt.
    #[serde(default = "default_network_step_ms")]
    pub network_backoff_step_ms: u64,
    /// Network errors: the longest delay.
    #[serde(default = "default_network_max_ms")]
    pub network_max_backoff_ms: u64,
    /// HTTP errors (5xx): the first delay of the exponential schedule.
    #[serde(default = "default_http_initial_ms")]
    pub http_initial_backoff_ms: u64,
    /// HTTP errors: the factor between consecutive delays.
    #[serde(default = "default_multiplier")]
    pub backoff_multiplier: f64,
    /// HTTP errors: the longest delay.
    #[serde(default = "default_http_max_ms")]
    pub http_max_backoff_ms: u64,
    /// 429: the first delay (the upstream asks for at least a minute, so it may not be
    /// below `backfill.minute_ms`); doubles per attempt. A `Retry-After` or
    /// `x-rate-limit-reset` header that asks for longer wins.
    #[serde(default = "default_rate_limit_initial_ms")]
    pub rate_limit_initial_backoff_ms: u64,
    /// 429: the longest delay.
    #[serde(default = "default_rate_limit_max_ms")]
    pub rate_limit_max_backoff_ms: u64,
    /// Refusals (401, 403, 406 and other 4xx, an eviction by a newer connection over the
    /// partition's limit): the first delay of a slow exponential schedule (doubling).
    /// The credentials are read again before each attempt; `connection_fatal` fires
    /// until a connect succeeds.
    #[serde(default = "default_refused_initial_ms")]
    pub refused_initial_backoff_ms: u64,
    /// Refusals: the longest delay.
    #[serde(default = "default_refused_max_ms")]
    pub refused_max_backoff_ms: u64,
    /// Spread each delay randomly by ±20 % so that connections do not reconnect in step.
    #[serde(default = "yes")]
    pub jitter: bool,
    /// A 503 that persists this long raises an escalation (alert); retries continue.
    #[serde(default = "default_escalate_ms")]
    pub escalate_503_after_ms: u64,
}

/// How a connection notices that it is dead while its socket still looks open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivenessConfig {
    /// The upstream's heartbeat interval; absent: the API's documented one (Gnip 10 s,
    /// X API v2 20 s).
    #[serde(default)]
    pub heartbeat_interval_ms: Option<u64>,
    /// A connection that received no byte at all for the heartbeat interval plus this
    /// margin is stale and is reconnected.
    #[serde(default = "default_heartbeat_margin_ms")]
    pub heartbeat_margin_ms: u64,
    /// A connection that received no activity for this long while a sibling path of the
    /// same partition did is stale and is reconnected (data silence).
    #[serde(default = "default_data_silence_ms")]
    pub data_silence_ms: u64,
    /// With no sibling path in this process (one path per process), a connection whose
    /// partition ran at least `silence_min_rate_per_sec` is stale once silent for this
    /// many times its average gap between activities (and at least `data_silence_ms`).
    #[serde(default = "default_silence_rate_multiple")]
    pub silence_rate_multiple: f64,
    /// Below this many activities per second the partition's rate is too thin to judge
    /// silence by.
    #[serde(default = "default_silence_min_rate")]
    pub silence_min_rate_per_sec: f64,
    /// Socket read timeout (the HTTP client's own). Must exceed 30 s for Gnip; the
    /// heartbeat and silence checks above detect trouble much sooner.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Connect (TCP + TLS) timeout.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// An activity's creation time further ahead of the host clock (corrected by the
    /// upstream's `Date` header) than this is clamped before it counts as coverage, and
    /// counted; an upstream clock this far from the host's raises an alert.
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
}

fn default_silence_rate_multiple() -> f64 {
    100.0
}
fn default_silence_min_rate() -> f64 {
    1.0
}
fn default_max_clock_skew_ms() -> u64 {
    5_000
}

/// Whether a reconnect asks the upstream to replay recent minutes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackfillPolicy {
    /// Backfill only when the partition had no live connection: `ceil(gap)` minutes.
    #[default]
    Auto,
    /// Always ask for the whole backfill window (duplicates are removed downstream).
    Always,
    /// Never backfill (gap repair is left to recovery).
    Never,
}

/// Backfill settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillConfig {
    /// When to ask for backfill.
    #[serde(default)]
    pub policy: BackfillPolicy,
    /// The longest backfill the upstream offers, in minutes (1 to 5).
    #[serde(default = "default_backfill_minutes")]
    pub window_minutes: u64,
    /// Length of a backfill minute in milliseconds: 60 000 against the real service;
    /// tests against a simulator with short minutes set both to the same value.
    #[serde(default = "default_minute_ms")]
    pub minute_ms: u64,
}

/// The connect budget shared by all connections of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Connection requests allowed per window (the upstream allows 10 per 60 s per
    /// stream; a pair of consumers on one stream should take 5 each).
    #[serde(default = "default_budget_requests")]
    pub requests: u32,
    /// The window, in milliseconds. A little longer than the upstream's, for clock skew.
    #[serde(default = "default_budget_window_ms")]
    pub window_ms: u64,
}

/// The reader's buffers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadConfig {
    /// Size of each inflate output buffer in bytes (the SDK's `chunk_size`).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_size_bytes: usize,
    /// Lines longer than this are skipped and counted, never delivered.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// Batches buffered towards the merger before reading pauses (backpressure).
    #[serde(default = "default_channel_batches")]
    pub channel_batches: usize,
}

macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty { $value })*
    };
}

defaults! {
    yes: bool = true;
    default_healthy_after_ms: u64 = 30_000;
    default_network_initial_ms: u64 = 250;
    default_network_step_ms: u64 = 250;
    default_network_max_ms: u64 = 16_000;
    default_http_initial_ms: u64 = 5_000;
    default_multiplier: f64 = 2.0;
    default_http_max_ms: u64 = 320_000;
    default_rate_limit_initial_ms: u64 = 60_000;
    default_rate_limit_max_ms: u64 = 960_000;
    default_escalate_ms: u64 = 600_000;
    default_refused_initial_ms: u64 = 120_000;
    default_refused_max_ms: u64 = 900_000;
    default_heartbeat_margin_ms: u64 = 5_000;
    default_data_silence_ms: u64 = 5_000;
    default_read_timeout_ms: u64 = 35_000;
    default_connect_timeout_ms: u64 = 10_000;
    default_backfill_minutes: u64 = 5;
    default_minute_ms: u64 = 60_000;
    default_budget_requests: u32 = 10;
    default_budget_window_ms: u64 = 61_000;
    default_chunk_bytes: usize = 64 * 1024;
    default_max_line_bytes: usize = 1024 * 1024;
    default_channel_batches: usize = 64;
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: None,
            immediate_first_reconnect: true,
            healthy_after_ms: default_healthy_after_ms(),
            network_initial_backoff_ms: default_network_initial_ms(),
            network_backoff_step_ms: default_network_step_ms(),
            network_max_backoff_ms: default_network_max_ms(),
            http_initial_backoff_ms: default_http_initial_ms(),
            backoff_multiplier: default_multiplier(),
            http_max_backoff_ms: default_http_max_ms(),
            rate_limit_initial_backoff_ms: default_rate_limit_initial_ms(),
            rate_limit_max_backoff_ms: default_rate_limit_max_ms(),
            refused_initial_backoff_ms: default_refused_initial_ms(),
            refused_max_backoff_ms: default_refused_max_ms(),
            jitter: true,
            escalate_503_after_ms: default_escalate_ms(),
        }
    }
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval_ms: None,
            heartbeat_margin_ms: default_heartbeat_margin_ms(),
            data_silence_ms: default_data_silence_ms(),
            silence_rate_multiple: default_silence_rate_multiple(),
            silence_min_rate_per_sec: default_silence_min_rate(),
            read_timeout_ms: default_read_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_clock_skew_ms: default_max_clock_skew_ms(),
        }
    }
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            policy: BackfillPolicy::Auto,
            window_minutes: default_backfill_minutes(),
            minute_ms: default_minute_ms(),
        }
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            requests: default_budget_requests(),
            window_ms: default_budget_window_ms(),
        }
    }
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            chunk_size_bytes: default_chunk_bytes(),
            max_line_bytes: default_max_line_bytes(),
            channel_batches: default_channel_batches(),
        }
    }
}

/// A setting that cannot work, with the field that causes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        field,
        message: message.into(),
    }
}

impl RetryConfig {
    /// Every problem with the schedule. `minute_ms` is the length of an upstream minute
    /// (`backfill.minute_ms`: 60 000 against the real service).
    pub fn problems(&self, minute_ms: u64) -> Vec<InvalidSetting> {
        let mut out = Vec::new();
        if self.backoff_multiplier < 1.0 || !self.backoff_multiplier.is_finite() {
            out.push(invalid(
                "backoff_multiplier",
                "must be a number of at least 1.0",
            ));
        }
        for (field, initial, max) in [
            (
                "network_max_backoff_ms",
                self.network_initial_backoff_ms,
                self.network_max_backoff_ms,
            ),
            (
                "http_max_backoff_ms",
                self.http_initial_backoff_ms,
                self.http_max_backoff_ms,
            ),
            (
                "rate_limit_max_backoff_ms",
                self.rate_limit_initial_backoff_ms,
                self.rate_limit_max_backoff_ms,
            ),
            (
                "refused_max_backoff_ms",
                self.refused_initial_backoff_ms,
                self.refused_max_backoff_ms,
            ),
        ] {
            if max < initial {
                out.push(invalid(
                    field,
                    format!("{max} is below the initial backoff {initial}"),
                ));
            }
        }
        if self.rate_limit_initial_backoff_ms < minute_ms {
            out.push(invalid(
                "rate_limit_initial_backoff_ms",
                format!("the upstream asks for at least a minute ({minute_ms} ms) after a 429"),
            ));
        }
        out
    }
}

impl LivenessConfig {
    /// The heartbeat interval in effect on a stream of `api`.
    pub fn heartbeat_ms(&self, api: ApiKind) -> u64 {
        self.heartbeat_interval_ms
            .unwrap_or_else(|| api.heartbeat_interval_ms())
    }

    /// How long a connection of `api` may receive no byte at all before it is stale.
    pub fn quiet_limit(&self, api: ApiKind) -> Duration {
        Duration::from_millis(self.heartbeat_ms(api) + self.heartbeat_margin_ms)
    }

    /// Every problem with the thresholds on a stream of `api` (Gnip adds its read-timeout
    /// rule).
    pub fn problems(&self, api: ApiKind) -> Vec<InvalidSetting> {
        let mut out = Vec::new();
        let gnip = api == ApiKind::Gnip;
        if self.heartbeat_interval_ms == Some(0) {
            out.push(invalid("heartbeat_interval_ms", "must be positive"));
        }
        if self.data_silence_ms == 0 {
            out.push(invalid("data_silence_ms", "must be positive"));
        }
        if !(self.silence_rate_multiple.is_finite() && self.silence_rate_multiple >= 1.0) {
            out.push(invalid(
                "silence_rate_multiple",
                "must be a number of at least 1",
            ));
        }
        if !(self.silence_min_rate_per_sec.is_finite() && self.silence_min_rate_per_sec > 0.0) {
            out.push(invalid(
                "silence_min_rate_per_sec",
                "must be a positive number",
            ));
        }
        if gnip && self.read_timeout_ms <= 30_000 {
            out.push(invalid(
                "read_timeout_ms",
                format!(
                    "{} ms; Gnip requires a read timeout above 30000 ms",
                    self.read_timeout_ms
                ),
            ));
        }
        if self.read_timeout_ms <= self.heartbeat_ms(api) {
            out.push(invalid(
                "read_timeout_ms",
                "must exceed the heartbeat interval, or every quiet period causes a reconnect",
            ));
        }
        out
    }
}

impl BackfillConfig {
    /// Every problem with the backfill settings.
    pub fn problems(&self) -> Vec<InvalidSetting> {
        let mut out = Vec::new();
        if !(1..=5).contains(&self.window_minutes) {
            out.push(invalid(
                "window_minutes",
                format!(
                    "{} minutes; the upstream offers 1 to 5",
                    self.window_minutes
                ),
            ));
        }
        if self.minute_ms == 0 {
            out.push(invalid("minute_ms", "must be positive"));
        }
        out
    }
}

impl BudgetConfig {
    /// Every problem with the budget.
    pub fn problems(&self) -> Vec<InvalidSetting> {
        let mut out = Vec::new();
        if self.requests == 0 {
            out.push(invalid("requests", "must allow at least one request"));
        }
        if self.window_ms == 0 {
            out.push(invalid("window_ms", "must be positive"));
        }
        out
    }
}

impl ReadConfig {
    /// Every problem with the buffer sizes.
    pub fn problems(&self) -> Vec<InvalidSetting> {
        let mut out = Vec::new();
        if self.chunk_size_bytes < 1024 {
            out.push(invalid("chunk_size_bytes", "must be at least 1024"));
        }
        if self.max_line_bytes < 1024 {
            out.push(invalid("max_line_bytes", "must be at least 1024"));
        }
        if self.channel_batches == 0 {
            out.push(invalid("channel_batches", "must be positive"));
        }
        out
    }
}

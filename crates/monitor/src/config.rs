//! Monitor settings. Field docs are the configuration reference.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz`, `/readyz` and `/status`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How often conditions are evaluated.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Every activity counted unique this long ago must be stored or in flight by now;
    /// otherwise `reconciliation_mismatch` fires.
    #[serde(default = "default_grace_secs")]
    pub reconciliation_grace_secs: u64,
    /// How long a partition may have no live connection before `partition_down` fires.
    #[serde(default = "default_down_secs")]
    pub partition_down_pending_secs: f64,
    /// How long a partition may run below its configured connections before
    /// `partition_imbalance` fires.
    #[serde(default = "default_imbalance_secs")]
    pub imbalance_pending_secs: f64,
    /// `stored_rate_drop` fires when the short-term stored rate falls below this fraction
    /// of its baseline.
    #[serde(default = "default_drop_ratio")]
    pub stored_rate_drop_ratio: f64,
    /// Time constant of the stored-rate baseline (an exponentially weighted average).
    #[serde(default = "default_baseline_secs")]
    pub stored_rate_baseline_secs: f64,
    /// How long the drop must last before the warning fires.
    #[serde(default = "default_drop_pending_secs")]
    pub stored_rate_pending_secs: f64,
    /// Baselines below this many activities per second are too thin to judge.
    #[serde(default = "default_min_rate")]
    pub stored_rate_min_per_sec: f64,
    /// How long `gap_unrecoverable` fires after a gap is found that the upstream cannot
    /// replay (the data of that interval is lost; the alert is a notice, not a state).
    #[serde(default = "default_unrecoverable_secs")]
    pub unrecoverable_gap_alert_secs: u64,
    /// `upstream_rate_limited` fires when a connection is refused with 429 this many times
    /// in a row; its next successful connect resolves it.
    #[serde(default = "default_rate_limited_after")]
    pub rate_limited_after: u32,
    /// Alertmanager-compatible endpoint (`http://alertmanager:9093`) that receives every
    /// firing and resolved alert (`POST /api/v2/alerts`).
    #[serde(default)]
    pub webhook_url: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_tick_ms() -> u64 {
    250
}
fn default_grace_secs() -> u64 {
    30
}
fn default_down_secs() -> f64 {
    5.0
}
fn default_imbalance_secs() -> f64 {
    10.0
}
fn default_drop_ratio() -> f64 {
    0.5
}
fn default_baseline_secs() -> f64 {
    300.0
}
fn default_drop_pending_secs() -> f64 {
    30.0
}
fn default_min_rate() -> f64 {
    1.0
}
fn default_rate_limited_after() -> u32 {
    2
}
fn default_unrecoverable_secs() -> u64 {
    3_600
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            listen: default_listen(),
            tick_ms: default_tick_ms(),
            reconciliation_grace_secs: default_grace_secs(),
            partition_down_pending_secs: default_down_secs(),
            imbalance_pending_secs: default_imbalance_secs(),
            stored_rate_drop_ratio: default_drop_ratio(),
            stored_rate_baseline_secs: default_baseline_secs(),
            stored_rate_pending_secs: default_drop_pending_secs(),
            stored_rate_min_per_sec: default_min_rate(),
            unrecoverable_gap_alert_secs: default_unrecoverable_secs(),
            rate_limited_after: default_rate_limited_after(),
            webhook_url: None,
        }
    }
}

impl MonitorConfig {
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.tick_ms == 0 {
            out.push(("tick_ms", "must be positive".to_owned()));
        }
        if !(0.0..1.0).contains(&self.stored_rate_drop_ratio) {
            out.push((
                "stored_rate_drop_ratio",
                format!("{} is not between 0 and 1", self.stored_rate_drop_ratio),
            ));
        }
        if self.stored_rate_baseline_secs <= 0.0 {
            out.push(("stored_rate_baseline_secs", "must be positive".to_owned()));
        }
        for (field, v) in [
            (
                "partition_down_pending_secs",
                self.partition_down_pending_secs,
            ),
            ("imbalance_pending_secs", self.imbalance_pending_secs),
            ("stored_rate_pending_secs", self.stored_rate_pending_secs),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                out.push((field, "must be zero or more".to_owned()));
            }
        }
        if let Some(url) = &self.webhook_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            let url = tandem_core::redact_url(url);
            out.push(("webhook_url", format!("{url:?} is not an http(s) URL")));
        }
        out
    }
}

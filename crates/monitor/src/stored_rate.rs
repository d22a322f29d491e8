//! Stored-rate tracking: the rate at which each stream's activities reach the store, as a
//! short-term average (what `/status` shows as `stored_per_sec`) against a slow baseline,
//! both exponentially weighted. A short-term rate well below the baseline for a while
//! raises `stored_rate_drop`: the store or the upstream is losing volume.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::alert::{AlertBus, AlertName, key};
use crate::config::MonitorConfig;

/// Time constant of the short-term rate, in seconds.
const FAST_SECS: f64 = 5.0;

/// The stored rate of every stream.
#[derive(Debug, Default)]
pub(crate) struct StoredRate {
    streams: HashMap<Arc<str>, Rate>,
}

#[derive(Debug, Default)]
struct Rate {
    /// The previous sample: when, and the stored total then.
    last: Option<(Instant, u64)>,
    fast: f64,
    baseline: f64,
    samples: u64,
}

impl StoredRate {
    /// Follows the stored total of a stream and judges `stored_rate_drop`. Returns the
    /// short-term rate, per second.
    pub(crate) fn evaluate(
        &mut self,
        alerts: &mut AlertBus,
        cfg: &MonitorConfig,
        stream: &Arc<str>,
        stored: u64,
        now: Instant,
    ) -> f64 {
        let rate = self.streams.entry(stream.clone()).or_default();
        if !rate.sample(stored, now, cfg.stored_rate_baseline_secs) {
            return rate.fast;
        }
        let (fast, baseline) = (rate.fast, rate.baseline);
        let dropped =
            baseline >= cfg.stored_rate_min_per_sec && fast < cfg.stored_rate_drop_ratio * baseline;
        alerts.observe(
            key(AlertName::StoredRateDrop, stream, None, None),
            dropped,
            Duration::from_secs_f64(cfg.stored_rate_pending_secs),
            || format!("stored {fast:.1}/s against a baseline of {baseline:.1}/s"),
            now,
        );
        fast
    }
}

impl Rate {
    /// Takes in the stored total of `now`. False when there is no interval to measure yet
    /// (the first sample, or no time passed).
    fn sample(&mut self, stored: u64, now: Instant, baseline_secs: f64) -> bool {
        let Some((at, before)) = self.last.replace((now, stored)) else {
            return false;
        };
        let dt = now.duration_since(at).as_secs_f64();
        if dt <= 0.0 {
            return false;
        }
        let rate = stored.saturating_sub(before) as f64 / dt;
        let alpha = |tau: f64| 1.0 - (-dt / tau).exp();
        self.samples += 1;
        if self.samples == 1 {
            self.fast = rate;
            self.baseline = rate;
        } else {
            self.fast += alpha(FAST_SECS) * (rate - self.fast);
            self.baseline += alpha(baseline_secs) * (rate - self.baseline);
        }
        true
    }
}

//! The reconnect policy: given why a connection ended and how long it had been live, when
//! (and whether) to try again. Pure logic, apart from the connection loop (STYLE: policy
//! apart from mechanism), so the schedules are tested without any network.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::error::{ErrorKind, StreamError};

/// What to do after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try again after `delay`; `attempt` counts consecutive failures.
    Retry { delay: Duration, attempt: u32 },
    /// Stop this connection for good.
    GiveUp(StreamError),
}

/// Per-connection reconnect state.
#[derive(Debug)]
pub struct ReconnectPolicy {
    cfg: RetryConfig,
    failures: u32,
    network: u32,
    http: u32,
    rate_limited: u32,
    refused: u32,
    first_503: Option<Instant>,
    rng: fastrand::Rng,
}

impl ReconnectPolicy {
    pub fn new(cfg: RetryConfig, seed: u64) -> ReconnectPolicy {
        ReconnectPolicy {
            cfg,
            failures: 0,
            network: 0,
            http: 0,
            rate_limited: 0,
            refused: 0,
            first_503: None,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Consecutive failures since the last healthy connection.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Decides after a connection ended or an attempt failed. `live_for` is how long the
    /// connection had been established (`None`: it never was).
    pub fn decide(
        &mut self,
        err: &StreamError,
        live_for: Option<Duration>,
        now: Instant,
    ) -> Decision {
        if !err.is_retryable() {
            return Decision::GiveUp(err.clone());
        }
        let healthy =
            live_for.is_some_and(|d| d >= Duration::from_millis(self.cfg.healthy_after_ms));
        if healthy {
            self.failures = 0;
            self.network = 0;
            self.http = 0;
            self.rate_limited = 0;
            // Evictions in a row keep doubling however long each connection lived: two
            // consumers taking one slot from each other back off instead of trading it.
            if err.kind != ErrorKind::Evicted {
                self.refused = 0;
            }
        }
        if err.status == Some(503) {
            self.first_503.get_or_insert(now);
        } else {
            self.first_503 = None;
        }
        self.failures += 1;
        if let Some(max) = self.cfg.max_retries
            && self.failures > max
        {
            let mut last = err.clone();
            last.kind = ErrorKind::Fatal;
            last.message = format!("gave up after {max} retries; last error: {}", err.message);
            return Decision::GiveUp(last);
        }
        // A healthy connection that drops reconnects at once, as does the first operational
        // disconnect since then (the upstream's own maintenance) — but never a refusal.
        let first = healthy || (err.kind == ErrorKind::Operational && self.failures == 1);
        if first && self.cfg.immediate_first_reconnect && !err.kind.is_refusal() {
            return Decision::Retry {
                delay: Duration::ZERO,
                attempt: self.failures,
            };
        }
        let (base_ms, floor_ms) = self.schedule(err);
        let c = &self.cfg;
        let ms = if c.jitter {
            let factor = 0.8 + 0.4 * self.rng.f64();
            ((base_ms as f64 * factor) as u64).max(floor_ms)
        } else {
            base_ms
        };
        Decision::Retry {
            delay: Duration::from_millis(ms),
            attempt: self.failures,
        }
    }

    /// The delay the error's class calls for before jitter, and the floor jitter may not
    /// go below (what the upstream asked for; a minute after a 429).
    fn schedule(&mut self, err: &StreamError) -> (u64, u64) {
        let c = &self.cfg;
        let asked = err.retry_after.map_or(0, |d| d.as_millis() as u64);
        match err.kind {
            ErrorKind::RateLimited => {
                self.rate_limited += 1;
                let ms = exponential(
                    c.rate_limit_initial_backoff_ms,
                    2.0,
                    self.rate_limited,
                    c.rate_limit_max_backoff_ms,
                );
                (ms.max(asked), c.rate_limit_initial_backoff_ms.max(asked))
            }
            kind if kind.is_refusal() => {
                self.refused += 1;
                let ms = exponential(
                    c.refused_initial_backoff_ms,
                    2.0,
                    self.refused,
                    c.refused_max_backoff_ms,
                );
                (ms.max(asked), asked)
            }
            ErrorKind::ServerError => {
                self.http += 1;
                let ms = exponential(
                    c.http_initial_backoff_ms,
                    c.backoff_multiplier,
                    self.http,
                    c.http_max_backoff_ms,
                );
                (ms.max(asked), asked)
            }
            _ => {
                self.network += 1;
                let steps = c
                    .network_backoff_step_ms
                    .saturating_mul(u64::from(self.network - 1));
                let ms = c
                    .network_initial_backoff_ms
                    .saturating_add(steps)
                    .min(c.network_max_backoff_ms);
                (ms, 0)
            }
        }
    }

    /// How long 503 answers have persisted, once past the escalation threshold.
    pub fn escalation(&self, now: Instant) -> Option<Duration> {
        let since = self.first_503?;
        let persisted = now.duration_since(since);
        (persisted >= Duration::from_millis(self.cfg.escalate_503_after_ms)).then_some(persisted)
    }
}

fn exponential(initial_ms: u64, multiplier: f64, n: u32, max_ms: u64) -> u64 {
    let v = initial_ms as f64 * multiplier.powi(n.saturating_sub(1).min(64) as i32);
    if v.is_finite() && v < max_ms as f64 {
        v as u64
    } else {
        max_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RetryConfig {
        RetryConfig {
            jitter: false,
            ..RetryConfig::default()
        }
    }

    fn delays(p: &mut ReconnectPolicy, err: &StreamError, n: usize) -> Vec<u64> {
        let now = Instant::now();
        (0..n)
            .map(|_| match p.decide(err, None, now) {
                Decision::Retry { delay, .. } => delay.as_millis() as u64,
                Decision::GiveUp(e) => panic!("gave up: {e}"),
            })
            .collect()
    }

    /// Network errors back off linearly by 250 ms up to 16 s.
    #[test]
    fn network_errors_are_linear() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let err = StreamError::new(ErrorKind::Connection, "refused");
        let d = delays(&mut p, &err, 70);
        assert_eq!(&d[..4], &[250, 500, 750, 1000]);
        assert_eq!(d[63], 16_000);
        assert_eq!(d[69], 16_000);
    }

    /// HTTP errors back off exponentially from 5 s up to 320 s.
    #[test]
    fn http_errors_are_exponential() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let err = StreamError::from_status(503, "", None);
        let d = delays(&mut p, &err, 9);
        assert_eq!(
            d,
            vec![
                5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 320_000, 320_000
            ]
        );
    }

    /// 429 waits at least a minute, doubles, and honours a longer Retry-After.
    #[test]
    fn rate_limits_wait_a_minute_and_double() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let err = StreamError::from_status(429, "", None);
        assert_eq!(delays(&mut p, &err, 3), vec![60_000, 120_000, 240_000]);
        let mut p = ReconnectPolicy::new(RetryConfig::default(), 7);
        let asked = StreamError::from_status(429, "", Some(Duration::from_secs(300)));
        for d in delays(&mut p, &asked, 3) {
            assert!(d >= 300_000, "{d}");
        }
        let mut p = ReconnectPolicy::new(RetryConfig::default(), 9);
        for d in delays(&mut p, &err, 20) {
            assert!(d >= 60_000, "jitter never goes below the minute: {d}");
        }
    }

    /// A healthy connection that drops reconnects at once, and only the first time.
    #[test]
    fn immediate_first_reconnect_after_healthy() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let now = Instant::now();
        let err = StreamError::new(ErrorKind::StreamInterrupted, "eof");
        let d = p.decide(&err, Some(Duration::from_secs(3600)), now);
        assert_eq!(
            d,
            Decision::Retry {
                delay: Duration::ZERO,
                attempt: 1
            }
        );
        let d = p.decide(&err, None, now);
        assert_eq!(
            d,
            Decision::Retry {
                delay: Duration::from_millis(250),
                attempt: 2
            }
        );
    }

    /// A server that accepts and closes at once gets growing delays: the short-lived
    /// connections never reset the counters, so there is no tight loop.
    #[test]
    fn accept_then_close_backs_off() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let now = Instant::now();
        let err = StreamError::new(ErrorKind::StreamInterrupted, "closed");
        let d: Vec<Duration> = (0..4)
            .map(
                |_| match p.decide(&err, Some(Duration::from_millis(20)), now) {
                    Decision::Retry { delay, .. } => delay,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(d, [250, 500, 750, 1000].map(Duration::from_millis));
        assert_eq!(p.failures(), 4);
    }

    /// Refusals (401, 406, an eviction) are retried on the slow schedule, even after a
    /// healthy connection; an operational disconnect reconnects at once.
    #[test]
    fn refusals_are_slow_and_operational_disconnects_immediate() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let auth = StreamError::from_status(401, "", None);
        assert_eq!(
            delays(&mut p, &auth, 5),
            vec![120_000, 240_000, 480_000, 900_000, 900_000]
        );
        let now = Instant::now();
        let evicted = StreamError::new(ErrorKind::Evicted, "a newer connection");
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        for want in [120, 240, 480] {
            let d = p.decide(&evicted, Some(Duration::from_secs(3600)), now);
            assert!(
                matches!(d, Decision::Retry { delay, .. } if delay == Duration::from_secs(want)),
                "evictions in a row keep doubling: {d:?}"
            );
        }
        let op = StreamError::new(ErrorKind::Operational, "operational-disconnect");
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let d = p.decide(&op, Some(Duration::from_millis(10)), now);
        assert!(
            matches!(d, Decision::Retry { delay, .. } if delay.is_zero()),
            "{d:?}"
        );
        let d = p.decide(&op, Some(Duration::from_millis(10)), now);
        assert!(
            matches!(d, Decision::Retry { delay, .. } if !delay.is_zero()),
            "a second one in a row backs off: {d:?}"
        );
    }

    /// Fatal errors stop at once; max_retries stops after that many failures.
    #[test]
    fn giving_up() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let now = Instant::now();
        let fatal = StreamError::new(ErrorKind::Fatal, "invalid URL");
        assert!(
            matches!(p.decide(&fatal, None, now), Decision::GiveUp(e) if e.kind == ErrorKind::Fatal)
        );
        let mut p = ReconnectPolicy::new(
            RetryConfig {
                max_retries: Some(2),
                ..no_jitter()
            },
            1,
        );
        let err = StreamError::new(ErrorKind::Connection, "refused");
        assert!(matches!(p.decide(&err, None, now), Decision::Retry { .. }));
        assert!(matches!(p.decide(&err, None, now), Decision::Retry { .. }));
        assert!(
            matches!(p.decide(&err, None, now), Decision::GiveUp(e) if e.message.contains("gave up after 2"))
        );
    }

    /// 503 that persists past the threshold escalates, measured on tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn persistent_503_escalates() {
        let mut p = ReconnectPolicy::new(no_jitter(), 1);
        let err = StreamError::from_status(503, "", None);
        p.decide(&err, None, Instant::now());
        assert_eq!(p.escalation(Instant::now()), None);
        tokio::time::advance(Duration::from_secs(601)).await;
        p.decide(&err, None, Instant::now());
        assert!(p.escalation(Instant::now()).is_some());
        p.decide(
            &StreamError::new(ErrorKind::Connection, "x"),
            None,
            Instant::now(),
        );
        assert_eq!(p.escalation(Instant::now()), None);
    }
}

//! A lock-free latency histogram with log-spaced buckets, for percentiles of the time from
//! an activity's first receipt to its handoff to the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets grow by 1/8 of an octave from 1 µs: under 10 % relative error, up to ~18 min.
const SUB: u32 = 8;
const BUCKETS: usize = 30 * SUB as usize;

#[derive(Debug)]
pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(micros: u64) -> usize {
    let v = micros.max(1);
    let octave = 63 - v.leading_zeros();
    let frac = if octave >= 3 {
        ((v >> (octave - 3)) & 7) as u32
    } else {
        ((v << (3 - octave)) & 7) as u32
    };
    ((octave * SUB + frac) as usize).min(BUCKETS - 1)
}

fn bucket_micros(b: usize) -> f64 {
    let octave = b as u32 / SUB;
    let frac = b as u32 % SUB;
    2f64.powi(octave as i32) * (1.0 + f64::from(frac) / 8.0 + 1.0 / 16.0)
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        self.counts[bucket(d.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1), or `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(Duration::from_nanos((bucket_micros(b) * 1000.0) as u64));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantiles land within the bucket error of the recorded values.
    #[test]
    fn quantiles_are_close() {
        let h = LatencyHistogram::default();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        let p99 = h.quantile(0.99).unwrap().as_micros() as f64;
        assert!((p50 / 5_000.0 - 1.0).abs() < 0.1, "{p50}");
        assert!((p99 / 9_900.0 - 1.0).abs() < 0.1, "{p99}");
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }
}

//! What every error of an operation that can be retried says about itself, and the
//! exponential backoff that paces retries. Policy apart from mechanism: a loop asks the
//! error whether to go on and the backoff how long to wait; it decides neither itself.

use std::time::Duration;

/// An error that knows whether retrying can help.
pub trait Retryable {
    /// Whether the same operation may succeed later.
    fn is_retryable(&self) -> bool;

    /// How long the other side asked us to wait, if it did.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// A backoff whose bounds cannot work (zero, or the first delay above the longest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid backoff: {0}")]
pub struct InvalidBackoff(&'static str);

/// Delays that double from `initial` up to `max`, back to `initial` after a success.
#[derive(Debug, Clone)]
pub struct ExponentialBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl ExponentialBackoff {
    pub fn try_new(initial: Duration, max: Duration) -> Result<ExponentialBackoff, InvalidBackoff> {
        if initial.is_zero() {
            return Err(InvalidBackoff("the first delay must be positive"));
        }
        if initial > max {
            return Err(InvalidBackoff("the first delay exceeds the longest"));
        }
        Ok(ExponentialBackoff {
            initial,
            max,
            next: initial,
        })
    }

    /// A backoff from bounds that may not work, made to: the first delay at least 1 ms,
    /// the longest at least the first. For callers whose configuration was validated
    /// with [`ExponentialBackoff::try_new`] already.
    pub fn clamped(initial: Duration, max: Duration) -> ExponentialBackoff {
        let initial = initial.max(Duration::from_millis(1));
        ExponentialBackoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt; the one after it is twice as long (up to max).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// An attempt succeeded: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays double up to the longest and start over after a success; impossible bounds
    /// are refused when the backoff is built.
    #[test]
    fn doubles_caps_and_resets() {
        let ms = Duration::from_millis;
        let mut b = ExponentialBackoff::try_new(ms(100), ms(350)).unwrap();
        let delays: Vec<_> = (0..4).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(350), ms(350)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
        assert!(ExponentialBackoff::try_new(ms(0), ms(1)).is_err());
        assert!(ExponentialBackoff::try_new(ms(2), ms(1)).is_err());
    }
}

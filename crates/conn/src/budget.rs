//! The connect budget shared by every connection of one stream.
//!
//! The upstream allows a fixed number of connection requests per sliding window (10 per
//! 60 s per stream) and answers 429 past it, which can lock a whole stream out during a
//! reconnect storm. A token bucket is not enough: a full bucket of 10 refilling at 10 per
//! minute admits about 19 requests in one 60 s window. So the budget remembers the time of
//! each grant and admits a request only while fewer than the limit fall inside the window.
//! A partition with no live connection is served before partitions that still have one.
//!
//! A pair of consumers in two zones shares the upstream's budget: each grant also takes one
//! of the pair's requests ([`SharedBudget`]); while the pair cannot be asked (coordination
//! lost), each consumer keeps to a static half of the limit.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

use crate::config::BudgetConfig;

#[derive(Debug)]
pub struct ConnectBudget {
    limit: usize,
    window: Duration,
    state: Mutex<State>,
    changed: Notify,
    shared: std::sync::OnceLock<Shared>,
}

/// The connection requests of a stream, counted across the pair of consumers.
pub trait SharedBudget: Send + Sync + std::fmt::Debug {
    /// Waits for one of the pair's requests (`urgent`: the caller's partition has no live
    /// connection, and goes first); `false` when the pair cannot be asked.
    fn take(&self, urgent: bool) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// The pair's budget and this consumer's static share of the limit, for when the pair
/// cannot be asked.
#[derive(Debug)]
struct Shared {
    pair: Arc<dyn SharedBudget>,
    share: Box<ConnectBudget>,
}

#[derive(Debug)]
struct State {
    grants: VecDeque<Instant>,
    urgent_waiting: usize,
    rng: fastrand::Rng,
}

/// Keeps the count of urgent waiters right even when an acquire is cancelled.
struct UrgentGuard<'a>(&'a ConnectBudget);

impl Drop for UrgentGuard<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("budget lock").urgent_waiting -= 1;
        self.0.changed.notify_waiters();
    }
}

impl ConnectBudget {
    pub fn new(cfg: &BudgetConfig) -> ConnectBudget {
        ConnectBudget {
            limit: cfg.requests.max(1) as usize,
            window: Duration::from_millis(cfg.window_ms.max(1)),
            state: Mutex::new(State {
                grants: VecDeque::new(),
                urgent_waiting: 0,
                rng: fastrand::Rng::new(),
            }),
            changed: Notify::new(),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Counts every grant against the pair's budget too; while the pair cannot be asked,
    /// grants keep within half of this budget's limit (the static share of two zones).
    pub fn share_with(&self, pair: Arc<dyn SharedBudget>) {
        let share = ConnectBudget::new(&BudgetConfig {
            requests: (self.limit / 2).max(1) as u32,
            window_ms: self.window.as_millis() as u64,
        });
        let _ = self.shared.set(Shared {
            pair,
            share: Box::new(share),
        });
    }

    /// Requests still allowed in the current window.
    pub fn remaining(&self) -> usize {
        let mut st = self.state.lock().expect("budget lock");
        self.prune(&mut st, Instant::now());
        self.limit.saturating_sub(st.grants.len())
    }

    fn prune(&self, st: &mut State, now: Instant) {
        while st
            .grants
            .front()
            .is_some_and(|&t| now.duration_since(t) >= self.window)
        {
            st.grants.pop_front();
        }
    }

    /// A request granted by [`ConnectBudget::acquire`] never reached the upstream (it
    /// failed on this host): its grant is given back.
    pub fn refund(&self) {
        let mut st = self.state.lock().expect("budget lock");
        st.grants.pop_back();
        drop(st);
        self.changed.notify_waiters();
    }

    /// Waits until a connection request may be sent. `urgent`: the caller's partition has
    /// no live connection, so it goes before callers whose partition still has one.
    pub async fn acquire(&self, urgent: bool) {
        self.acquire_here(urgent).await;
        if let Some(shared) = self.shared.get()
            && !shared.pair.take(urgent).await
        {
            shared.share.acquire_here(urgent).await;
        }
    }

    /// The grant of this process's own window.
    async fn acquire_here(&self, urgent: bool) {
        let _guard = urgent.then(|| {
            self.state.lock().expect("budget lock").urgent_waiting += 1;
            UrgentGuard(self)
        });
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut st = self.state.lock().expect("budget lock");
                let now = Instant::now();
                self.prune(&mut st, now);
                // An urgent caller counts itself among the urgent waiters.
                let others_urgent = st.urgent_waiting.saturating_sub(usize::from(urgent));
                let my_turn = urgent || others_urgent == 0;
                if st.grants.len() < self.limit && my_turn {
                    st.grants.push_back(now);
                    drop(st);
                    self.changed.notify_waiters();
                    return;
                }
                if st.grants.len() < self.limit {
                    None // waiting for the urgent callers only
                } else {
                    // The oldest grant leaves the window; a little jitter keeps waiters
                    // from all firing at the same instant.
                    let oldest = *st.grants.front().expect("window is full");
                    let spread = (self.window.as_millis() as u64 / self.limit as u64 / 8).min(500);
                    Some(oldest + self.window + Duration::from_millis(st.rng.u64(0..=spread)))
                }
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = sleep_until(at) => {}
                        () = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn budget(requests: u32, window_ms: u64) -> Arc<ConnectBudget> {
        Arc::new(ConnectBudget::new(&BudgetConfig {
            requests,
            window_ms,
        }))
    }

    /// No window of the configured length ever holds more grants than the limit, however
    /// many callers ask at once.
    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_per_window() {
        let b = budget(10, 60_000);
        let granted = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..35 {
            let (b, granted) = (b.clone(), granted.clone());
            tasks.push(tokio::spawn(async move {
                b.acquire(i % 3 == 0).await;
                granted.lock().unwrap().push(Instant::now());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut times = granted.lock().unwrap().clone();
        times.sort();
        assert_eq!(times.len(), 35);
        for (i, &t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .filter(|&&u| u.duration_since(t) < Duration::from_secs(60))
                .count();
            assert!(in_window <= 10, "{in_window} grants within 60 s");
        }
        // 35 grants need at least 3 further windows.
        assert!(times[34].duration_since(times[0]) >= Duration::from_secs(180));
    }

    /// When the window is full, a caller whose partition is down goes first.
    #[tokio::test(start_paused = true)]
    async fn uncovered_partitions_go_first() {
        let b = budget(1, 1_000);
        b.acquire(false).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let normal = {
            let (b, order) = (b.clone(), order.clone());
            tokio::spawn(async move {
                b.acquire(false).await;
                order.lock().unwrap().push("normal");
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let urgent = {
            let (b, order) = (b.clone(), order.clone());
            tokio::spawn(async move {
                b.acquire(true).await;
                order.lock().unwrap().push("urgent");
            })
        };
        normal.await.unwrap();
        urgent.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["urgent", "normal"]);
        assert_eq!(b.remaining(), 0);
    }

    /// The pair's budget, played by a test: grants `left` requests, then says it cannot
    /// be asked.
    #[derive(Debug)]
    struct PairBudget {
        left: Mutex<u32>,
    }

    impl SharedBudget for PairBudget {
        fn take(&self, _urgent: bool) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
            Box::pin(async move {
                let mut left = self.left.lock().unwrap();
                let ok = *left > 0;
                *left = left.saturating_sub(1);
                ok
            })
        }
    }

    /// With the pair reachable its budget decides; once it cannot be asked, this consumer
    /// keeps to half of its limit per window.
    #[tokio::test(start_paused = true)]
    async fn pair_budget_then_static_share() {
        let b = budget(10, 60_000);
        b.share_with(Arc::new(PairBudget {
            left: Mutex::new(3),
        }));
        let start = Instant::now();
        for _ in 0..8 {
            b.acquire(false).await;
        }
        // 3 through the pair, then 5 within the static share of the first window.
        assert_eq!(Instant::now(), start, "8 grants in the first window");
        tokio::time::timeout(Duration::from_secs(30), b.acquire(false))
            .await
            .expect_err("the static share (5) is spent for this window");
    }

    /// A cancelled urgent wait does not block the others forever.
    #[tokio::test(start_paused = true)]
    async fn cancelled_urgent_wait_releases_priority() {
        let b = budget(1, 1_000);
        b.acquire(false).await;
        let _ = tokio::time::timeout(Duration::from_millis(100), b.acquire(true)).await;
        tokio::time::timeout(Duration::from_secs(5), b.acquire(false))
            .await
            .expect("the normal caller is served once the window frees");
    }
}

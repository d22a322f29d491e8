//! Writer leases: one consumer of the pair at a time writes a partition to a store that
//! cannot tell copies apart (Kafka).
//!
//! The lease is the key `writer.<sink>.<stream>.<partition>`, holding the holder's consumer
//! id, taken with `create` and renewed every third of `lease_ttl_ms` like a recovery-job
//! lease. Its holder counts it valid until two thirds of `lease_ttl_ms` after it *sent* its
//! last successful renewal, so it stops writing at least a third of the TTL before the key
//! can expire on the server; records it sent before then are delivered or failed within
//! [`WriterLease::fence`] (the store caps its delivery timeout by it), so none lands after
//! the lease has passed to the other consumer. A consumer that cannot reach the bucket
//! cannot renew: it stops writing, and nobody writes until the bucket is back (what is
//! received meanwhile waits in the sink's memory and spool).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
use tokio::time::timeout;
use tracing::Instrument;

use crate::events::Op;
use crate::keys;
use crate::pair::{Inner, OP_TIMEOUT};

/// The holder's view of one writer lease.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    /// When this consumer took the lease (after the key was created: any earlier holder's
    /// lease had expired by then).
    since: Option<Instant>,
    /// Writing stops at this moment unless a renewal moves it on.
    valid_until: Option<Instant>,
}

/// A writer lease this consumer keeps trying to take and, once taken, renews.
#[derive(Debug, Clone)]
pub struct WriterLease {
    key: String,
    held: Arc<Mutex<Held>>,
    fence: Duration,
}

impl WriterLease {
    /// Since when this consumer holds the lease, while it may write; `None` otherwise.
    pub fn held_since(&self) -> Option<Instant> {
        let h = *self.held.lock().unwrap_or_else(PoisonError::into_inner);
        match (h.since, h.valid_until) {
            (Some(since), Some(until)) if Instant::now() < until => Some(since),
            _ => None,
        }
    }

    /// How long a record sent under the lease may take to be delivered or fail: a third of
    /// `lease_ttl_ms`, less a little for the time a renewal takes to reach the server.
    pub fn fence(&self) -> Duration {
        self.fence
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

pub(crate) fn start(inner: &Arc<Inner>, sink: &str, stream: &str, partition: u32) -> WriterLease {
    let ttl = Duration::from_millis(inner.cfg.lease_ttl_ms);
    let lease = WriterLease {
        key: keys::writer(sink, stream, partition),
        held: Arc::default(),
        fence: (ttl / 3)
            .saturating_sub(Duration::from_millis(200))
            .max(Duration::from_millis(300)),
    };
    let task = keep(inner.clone(), lease.clone(), ttl);
    tokio::spawn(task.in_current_span());
    lease
}

/// Takes the lease when it is free and renews it while held, until shutdown.
async fn keep(inner: Arc<Inner>, lease: WriterLease, ttl: Duration) {
    let id = inner.cfg.consumer_id.clone();
    let every = ttl / 3;
    let retry = Duration::from_millis(inner.cfg.beacon_ms.clamp(50, 1_000));
    let set = |h: Held| *lease.held.lock().unwrap_or_else(PoisonError::into_inner) = h;
    // The revision this consumer last wrote, while it holds the key.
    let mut revision: Option<u64> = None;
    loop {
        if inner.stopped() {
            return;
        }
        let Ok(kv) = inner.reachable_bucket() else {
            tokio::time::sleep(retry).await;
            continue;
        };
        let sent = Instant::now();
        match revision {
            None => match timeout(OP_TIMEOUT, kv.create(&lease.key, id.clone().into())).await {
                Ok(Ok(rev)) => {
                    revision = Some(rev);
                    set(Held {
                        since: Some(Instant::now()),
                        valid_until: Some(sent + ttl - every),
                    });
                    tracing::info!(
                        key = lease.key,
                        "writer lease taken: this consumer writes the partition"
                    );
                    tokio::time::sleep(every).await;
                }
                Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {
                    tokio::time::sleep(retry).await;
                }
                Ok(Err(e)) => {
                    inner.failed(Op::Lease, &format!("creating {}: {e}", lease.key));
                    tokio::time::sleep(retry).await;
                }
                Err(_) => {
                    inner.failed(
                        Op::Lease,
                        &format!("creating {}: no answer within 2 s", lease.key),
                    );
                    tokio::time::sleep(retry).await;
                }
            },
            Some(rev) => {
                let update = kv.update(&lease.key, id.clone().into(), rev);
                match timeout(OP_TIMEOUT, update).await {
                    Ok(Ok(rev)) => {
                        revision = Some(rev);
                        let mut h = *lease.held.lock().unwrap_or_else(PoisonError::into_inner);
                        h.valid_until = Some(sent + ttl - every);
                        set(h);
                        tokio::time::sleep(every).await;
                    }
                    Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                        // It expired (this consumer was away) and may be the other's now.
                        revision = None;
                        set(Held::default());
                        tracing::warn!(
                            key = lease.key,
                            "writer lease lost: the other consumer of the pair writes the partition"
                        );
                    }
                    Ok(Err(e)) => {
                        inner.failed(Op::Lease, &format!("renewing {}: {e}", lease.key));
                        tokio::time::sleep(retry).await;
                    }
                    Err(_) => {
                        inner.failed(
                            Op::Lease,
                            &format!("renewing {}: no answer within 2 s", lease.key),
                        );
                        tokio::time::sleep(retry).await;
                    }
                }
            }
        }
    }
}

//! Recovery-job leases shared by the pair: at most `slots` jobs of an account run at
//! once across both consumers.
//!
//! A lease is the key `job.<account>.<slot>`, holding the holder's consumer id. It is
//! taken with `create` (which fails while the key exists), renewed every third of
//! `lease_ttl_ms` with `update` at the revision it last wrote, and deleted at that revision
//! when released. A holder that stops renewing (it crashed, lost the server, or its pair
//! shut down) loses the key to the bucket's `max_age` after `lease_ttl_ms`. A renewal
//! that finds another revision means the lease expired and was taken meanwhile: renewal
//! stops and the loss is logged.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tracing::Instrument;

use crate::events::{LeaseLost, Op};
use crate::keys;
use crate::pair::{Inner, Lost, OP_TIMEOUT, stopped};

/// A held recovery-job lease; dropping it releases the slot.
pub struct JobLease {
    account: String,
    slot: usize,
    release: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for JobLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLease")
            .field("account", &tandem_core::redact_url(&self.account))
            .field("slot", &self.slot)
            .finish()
    }
}

impl Drop for JobLease {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
    }
}

/// How often a waiting acquirer tries the slots again.
fn retry_every(inner: &Inner) -> Duration {
    Duration::from_millis(inner.cfg.beacon_ms.clamp(50, 1_000))
}

pub(crate) async fn acquire(
    inner: &Arc<Inner>,
    account: &str,
    slots: usize,
) -> Result<JobLease, Lost> {
    let id = &inner.cfg.consumer_id;
    loop {
        let kv = inner.reachable_bucket()?;
        for slot in 0..slots.max(1) {
            let key = keys::job(account, slot);
            match timeout(OP_TIMEOUT, kv.create(&key, id.clone().into())).await {
                Ok(Ok(revision)) => {
                    tracing::debug!(key, "recovery job lease taken");
                    return Ok(hold(inner, kv, account, slot, key, revision));
                }
                Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {}
                Ok(Err(e)) => {
                    inner.failed(Op::Lease, &format!("creating {key}: {e}"));
                    return Err(Lost);
                }
                Err(_) => {
                    inner.failed(Op::Lease, &format!("creating {key}: no answer within 2 s"));
                    return Err(Lost);
                }
            }
        }
        tokio::time::sleep(retry_every(inner)).await;
    }
}

/// Starts renewing the lease just taken.
fn hold(
    inner: &Arc<Inner>,
    kv: kv::Store,
    account: &str,
    slot: usize,
    key: String,
    revision: u64,
) -> JobLease {
    let (release, released) = oneshot::channel();
    let lease = Held {
        inner: inner.clone(),
        kv,
        account: account.to_owned(),
        slot,
        key,
        revision,
    };
    tokio::spawn(lease.renew(released).in_current_span());
    JobLease {
        account: account.to_owned(),
        slot,
        release: Some(release),
    }
}

/// The renewing side of a [`JobLease`].
struct Held {
    inner: Arc<Inner>,
    kv: kv::Store,
    account: String,
    slot: usize,
    key: String,
    /// The revision this consumer last wrote.
    revision: u64,
}

impl Held {
    async fn renew(mut self, mut released: oneshot::Receiver<()>) {
        let every = Duration::from_millis(self.inner.cfg.lease_ttl_ms / 3);
        let mut shutdown = self.inner.shutdown();
        let value = self.inner.cfg.consumer_id.clone();
        loop {
            tokio::select! {
                // Released, or the guard is gone without saying so: either way, release.
                _ = &mut released => break,
                // No renewal after shutdown: the lease expires after lease_ttl_ms.
                () = stopped(&mut shutdown) => return,
                () = tokio::time::sleep(every) => {
                    let update = self.kv.update(&self.key, value.clone().into(), self.revision);
                    match timeout(OP_TIMEOUT, update).await {
                        Ok(Ok(revision)) => self.revision = revision,
                        Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                            LeaseLost { account: &self.account, slot: self.slot }.emit(&self.inner.meters);
                            return;
                        }
                        Ok(Err(e)) => self.failed(&format!("renewing {}: {e}", self.key)),
                        Err(_) => self.failed(&format!("renewing {}: no answer within 2 s", self.key)),
                    }
                }
            }
        }
        // At our revision only: a lease that expired and was taken is the peer's now.
        let delete = self
            .kv
            .delete_expect_revision(&self.key, Some(self.revision));
        match timeout(OP_TIMEOUT, delete).await {
            Ok(Ok(())) => tracing::debug!(key = self.key, "recovery job lease released"),
            Ok(Err(e)) => self.failed(&format!("releasing {}: {e}", self.key)),
            Err(_) => self.failed(&format!("releasing {}: no answer within 2 s", self.key)),
        }
    }

    fn failed(&self, error: &str) {
        self.inner.failed(Op::Lease, error);
    }
}

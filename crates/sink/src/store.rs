//! What a store is to the sink driver: a place to put activities that later acknowledges
//! them as durably stored.

use std::future::Future;
use std::sync::Arc;

use tandem_core::{ActivityId, Partition, StreamId, UniqueBatch};

/// Stream names, indexed by `StreamId` (stores name files and subjects after them).
pub type StreamNames = Arc<Vec<Arc<str>>>;

/// Activities the store has durably stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub stream: StreamId,
    pub partition: Partition,
    /// The stored activities, in order.
    pub ids: Vec<ActivityId>,
    /// Their sequence numbers ([`tandem_core::Unique::seq`]), parallel to `ids`: the
    /// driver turns these into the partition's stored watermark.
    pub seqs: Vec<u64>,
    /// How many of them the store already held (JetStream's duplicate window): stored
    /// by another consumer, not by us.
    pub duplicates: usize,
}

impl Ack {
    /// Acknowledges a whole batch.
    pub fn of(batch: &UniqueBatch) -> Ack {
        Ack {
            stream: batch.stream,
            partition: batch.partition,
            ids: batch.items.iter().map(|u| u.id).collect(),
            seqs: batch.items.iter().map(|u| u.seq).collect(),
            duplicates: 0,
        }
    }
}

/// Whether retrying a failed store operation can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Fatal,
    /// The store could not make durable what was put since its last acknowledgements
    /// (a failed fsync) and will never acknowledge it: the driver puts it again.
    Lost,
}

/// A store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{store} store: {message}")]
pub struct StoreError {
    pub store: &'static str,
    pub class: ErrorClass,
    pub message: String,
}

impl StoreError {
    pub fn transient(store: &'static str, message: impl Into<String>) -> StoreError {
        StoreError {
            store,
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }

    pub fn fatal(store: &'static str, message: impl Into<String>) -> StoreError {
        StoreError {
            store,
            class: ErrorClass::Fatal,
            message: message.into(),
        }
    }

    pub fn lost(store: &'static str, message: impl Into<String>) -> StoreError {
        StoreError {
            store,
            class: ErrorClass::Lost,
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class != ErrorClass::Fatal
    }
}

impl tandem_core::Retryable for StoreError {
    fn is_retryable(&self) -> bool {
        self.class != ErrorClass::Fatal
    }
}

/// A durable store. `put` either takes the whole batch or none of it (so a retry after an
/// error never stores anything twice); acknowledgements come later from `acks`.
pub trait Store: Send + 'static {
    /// A short fixed name (`file`, `nats`, `stdout`, `null`).
    fn kind(&self) -> &'static str;

    /// Hands a batch to the store.
    fn put(&mut self, batch: &UniqueBatch) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Acknowledgements since the last call. `force`: make everything put so far durable
    /// now (shutdown, rotation) instead of when the store's own policy says.
    fn acks(&mut self, force: bool) -> impl Future<Output = Result<Vec<Ack>, StoreError>> + Send;

    /// Waits for the oldest of what was put to be acknowledged (and returns whatever is
    /// acknowledged by then): what a driver whose memory is taken by unacknowledged
    /// writes needs. Unlike `acks(true)` it does not make everything durable at once, so
    /// a store may keep writing while the newer writes settle.
    fn oldest_acks(&mut self) -> impl Future<Output = Result<Vec<Ack>, StoreError>> + Send {
        self.acks(true)
    }

    /// Activities put and not yet acknowledged.
    fn unacknowledged(&self) -> usize;

    /// Ends the store's work at shutdown (files are closed and renamed); returns the last
    /// acknowledgements.
    fn close(&mut self) -> impl Future<Output = Result<Vec<Ack>, StoreError>> + Send {
        self.acks(true)
    }
}

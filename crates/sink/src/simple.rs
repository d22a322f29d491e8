//! The two trivial stores: standard output (for piping) and null (for benchmarks).

use std::io::Write;

use tandem_core::UniqueBatch;

use crate::store::{Ack, Store, StoreError};

/// Writes each activity as a line to standard output; an activity is acknowledged once
/// the output is flushed.
#[derive(Debug, Default)]
pub struct StdoutStore {
    pending: Vec<Ack>,
    buf: Vec<u8>,
}

impl Store for StdoutStore {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        self.buf.clear();
        for item in &batch.items {
            self.buf.extend_from_slice(&item.line);
            self.buf.push(b'\n');
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&self.buf)
            .and_then(|()| out.flush())
            .map_err(|e| StoreError::transient("stdout", e.to_string()))?;
        self.pending.push(Ack::of(batch));
        Ok(())
    }

    async fn acks(&mut self, _force: bool) -> Result<Vec<Ack>, StoreError> {
        Ok(std::mem::take(&mut self.pending))
    }

    fn unacknowledged(&self) -> usize {
        self.pending.iter().map(|a| a.ids.len()).sum()
    }
}

/// Acknowledges everything at once and keeps nothing: measures the pipeline without a
/// store.
#[derive(Debug, Default)]
pub struct NullStore {
    pending: Vec<Ack>,
}

impl Store for NullStore {
    fn kind(&self) -> &'static str {
        "null"
    }

    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        self.pending.push(Ack::of(batch));
        Ok(())
    }

    async fn acks(&mut self, _force: bool) -> Result<Vec<Ack>, StoreError> {
        Ok(std::mem::take(&mut self.pending))
    }

    fn unacknowledged(&self) -> usize {
        self.pending.iter().map(|a| a.ids.len()).sum()
    }
}

//! Waiting for the store: a coverage sample, or a finished recovery chunk, becomes durable
//! only once every line handed to the merger before it was taken is behind the stored
//! watermark (see [`tandem_core::tally`]).
//!
//! A [`Stored`] ticket is taken right after the fact it guards (the coverage reached `C`;
//! a chunk's last line went to the merger): it records, per merger input, how many lines
//! had been handed over. Once the merger has classified that many of each, the highest
//! sequence number it has given out covers them all; once the sink's contiguous watermark
//! reaches that number, the fact is durable. Each step is a watermark of one FIFO, so no
//! count can stand in for another.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use tandem_core::Tally;

/// How far a guarded fact is on its way to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Lines handed to the merger per input when the ticket was taken.
    Handed(Vec<u64>),
    /// Everything numbered up to this must be stored.
    Numbered(u64),
}

impl Stored {
    /// A ticket for what has been handed to the merger so far.
    pub fn ticket(tally: &Tally) -> Stored {
        Stored::Handed(tally.lanes.handed())
    }

    /// Moves on as far as the merger and the store allow; true once stored.
    pub fn advance(&mut self, tally: &Tally) -> bool {
        if let Stored::Handed(handed) = self
            && tally.lanes.classified_all(handed)
        {
            *self = Stored::Numbered(tally.numbered.load(Ordering::SeqCst));
        }
        matches!(*self, Stored::Numbered(n) if tally.stored_through(n))
    }
}

/// Coverage samples of one partition waiting for the store, oldest first.
#[derive(Debug, Default)]
pub struct CoverageGate {
    pending: VecDeque<(u64, Stored)>,
    last: u64,
}

impl CoverageGate {
    /// The partition is complete up to `complete_ms` (read just before this call, so that
    /// every line behind it was handed over already).
    pub fn sample(&mut self, complete_ms: u64, tally: &Tally) {
        if complete_ms > self.last {
            self.last = complete_ms;
            self.pending.push_back((complete_ms, Stored::ticket(tally)));
        }
    }

    /// The newest sampled coverage whose activities are all stored, if it moved.
    pub fn advance(&mut self, tally: &Tally) -> Option<u64> {
        let mut durable = None;
        while let Some((complete, ticket)) = self.pending.front_mut() {
            if !ticket.advance(tally) {
                break;
            }
            durable = Some(*complete);
            self.pending.pop_front();
        }
        durable
    }
}

//! The in-flight window of a store that acknowledges each activity on its own (JetStream,
//! Kafka): what was sent and is not acknowledged yet, oldest first, bounded by a count and
//! by the bytes of its lines. The bytes are part of what the driver holds in memory, so
//! the window takes at most a quarter of the driver's budget, and the rest stays for the
//! activities queued behind it (the driver asks for acknowledgements at half).

use std::collections::VecDeque;

/// Something sent and awaiting its acknowledgement: its line's length is what it weighs.
pub(crate) trait Sent {
    fn line_len(&self) -> usize;
}

/// Sent, not acknowledged yet, oldest first.
#[derive(Debug)]
pub(crate) struct InFlight<T> {
    sent: VecDeque<T>,
    bytes: u64,
    max_count: usize,
    max_bytes: u64,
}

impl<T: Sent> InFlight<T> {
    pub(crate) fn new(max_count: usize, max_bytes: u64) -> InFlight<T> {
        InFlight {
            sent: VecDeque::new(),
            bytes: 0,
            max_count: max_count.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Bounds the bytes by a quarter of the driver's memory budget as well.
    pub(crate) fn within_budget(&mut self, max_memory_bytes: u64) {
        self.max_bytes = self.max_bytes.min(max_memory_bytes / 4).max(1);
    }

    /// Whether there is no room for a line of `len` bytes (an empty window always has).
    pub(crate) fn full_for(&self, len: usize) -> bool {
        !self.sent.is_empty()
            && (self.sent.len() >= self.max_count || self.bytes + len as u64 > self.max_bytes)
    }

    pub(crate) fn push_back(&mut self, t: T) {
        self.bytes += t.line_len() as u64;
        self.sent.push_back(t);
    }

    /// Puts the oldest back where it was (its acknowledgement is still awaited).
    pub(crate) fn push_front(&mut self, t: T) {
        self.bytes += t.line_len() as u64;
        self.sent.push_front(t);
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let t = self.sent.pop_front()?;
        self.bytes -= t.line_len() as u64;
        Some(t)
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.sent.front()
    }

    pub(crate) fn front_mut(&mut self) -> Option<&mut T> {
        self.sent.front_mut()
    }

    pub(crate) fn len(&self) -> usize {
        self.sent.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// The bytes of the lines in the window.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Sent for usize {
        fn line_len(&self) -> usize {
            *self
        }
    }

    /// Bounded by count and by bytes, whichever comes first; an empty window takes even a
    /// line larger than its bound; the bytes follow every way in and out.
    #[test]
    fn bounded_by_count_and_bytes() {
        let mut w = InFlight::new(3, 100);
        assert!(!w.full_for(1_000), "an empty window takes anything");
        w.push_back(60);
        assert!(w.full_for(41) && !w.full_for(40));
        w.push_back(30);
        w.push_back(1);
        assert!(w.full_for(0), "three is the count");
        assert_eq!(w.pop_front(), Some(60));
        w.push_front(60);
        assert_eq!((w.len(), w.bytes()), (3, 91));
        w.within_budget(200);
        assert_eq!((w.pop_front(), w.bytes()), (Some(60), 31));
        assert!(w.full_for(20) && !w.full_for(19), "a quarter of 200 is 50");
    }
}

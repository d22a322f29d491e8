//! The retained activities of one partition and its ground truth.
//!
//! Every line ever published gets a sequence number. A live connection is a cursor into
//! this log; backfill starts the cursor M minutes back; recovery reads a range of creation
//! times. The log forgets lines past the retention window or the memory bound; the ground
//! truth keeps every activity's identity and times for the whole run.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use serde::Serialize;
use tandem_core::ActivityId;
use tokio::sync::watch;

/// One published line.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub published_ms: u64,
    /// Creation time (the snowflake time for posts); the publish time when unknown.
    pub created_ms: u64,
    /// The line without its `\r\n`.
    pub line: Bytes,
}

/// One activity the simulator published: what a consumer must store exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TruthRecord {
    #[serde(serialize_with = "as_text")]
    pub id: ActivityId,
    pub created_ms: u64,
    pub published_ms: u64,
}

fn as_text<S: serde::Serializer>(id: &ActivityId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// The result of reading from a cursor.
#[derive(Debug, Default)]
pub(crate) struct Read {
    pub entries: Vec<Entry>,
    /// The cursor after the returned entries.
    pub next: u64,
    /// The cursor pointed before the oldest retained line: lines were lost to this reader.
    pub fell_behind: bool,
}

#[derive(Debug)]
pub(crate) struct PartitionLog {
    inner: Mutex<Inner>,
    head: watch::Sender<u64>,
}

#[derive(Debug)]
struct Inner {
    entries: VecDeque<Entry>,
    next_seq: u64,
    truth: Vec<TruthRecord>,
    retention_ms: u64,
    max_entries: usize,
}

impl PartitionLog {
    pub(crate) fn new(retention_ms: u64, max_entries: usize) -> Self {
        PartitionLog {
            inner: Mutex::new(Inner {
                entries: VecDeque::new(),
                next_seq: 0,
                truth: Vec::new(),
                retention_ms,
                max_entries: max_entries.max(1),
            }),
            head: watch::channel(0).0,
        }
    }

    /// Appends lines published at `now_ms`; activities (`Some(id)`) enter the ground truth.
    pub(crate) fn append(
        &self,
        now_ms: u64,
        lines: impl IntoIterator<Item = (Bytes, Option<ActivityId>, u64)>,
    ) {
        let next = {
            let mut inner = self.inner.lock().expect("log lock");
            for (line, id, created_ms) in lines {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                if let Some(id) = id {
                    inner.truth.push(TruthRecord {
                        id,
                        created_ms,
                        published_ms: now_ms,
                    });
                }
                inner.entries.push_back(Entry {
                    seq,
                    published_ms: now_ms,
                    created_ms,
                    line,
                });
            }
            inner.trim(now_ms);
            inner.next_seq
        };
        self.head.send_replace(next);
    }

    /// The sequence number the next published line will get (a live cursor starts here).
    pub(crate) fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Wakes when new lines are appended.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// The cursor of the first retained line published at or after `since_ms`.
    pub(crate) fn cursor_at(&self, since_ms: u64) -> u64 {
        let inner = self.inner.lock().expect("log lock");
        let idx = inner.entries.partition_point(|e| e.published_ms < since_ms);
        inner.entries.get(idx).map_or(inner.next_seq, |e| e.seq)
    }

    /// Up to `max` lines from `cursor`, only those published at or before `published_by_ms`.
    pub(crate) fn read(&self, cursor: u64, max: usize, published_by_ms: u64) -> Read {
        let inner = self.inner.lock().expect("log lock");
        let first = inner.entries.front().map_or(inner.next_seq, |e| e.seq);
        let (start, fell_behind) = if cursor < first {
            (first, true)
        } else {
            (cursor, false)
        };
        let offset = (start - first) as usize;
        let entries: Vec<Entry> = inner
            .entries
            .iter()
            .skip(offset)
            .take(max)
            .take_while(|e| e.published_ms <= published_by_ms)
            .cloned()
            .collect();
        let next = entries.last().map_or(start, |e| e.seq + 1);
        Read {
            entries,
            next,
            fell_behind,
        }
    }

    /// Retained lines created in `[start_ms, end_ms)`, oldest first (a recovery job).
    pub(crate) fn created_between(&self, start_ms: u64, end_ms: u64) -> Vec<Entry> {
        let inner = self.inner.lock().expect("log lock");
        let mut out: Vec<Entry> = inner
            .entries
            .iter()
            .filter(|e| e.created_ms >= start_ms && e.created_ms < end_ms)
            .cloned()
            .collect();
        out.sort_by_key(|e| (e.created_ms, e.seq));
        out
    }

    /// Every activity published so far.
    pub(crate) fn truth(&self) -> Vec<TruthRecord> {
        self.inner.lock().expect("log lock").truth.clone()
    }

    /// Number of activities published so far.
    pub(crate) fn truth_len(&self) -> usize {
        self.inner.lock().expect("log lock").truth.len()
    }
}

impl Inner {
    fn trim(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.retention_ms);
        while let Some(front) = self.entries.front() {
            if front.published_ms < horizon || self.entries.len() > self.max_entries {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: u64) -> (Bytes, Option<ActivityId>, u64) {
        (
            Bytes::from(format!("{{\"id_str\":\"{n}\"}}")),
            Some(ActivityId::Post(n)),
            n,
        )
    }

    /// Cursors read in order, respect the publish-time bound, and notice lost lines.
    #[test]
    fn cursors_and_retention() {
        let log = PartitionLog::new(1_000, 3);
        log.append(100, [line(1), line(2)]);
        log.append(200, [line(3)]);
        let r = log.read(0, 10, 150);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.next, 2);
        assert_eq!(log.cursor_at(150), 2);
        log.append(300, [line(4)]);
        // The memory bound (3) dropped seq 0.
        let r = log.read(0, 10, u64::MAX);
        assert!(r.fell_behind);
        assert_eq!(r.entries.first().unwrap().seq, 1);
        // Retention (1000 ms) drops everything older than now - 1000.
        log.append(1_250, [line(5)]);
        assert_eq!(log.cursor_at(0), 3);
        assert_eq!(log.truth_len(), 5);
    }

    /// Recovery reads by creation time, oldest first.
    #[test]
    fn created_between_sorts_by_creation() {
        let log = PartitionLog::new(10_000, 100);
        log.append(100, [line(30), line(10), line(20)]);
        let got: Vec<u64> = log
            .created_between(10, 30)
            .iter()
            .map(|e| e.created_ms)
            .collect();
        assert_eq!(got, vec![10, 20]);
    }
}

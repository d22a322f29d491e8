//! An on-disk FIFO of unique batches: where activities wait when the store is down and
//! memory is full, and what survives a restart while they wait.
//!
//! The spool is a directory of segment files (`segment-<n>.spool`), appended in order and
//! read back in order. Each record is framed as `length (u32 LE) | CRC32C (u32 LE) |
//! payload`, so a record cut by a crash or a full disk, or damaged on disk, is recognised:
//! opening the spool cuts a segment at its first bad record (counted, never a panic) and
//! keeps the records before it. Stream names (not indices) are recorded, so a leftover
//! spool is replayed correctly even if the configuration's stream order changed.
//!
//! Reading never deletes: a segment is removed only once every record in it has been read
//! *and* every activity read from it is behind its partition's stored watermark
//! ([`Spool::release`]). A crash at any point therefore replays a superset of what was not
//! stored. Replay streams record by record: memory stays bounded by one record whatever
//! the spool's size.
//!
//! Activities of segments left by an earlier run carry that run's sequence numbers; they
//! are numbered again when read ([`Popped::renumber`]).

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tandem_core::{ActivityId, Partition, PathId, StreamId, Unique, UniqueBatch};
use tokio::time::Instant;

/// How often the spool is made durable while it grows.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// A segment is closed for writing past this size, so that a read one can be deleted.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// A record larger than this is corrupt (a batch is far smaller).
const MAX_RECORD: u32 = 512 * 1024 * 1024;
const HEADER: u64 = 8;

/// A spooled batch, with its stream named.
#[derive(Debug, Clone)]
pub struct SpooledBatch {
    pub stream: String,
    pub batch: UniqueBatch,
}

/// A batch read back from the spool.
#[derive(Debug)]
pub struct Popped {
    pub spooled: SpooledBatch,
    /// It comes from a segment an earlier run wrote: its sequence numbers are that run's,
    /// and the reader must give it new ones (and say which with [`Spool::renumbered`]).
    pub renumber: bool,
    /// The segment it came from.
    pub segment: u64,
}

/// What opening a spool found.
#[derive(Debug, Default)]
pub struct Found {
    /// Activities waiting, per (stream name, partition), with their ids (the merger
    /// remembers them, so that a replay from upstream does not store them twice).
    pub waiting: HashMap<(String, Partition), Vec<ActivityId>>,
    /// Damaged or torn records cut off (with everything after them in their segment).
    pub cut_records: u64,
    pub cut_bytes: u64,
}

type Key = (StreamId, Partition);

#[derive(Debug)]
struct Segment {
    n: u64,
    path: PathBuf,
    /// Bytes of whole records written (the reader never reads past this).
    good_len: u64,
    /// Written by an earlier run.
    old: bool,
    /// Closed for writing.
    sealed: bool,
    /// Read up to here.
    read_at: u64,
    /// Highest sequence number read from it, per partition.
    read_seqs: HashMap<Key, u64>,
}

impl Segment {
    fn fully_read(&self) -> bool {
        self.read_at >= self.good_len
    }
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    writer: Option<BufWriter<File>>,
    reader: Option<(u64, BufReader<File>)>,
    synced: Instant,
    next_n: u64,
    /// Activities not yet read.
    len: u64,
}

fn segment_name(n: u64) -> String {
    format!("segment-{n:020}.spool")
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt spool record: {what}"),
    )
}

impl Spool {
    /// Opens the spool directory. Segments an earlier run left are checked record by
    /// record (a damaged or torn tail is cut) and kept for reading; nothing is deleted.
    pub fn open(dir: &Path) -> io::Result<(Spool, Found)> {
        fs::create_dir_all(dir)?;
        let mut numbers = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("segment-"))
                .and_then(|n| n.strip_suffix(".spool"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            numbers.push(n);
        }
        numbers.sort_unstable();
        let mut found = Found::default();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            writer: None,
            reader: None,
            synced: Instant::now(),
            next_n: numbers.last().map_or(1, |n| n + 1),
            len: 0,
        };
        for n in numbers {
            let path = dir.join(segment_name(n));
            let good_len = check_segment(&path, &mut found)?;
            spool.segments.push_back(Segment {
                n,
                path,
                good_len,
                old: true,
                sealed: true,
                read_at: 0,
                read_seqs: HashMap::new(),
            });
        }
        spool.len = found.waiting.values().map(|v| v.len() as u64).sum();
        if let Some(legacy) = Some(dir.join("spool.bin")).filter(|p| p.exists()) {
            spool.import_legacy(&legacy, &mut found)?;
        }
        Ok((spool, found))
    }

    /// Activities spooled and not yet read.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Segment files on disk (for tests and the log).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Appends a batch. On an error (a full disk) nothing of it stays: the partial record
    /// is cut back, or, if even that fails, the segment is sealed before it so the reader
    /// never sees it.
    pub fn push(&mut self, stream: &str, batch: &UniqueBatch) -> io::Result<()> {
        let payload = encode(stream, batch);
        if self.writer.is_none()
            || self
                .segments
                .back()
                .is_none_or(|s| s.sealed || s.good_len >= SEGMENT_BYTES)
        {
            self.start_segment()?;
        }
        let Some(seg) = self.segments.back_mut() else {
            return Err(io::Error::other("spool has no open segment"));
        };
        let Some(w) = self.writer.as_mut() else {
            return Err(io::Error::other("spool has no writer"));
        };
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        let written = w
            .write_all(&header)
            .and_then(|()| w.write_all(&payload))
            .and_then(|()| w.flush());
        tandem_core::crash::point("spool.push");
        if let Err(e) = written {
            // Throw away what the buffer still holds (never flushed on drop), then cut the
            // file back to its whole records.
            let cut = match self.writer.take().map(BufWriter::into_parts) {
                Some((file, _unwritten)) => file.set_len(seg.good_len),
                None => Ok(()),
            };
            if cut.is_err() {
                seg.sealed = true;
            }
            return Err(e);
        }
        seg.good_len += HEADER + payload.len() as u64;
        if self.synced.elapsed() >= SYNC_EVERY {
            // Spooled activities are as durable as those in memory until the store takes
            // them (the ledger has not moved past them): syncing every batch would only
            // slow the spool down when it is needed most.
            if let Some(w) = self.writer.as_ref() {
                w.get_ref().sync_data()?;
            }
            self.synced = Instant::now();
        }
        self.len += batch.items.len() as u64;
        Ok(())
    }

    fn start_segment(&mut self) -> io::Result<()> {
        if let Some(last) = self.segments.back_mut() {
            last.sealed = true;
        }
        if let Some(w) = self.writer.take() {
            let _ = w.get_ref().sync_data();
        }
        let n = self.next_n;
        let path = self.dir.join(segment_name(n));
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        File::open(&self.dir).and_then(|d| d.sync_all())?;
        self.next_n += 1;
        self.writer = Some(BufWriter::with_capacity(256 * 1024, f));
        self.segments.push_back(Segment {
            n,
            path,
            good_len: 0,
            old: false,
            sealed: false,
            read_at: 0,
            read_seqs: HashMap::new(),
        });
        Ok(())
    }

    /// Reads the oldest batch not read yet. `stream_index` maps a recorded stream name to
    /// the configuration's stream (a stream no longer configured gets `StreamId(u16::MAX)`).
    pub fn pop(
        &mut self,
        stream_index: impl Fn(&str) -> Option<StreamId>,
    ) -> io::Result<Option<Popped>> {
        loop {
            let Some(pos) = self.segments.iter().position(|s| s.read_at < s.good_len) else {
                return Ok(None);
            };
            // An open segment is read while it is written: what the writer buffered must
            // reach the file first.
            if !self.segments[pos].sealed
                && let Some(w) = self.writer.as_mut()
            {
                w.flush()?;
            }
            let seg = &mut self.segments[pos];
            if self.reader.as_ref().is_none_or(|(n, _)| *n != seg.n) {
                let mut f = File::open(&seg.path)?;
                f.seek(SeekFrom::Start(seg.read_at))?;
                self.reader = Some((seg.n, BufReader::with_capacity(256 * 1024, f)));
            }
            let Some((_, reader)) = self.reader.as_mut() else {
                continue;
            };
            match read_record(reader, seg.good_len - seg.read_at) {
                Ok(Some((payload, size))) => {
                    seg.read_at += size;
                    let spooled = decode(&payload, &stream_index)?;
                    let key = (spooled.batch.stream, spooled.batch.partition);
                    let n = spooled.batch.items.len() as u64;
                    self.len = self.len.saturating_sub(n);
                    if !seg.old
                        && let Some(max) = spooled.batch.items.iter().map(|u| u.seq).max()
                    {
                        let e = seg.read_seqs.entry(key).or_default();
                        *e = (*e).max(max);
                    }
                    return Ok(Some(Popped {
                        spooled,
                        renumber: seg.old,
                        segment: seg.n,
                    }));
                }
                Ok(None) | Err(_) => {
                    // Damaged within what was written whole: the rest of this segment
                    // cannot be trusted. Its activities' numbers never reach the
                    // watermark, so coverage stops before them and they come back from
                    // upstream after a restart.
                    tracing::error!(segment = %seg.path.display(), offset = seg.read_at, "damaged spool record; the rest of the segment is skipped");
                    seg.read_at = seg.good_len;
                    self.reader = None;
                }
            }
        }
    }

    /// Records that a renumbered batch was given these numbers (segments of an earlier
    /// run are deleted only once they are stored too).
    pub fn renumbered(&mut self, segment: u64, key: Key, max_seq: u64) {
        if let Some(seg) = self.segments.iter_mut().find(|s| s.n == segment) {
            let e = seg.read_seqs.entry(key).or_default();
            *e = (*e).max(max_seq);
        }
    }

    /// Deletes every fully read segment whose activities are all stored; `stored(key,
    /// seq)` says whether the partition's watermark has reached `seq`. Returns the number
    /// of segments deleted.
    pub fn release(&mut self, stored: impl Fn(Key, u64) -> bool) -> io::Result<usize> {
        let mut deleted = 0;
        while let Some(seg) = self.segments.front() {
            let done = seg.fully_read() && seg.read_seqs.iter().all(|(k, s)| stored(*k, *s));
            if !done {
                break;
            }
            if self.reader.as_ref().is_some_and(|(n, _)| *n == seg.n) {
                self.reader = None;
            }
            if !seg.sealed {
                // The segment being written, read to its end: the next push starts anew.
                self.writer = None;
            }
            fs::remove_file(&seg.path)?;
            self.segments.pop_front();
            deleted += 1;
        }
        if deleted > 0 {
            File::open(&self.dir).and_then(|d| d.sync_all())?;
        }
        Ok(deleted)
    }

    /// Makes what was written durable (at shutdown).
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(w) = self.writer.as_mut() {
            w.flush()?;
            w.get_ref().sync_data()?;
        }
        Ok(())
    }

    /// Moves the records of a spool file of the earlier single-file format into a segment.
    fn import_legacy(&mut self, legacy: &Path, found: &mut Found) -> io::Result<()> {
        let mut reader = BufReader::new(File::open(legacy)?);
        let mut count = 0u64;
        while let Some(sb) = read_legacy(&mut reader)? {
            let ids = found
                .waiting
                .entry((sb.stream.clone(), sb.batch.partition))
                .or_default();
            ids.extend(sb.batch.items.iter().map(|u| u.id));
            self.push(&sb.stream, &sb.batch)?;
            count += 1;
        }
        self.sync()?;
        if let Some(seg) = self.segments.back_mut() {
            seg.old = true;
            seg.sealed = true;
        }
        self.writer = None;
        fs::remove_file(legacy)?;
        File::open(&self.dir).and_then(|d| d.sync_all())?;
        tracing::info!(
            records = count,
            "spool of the earlier format moved into a segment"
        );
        Ok(())
    }
}

/// Checks a segment left by an earlier run: the length of its whole, intact records. A
/// damaged or torn tail is cut off the file.
fn check_segment(path: &Path, found: &mut Found) -> io::Result<u64> {
    let size = fs::metadata(path)?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, File::open(path)?);
    let mut good = 0u64;
    loop {
        match read_record(&mut reader, size - good) {
            Ok(Some((payload, n))) => match decode(&payload, &|_| Some(StreamId(0))) {
                Ok(sb) => {
                    found
                        .waiting
                        .entry((sb.stream, sb.batch.partition))
                        .or_default()
                        .extend(sb.batch.items.iter().map(|u| u.id));
                    good += n;
                }
                Err(_) => break,
            },
            Ok(None) if good == size => break,
            Ok(None) | Err(_) => break,
        }
    }
    if good < size {
        found.cut_records += 1;
        found.cut_bytes += size - good;
        tracing::warn!(segment = %path.display(), kept_bytes = good, cut_bytes = size - good, "spool segment ends in a torn or damaged record; cut");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good)?;
        f.sync_all()?;
    }
    Ok(good)
}

/// Reads one framed record of at most `room` bytes: its payload and its size on disk.
/// `None` at a clean end; an error for a torn or damaged record.
fn read_record(r: &mut impl Read, room: u64) -> io::Result<Option<(Vec<u8>, u64)>> {
    if room == 0 {
        return Ok(None);
    }
    if room < HEADER {
        return Err(corrupt("torn header"));
    }
    let mut header = [0u8; 8];
    r.read_exact(&mut header)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD || u64::from(len) > room - HEADER {
        return Err(corrupt("length past the end"));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if crc32c::crc32c(&payload) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Some((payload, HEADER + u64::from(len))))
}

fn encode(stream: &str, batch: &UniqueBatch) -> Vec<u8> {
    let mut rec =
        Vec::with_capacity(batch.items.iter().map(|u| u.line.len() + 56).sum::<usize>() + 32);
    let name = &stream.as_bytes()[..stream.len().min(255)];
    rec.push(name.len() as u8);
    rec.extend_from_slice(name);
    rec.extend_from_slice(&batch.partition.to_le_bytes());
    rec.extend_from_slice(&(batch.items.len() as u32).to_le_bytes());
    for u in &batch.items {
        let id = u.id.to_string();
        rec.extend_from_slice(&u.seq.to_le_bytes());
        rec.push(u.path.0);
        rec.push(id.len() as u8);
        rec.extend_from_slice(id.as_bytes());
        rec.extend_from_slice(&(u.line.len() as u32).to_le_bytes());
        rec.extend_from_slice(&u.line);
    }
    rec
}

fn decode(
    rec: &[u8],
    stream_index: &impl Fn(&str) -> Option<StreamId>,
) -> io::Result<SpooledBatch> {
    let mut at = 0;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        let s = rec.get(at..at + n).ok_or_else(|| corrupt("short"))?;
        at += n;
        Ok(s)
    };
    let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let name_len = take(1)?[0] as usize;
    let stream = std::str::from_utf8(take(name_len)?)
        .map_err(|_| corrupt("stream name"))?
        .to_owned();
    let partition = u32_of(take(4)?);
    let count = u32_of(take(4)?);
    let now = Instant::now();
    let mut items = Vec::with_capacity((count as usize).min(rec.len() / 16));
    for _ in 0..count {
        let s = take(8)?;
        let seq = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        let path = take(1)?[0];
        let id_len = take(1)?[0] as usize;
        let id: ActivityId = std::str::from_utf8(take(id_len)?)
            .map_err(|_| corrupt("id"))?
            .parse()
            .map_err(|_| corrupt("id"))?;
        let line_len = u32_of(take(4)?) as usize;
        let line = Bytes::copy_from_slice(take(line_len)?);
        items.push(Unique {
            seq,
            id,
            line,
            path: PathId(path),
            received: now,
        });
    }
    if at != rec.len() {
        return Err(corrupt("trailing bytes"));
    }
    let sid = stream_index(&stream).unwrap_or(StreamId(u16::MAX));
    Ok(SpooledBatch {
        stream,
        batch: UniqueBatch {
            stream: sid,
            partition,
            items,
        },
    })
}

/// A record of the earlier single-file format (no checksum); a torn last record ends it.
fn read_legacy(r: &mut impl Read) -> io::Result<Option<SpooledBatch>> {
    let mut len = [0u8; 4];
    if r.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_RECORD {
        return Ok(None);
    }
    let mut rec = vec![0u8; len as usize];
    if r.read_exact(&mut rec).is_err() {
        return Ok(None);
    }
    let mut at = 0;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = rec.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let mut parse = || -> Option<SpooledBatch> {
        let name_len = take(1)?[0] as usize;
        let stream = String::from_utf8(take(name_len)?.to_vec()).ok()?;
        let partition = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let mut items = Vec::new();
        for _ in 0..count {
            let path = take(1)?[0];
            let id_len = take(1)?[0] as usize;
            let id: ActivityId = std::str::from_utf8(take(id_len)?).ok()?.parse().ok()?;
            let line_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            items.push(Unique {
                seq: 0,
                id,
                line: Bytes::copy_from_slice(take(line_len)?),
                path: PathId(path),
                received: Instant::now(),
            });
        }
        Some(SpooledBatch {
            stream,
            batch: UniqueBatch {
                stream: StreamId(u16::MAX),
                partition,
                items,
            },
        })
    };
    Ok(parse())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ids: std::ops::Range<u64>) -> UniqueBatch {
        UniqueBatch {
            stream: StreamId(0),
            partition: 2,
            items: ids
                .map(|i| Unique {
                    seq: i + 1,
                    id: ActivityId::Post(i),
                    line: Bytes::from(format!("{{\"id_str\":\"{i}\"}}")),
                    path: PathId(1),
                    received: Instant::now(),
                })
                .collect(),
        }
    }

    fn index(s: &str) -> Option<StreamId> {
        (s == "d").then_some(StreamId(0))
    }

    fn ids(p: &Popped) -> Vec<ActivityId> {
        p.spooled.batch.items.iter().map(|u| u.id).collect()
    }

    /// Batches come back in order, byte for byte; a segment is deleted only once read and
    /// stored; a reopened spool replays what was not deleted, marked for renumbering.
    #[test]
    fn fifo_release_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, found) = Spool::open(dir.path()).unwrap();
        assert!(found.waiting.is_empty());
        spool.push("d", &batch(0..3)).unwrap();
        spool.push("d", &batch(3..5)).unwrap();
        assert_eq!(spool.len(), 5);
        let first = spool.pop(index).unwrap().unwrap();
        assert_eq!(
            ids(&first),
            (0..3).map(ActivityId::Post).collect::<Vec<_>>()
        );
        assert!(!first.renumber);
        assert_eq!(
            first.spooled.batch.items[1].line,
            Bytes::from("{\"id_str\":\"1\"}")
        );
        spool.pop(index).unwrap().unwrap();
        assert!(spool.is_empty());
        // Read, but nothing is stored: kept.
        assert_eq!(spool.release(|_, _| false).unwrap(), 0);
        spool.push("d", &batch(5..6)).unwrap();
        drop(spool);
        let (mut spool, found) = Spool::open(dir.path()).unwrap();
        // Everything replays: what was read may not have been stored.
        assert_eq!(found.waiting[&("d".to_owned(), 2)].len(), 6);
        assert_eq!(spool.len(), 6);
        let again = spool.pop(index).unwrap().unwrap();
        assert!(again.renumber);
        spool.renumbered(again.segment, (StreamId(0), 2), 3);
        spool.pop(index).unwrap().unwrap();
        let last = spool.pop(index).unwrap().unwrap();
        spool.renumbered(last.segment, (StreamId(0), 2), 6);
        assert!(spool.pop(index).unwrap().is_none());
        assert_eq!(
            spool.release(|_, seq| seq <= 5).unwrap(),
            0,
            "not all stored"
        );
        assert_eq!(spool.release(|_, seq| seq <= 6).unwrap(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A new segment starts after a failed write, and reads skip nothing written whole.
    #[test]
    fn order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        for i in 0..10 {
            spool.push("d", &batch(i * 2..i * 2 + 2)).unwrap();
            if i == 4 {
                spool.start_segment().unwrap();
            }
        }
        assert_eq!(spool.segments(), 2);
        let mut got = Vec::new();
        while let Some(p) = spool.pop(index).unwrap() {
            got.extend(ids(&p));
        }
        assert_eq!(got, (0..20).map(ActivityId::Post).collect::<Vec<_>>());
        assert_eq!(spool.release(|_, s| s <= 10).unwrap(), 1);
    }
}

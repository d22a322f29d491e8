//! An on-disk FIFO of unique batches: where activities wait when the store is down and
//! memory is full, and what survives a restart while they wait.
//!
//! Records are appended to `<dir>/spool.bin` and read back in order. Stream names (not
//! indices) are recorded, so a leftover spool is replayed correctly even if the
//! configuration's stream order changed. The file is removed once drained. A spool left
//! by a crash is replayed whole at start; what was stored from it before the crash is
//! removed by the caller with the recently stored ids.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tandem_core::{ActivityId, PathId, StreamId, Unique, UniqueBatch};
use tokio::time::Instant;

/// How often the spool is made durable while it grows.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// A spooled batch, with its stream named.
#[derive(Debug, Clone)]
pub struct SpooledBatch {
    pub stream: String,
    pub batch: UniqueBatch,
}

#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    synced: Instant,
    writer: Option<BufWriter<File>>,
    read_at: u64,
    /// Activities in the spool.
    len: u64,
}

impl Spool {
    /// Opens the spool directory; returns the spool and any batches left by an earlier run.
    pub fn open(
        dir: &Path,
        stream_index: impl Fn(&str) -> Option<StreamId>,
    ) -> io::Result<(Spool, Vec<SpooledBatch>)> {
        fs::create_dir_all(dir)?;
        let path = dir.join("spool.bin");
        let mut leftover = Vec::new();
        if path.exists() {
            let mut reader = BufReader::new(File::open(&path)?);
            while let Some(b) = read_record(&mut reader, &stream_index)? {
                leftover.push(b);
            }
            fs::remove_file(&path)?;
        }
        Ok((
            Spool {
                path,
                synced: Instant::now(),
                writer: None,
                read_at: 0,
                len: 0,
            },
            leftover,
        ))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a batch and makes it durable.
    pub fn push(&mut self, stream: &str, batch: &UniqueBatch) -> io::Result<()> {
        if self.writer.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.writer = Some(BufWriter::new(f));
        }
        let w = self.writer.as_mut().expect("just opened");
        let mut rec =
            Vec::with_capacity(batch.items.iter().map(|u| u.line.len() + 48).sum::<usize>() + 32);
        rec.push(stream.len() as u8);
        rec.extend_from_slice(stream.as_bytes());
        rec.extend_from_slice(&batch.partition.to_le_bytes());
        rec.extend_from_slice(&(batch.items.len() as u32).to_le_bytes());
        for u in &batch.items {
            let id = u.id.to_string();
            rec.push(u.path.0);
            rec.push(id.len() as u8);
            rec.extend_from_slice(id.as_bytes());
            rec.extend_from_slice(&(u.line.len() as u32).to_le_bytes());
            rec.extend_from_slice(&u.line);
        }
        w.write_all(&(rec.len() as u32).to_le_bytes())?;
        w.write_all(&rec)?;
        w.flush()?;
        // Spooled activities are as durable as those held in memory until the store takes
        // them: an fsync per batch would only slow the spool down when it is needed most.
        if self.synced.elapsed() >= SYNC_EVERY {
            w.get_ref().sync_data()?;
            self.synced = Instant::now();
        }
        self.len += batch.items.len() as u64;
        Ok(())
    }

    /// Takes the oldest spooled batch.
    pub fn pop(
        &mut self,
        stream_index: impl Fn(&str) -> Option<StreamId>,
    ) -> io::Result<Option<SpooledBatch>> {
        if self.len == 0 {
            return Ok(None);
        }
        if let Some(w) = self.writer.as_mut() {
            w.flush()?;
        }
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.read_at))?;
        let mut reader = BufReader::new(f);
        let Some(b) = read_record(&mut reader, &stream_index)? else {
            return Ok(None);
        };
        self.read_at = reader.stream_position()?;
        self.len -= b.batch.items.len() as u64;
        if self.len == 0 {
            self.writer = None;
            self.read_at = 0;
            fs::remove_file(&self.path)?;
        }
        Ok(Some(b))
    }
}

fn read_record(
    r: &mut impl Read,
    stream_index: &impl Fn(&str) -> Option<StreamId>,
) -> io::Result<Option<SpooledBatch>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut rec = vec![0u8; u32::from_le_bytes(len) as usize];
    if r.read_exact(&mut rec).is_err() {
        // A record cut by a crash was never acknowledged as spooled.
        return Ok(None);
    }
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "corrupt spool record");
    let mut at = 0;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        let s = rec.get(at..at + n).ok_or_else(bad)?;
        at += n;
        Ok(s)
    };
    let name_len = take(1)?[0] as usize;
    let stream = String::from_utf8(take(name_len)?.to_vec()).map_err(|_| bad())?;
    let partition = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?);
    let count = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?);
    let now = Instant::now();
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let path = take(1)?[0];
        let id_len = take(1)?[0] as usize;
        let id: ActivityId = std::str::from_utf8(take(id_len)?)
            .map_err(|_| bad())?
            .parse()
            .map_err(|_| bad())?;
        let line_len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
        let line = Bytes::copy_from_slice(take(line_len)?);
        items.push(Unique {
            id,
            line,
            path: PathId(path),
            received: now,
        });
    }
    let sid = stream_index(&stream).unwrap_or(StreamId(u16::MAX));
    Ok(Some(SpooledBatch {
        stream,
        batch: UniqueBatch {
            stream: sid,
            partition,
            items,
        },
    }))
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
                    id: ActivityId::Post(i),
                    line: Bytes::from(format!("{{\"id_str\":\"{i}\"}}")),
                    path: PathId(1),
                    received: Instant::now(),
                })
                .collect(),
        }
    }

    /// Batches come back in order, byte for byte; a leftover spool is replayed on open.
    #[tokio::test]
    async fn fifo_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let index = |s: &str| (s == "d").then_some(StreamId(0));
        let (mut spool, left) = Spool::open(dir.path(), index).unwrap();
        assert!(left.is_empty());
        spool.push("d", &batch(0..3)).unwrap();
        spool.push("d", &batch(3..5)).unwrap();
        assert_eq!(spool.len(), 5);
        let first = spool.pop(index).unwrap().unwrap();
        assert_eq!(
            first.batch.items.iter().map(|u| u.id).collect::<Vec<_>>(),
            (0..3).map(ActivityId::Post).collect::<Vec<_>>()
        );
        assert_eq!(first.batch.items[1].line, Bytes::from("{\"id_str\":\"1\"}"));
        spool.push("d", &batch(5..6)).unwrap();
        drop(spool);
        let (spool, left) = Spool::open(dir.path(), index).unwrap();
        // The whole file replays (what was popped may not have been stored).
        assert_eq!(left.iter().map(|b| b.batch.items.len()).sum::<usize>(), 6);
        assert!(spool.is_empty());
    }
}

//! The file store: newline-delimited JSON, one file per stream, partition and time bucket.
//!
//! Layout: `<dir>/<stream>/partition-<n>/<bucket start>.ndjson[.gz]`, written as
//! `….tmp` while the bucket is open and renamed when it closes (atomic rotation). Each
//! write appends a whole batch or nothing: a failed write is truncated back, so a retry
//! never duplicates. With gzip each write is its own gzip member, so the file is a valid
//! gzip stream after every write. Activities are acknowledged once fsynced (on an interval
//! and at rotation). The interval's fsync runs on duplicated file handles beside the
//! writes, so a slow fsync (seconds, with a lot of dirty data) delays acknowledgements,
//! never the writes behind it. After a crash, [`FileStore::open`] repairs leftover `.tmp` files:
//! an incomplete last line (or gzip member) is cut off, then the file is renamed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flate2::Compression;
use serde::{Deserialize, Serialize};
use tandem_core::time::{rfc3339_secs, unix_ms_now};
use tandem_core::{ActivityId, LineKind, Partition, StreamId, UniqueBatch, identify};
use tokio::time::Instant;

use crate::store::{Ack, Store, StoreError, StreamNames};

/// Settings of a file sink. Field docs are the configuration reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory to write under: `<dir>/<stream>/partition-<n>/<bucket start>.ndjson`.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// Length of each file's time bucket, in seconds.
    #[serde(default = "default_bucket_secs")]
    pub bucket_secs: u64,
    /// Compress the files with gzip (`.ndjson.gz`).
    #[serde(default)]
    pub gzip: bool,
    /// Writes are made durable (fsync) and acknowledged at most this long after they
    /// happen; rotation always fsyncs.
    #[serde(default = "default_fsync_ms")]
    pub fsync_interval_ms: u64,
}

fn default_dir() -> PathBuf {
    PathBuf::from("./tandem-data")
}
fn default_bucket_secs() -> u64 {
    600
}
fn default_fsync_ms() -> u64 {
    1_000
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            dir: default_dir(),
            bucket_secs: default_bucket_secs(),
            gzip: false,
            fsync_interval_ms: default_fsync_ms(),
        }
    }
}

impl FileConfig {
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.bucket_secs == 0 {
            out.push(("bucket_secs", "must be positive".to_owned()));
        }
        if self.dir.as_os_str().is_empty() {
            out.push(("dir", "must not be empty".to_owned()));
        }
        out
    }

    fn extension(&self) -> &'static str {
        if self.gzip { "ndjson.gz" } else { "ndjson" }
    }
}

type Key = (StreamId, Partition);

#[derive(Debug)]
struct OpenFile {
    tmp: PathBuf,
    target: PathBuf,
    file: File,
    len: u64,
    bucket: u64,
    dirty: bool,
}

#[derive(Debug)]
struct Inner {
    cfg: FileConfig,
    names: StreamNames,
    open: HashMap<Key, OpenFile>,
    /// Written, not yet fsynced.
    pending: HashMap<Key, Vec<Ack>>,
    /// Fsynced, not yet reported.
    durable: Vec<Ack>,
    buf: Vec<u8>,
}

/// What [`FileStore::open`] repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repair {
    /// Leftover `.tmp` files found and renamed.
    pub files: usize,
    /// Bytes of incomplete lines cut off.
    pub cut_bytes: u64,
}

/// An fsync running beside the writes: the files it covers (duplicated handles) and the
/// acknowledgements it makes durable.
type SyncJob = tokio::task::JoinHandle<(io::Result<()>, Vec<Ack>)>;

/// The file store.
#[derive(Debug)]
pub struct FileStore {
    inner: Arc<Mutex<Inner>>,
    fsync_interval: Duration,
    last_sync: Instant,
    unacked: usize,
    /// At most one fsync at a time; writes go on while it runs.
    syncing: Option<SyncJob>,
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::transient("file", e.to_string())
}

impl FileStore {
    /// Opens the store, repairing what a crash may have left behind.
    pub fn open(cfg: FileConfig, names: StreamNames) -> io::Result<(FileStore, Repair)> {
        fs::create_dir_all(&cfg.dir)?;
        let repair = repair_tree(&cfg.dir)?;
        if repair.files > 0 {
            tracing::warn!(dir = %cfg.dir.display(), files = repair.files, cut_bytes = repair.cut_bytes, "repaired files left open by an earlier run");
        }
        let fsync_interval = Duration::from_millis(cfg.fsync_interval_ms);
        let store = FileStore {
            inner: Arc::new(Mutex::new(Inner {
                cfg,
                names,
                open: HashMap::new(),
                pending: HashMap::new(),
                durable: Vec::new(),
                buf: Vec::new(),
            })),
            fsync_interval,
            last_sync: Instant::now(),
            unacked: 0,
            syncing: None,
        };
        Ok((store, repair))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.lock().expect("file store lock")))
            .await
            .map_err(|e| StoreError::fatal("file", format!("writer thread failed: {e}")))?
            .map_err(io_err)
    }

    /// Waits for a running fsync; its acknowledgements, or its error (the writes it
    /// covered go back to waiting for the next fsync).
    async fn finish_sync(&mut self, job: SyncJob) -> Result<Vec<Ack>, StoreError> {
        let (result, acks) = job
            .await
            .map_err(|e| StoreError::fatal("file", format!("fsync thread failed: {e}")))?;
        match result {
            Ok(()) => Ok(acks),
            Err(e) => {
                self.blocking(move |inner| {
                    inner.requeue(acks);
                    Ok(())
                })
                .await?;
                Err(io_err(e))
            }
        }
    }

    /// Closes every open file (fsync and rename). Used at shutdown.
    async fn close_all(&mut self) -> Result<Vec<Ack>, StoreError> {
        let mut done = match self.syncing.take() {
            Some(job) => self.finish_sync(job).await?,
            None => Vec::new(),
        };
        let acks = self
            .blocking(|inner| {
                let keys: Vec<Key> = inner.open.keys().copied().collect();
                for key in keys {
                    inner.rotate(key)?;
                }
                Ok(std::mem::take(&mut inner.durable))
            })
            .await?;
        done.extend(acks);
        self.unacked = 0;
        Ok(done)
    }
}

impl Inner {
    fn bucket_ms(&self) -> u64 {
        self.cfg.bucket_secs.max(1) * 1000
    }

    fn open_for(&mut self, key: Key, bucket: u64) -> io::Result<&mut OpenFile> {
        if !self.open.contains_key(&key) {
            let stream = self
                .names
                .get(usize::from(key.0.0))
                .map_or("unknown", |s| s);
            let dir = self
                .cfg
                .dir
                .join(stream)
                .join(format!("partition-{}", key.1));
            fs::create_dir_all(&dir)?;
            let stem = rfc3339_secs(bucket * self.bucket_ms()).replace([':', '-'], "");
            let target = unique_name(&dir, &stem, self.cfg.extension());
            let tmp = tmp_name(&target);
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&tmp)?;
            self.open.insert(
                key,
                OpenFile {
                    tmp,
                    target,
                    file,
                    len: 0,
                    bucket,
                    dirty: false,
                },
            );
        }
        Ok(self.open.get_mut(&key).expect("just inserted"))
    }

    fn put(&mut self, batch: &UniqueBatch, now_ms: u64) -> io::Result<()> {
        let key = (batch.stream, batch.partition);
        let bucket = now_ms / self.bucket_ms();
        if self.open.get(&key).is_some_and(|f| f.bucket != bucket) {
            self.rotate(key)?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for item in &batch.items {
            buf.extend_from_slice(&item.line);
            buf.push(b'\n');
        }
        if self.cfg.gzip {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(buf.len() / 4),
                Compression::fast(),
            );
            enc.write_all(&buf)?;
            buf = enc.finish()?;
        }
        let f = self.open_for(key, bucket)?;
        let written = f.file.write_all(&buf);
        if let Err(e) = written {
            // All or nothing: cut off whatever part of the batch made it.
            let _ = f.file.set_len(f.len);
            self.buf = buf;
            return Err(e);
        }
        f.len += buf.len() as u64;
        f.dirty = true;
        self.buf = buf;
        self.pending.entry(key).or_default().push(Ack {
            stream: batch.stream,
            partition: batch.partition,
            ids: batch.items.iter().map(|u| u.id).collect(),
            duplicates: 0,
        });
        Ok(())
    }

    /// Starts an fsync of every file written since the last one: duplicated handles of
    /// those files and the acknowledgements the fsync will make durable. Writes may go on
    /// meanwhile; an fsync on a duplicate covers them too, which only helps.
    fn begin_sync(&mut self) -> io::Result<Option<(Vec<File>, Vec<Ack>)>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let mut files = Vec::new();
        for f in self.open.values_mut().filter(|f| f.dirty) {
            files.push(f.file.try_clone()?);
            f.dirty = false;
        }
        let acks = self.pending.drain().flat_map(|(_, acks)| acks).collect();
        Ok(Some((files, acks)))
    }

    /// Puts back the acknowledgements of a failed fsync: the next one covers them.
    fn requeue(&mut self, acks: Vec<Ack>) {
        for ack in acks {
            self.pending
                .entry((ack.stream, ack.partition))
                .or_default()
                .push(ack);
        }
        for f in self.open.values_mut() {
            f.dirty = true;
        }
    }

    /// Closes a file: fsync, rename to its final name, fsync the directory.
    fn rotate(&mut self, key: Key) -> io::Result<()> {
        let Some(f) = self.open.remove(&key) else {
            return Ok(());
        };
        f.file.sync_data()?;
        drop(f.file);
        if f.len == 0 {
            fs::remove_file(&f.tmp)?;
        } else {
            fs::rename(&f.tmp, &f.target)?;
            if let Some(dir) = f.target.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        if let Some(acks) = self.pending.remove(&key) {
            self.durable.extend(acks);
        }
        Ok(())
    }

    fn rotate_expired(&mut self, now_ms: u64) -> io::Result<()> {
        let bucket = now_ms / self.bucket_ms();
        let expired: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, f)| f.bucket != bucket)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.rotate(key)?;
        }
        Ok(())
    }
}

impl Store for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        let batch = batch.clone();
        let n = batch.items.len();
        self.blocking(move |inner| inner.put(&batch, unix_ms_now()))
            .await?;
        self.unacked += n;
        Ok(())
    }

    async fn acks(&mut self, force: bool) -> Result<Vec<Ack>, StoreError> {
        let mut acks = Vec::new();
        if self
            .syncing
            .as_ref()
            .is_some_and(|job| force || job.is_finished())
            && let Some(job) = self.syncing.take()
        {
            acks.extend(self.finish_sync(job).await?);
        }
        let due =
            self.syncing.is_none() && (force || self.last_sync.elapsed() >= self.fsync_interval);
        if due {
            self.last_sync = Instant::now();
        }
        let (durable, started) = self
            .blocking(move |inner| {
                inner.rotate_expired(unix_ms_now())?;
                let started = if due { inner.begin_sync()? } else { None };
                Ok((std::mem::take(&mut inner.durable), started))
            })
            .await?;
        acks.extend(durable);
        if let Some((files, covered)) = started {
            let job = tokio::task::spawn_blocking(move || {
                let result = files.iter().try_for_each(File::sync_data);
                (result, covered)
            });
            if force {
                acks.extend(self.finish_sync(job).await?);
            } else {
                self.syncing = Some(job);
            }
        }
        self.unacked -= acks
            .iter()
            .map(|a| a.ids.len())
            .sum::<usize>()
            .min(self.unacked);
        Ok(acks)
    }

    fn unacknowledged(&self) -> usize {
        self.unacked
    }

    async fn close(&mut self) -> Result<Vec<Ack>, StoreError> {
        self.close_all().await
    }
}

fn tmp_name(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// `<stem>.<ext>`, or `<stem>-<n>.<ext>` when taken (a restart within the same bucket).
fn unique_name(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let mut n = 0;
    loop {
        let name = if n == 0 {
            format!("{stem}.{ext}")
        } else {
            format!("{stem}-{n}.{ext}")
        };
        let path = dir.join(name);
        if !path.exists() && !tmp_name(&path).exists() {
            return path;
        }
        n += 1;
    }
}

/// Repairs every leftover `.tmp` file under `dir`.
fn repair_tree(dir: &Path) -> io::Result<Repair> {
    let mut repair = Repair::default();
    for path in walk(dir)? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(final_name) = name.strip_suffix(".tmp") else {
            continue;
        };
        let cut = if final_name.ends_with(".gz") {
            repair_gzip(&path)?
        } else {
            repair_plain(&path)?
        };
        let parent = path.parent().unwrap_or(dir);
        let own = parent.join(final_name);
        let target = if own.exists() {
            let (stem, ext) = final_name.split_once('.').unwrap_or((final_name, "ndjson"));
            unique_name(parent, stem, ext)
        } else {
            own
        };
        if fs::metadata(&path)?.len() == 0 {
            fs::remove_file(&path)?;
        } else {
            fs::rename(&path, &target)?;
        }
        File::open(parent)?.sync_all()?;
        repair.files += 1;
        repair.cut_bytes += cut;
    }
    Ok(repair)
}

fn walk(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Cuts a plain file after its last complete line; returns the bytes cut.
fn repair_plain(path: &Path) -> io::Result<u64> {
    let data = fs::read(path)?;
    let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let cut = (data.len() - keep) as u64;
    if cut > 0 {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(cut)
}

/// Keeps the complete lines of a gzip file that may end in a broken member; returns the
/// bytes of decoded data cut.
fn repair_gzip(path: &Path) -> io::Result<u64> {
    let raw = fs::read(path)?;
    let mut decoded = Vec::new();
    let clean = flate2::read::MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut decoded)
        .is_ok();
    let keep = decoded
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    if clean && keep == decoded.len() {
        return Ok(0);
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(&decoded[..keep])?;
    let fixed = enc.finish()?;
    let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
    if keep > 0 {
        f.write_all(&fixed)?;
    }
    f.sync_all()?;
    Ok((decoded.len() - keep) as u64)
}

/// The ids stored in files whose bucket may hold activities from `since_ms` on, per
/// (stream name, partition): what the merger remembers again after a restart.
pub fn recent_ids(
    dir: &Path,
    since_ms: u64,
    bucket_secs: u64,
) -> io::Result<HashMap<(String, Partition), Vec<ActivityId>>> {
    let mut out: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
    let earliest_bucket_start = since_ms.saturating_sub(bucket_secs * 1000);
    for path in walk(dir)? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") || !(name.ends_with(".ndjson") || name.ends_with(".ndjson.gz")) {
            continue;
        }
        let stem = name.split(['.', '-']).next().unwrap_or_default();
        let Some(start) = parse_stem(stem) else {
            continue;
        };
        if start < earliest_bucket_start {
            continue;
        }
        let Some(partition) = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("partition-"))
            .and_then(|n| n.parse::<Partition>().ok())
        else {
            continue;
        };
        let Some(stream) = path
            .parent()
            .and_then(Path::parent)
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
        else {
            continue;
        };
        let mut data = Vec::new();
        if name.ends_with(".gz") {
            let raw = fs::read(&path)?;
            let _ = flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut data);
        } else {
            data = fs::read(&path)?;
        }
        let ids = out.entry((stream.to_owned(), partition)).or_default();
        for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(LineKind::Activity(id)) = identify(line) {
                ids.push(id);
            }
        }
    }
    Ok(out)
}

/// `20231105T120000Z` → ms since the epoch.
fn parse_stem(stem: &str) -> Option<u64> {
    if stem.len() != 16 {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &stem[0..4],
        &stem[4..6],
        &stem[6..8],
        &stem[9..11],
        &stem[11..13],
        &stem[13..15]
    );
    tandem_core::time::parse_rfc3339(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// File names carry the bucket start and parse back.
    #[test]
    fn stems_round_trip() {
        let ms = tandem_core::time::parse_rfc3339("2023-07-05T17:10:00Z").unwrap();
        let stem = rfc3339_secs(ms).replace([':', '-'], "");
        assert_eq!(stem, "20230705T171000Z");
        assert_eq!(parse_stem(&stem), Some(ms));
    }
}

//! The file store: newline-delimited JSON, one file per stream, partition and time bucket.
//!
//! Layout: `<dir>/<stream>/partition-<n>/<bucket start>.ndjson[.gz]`, written as
//! `….tmp` while the bucket is open and renamed when it closes (atomic rotation). Each
//! write appends a whole batch or nothing: a failed write is truncated back, so a retry
//! never duplicates. With gzip each write is its own gzip member, so the file is a valid
//! gzip stream after every write. Activities are acknowledged once fsynced (on an interval,
//! at rotation, and early once a quarter of the driver's memory budget is written
//! unacknowledged, so that unacknowledged writes never fill the budget while the disk
//! keeps up). Writes run on the sink's own thread (the driver's, see
//! [`crate::driver::spawn`]: no hand-off per write); the fsync runs on a blocking thread,
//! on duplicated file handles, beside the writes, so a slow fsync (seconds, with a lot of
//! dirty data) delays acknowledgements, never the writes behind it.
//!
//! A failed fsync is never retried into an acknowledgement: on Linux a second fsync can
//! succeed for pages the kernel already dropped. Instead every open file is cut back to
//! what its last successful fsync covered and closed, nothing written since is
//! acknowledged, and the store answers [`StoreError::lost`]: the driver writes those
//! activities again, to new files.
//!
//! After a crash, [`FileStore::open`] repairs leftover `.tmp` files: an incomplete last
//! line is cut off a plain file (only never-acknowledged bytes go); a gzip file with a
//! broken last member is rewritten to a copy that is synced and renamed over it, so a
//! crash during the repair leaves the original whole.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
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
    /// happen; rotation always fsyncs, and so does writing a quarter of
    /// `delivery.max_memory_bytes` (what is unacknowledged is held in memory).
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
        } else if self.dir.exists() && !self.dir.is_dir() {
            let dir = self.dir.display();
            out.push(("dir", format!("{dir} exists and is not a directory")));
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
    /// Bytes a successful fsync covered.
    synced_len: u64,
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
    /// An fsync (or a cut back after a failed write) failed: what is not durable is lost.
    sync_failed: Option<io::Error>,
}

/// What [`FileStore::open`] repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repair {
    /// Leftover `.tmp` files found and renamed.
    pub files: usize,
    /// Bytes of incomplete lines cut off.
    pub cut_bytes: u64,
}

/// An fsync running beside the writes: the files it covers (duplicated handles, with the
/// length each had) and the acknowledgements it makes durable.
type SyncJob = tokio::task::JoinHandle<(io::Result<()>, Vec<(Key, u64)>, Vec<Ack>)>;

/// What an fsync is started with: the handles, their lengths, the acknowledgements.
type SyncWork = (Vec<File>, Vec<(Key, u64)>, Vec<Ack>);

/// The file store.
#[derive(Debug)]
pub struct FileStore {
    inner: Inner,
    fsync_interval: Duration,
    last_sync: Instant,
    unacked: usize,
    /// Line bytes written since the last fsync began, and how many start one early.
    unsynced_bytes: u64,
    sync_after_bytes: u64,
    /// At most one fsync at a time; writes go on while it runs.
    syncing: Option<SyncJob>,
    /// Durable, not reported yet.
    ready: Vec<Ack>,
    /// A failed fsync dropped what was not durable: reported (as
    /// [`StoreError::lost`]) once everything durable before it has been, and no put is
    /// taken meanwhile, so the loss covers exactly what the driver holds unacknowledged.
    lost: Option<String>,
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
            inner: Inner {
                cfg,
                names,
                open: HashMap::new(),
                pending: HashMap::new(),
                durable: Vec::new(),
                buf: Vec::new(),
                sync_failed: None,
            },
            fsync_interval,
            last_sync: Instant::now(),
            unacked: 0,
            unsynced_bytes: 0,
            sync_after_bytes: u64::MAX,
            syncing: None,
            ready: Vec::new(),
            lost: None,
        };
        Ok((store, repair))
    }

    /// Starts an fsync early once a quarter of the driver's memory budget is written
    /// unacknowledged: the driver holds what is unacknowledged, and asks for (and waits
    /// for) acknowledgements once it is half of its budget.
    pub fn with_memory_budget(mut self, max_memory_bytes: u64) -> FileStore {
        self.sync_after_bytes = (max_memory_bytes / 4).max(1);
        self
    }

    /// Runs `f` on the open files, on the calling thread: the driver's own thread (see
    /// [`crate::driver::spawn`]), so a write costs no hand-off to another thread and a
    /// blocked disk blocks that thread only. The fsyncs run beside it, on duplicated
    /// handles; one that failed is turned into a loss here.
    fn with_files<T>(
        &mut self,
        f: impl FnOnce(&mut Inner) -> io::Result<T>,
    ) -> Result<T, StoreError> {
        let (result, failed) = {
            let inner = &mut self.inner;
            let result = f(inner);
            let failed = inner.sync_failed.take().map(|e| {
                let lost = inner.lose_unsynced();
                (e, lost)
            });
            (result, failed)
        };
        if let Some((e, lost)) = failed {
            self.unacked = 0;
            self.lost = Some(format!(
                "fsync failed ({e}); {lost} activities written since the last good fsync are to be written again"
            ));
            return Err(StoreError::transient("file", format!("fsync failed: {e}")));
        }
        result.map_err(io_err)
    }

    /// Waits for a running fsync: its acknowledgements go to `ready`; if it failed,
    /// everything not yet durable is lost.
    async fn finish_sync(&mut self, job: SyncJob) -> Result<(), StoreError> {
        let (result, lens, acks) = job
            .await
            .map_err(|e| StoreError::fatal("file", format!("fsync thread failed: {e}")))?;
        tandem_core::crash::point("file.fsync");
        match result {
            Ok(()) => {
                self.ready.extend(acks);
                self.with_files(move |inner| {
                    inner.synced(&lens);
                    Ok(())
                })
            }
            Err(e) => {
                let unacked = acks;
                self.with_files(move |inner| {
                    inner.requeue(unacked);
                    inner.sync_failed = Some(e);
                    Ok(())
                })
            }
        }
    }

    /// Finishes a done (or, forced, any) fsync, rotates expired buckets and starts the
    /// next fsync when due. Durable acknowledgements go to `ready`; a failure is logged
    /// (a failed fsync is recorded in `lost`) and tried again at the next call.
    async fn collect(&mut self, force: bool) {
        if self
            .syncing
            .as_ref()
            .is_some_and(|job| force || job.is_finished())
            && let Some(job) = self.syncing.take()
            && self.finish_sync(job).await.is_err()
        {
            return;
        }
        let due = self.syncing.is_none()
            && (force
                || self.last_sync.elapsed() >= self.fsync_interval
                || self.unsynced_bytes >= self.sync_after_bytes);
        if due {
            self.last_sync = Instant::now();
            self.unsynced_bytes = 0;
        }
        let step = self.with_files(move |inner| {
            inner.rotate_expired(unix_ms_now())?;
            let started = if due { inner.begin_sync()? } else { None };
            Ok((std::mem::take(&mut inner.durable), started))
        });
        let (durable, started) = match step {
            Ok(step) => step,
            Err(e) => {
                tracing::warn!(error = %e, "file store: rotating or starting an fsync failed");
                return;
            }
        };
        self.ready.extend(durable);
        if let Some((files, lens, covered)) = started {
            let job = tokio::task::spawn_blocking(move || {
                let result = files.iter().try_for_each(sync_data);
                (result, lens, covered)
            });
            if force {
                let _ = self.finish_sync(job).await;
            } else {
                self.syncing = Some(job);
            }
        }
    }

    /// Closes every open file (fsync and rename). Used at shutdown.
    async fn close_all(&mut self) -> Result<Vec<Ack>, StoreError> {
        if let Some(job) = self.syncing.take() {
            // A failure is recorded in `lost`; what was durable is still reported.
            let _ = self.finish_sync(job).await;
        }
        let closed = self.with_files(|inner| {
            let keys: Vec<Key> = inner.open.keys().copied().collect();
            for key in keys {
                inner.rotate(key)?;
            }
            Ok(std::mem::take(&mut inner.durable))
        });
        if let Ok(acks) = closed {
            self.ready.extend(acks);
        }
        self.report()
    }

    /// What is durable and not reported yet; once all of it is reported, a loss.
    fn report(&mut self) -> Result<Vec<Ack>, StoreError> {
        if !self.ready.is_empty() {
            let acks = std::mem::take(&mut self.ready);
            self.unacked -= acks
                .iter()
                .map(|a| a.ids.len())
                .sum::<usize>()
                .min(self.unacked);
            return Ok(acks);
        }
        match self.lost.take() {
            Some(why) => Err(StoreError::lost("file", why)),
            None => Ok(Vec::new()),
        }
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
                    synced_len: 0,
                    bucket,
                    dirty: false,
                },
            );
        }
        self.open
            .get_mut(&key)
            .ok_or_else(|| io::Error::other("file vanished from the open set"))
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
            // All or nothing: cut off whatever part of the batch made it. If even that
            // fails, the file cannot take another line safely (it would be glued to the
            // partial one): it is treated like a failed fsync.
            if let Err(cut) = f.file.set_len(f.len) {
                self.sync_failed = Some(cut);
            }
            self.buf = buf;
            return Err(e);
        }
        f.len += buf.len() as u64;
        f.dirty = true;
        self.buf = buf;
        self.pending.entry(key).or_default().push(Ack::of(batch));
        Ok(())
    }

    /// Starts an fsync of every file written since the last one: duplicated handles of
    /// those files and the acknowledgements the fsync will make durable. Writes may go on
    /// meanwhile; an fsync on a duplicate covers them too, which only helps.
    fn begin_sync(&mut self) -> io::Result<Option<SyncWork>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let mut files = Vec::new();
        let mut lens = Vec::new();
        for (key, f) in self.open.iter_mut().filter(|(_, f)| f.dirty) {
            files.push(f.file.try_clone()?);
            lens.push((*key, f.len));
            f.dirty = false;
        }
        let acks = self.pending.drain().flat_map(|(_, acks)| acks).collect();
        Ok(Some((files, lens, acks)))
    }

    /// An fsync covered these lengths.
    fn synced(&mut self, lens: &[(Key, u64)]) {
        for (key, len) in lens {
            if let Some(f) = self.open.get_mut(key) {
                f.synced_len = f.synced_len.max(*len);
            }
        }
    }

    /// After a failed fsync: every open file is cut back to what a good fsync covered and
    /// closed; nothing written since is ever acknowledged. Returns how many activities
    /// were dropped (the driver writes them again).
    fn lose_unsynced(&mut self) -> usize {
        let lost = self
            .pending
            .drain()
            .flat_map(|(_, acks)| acks)
            .map(|a| a.ids.len())
            .sum();
        for (_, f) in self.open.drain() {
            let kept = f
                .file
                .set_len(f.synced_len)
                .and_then(|()| f.file.sync_data());
            drop(f.file);
            let closed = match kept {
                Ok(()) if f.synced_len == 0 => fs::remove_file(&f.tmp),
                Ok(()) => fs::rename(&f.tmp, &f.target).and_then(|()| sync_parent(&f.target)),
                // Left as `.tmp`: the next start's repair cuts what follows the last line.
                Err(e) => Err(e),
            };
            if let Err(e) = closed {
                tracing::error!(file = %f.tmp.display(), error = %e, "cannot close a file after a failed fsync; it is repaired at the next start");
            }
        }
        lost
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
        let Some(f) = self.open.get(&key) else {
            return Ok(());
        };
        if let Err(e) = f.file.sync_data() {
            // Left open: losing what is not durable cuts it back and closes it.
            self.sync_failed = Some(io::Error::new(e.kind(), e.to_string()));
            return Err(e);
        }
        let Some(f) = self.open.remove(&key) else {
            return Ok(());
        };
        drop(f.file);
        if f.len == 0 {
            fs::remove_file(&f.tmp)?;
        } else {
            fs::rename(&f.tmp, &f.target)?;
            sync_parent(&f.target)?;
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
        if self.lost.is_some() {
            return Err(StoreError::transient(
                "file",
                "a failed fsync is being reported; writing resumes after it",
            ));
        }
        let n = batch.items.len();
        let bytes: u64 = batch.items.iter().map(|u| u.line.len() as u64).sum();
        self.with_files(|inner| inner.put(batch, unix_ms_now()))?;
        self.unacked += n;
        self.unsynced_bytes += bytes;
        if self.unsynced_bytes >= self.sync_after_bytes
            && self.lost.is_none()
            && self.syncing.as_ref().is_none_or(|job| job.is_finished())
        {
            // Started now, beside the writes; the driver's next call collects it.
            self.collect(false).await;
        }
        Ok(())
    }

    async fn acks(&mut self, force: bool) -> Result<Vec<Ack>, StoreError> {
        if self.lost.is_none() {
            self.collect(force).await;
        }
        self.report()
    }

    /// The running fsync (the oldest writes) is waited for and the next one started if
    /// due; only with none running is one started and waited for.
    async fn oldest_acks(&mut self) -> Result<Vec<Ack>, StoreError> {
        if self.lost.is_none() {
            match self.syncing.take() {
                Some(job) => {
                    if self.finish_sync(job).await.is_ok() {
                        self.collect(false).await;
                    }
                }
                None => self.collect(true).await,
            }
        }
        self.report()
    }

    fn unacknowledged(&self) -> usize {
        self.unacked
    }

    async fn close(&mut self) -> Result<Vec<Ack>, StoreError> {
        self.close_all().await
    }
}

/// Starts a file sink: repairs what a crash left, and hands the mergers the ids stored
/// since `ctx.remember_since_ms` (a replay after a restart repeats them).
pub(crate) fn start(
    name: &str,
    cfg: &FileConfig,
    ctx: crate::start::SinkContext,
) -> Result<crate::start::StartedSink, crate::start::SinkStartError> {
    use crate::start::SinkStartError;
    let (store, _repair) = FileStore::open(cfg.clone(), ctx.names.clone())
        .map_err(|e| SinkStartError::Store(format!("{}: {e}", cfg.dir.display())))?;
    let store = store.with_memory_budget(ctx.delivery.max_memory_bytes);
    let recent = recent_ids(&cfg.dir, ctx.remember_since_ms, cfg.bucket_secs)
        .map_err(|e| SinkStartError::Store(format!("reading recent ids: {e}")))?;
    crate::start::with_known(name, store, ctx, recent)
}

/// Tests make the next background fsync fail, as a disk does that drops dirty pages.
#[cfg(test)]
static FAIL_NEXT_SYNC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn sync_data(f: &File) -> io::Result<()> {
    #[cfg(test)]
    if FAIL_NEXT_SYNC.swap(false, std::sync::atomic::Ordering::SeqCst) {
        return Err(io::Error::other("injected fsync failure"));
    }
    f.sync_data()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
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
        if name.ends_with(".repair") {
            // A repair copy a crash interrupted: the original is still whole.
            fs::remove_file(&path)?;
            continue;
        }
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

/// Cuts a plain file after its last complete line; returns the bytes cut. Cutting in place
/// is safe: only the tail after the last newline goes, and no acknowledged write ends
/// inside a line.
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
    // A copy, synced, then renamed over the original: a crash at any point leaves either
    // the original or the whole repaired file.
    let mut copy_name = path.as_os_str().to_owned();
    copy_name.push(".repair");
    let copy = PathBuf::from(copy_name);
    {
        let mut f = File::create(&copy)?;
        if keep > 0 {
            f.write_all(&fixed)?;
        }
        f.sync_all()?;
    }
    tandem_core::crash::point("file.repair_copied");
    fs::rename(&copy, path)?;
    sync_parent(path)?;
    Ok((decoded.len() - keep) as u64)
}

/// A file of the store, as the layout names it:
/// `<dir>/<stream>/partition-<n>/<bucket start>[-<n>].ndjson[.gz][.tmp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub path: PathBuf,
    pub stream: String,
    pub partition: Partition,
    /// The start of the file's time bucket (ms), when the name carries one.
    pub bucket_start_ms: Option<u64>,
    pub gzip: bool,
    /// Still open (`.tmp`): written by a running process or left by a crash.
    pub open: bool,
}

impl StoredFile {
    /// Reads a path of the layout; `None` for anything else.
    fn parse(path: &Path) -> Option<StoredFile> {
        let name = path.file_name()?.to_str()?;
        let (name, open) = match name.strip_suffix(".tmp") {
            Some(n) => (n, true),
            None => (name, false),
        };
        let gzip = name.ends_with(".ndjson.gz");
        if !gzip && !name.ends_with(".ndjson") {
            return None;
        }
        let partition_dir = path.parent()?;
        let partition = partition_dir
            .file_name()?
            .to_str()?
            .strip_prefix("partition-")?
            .parse::<Partition>()
            .ok()?;
        let stream = partition_dir.parent()?.file_name()?.to_str()?.to_owned();
        let stem = name.split(['.', '-']).next().unwrap_or_default();
        Some(StoredFile {
            path: path.to_path_buf(),
            stream,
            partition,
            bucket_start_ms: parse_stem(stem),
            gzip,
            open,
        })
    }

    /// The activity ids the file holds, in order (an incomplete gzip member or last line
    /// ends the reading).
    pub fn ids(&self) -> io::Result<Vec<ActivityId>> {
        let raw = fs::read(&self.path)?;
        let data = if self.gzip {
            let mut data = Vec::new();
            let _ = flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut data);
            data
        } else {
            raw
        };
        Ok(data
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| match identify(l) {
                Ok(LineKind::Activity(id)) => Some(id),
                _ => None,
            })
            .collect())
    }
}

/// Every file of the store under `dir`, in path order.
pub fn stored_files(dir: &Path) -> io::Result<Vec<StoredFile>> {
    Ok(walk(dir)?
        .iter()
        .filter_map(|p| StoredFile::parse(p))
        .collect())
}

/// The ids stored in files whose bucket may hold activities from `since_ms` on, per
/// (stream name, partition): what the merger remembers again after a restart.
pub fn recent_ids(
    dir: &Path,
    since_ms: u64,
    bucket_secs: u64,
) -> io::Result<HashMap<(String, Partition), Vec<ActivityId>>> {
    let earliest_bucket_start = since_ms.saturating_sub(bucket_secs * 1000);
    let mut out: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
    for f in stored_files(dir)? {
        if f.open || f.bucket_start_ms.is_none_or(|s| s < earliest_bucket_start) {
            continue;
        }
        let ids = f.ids()?;
        out.entry((f.stream, f.partition)).or_default().extend(ids);
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
    use std::sync::Arc;

    use super::*;

    fn batch(ids: std::ops::Range<u64>) -> UniqueBatch {
        UniqueBatch {
            stream: StreamId(0),
            partition: 1,
            items: ids
                .map(|i| tandem_core::Unique {
                    seq: i + 1,
                    id: ActivityId::Post(i),
                    line: bytes::Bytes::from(format!("{{\"id_str\":\"{i}\"}}")),
                    path: tandem_core::PathId(0),
                    received: Instant::now(),
                })
                .collect(),
        }
    }

    /// A store in `dir` whose fsync interval is 10 minutes away, under a driver budget of
    /// 4 KiB: only the budget starts an fsync.
    fn budgeted_store(dir: &Path) -> FileStore {
        let cfg = FileConfig {
            dir: dir.to_path_buf(),
            fsync_interval_ms: 600_000,
            ..FileConfig::default()
        };
        let names: StreamNames = Arc::new(vec!["d".into()]);
        let (store, _) = FileStore::open(cfg, names).unwrap();
        store.with_memory_budget(4 * 1024)
    }

    /// With an fsync interval far away, writing a quarter of the driver's memory budget
    /// starts an fsync at once: its activities are acknowledged without waiting for the
    /// interval (the driver holds them until then).
    #[tokio::test]
    async fn a_quarter_of_the_memory_budget_written_is_fsynced_early() {
        let dir = tempfile::tempdir().unwrap();
        // A quarter: 1 KiB; each batch's lines are about 15 B each.
        let mut store = budgeted_store(dir.path());
        store.put(&batch(0..10)).await.unwrap();
        assert!(
            store.acks(false).await.unwrap().is_empty(),
            "under a quarter"
        );
        store.put(&batch(10..100)).await.unwrap();
        let mut acked = 0;
        for _ in 0..200 {
            acked += (store.acks(false).await.unwrap().iter())
                .map(|a| a.ids.len())
                .sum::<usize>();
            if acked == 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            acked, 100,
            "acknowledged long before the 10-minute interval"
        );
    }

    /// A driver whose memory is taken by unacknowledged writes waits for the running
    /// fsync (the oldest writes) only: what was written after that fsync began is left to
    /// the next one, so the writes go on while it settles. `acks(true)` instead makes
    /// everything durable.
    #[tokio::test]
    async fn waiting_for_the_oldest_leaves_newer_writes_to_the_next_fsync() {
        let dir = tempfile::tempdir().unwrap();
        // A quarter: 1 KiB. The first put passes it and starts an fsync; the second,
        // under it, starts none.
        let mut store = budgeted_store(dir.path());
        store.put(&batch(0..100)).await.unwrap();
        assert!(store.syncing.is_some(), "an fsync began beside the writes");
        store.put(&batch(100..110)).await.unwrap();
        let oldest: Vec<u64> = (store.oldest_acks().await.unwrap().iter())
            .flat_map(|a| a.seqs.iter().map(|s| s - 1))
            .collect();
        assert_eq!(oldest, (0..100).collect::<Vec<_>>());
        assert_eq!(store.unacknowledged(), 10, "the newer writes wait");
        let rest: Vec<u64> = (store.acks(true).await.unwrap().iter())
            .flat_map(|a| a.seqs.iter().map(|s| s - 1))
            .collect();
        assert_eq!(rest, (100..110).collect::<Vec<_>>());
        assert_eq!(store.unacknowledged(), 0);
    }

    /// A failed fsync is never retried into an acknowledgement: what it covered is
    /// reported lost (after everything durable before it), the file is cut back to the
    /// last good fsync, and the activities written again land once each.
    #[tokio::test]
    async fn failed_fsync_loses_exactly_what_was_not_durable() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FileConfig {
            dir: dir.path().to_path_buf(),
            fsync_interval_ms: 0,
            ..FileConfig::default()
        };
        let names: StreamNames = Arc::new(vec!["d".into()]);
        let (mut store, _) = FileStore::open(cfg, names).unwrap();
        store.put(&batch(0..10)).await.unwrap();
        let acks = store.acks(true).await.unwrap();
        assert_eq!(acks.iter().map(|a| a.ids.len()).sum::<usize>(), 10);
        store.put(&batch(10..20)).await.unwrap();
        FAIL_NEXT_SYNC.store(true, std::sync::atomic::Ordering::SeqCst);
        let lost = store.acks(true).await.unwrap_err();
        assert_eq!(lost.class, crate::ErrorClass::Lost, "{lost}");
        assert!(store.acks(true).await.unwrap().is_empty(), "reported once");
        // The driver puts the lost batch again: it goes to a new file.
        store.put(&batch(10..20)).await.unwrap();
        let acks = store.close().await.unwrap();
        assert_eq!(
            acks.iter().flat_map(|a| a.seqs.clone()).collect::<Vec<_>>(),
            (11..=20).collect::<Vec<_>>()
        );
        let mut lines = Vec::new();
        for path in walk(dir.path()).unwrap() {
            let text = fs::read_to_string(&path).unwrap();
            lines.extend(text.lines().map(str::to_owned));
        }
        lines.sort();
        let mut want: Vec<String> = (0..20).map(|i| format!("{{\"id_str\":\"{i}\"}}")).collect();
        want.sort();
        assert_eq!(
            lines, want,
            "every activity once, nothing of the failed write kept"
        );
    }

    /// File names carry the bucket start and parse back.
    #[test]
    fn stems_round_trip() {
        let ms = tandem_core::time::parse_rfc3339("2023-07-05T17:10:00Z").unwrap();
        let stem = rfc3339_secs(ms).replace([':', '-'], "");
        assert_eq!(stem, "20230705T171000Z");
        assert_eq!(parse_stem(&stem), Some(ms));
    }
}

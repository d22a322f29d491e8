//! File store and sink driver.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_core::{ActivityId, PathId, StreamId, Tally, Unique, UniqueBatch};
use tandem_sink::*;
use tokio::time::Instant;

fn names() -> StreamNames {
    Arc::new(vec!["decahose".into()])
}

fn batch(partition: u32, ids: std::ops::Range<u64>) -> UniqueBatch {
    UniqueBatch {
        stream: StreamId(0),
        partition,
        items: ids
            .map(|i| Unique {
                seq: i + 1,
                id: ActivityId::Post(i),
                line: Bytes::from(format!("{{\"id_str\":\"{i}\",\"text\":\"t\"}}")),
                path: PathId(0),
                received: Instant::now(),
            })
            .collect(),
    }
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

fn read_lines(path: &std::path::Path) -> Vec<String> {
    let raw = std::fs::read(path).unwrap();
    let text = if path.to_string_lossy().contains(".gz") {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .unwrap();
        s
    } else {
        String::from_utf8(raw).unwrap()
    };
    text.lines().map(str::to_owned).collect()
}

/// Activities are acknowledged only after fsync; buckets rotate into final names; gzip
/// files decode after every write.
#[tokio::test]
async fn files_rotate_and_acknowledge_after_fsync() {
    for gzip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FileConfig {
            dir: dir.path().to_path_buf(),
            bucket_secs: 3600,
            gzip,
            fsync_interval_ms: 300,
        };
        let (mut store, repair) = FileStore::open(cfg, names()).unwrap();
        assert_eq!(repair, Repair::default());
        store.put(&batch(1, 0..10)).await.unwrap();
        assert!(
            store.acks(false).await.unwrap().is_empty(),
            "not durable yet"
        );
        assert_eq!(store.unacknowledged(), 10);
        tokio::time::sleep(Duration::from_millis(350)).await;
        // The fsync, due now, runs beside further writes; a later poll collects it.
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while acked < 10 && tokio::time::Instant::now() < deadline {
            acked += store
                .acks(false)
                .await
                .unwrap()
                .iter()
                .map(|a| a.ids.len())
                .sum::<usize>();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(acked, 10);
        let open: Vec<_> = files(dir.path());
        assert_eq!(open.len(), 1);
        assert!(
            open[0].to_string_lossy().ends_with(".tmp"),
            "the bucket is still open"
        );
        assert_eq!(
            read_lines(&open[0]).len(),
            10,
            "gzip={gzip}: readable while open"
        );
        Store::close(&mut store).await.unwrap();
        // With one-second buckets, the next bucket closes the first under its final name.
        let cfg = FileConfig {
            dir: dir.path().to_path_buf(),
            bucket_secs: 1,
            gzip,
            fsync_interval_ms: 300,
        };
        let (mut store, _) = FileStore::open(cfg, names()).unwrap();
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        store.put(&batch(1, 10..15)).await.unwrap();
        store.put(&batch(2, 15..20)).await.unwrap();
        let acks = Store::close(&mut store).await.unwrap();
        assert_eq!(acks.iter().map(|a| a.ids.len()).sum::<usize>(), 10);
        let done = files(dir.path());
        assert!(done.len() >= 3, "{done:?}");
        assert!(done.iter().all(|p| !p.to_string_lossy().ends_with(".tmp")));
        let ext = if gzip { ".ndjson.gz" } else { ".ndjson" };
        assert!(done.iter().all(|p| p.to_string_lossy().ends_with(ext)));
        let all: usize = done.iter().map(|p| read_lines(p).len()).sum();
        assert_eq!(all, 20);
        assert!(
            done.iter()
                .any(|p| p.to_string_lossy().contains("decahose/partition-2/"))
        );
    }
}

/// A crash leaves a `.tmp` file whose last line (or gzip member) is incomplete: opening
/// the store cuts it off and keeps every complete line.
#[tokio::test]
async fn crash_leftovers_keep_only_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("decahose/partition-1");
    std::fs::create_dir_all(&part).unwrap();
    std::fs::write(
        part.join("20240101T000000Z.ndjson.tmp"),
        b"{\"id_str\":\"1\"}\n{\"id_str\":\"2\"}\n{\"id_str\":\"3\",\"te",
    )
    .unwrap();
    let mut gz = Vec::new();
    for i in 0..3 {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(
            format!("{{\"id_str\":\"{i}\",\"text\":\"{}\"}}\n", "abc".repeat(40)).as_bytes(),
        )
        .unwrap();
        let member = enc.finish().unwrap();
        if i == 2 {
            gz.extend_from_slice(&member[..member.len() / 2]); // cut inside its deflate data
        } else {
            gz.extend(member);
        }
    }
    std::fs::write(part.join("20240101T001000Z.ndjson.gz.tmp"), &gz).unwrap();
    let cfg = FileConfig {
        dir: dir.path().to_path_buf(),
        gzip: true,
        ..FileConfig::default()
    };
    let (_store, repair) = FileStore::open(cfg, names()).unwrap();
    assert_eq!(repair.files, 2);
    let plain = read_lines(&part.join("20240101T000000Z.ndjson"));
    assert_eq!(plain, ["{\"id_str\":\"1\"}", "{\"id_str\":\"2\"}"]);
    let zipped = read_lines(&part.join("20240101T001000Z.ndjson.gz"));
    assert_eq!(zipped.len(), 2, "complete lines only: {zipped:?}");
    let raw = std::fs::read(part.join("20240101T001000Z.ndjson.gz")).unwrap();
    let mut all = Vec::new();
    flate2::read::MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut all)
        .expect("the repaired file is valid gzip");
    assert!(
        files(dir.path())
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".tmp"))
    );
}

/// The ids of recently stored activities are read back for the merger's rebuild.
#[tokio::test]
async fn recent_ids_are_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FileConfig {
        dir: dir.path().to_path_buf(),
        gzip: true,
        ..FileConfig::default()
    };
    let (mut store, _) = FileStore::open(cfg.clone(), names()).unwrap();
    store.put(&batch(1, 0..100)).await.unwrap();
    store.put(&batch(2, 100..150)).await.unwrap();
    Store::close(&mut store).await.unwrap();
    let ids = recent_ids(
        dir.path(),
        tandem_core::time::unix_ms_now() - 60_000,
        cfg.bucket_secs,
    )
    .unwrap();
    assert_eq!(ids[&("decahose".to_owned(), 1)].len(), 100);
    assert_eq!(ids[&("decahose".to_owned(), 2)][0], ActivityId::Post(100));
    let none = recent_ids(
        dir.path(),
        tandem_core::time::unix_ms_now() + 3_600_000,
        cfg.bucket_secs,
    )
    .unwrap();
    assert!(none.is_empty());
}

/// A store that fails while `down` is set.
struct Flaky {
    inner: NullStore,
    down: Arc<AtomicBool>,
    order: Arc<std::sync::Mutex<Vec<ActivityId>>>,
}

impl Store for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::transient("flaky", "down"));
        }
        self.order
            .lock()
            .unwrap()
            .extend(batch.items.iter().map(|u| u.id));
        self.inner.put(batch).await
    }
    async fn acks(&mut self, force: bool) -> Result<Vec<Ack>, StoreError> {
        self.inner.acks(force).await
    }
    fn unacknowledged(&self) -> usize {
        self.inner.unacknowledged()
    }
}

/// While the store is down the driver keeps accepting (memory, then spool), then delivers
/// everything in order once it returns; the tallies account for every activity.
#[tokio::test]
async fn outage_is_spooled_and_delivered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let down = Arc::new(AtomicBool::new(true));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = Flaky {
        inner: NullStore::default(),
        down: down.clone(),
        order: order.clone(),
    };
    let tally = Arc::new(Tally::default());
    let tallies = HashMap::from([((StreamId(0), 1), tally.clone())]);
    let cfg = DriverConfig {
        max_memory_activities: 300,
        spool_dir: dir.path().join("spool"),
        retry_initial_ms: 20,
        retry_max_ms: 100,
        ..DriverConfig::default()
    };
    let (tx, handle) = spawn("test", store, cfg, names(), tallies, |_, _| false, 4).unwrap();
    for i in 0..20u64 {
        // Never blocks for long although the store is down.
        tokio::time::timeout(
            Duration::from_millis(500),
            tx.send(batch(1, i * 100..i * 100 + 100)),
        )
        .await
        .unwrap()
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = tally.snapshot();
    assert_eq!((t.stored, t.in_flight), (0, 2_000));
    assert!(
        spool_files(&dir.path().join("spool")) > 0,
        "memory (300) overflowed to the spool"
    );
    down.store(false, Ordering::SeqCst);
    drop(tx);
    let report = handle.finish().await;
    assert_eq!(report.stored_total, 2_000);
    assert_eq!(report.left_in_spool, 0);
    assert_eq!(
        *order.lock().unwrap(),
        (0..2_000).map(ActivityId::Post).collect::<Vec<_>>()
    );
    let t = tally.snapshot();
    assert_eq!((t.stored, t.in_flight), (2_000, 0));
    assert_eq!(
        spool_files(&dir.path().join("spool")),
        0,
        "a spool stored whole is deleted"
    );
}

fn spool_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// At shutdown with the store still down, what is left waits in the spool, and the next
/// start delivers it (minus what was already stored).
#[tokio::test]
async fn undrained_activities_survive_in_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let down = Arc::new(AtomicBool::new(true));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let cfg = DriverConfig {
        spool_dir: spool_dir.clone(),
        drain_deadline_ms: 200,
        retry_initial_ms: 20,
        ..DriverConfig::default()
    };
    let store = Flaky {
        inner: NullStore::default(),
        down: down.clone(),
        order: order.clone(),
    };
    let (tx, handle) = spawn(
        "test",
        store,
        cfg.clone(),
        names(),
        HashMap::new(),
        |_, _| false,
        4,
    )
    .unwrap();
    tx.send(batch(1, 0..50)).await.unwrap();
    drop(tx);
    let report = handle.finish().await;
    assert_eq!((report.drained, report.left_in_spool), (0, 50));
    down.store(false, Ordering::SeqCst);
    let store = Flaky {
        inner: NullStore::default(),
        down,
        order: order.clone(),
    };
    let (tx, handle) = spawn(
        "test",
        store,
        cfg,
        names(),
        HashMap::new(),
        |_, u| u.id == ActivityId::Post(0),
        4,
    )
    .unwrap();
    drop(tx);
    let report = handle.finish().await;
    assert_eq!(
        report.stored_total, 49,
        "replayed, minus the one already stored"
    );
    assert_eq!(order.lock().unwrap().first(), Some(&ActivityId::Post(1)));
}

/// A store that keeps what it is given and acknowledges on command: the first
/// `lose_first` acknowledgement rounds report the writes lost (a failed fsync), and
/// `silent` withholds every acknowledgement (a JetStream server that stopped answering).
struct Scripted {
    held: Vec<UniqueBatch>,
    written: Arc<std::sync::Mutex<Vec<ActivityId>>>,
    lose_first: usize,
    silent: bool,
}

impl Scripted {
    /// A store that takes writes and never acknowledges them.
    fn silent() -> Scripted {
        Scripted {
            held: Vec::new(),
            written: Arc::default(),
            lose_first: 0,
            silent: true,
        }
    }

    /// A store that acknowledges everything, recording what it wrote in `written`.
    fn good(written: &Arc<std::sync::Mutex<Vec<ActivityId>>>) -> Scripted {
        Scripted {
            held: Vec::new(),
            written: written.clone(),
            lose_first: 0,
            silent: false,
        }
    }
}

impl Store for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }
    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        self.held.push(batch.clone());
        Ok(())
    }
    async fn acks(&mut self, _force: bool) -> Result<Vec<Ack>, StoreError> {
        if self.silent || self.held.is_empty() {
            return Ok(Vec::new());
        }
        if self.lose_first > 0 {
            self.lose_first -= 1;
            self.held.clear();
            return Err(StoreError::lost("scripted", "fsync failed"));
        }
        let mut written = self.written.lock().unwrap();
        let acks = self
            .held
            .drain(..)
            .map(|b| {
                written.extend(b.items.iter().map(|u| u.id));
                Ack::of(&b)
            })
            .collect();
        Ok(acks)
    }
    fn unacknowledged(&self) -> usize {
        self.held.iter().map(|b| b.items.len()).sum()
    }
}

/// Writes the store reports lost (a failed fsync) are put again and stored once each,
/// in order; the watermark reaches the last number only then.
#[tokio::test]
async fn lost_writes_are_put_again_before_anything_newer() {
    let dir = tempfile::tempdir().unwrap();
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = Scripted {
        held: Vec::new(),
        written: written.clone(),
        lose_first: 2,
        silent: false,
    };
    let tally = Arc::new(Tally::default());
    let tallies = HashMap::from([((StreamId(0), 1), tally.clone())]);
    let cfg = DriverConfig {
        spool_dir: dir.path().join("spool"),
        ack_interval_ms: 10,
        ..DriverConfig::default()
    };
    let (tx, handle) = spawn("test", store, cfg, names(), tallies, |_, _| false, 4).unwrap();
    for i in 0..10u64 {
        tx.send(batch(1, i * 10..i * 10 + 10)).await.unwrap();
    }
    drop(tx);
    let report = handle.finish().await;
    assert_eq!(report.stored_total, 100);
    assert_eq!(
        *written.lock().unwrap(),
        (0..100).map(ActivityId::Post).collect::<Vec<_>>(),
        "each once, in order"
    );
    let t = tally.snapshot();
    assert_eq!((t.stored, t.in_flight), (100, 0));
    assert!(tally.stored_through(100) && !tally.stored_through(101));
}

/// Activities the store accepted but never acknowledged are not stored: at exit they go
/// to the spool, the watermark never covers them, and the next start delivers them.
#[tokio::test]
async fn unacknowledged_at_exit_are_spooled_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DriverConfig {
        spool_dir: dir.path().join("spool"),
        drain_deadline_ms: 200,
        ack_interval_ms: 10,
        ..DriverConfig::default()
    };
    let silent = Scripted::silent();
    let tally = Arc::new(Tally::default());
    let tallies = HashMap::from([((StreamId(0), 1), tally.clone())]);
    let (tx, handle) = spawn(
        "test",
        silent,
        cfg.clone(),
        names(),
        tallies,
        |_, _| false,
        4,
    )
    .unwrap();
    tx.send(batch(1, 0..30)).await.unwrap();
    drop(tx);
    let report = handle.finish().await;
    assert_eq!((report.stored_total, report.left_in_spool), (0, 30));
    assert!(
        !tally.stored_through(1),
        "nothing acknowledged, nothing stored"
    );

    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let good = Scripted::good(&written);
    let tally = Arc::new(Tally::default());
    let tallies = HashMap::from([((StreamId(0), 1), tally.clone())]);
    let (tx, handle) = spawn("test", good, cfg, names(), tallies, |_, _| false, 4).unwrap();
    assert_eq!(
        handle.waiting[&("decahose".to_owned(), 1)].len(),
        30,
        "the merger is told what waits in the spool"
    );
    assert_eq!(
        tally.numbered.load(Ordering::SeqCst),
        30,
        "the replay is numbered before anything new"
    );
    drop(tx);
    let report = handle.finish().await;
    assert_eq!(report.stored_total, 30);
    assert_eq!(written.lock().unwrap().len(), 30);
    assert!(tally.stored_through(30));
    assert_eq!(
        spool_files(&dir.path().join("spool")),
        0,
        "stored, then deleted"
    );
}

/// A store that refuses every write for good, counting the attempts.
struct Refusing {
    attempts: Arc<std::sync::atomic::AtomicUsize>,
}

impl Store for Refusing {
    fn kind(&self) -> &'static str {
        "refusing"
    }
    async fn put(&mut self, _batch: &UniqueBatch) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        Err(StoreError::fatal(
            "refusing",
            "the stream's duplicate window is too short",
        ))
    }
    async fn acks(&mut self, _force: bool) -> Result<Vec<Ack>, StoreError> {
        Ok(Vec::new())
    }
    fn unacknowledged(&self) -> usize {
        0
    }
}

/// A store that refuses for good is not retried: the sink reports down and keeps every
/// activity (memory, then spool at exit) for a restart with a fixed configuration.
#[tokio::test]
async fn fatal_store_error_stops_retrying_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cfg = DriverConfig {
        spool_dir: dir.path().join("spool"),
        retry_initial_ms: 1,
        retry_max_ms: 2,
        drain_deadline_ms: 60_000,
        ..DriverConfig::default()
    };
    let store = Refusing {
        attempts: attempts.clone(),
    };
    let (tx, handle) = spawn("test", store, cfg, names(), HashMap::new(), |_, _| false, 4).unwrap();
    let up = handle.up.clone();
    for i in 0..5u64 {
        tx.send(batch(1, i * 10..i * 10 + 10)).await.unwrap();
    }
    // Batches keep being taken while nothing is sent to the store.
    while up.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    drop(tx);
    let report = handle.finish().await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "refused once, never retried"
    );
    assert_eq!((report.stored_total, report.left_in_spool), (0, 50));
}

/// Spooled activities of a stream no longer configured are moved to a spool of their own
/// (`orphaned/`), so the main spool can be emptied, and nothing of them is lost.
#[tokio::test]
async fn spool_of_a_removed_stream_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let cfg = DriverConfig {
        spool_dir: spool_dir.clone(),
        drain_deadline_ms: 100,
        ack_interval_ms: 10,
        ..DriverConfig::default()
    };
    let silent = Scripted::silent();
    let (tx, handle) = spawn(
        "test",
        silent,
        cfg.clone(),
        names(),
        HashMap::new(),
        |_, _| false,
        4,
    )
    .unwrap();
    tx.send(batch(1, 0..20)).await.unwrap();
    drop(tx);
    assert_eq!(handle.finish().await.left_in_spool, 20);

    let renamed: StreamNames = Arc::new(vec!["another".into()]);
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let good = Scripted::good(&written);
    let (tx, handle) = spawn("test", good, cfg, renamed, HashMap::new(), |_, _| false, 4).unwrap();
    drop(tx);
    let report = handle.finish().await;
    assert_eq!(
        report.stored_total, 0,
        "not stored under another stream's name"
    );
    assert_eq!(spool_files(&spool_dir), 0, "the main spool is emptied");
    assert_eq!(spool_files(&spool_dir.join("orphaned")), 1, "kept aside");
}

/// A spool whose first batches the store already holds (a crash between the store's
/// acknowledgement and the segment's deletion) replays the rest straight away: skipped
/// batches cost no retry delay, so the drain finishes well within its deadline.
#[tokio::test]
async fn stored_spool_batches_are_skipped_without_delay() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DriverConfig {
        spool_dir: dir.path().join("spool"),
        drain_deadline_ms: 1_500,
        retry_initial_ms: 200,
        retry_max_ms: 10_000,
        ack_interval_ms: 10,
        ..DriverConfig::default()
    };
    let silent = Scripted::silent();
    let (tx, handle) = spawn(
        "test",
        silent,
        cfg.clone(),
        names(),
        HashMap::new(),
        |_, _| false,
        64,
    )
    .unwrap();
    for i in 0..20u64 {
        tx.send(batch(1, i * 10..i * 10 + 10)).await.unwrap();
    }
    drop(tx);
    assert_eq!(handle.finish().await.left_in_spool, 200);
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let good = Scripted::good(&written);
    // Everything but the last batch is in the store already.
    let (tx, handle) = spawn(
        "test",
        good,
        cfg,
        names(),
        HashMap::new(),
        |_, u| !matches!(u.id, ActivityId::Post(n) if n >= 190),
        4,
    )
    .unwrap();
    drop(tx);
    let report = handle.finish().await;
    assert_eq!((report.stored_total, report.left_in_spool), (10, 0));
    assert_eq!(
        *written.lock().unwrap(),
        (190..200).map(ActivityId::Post).collect::<Vec<_>>()
    );
}

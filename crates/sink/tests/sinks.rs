//! File store and sink driver; the JetStream store over TLS with a token, against a real
//! `nats-server` (installed by `scripts/setup-test-deps`; missing is a failure, never a
//! skip) on an ephemeral loopback port.

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

// ---------------------------------------------------------------------------- NATS over TLS

/// A CA, a server certificate for `localhost` and 127.0.0.1 signed by it, and a token,
/// written as PEM and text files like a mounted Secret.
struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    const TOKEN: &'static str = "planted-nats-token-7f3a";

    fn generate() -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tandem test NATS CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "tandem test NATS");
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        // A Secret file or a systemd credential ends with a newline more often than not.
        std::fs::write(dir.path().join("token"), format!("{}\n", TlsFiles::TOKEN)).unwrap();
        TlsFiles { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A `nats-server -js` on an ephemeral loopback port, killed on drop.
struct NatsServer {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with `settings` (nats-server configuration) added to its own.
    async fn start(settings: &str) -> NatsServer {
        NatsServer::start_on(free_port(), settings).await
    }

    /// Starts a server on `port`.
    async fn start_on(port: u16, settings: &str) -> NatsServer {
        let binary = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(Into::into))
            .map(|d: std::path::PathBuf| d.join("nats-server"))
            .find(|p| p.is_file())
            .expect("nats-server not found: run scripts/setup-test-deps");
        let store = tempfile::tempdir().unwrap();
        let conf = store.path().join("nats-server.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{settings}\n",
                store.path().join("js").display().to_string()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(store.path().join("nats-server.log")).unwrap();
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        let server = NatsServer {
            child,
            port,
            dir: store,
        };
        // Up to 30 s: a loaded machine starts it slowly.
        for _ in 0..600 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server did not open port {port}: {}", server.log());
    }

    /// A server on `port` that requires TLS with the certificate of `tls` and the token.
    async fn with_tls_on(port: u16, tls: &TlsFiles) -> NatsServer {
        NatsServer::start_on(
            port,
            &format!(
                "tls {{ cert_file: {:?}, key_file: {:?}, timeout: 5 }}\n\
             authorization {{ token: {:?} }}",
                tls.path("tls.crt").display().to_string(),
                tls.path("tls.key").display().to_string(),
                TlsFiles::TOKEN,
            ),
        )
        .await
    }

    async fn with_tls(tls: &TlsFiles) -> NatsServer {
        NatsServer::with_tls_on(free_port(), tls).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A sink configuration for `url`, with a short duplicate window for a test stream.
fn nats_config(url: &str) -> NatsConfig {
    let mut cfg = NatsConfig::new(url);
    cfg.duplicate_window_secs = 120;
    cfg
}

/// Connects, bounded so that a connection that neither succeeds nor fails is a failure
/// of the test (the bound is generous: it only turns a hang into a message).
async fn connect(cfg: NatsConfig, token: Option<&str>) -> Result<NatsStore, StoreError> {
    tokio::time::timeout(
        Duration::from_secs(60),
        NatsStore::connect(cfg, names(), token.map(str::to_owned)),
    )
    .await
    .expect("connecting ends with a store or an error, never hangs")
}

/// The token as tandem-config resolves `token_file`: the file without its line ending.
fn token_from_file(tls: &TlsFiles) -> String {
    std::fs::read_to_string(tls.path("token"))
        .unwrap()
        .trim_end_matches(['\n', '\r'])
        .to_owned()
}

/// Over TLS (a `nats://` URL, made TLS by `tls_ca_file`) with the token from its file,
/// activities are stored and acknowledged, and the stream holds exactly them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_over_tls_with_a_token_stores_and_acknowledges() {
    let tls = TlsFiles::generate();
    let server = NatsServer::with_tls(&tls).await;
    let mut cfg = nats_config(&format!("nats://127.0.0.1:{}", server.port));
    cfg.tls_ca_file = Some(tls.path("ca.crt"));
    assert!(cfg.tls_required(), "a CA file requires TLS");
    assert!(cfg.problems(60).is_empty(), "{:?}", cfg.problems(60));
    let token = token_from_file(&tls);
    let mut store = connect(cfg, Some(&token))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    store.put(&batch(1, 0..40)).await.unwrap();
    store.put(&batch(2, 40..50)).await.unwrap();
    let acks = store.acks(true).await.unwrap();
    let mut acked: Vec<ActivityId> = acks.iter().flat_map(|a| a.ids.clone()).collect();
    acked.sort();
    let want: Vec<ActivityId> = (0..50).map(ActivityId::Post).collect();
    assert_eq!(acked, want, "every activity acknowledged once");
    assert_eq!(acks.iter().map(|a| a.duplicates).sum::<usize>(), 0);
    assert_eq!(store.unacknowledged(), 0);
    let held = store
        .stored_ids()
        .between("decahose", 1, 0, u64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(
        held,
        (0..40).map(ActivityId::Post).collect(),
        "partition 1 holds what was stored on it"
    );
}

/// A server that is not up yet is no refusal: the sink starts down and stores once the
/// server (with TLS and the token) is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_at_start_is_waited_for_over_tls() {
    let tls = TlsFiles::generate();
    let port = free_port();
    let mut cfg = nats_config(&format!("tls://localhost:{port}"));
    cfg.tls_ca_file = Some(tls.path("ca.crt"));
    let token = token_from_file(&tls);
    let mut store = connect(cfg, Some(&token))
        .await
        .expect("nothing listens yet: the sink starts down");
    assert!(store.put(&batch(1, 0..10)).await.is_err(), "down for now");
    let server = NatsServer::with_tls_on(port, &tls).await;
    let mut put = Err(None);
    for _ in 0..600 {
        match store.put(&batch(1, 0..10)).await {
            Ok(()) => {
                put = Ok(());
                break;
            }
            Err(e) => put = Err(Some(e)),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put.unwrap_or_else(|e| panic!("{e:?}\n{}", server.log()));
    let acked: usize = store
        .acks(true)
        .await
        .unwrap()
        .iter()
        .map(|a| a.ids.len())
        .sum();
    assert_eq!(acked, 10);
}

/// A `tls://` URL with a client certificate: the server verifies it, and the store works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_server_verifies_clients() {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let tls = TlsFiles::generate();
    // A client certificate signed by a CA of its own, which the server trusts for clients.
    let client_ca_key = KeyPair::generate().unwrap();
    let mut client_ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let client_ca_cert = client_ca.self_signed(&client_ca_key).unwrap();
    let issuer = rcgen::Issuer::new(client_ca, client_ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "tandem-zone-a");
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(tls.path("clients-ca.crt"), client_ca_cert.pem()).unwrap();
    std::fs::write(tls.path("client.crt"), cert.pem()).unwrap();
    std::fs::write(tls.path("client.key"), key.serialize_pem()).unwrap();
    let server = NatsServer::start(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}",
        tls.path("tls.crt").display().to_string(),
        tls.path("tls.key").display().to_string(),
        tls.path("clients-ca.crt").display().to_string(),
    ))
    .await;
    let mut cfg = nats_config(&format!("tls://localhost:{}", server.port));
    cfg.tls_ca_file = Some(tls.path("ca.crt"));
    let refused = connect(cfg.clone(), None)
        .await
        .expect_err("no client certificate");
    println!("no client certificate: {refused}");
    assert_eq!(refused.class, ErrorClass::Fatal, "{refused}");
    assert!(refused.to_string().contains("tls_cert_file"), "{refused}");
    cfg.tls_cert_file = Some(tls.path("client.crt"));
    cfg.tls_key_file = Some(tls.path("client.key"));
    assert!(cfg.problems(60).is_empty(), "{:?}", cfg.problems(60));
    let mut store = connect(cfg, None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    store.put(&batch(1, 0..5)).await.unwrap();
    let acked: usize = store
        .acks(true)
        .await
        .unwrap()
        .iter()
        .map(|a| a.ids.len())
        .sum();
    assert_eq!(acked, 5);
}

/// A client that does not trust the server's CA, or brings the wrong token, is refused at
/// once with a fatal error that says what to check and prints no token; it does not start
/// a sink that stays down in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_ca_or_with_the_wrong_token_is_refused_clearly() {
    let tls = TlsFiles::generate();
    let server = NatsServer::with_tls(&tls).await;
    let token = token_from_file(&tls);

    // The system roots do not know the test CA.
    let without_ca = nats_config(&format!("tls://127.0.0.1:{}", server.port));
    let e = connect(without_ca, Some(&token))
        .await
        .expect_err("the server's certificate does not verify");
    let text = e.to_string();
    println!("without the CA: {text}");
    assert_eq!(e.class, ErrorClass::Fatal, "{text}");
    assert!(
        text.contains("refused") && text.contains("tls_ca_file"),
        "{text}"
    );
    assert!(!text.contains(&token), "{text}");

    // Another CA than the one that signed the server's certificate.
    let other = TlsFiles::generate();
    let mut wrong_ca = nats_config(&format!("tls://127.0.0.1:{}", server.port));
    wrong_ca.tls_ca_file = Some(other.path("ca.crt"));
    let e = connect(wrong_ca, Some(&token)).await.expect_err("wrong CA");
    println!("another CA: {e}");
    assert_eq!(e.class, ErrorClass::Fatal, "{e}");

    // The right CA, the wrong token.
    let mut cfg = nats_config(&format!("tls://127.0.0.1:{}", server.port));
    cfg.tls_ca_file = Some(tls.path("ca.crt"));
    let e = connect(cfg.clone(), Some("not-the-token"))
        .await
        .expect_err("the token is wrong");
    let text = e.to_string();
    println!("wrong token: {text}");
    assert_eq!(e.class, ErrorClass::Fatal, "{text}");
    assert!(text.contains("token_file"), "{text}");
    assert!(
        !text.contains("not-the-token") && !text.contains(&token),
        "{text}"
    );
    let e = connect(cfg, None).await.expect_err("no token at all");
    println!("no token: {e}");
    assert_eq!(e.class, ErrorClass::Fatal, "{e}");
}

/// With `tls_ca_file` set, a server that does not speak TLS never gets the token in clear:
/// the connection is refused rather than downgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_never_fall_back_to_plain_text() {
    let tls = TlsFiles::generate();
    let plain = NatsServer::start("").await;
    let mut cfg = nats_config(&format!("nats://127.0.0.1:{}", plain.port));
    cfg.tls_ca_file = Some(tls.path("ca.crt"));
    let e = connect(cfg, Some(TlsFiles::TOKEN))
        .await
        .expect_err("no TLS, no connection");
    println!("plain-text server: {e}");
    assert_eq!(e.class, ErrorClass::Fatal, "{e}");
    assert!(e.to_string().contains("speak TLS"), "{e}");
}

/// Missing, unreadable or wrong TLS files and a certificate without its key are
/// configuration problems named by field, found before any connection.
#[test]
fn tls_files_are_checked_by_field() {
    let tls = TlsFiles::generate();
    let fields = |cfg: &NatsConfig| -> Vec<(&'static str, String)> { cfg.problems(60) };
    let mut cfg = nats_config("tls://nats:4222");
    cfg.tls_ca_file = Some(tls.path("missing.crt"));
    let found = fields(&cfg);
    assert!(
        found
            .iter()
            .any(|(f, m)| *f == "tls_ca_file" && m.contains("cannot read")),
        "{found:?}"
    );
    cfg.tls_ca_file = Some(tls.path("token"));
    let found = fields(&cfg);
    assert!(
        found
            .iter()
            .any(|(f, m)| *f == "tls_ca_file" && m.contains("no PEM certificate")),
        "{found:?}"
    );
    assert!(
        !found.iter().any(|(_, m)| m.contains(TlsFiles::TOKEN)),
        "{found:?}"
    );
    cfg.tls_ca_file = Some(tls.path("ca.crt"));
    cfg.tls_cert_file = Some(tls.path("tls.crt"));
    assert_eq!(
        fields(&cfg)[0].0,
        "tls_key_file",
        "a certificate without its key"
    );
    cfg.tls_key_file = Some(tls.path("ca.crt"));
    let found = fields(&cfg);
    assert!(
        found
            .iter()
            .any(|(f, m)| *f == "tls_key_file" && m.contains("no PEM private key")),
        "{found:?}"
    );
    cfg.tls_key_file = Some(tls.path("tls.key"));
    assert!(fields(&cfg).is_empty(), "{:?}", fields(&cfg));
    cfg.tls_cert_file = None;
    assert_eq!(
        fields(&cfg)[0].0,
        "tls_cert_file",
        "a key without its certificate"
    );
    let plain = nats_config("nats://nats:4222");
    assert!(!plain.tls_required());
    assert!(nats_config("nats://a:4222, TLS://b:4222").tls_required());
}

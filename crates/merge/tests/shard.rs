//! The merger shard on scripted input.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_core::{ActivityId, Batch, Origin, PathId, StreamId, Tally, Unique};
use tandem_merge::{DeadLetters, MergeConfig, MergeEvent, Shard, ShardSpec};
use tokio::sync::mpsc;
use tokio::time::Instant;

struct Fixture {
    shard: Shard,
    events: mpsc::UnboundedReceiver<MergeEvent>,
    tally: Arc<Tally>,
    dir: tempfile::TempDir,
}

fn fixture(config: MergeConfig) -> Fixture {
    fixture_limited(config, None)
}

fn fixture_limited(config: MergeConfig, max_line_bytes: Option<usize>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (events_tx, events) = mpsc::unbounded_channel();
    let tally = Arc::new(Tally::with_lanes(3));
    let spec = ShardSpec {
        stream: StreamId(0),
        stream_name: "decahose".into(),
        partition: 1,
        paths: vec!["a".into(), "b".into()],
        config: MergeConfig {
            dead_letter_dir: dir.path().to_path_buf(),
            ..config
        },
        tally: tally.clone(),
        dead_letters: Arc::new(DeadLetters::open(dir.path()).unwrap()),
        events: events_tx,
        max_line_bytes,
    };
    Fixture {
        shard: Shard::new(spec, Instant::now()),
        events,
        tally,
        dir,
    }
}

fn post(id: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"created_at\":\"x\",\"id\":{id},\"id_str\":\"{id}\",\"user\":{{\"id_str\":\"1\"}}}}"
    ))
}

fn batch(path: u8, lines: Vec<Bytes>) -> Batch {
    Batch {
        origin: Origin {
            stream: StreamId(0),
            partition: 1,
            path: PathId(path),
        },
        connection: 1,
        received: Instant::now(),
        first_seq: 0,
        lines,
    }
}

fn ids(out: &[Unique]) -> Vec<ActivityId> {
    out.iter().map(|u| u.id).collect()
}

/// Two copies with skew: the first wins and is emitted at once, the later copy is a
/// duplicate of the lagging path.
#[tokio::test(start_paused = true)]
async fn first_copy_wins_across_paths() {
    let mut f = fixture(MergeConfig::default());
    let mut out = Vec::new();
    f.shard.process(batch(0, vec![post(1), post(2)]), &mut out);
    assert_eq!(ids(&out), [ActivityId::Post(1), ActivityId::Post(2)]);
    assert!(out.iter().all(|u| u.path == PathId(0)));
    tokio::time::advance(Duration::from_secs(3)).await;
    f.shard
        .process(batch(1, vec![post(1), post(2), post(3)]), &mut out);
    assert_eq!(
        ids(&out),
        [
            ActivityId::Post(1),
            ActivityId::Post(2),
            ActivityId::Post(3)
        ]
    );
    assert_eq!(out[2].path, PathId(1));
    let t = f.tally.snapshot();
    assert_eq!((t.unique, t.duplicates), (3, 2));
}

/// A backfill replays minutes the partition already had: within the window, every
/// replayed copy is a duplicate.
#[tokio::test(start_paused = true)]
async fn backfill_overlap_is_removed() {
    let mut f = fixture(MergeConfig::default());
    let mut out = Vec::new();
    f.shard
        .process(batch(0, (1..=100).map(post).collect()), &mut out);
    tokio::time::advance(Duration::from_secs(6 * 60)).await; // a 5-minute backfill after a gap
    f.shard
        .process(batch(1, (1..=150).map(post).collect()), &mut out);
    assert_eq!(out.len(), 150);
    assert_eq!(f.tally.snapshot().duplicates, 100);
}

/// After a restart the cache is rebuilt from what the sink stored, so a backfill that
/// replays those activities stores nothing twice.
#[tokio::test(start_paused = true)]
async fn restart_then_backfill_stores_nothing_twice() {
    let mut before = fixture(MergeConfig::default());
    let mut stored = Vec::new();
    before
        .shard
        .process(batch(0, (1..=50).map(post).collect()), &mut stored);
    drop(before);
    let mut after = fixture(MergeConfig::default());
    assert_eq!(after.shard.remember(ids(&stored), Instant::now()), 50);
    let mut out = Vec::new();
    after
        .shard
        .process(batch(0, (1..=60).map(post).collect()), &mut out);
    assert_eq!(
        ids(&out),
        (51..=60).map(ActivityId::Post).collect::<Vec<_>>()
    );
}

/// At the cap, ids are forgotten early: counted and reported as an event.
#[tokio::test(start_paused = true)]
async fn eviction_under_cap_is_reported() {
    let mut f = fixture(MergeConfig {
        max_ids_per_partition: 1_000,
        ..MergeConfig::default()
    });
    let mut out = Vec::new();
    for round in 0..10u64 {
        f.shard.process(
            batch(0, (round * 500..round * 500 + 500).map(post).collect()),
            &mut out,
        );
        tokio::time::advance(Duration::from_secs(120)).await;
    }
    f.shard.report(Instant::now());
    assert!(f.shard.cache().len() <= 1_000);
    match f.events.try_recv() {
        Ok(MergeEvent::EvictedEarly { total, horizon, .. }) => {
            assert!(total >= 4_000, "{total}");
            assert!(horizon < Duration::from_secs(900));
        }
        other => panic!("no eviction event: {other:?}"),
    }
}

/// Malformed lines go to the dead-letter file with reason, path and partition; their
/// valid neighbours are intact.
#[tokio::test(start_paused = true)]
async fn malformed_lines_are_dead_lettered() {
    let mut f = fixture(MergeConfig::default());
    let mut out = Vec::new();
    let lines = vec![
        post(1),
        Bytes::from_static(b"{\"id_str\":\"2\",\"text\":\"cut"),
        Bytes::from_static(b"not json at all"),
        Bytes::from_static(b"{\"id_str\":\"3\",\"text\":\"\xff\xfe\"}"),
        Bytes::from_static(b"{\"text\":\"no id\"}"),
        Bytes::from_static(b"{\"info\":{\"message\":\"hello\"}}"),
        post(4),
    ];
    f.shard.process(batch(1, lines), &mut out);
    assert_eq!(ids(&out), [ActivityId::Post(1), ActivityId::Post(4)]);
    assert_eq!(out[1].line, post(4));
    let t = f.tally.snapshot();
    assert_eq!((t.unique, t.dead_lettered, t.system), (2, 4, 1));
    let text = std::fs::read_to_string(f.dir.path().join("dead-letters.ndjson")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons: Vec<&str> = records
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["invalid_json", "invalid_json", "invalid_utf8", "missing_id"]
    );
    assert!(
        records
            .iter()
            .all(|r| r["path"] == "b" && r["partition"] == 1 && r["stream"] == "decahose")
    );
    assert!(
        records[2]["line_base64"].is_string(),
        "non-UTF-8 lines are kept byte for byte"
    );
    assert!(matches!(f.events.try_recv(), Ok(MergeEvent::System { .. })));
}

/// A line over the sink's record limit is dead-lettered whole with its reason (never cut
/// to fit), its neighbours stored.
#[tokio::test(start_paused = true)]
async fn a_line_over_the_sinks_limit_is_dead_lettered_whole() {
    let limit = 4_096;
    let mut f = fixture_limited(MergeConfig::default(), Some(limit));
    let big = Bytes::from(format!(
        "{{\"id\":7,\"id_str\":\"7\",\"user\":{{\"id_str\":\"1\"}},\"text\":\"{}\"}}",
        "x".repeat(limit)
    ));
    let mut out = Vec::new();
    f.shard
        .process(batch(0, vec![post(6), big.clone(), post(8)]), &mut out);
    assert_eq!(ids(&out), [ActivityId::Post(6), ActivityId::Post(8)]);
    let t = f.tally.snapshot();
    assert_eq!((t.unique, t.dead_lettered), (2, 1));
    let text = std::fs::read_to_string(f.dir.path().join("dead-letters.ndjson")).unwrap();
    let record: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(record["reason"], "oversize");
    assert!(
        record["detail"].as_str().unwrap().contains("4096"),
        "{record}"
    );
    assert_eq!(
        record["line"].as_str().unwrap().len(),
        big.len(),
        "kept whole"
    );
}

/// A corrupted first copy is dead-lettered without remembering its id, so the intact
/// copy from the other path is stored.
#[tokio::test(start_paused = true)]
async fn corrupted_first_copy_does_not_hide_the_intact_one() {
    let mut f = fixture(MergeConfig::default());
    let mut out = Vec::new();
    let intact = post(9);
    let cut = intact.slice(..intact.len() / 2 + 3);
    f.shard.process(batch(0, vec![cut]), &mut out);
    assert!(out.is_empty());
    f.shard.process(batch(1, vec![intact.clone()]), &mut out);
    assert_eq!(ids(&out), [ActivityId::Post(9)]);
    assert_eq!(out[0].line, intact);
}

/// The task form: batches from two paths in, each activity once out, ending when the
/// inputs close.
#[tokio::test]
async fn running_shard_merges_two_paths() {
    let f = fixture(MergeConfig::default());
    let (tx, rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel(16);
    let task = f.shard.spawn(rx, out_tx);
    for path in [0u8, 1] {
        for chunk in (1..=1000u64).collect::<Vec<_>>().chunks(100) {
            tx.send(batch(path, chunk.iter().copied().map(post).collect()))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let mut got = Vec::new();
    while let Some(b) = out_rx.recv().await {
        got.extend(ids(&b.items));
    }
    task.await.unwrap();
    assert_eq!(got, (1..=1000).map(ActivityId::Post).collect::<Vec<_>>());
    assert_eq!(f.tally.snapshot().duplicates, 1000);
}

/// Unique activities are numbered 1, 2, 3… in the order they were accepted, duplicates
/// and bad lines get no number, and each path's lane counts every line it classified (what
/// gap repair waits on before it trusts the numbers).
#[tokio::test(start_paused = true)]
async fn unique_activities_are_numbered_in_acceptance_order() {
    let mut f = fixture(MergeConfig::default());
    let mut out = Vec::new();
    f.shard.process(
        batch(0, vec![post(1), post(2), Bytes::from("{oops")]),
        &mut out,
    );
    f.shard
        .process(batch(1, vec![post(2), post(3), post(1), post(4)]), &mut out);
    assert_eq!(
        out.iter().map(|u| (u.seq, u.id)).collect::<Vec<_>>(),
        [
            (1, ActivityId::Post(1)),
            (2, ActivityId::Post(2)),
            (3, ActivityId::Post(3)),
            (4, ActivityId::Post(4)),
        ]
    );
    assert_eq!(
        f.tally.numbered.load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    assert!(f.tally.lanes.classified_all(&[3, 4, 0]));
    assert!(!f.tally.lanes.classified_all(&[4, 4, 0]));
}

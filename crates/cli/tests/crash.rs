//! Durability of `tandem run` as a process: killed (SIGKILL, or aborted at a named crash
//! point of the test build), started again, with its store (JetStream) down or a real disk
//! full under the store or the spool. Every scenario ends with a graceful stop and the
//! store judged against the simulator's ground truth: every published activity stored
//! exactly once.

mod support;

use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use serde_json::Value;

use support::{Consumer, FreezableDisk, MemoryLimit, Run, SIGABRT, Tmpfs};

/// Starts a consumer of a JetStream run, publishes for 3 s, stops the NATS server and
/// keeps publishing until the sink has spooled (segments on disk), holds `backlog`
/// activities and the server has been down for `outage`. Returns the consumer, still
/// running, with the server down.
async fn outage_with_spool(
    run: &mut Run,
    crash_at: Option<&str>,
    backlog: u64,
    outage: Duration,
) -> Consumer {
    let consumer = run.start(crash_at);
    run.wait_live().await;
    run.publish(run.cfg.rate_per_sec);
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.wait_status(Duration::from_secs(30), "something stored", |s| {
        support::total(s, "stored") > 0
    })
    .await;
    run.nats().stop();
    let stopped = tokio::time::Instant::now();
    run.wait_status(
        Duration::from_secs(60),
        "the sink down, holding the backlog",
        |s| support::sink_up(s) == Some(false) && support::total(s, "in_flight") >= backlog,
    )
    .await;
    run.wait_for(Duration::from_secs(30), "spool segments on disk", || {
        run.spool_segments() > 0
    })
    .await;
    tokio::time::sleep_until(stopped + outage).await;
    consumer
}

/// Waits for a consumer started with `TANDEM_CRASH_AT=point` to abort there.
async fn expect_abort(run: &Run, mut consumer: Consumer, point: &str) {
    let status = consumer.wait_exit(Duration::from_secs(60)).await;
    let Some(status) = status else {
        panic!(
            "{} did not reach the crash point {point} within 60 s\n--- log tail ---\n{}",
            consumer.label,
            run.log_tail(60)
        );
    };
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "{} ended by aborting at {point}: {status:?}\n--- log tail ---\n{}",
        consumer.label,
        run.log_tail(60)
    );
    assert!(
        run.crashed_at(point),
        "the log names the crash point {point}"
    );
}

/// JetStream down long enough to spool, the consumer SIGKILLed during the outage, the
/// server back, the consumer started again: every activity stored once.
async fn jetstream_outage_kill(paths: usize, name: &str) {
    let mut run = Run::new(true, |c| {
        c.paths = [[127, 0, 0, 2], [127, 0, 0, 3]][..paths]
            .iter()
            .map(|ip| Some((*ip).into()))
            .collect();
    })
    .await;
    let mut first = outage_with_spool(&mut run, None, 1_000, Duration::from_secs(8)).await;
    let segments = run.spool_segments();
    let held = run.status().await.map(|s| support::total(&s, "in_flight"));
    first.sigkill();
    println!("{name}: killed during the outage, {segments} spool segment(s), {held:?} held");
    run.nats().restart().expect("nats-server restarts");
    let second = run.start(None);
    run.wait_live().await;
    run.finish(second, name).await;
    assert_eq!(
        run.spool_segments(),
        0,
        "the spool was delivered and deleted"
    );
}

/// Two paths in one process: JetStream down, the consumer SIGKILLed with a spool, the
/// server back, a restart: every published activity is in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_outage_kill_two_paths() {
    jetstream_outage_kill(2, "jetstream_outage_kill_two_paths").await;
}

/// One path per process (the shape of one zone of a pair): JetStream down, the consumer
/// SIGKILLed with a spool, the server back, a restart: every activity stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_outage_kill_one_path() {
    jetstream_outage_kill(1, "jetstream_outage_kill_one_path").await;
}

/// The file store's directory on a real 8 MiB tmpfs, filled but for ~1 MiB: once the
/// disk is full the sink reports down (`/status`, `/readyz`) and the process stays alive
/// and healthy; when space is given back it resumes by itself, and the store ends with
/// every activity once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_disk_full_for_real() {
    let name = "file_store_disk_full_for_real";
    let run = Run::new(false, |c| {
        c.rate_per_sec = 300.0;
        c.gzip = false;
    })
    .await;
    let disk = Tmpfs::mount(&run.path().join("store"), "8m");
    let filler = disk.fill_leaving(1 << 20);
    let mut consumer = run.start(None);
    run.wait_live().await;
    run.publish(run.cfg.rate_per_sec);
    let s = run
        .wait_status(
            Duration::from_secs(60),
            "the sink down on a full disk",
            |s| support::sink_up(s) == Some(false),
        )
        .await;
    println!(
        "{name}: sink down with {} stored, {} in flight, {} bytes free",
        support::total(&s, "stored"),
        support::total(&s, "in_flight"),
        disk.free_bytes()
    );
    // It stays down, alive and healthy while the disk is full and publishing goes on:
    // what memory cannot hold goes to the spool (on another disk).
    run.wait_status(
        Duration::from_secs(60),
        "a backlog past memory while the disk is full",
        |s| support::total(s, "in_flight") >= 900,
    )
    .await;
    run.wait_for(Duration::from_secs(30), "spool segments on disk", || {
        run.spool_segments() > 0
    })
    .await;
    assert!(
        consumer.alive(),
        "the consumer survives a full disk\n{}",
        run.log_tail(60)
    );
    assert_eq!(
        run.probe("healthz").await,
        Some(200),
        "healthy on a full disk"
    );
    assert_ne!(
        run.probe("readyz").await,
        Some(200),
        "not ready on a full disk"
    );
    let s = run.status().await.expect("status");
    assert_eq!(
        support::sink_up(&s),
        Some(false),
        "still down while the disk is full"
    );
    // Space given back: it resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    run.wait_status(Duration::from_secs(60), "the sink up again", |s| {
        support::sink_up(s) == Some(true)
    })
    .await;
    assert_eq!(run.probe("readyz").await, Some(200), "ready again");
    run.finish(consumer, name).await;
    drop(disk);
}

/// The spool's directory on a real 8 MiB tmpfs, filled but for ~1 MiB, while JetStream is
/// down: the spool fills up, the sink reports down, the process stays alive and healthy
/// and stops taking activities (backpressure: what it holds stays bounded while the
/// upstream keeps publishing); space given back and the server back, it delivers
/// everything, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_disk_full_for_real() {
    let name = "spool_disk_full_for_real";
    let mut run = Run::new(true, |c| c.rate_per_sec = 300.0).await;
    let disk = Tmpfs::mount(&run.path().join("spool"), "8m");
    let filler = disk.fill_leaving(1 << 20);
    let mut consumer = run.start(None);
    run.wait_live().await;
    run.publish(run.cfg.rate_per_sec);
    run.wait_status(Duration::from_secs(30), "something stored", |s| {
        support::total(s, "stored") > 0
    })
    .await;
    run.nats().stop();
    run.wait_for(Duration::from_secs(60), "the spool refusing writes", || {
        run.log_text().contains("cannot write the spool")
    })
    .await;
    let s = run.status().await.expect("status");
    let held = support::total(&s, "in_flight") + support::total(&s, "queued");
    let spooled = run
        .metric("tandem_spooled_activities{")
        .await
        .expect("tandem_spooled_activities");
    println!(
        "{name}: spool full: {held} held ({spooled} spooled), {} bytes free",
        disk.free_bytes()
    );
    // Down, alive, healthy, and bounded while publishing goes on.
    let before = run.published();
    run.wait_for(
        Duration::from_secs(30),
        "more published into the full spool",
        || run.published() >= before + 1_500,
    )
    .await;
    assert!(
        consumer.alive(),
        "the consumer survives a full spool disk\n{}",
        run.log_tail(60)
    );
    assert_eq!(
        run.probe("healthz").await,
        Some(200),
        "healthy on a full spool disk"
    );
    assert_ne!(
        run.probe("readyz").await,
        Some(200),
        "not ready on a full spool disk"
    );
    let s = run.status().await.expect("status");
    assert_eq!(
        support::sink_up(&s),
        Some(false),
        "down while the spool is full"
    );
    let held_later = support::total(&s, "in_flight") + support::total(&s, "queued");
    let spooled_later = run
        .metric("tandem_spooled_activities{")
        .await
        .expect("tandem_spooled_activities");
    println!(
        "{name}: {} more published, {held_later} held ({spooled_later} spooled)",
        run.published() - before
    );
    // Memory holds up to twice max_memory_activities (300) when the spool refuses, plus
    // what the channels carry: far less than the 1500 published meanwhile.
    assert!(
        held_later <= held + 1_000,
        "backpressure: the sink held {held} when the spool filled and {held_later} after 1500 more were published"
    );
    std::fs::remove_file(&filler).unwrap();
    run.nats().restart().expect("nats-server restarts");
    // The sink must report up again once it can write; the data's verdict is judged
    // either way, so that a sink stuck "down" and lost data are told apart.
    let back = run
        .try_wait_status(Duration::from_secs(60), |s| {
            support::sink_up(s) == Some(true) && run.all_live(s)
        })
        .await;
    let mut problems = Vec::new();
    if let Err(last) = &back {
        let s = last.as_ref();
        problems.push(format!(
            "the sink still reports down 60 s after space was given back and the server restarted \
             (sinks: {}, not ready because: {}, stored {}, in flight {}, queued {})",
            s.map_or(Value::Null, |s| s["sinks"].clone()),
            s.map_or(Value::Null, |s| s["not_ready_because"].clone()),
            s.map_or(0, |s| support::total(s, "stored")),
            s.map_or(0, |s| support::total(s, "in_flight")),
            s.map_or(0, |s| support::total(s, "queued")),
        ));
        println!("{name}: PROBLEM: {}", problems[0]);
        // The sink's changes of state, as it logged them.
        let log = run.log_text();
        let states: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("spool") && !l.contains("replaying") || l.contains("store is back")
            })
            .collect();
        println!("--- the sink's state in the log ---\n{}", states.join("\n"));
    } else {
        assert_eq!(run.probe("readyz").await, Some(200), "ready again");
    }
    run.finish(consumer, name).await;
    assert_eq!(
        run.spool_segments(),
        0,
        "the spool was delivered and deleted"
    );
    assert!(problems.is_empty(), "{name}: {problems:#?}");
    drop(disk);
}

/// SIGTERM while JetStream is down with a backlog, the process aborting as the sink
/// starts its shutdown drain (`sink.drain`): nothing of the backlog is lost; the server
/// back and a normal start deliver everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_shutdown_drain() {
    let name = "kill_during_shutdown_drain";
    let mut run = Run::new(true, |_| {}).await;
    let first =
        outage_with_spool(&mut run, Some("sink.drain"), 1_000, Duration::from_secs(6)).await;
    first.sigterm();
    expect_abort(&run, first, "sink.drain").await;
    println!(
        "{name}: aborted in the drain, {} spool segment(s)",
        run.spool_segments()
    );
    run.nats().restart().expect("nats-server restarts");
    let second = run.start(None);
    run.wait_live().await;
    run.finish(second, name).await;
    assert_eq!(
        run.spool_segments(),
        0,
        "the spool was delivered and deleted"
    );
}

/// A gap beyond backfill (SIGKILL, then ~9 s of publishing with 1 s backfill "minutes"),
/// a restart that aborts as soon as the first recovery chunk reached the merger
/// (`repair.chunk_read`), then a normal start: the chunk was not marked done, so it is
/// recovered again, and every activity is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_right_after_recovery_chunk_reached_the_merger() {
    let name = "kill_right_after_recovery_chunk_reached_the_merger";
    let run = Run::new(false, |c| c.minute_ms = 1_000).await;
    let mut first = run.start(None);
    run.wait_live().await;
    run.publish(run.cfg.rate_per_sec);
    run.wait_status(Duration::from_secs(30), "something stored", |s| {
        support::total(s, "stored") > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.sigkill();
    // Down for longer than the backfill window (5 minutes of 1 s) while publishing goes on.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let second = run.start(Some("repair.chunk_read"));
    expect_abort(&run, second, "repair.chunk_read").await;
    let third = run.start(None);
    let s = run
        .wait_status(Duration::from_secs(60), "the gaps repaired", |s| {
            let ps = support::partitions(s);
            ps.len() == 2
                && ps.iter().all(|p| {
                    let gaps = p["repair_gaps"].as_array().cloned().unwrap_or_default();
                    !gaps.is_empty() && gaps.iter().all(|g| g["state"] == "repaired")
                })
        })
        .await;
    for p in support::partitions(&s) {
        for g in p["repair_gaps"].as_array().into_iter().flatten() {
            let secs = (g["end_ms"].as_u64().unwrap_or(0))
                .saturating_sub(g["start_ms"].as_u64().unwrap_or(0)) as f64
                / 1000.0;
            println!(
                "{name}: partition {} gap {secs:.1} s repaired in {} chunk(s)",
                p["partition"], g["chunks"]
            );
        }
    }
    // The aborted start asked for recovery chunks and died before storing them: the next
    // start asks for (at least one of) the same chunks again.
    let log = run.log_text();
    let section = |label: &str| {
        log.split("===== ")
            .find(|s| s.starts_with(label))
            .map(|s| {
                s.lines()
                    .filter(|l| l.contains("recovery request"))
                    .filter_map(|l| {
                        // The partition is a field of the line or of its span; the chunk's
                        // start is the message's own `start=`.
                        let part: String = l
                            .split("partition=")
                            .nth(1)?
                            .chars()
                            .take_while(char::is_ascii_digit)
                            .collect();
                        let msg = l.split("recovery request").nth(1)?;
                        let start = msg.split("start=").nth(1)?.split([' ', '}']).next()?;
                        Some(format!("{part}@{start}"))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let (aborted, again) = (section("start #2"), section("start #3"));
    println!("{name}: chunks asked for by the aborted start {aborted:?}, by the next {again:?}");
    assert!(!aborted.is_empty(), "the aborted start asked for recovery");
    assert!(
        aborted.iter().any(|c| again.contains(c)),
        "a chunk read but not stored is recovered again"
    );
    run.finish(third, name).await;
}

/// A spool built by an outage and a SIGKILL; the next start (server back) aborts at its
/// second store write (`sink.put@2`), in the middle of replaying that spool; a normal
/// start then delivers everything once and leaves no spool segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_spool_replay() {
    let name = "kill_during_spool_replay";
    let mut run = Run::new(true, |_| {}).await;
    let mut first = outage_with_spool(&mut run, None, 1_000, Duration::from_secs(6)).await;
    first.sigkill();
    let segments = run.spool_segments();
    run.nats().restart().expect("nats-server restarts");
    let second = run.start(Some("sink.put@2"));
    expect_abort(&run, second, "sink.put").await;
    let left = run.spool_segments();
    println!("{name}: {segments} spool segment(s) before the replay, {left} after the abort");
    assert!(
        left > 0,
        "the abort came before the spool was delivered and deleted"
    );
    let third = run.start(None);
    run.wait_live().await;
    run.finish(third, name).await;
    assert_eq!(
        run.spool_segments(),
        0,
        "the spool was delivered and deleted"
    );
}

/// A spool built by an outage and a SIGKILL; the next start aborts right after opening
/// (and reading) the spool (`sink.spool_opened`); a normal start then delivers everything
/// once and leaves no spool segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_after_the_spool_was_read() {
    let name = "start_fails_after_the_spool_was_read";
    let mut run = Run::new(true, |_| {}).await;
    let mut first = outage_with_spool(&mut run, None, 1_000, Duration::from_secs(6)).await;
    first.sigkill();
    let segments = run.spool_segments();
    run.nats().restart().expect("nats-server restarts");
    let second = run.start(Some("sink.spool_opened"));
    expect_abort(&run, second, "sink.spool_opened").await;
    assert_eq!(
        run.spool_segments(),
        segments,
        "opening the spool deletes nothing"
    );
    let third = run.start(None);
    run.wait_live().await;
    run.finish(third, name).await;
    assert_eq!(
        run.spool_segments(),
        0,
        "the spool was delivered and deleted"
    );
}

/// The file store and the spool on disks that hang (real ext4 file systems frozen with
/// `fsfreeze`: every write blocks in the kernel): the process stays alive and healthy and
/// its monitor keeps evaluating (the sink blocks on its own thread, not on the
/// connections' runtime), and once the disks answer again every activity is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_on_a_hung_disk() {
    let name = "file_store_on_a_hung_disk";
    let run = Run::new(false, |c| {
        c.rate_per_sec = 300.0;
        c.gzip = false;
    })
    .await;
    let disk = FreezableDisk::mount(&run.path().join("store"), 64);
    let spool_disk = FreezableDisk::mount(&run.path().join("spool"), 64);
    let mut consumer = run.start(None);
    run.wait_live().await;
    run.publish(run.cfg.rate_per_sec);
    run.wait_status(Duration::from_secs(60), "something stored", |s| {
        support::total(s, "stored") > 0
    })
    .await;
    disk.freeze();
    spool_disk.freeze();
    let frozen_at = run.status().await.expect("status");
    let stored_before = support::total(&frozen_at, "stored");
    let at_before = frozen_at["at_ms"].as_u64().unwrap_or(0);
    // While the disk hangs: the monitor keeps evaluating (a fresh `/status`), `/healthz`
    // answers, nothing more is acknowledged, and the process is alive.
    let s = run
        .wait_status(
            Duration::from_secs(60),
            "the monitor still evaluating",
            |s| s["at_ms"].as_u64().unwrap_or(0) > at_before + 3_000,
        )
        .await;
    assert_eq!(
        run.probe("healthz").await,
        Some(200),
        "healthy while the disk hangs"
    );
    assert!(
        consumer.alive(),
        "alive while the disk hangs\n{}",
        run.log_tail(40)
    );
    let stored_frozen = support::total(&s, "stored");
    println!(
        "{name}: stored {stored_before} when the disk froze, {stored_frozen} three seconds later, {} published",
        run.published()
    );
    assert!(
        stored_frozen <= stored_before + 2_000,
        "little is acknowledged by a disk that does not answer"
    );
    disk.thaw();
    spool_disk.thaw();
    run.finish(consumer, name).await;
    drop((disk, spool_disk));
}

/// Under a cgroup memory limit (128 MiB), a JetStream outage that brings more activity data
/// than the limit could hold keeps the consumer inside it: memory holds what the sink
/// allows and the rest goes to the spool, the process is never killed, and after the
/// outage every activity is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_under_a_memory_limit() {
    let name = "outage_under_a_memory_limit";
    let limit: u64 = 128 << 20;
    let mut run = Run::new(true, |c| c.rate_per_sec = 8_000.0).await;
    let mut consumer = run.start(None);
    let cgroup = MemoryLimit::apply(consumer.pid(), limit);
    run.wait_live().await;
    run.publish(run.cfg.rate_per_sec);
    run.nats().stop();
    // More activity data than the limit while the store is away.
    let spool = run.spool_dir();
    run.wait_for(
        Duration::from_secs(120),
        "more spooled than the limit",
        || spool_bytes(&spool) > limit,
    )
    .await;
    assert!(
        consumer.alive(),
        "alive under the limit\n{}",
        run.log_tail(40)
    );
    run.nats().restart().expect("nats-server back");
    let v = run.finish(consumer, name).await;
    println!(
        "{name}: peak {} MiB of {} MiB, {} allocation failures, {} published",
        cgroup.max_usage() >> 20,
        limit >> 20,
        cgroup.failures(),
        v.published
    );
    // The page cache of the spool's writes counts against the limit too: reaching it
    // makes the kernel reclaim (counted as failures), never kill, while the process's own
    // memory stays bounded.
    assert!(cgroup.max_usage() <= limit);
}

/// Bytes in a spool's segment files.
fn spool_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

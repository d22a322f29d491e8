//! End-to-end fault matrix: each scenario runs the whole pipeline against the simulator
//! and ends with every published activity stored exactly once.

use std::time::Duration;

use tandem_e2e::{harness, judge, metric_sum};
use tandem_monitor::{AlertName, Transition};
use tandem_scenario::Harness;
use tandem_sim::{Fault, Injection, Target};
use tokio::time::Instant;

const SETTLE: Duration = Duration::from_secs(20);

fn on_path(h: &Harness, partition: u32, path: usize) -> Target {
    Target {
        stream: Some(h.cfg.stream.clone()),
        partition: Some(partition),
        client_ip: h.cfg.paths[path],
        connection: None,
    }
}

/// Waits for an alert of `name` on `partition` to fire and then resolve; returns when
/// each happened.
async fn fired_and_resolved(
    rx: &mut tokio::sync::broadcast::Receiver<Transition>,
    name: AlertName,
    partition: u32,
    within: Duration,
) -> (Instant, Instant) {
    let deadline = Instant::now() + within;
    let mut fired = None;
    loop {
        let t = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{name:?} did not fire and resolve in time"))
            .expect("transitions flow");
        match t {
            Transition::Fired(v) if v.key.name == name && v.key.partition == Some(partition) => {
                fired = Some(Instant::now())
            }
            Transition::Resolved(r) if r.key.name == name && r.key.partition == Some(partition) => {
                if let Some(f) = fired {
                    return (f, Instant::now());
                }
            }
            _ => {}
        }
    }
}

/// Alerts named `name` that fired on `partition` (of any stream, or of `stream`) among the
/// transitions received so far.
fn fired_so_far(
    rx: &mut tokio::sync::broadcast::Receiver<Transition>,
    name: AlertName,
    stream: Option<&str>,
) -> Vec<Option<u32>> {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut out = Vec::new();
    loop {
        let t = match rx.try_recv() {
            Ok(t) => t,
            Err(TryRecvError::Lagged(n)) => panic!("missed {n} alert transitions"),
            Err(_) => break,
        };
        if let Transition::Fired(v) = t
            && v.key.name == name
            && stream.is_none_or(|s| v.key.stream == s)
        {
            out.push(v.key.partition);
        }
    }
    out
}

/// One path dropped: its sibling covers, the path reconnects, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_path_dropped() {
    let (h, _dir) = harness(|_| {}).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    // The dropped path's reconnects are refused for a second (its sibling stays connected).
    h.sim
        .fault(Fault::Reject {
            stream: h.cfg.stream.clone(),
            partition: Some(1),
            status: 503,
            count: None,
            for_ms: Some(1_000),
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: on_path(&h, 1, 0),
        })
        .unwrap();
    let (fired, resolved) = fired_and_resolved(
        &mut alerts,
        AlertName::PartitionImbalance,
        1,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = h.finish(SETTLE).await;
    judge(
        "one path dropped",
        &v,
        Some(fired - at),
        Some(resolved - at),
    );
}

/// One path silently stalled: detected by data silence against the sibling, reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_path_stalled() {
    let (h, _dir) = harness(|c| c.heartbeat_ms = 5_000).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();

    h.sim
        .fault(Fault::Stall {
            target: on_path(&h, 2, 1),
        })
        .unwrap();
    let (fired, resolved) = fired_and_resolved(
        &mut alerts,
        AlertName::ConnectionStale,
        2,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        fired - at < Duration::from_millis(1_600),
        "silence threshold is 1 s; detected after {:?}",
        fired - at
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = h.finish(SETTLE).await;
    judge(
        "one path stalled",
        &v,
        Some(fired - at),
        Some(resolved - at),
    );
}

/// Both paths down for less than the backfill window: the reconnect backfills the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_down_within_backfill() {
    let (h, _dir) = harness(|c| c.minute_ms = 2_000).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    h.sim
        .fault(Fault::Reject {
            stream: h.cfg.stream.clone(),
            partition: Some(1),
            status: 503,
            count: None,
            for_ms: Some(1_500),
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: Target {
                partition: Some(1),
                ..Target::default()
            },
        })
        .unwrap();
    let (fired, resolved) = fired_and_resolved(
        &mut alerts,
        AlertName::PartitionDown,
        1,
        Duration::from_secs(15),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = h.finish(SETTLE).await;
    assert!(v.duplicates_removed > 0);
    judge(
        "both paths down < backfill",
        &v,
        Some(fired - at),
        Some(resolved - at),
    );
}

/// Malformed, oversize and non-UTF-8 lines, a truncated line and a broken gzip stream:
/// bad lines are dead-lettered or skipped, their neighbours stored, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_output() {
    let (h, _dir) = harness(|_| {}).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = on_path(&h, 1, 0);
    for injection in [
        Injection::MalformedLine,
        Injection::InvalidUtf8Line,
        Injection::OversizeLine { bytes: 2 << 20 },
        Injection::CorruptNextActivity,
    ] {
        h.sim
            .fault(Fault::Inject {
                target: a.clone(),
                injection,
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.sim
        .fault(Fault::Inject {
            target: a.clone(),
            injection: Injection::TruncateAndClose,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    h.sim
        .fault(Fault::Inject {
            target: on_path(&h, 2, 1),
            injection: Injection::BrokenGzip,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v = h.finish(SETTLE).await;
    // The corrupted copy is dead-lettered only when it arrives first; otherwise it is a
    // duplicate of its intact sibling. Either way it is never stored (the verdict checks).
    assert!(
        v.dead_lettered >= 2,
        "malformed and invalid UTF-8 lines: {}",
        v.dead_lettered
    );
    judge("corrupt output", &v, None, None);
}

/// One path dropped while its sibling is silently stalled: the sibling is live but
/// delivers nothing, so the reconnecting path must backfill from the last activity the
/// partition received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_while_sibling_stalled() {
    let (h, _dir) = harness(|c| c.minute_ms = 2_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.sim
        .fault(Fault::Stall {
            target: on_path(&h, 1, 1),
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.sim
        .fault(Fault::Drop {
            target: on_path(&h, 1, 0),
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let v = h.finish(SETTLE).await;
    judge("drop while sibling stalled", &v, None, None);
}

/// One path lagging two seconds behind its sibling: the leading path delivers every first
/// copy, the lag shows in the lead/lag histogram, and nothing is lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_path_lagging() {
    // A steady lag is not silence: the lagging path still delivers continuously.
    // A stream name of its own: the metrics read below are process-wide, and other tests
    // may run in the same process (`cargo test`).
    let (h, _dir) = harness(|c| {
        c.data_silence_ms = 5_000;
        c.stream = "lagging".to_owned();
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = |path: &str| {
        metric_sum(
            "tandem_first_arrivals_total",
            &[("stream", "lagging"), ("partition", "1"), ("path", path)],
        )
    };
    let lag = on_path(&h, 1, 1);
    h.sim
        .fault(Fault::Delay {
            target: lag.clone(),
            ms: 2_000,
        })
        .unwrap();
    // Once the lagging path's backlog has started to flow, count who arrives first.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (a0, b0) = (first("a"), first("b"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a, b) = (first("a") - a0, first("b") - b0);
    h.sim.fault(Fault::Resume { target: lag }).unwrap();
    println!("first arrivals while path b lags 2 s: a {a} b {b}");
    assert!(a > 100.0 && b <= a * 0.02, "path a leads: a {a} b {b}");
    // Sampled lags of path b's copies reach the seconds buckets.
    let lagged = metric_sum(
        "tandem_path_lag_seconds_count",
        &[("stream", "lagging"), ("partition", "1"), ("path", "b")],
    ) - metric_sum(
        "tandem_path_lag_seconds_bucket",
        &[
            ("stream", "lagging"),
            ("partition", "1"),
            ("path", "b"),
            ("le", "1"),
        ],
    );
    assert!(lagged > 0.0, "lags over 1 s were recorded for path b");
    let v = h.finish(SETTLE).await;
    judge("one path lagging 2 s", &v, None, None);
}

/// One path flapping (dropped every 1.5 s, eight times): the sibling keeps the partition
/// covered throughout, so it never goes down and nothing needs repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_path_flapping() {
    let (h, _dir) = harness(|_| {}).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connects = |s: &tandem_monitor::Status| {
        s.streams[0].partitions[1]
            .connections
            .iter()
            .find(|c| c.path == "a")
            .map_or(0, |c| c.connects)
    };
    let before = connects(&h.status());
    let at = Instant::now();
    for _ in 0..8 {
        h.sim
            .fault(Fault::Drop {
                target: on_path(&h, 2, 0),
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let flaps = connects(&h.status()) - before;
    assert!(
        flaps >= 7,
        "path a of partition 2 reconnected {flaps} times"
    );
    let down = fired_so_far(&mut alerts, AlertName::PartitionDown, None);
    assert!(
        down.is_empty(),
        "a flapping path never takes the partition down: {down:?}"
    );
    let v = h.finish(SETTLE).await;
    judge(
        "one path flapping",
        &v,
        None,
        Some(Instant::now().duration_since(at)),
    );
}

/// Drops every connection of the harness's stream and answers its reconnects with
/// `status`: the next `count` requests, or all of them for `for_ms`.
fn refuse_and_drop(h: &Harness, status: u16, count: Option<u32>, for_ms: Option<u64>) {
    h.sim
        .fault(Fault::Reject {
            stream: h.cfg.stream.clone(),
            partition: None,
            status,
            count,
            for_ms,
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: Target {
                stream: Some(h.cfg.stream.clone()),
                ..Target::default()
            },
        })
        .unwrap();
}

/// A 429 storm on the whole stream (every connection dropped, every reconnect answered 429
/// for 3 s): the consumer backs off as the upstream asks instead of hammering it, and the
/// reconnects backfill the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm() {
    let (h, _dir) = harness(|c| c.minute_ms = 2_000).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    refuse_and_drop(&h, 429, None, Some(3_000));
    let (fired, resolved) = fired_and_resolved(
        &mut alerts,
        AlertName::PartitionDown,
        1,
        Duration::from_secs(20),
    )
    .await;
    let stats = h.sim.stats(&h.cfg.stream).unwrap();
    let answered_429 = stats.responses.get(&429).copied().unwrap_or(0);
    // Four connections backing off one upstream minute (2 s here), then two, meet at most
    // two refusals each in a 3 s storm; three each would already be hammering.
    println!("429 answers during the storm: {answered_429}");
    assert!(
        (1..=12).contains(&answered_429),
        "429 answers: {answered_429}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = h.finish(SETTLE).await;
    assert!(v.duplicates_removed > 0, "the backfills overlapped");
    judge("429 storm", &v, Some(fired - at), Some(resolved - at));
}

/// A burst of 503 answers on every partition (the next eight connection requests), after
/// every connection dropped: exponential backoff, then reconnects with backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_burst() {
    let (h, _dir) = harness(|c| c.minute_ms = 2_000).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    refuse_and_drop(&h, 503, Some(8), None);
    let (fired, resolved) = fired_and_resolved(
        &mut alerts,
        AlertName::PartitionDown,
        2,
        Duration::from_secs(20),
    )
    .await;
    let answered_503 = h.sim.stats(&h.cfg.stream).unwrap().responses[&503];
    assert_eq!(answered_503, 8, "the burst was served in full");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = h.finish(SETTLE).await;
    judge("503 burst", &v, Some(fired - at), Some(resolved - at));
}

/// 401 on one stream while another keeps running: the refused stream stops for good (the
/// upstream's rule: do not hammer with bad credentials) and alerts; the other stream is
/// untouched. Once the credentials are fixed, a restart repairs the refused stream's gap
/// from its ledger, and both streams end complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_stream_while_another_runs() {
    let (h, _dir) = harness(|c| {
        c.minute_ms = 2_000;
        c.extra_streams = vec!["sample".to_owned()];
    })
    .await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    h.sim
        .fault(Fault::Reject {
            stream: "sample".to_owned(),
            partition: None,
            status: 401,
            count: None,
            for_ms: Some(2_000),
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: Target {
                stream: Some("sample".to_owned()),
                ..Target::default()
            },
        })
        .unwrap();
    let stopped = |s: &tandem_monitor::Status| {
        s.streams
            .iter()
            .filter(|st| st.name == "sample")
            .flat_map(|st| &st.partitions)
            .flat_map(|p| &p.connections)
            .all(|c| c.phase == "stopped")
    };
    assert!(
        h.wait(Duration::from_secs(10), stopped).await,
        "every connection of the refused stream stops"
    );
    let detected = at.elapsed();
    // Unique counts what arrived; stored follows as the store acknowledges it.
    let count_of = |h: &Harness, stream: &str, stored: bool| -> u64 {
        h.pipeline
            .tallies()
            .iter()
            .filter(|(s, _, _)| &**s == stream)
            .map(|(_, _, t)| {
                let t = t.snapshot();
                if stored { t.stored } else { t.unique }
            })
            .sum()
    };
    let decahose_before = count_of(&h, "decahose", true);
    let sample_before = count_of(&h, "sample", false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        count_of(&h, "decahose", true) > decahose_before + 200,
        "the other stream keeps storing"
    );
    assert_eq!(
        count_of(&h, "sample", false),
        sample_before,
        "the refused stream is stopped"
    );
    let fatal = fired_so_far(&mut alerts, AlertName::ConnectionFatal, Some("sample"));
    assert_eq!(
        fatal.len(),
        4,
        "a fatal alert per refused connection: {fatal:?}"
    );
    // The other stream never lost a partition or a connection for good (a loaded machine
    // may still make one of its connections briefly stale).
    let decahose_alerts: Vec<_> = h
        .status()
        .alerts
        .iter()
        .filter(|a| a.key.stream == "decahose")
        .map(|a| a.key.name)
        .filter(|n| matches!(n, AlertName::PartitionDown | AlertName::ConnectionFatal))
        .collect();
    assert!(
        decahose_alerts.is_empty(),
        "decahose is healthy: {decahose_alerts:?}"
    );
    // The credentials are fixed (the refusals have expired); the operator restarts.
    let (h, _report) = h.restart().await.expect("the consumer restarts");
    assert!(h.wait_connected(Duration::from_secs(10)).await);
    let repaired = at.elapsed();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = h.finish(SETTLE).await;
    judge(
        "401 on one of two streams",
        &v,
        Some(detected),
        Some(repaired),
    );
}

/// The dedup cache at its cap (1000 ids per partition at 200 activities/s per partition:
/// a 5 s horizon against a 30 s window): ids are forgotten early, the guarantee's
/// weakening is alerted, and copies that arrive within the horizon are still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_memory_cap_reached() {
    let (h, _dir) = harness(|c| {
        c.rate_per_sec = 400.0;
        c.max_ids_per_partition = Some(1_000);
        // Its own stream name: the metric read below is process-wide.
        c.stream = "capped".to_owned();
    })
    .await;
    let mut alerts = h.pipeline.alert_transitions();
    let at = Instant::now();
    let deadline = at + Duration::from_secs(20);
    let fired = loop {
        let t = tokio::time::timeout_at(deadline, alerts.recv())
            .await
            .expect("dedup_horizon_weakened fires")
            .unwrap();
        if let Transition::Fired(v) = t
            && v.key.name == AlertName::DedupHorizonWeakened
        {
            break Instant::now();
        }
    };
    let evicted = metric_sum("tandem_dedup_evicted_early_total", &[("stream", "capped")]);
    assert!(evicted > 0.0, "ids were evicted early: {evicted}");
    let v = h.finish(SETTLE).await;
    assert!(v.duplicates_removed > 0);
    judge("dedup cap reached", &v, Some(fired - at), None);
}

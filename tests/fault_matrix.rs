//! End-to-end fault matrix: each scenario runs the whole pipeline against the simulator
//! and ends with every published activity stored exactly once.

use std::time::Duration;

use tandem_e2e::{harness, judge, metric_sum, outage};
use tandem_monitor::{AlertName, Transition};
use tandem_scenario::{Harness, HarnessApi, HarnessConfig};
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
    path_dropped("one path dropped", |_| {}, Duration::from_secs(10)).await;
}

/// The scenario of a dropped path, on the stream `tweak` sets up: partition 1's first path
/// is dropped and its reconnects refused for a second while its sibling stays connected;
/// `partition_imbalance` fires and resolves within `within`; nothing is lost.
async fn path_dropped(name: &str, tweak: impl FnOnce(&mut HarnessConfig), within: Duration) {
    let (h, _dir) = harness(tweak).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    refuse_and_drop_path(&h, 1, 0);
    let (fired, resolved) =
        fired_and_resolved(&mut alerts, AlertName::PartitionImbalance, 1, within).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = h.finish(SETTLE).await;
    judge(name, &v, Some(fired - at), Some(resolved - at));
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

/// 401 on one of two streams (a password refused for 2 s, as when it is rotated on the
/// upstream before the consumer's copy): the stream's connections are retried on the slow
/// schedule, never stopped, `connection_fatal` fires for each and resolves when it
/// connects again; backfill or recovery covers the gap; the other stream never notices.
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
    let (mut fired, mut resolved) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while resolved < 4 {
        let t = tokio::time::timeout_at(deadline, alerts.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("connection_fatal fired {fired} and resolved {resolved} times")
            })
            .expect("transitions flow");
        match t {
            Transition::Fired(v) if v.key.name == AlertName::ConnectionFatal => {
                assert_eq!(v.key.stream, "sample", "only the refused stream: {v:?}");
                assert!(v.message.contains("401"), "{}", v.message);
                fired += 1;
            }
            Transition::Resolved(r) if r.key.name == AlertName::ConnectionFatal => resolved += 1,
            _ => {}
        }
    }
    assert_eq!(fired, 4, "one alert per refused connection");
    let repaired = at.elapsed();
    assert!(h.wait_connected(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // The other stream never lost a partition or a connection for good.
    let decahose_alerts: Vec<_> =
        fired_so_far(&mut alerts, AlertName::PartitionDown, Some("decahose"));
    assert!(
        decahose_alerts.is_empty(),
        "decahose is healthy: {decahose_alerts:?}"
    );
    let v = h.finish(SETTLE).await;
    judge("401 on one of two streams", &v, None, Some(repaired));
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

// ---------------------------------------------------------------------------- X API v2

/// The v2 filtered stream (one unpartitioned partition), one path dropped: its sibling
/// covers, the path reconnects, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_filtered_one_path_dropped() {
    let filtered = |c: &mut HarnessConfig| {
        c.api = HarnessApi::V2Filtered;
        c.partitions = 1;
        c.stream = "filtered".to_owned();
    };
    path_dropped(
        "v2 filtered: path dropped",
        filtered,
        Duration::from_secs(30),
    )
    .await;
}

/// Refuses a partition's reconnects for a second and drops one path's connection.
fn refuse_and_drop_path(h: &Harness, partition: u32, path: usize) {
    h.sim
        .fault(Fault::Reject {
            stream: h.cfg.stream.clone(),
            partition: Some(partition),
            status: 503,
            count: None,
            for_ms: Some(1_000),
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: on_path(h, partition, path),
        })
        .unwrap();
}

/// The partitioned v2 sample stream: one path dropped on partition 1, one silently stalled
/// on partition 2 (detected by data silence), an operational disconnect on both paths of
/// partition 1 (reconnected at once): nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_partitioned_drop_stall_and_operational_disconnect() {
    let (h, _dir) = harness(|c| {
        c.api = HarnessApi::V2Sample10;
        c.stream = "sample10".to_owned();
        c.heartbeat_ms = 5_000;
    })
    .await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    refuse_and_drop_path(&h, 1, 0);
    h.sim
        .fault(Fault::Stall {
            target: on_path(&h, 2, 1),
        })
        .unwrap();
    let (stale_fired, stale_resolved) = fired_and_resolved(
        &mut alerts,
        AlertName::ConnectionStale,
        2,
        Duration::from_secs(15),
    )
    .await;
    assert!(h.wait_connected(Duration::from_secs(10)).await);
    let operational_before = metric_sum(
        "tandem_disconnects_total",
        &[("stream", "sample10"), ("kind", "operational")],
    );
    h.sim
        .fault(Fault::OperationalDisconnect {
            target: Target {
                stream: Some("sample10".to_owned()),
                partition: Some(1),
                ..Target::default()
            },
        })
        .unwrap();
    assert!(h.wait_connected(Duration::from_secs(10)).await);
    let v = h.finish(SETTLE).await;
    let operational = metric_sum(
        "tandem_disconnects_total",
        &[("stream", "sample10"), ("kind", "operational")],
    ) - operational_before;
    assert_eq!(
        operational, 2.0,
        "both paths of partition 1 saw the operational disconnect"
    );
    judge(
        "v2 sample10: drop, stall, op",
        &v,
        Some(stale_fired - at),
        Some(stale_resolved - at),
    );
}

/// The partitioned v2 sample stream, both paths of partition 1 down past backfill (5 s
/// here): backfill reaches what it can, recovery on the live URL brings the rest, complete
/// when the upstream closes (v2 sends no completion message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_both_paths_down_past_backfill() {
    let (h, _dir) = harness(|c| {
        c.api = HarnessApi::V2Sample10;
        c.stream = "sample10-gap".to_owned();
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let at = Instant::now();
    outage(&h, 1, Duration::from_secs(9));
    let repaired = h
        .wait(Duration::from_secs(60), |s| {
            s.streams.iter().flat_map(|st| &st.partitions).any(|p| {
                p.partition == 1
                    && !p.repair_gaps.is_empty()
                    && p.repair_gaps
                        .iter()
                        .all(|g| g.state == tandem_core::GapState::Repaired)
            })
        })
        .await;
    assert!(repaired, "the gap was repaired: {:?}", h.status().streams);
    assert!(h.sim.stats(&h.cfg.stream).unwrap().recovery_jobs >= 1);
    let took = at.elapsed();
    let v = h.finish(SETTLE).await;
    judge("v2 both down past backfill", &v, None, Some(took));
}

/// A v2 bearer token rotated on the upstream: every connection is refused with 401 and
/// retried on the slow schedule; once the consumer's token file holds the new token, the
/// next attempts connect, backfill covers the gap, nothing is lost, no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_unauthorized_then_rotated_token() {
    let (h, _dir) = harness(|c| {
        c.api = HarnessApi::V2Sample10;
        c.stream = "sample10-rotated".to_owned();
        c.minute_ms = 2_000;
    })
    .await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    h.sim
        .set_credentials(&h.cfg.stream, "rotated-token")
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: Target {
                stream: Some(h.cfg.stream.clone()),
                ..Target::default()
            },
        })
        .unwrap();
    // Every connection is refused at least once.
    let mut refused = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused.len() < 4 {
        let t = tokio::time::timeout_at(deadline, alerts.recv())
            .await
            .unwrap_or_else(|_| panic!("connection_fatal fired for {refused:?} only"))
            .expect("transitions flow");
        if let Transition::Fired(v) = t
            && v.key.name == AlertName::ConnectionFatal
        {
            assert!(v.message.contains("401"), "{}", v.message);
            refused.insert((v.key.partition, v.key.path.clone()));
        }
    }
    let detected = at.elapsed();
    assert!(
        h.status()
            .streams
            .iter()
            .flat_map(|s| &s.partitions)
            .flat_map(|p| &p.connections)
            .all(|c| c.phase != "stopped"),
        "refused connections keep retrying"
    );
    std::fs::write(h.cfg.token_file(), "rotated-token\n").unwrap();
    assert!(
        h.wait_connected(Duration::from_secs(20)).await,
        "the rotated token heals"
    );
    let healed = at.elapsed();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = h.finish(SETTLE).await;
    judge(
        "v2 401 then rotated token",
        &v,
        Some(detected),
        Some(healed),
    );
}

/// An idle v2 filtered stream (nothing matches: heartbeats only, every ~20 s as v2
/// documents) keeps its connections: the consumer expects v2's heartbeat interval, not
/// Gnip's 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_idle_filtered_stream_keeps_its_connections() {
    let (h, _dir) = harness(|c| {
        c.api = HarnessApi::V2Filtered;
        c.partitions = 1;
        c.stream = "filtered-idle".to_owned();
        c.heartbeat_ms = 0; // the API's own interval on both sides
        c.heartbeat_margin_ms = 5_000;
        c.rate_per_sec = 0.0;
    })
    .await;
    let hearts = |h: &Harness| -> Vec<(u64, u64)> {
        h.status()
            .streams
            .iter()
            .flat_map(|s| &s.partitions)
            .flat_map(|p| &p.connections)
            .map(|c| (c.connects, c.heartbeats))
            .collect()
    };
    // Three heartbeats on every connection (about a minute) with one connect each.
    assert!(
        h.wait(Duration::from_secs(120), |s| {
            s.streams
                .iter()
                .flat_map(|s| &s.partitions)
                .flat_map(|p| &p.connections)
                .all(|c| c.heartbeats >= 3)
        })
        .await,
        "heartbeats arrive: {:?}",
        hearts(&h)
    );
    for (connects, heartbeats) in hearts(&h) {
        assert_eq!(
            connects, 1,
            "no reconnect while idle ({heartbeats} heartbeats)"
        );
    }
    let v = h.finish(Duration::from_secs(5)).await;
    assert_eq!(v.published, 0);
    assert!(v.clean(), "{}", v.line());
}

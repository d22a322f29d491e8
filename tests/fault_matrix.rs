//! End-to-end fault matrix: each scenario runs the whole pipeline against the simulator
//! and ends with every published activity stored exactly once.

use std::time::Duration;

use tandem_e2e::{harness, judge};
use tandem_monitor::{AlertName, Transition};
use tandem_sim::{Fault, Injection, Target};
use tokio::time::Instant;

const SETTLE: Duration = Duration::from_secs(20);

fn on_path(h: &tandem_scenario::Harness, partition: u32, path: usize) -> Target {
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

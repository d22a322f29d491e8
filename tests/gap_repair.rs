//! Gap repair end to end: both connections of a partition down at once, for less or more
//! than backfill reaches, a recovery connection broken half-way, and a likes stream (no
//! recovery). Each run ends with the store compared against the simulator's ground truth.

use std::time::Duration;

use tandem_core::GapState;
use tandem_e2e::{harness, judge, outage};
use tandem_monitor::{AlertName, PartitionStatus, Status, Transition};
use tandem_scenario::Harness;
use tandem_sim::{ConnectionKind, Fault, Target};
use tokio::time::Instant;

const SETTLE: Duration = Duration::from_secs(30);

fn partition(s: &Status, p: u32) -> Option<&PartitionStatus> {
    s.streams
        .iter()
        .flat_map(|st| &st.partitions)
        .find(|x| x.partition == p)
}

/// Waits until partition `p` has at least one repair gap and all of them are in `state`.
async fn gaps_end_in(h: &Harness, p: u32, state: GapState, within: Duration) -> bool {
    h.wait(within, |s| {
        partition(s, p).is_some_and(|x| {
            !x.repair_gaps.is_empty() && x.repair_gaps.iter().all(|g| g.state == state)
        })
    })
    .await
}

/// Both paths down past the backfill window (5 s here): the reconnect backfills what it
/// can reach and the rest comes back through recovery, margins included, stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_down_past_backfill() {
    let (h, _dir) = harness(|_| {}).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let at = Instant::now();
    outage(&h, 1, Duration::from_secs(9));
    assert!(
        gaps_end_in(&h, 1, GapState::Repaired, Duration::from_secs(40)).await,
        "the gap was repaired: {:?}",
        partition(&h.status(), 1).map(|p| &p.repair_gaps)
    );
    let repaired = at.elapsed();
    let gaps = partition(&h.status(), 1).unwrap().repair_gaps.clone();
    let g = &gaps[0];
    let secs = (g.end_ms - g.start_ms) as f64 / 1000.0;
    assert!(
        (2.0..10.0).contains(&secs),
        "the gap is the outage minus the backfill window: {secs} s"
    );
    assert!(h.sim.stats(&h.cfg.stream).unwrap().recovery_jobs >= 1);
    assert!(
        partition(&h.status(), 2).unwrap().repair_gaps.is_empty(),
        "partition 2 was never down"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = h.finish(SETTLE).await;
    println!("gap {secs:.1} s in {} chunk(s)", g.chunks);
    judge("both down > backfill", &v, None, Some(repaired));
}

/// A recovery connection dropped half-way resumes from the last minute fully received;
/// what it delivers twice is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_dropped_half_way() {
    let (h, _dir) = harness(|c| c.recovery_rate_per_sec = 100).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    outage(&h, 1, Duration::from_secs(12));
    // Wait for the recovery connection to be half-way through, then break it.
    let deadline = Instant::now() + Duration::from_secs(40);
    let recovery = loop {
        assert!(
            Instant::now() < deadline,
            "no recovery connection got going"
        );
        if let Some(c) = h.sim.connections().into_iter().find(|c| {
            c.kind == ConnectionKind::Recovery && c.partition == 1 && c.activities_sent >= 200
        }) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    h.sim
        .fault(Fault::Drop {
            target: Target {
                connection: Some(recovery.id),
                ..Target::default()
            },
        })
        .unwrap();
    assert!(
        gaps_end_in(&h, 1, GapState::Repaired, Duration::from_secs(60)).await,
        "the gap was repaired after the drop: {:?}",
        partition(&h.status(), 1).map(|p| &p.repair_gaps)
    );
    let jobs = h.sim.stats(&h.cfg.stream).unwrap().recovery_jobs;
    assert!(jobs >= 2, "the recovery was resumed ({jobs} jobs)");
    let v = h.finish(SETTLE).await;
    println!(
        "recovery dropped after {} activities; {jobs} recovery jobs",
        recovery.activities_sent
    );
    judge("recovery dropped half-way", &v, None, None);
}

/// A likes stream has no recovery: a gap past backfill is reported unrecoverable (an
/// alert and the ledger), never requested; only the gap's activities are missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn likes_gap_is_unrecoverable() {
    let (h, _dir) = harness(|c| c.likes = true).await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    outage(&h, 1, Duration::from_secs(9));
    let deadline = Instant::now() + Duration::from_secs(30);
    let fired = loop {
        let t = tokio::time::timeout_at(deadline, alerts.recv())
            .await
            .expect("gap_unrecoverable fired")
            .expect("transitions flow");
        if let Transition::Fired(v) = t
            && v.key.name == AlertName::GapUnrecoverable
        {
            break v;
        }
    };
    assert_eq!(fired.key.partition, Some(1));
    assert!(fired.message.contains("likes"), "{}", fired.message);
    assert!(gaps_end_in(&h, 1, GapState::Unrecoverable, Duration::from_secs(5)).await);
    // The gap grows with every refused reconnect: read it once the outage is over.
    assert!(h.wait_connected(Duration::from_secs(20)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gaps = partition(&h.status(), 1).unwrap().repair_gaps.clone();
    assert_eq!(gaps.len(), 1, "one outage, one gap: {gaps:?}");
    let gap = gaps[0].clone();
    assert_eq!(h.sim.stats(&h.cfg.stream).unwrap().recovery_jobs, 0);
    // It never catches up (the gap is missing): a short settle is enough.
    let v = h.finish(Duration::from_secs(5)).await;
    println!("{}", v.line());
    assert!(v.lost > 0, "the gap's likes are missing");
    assert_eq!(v.stored_twice, 0);
    for (p, r) in &v.lost_detail {
        assert_eq!(*p, 1, "only partition 1 lost anything");
        assert!(
            r.published_ms + 2_000 >= gap.start_ms && r.published_ms <= gap.end_ms + 2_000,
            "lost {} published at {} is outside the gap {}..{}",
            r.id,
            r.published_ms,
            gap.start_ms,
            gap.end_ms
        );
    }
}

//! The monitor outlives its event channels: when every connection task has ended (a wrong
//! password stops them all) and the event senders are gone, ticks must go on, so that
//! `/status` stays fresh and `partition_down` still fires.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tandem_conn::ConnSnapshot;
use tandem_core::Tally;
use tandem_monitor::*;
use tokio::sync::{mpsc, watch};

/// With every event sender dropped, the status is still re-evaluated on each tick and
/// `partition_down` moves from pending to firing.
#[tokio::test(start_paused = true)]
async fn ticks_continue_after_event_channels_close() {
    // The connection tasks have ended: their state stays where it stopped.
    let (_, state) = watch::channel(ConnSnapshot::default());
    let (_, gaps) = watch::channel(Vec::new());
    let (conn_events, conn_rx) = mpsc::unbounded_channel();
    let (merge_events, merge_rx) = mpsc::unbounded_channel();
    let mut handle = spawn(
        MonitorConfig::default(),
        MonitorInputs {
            streams: vec![StreamView {
                name: "d".into(),
                configured_per_partition: 1,
                partitions: vec![PartitionView {
                    partition: 1,
                    tally: Arc::new(Tally::default()),
                    connections: vec![ConnectionView {
                        path: "a".into(),
                        state,
                    }],
                    gaps,
                }],
            }],
            sinks: vec![SinkView {
                name: "files".into(),
                up: Arc::new(AtomicBool::new(true)),
                alive: Arc::new(AtomicBool::new(true)),
            }],
            conn_events: conn_rx,
            merge_events: merge_rx,
            dedup_window: Duration::from_secs(900),
            pair: None,
        },
    );
    drop(conn_events);
    drop(merge_events);

    tokio::time::sleep(Duration::from_secs(6)).await;
    let status = handle.status.borrow_and_update().clone();
    assert!(status.at_ms > 0, "the status was never published");
    let down = status
        .alerts
        .iter()
        .find(|a| a.key.name == AlertName::PartitionDown)
        .expect("partition_down is raised");
    assert!(
        matches!(down.phase, Phase::Firing { .. }),
        "partition_down is stuck in {:?}",
        down.phase
    );
    tokio::time::timeout(Duration::from_secs(1), handle.status.changed())
        .await
        .expect("the status is still re-published every tick")
        .expect("the monitor is running");
}

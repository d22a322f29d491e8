//! The JetStream sink against a real `nats-server -js` (installed by
//! `scripts/setup-test-deps`, started here on an ephemeral loopback port).

use std::collections::HashSet;
use std::time::Duration;

use tandem_core::ActivityId;
use tandem_e2e::{harness, judge};
use tandem_monitor::{AlertName, Transition};
use tandem_scenario::nats::{NatsServer, stored_ids};

/// Two consumers in two "zones" fed the same stream publish to one JetStream stream: it
/// holds every activity exactly once, and the duplicate acknowledgements equal the second
/// zone's deliveries (every activity is published once per zone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_zones_store_each_activity_once() {
    let store = tempfile::tempdir().unwrap();
    let nats =
        NatsServer::start(store.path()).expect("nats-server (scripts/setup-test-deps installs it)");
    let url = nats.url();
    let (h, dir) = harness(|c| {
        c.nats_url = Some(url.clone());
        c.max_connections_per_partition = 4;
    })
    .await;
    let zone_b = h
        .another_consumer(
            dir.path().join("zone-b"),
            vec![Some([127, 0, 0, 4].into()), Some([127, 0, 0, 5].into())],
        )
        .await
        .expect("the second zone starts");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(h.quiesce(Duration::from_secs(20)).await, "zone A caught up");
    let published: usize = (1..=2)
        .map(|p| h.sim.truth("decahose", p).unwrap().len())
        .sum();
    // Zone B started a moment later: its deliveries are its own unique activities, and
    // all of them must be acknowledged.
    let unique_b = || {
        zone_b
            .tallies()
            .iter()
            .map(|(_, _, t)| t.snapshot().unique)
            .sum::<u64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored: u64 = zone_b
            .tallies()
            .iter()
            .map(|(_, _, t)| {
                let t = t.snapshot();
                t.stored + t.store_duplicates
            })
            .sum();
        if stored >= unique_b() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unique_b = unique_b();
    let dup_b: u64 = zone_b
        .tallies()
        .iter()
        .map(|(_, _, t)| t.snapshot().store_duplicates)
        .sum();
    let stored_b: u64 = zone_b
        .tallies()
        .iter()
        .map(|(_, _, t)| t.snapshot().stored)
        .sum();
    let dup_a: u64 = h
        .pipeline
        .tallies()
        .iter()
        .map(|(_, _, t)| t.snapshot().store_duplicates)
        .sum();
    zone_b.shutdown().await;
    let v = h.finish(Duration::from_secs(10)).await;
    println!(
        "two zones: published {published}, zone B delivered {unique_b} and stored {stored_b}, duplicate acks A {dup_a} + B {dup_b}"
    );
    judge("two zones into jetstream", &v, None, None);
    assert!(
        unique_b as usize >= published * 9 / 10,
        "zone B consumed the stream too"
    );
    assert_eq!(
        stored_b + dup_b,
        unique_b,
        "zone B's publishes were all acknowledged, each counted once"
    );
    assert_eq!(
        dup_a + dup_b,
        unique_b,
        "the duplicate acks equal the second zone's deliveries"
    );
}

/// The NATS server stopped for 30 s and restarted: the sink holds and spools meanwhile,
/// raises `sink_down`, and afterwards the stream holds every activity exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_for_30_seconds_loses_nothing() {
    let store = tempfile::tempdir().unwrap();
    let mut nats =
        NatsServer::start(store.path()).expect("nats-server (scripts/setup-test-deps installs it)");
    let url = nats.url();
    let (h, _dir) = harness(|c| {
        c.nats_url = Some(url.clone());
        c.max_memory_activities = 1_000;
        c.rate_per_sec = 150.0;
    })
    .await;
    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let held: u64 = h
        .pipeline
        .tallies()
        .iter()
        .map(|(_, _, t)| t.snapshot().in_flight)
        .sum();
    assert!(
        held > 1_000,
        "the sink held (and spooled) what it could not store: {held}"
    );
    nats.restart().expect("nats-server restarts");
    let mut fired = false;
    let resolved = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match alerts.recv().await {
                Ok(Transition::Fired(v)) if v.key.name == AlertName::SinkDown => fired = true,
                Ok(Transition::Resolved(r)) if r.key.name == AlertName::SinkDown => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(
        fired && resolved,
        "sink_down fired during the outage and resolved after it"
    );
    let v = h.finish(Duration::from_secs(60)).await;
    judge("nats down 30 s", &v, None, None);
    let ids = stored_ids(&url, "TANDEM").await.unwrap();
    let all: Vec<ActivityId> = ids.values().flatten().copied().collect();
    assert_eq!(
        all.len(),
        all.iter().collect::<HashSet<_>>().len(),
        "no message stored twice"
    );
}

/// A pair in two zones, zone b away for longer than the JetStream duplicate window while
/// zone a keeps the partitions covered: when zone b comes back, its ledger shows the gap
/// and it recovers the interval; the posts zone a already stored, too old for the duplicate
/// window to recognise, are skipped because recovery asks the stream what it holds. The
/// stream ends with every activity exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_back_after_the_duplicate_window_stores_nothing_twice() {
    let store = tempfile::tempdir().unwrap();
    let nats =
        NatsServer::start(store.path()).expect("nats-server (scripts/setup-test-deps installs it)");
    let url = nats.url();
    // Half-second "minutes": backfill reaches 2.5 s, the dedup window is 5 s and the
    // stream's duplicate window 10 s.
    let (h, dir) = harness(|c| {
        c.nats_url = Some(url.clone());
        c.max_connections_per_partition = 4;
        c.minute_ms = 500;
        c.dedup_window_secs = 5;
    })
    .await;
    let zone_b_dir = dir.path().join("zone-b");
    let zone_b_paths = vec![Some([127, 0, 0, 4].into()), Some([127, 0, 0, 5].into())];
    let zone_b = h
        .another_consumer(zone_b_dir.clone(), zone_b_paths.clone())
        .await
        .expect("zone b starts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    zone_b.shutdown().await;
    // Away for 16 s, past the duplicate window; zone a stores everything meanwhile.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let zone_b = h
        .another_consumer(zone_b_dir, zone_b_paths)
        .await
        .expect("zone b starts again");
    repair_gaps_reach(
        || zone_b.status(),
        Duration::from_secs(40),
        "zone b recovered its gap",
        |gaps| !gaps.is_empty(),
    )
    .await;
    let recovered_skipped: u64 = zone_b
        .tallies()
        .iter()
        .map(|(_, _, t)| t.snapshot().duplicates)
        .sum();
    let v = h.finish(Duration::from_secs(30)).await;
    zone_b.shutdown().await;
    judge("zone back after dup window", &v, None, None);
    let ids = stored_ids(&url, "TANDEM").await.unwrap();
    let all: Vec<ActivityId> = ids.values().flatten().copied().collect();
    let distinct = all.iter().collect::<HashSet<_>>().len();
    println!(
        "zone b recovered its gap; {recovered_skipped} copies removed in zone b; stream holds {} messages, {distinct} distinct",
        all.len()
    );
    assert_eq!(all.len(), distinct, "no message stored twice");
}

/// A pair, one path per zone, coordinated through the NATS server they store to: zone b
/// away for three backfill windows while zone a stays live. Zone b's gap is one zone a
/// stored, so it is closed as `covered_by_peer` and the upstream sees no recovery request
/// at all; the store holds every activity once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_zone_away_past_backfill_needs_no_recovery() {
    let store = tempfile::tempdir().unwrap();
    let nats =
        NatsServer::start(store.path()).expect("nats-server (scripts/setup-test-deps installs it)");
    let url = nats.url();
    // One-second "minutes": backfill reaches 5 s.
    let (h, dir) = harness(|c| {
        c.nats_url = Some(url.clone());
        c.paths = vec![Some([127, 0, 0, 2].into())];
        c.pair_consumer = Some("zone-a".to_owned());
        c.stream = "pair-away".to_owned();
    })
    .await;
    let zone_b_dir = dir.path().join("zone-b");
    let zone_b_paths = vec![Some([127, 0, 0, 3].into())];
    let zone_b = h
        .another_consumer(zone_b_dir.clone(), zone_b_paths.clone())
        .await
        .expect("zone b starts");
    // Each zone sees the other's reports.
    let sees_peer = |s: &tandem_monitor::Status| {
        s.pair_coordinated == Some(true)
            && s.streams
                .iter()
                .flat_map(|st| &st.partitions)
                .all(|p| p.peer.is_some())
    };
    assert!(
        h.wait(Duration::from_secs(20), sees_peer).await,
        "zone a sees zone b: coordinated {:?} ({:?}), peers {:?}",
        h.status().pair_coordinated,
        h.status().alerts,
        h.status()
            .streams
            .iter()
            .flat_map(|st| &st.partitions)
            .map(|p| p.peer.clone())
            .collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    zone_b.shutdown().await;
    // Away for three backfill windows; zone a stores everything meanwhile.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let zone_b = h
        .another_consumer(zone_b_dir, zone_b_paths)
        .await
        .expect("zone b starts again");
    let what = "zone b closed a gap per partition";
    repair_gaps_reach(
        || zone_b.status(),
        Duration::from_secs(60),
        what,
        |gaps| gaps.len() == 2,
    )
    .await;
    let stats = h.sim.stats(&h.cfg.stream).unwrap();
    assert_eq!(stats.recovery_jobs, 0, "no recovery request: {stats:?}");
    let by_peer = tandem_e2e::metric_sum(
        "tandem_gaps_repaired_total",
        &[("stream", "pair-away"), ("kind", "covered_by_peer")],
    );
    assert_eq!(by_peer, 2.0, "both of zone b's gaps closed by the peer");
    let v = h.finish(Duration::from_secs(30)).await;
    zone_b.shutdown().await;
    judge("pair: zone b away 3 windows", &v, None, None);
    let ids = stored_ids(&url, "TANDEM").await.unwrap();
    let all: Vec<ActivityId> = ids.values().flatten().copied().collect();
    let distinct = all.iter().collect::<HashSet<_>>().len();
    assert_eq!(all.len(), distinct, "no message stored twice");
}

/// Waits until the repair gaps in `status` satisfy `enough` and are all repaired; fails with
/// `what` and the gaps if they do not within `within`.
async fn repair_gaps_reach(
    status: impl Fn() -> std::sync::Arc<tandem_monitor::Status>,
    within: Duration,
    what: &str,
    enough: impl Fn(&[tandem_core::GapView]) -> bool,
) {
    let gaps = || -> Vec<tandem_core::GapView> {
        (status().streams.iter())
            .flat_map(|st| &st.partitions)
            .flat_map(|p| p.repair_gaps.clone())
            .collect()
    };
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = gaps();
        if enough(&now)
            && now
                .iter()
                .all(|g| g.state == tandem_core::GapState::Repaired)
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The read-back gap repair uses: exactly the ids published in the asked interval, of the
/// asked partition, whatever kind of activity they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_ids_reads_back_an_interval_of_one_partition() {
    let store = tempfile::tempdir().unwrap();
    let nats =
        NatsServer::start(store.path()).expect("nats-server (scripts/setup-test-deps installs it)");
    let url = nats.url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TANDEM".to_owned(),
        subjects: vec!["tandem.>".to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |subject: &'static str, id: ActivityId| {
        let js = js.clone();
        async move {
            let msg = async_nats::jetstream::message::PublishMessage::build()
                .payload("{}".into())
                .message_id(id.to_string());
            js.send_publish(subject, msg).await.unwrap().await.unwrap();
        }
    };
    let early = [ActivityId::Post(1), ActivityId::Post(2)];
    let delete = ActivityId::Delete {
        status: 3,
        timestamp_ms: 1_700_000_000_000,
    };
    for id in early {
        publish("tandem.decahose.1", id).await;
    }
    publish("tandem.decahose.2", ActivityId::Post(9)).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let between = tandem_core::time::unix_ms_now();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    publish("tandem.decahose.1", delete).await;
    publish("tandem.decahose.1", ActivityId::Post(4)).await;

    let ids = tandem_sink::JetStreamIds::connect(&tandem_sink::NatsConfig::new(&url), None)
        .await
        .unwrap();
    let all = ids.between("decahose", 1, 0, u64::MAX / 2).await.unwrap();
    assert_eq!(
        all,
        HashSet::from([early[0], early[1], delete, ActivityId::Post(4)]),
        "partition 1 only, every kind of id"
    );
    let first = ids.between("decahose", 1, 0, between).await.unwrap();
    assert_eq!(first, HashSet::from(early), "up to the interval's end");
    let second = ids
        .between("decahose", 1, between, u64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(
        second,
        HashSet::from([delete, ActivityId::Post(4)]),
        "from its start"
    );
}

//! The simulator against UPSTREAM.md, point by point.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use support::*;
use tandem_core::ActivityId;
use tandem_core::time::{rfc3339_ms, unix_ms_now};
use tandem_sim::{ConnectionKind, Fault, Injection, RateProfile, Simulator, StreamConfig, Target};

/// How long to wait for something that must happen. Generous, because a loaded machine
/// delays delivery and a longer wait costs nothing when the thing happens. No test judges
/// how long something took against it.
///
/// These tests run on tokio's single-threaded test runtime, together with the simulator's
/// generator and writers: while the test itself runs, they are parked at an await. Some
/// tests rely on that (e.g. nothing is published after `set_rate` to zero returns).
const WAIT: Duration = Duration::from_secs(10);

/// Runs a loop that waits for one thing among others (lines, heartbeats) that keep coming,
/// so that `WAIT` alone would never end it, failing the test if it does not end in time.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(3 * WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {:?}", 3 * WAIT))
}

/// Reads `s` until it delivers an activity that the simulator published at or after
/// `since_ms` by its own ground-truth clock.
async fn read_until_published(sim: &Simulator, s: &mut Stream, partition: u32, since_ms: u64) {
    within("an activity published since then", async {
        loop {
            let lines = s.lines(1, WAIT).await;
            let id = id_of(lines.first().expect("the stream keeps delivering"));
            let truth = sim.truth("d", partition).unwrap();
            let record = truth
                .iter()
                .find(|r| r.id == id)
                .expect("a published activity");
            if record.published_ms >= since_ms {
                return;
            }
        }
    })
    .await;
}

/// Which connection a copy arrived on, and the wall-clock time the test saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    A(u64),
    B(u64),
}

/// Reads two connections at once until both delivered activity `id`; the copies in the
/// order they arrived.
async fn copies_of(a: &mut Stream, b: &mut Stream, id: ActivityId) -> Vec<Arrival> {
    let is_it = |ev: Event| match ev {
        Event::Line(l) => id_of(&l) == id,
        Event::Heartbeat => false,
        other => panic!("waiting for {id}: {other:?}"),
    };
    let mut order = Vec::new();
    let (mut on_a, mut on_b) = (false, false);
    within("both copies", async {
        while !(on_a && on_b) {
            // `Stream::next` only awaits a body chunk: the losing branch loses nothing.
            tokio::select! {
                ev = a.next(WAIT), if !on_a => if is_it(ev) {
                    on_a = true;
                    order.push(Arrival::A(unix_ms_now()));
                },
                ev = b.next(WAIT), if !on_b => if is_it(ev) {
                    on_b = true;
                    order.push(Arrival::B(unix_ms_now()));
                },
            }
        }
    })
    .await;
    order
}

/// Bytes the simulator wrote to the connection from `ip`.
fn bytes_sent_to(sim: &Simulator, ip: &str) -> u64 {
    sim.connections()
        .iter()
        .find(|c| c.client.ip().to_string() == ip)
        .map(|c| c.bytes_sent)
        .expect("the connection is open")
}

/// Status codes on connect: 401 bad credentials, 406 without gzip, 400 bad parameters.
#[tokio::test]
async fn connect_status_codes() {
    let sim = start(vec![fast_gnip("d", 50.0)]).await;
    let ok = url(&sim, "d", "partition=1");
    assert_eq!(
        Stream::open(&ok, Auth::Basic(USER, "wrong"), true)
            .await
            .status,
        401
    );
    assert_eq!(Stream::open(&ok, Auth::None, true).await.status, 401);
    let s = Stream::open(&ok, Auth::Basic(USER, PASS), false).await;
    assert_eq!(s.status, 406);
    assert!(s.text.contains("compression"), "{}", s.text);
    for q in ["", "partition=0", "partition=3", "partition=x"] {
        let s = Stream::open(&url(&sim, "d", q), Auth::Basic(USER, PASS), true).await;
        assert_eq!(s.status, 400, "{q}: {}", s.text);
        assert!(s.text.contains("partition"), "{}", s.text);
    }
    for q in [
        "partition=1&backfillMinutes=0",
        "partition=1&backfillMinutes=6",
        "partition=1&backfillMinutes=9",
    ] {
        let s = Stream::open(&url(&sim, "d", q), Auth::Basic(USER, PASS), true).await;
        assert_eq!(s.status, 400, "{q}");
        assert!(s.text.contains("backfill"), "{}", s.text);
    }
    let stats = sim.stats("d").unwrap();
    assert_eq!(stats.responses.get(&401), Some(&2));
    assert_eq!(stats.responses.get(&406), Some(&1));
}

/// A live connection: gzip, the documented content type, `\r\n` lines, heartbeats when idle.
#[tokio::test]
async fn live_stream_is_gzip_ndjson_with_heartbeats() {
    let sim = start(vec![fast_gnip("d", 200.0)]).await;
    let mut s = Stream::open(
        &url(&sim, "d", "partition=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["content-type"], "application/json; charset=utf-8");
    assert_eq!(s.headers["content-encoding"], "gzip");
    let lines = s.lines(20, WAIT).await;
    assert_eq!(lines.len(), 20);
    for l in &lines {
        tandem_core::validate(l).unwrap();
    }
    sim.set_rate("d", RateProfile::Constant { per_sec: 0.0 })
        .unwrap();
    // Nothing is published after this: once the last activity arrived, the connection is
    // idle and carries heartbeats only. (Their interval: the writer's paused-clock test.)
    let last = sim.truth("d", 1).unwrap().last().unwrap().id;
    let mut seen = id_of(lines.last().unwrap());
    while seen != last {
        seen = id_of(
            s.lines(1, WAIT)
                .await
                .first()
                .expect("the last activity arrives"),
        );
    }
    for _ in 0..3 {
        assert_eq!(s.next(WAIT).await, Event::Heartbeat);
    }
}

/// Partitions carry disjoint data, and each partition's lines are exactly its ground truth.
#[tokio::test]
async fn partitions_are_disjoint_and_match_ground_truth() {
    // Generation starts once both connections are open: they see everything.
    let sim = start(vec![fast_gnip("d", 0.0)]).await;
    let mut p1 = Stream::open(
        &url(&sim, "d", "partition=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let mut p2 = Stream::open(
        &url(&sim, "d", "partition=2"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    sim.set_rate("d", RateProfile::Constant { per_sec: 400.0 })
        .unwrap();
    let mut a: Vec<ActivityId> = p1.lines(21, WAIT).await.iter().map(|l| id_of(l)).collect();
    let mut b: Vec<ActivityId> = p2.lines(21, WAIT).await.iter().map(|l| id_of(l)).collect();
    sim.set_rate("d", RateProfile::Constant { per_sec: 0.0 })
        .unwrap();
    // The ground truth is final now; each connection delivers the rest of its partition's,
    // in publish order, then only heartbeats.
    let truth1: Vec<ActivityId> = sim.truth("d", 1).unwrap().iter().map(|r| r.id).collect();
    let truth2: Vec<ActivityId> = sim.truth("d", 2).unwrap().iter().map(|r| r.id).collect();
    let rest1 = p1.lines(truth1.len().saturating_sub(a.len()), WAIT).await;
    let rest2 = p2.lines(truth2.len().saturating_sub(b.len()), WAIT).await;
    a.extend(rest1.iter().map(|l| id_of(l)));
    b.extend(rest2.iter().map(|l| id_of(l)));
    assert_eq!(p1.next(WAIT).await, Event::Heartbeat);
    assert_eq!(p2.next(WAIT).await, Event::Heartbeat);
    assert_eq!(a, truth1);
    assert_eq!(b, truth2);
    let (a, b): (HashSet<ActivityId>, HashSet<ActivityId>) =
        (a.into_iter().collect(), b.into_iter().collect());
    assert!(a.len() > 20 && b.len() > 20, "{} {}", a.len(), b.len());
    assert!(a.is_disjoint(&b));
}

/// backfillMinutes=M replays the last M minutes oldest first, not deduplicated, then goes live.
#[tokio::test]
async fn backfill_replays_the_window_oldest_first() {
    let mut cfg = fast_gnip("d", 0.0);
    // Long enough that opening a connection never takes a whole minute, even when loaded.
    cfg.minute_ms = 2_000;
    let minute_ms = cfg.minute_ms;
    let sim = start(vec![cfg]).await;
    let post = |id: u64| Bytes::from(format!("{{\"id_str\":\"{id}\",\"text\":\"t\"}}"));
    sim.publish("d", 1, vec![post(1), post(2)]).unwrap();
    // Until 1 and 2 are more than a minute old by the simulator's own publish times.
    let old_ms = sim.truth("d", 1).unwrap()[1].published_ms;
    while unix_ms_now() <= old_ms + minute_ms {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.publish("d", 1, vec![post(3), post(4)]).unwrap();
    // One minute reaches back to 3 and 4 only.
    let mut s = Stream::open(
        &url(&sim, "d", "partition=1&backfillMinutes=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let got: Vec<ActivityId> = s.lines(2, WAIT).await.iter().map(|l| id_of(l)).collect();
    assert_eq!(got, vec![ActivityId::Post(3), ActivityId::Post(4)]);
    sim.publish("d", 1, vec![post(5)]).unwrap();
    assert_eq!(id_of(&s.lines(1, WAIT).await[0]), ActivityId::Post(5));
    // Three minutes reach back to 1.
    let mut s = Stream::open(
        &url(&sim, "d", "partition=1&backfillMinutes=3"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let got: Vec<ActivityId> = s.lines(5, WAIT).await.iter().map(|l| id_of(l)).collect();
    assert_eq!(got, (1..=5).map(ActivityId::Post).collect::<Vec<_>>());
}

/// Recovery, on the recovery host, sends its range oldest first, then the completion
/// message, and ends; job 3 gets 429.
#[tokio::test]
async fn recovery_completes_and_limits_jobs() {
    let sim = start(vec![fast_gnip("d", 300.0)]).await;
    let truth = within("40 activities", async {
        loop {
            let truth = sim.truth("d", 2).unwrap();
            if truth.len() >= 40 {
                return truth;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let start_ms = truth[truth.len() / 4].created_ms;
    let end_ms = truth[3 * truth.len() / 4].created_ms;
    let q = format!(
        "partition=2&startTime={}&endTime={}",
        rfc3339_ms(start_ms),
        rfc3339_ms(end_ms)
    );
    let mut s = Stream::open(&recovery_url(&sim, "d", &q), Auth::Basic(USER, PASS), true).await;
    assert_eq!(s.status, 200);
    let mut got = Vec::new();
    let info = within("the completion message", async {
        loop {
            match s.next(WAIT).await {
                Event::Line(l) => match tandem_core::identify(&l).unwrap() {
                    tandem_core::LineKind::Activity(id) => got.push(id),
                    tandem_core::LineKind::System(m) => break m,
                },
                Event::Heartbeat => {}
                other => panic!("recovery ended without its message: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(info.message, "Recovery Request Completed");
    assert_eq!(s.next(WAIT).await, Event::End);
    let expect: Vec<ActivityId> = {
        let mut r: Vec<_> = truth
            .iter()
            .filter(|r| r.created_ms >= start_ms && r.created_ms < end_ms)
            .collect();
        r.sort_by_key(|r| r.created_ms);
        r.iter().map(|r| r.id).collect()
    };
    assert!(!expect.is_empty());
    assert_eq!(got.len(), expect.len());
    assert_eq!(
        got.iter().collect::<HashSet<_>>(),
        expect.iter().collect::<HashSet<_>>()
    );
    let times: Vec<u64> = got.iter().map(|id| id.created_unix_ms().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");

    // Two jobs whose range ends in the future stay open; a third is refused.
    let future = format!(
        "partition=1&startTime={}&endTime={}",
        rfc3339_ms(unix_ms_now() - 500),
        rfc3339_ms(unix_ms_now() + 600_000)
    );
    let future = recovery_url(&sim, "d", &future);
    let j1 = Stream::open(&future, Auth::Basic(USER, PASS), true).await;
    let j2 = Stream::open(&future, Auth::Basic(USER, PASS), true).await;
    let j3 = Stream::open(&future, Auth::Basic(USER, PASS), true).await;
    assert_eq!((j1.status, j2.status, j3.status), (200, 200, 429));
    assert!(j3.text.contains("recovery"), "{}", j3.text);
    drop((j1, j2));
    // A job's connection and its slot go together, when its writer notices the client left.
    within("the end of the dropped jobs", async {
        while sim
            .connections()
            .iter()
            .any(|c| c.kind == ConnectionKind::Recovery)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let j4 = Stream::open(&future, Auth::Basic(USER, PASS), true).await;
    assert_eq!(j4.status, 200, "a finished job frees its slot");
    // Bad ranges.
    for q in [
        "partition=1&startTime=yesterday&endTime=today",
        "partition=1&startTime=2020-01-01T00:00:00Z&endTime=2020-01-01T01:00:00Z",
    ] {
        let s = Stream::open(&recovery_url(&sim, "d", q), Auth::Basic(USER, PASS), true).await;
        assert_eq!(s.status, 400, "{q}: {}", s.text);
    }
}

/// Over the per-partition limit the oldest connection gets the error line and ends; others flow.
#[tokio::test]
async fn connection_limit_evicts_the_oldest() {
    let sim = start(vec![fast_gnip("d", 100.0)]).await;
    let u = url(&sim, "d", "partition=1");
    let mut first = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let mut second = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    assert_eq!(first.lines(2, WAIT).await.len(), 2);
    let mut third = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let error = within("the error line", async {
        loop {
            match first.next(WAIT).await {
                Event::Line(l) if l.starts_with(b"{\"error\"") => {
                    break String::from_utf8(l).unwrap();
                }
                Event::Line(_) | Event::Heartbeat => {}
                other => panic!("no error line before {other:?}"),
            }
        }
    })
    .await;
    assert!(error.contains("maximum number of connections"), "{error}");
    assert_eq!(first.next(WAIT).await, Event::End);
    assert_eq!(second.lines(3, WAIT).await.len(), 3);
    assert_eq!(third.lines(3, WAIT).await.len(), 3);
    assert_eq!(sim.stats("d").unwrap().evictions, 1);
    assert_eq!(sim.stats("d").unwrap().live_connections, vec![2, 0]);
}

/// More than 10 connection requests in 60 s get 429; the simulator counts the busiest window.
#[tokio::test]
async fn connect_rate_limit() {
    let sim = start(vec![fast_gnip("d", 10.0)]).await;
    let u = url(&sim, "d", "partition=2");
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let s = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
        statuses.push(s.status);
    }
    assert_eq!(&statuses[..10], &[200; 10]);
    assert_eq!(&statuses[10..], &[429, 429]);
    let stats = sim.stats("d").unwrap();
    assert_eq!(stats.max_requests_per_window, 12);
    assert_eq!(stats.requests, 12);
}

/// Forced statuses answer the next N requests, then normal service resumes.
#[tokio::test]
async fn reject_next_connects() {
    let sim = start(vec![fast_gnip("d", 10.0)]).await;
    sim.fault(Fault::Reject {
        stream: "d".into(),
        partition: None,
        status: 503,
        count: Some(2),
        for_ms: None,
    })
    .unwrap();
    let u = url(&sim, "d", "partition=1");
    assert_eq!(
        Stream::open(&u, Auth::Basic(USER, PASS), true).await.status,
        503
    );
    assert_eq!(
        Stream::open(&u, Auth::Basic(USER, PASS), true).await.status,
        503
    );
    assert_eq!(
        Stream::open(&u, Auth::Basic(USER, PASS), true).await.status,
        200
    );
    assert_eq!(sim.fault_counts().get("reject"), Some(&1));
}

/// Drop, stall, heartbeats-only and delay act on the targeted connection only.
#[tokio::test]
async fn connection_faults() {
    let cfg = fast_gnip("d", 200.0);
    let heartbeat_ms = cfg.heartbeat_interval_ms.unwrap();
    let sim = start(vec![cfg]).await;
    let u = url(&sim, "d", "partition=1");
    let a_client = client(Some("127.0.0.2".parse().unwrap()));
    let b_client = client(Some("127.0.0.3".parse().unwrap()));
    let mut a = Stream::open_with(&a_client, &u, Auth::Basic(USER, PASS), true).await;
    let mut b = Stream::open_with(&b_client, &u, Auth::Basic(USER, PASS), true).await;
    let clients: HashSet<String> = sim
        .connections()
        .iter()
        .map(|c| c.client.ip().to_string())
        .collect();
    assert_eq!(
        clients,
        HashSet::from(["127.0.0.2".to_string(), "127.0.0.3".to_string()])
    );
    let on_a = Target {
        client_ip: Some("127.0.0.2".parse().unwrap()),
        ..Target::default()
    };

    // Stall: the simulator writes nothing at all to A (not even heartbeats) while B flows.
    assert_eq!(
        sim.fault(Fault::Stall {
            target: on_a.clone()
        })
        .unwrap(),
        1
    );
    // A's writer is woken by the fault and settles (at most the write it was in) before B
    // delivers an activity published after it; from then on A's byte count must not move
    // while B receives several heartbeat intervals' worth of activities.
    read_until_published(&sim, &mut b, 1, unix_ms_now() + 1).await;
    let stalled = bytes_sent_to(&sim, "127.0.0.2");
    read_until_published(&sim, &mut b, 1, unix_ms_now() + 3 * heartbeat_ms).await;
    assert_eq!(bytes_sent_to(&sim, "127.0.0.2"), stalled, "a stalled write");
    sim.fault(Fault::Resume {
        target: on_a.clone(),
    })
    .unwrap();
    assert_eq!(a.lines(5, WAIT).await.len(), 5);

    // Heartbeats only: heartbeats, and no activity published after the fault.
    sim.fault(Fault::HeartbeatsOnly {
        target: on_a.clone(),
    })
    .unwrap();
    let before: HashSet<ActivityId> = sim.truth("d", 1).unwrap().iter().map(|r| r.id).collect();
    let mut heartbeats = 0;
    while heartbeats < 3 {
        match a.next(WAIT).await {
            Event::Heartbeat => heartbeats += 1,
            Event::Line(l) => assert!(before.contains(&id_of(&l)), "a new activity on A"),
            other => panic!("{other:?}"),
        }
    }
    let published = sim.truth("d", 1).unwrap().len();
    assert!(
        published > before.len(),
        "activities were skipped meanwhile"
    );
    sim.fault(Fault::Resume {
        target: on_a.clone(),
    })
    .unwrap();

    // Delay: A delivers an activity only once it is a second old, so after B does.
    sim.fault(Fault::Delay {
        target: on_a.clone(),
        ms: 1_000,
    })
    .unwrap();
    let marker = Bytes::from_static(b"{\"id_str\":\"424242\",\"text\":\"marker\"}");
    sim.publish("d", 1, vec![marker]).unwrap();
    let published_ms = sim.truth("d", 1).unwrap().last().unwrap().published_ms;
    let copies = copies_of(&mut a, &mut b, ActivityId::Post(424_242)).await;
    match copies[..] {
        [Arrival::B(_), Arrival::A(on_a_ms)] => assert!(
            on_a_ms >= published_ms + 1_000,
            "A delivered it {} ms after publication",
            on_a_ms - published_ms
        ),
        _ => panic!("the delayed copy came first: {copies:?}"),
    }
    sim.fault(Fault::Resume {
        target: on_a.clone(),
    })
    .unwrap();

    // Drop: A's body breaks; B continues.
    sim.fault(Fault::Drop {
        target: on_a.clone(),
    })
    .unwrap();
    within("the broken body", async {
        loop {
            match a.next(WAIT).await {
                Event::Broken(_) => break,
                Event::Line(_) | Event::Heartbeat => {}
                other => panic!("expected a broken body, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(b.lines(5, WAIT).await.len(), 5);
    let counts = sim.fault_counts();
    for kind in ["stall", "resume", "heartbeats_only", "delay", "drop"] {
        assert!(counts.contains_key(kind), "{kind} not counted");
    }
}

/// A throttled connection keeps to its byte rate while its sibling runs at full speed.
#[tokio::test]
async fn throttle_limits_bytes() {
    const BYTES_PER_SEC: u64 = 5_000;
    let sim = start(vec![fast_gnip("d", 500.0)]).await;
    let u = url(&sim, "d", "partition=1");
    let slow_client = client(Some("127.0.0.2".parse().unwrap()));
    let fast_client = client(Some("127.0.0.3".parse().unwrap()));
    let mut slow = Stream::open_with(&slow_client, &u, Auth::Basic(USER, PASS), true).await;
    let mut fast = Stream::open_with(&fast_client, &u, Auth::Basic(USER, PASS), true).await;
    // Read the throttled connection too, so that only the throttle can hold it back.
    let reader = tokio::spawn(async move {
        while let Event::Line(_) | Event::Heartbeat | Event::Quiet = slow.next(WAIT).await {}
    });
    let started = tokio::time::Instant::now();
    sim.fault(Fault::Throttle {
        target: Target {
            client_ip: Some("127.0.0.2".parse().unwrap()),
            ..Target::default()
        },
        bytes_per_sec: BYTES_PER_SEC,
    })
    .unwrap();
    let (slow0, fast0) = (
        bytes_sent_to(&sim, "127.0.0.2"),
        bytes_sent_to(&sim, "127.0.0.3"),
    );
    read_until_published(&sim, &mut fast, 1, unix_ms_now() + 1_000).await;
    let (slow1, fast1) = (
        bytes_sent_to(&sim, "127.0.0.2"),
        bytes_sent_to(&sim, "127.0.0.3"),
    );
    let elapsed = started.elapsed();
    reader.abort();
    let (slow, fast) = (slow1 - slow0, fast1 - fast0);
    assert!(
        slow * 4 < fast,
        "throttled {slow} bytes, its sibling {fast}"
    );
    // The writer sleeps for each write's share before making it, so the bound holds over
    // any span that contains those sleeps; a slow machine only lowers the count.
    let allowed = BYTES_PER_SEC as f64 * elapsed.as_secs_f64();
    assert!(
        slow as f64 <= allowed,
        "{slow} bytes in {elapsed:?} at {BYTES_PER_SEC} bytes/s"
    );
}

/// Each injected corruption reaches the client as designed, and only on its target connection.
#[tokio::test]
async fn injected_corruption() {
    let sim = start(vec![fast_gnip("d", 0.0)]).await;
    let u = url(&sim, "d", "partition=1");
    let mut s = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let inject = |injection| Fault::Inject {
        target: Target::default(),
        injection,
    };
    sim.fault(inject(Injection::MalformedLine)).unwrap();
    let l = s.lines(1, WAIT).await.remove(0);
    assert!(tandem_core::identify(&l).is_ok() && tandem_core::validate(&l).is_err());
    sim.fault(inject(Injection::OversizeLine { bytes: 300_000 }))
        .unwrap();
    let l = s.lines(1, WAIT).await.remove(0);
    assert_eq!(l.len(), 300_000 - 2);
    sim.fault(inject(Injection::InvalidUtf8Line)).unwrap();
    let l = s.lines(1, WAIT).await.remove(0);
    assert_eq!(
        tandem_core::validate(&l).unwrap_err().label(),
        "invalid_utf8"
    );
    sim.fault(inject(Injection::TruncateAndClose)).unwrap();
    assert!(
        matches!(s.next(WAIT).await, Event::Broken(_)),
        "the body breaks after half a line"
    );

    let mut s = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    sim.fault(inject(Injection::BrokenGzip)).unwrap();
    match s.next(WAIT).await {
        Event::Broken(e) => assert!(e.contains("gzip") || e.contains("decod"), "{e}"),
        other => panic!("{other:?}"),
    }

    // Corrupting the next activity hits one connection; the other gets it intact.
    let mut a = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let mut b = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let first = sim.connections().iter().map(|c| c.id).min().unwrap();
    sim.fault(Fault::Inject {
        target: Target {
            connection: Some(first),
            ..Target::default()
        },
        injection: Injection::CorruptNextActivity,
    })
    .unwrap();
    // The writer takes its orders before it reads the log, so the order wins the race.
    sim.publish(
        "d",
        1,
        vec![Bytes::from_static(
            b"{\"id_str\":\"99\",\"text\":\"intact\"}",
        )],
    )
    .unwrap();
    let la = a.lines(1, WAIT).await.remove(0);
    let lb = b.lines(1, WAIT).await.remove(0);
    assert!(tandem_core::validate(&la).is_err());
    assert_eq!(lb, b"{\"id_str\":\"99\",\"text\":\"intact\"}");
}

/// Lines published through the handle arrive verbatim; only activities enter the ground truth.
#[tokio::test]
async fn published_lines_are_verbatim_and_counted() {
    let sim = start(vec![fast_gnip("d", 0.0)]).await;
    let mut s = Stream::open(
        &url(&sim, "d", "partition=2"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let like = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../samples/like.json"
    ))
    .unwrap();
    let like = Bytes::from(like.strip_suffix(b"\r\n").unwrap().to_vec());
    let info = Bytes::from_static(b"{\"info\":{\"message\":\"hello\"}}");
    assert_eq!(
        sim.publish("d", 2, vec![like.clone(), info.clone()])
            .unwrap(),
        1
    );
    let got = s.lines(2, WAIT).await;
    assert_eq!(got, vec![like.to_vec(), info.to_vec()]);
    let truth = sim.truth("d", 2).unwrap();
    assert_eq!(truth.len(), 1);
    assert_eq!(
        truth[0].id,
        ActivityId::Like(0x4356_0406_e0ad_9f68_3744_45f5_f30c_33fc)
    );
}

/// X API v2: Bearer auth, optional gzip, partitions, backfill_minutes, 429 with x-rate-limit-reset.
#[tokio::test]
async fn v2_streams() {
    let mut filtered = StreamConfig::v2("f", "/2/tweets/search/stream", TOKEN, 1);
    filtered.rate = RateProfile::Constant { per_sec: 100.0 };
    filtered.connect_limit = 3;
    let mut sample = StreamConfig::v2("s", "/2/tweets/sample10/stream", TOKEN, 2);
    sample.rate = RateProfile::Constant { per_sec: 100.0 };
    let sim = start(vec![filtered, sample]).await;
    let f = sim.stream_url("f").unwrap();
    assert_eq!(
        Stream::open(&f, Auth::Basic(USER, PASS), false)
            .await
            .status,
        401
    );
    let mut plain = Stream::open(&f, Auth::Bearer(TOKEN), false).await;
    assert_eq!(plain.status, 200);
    assert!(plain.headers.get("content-encoding").is_none());
    let l = plain.lines(1, WAIT).await.remove(0);
    assert!(matches!(id_of(&l), ActivityId::Post(_)));
    assert!(l.starts_with(b"{\"data\":{\"id\":\""));
    let mut gz = Stream::open(&f, Auth::Bearer(TOKEN), true).await;
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert_eq!(gz.lines(3, WAIT).await.len(), 3);
    let limited = Stream::open(&f, Auth::Bearer(TOKEN), false).await;
    assert_eq!(limited.status, 429);
    let reset: u64 = limited.headers["x-rate-limit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset >= unix_ms_now() / 1000 && reset <= unix_ms_now() / 1000 + 61);

    let s = sim.stream_url("s").unwrap();
    assert_eq!(
        Stream::open(&s, Auth::Bearer(TOKEN), true).await.status,
        400
    );
    let mut p2 = Stream::open(
        &format!("{s}?partition=2&backfill_minutes=1"),
        Auth::Bearer(TOKEN),
        true,
    )
    .await;
    assert_eq!(p2.status, 200);
    assert!(!p2.lines(2, WAIT).await.is_empty());
    assert_eq!(
        Stream::open(
            &format!("{s}?partition=1&backfill_minutes=6"),
            Auth::Bearer(TOKEN),
            true
        )
        .await
        .status,
        400
    );
}

/// HTTPS with a generated CA verifies for a client that pins the IP and keeps the host name.
#[tokio::test]
async fn tls_with_generated_ca_and_pinned_ip() {
    support::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let sim = tandem_sim::Simulator::start(tandem_sim::SimConfig {
        tls: Some(tandem_sim::TlsConfig {
            names: vec![
                "gnip-stream.test".into(),
                "stream-data-api.test".into(),
                "127.0.0.1".into(),
            ],
            ca_file: ca.clone(),
        }),
        streams: vec![fast_gnip("d", 100.0)],
        ..tandem_sim::SimConfig::default()
    })
    .await
    .unwrap();
    assert!(sim.base_url().starts_with("https://"));
    let pem = std::fs::read(&ca).unwrap();
    let cert = reqwest::Certificate::from_pem(&pem).unwrap();
    let pinned = reqwest::Client::builder()
        .tls_certs_only([cert.clone()])
        .resolve("gnip-stream.test", sim.addr())
        .build()
        .unwrap();
    let path = url(&sim, "d", "partition=1").replace("127.0.0.1", "gnip-stream.test");
    let mut s = Stream::open_with(&pinned, &path, Auth::Basic(USER, PASS), true).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.lines(3, WAIT).await.len(), 3);
    // Without the CA the handshake fails verification.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .resolve("gnip-stream.test", sim.addr())
        .build()
        .unwrap();
    assert!(untrusting.get(&path).send().await.is_err());
    // A name the certificate does not cover fails too.
    let wrong = reqwest::Client::builder()
        .tls_certs_only([cert])
        .resolve("other.test", sim.addr())
        .build()
        .unwrap();
    assert!(
        wrong
            .get(path.replace("gnip-stream.test", "other.test"))
            .send()
            .await
            .is_err()
    );
    // The recovery host speaks HTTPS with the same CA: a live request is refused there
    // by the simulator (400), which means the handshake and the request went through.
    assert!(sim.recovery_base_url().starts_with("https://"));
    let recovery_client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .resolve("stream-data-api.test", sim.recovery_addr())
        .build()
        .unwrap();
    let recovery =
        recovery_url(&sim, "d", "partition=1").replace("127.0.0.1", "stream-data-api.test");
    let s = Stream::open_with(&recovery_client, &recovery, Auth::Basic(USER, PASS), true).await;
    assert_eq!(s.status, 400, "{}", s.text);
    assert!(s.text.contains("recovery endpoint"), "{}", s.text);
}

/// Corpus mode sends the same pre-encoded, fresh-id activities on every connection of a partition.
#[tokio::test]
async fn corpus_mode() {
    let mut cfg = fast_gnip("c", 0.0);
    cfg.corpus = Some(tandem_sim::CorpusConfig {
        activities_per_partition: 300,
        rate_per_sec: None,
    });
    let sim = start(vec![cfg]).await;
    let u = url(&sim, "c", "partition=2");
    let mut a = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let mut b = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let la: Vec<ActivityId> = a.lines(300, WAIT).await.iter().map(|l| id_of(l)).collect();
    let lb: Vec<ActivityId> = b.lines(300, WAIT).await.iter().map(|l| id_of(l)).collect();
    assert_eq!(la.len(), 300);
    assert_eq!(la, lb);
    assert_eq!(la[0], ActivityId::Post(sim.corpus_id("c", 2, 0).unwrap()));
    assert_eq!(la.iter().collect::<HashSet<_>>().len(), 300);
    assert_eq!(a.next(WAIT).await, Event::Heartbeat);
}

/// At a fixed rate, the corpus goes out a chunk at a time as it falls due: the first chunk
/// at once, the rest (30 s of it at 10 activities/s) not yet.
#[tokio::test]
async fn corpus_mode_at_a_fixed_rate() {
    let mut cfg = fast_gnip("c", 0.0);
    cfg.corpus = Some(tandem_sim::CorpusConfig {
        activities_per_partition: 300,
        rate_per_sec: Some(10.0),
    });
    let sim = start(vec![cfg]).await;
    let u = url(&sim, "c", "partition=1");
    let mut a = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let first = a.lines(1, WAIT).await;
    assert_eq!(first.len(), 1);
    let sent: u64 = sim.connections().iter().map(|c| c.activities_sent).sum();
    assert!(sent > 0 && sent < 300, "sent {sent} of 300 at 10/s");
}

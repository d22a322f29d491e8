//! The simulator against UPSTREAM.md, point by point.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use support::*;
use tandem_core::ActivityId;
use tandem_core::time::{rfc3339_ms, unix_ms_now};
use tandem_sim::{Fault, Injection, RateProfile, StreamConfig, Target};

const SEC: Duration = Duration::from_secs(1);

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
    let lines = s.lines(20, SEC).await;
    assert_eq!(lines.len(), 20);
    for l in &lines {
        tandem_core::validate(l).unwrap();
    }
    sim.set_rate("d", RateProfile::Constant { per_sec: 0.0 })
        .unwrap();
    let mut heartbeats = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        if s.next(SEC).await == Event::Heartbeat {
            heartbeats += 1;
        }
    }
    // 200 ms interval over ~1.5 s, allowing for the lines still in flight at the switch.
    assert!((4..=9).contains(&heartbeats), "{heartbeats} heartbeats");
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
    tokio::time::sleep(Duration::from_millis(600)).await;
    sim.set_rate("d", RateProfile::Constant { per_sec: 0.0 })
        .unwrap();
    let a: HashSet<ActivityId> = p1
        .lines(usize::MAX, Duration::from_millis(500))
        .await
        .iter()
        .map(|l| id_of(l))
        .collect();
    let b: HashSet<ActivityId> = p2
        .lines(usize::MAX, Duration::from_millis(500))
        .await
        .iter()
        .map(|l| id_of(l))
        .collect();
    assert!(a.len() > 20 && b.len() > 20, "{} {}", a.len(), b.len());
    assert!(a.is_disjoint(&b));
    let truth1: HashSet<ActivityId> = sim.truth("d", 1).unwrap().iter().map(|r| r.id).collect();
    let truth2: HashSet<ActivityId> = sim.truth("d", 2).unwrap().iter().map(|r| r.id).collect();
    // Connections opened before the first publish see everything their partition got.
    assert_eq!(a, truth1);
    assert_eq!(b, truth2);
}

/// backfillMinutes=M replays the last M minutes, oldest first, then continues live; the
/// service does not deduplicate against what the client already had.
#[tokio::test]
async fn backfill_replays_the_window_oldest_first() {
    let sim = start(vec![fast_gnip("d", 0.0)]).await; // minute_ms = 1000
    let post = |id: u64| Bytes::from(format!("{{\"id_str\":\"{id}\",\"text\":\"t\"}}"));
    sim.publish("d", 1, vec![post(1), post(2)]).unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    sim.publish("d", 1, vec![post(3), post(4)]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One minute (1 s here) reaches back to 3 and 4 only.
    let mut s = Stream::open(
        &url(&sim, "d", "partition=1&backfillMinutes=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let got: Vec<ActivityId> = s.lines(2, SEC).await.iter().map(|l| id_of(l)).collect();
    assert_eq!(got, vec![ActivityId::Post(3), ActivityId::Post(4)]);
    sim.publish("d", 1, vec![post(5)]).unwrap();
    assert_eq!(id_of(&s.lines(1, SEC).await[0]), ActivityId::Post(5));
    // Two minutes reach back to 1.
    let mut s = Stream::open(
        &url(&sim, "d", "partition=1&backfillMinutes=2"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let got: Vec<ActivityId> = s.lines(5, SEC).await.iter().map(|l| id_of(l)).collect();
    assert_eq!(got, (1..=5).map(ActivityId::Post).collect::<Vec<_>>());
}

/// Recovery streams the range oldest first, ends with the completion message and closes;
/// a third concurrent job is refused with 429.
#[tokio::test]
async fn recovery_completes_and_limits_jobs() {
    let sim = start(vec![fast_gnip("d", 300.0)]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let truth = sim.truth("d", 2).unwrap();
    let start_ms = truth[truth.len() / 4].created_ms;
    let end_ms = truth[3 * truth.len() / 4].created_ms;
    let q = format!(
        "partition=2&startTime={}&endTime={}",
        rfc3339_ms(start_ms),
        rfc3339_ms(end_ms)
    );
    let mut s = Stream::open(&url(&sim, "d", &q), Auth::Basic(USER, PASS), true).await;
    assert_eq!(s.status, 200);
    let mut got = Vec::new();
    let info = loop {
        match s.next(Duration::from_secs(3)).await {
            Event::Line(l) => match tandem_core::identify(&l).unwrap() {
                tandem_core::LineKind::Activity(id) => got.push(id),
                tandem_core::LineKind::System(m) => break m,
            },
            Event::Heartbeat => {}
            other => panic!("recovery ended without its message: {other:?}"),
        }
    };
    assert_eq!(info.message, "Recovery Request Completed");
    assert_eq!(s.next(SEC).await, Event::End);
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
        rfc3339_ms(unix_ms_now() + 5_000)
    );
    let j1 = Stream::open(&url(&sim, "d", &future), Auth::Basic(USER, PASS), true).await;
    let j2 = Stream::open(&url(&sim, "d", &future), Auth::Basic(USER, PASS), true).await;
    let j3 = Stream::open(&url(&sim, "d", &future), Auth::Basic(USER, PASS), true).await;
    assert_eq!((j1.status, j2.status, j3.status), (200, 200, 429));
    assert!(j3.text.contains("recovery"), "{}", j3.text);
    drop((j1, j2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let j4 = Stream::open(&url(&sim, "d", &future), Auth::Basic(USER, PASS), true).await;
    assert_eq!(j4.status, 200, "a finished job frees its slot");
    // Bad ranges.
    for q in [
        "partition=1&startTime=yesterday&endTime=today",
        "partition=1&startTime=2020-01-01T00:00:00Z&endTime=2020-01-01T01:00:00Z",
    ] {
        let s = Stream::open(&url(&sim, "d", q), Auth::Basic(USER, PASS), true).await;
        assert_eq!(s.status, 400, "{q}: {}", s.text);
    }
}

/// Over the per-partition connection limit, the oldest connection gets the error line and
/// is closed; the others keep streaming.
#[tokio::test]
async fn connection_limit_evicts_the_oldest() {
    let sim = start(vec![fast_gnip("d", 100.0)]).await;
    let u = url(&sim, "d", "partition=1");
    let mut first = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let mut second = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    assert_eq!(first.lines(2, SEC).await.len(), 2);
    let mut third = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let error = loop {
        match first.next(Duration::from_secs(2)).await {
            Event::Line(l) if l.starts_with(b"{\"error\"") => break String::from_utf8(l).unwrap(),
            Event::Line(_) | Event::Heartbeat => {}
            other => panic!("no error line before {other:?}"),
        }
    };
    assert!(error.contains("maximum number of connections"), "{error}");
    assert_eq!(first.next(SEC).await, Event::End);
    assert_eq!(second.lines(3, SEC).await.len(), 3);
    assert_eq!(third.lines(3, SEC).await.len(), 3);
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

/// Drop, stall, heartbeats-only, delay and throttle act on the targeted connection only.
#[tokio::test]
async fn connection_faults() {
    let sim = start(vec![fast_gnip("d", 200.0)]).await;
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

    // Stall: nothing at all on A (not even heartbeats) while B flows.
    assert_eq!(
        sim.fault(Fault::Stall {
            target: on_a.clone()
        })
        .unwrap(),
        1
    );
    let _ = a.drain(Duration::from_millis(100)).await; // what was in flight
    assert_eq!(a.next(Duration::from_millis(600)).await, Event::Quiet);
    assert!(b.lines(10, SEC).await.len() == 10);
    sim.fault(Fault::Resume {
        target: on_a.clone(),
    })
    .unwrap();
    assert_eq!(a.lines(5, SEC).await.len(), 5);

    // Heartbeats only: heartbeats, no lines.
    sim.fault(Fault::HeartbeatsOnly {
        target: on_a.clone(),
    })
    .unwrap();
    let _ = a.drain(Duration::from_millis(100)).await;
    let mut saw = (0, 0);
    for _ in 0..3 {
        match a.next(SEC).await {
            Event::Heartbeat => saw.0 += 1,
            Event::Line(_) => saw.1 += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(saw, (3, 0));
    sim.fault(Fault::Resume {
        target: on_a.clone(),
    })
    .unwrap();

    // Delay: A delivers an activity ~400 ms after B does.
    sim.fault(Fault::Delay {
        target: on_a.clone(),
        ms: 400,
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = a.drain(Duration::from_millis(50)).await;
    let _ = b.drain(Duration::from_millis(50)).await;
    let first_b = id_of(&b.lines(1, SEC).await[0]);
    let t0 = tokio::time::Instant::now();
    loop {
        let l = a.lines(1, SEC).await;
        if id_of(&l[0]) == first_b {
            break;
        }
    }
    let lag = t0.elapsed();
    assert!(
        lag >= Duration::from_millis(250) && lag < Duration::from_millis(900),
        "lag {lag:?}"
    );
    sim.fault(Fault::Resume {
        target: on_a.clone(),
    })
    .unwrap();

    // Drop: A's body breaks; B continues.
    sim.fault(Fault::Drop {
        target: on_a.clone(),
    })
    .unwrap();
    loop {
        match a.next(SEC).await {
            Event::Broken(_) => break,
            Event::Line(_) | Event::Heartbeat => {}
            other => panic!("expected a broken body, got {other:?}"),
        }
    }
    assert_eq!(b.lines(5, SEC).await.len(), 5);
    let counts = sim.fault_counts();
    for kind in ["stall", "resume", "heartbeats_only", "delay", "drop"] {
        assert!(counts.contains_key(kind), "{kind} not counted");
    }
}

/// Throttling slows one connection to the configured byte rate.
#[tokio::test]
async fn throttle_limits_bytes() {
    let sim = start(vec![fast_gnip("d", 500.0)]).await;
    let mut s = Stream::open(
        &url(&sim, "d", "partition=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    sim.fault(Fault::Throttle {
        target: Target::default(),
        bytes_per_sec: 20_000,
    })
    .unwrap();
    let _ = s.drain(Duration::from_millis(100)).await;
    let before = sim.connections()[0].bytes_sent;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = sim.connections()[0].bytes_sent - before;
    assert!(
        sent < 60_000,
        "{sent} bytes in 1 s under a 20 kB/s throttle"
    );
    drop(s);
}

/// Corrupt output: malformed, oversize and invalid UTF-8 lines arrive as lines; a truncated
/// line ends the body mid-line; a broken gzip stream does not inflate.
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
    let l = s.lines(1, SEC).await.remove(0);
    assert!(tandem_core::identify(&l).is_ok() && tandem_core::validate(&l).is_err());
    sim.fault(inject(Injection::OversizeLine { bytes: 300_000 }))
        .unwrap();
    let l = s.lines(1, SEC).await.remove(0);
    assert_eq!(l.len(), 300_000 - 2);
    sim.fault(inject(Injection::InvalidUtf8Line)).unwrap();
    let l = s.lines(1, SEC).await.remove(0);
    assert_eq!(
        tandem_core::validate(&l).unwrap_err().label(),
        "invalid_utf8"
    );
    sim.fault(inject(Injection::TruncateAndClose)).unwrap();
    assert!(
        matches!(s.next(SEC).await, Event::Broken(_)),
        "the body breaks after half a line"
    );

    let mut s = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    sim.fault(inject(Injection::BrokenGzip)).unwrap();
    match s.next(SEC).await {
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
    tokio::time::sleep(Duration::from_millis(100)).await;
    sim.publish(
        "d",
        1,
        vec![Bytes::from_static(
            b"{\"id_str\":\"99\",\"text\":\"intact\"}",
        )],
    )
    .unwrap();
    let la = a.lines(1, SEC).await.remove(0);
    let lb = b.lines(1, SEC).await.remove(0);
    assert!(tandem_core::validate(&la).is_err());
    assert_eq!(lb, b"{\"id_str\":\"99\",\"text\":\"intact\"}");
}

/// Exact payloads published through the handle arrive verbatim and enter the ground truth;
/// system messages do not.
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
    let got = s.lines(2, SEC).await;
    assert_eq!(got, vec![like.to_vec(), info.to_vec()]);
    let truth = sim.truth("d", 2).unwrap();
    assert_eq!(truth.len(), 1);
    assert_eq!(
        truth[0].id,
        ActivityId::Like(0x4356_0406_e0ad_9f68_3744_45f5_f30c_33fc)
    );
}

/// X API v2: Bearer auth, gzip optional, partitions, backfill_minutes and 429 with
/// `x-rate-limit-reset`.
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
    let l = plain.lines(1, SEC).await.remove(0);
    assert!(matches!(id_of(&l), ActivityId::Post(_)));
    assert!(l.starts_with(b"{\"data\":{\"id\":\""));
    let mut gz = Stream::open(&f, Auth::Bearer(TOKEN), true).await;
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert_eq!(gz.lines(3, SEC).await.len(), 3);
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
    assert!(!p2.lines(2, SEC).await.is_empty());
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

/// HTTPS with a generated CA, including a client that pins the IP and keeps the host name
/// for SNI and verification.
#[tokio::test]
async fn tls_with_generated_ca_and_pinned_ip() {
    support::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let sim = tandem_sim::Simulator::start(tandem_sim::SimConfig {
        tls: Some(tandem_sim::TlsConfig {
            names: vec!["gnip-stream.test".into(), "127.0.0.1".into()],
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
    assert_eq!(s.lines(3, SEC).await.len(), 3);
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
}

/// Corpus mode streams a fixed number of pre-encoded activities per partition, the same on
/// every connection of a partition, with fresh ids.
#[tokio::test]
async fn corpus_mode() {
    let mut cfg = fast_gnip("c", 0.0);
    cfg.corpus = Some(tandem_sim::CorpusConfig {
        activities_per_partition: 300,
    });
    let sim = start(vec![cfg]).await;
    let u = url(&sim, "c", "partition=2");
    let mut a = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let mut b = Stream::open(&u, Auth::Basic(USER, PASS), true).await;
    let la: Vec<ActivityId> = a.lines(300, SEC).await.iter().map(|l| id_of(l)).collect();
    let lb: Vec<ActivityId> = b.lines(300, SEC).await.iter().map(|l| id_of(l)).collect();
    assert_eq!(la.len(), 300);
    assert_eq!(la, lb);
    assert_eq!(la[0], ActivityId::Post(sim.corpus_id("c", 2, 0).unwrap()));
    assert_eq!(la.iter().collect::<HashSet<_>>().len(), 300);
    assert_eq!(a.next(Duration::from_millis(500)).await, Event::Heartbeat);
}

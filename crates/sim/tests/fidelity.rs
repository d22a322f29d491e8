//! The simulator against the source documents where `UPSTREAM.md` was corrected (issue 18):
//! Gnip recovery on its own host, X API v2 as its documents say (recovery by close, error
//! objects in-stream, partitioned volume streams, the client's own query parameters), and
//! credentials rotated at runtime.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;
use tandem_core::time::unix_ms_now;
use tandem_core::{ActivityId, LineKind, identify};
use tandem_sim::{Fault, RateProfile, Simulator, StreamConfig, Target, TruthRecord};

/// How long to wait for something that must happen; no test judges a duration against it.
const WAIT: Duration = Duration::from_secs(10);

/// The v2 error object a connection evicted over the partition's connection limit ends with.
const V2_TOO_MANY_CONNECTIONS: &str = r#"{"errors":[{"title":"ConnectionException","detail":"This stream is currently at the maximum allowed connection limit.","connection_issue":"TooManyConnections","type":"https://api.twitter.com/2/problems/streaming-connection"}]}"#;
/// The v2 operational-disconnect object.
const V2_OPERATIONAL: &str = r#"{"errors":[{"title":"operational-disconnect","disconnect_type":"OperationalDisconnect","detail":"This stream has been disconnected for operational reasons.","type":"https://api.twitter.com/2/problems/operational-disconnect"}]}"#;
/// Gnip's operational-disconnect line.
const GNIP_OPERATIONAL: &str =
    r#"{"error":{"message":"This stream has been disconnected for operational reasons."}}"#;

fn fast_v2(stream: StreamConfig, per_sec: f64) -> StreamConfig {
    StreamConfig {
        rate: RateProfile::Constant { per_sec },
        heartbeat_interval_ms: Some(200),
        minute_ms: 1_000,
        info_every: 0,
        ..stream
    }
}

/// Waits until the partition's ground truth holds at least `n` activities.
async fn truth_of_at_least(
    sim: &Simulator,
    stream: &str,
    partition: u32,
    n: usize,
) -> Vec<TruthRecord> {
    tokio::time::timeout(3 * WAIT, async {
        loop {
            let truth = sim.truth(stream, partition).unwrap();
            if truth.len() >= n {
                return truth;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the generator publishes")
}

/// Reads to the end of the body: the activities, the system messages, in order, and how it
/// ended (`Event::End` for a clean end).
async fn read_to_end(s: &mut Stream) -> (Vec<ActivityId>, Vec<String>, Event) {
    let (mut activities, mut system) = (Vec::new(), Vec::new());
    let end = tokio::time::timeout(3 * WAIT, async {
        loop {
            match s.next(WAIT).await {
                Event::Line(l) => match identify(&l) {
                    Ok(LineKind::Activity(id)) => activities.push(id),
                    _ => system.push(String::from_utf8(l).unwrap()),
                },
                Event::Heartbeat => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the body ends");
    (activities, system, end)
}

/// The ids created in `[start_ms, end_ms)`.
fn created_between(truth: &[TruthRecord], start_ms: u64, end_ms: u64) -> HashSet<ActivityId> {
    truth
        .iter()
        .filter(|r| r.created_ms >= start_ms && r.created_ms < end_ms)
        .map(|r| r.id)
        .collect()
}

/// Gnip recovery is served on the recovery host only: the live endpoint refuses a range,
/// the recovery host refuses a request without one (and serves neither v2 nor the admin
/// API), and a range there streams oldest first and ends with the completion line.
#[tokio::test]
async fn gnip_recovery_is_served_only_on_the_recovery_host() {
    let sim = start(vec![
        fast_gnip("d", 300.0),
        fast_v2(StreamConfig::v2_filtered("f", TOKEN), 10.0),
    ])
    .await;
    assert_ne!(sim.recovery_addr(), sim.addr());
    let recovery = sim.recovery_url("d").unwrap();
    assert_eq!(
        recovery,
        format!(
            "{}/stream/sample10/accounts/acme/publishers/twitter/prod.json",
            sim.recovery_base_url()
        )
    );
    assert_eq!(sim.recovery_url("f").unwrap(), sim.stream_url("f").unwrap());

    let truth = truth_of_at_least(&sim, "d", 1, 40).await;
    let (start_ms, end_ms) = (
        truth[truth.len() / 4].created_ms,
        truth[3 * truth.len() / 4].created_ms,
    );
    let range = format!("partition=1&{}", range_query(false, start_ms, end_ms));

    // The live endpoint: a range is refused, pointing at the recovery endpoint.
    let s = Stream::open(&url(&sim, "d", &range), Auth::Basic(USER, PASS), true).await;
    assert_eq!(s.status, 400, "{}", s.text);
    assert!(s.text.contains("recovery endpoint"), "{}", s.text);
    for half in [
        "startTime=2030-01-01T00:00:00Z",
        "endTime=2030-01-01T00:00:00Z",
    ] {
        let s = Stream::open(
            &url(&sim, "d", &format!("partition=1&{half}")),
            Auth::Basic(USER, PASS),
            true,
        )
        .await;
        assert_eq!(s.status, 400, "{half}: {}", s.text);
        assert!(s.text.contains("recovery endpoint"), "{}", s.text);
    }

    // The recovery host: no range, no stream; nothing but Gnip streams.
    let s = Stream::open(
        &recovery_url(&sim, "d", "partition=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    assert_eq!(s.status, 400, "{}", s.text);
    assert!(s.text.contains("startTime"), "{}", s.text);
    let v2_on_recovery_host = format!("{}/2/tweets/search/stream", sim.recovery_base_url());
    assert_eq!(
        Stream::open(&v2_on_recovery_host, Auth::Bearer(TOKEN), false)
            .await
            .status,
        404
    );
    let http = client(None);
    for path in ["/admin/stats", "/admin/connections"] {
        let status = http
            .get(format!("{}{path}", sim.recovery_base_url()))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "{path} on the recovery host");
    }
    let status = http
        .get(format!("{}/admin/stats", sim.base_url()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "the admin API stays on the live host");

    // A recovery request on the recovery host.
    let mut s = Stream::open(
        &recovery_url(&sim, "d", &range),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.text);
    let (got, system, end) = read_to_end(&mut s).await;
    assert_eq!(end, Event::End);
    assert_eq!(system.len(), 1, "{system:?}");
    let info: serde_json::Value = serde_json::from_str(&system[0]).unwrap();
    assert_eq!(info["info"]["message"], "Recovery Request Completed");
    assert_eq!(info["info"]["activity_count"], got.len());
    let expect = created_between(&truth, start_ms, end_ms);
    assert!(!expect.is_empty());
    assert_eq!(got.len(), expect.len());
    assert_eq!(got.iter().copied().collect::<HashSet<_>>(), expect);
    let times: Vec<u64> = got.iter().map(|id| id.created_unix_ms().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    let stats = sim.stats("d").unwrap();
    assert_eq!(stats.recovery_jobs, 1);
}

/// X API v2 recovery stays on the live endpoint and ends by a clean close after the range,
/// with no Gnip completion line (plain and gzip bodies alike).
#[tokio::test]
async fn v2_recovery_ends_by_close_without_a_completion_line() {
    let sim = start(vec![fast_v2(StreamConfig::v2_sample10("s", TOKEN), 300.0)]).await;
    let truth = truth_of_at_least(&sim, "s", 2, 40).await;
    let (start_ms, end_ms) = (
        truth[truth.len() / 4].created_ms,
        truth[3 * truth.len() / 4].created_ms,
    );
    let expect = created_between(&truth, start_ms, end_ms);
    assert!(!expect.is_empty());
    let query = format!(
        "partition=2&{}&tweet.fields=created_at",
        range_query(true, start_ms, end_ms)
    );
    for gzip in [false, true] {
        let mut s = Stream::open(&recovery_url(&sim, "s", &query), Auth::Bearer(TOKEN), gzip).await;
        assert_eq!(s.status, 200, "{}", s.text);
        let (got, system, end) = read_to_end(&mut s).await;
        assert_eq!(end, Event::End, "gzip {gzip}: a clean end of the body");
        assert!(system.is_empty(), "gzip {gzip}: {system:?}");
        assert_eq!(got.len(), expect.len());
        assert_eq!(got.into_iter().collect::<HashSet<_>>(), expect);
    }
    assert_eq!(sim.stats("s").unwrap().recovery_jobs, 2);
}

/// A v2 connection evicted because a newer one exceeded the partition's connection limit
/// ends with the v2 error object, then a clean end; its siblings keep flowing.
#[tokio::test]
async fn v2_eviction_is_a_v2_error_object() {
    let sim = start(vec![fast_v2(StreamConfig::v2_filtered("f", TOKEN), 100.0)]).await;
    let u = sim.stream_url("f").unwrap();
    let mut first = Stream::open(&u, Auth::Bearer(TOKEN), true).await;
    let mut second = Stream::open(&u, Auth::Bearer(TOKEN), false).await;
    assert_eq!(first.lines(2, WAIT).await.len(), 2);
    let mut third = Stream::open(&u, Auth::Bearer(TOKEN), false).await;
    let (_, system, end) = read_to_end(&mut first).await;
    assert_eq!(system, vec![V2_TOO_MANY_CONNECTIONS.to_owned()]);
    assert_eq!(end, Event::End);
    assert_eq!(second.lines(3, WAIT).await.len(), 3);
    assert_eq!(third.lines(3, WAIT).await.len(), 3);
    let stats = sim.stats("f").unwrap();
    assert_eq!(stats.evictions, 1);
    assert_eq!(stats.live_connections, vec![2]);
}

/// The operational-disconnect fault ends the targeted connections cleanly with the API's
/// message (v2 error object, Gnip error line), and is counted; others keep flowing.
#[tokio::test]
async fn operational_disconnect_fault() {
    let sim = start(vec![
        fast_v2(StreamConfig::v2_filtered("f", TOKEN), 100.0),
        fast_gnip("d", 100.0),
    ])
    .await;
    let mut v2 = Stream::open(&sim.stream_url("f").unwrap(), Auth::Bearer(TOKEN), true).await;
    let mut gnip1 = Stream::open(
        &url(&sim, "d", "partition=1"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    let mut gnip2 = Stream::open(
        &url(&sim, "d", "partition=2"),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    for s in [&mut v2, &mut gnip1, &mut gnip2] {
        assert_eq!(s.status, 200);
    }
    let on = |stream: &str, partition| Fault::OperationalDisconnect {
        target: Target {
            stream: Some(stream.to_owned()),
            partition,
            ..Target::default()
        },
    };
    assert_eq!(sim.fault(on("f", None)).unwrap(), 1);
    let (_, system, end) = read_to_end(&mut v2).await;
    assert_eq!(system, vec![V2_OPERATIONAL.to_owned()]);
    assert_eq!(end, Event::End);

    assert_eq!(sim.fault(on("d", Some(1))).unwrap(), 1);
    let (_, system, end) = read_to_end(&mut gnip1).await;
    assert_eq!(system, vec![GNIP_OPERATIONAL.to_owned()]);
    assert_eq!(end, Event::End);
    assert_eq!(gnip2.lines(3, WAIT).await.len(), 3, "partition 2 untouched");
    assert_eq!(sim.fault_counts().get("operational_disconnect"), Some(&2));
}

/// A rotated secret takes effect for new requests at once: the old one gets 401, the new
/// one 200, through the handle (Gnip password) and the admin API (v2 bearer token); a
/// connection opened before keeps flowing.
#[tokio::test]
async fn credentials_rotate_at_runtime() {
    let sim = start(vec![
        fast_gnip("d", 100.0),
        fast_v2(StreamConfig::v2_filtered("f", TOKEN), 100.0),
    ])
    .await;
    let gnip = url(&sim, "d", "partition=1");
    let mut before = Stream::open(&gnip, Auth::Basic(USER, PASS), true).await;
    assert_eq!(before.status, 200);
    sim.set_credentials("d", "rotated").unwrap();
    assert_eq!(
        Stream::open(&gnip, Auth::Basic(USER, PASS), true)
            .await
            .status,
        401
    );
    assert_eq!(
        Stream::open(&gnip, Auth::Basic(USER, "rotated"), true)
            .await
            .status,
        200
    );
    assert_eq!(before.lines(3, WAIT).await.len(), 3);
    // Recovery on the recovery host takes the same credentials.
    let range = format!(
        "partition=1&{}",
        range_query(false, unix_ms_now() - 1_000, unix_ms_now() - 500)
    );
    assert_eq!(
        Stream::open(
            &recovery_url(&sim, "d", &range),
            Auth::Basic(USER, PASS),
            true
        )
        .await
        .status,
        401
    );
    assert!(sim.set_credentials("nope", "x").is_err());

    let admin = client(None);
    let rotate = |body: &'static str| {
        admin
            .post(format!("{}/admin/credentials", sim.base_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = rotate(r#"{"stream":"f","secret":"new-token"}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v2 = sim.stream_url("f").unwrap();
    assert_eq!(
        Stream::open(&v2, Auth::Bearer(TOKEN), false).await.status,
        401
    );
    let mut after = Stream::open(&v2, Auth::Bearer("new-token"), false).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.lines(3, WAIT).await.len(), 3);
    let resp = rotate(r#"{"stream":"nope","secret":"x"}"#).await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = rotate(r#"{"stream":"f"}"#).await.unwrap();
    assert_eq!(resp.status(), 400);
}

/// A URL with the client's own query parameters works with partition and backfill on v2
/// and with a range on the Gnip recovery host; a second `?` is refused with 400 naming the
/// parameter it hides, on both hosts.
#[tokio::test]
async fn client_query_parameters() {
    let sim = start(vec![
        fast_v2(StreamConfig::v2_sample10("s", TOKEN), 200.0),
        fast_v2(StreamConfig::v2_filtered("f", TOKEN), 100.0),
        fast_gnip("d", 200.0),
    ])
    .await;
    let own = "tweet.fields=created_at&expansions=author_id";
    let mut s = Stream::open(
        &url(&sim, "s", &format!("{own}&partition=2&backfill_minutes=1")),
        Auth::Bearer(TOKEN),
        true,
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.text);
    let lines = s.lines(3, WAIT).await;
    assert_eq!(lines.len(), 3);
    let partition2: HashSet<ActivityId> = sim.truth("s", 2).unwrap().iter().map(|r| r.id).collect();
    for l in &lines {
        assert!(partition2.contains(&id_of(l)), "not a partition 2 activity");
    }
    let mut f = Stream::open(&url(&sim, "f", own), Auth::Bearer(TOKEN), false).await;
    assert_eq!(f.status, 200, "{}", f.text);
    assert_eq!(f.lines(2, WAIT).await.len(), 2);

    let truth = truth_of_at_least(&sim, "d", 1, 10).await;
    let (start_ms, end_ms) = (truth[0].created_ms, truth[truth.len() - 1].created_ms);
    let mut r = Stream::open(
        &recovery_url(
            &sim,
            "d",
            &format!(
                "client=tandem&partition=1&{}",
                range_query(false, start_ms, end_ms)
            ),
        ),
        Auth::Basic(USER, PASS),
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (got, _, end) = read_to_end(&mut r).await;
    assert_eq!(end, Event::End);
    assert_eq!(
        got.into_iter().collect::<HashSet<_>>(),
        created_between(&truth, start_ms, end_ms)
    );

    let malformed = [
        (
            url(&sim, "s", "tweet.fields=created_at?partition=1"),
            Auth::Bearer(TOKEN),
            "partition",
        ),
        (
            url(&sim, "f", "tweet.fields=created_at?backfill_minutes=2"),
            Auth::Bearer(TOKEN),
            "backfill_minutes",
        ),
        (
            url(&sim, "d", "a=1?partition=1"),
            Auth::Basic(USER, PASS),
            "partition",
        ),
        (
            recovery_url(
                &sim,
                "d",
                &format!("a=1?partition=1&{}", range_query(false, start_ms, end_ms)),
            ),
            Auth::Basic(USER, PASS),
            "partition",
        ),
    ];
    for (u, auth, named) in malformed {
        let s = Stream::open(&u, auth, true).await;
        assert_eq!(s.status, 400, "{u}: {}", s.text);
        assert!(
            s.text.contains(&format!("\\\"{named}\\\"")),
            "{u}: {}",
            s.text
        );
    }
}

/// The partitioned v2 volume streams serve partition=1..N (Decahose 2, Firehose 20) and
/// refuse N+1 and a missing partition; the filtered stream takes none.
#[tokio::test]
async fn partitioned_v2_constructors() {
    let mut firehose = fast_v2(StreamConfig::v2_firehose("h", TOKEN), 0.0);
    // 21 connection requests in a row: more than the default connect budget.
    firehose.connect_limit = 100;
    let sim = start(vec![
        fast_v2(StreamConfig::v2_sample10("s", TOKEN), 0.0),
        firehose,
        fast_v2(StreamConfig::v2_filtered("f", TOKEN), 0.0),
    ])
    .await;
    assert!(
        sim.stream_url("s")
            .unwrap()
            .ends_with("/2/tweets/sample10/stream")
    );
    assert!(
        sim.stream_url("h")
            .unwrap()
            .ends_with("/2/tweets/firehose/stream")
    );
    assert!(
        sim.stream_url("f")
            .unwrap()
            .ends_with("/2/tweets/search/stream")
    );
    for (stream, n) in [("s", 2u32), ("h", 20)] {
        let mut open = Vec::new();
        for p in 1..=n {
            let s = Stream::open(
                &url(&sim, stream, &format!("partition={p}")),
                Auth::Bearer(TOKEN),
                true,
            )
            .await;
            assert_eq!(s.status, 200, "{stream} partition {p}: {}", s.text);
            open.push(s);
        }
        assert_eq!(
            sim.stats(stream).unwrap().live_connections,
            vec![1; n as usize]
        );
        for q in [
            format!("partition={}", n + 1),
            "partition=0".to_owned(),
            String::new(),
        ] {
            let s = Stream::open(&url(&sim, stream, &q), Auth::Bearer(TOKEN), true).await;
            assert_eq!(s.status, 400, "{stream} {q:?}: {}", s.text);
            assert!(s.text.contains("partition"), "{}", s.text);
        }
    }
    let f = Stream::open(&sim.stream_url("f").unwrap(), Auth::Bearer(TOKEN), false).await;
    assert_eq!(f.status, 200, "{}", f.text);
    assert_eq!(sim.stats("f").unwrap().live_connections, vec![1]);
}

//! The Kafka sink against a real Kafka-protocol broker (`tansu`, installed by
//! `scripts/setup-test-deps`, started here on a loopback port with its own store): every
//! record keyed by its activity id with tandem's headers, an oversize line dead-lettered
//! whole, and a single consumer with two paths through a 30 s broker outage, judged
//! against the simulator's ground truth: published = stored once.

use std::time::Duration;

use tandem_e2e::{harness, judge};
use tandem_scenario::harness::KAFKA_TOPIC;
use tandem_scenario::kafka::{KafkaBroker, topic_records};
use tandem_sim::{Fault, Injection, Target};

const SETTLE: Duration = Duration::from_secs(60);

fn broker(dir: &std::path::Path) -> KafkaBroker {
    KafkaBroker::start(&dir.join("kafka"))
        .expect("the tansu broker (scripts/setup-test-deps installs it)")
}

/// Every record: its key is the id the line itself carries, and the headers name the
/// stream, the partition, the path and the receipt time.
async fn assert_keyed_by_id(bootstrap: &str) -> usize {
    let b = bootstrap.to_owned();
    let records = tokio::task::spawn_blocking(move || topic_records(&b, KAFKA_TOPIC))
        .await
        .unwrap()
        .expect("the topic can be read");
    for r in &records {
        let tandem_core::LineKind::Activity(id) =
            tandem_core::identify(&r.value).expect("a stored line identifies")
        else {
            panic!("a stored line that is not an activity");
        };
        assert_eq!(
            r.key.as_deref(),
            Some(id.to_string().as_str()),
            "key = activity id"
        );
        assert_eq!(r.headers["tandem-stream"], "decahose");
        assert!(["1", "2"].contains(&r.headers["tandem-partition"].as_str()));
        assert!(
            ["0", "1"].contains(&r.headers["tandem-path"].as_str()),
            "{:?}",
            r.headers
        );
        let received: u64 = r.headers["tandem-received-ms"].parse().unwrap();
        assert!(received > 1_700_000_000_000, "receipt time in Unix ms");
    }
    records.len()
}

/// A single consumer with two paths; the broker is stopped for 30 s in the middle: the
/// sink reports down and spools, then delivers everything once when the broker is back.
/// Before the outage, a line over the record limit is dead-lettered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_stopped_30s_single_consumer_two_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut kafka = broker(dir.path());
    let bootstrap = kafka.bootstrap();
    let (h, _run) = harness(|c| {
        c.kafka_bootstrap = Some(bootstrap.clone());
        c.kafka_extra = "max_message_bytes = 262144".to_owned();
        c.max_memory_activities = 300;
    })
    .await;
    assert!(
        h.wait(Duration::from_secs(30), |s| s.sinks.iter().any(|k| k.up))
            .await,
        "the Kafka sink came up"
    );
    h.sim
        .fault(Fault::Inject {
            target: Target {
                stream: Some(h.cfg.stream.clone()),
                partition: Some(1),
                client_ip: h.cfg.paths[0],
                connection: None,
            },
            injection: Injection::OversizeLine { bytes: 400_000 },
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.stop();
    assert!(
        h.wait(Duration::from_secs(30), |s| s.sinks.iter().any(|k| !k.up))
            .await,
        "the sink reports down while the broker is stopped"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    kafka.restart().expect("the broker starts again");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let letters = std::fs::read_to_string(h.cfg.run_dir.join("dead-letters/dead-letters.ndjson"))
        .unwrap_or_default();
    let v = h.finish(SETTLE).await;
    judge("kafka broker stopped 30s", &v, None, None);
    let oversize: Vec<serde_json::Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["reason"] == "oversize")
        .collect();
    assert_eq!(
        oversize.len(),
        1,
        "the oversize line dead-lettered once: {letters}"
    );
    assert!(
        oversize[0]["line"].as_str().unwrap().len() >= 399_000,
        "whole"
    );
    let records = assert_keyed_by_id(&bootstrap).await;
    assert_eq!(records, v.published, "one record per published activity");
}

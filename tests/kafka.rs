//! The Kafka sink against a real Kafka-protocol broker (`tansu`, installed by
//! `scripts/setup-test-deps`, started here on a loopback port with its own store): every
//! record keyed by its activity id with tandem's headers, an oversize line dead-lettered
//! whole, and a single consumer with two paths through a 30 s broker outage, judged
//! against the simulator's ground truth: published = stored once. Then SASL/SCRAM-SHA-512
//! over TLS: stored once with the right password, refused with a wrong one. And the
//! store alone: records awaiting their delivery report stay within the byte window.

use std::time::Duration;

use tandem_e2e::{harness, judge};
use tandem_scenario::Harness;
use tandem_scenario::harness::{KAFKA_TOPIC, compare};
use tandem_scenario::kafka::{
    KafkaBroker, Scram, TestCertificates, generate_certificates, sasl_ssl_settings,
    stored_ids_with, topic_records, topic_records_with,
};
use tandem_sim::{Fault, Injection, RateProfile, Target};

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

/// The SCRAM user the secured broker knows.
const USER: &str = "tandem";
const PASSWORD: &str = "correct horse battery staple";
const WRONG_PASSWORD: &str = "correct horse battery stapler";

/// A broker that takes SASL_SSL only: the user made while it ran without authentication,
/// then restarted with `--authentication` behind TLS with a certificate of a throwaway CA.
fn secured_broker(dir: &std::path::Path) -> (KafkaBroker, TestCertificates) {
    let certs = generate_certificates(&dir.join("pki"), "tandem test CA").expect("certificates");
    let mut kafka = broker(dir);
    kafka
        .create_scram_user(USER, PASSWORD, Scram::Sha512)
        .expect("the SCRAM user");
    kafka
        .restart_with(&["--authentication".into()], Some(certs.tls.clone()))
        .expect("the broker restarts with SASL and TLS");
    (kafka, certs)
}

/// The sink section's lines for SCRAM-SHA-512 over TLS, the password in `password_file`.
fn sasl_ssl_toml(password_file: &std::path::Path, ca: &std::path::Path) -> String {
    format!(
        "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"scram_sha_512\"\nsasl_username = \"{USER}\"\npassword_file = \"{}\"\ntls_ca_file = \"{}\"",
        password_file.display(),
        ca.display()
    )
}

/// Whether a client with these librdkafka `settings` gets an answer from the broker
/// within `timeout`, and librdkafka's reason when not.
async fn probe(
    bootstrap: &str,
    settings: Vec<(String, String)>,
    timeout: Duration,
) -> Result<(), String> {
    let b = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || tandem_scenario::kafka::probe(&b, &settings, timeout))
        .await
        .unwrap()
}

/// librdkafka's first account of a refusal, for the log.
fn reason(r: &Result<(), String>) -> &str {
    match r {
        Ok(()) => "answered",
        Err(e) => e
            .split_once("librdkafka: ")
            .map_or(e.as_str(), |(_, r)| r.split("; ").next().unwrap_or(r)),
    }
}

/// The broker refuses every other way in before a run depends on it, each for its own
/// reason: a plaintext client (the TLS front refuses it), a client that does not trust its
/// certificate, a wrong password; and it answers the right one.
async fn assert_secured(kafka: &KafkaBroker, certs: &TestCertificates, other_ca: &std::path::Path) {
    let bootstrap = kafka.bootstrap();
    // A refusal is reported within milliseconds: the timeout only bounds the wait.
    let refused = Duration::from_secs(5);
    let front_before = kafka.tls_front_log().lines().count();
    let plain = probe(&bootstrap, Vec::new(), refused).await;
    println!("plaintext client: {}", reason(&plain));
    assert!(plain.is_err(), "a plaintext client is refused");
    let front = kafka.tls_front_log();
    let front_new: Vec<&str> = front.lines().skip(front_before).collect();
    println!("TLS front: {front_new:?}");
    // OpenSSL's word for plaintext bytes where a TLS handshake should be.
    assert!(
        front_new.iter().any(|l| l.contains("wrong version number")),
        "the plaintext client was refused by TLS: {front_new:?}"
    );
    let untrusted = probe(
        &bootstrap,
        sasl_ssl_settings(Scram::Sha512, USER, PASSWORD, other_ca),
        refused,
    )
    .await;
    println!("client trusting another CA: {}", reason(&untrusted));
    assert!(
        untrusted
            .as_ref()
            .is_err_and(|e| e.contains("certificate verify failed")),
        "a client trusting another CA is refused by TLS: {untrusted:?}"
    );
    let wrong = probe(
        &bootstrap,
        sasl_ssl_settings(Scram::Sha512, USER, WRONG_PASSWORD, &certs.ca),
        refused,
    )
    .await;
    println!("wrong password: {}", reason(&wrong));
    assert!(
        wrong
            .as_ref()
            .is_err_and(|e| e.contains("SASL authentication error")),
        "a wrong password is refused by SASL: {wrong:?}"
    );
    let right = probe(
        &bootstrap,
        sasl_ssl_settings(Scram::Sha512, USER, PASSWORD, &certs.ca),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(right, Ok(()), "the right password is taken");
}

/// Sum of every partition's tally: (activities stored, activities received).
fn stored_and_unique(h: &Harness) -> (u64, u64) {
    h.pipeline
        .tallies()
        .iter()
        .fold((0, 0), |(s, u), (_, _, t)| {
            let t = t.snapshot();
            (s + t.stored, u + t.unique)
        })
}

/// SCRAM-SHA-512 over TLS, the password in a file and the CA in another: once the broker
/// has shown that it refuses every other way in, the sink stores everything published
/// exactly once (read back over SASL_SSL as well: a plaintext read-back gets nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_ssl_scram_sha_512() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, certs) = secured_broker(dir.path());
    let other = generate_certificates(&dir.path().join("other-pki"), "another CA").unwrap();
    assert_secured(&kafka, &certs, &other.ca).await;
    let bootstrap = kafka.bootstrap();
    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let (h, _run) = harness(|c| {
        c.kafka_bootstrap = Some(bootstrap.clone());
        c.kafka_extra = sasl_ssl_toml(&password_file, &certs.ca);
        c.kafka_read_back = sasl_ssl_settings(Scram::Sha512, USER, PASSWORD, &certs.ca);
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = h.finish(SETTLE).await;
    judge("kafka sasl_ssl scram-sha-512", &v, None, None);
    let b = bootstrap.clone();
    let plain = tokio::task::spawn_blocking(move || topic_records(&b, KAFKA_TOPIC))
        .await
        .unwrap();
    assert!(plain.is_err(), "a plaintext read-back fails: {plain:?}");
}

/// The same broker, the password file holding a wrong password: the sink reports down and
/// stores nothing (the topic is not even created). Then the file gets the right password
/// and the consumer is restarted with the very same configuration: everything published,
/// before and after, is stored exactly once. So the refusal was the password's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_ssl_scram_wrong_password_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, certs) = secured_broker(dir.path());
    let bootstrap = kafka.bootstrap();
    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, format!("{WRONG_PASSWORD}\n")).unwrap();
    let read_back = sasl_ssl_settings(Scram::Sha512, USER, PASSWORD, &certs.ca);
    let (h, _run) = harness(|c| {
        c.kafka_bootstrap = Some(bootstrap.clone());
        c.kafka_extra = sasl_ssl_toml(&password_file, &certs.ca);
        c.kafka_read_back = read_back.clone();
        // Spooled to disk while refused, and kept across the restart.
        c.max_memory_activities = 300;
    })
    .await;
    let started = tokio::time::Instant::now();
    assert!(
        h.wait(Duration::from_secs(60), |s| s.sinks.iter().any(|k| !k.up))
            .await,
        "the sink reports down with a wrong password"
    );
    println!("down after {:.1} s", started.elapsed().as_secs_f64());
    // Something was received and waits for the store...
    assert!(
        h.wait(Duration::from_secs(60), |_| stored_and_unique(&h).1 > 0)
            .await,
        "activities arrive"
    );
    let (stored, unique) = stored_and_unique(&h);
    println!("with the wrong password: stored {stored} of {unique}");
    assert_eq!(stored, 0, "nothing is stored with a wrong password");
    assert!(
        h.status().sinks.iter().all(|k| !k.up),
        "the sink is still down"
    );
    // ...and nothing reached the topic (never created: the sink could not even ask).
    let (b, rb) = (bootstrap.clone(), read_back.clone());
    let records = tokio::task::spawn_blocking(move || topic_records_with(&b, &rb, KAFKA_TOPIC))
        .await
        .unwrap()
        .expect("the topic can be read back with the right password");
    assert!(records.is_empty(), "{} records in the topic", records.len());

    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let (h, _) = h.restart().await.expect("the consumer starts again");
    assert!(
        h.wait(Duration::from_secs(60), |_| stored_and_unique(&h).0 > 0)
            .await,
        "the sink stores with the right password"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // `Harness::finish` cannot tell when this run has caught up: what the first run
    // received and spooled is stored by this one, outside this run's tallies. The topic
    // itself is the judge: every published activity in it, exactly once.
    for name in h.cfg.stream_names() {
        h.sim
            .set_rate(&name, RateProfile::Constant { per_sec: 0.0 })
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    let caught_up = loop {
        let stored = stored_ids_with(&bootstrap, &read_back, KAFKA_TOPIC).await;
        let v = compare(&h.cfg, &h.sim, &stored.unwrap_or_default());
        if v.lost == 0 {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let Harness {
        sim, pipeline, cfg, ..
    } = h;
    let shutdown = pipeline.shutdown().await;
    let stored = stored_ids_with(&bootstrap, &read_back, KAFKA_TOPIC)
        .await
        .expect("the topic can be read back");
    let mut v = compare(&cfg, &sim, &stored);
    v.settled = caught_up;
    v.shutdown = shutdown;
    judge("kafka sasl_ssl wrong password, fixed", &v, None, None);
}

/// `n` activities of `line_bytes` each, partition 1, ids from `first`.
fn big_batch(first: u64, n: u64, line_bytes: usize) -> tandem_core::UniqueBatch {
    tandem_core::UniqueBatch {
        stream: tandem_core::StreamId(0),
        partition: 1,
        items: (first..first + n)
            .map(|i| tandem_core::Unique {
                seq: i - first + 1,
                id: tandem_core::ActivityId::Post(i),
                line: bytes::Bytes::from(format!(
                    "{{\"id_str\":\"{i}\",\"text\":\"{}\"}}",
                    "x".repeat(line_bytes)
                )),
                path: tandem_core::PathId(0),
                received: tokio::time::Instant::now(),
            })
            .collect(),
    }
}

/// Puts `batch`, as the driver does: again while the store answers that it is still reading
/// what the topic holds (a transient error, nothing taken).
async fn put_when_ready(store: &mut tandem_sink::KafkaStore, batch: &tandem_core::UniqueBatch) {
    use tandem_sink::Store;
    let mut last = None;
    for _ in 0..600 {
        match store.put(batch).await {
            Ok(()) => return,
            Err(e) if e.is_retryable() => last = Some(e),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store never took the batch: {last:?}");
}

/// Big activities far below `max_in_flight`: the records awaiting their delivery report
/// never hold more than `max_in_flight_bytes` (nor a quarter of the driver's memory
/// budget), and every one is delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_in_flight_window_is_bounded_by_bytes() {
    use tandem_sink::{KafkaConfig, KafkaStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let kafka = broker(dir.path());
    let mut cfg = KafkaConfig::new(&kafka.bootstrap(), KAFKA_TOPIC);
    cfg.create_topic = true;
    cfg.max_in_flight_bytes = 64 * 1024;
    // tansu's SQLite store is not reliable with idempotent producers (see the bench).
    cfg.idempotence = false;
    let names: tandem_sink::StreamNames = std::sync::Arc::new(vec!["decahose".into()]);
    let keep = Duration::from_secs(600);
    let since = tandem_core::time::unix_ms_now();
    let line = 16 * 1024;
    let mut store = KafkaStore::new(cfg.clone(), names.clone(), None, None, since, keep).unwrap();
    let mut delivered = 0;
    put_when_ready(&mut store, &big_batch(1, 64, line)).await;
    assert!(
        store.in_flight_bytes() <= 64 * 1024,
        "{} B await their delivery report; the bound is 64 KiB",
        store.in_flight_bytes()
    );
    delivered += (store.acks(true).await.unwrap().iter())
        .map(|a| a.ids.len())
        .sum::<usize>();
    assert_eq!((delivered, store.in_flight_bytes()), (64, 0));
    // A driver budget of 128 KiB leaves the window a quarter of it.
    let mut store = KafkaStore::new(cfg, names, None, None, since, keep)
        .unwrap()
        .with_memory_budget(128 * 1024);
    put_when_ready(&mut store, &big_batch(1_001, 64, line)).await;
    assert!(
        store.in_flight_bytes() <= 32 * 1024,
        "{}",
        store.in_flight_bytes()
    );
    delivered += (store.acks(true).await.unwrap().iter())
        .map(|a| a.ids.len())
        .sum::<usize>();
    assert_eq!(delivered, 128);
    let b = kafka.bootstrap();
    let records = tokio::task::spawn_blocking(move || topic_records(&b, KAFKA_TOPIC))
        .await
        .unwrap()
        .expect("the topic can be read");
    let mut keys: Vec<String> = records.iter().filter_map(|r| r.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((records.len(), keys.len()), (128, 128), "each stored once");
}

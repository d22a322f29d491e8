//! Every metric in the README's metrics table is exported by a running pipeline, with the
//! labels the table documents. Dashboards and alert rules may only use these.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tandem_e2e::harness;
use tandem_sim::{Fault, Target};

/// The README's metrics table: name → documented label keys.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut out = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with("`tandem_") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "-")
            .collect();
        out.insert(name, labels);
    }
    out
}

/// Scraped series: name → union of label keys seen.
fn scraped(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((n, rest)) => (n, rest.split('}').next().unwrap_or_default()),
            None => (line.split_whitespace().next().unwrap_or_default(), ""),
        };
        let name = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        let keys = out.entry(name.to_owned()).or_default();
        for pair in labels.split(',').filter(|p| p.contains('=')) {
            let key = pair.split('=').next().unwrap_or_default().trim();
            if key != "le" && key != "quantile" {
                keys.insert(key.to_owned());
            }
        }
    }
    out
}

/// A running pipeline that went through a few faults exports every documented metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_metrics_are_exported_with_their_labels() {
    let documented = documented();
    assert!(
        documented.len() >= 30,
        "the README's metrics table was not found ({} rows)",
        documented.len()
    );
    let (h, _dir) = harness(|_| {}).await;
    // Exercise the paths that create series lazily: a drop, a stall, corrupt lines.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.sim
        .fault(Fault::Drop {
            target: Target {
                partition: Some(1),
                client_ip: h.cfg.paths[0],
                ..Target::default()
            },
        })
        .unwrap();
    h.sim
        .fault(Fault::Stall {
            target: Target {
                partition: Some(1),
                client_ip: h.cfg.paths[1],
                ..Target::default()
            },
        })
        .unwrap();
    h.sim
        .fault(Fault::Inject {
            target: Target {
                partition: Some(1),
                ..Target::default()
            },
            injection: tandem_sim::Injection::MalformedLine,
        })
        .unwrap();
    h.sim
        .fault(Fault::Inject {
            target: Target {
                partition: Some(2),
                ..Target::default()
            },
            injection: tandem_sim::Injection::OversizeLine { bytes: 2 << 20 },
        })
        .unwrap();
    h.sim
        .fault(Fault::Inject {
            target: Target {
                partition: Some(2),
                ..Target::default()
            },
            injection: tandem_sim::Injection::TruncateAndClose,
        })
        .unwrap();
    let info = br#"{"info":{"message":"hello from the test"}}"#;
    h.sim
        .publish(&h.cfg.stream, 1, vec![bytes::Bytes::from_static(info)])
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Both paths of partition 2 down past backfill: a gap repaired by recovery.
    h.sim
        .fault(Fault::Reject {
            stream: h.cfg.stream.clone(),
            partition: Some(2),
            status: 503,
            count: None,
            for_ms: Some(8_000),
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: Target {
                partition: Some(2),
                ..Target::default()
            },
        })
        .unwrap();
    let repaired = h
        .wait(Duration::from_secs(40), |s| {
            s.streams.iter().flat_map(|st| &st.partitions).any(|p| {
                p.partition == 2
                    && !p.repair_gaps.is_empty()
                    && p.repair_gaps
                        .iter()
                        .all(|g| g.state == tandem_core::GapState::Repaired)
            })
        })
        .await;
    assert!(repaired, "the partition 2 gap was repaired");
    let url = format!("http://{}/metrics", h.pipeline.http_addr());
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let got = scraped(&text);
    let mut missing = Vec::new();
    // The pair's metrics exist only with `[pair]` (checked below).
    for (name, labels) in documented
        .iter()
        .filter(|(n, _)| !n.starts_with("tandem_pair_"))
    {
        match got.get(name) {
            None => missing.push(format!("{name} not exported")),
            Some(seen) => {
                for l in labels.difference(seen) {
                    missing.push(format!("{name} lacks label {l}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{}\n\nscraped:\n{text}",
        missing.join("\n")
    );
    let status: serde_json::Value =
        reqwest::get(format!("http://{}/status", h.pipeline.http_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        status["streams"][0]["partitions"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    assert!(
        status["streams"][0]["partitions"][0]["connections"][0]["phase"].is_string(),
        "{status}"
    );
    let _ = h.finish(Duration::from_secs(20)).await;
}

/// A consumer of a pair (`[pair]`, coordinating through its JetStream server) exports the
/// pair's metrics the README documents, with their labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_metrics_are_exported_with_their_labels() {
    let documented: BTreeMap<String, BTreeSet<String>> = documented()
        .into_iter()
        .filter(|(n, _)| n.starts_with("tandem_pair_"))
        .collect();
    assert!(
        documented.len() >= 2,
        "the README documents the pair's metrics"
    );
    let store = tempfile::tempdir().unwrap();
    let nats = tandem_scenario::nats::NatsServer::start(store.path())
        .expect("nats-server (scripts/setup-test-deps installs it)");
    let url = nats.url();
    let (h, _dir) = harness(|c| {
        c.nats_url = Some(url.clone());
        c.pair_consumer = Some("contract".to_owned());
    })
    .await;
    assert!(
        h.wait(Duration::from_secs(20), |s| s.pair_coordinated
            == Some(true))
            .await,
        "the pair's bucket answers"
    );
    let text = reqwest::get(format!("http://{}/metrics", h.pipeline.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let got = scraped(&text);
    for (name, labels) in &documented {
        let seen = got
            .get(name)
            .unwrap_or_else(|| panic!("{name} not exported:\n{text}"));
        assert!(
            labels.is_subset(seen),
            "{name} lacks labels {labels:?}: {seen:?}"
        );
    }
    let _ = h.finish(Duration::from_secs(20)).await;
}

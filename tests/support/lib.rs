//! Shared helpers of the end-to-end tests: a fast harness in a temporary directory, and
//! the one-line result every fault-matrix scenario prints.

use std::time::Duration;

use tandem_scenario::{Harness, HarnessConfig, Verdict};
use tandem_sim::{Fault, Target};

/// A fast harness (seconds instead of minutes) writing under a fresh temporary directory.
pub async fn harness(tweak: impl FnOnce(&mut HarnessConfig)) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut cfg = HarnessConfig::fast(dir.path().to_path_buf());
    tweak(&mut cfg);
    let h = Harness::start(cfg)
        .await
        .expect("simulator and pipeline start");
    assert!(
        h.wait_connected(Duration::from_secs(10)).await,
        "every connection came up"
    );
    (h, dir)
}

/// Prints the scenario's result line and checks it is clean.
pub fn judge(name: &str, v: &Verdict, detect: Option<Duration>, repair: Option<Duration>) {
    let secs = |d: Option<Duration>| {
        d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()))
    };
    println!(
        "scenario {name:<28} {} detect {} repair {}",
        v.line(),
        secs(detect),
        secs(repair)
    );
    for (p, r) in &v.lost_detail {
        println!(
            "  lost {} partition {p} published_ms {} created_ms {}",
            r.id, r.published_ms, r.created_ms
        );
    }
    assert!(
        v.settled,
        "{name}: the consumer did not catch up with the simulator"
    );
    assert!(v.published > 0, "{name}: nothing was published");
    assert!(
        v.clean(),
        "{name}: {} (lost e.g. {:?})",
        v.line(),
        v.lost_examples
    );
}

/// The sum of a metric's series in this process's Prometheus exposition, over the series
/// whose labels include every `(name, value)` of `labels`.
pub fn metric_sum(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = tandem_monitor::prometheus().render();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Takes both connections of `partition` down for `outage`: every reconnect is refused
/// with 503 until it is over.
pub fn outage(h: &Harness, partition: u32, outage: Duration) {
    h.sim
        .fault(Fault::Reject {
            stream: h.cfg.stream.clone(),
            partition: Some(partition),
            status: 503,
            count: None,
            for_ms: Some(outage.as_millis() as u64),
        })
        .unwrap();
    h.sim
        .fault(Fault::Drop {
            target: Target {
                partition: Some(partition),
                ..Target::default()
            },
        })
        .unwrap();
}

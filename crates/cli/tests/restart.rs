//! `tandem run` killed with SIGKILL while the simulator keeps publishing, and started
//! again past the backfill window: the coverage ledger turns the downtime into a gap,
//! recovery brings it back, and the store holds every published activity exactly once.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_scenario::HarnessConfig;
use tandem_scenario::harness::{PASSWORD, PASSWORD_VAR, compare};
use tandem_sim::{RateProfile, SimConfig, Simulator};
use tokio::time::Instant;

fn loopback_addr() -> SocketAddr {
    let port = tandem_scenario::free_port().expect("a free port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", "--config"])
        .arg(config)
        .env(PASSWORD_VAR, PASSWORD)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("tandem starts")
}

/// The consumer's `/status`, once it answers.
async fn status(addr: SocketAddr) -> Option<serde_json::Value> {
    let resp = reqwest::get(format!("http://{addr}/status")).await.ok()?;
    resp.json().await.ok()
}

/// Waits until `/status` satisfies `done`.
async fn wait_status(
    addr: SocketAddr,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = status(addr).await {
            if done(&s) {
                return Some(s);
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("status never got there; last: {last:#?}");
}

fn partitions(s: &serde_json::Value) -> Vec<&serde_json::Value> {
    s["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|st| st["partitions"].as_array().into_iter().flatten())
        .collect()
}

fn all_live(s: &serde_json::Value) -> bool {
    let ps = partitions(s);
    ps.len() == 2 && ps.iter().all(|p| p["live_connections"] == 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_after_a_gap() {
    tandem_conn::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HarnessConfig::fast(dir.path().to_path_buf());
    cfg.monitor_listen = loopback_addr();
    let sim = Simulator::start(SimConfig {
        streams: cfg.sim_streams(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(&config, cfg.consumer_toml(&cfg.stream_urls(&sim).unwrap())).unwrap();
    let log = dir.path().join("tandem.log");
    let addr = cfg.monitor_listen;

    let mut first = start(&config, &log);
    wait_status(addr, Duration::from_secs(20), all_live).await;
    sim.set_rate(
        &cfg.stream,
        RateProfile::Constant {
            per_sec: cfg.rate_per_sec,
        },
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let killed = Instant::now();

    // Down for longer than the backfill window (5 s here) while publishing goes on.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut second = start(&config, &log);
    let s = wait_status(addr, Duration::from_secs(60), |s| {
        let ps = partitions(s);
        ps.len() == 2
            && ps.iter().all(|p| {
                let gaps = p["repair_gaps"].as_array().cloned().unwrap_or_default();
                !gaps.is_empty() && gaps.iter().all(|g| g["state"] == "repaired")
            })
    })
    .await
    .unwrap();
    let repaired = killed.elapsed();
    for p in partitions(&s) {
        let g = &p["repair_gaps"][0];
        let secs =
            (g["end_ms"].as_u64().unwrap() - g["start_ms"].as_u64().unwrap()) as f64 / 1000.0;
        println!(
            "partition {} gap {secs:.1} s repaired in {} chunk(s)",
            p["partition"], g["chunks"]
        );
        assert!(
            secs >= 3.0,
            "the downtime past backfill is the gap: {secs} s"
        );
    }

    // Stop publishing, let it catch up, stop it gracefully and look at the store.
    sim.set_rate(&cfg.stream, RateProfile::Constant { per_sec: 0.0 })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let term = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let code = second.wait().unwrap();
    assert!(code.success(), "graceful stop: {code:?}");
    let stored = tandem_scenario::store::stored_ids(&dir.path().join("store")).unwrap();
    let v = compare(&cfg, &sim, &stored);
    println!(
        "sigkill restart: {} (repaired {:.1} s after the kill)",
        v.line(),
        repaired.as_secs_f64()
    );
    if !v.clean() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        println!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    assert!(v.published > 0);
    assert!(v.clean(), "{} lost e.g. {:?}", v.line(), v.lost_examples);
}

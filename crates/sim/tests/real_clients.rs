//! Clients nobody here wrote consume the simulator: curl as Gnip documents it, and the
//! official X Python SDK. Both come from the project's own setup script
//! (`scripts/setup-test-deps`); a missing one fails the test with the command to run.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;
use tandem_sim::{RateProfile, StreamConfig};

fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `curl --compressed -u user:pass URL` (the documented Gnip example) receives gzip
/// NDJSON with `\r\n` line ends and heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_the_gnip_stream() {
    let mut s = fast_gnip("d", 100.0);
    s.heartbeat_interval_ms = Some(200);
    let sim = start(vec![s]).await;
    let url = url(&sim, "d", "partition=1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "--silent",
                "--compressed",
                "--max-time",
                "2",
                "--include",
                "-u",
                &format!("{USER}:{PASS}"),
                &url,
            ])
            .output()
            .expect("curl is installed by scripts/setup-test-deps")
    })
    .await
    .unwrap();
    // curl exits 28 when --max-time ends a stream that never ends.
    assert_eq!(
        out.status.code(),
        Some(28),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (head, body) = text.split_once("\r\n\r\n").expect("headers then body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json; charset=utf-8"),
        "{head}"
    );
    let lines: Vec<&str> = body.split("\r\n").collect();
    let activities = lines.iter().filter(|l| l.starts_with('{')).count();
    assert!(
        activities > 50,
        "{activities} activities in 2 s at 50/s per partition"
    );
    for l in lines.iter().filter(|l| l.starts_with('{')).take(20) {
        tandem_core::validate(l.as_bytes()).unwrap();
    }
    // Wrong credentials: 401, as documented.
    let bad = Command::new("curl")
        .args([
            "--silent",
            "--compressed",
            "--max-time",
            "2",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
            "-u",
            "x:y",
            &sim.stream_url("d").unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&bad.stdout), "401");
}

/// The official X Python SDK (`xdk`) consumes the v2 filtered stream and receives the
/// generated posts, with the ids the simulator published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_x_sdk_reads_the_v2_stream() {
    let python = {
        let out = Command::new(project_root().join("scripts/python-env"))
            .output()
            .expect("scripts/python-env runs");
        assert!(
            out.status.success(),
            "scripts/python-env failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let mut filtered = StreamConfig::v2("f", "/2/tweets/search/stream", TOKEN, 1);
    filtered.rate = RateProfile::Constant { per_sec: 50.0 };
    filtered.heartbeat_interval_ms = Some(500);
    let sim = start(vec![filtered]).await;
    let script = r#"
import sys
from xdk import Client
client = Client(base_url=sys.argv[1], bearer_token=sys.argv[2])
n = 0
for item in client.stream.posts():
    data = item.data if hasattr(item, "data") else item["data"]
    post_id = data["id"] if isinstance(data, dict) else data.id
    print(post_id, flush=True)
    n += 1
    if n >= 20:
        break
"#;
    let base = sim.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", script, &base, TOKEN])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "xdk client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().expect("a post id"))
        .collect();
    assert_eq!(ids.len(), 20);
    let truth: std::collections::HashSet<tandem_core::ActivityId> =
        sim.truth("f", 1).unwrap().iter().map(|r| r.id).collect();
    for id in ids {
        assert!(
            truth.contains(&tandem_core::ActivityId::Post(id)),
            "{id} was not published by the simulator"
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

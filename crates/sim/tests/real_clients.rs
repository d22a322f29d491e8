//! Clients nobody here wrote consume the simulator: curl as Gnip documents it, and the
//! official X Python SDK. Both come from the project's own setup script
//! (`scripts/setup-test-deps`); a missing one fails the test with the command to run.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use support::*;
use tandem_sim::{RateProfile, StreamConfig};

fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Gnip's `curl --compressed` example gets gzip NDJSON, `\r\n` lines and heartbeats, no end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_the_gnip_stream() {
    let mut s = fast_gnip("d", 100.0);
    s.heartbeat_interval_ms = Some(200);
    let sim = start(vec![s]).await;
    let url = url(&sim, "d", "partition=1");
    let handle = sim.handle();
    let (head, activities, heartbeat, still_open) = tokio::task::spawn_blocking(move || {
        let mut curl = Command::new("curl")
            .args(["--silent", "--no-buffer", "--compressed", "--include"])
            .args(["--max-time", "60", "-u", &format!("{USER}:{PASS}"), &url])
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl is installed by scripts/setup-test-deps");
        let mut out = BufReader::new(curl.stdout.take().unwrap());
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") && out.read_line(&mut head).unwrap() > 0 {}
        // 20 activities, then an idle stream, whose next line must be a heartbeat.
        let mut activities = Vec::new();
        let mut heartbeat = false;
        let mut line = Vec::new();
        while !heartbeat && out.read_until(b'\n', &mut line).unwrap() > 0 {
            if line == b"\r\n" {
                heartbeat = activities.len() >= 20;
            } else {
                activities.push(std::mem::take(&mut line));
                if activities.len() == 20 {
                    let stop = RateProfile::Constant { per_sec: 0.0 };
                    handle.set_rate("d", stop).unwrap();
                }
            }
            line.clear();
        }
        let still_open = curl.try_wait().unwrap().is_none();
        let _ = curl.kill();
        let _ = curl.wait();
        (head, activities, heartbeat, still_open)
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(
        head.contains("content-type: application/json; charset=utf-8"),
        "{head}"
    );
    assert!(activities.len() >= 20, "{} activities", activities.len());
    for l in &activities {
        let l = l.strip_suffix(b"\r\n").expect("lines end with \\r\\n");
        tandem_core::validate(l).unwrap();
    }
    assert!(heartbeat, "no heartbeat once the stream was idle");
    assert!(still_open, "curl ended: the stream closed");
    // Wrong credentials: 401, as documented.
    let bad = Command::new("curl")
        .args([
            "--silent",
            "--compressed",
            "--max-time",
            "30",
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

/// The official X Python SDK (`xdk`) reads the v2 filtered stream's posts, ids as published.
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
}

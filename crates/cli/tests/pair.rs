//! A pair of `tandem run` processes in two "zones" (one path each: zone a from 127.0.0.2,
//! zone b from 127.0.0.3), one simulator and one `nats-server`: the two coordinate through
//! a key-value bucket on the NATS server they both store to (`[pair]`). Each scenario ends
//! with both stopped gracefully and the JetStream stream read back against the simulator's
//! ground truth: every published activity stored exactly once.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tandem_scenario::HarnessConfig;
use tandem_sim::{ConnectionKind, Fault, Target};
use tokio::time::Instant;

use support::{Consumer, Run, Zone, partitions};

const ZONE_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ZONE_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A pair on a fresh simulator and NATS server: zone a is the run's consumer, zone b its
/// second. `tweak` applies to both (and to the simulator), `zone_b` to zone b only.
async fn pair(
    tweak: impl FnOnce(&mut HarnessConfig),
    zone_b: impl FnOnce(&mut HarnessConfig),
) -> (Run, Zone) {
    let run = Run::new(true, |c| {
        c.paths = vec![Some(IpAddr::V4(ZONE_A))];
        c.pair_consumer = Some("zone-a".to_owned());
        tweak(c);
    })
    .await;
    let b = run.zone("zone-b", |c| {
        c.paths = vec![Some(IpAddr::V4(ZONE_B))];
        zone_b(c);
    });
    (run, b)
}

/// Coordinated, and the peer's report of every partition is here.
fn sees_peer(s: &Value) -> bool {
    s["pair_coordinated"] == true && partitions(s).iter().all(|p| !p["peer"].is_null())
}

/// Starts both zones and waits until each is live and sees the other.
async fn start_both(run: &Run, b: &Zone) -> (Consumer, Consumer) {
    let (ca, cb) = (run.start(None), b.start(None));
    for zone in [&**run, b] {
        zone.wait_live().await;
        zone.wait_status(
            Duration::from_secs(30),
            "coordinated, with the peer's report of every partition",
            sees_peer,
        )
        .await;
    }
    (ca, cb)
}

/// Open live connections of `partition` from `ip`.
fn live_connections(run: &Run, ip: Ipv4Addr, partition: u32) -> Vec<u64> {
    run.sim
        .connections()
        .into_iter()
        .filter(|c| {
            c.kind == ConnectionKind::Live
                && c.partition == partition
                && c.client.ip() == IpAddr::V4(ip)
        })
        .map(|c| c.id)
        .collect()
}

/// The gaps of every partition in a `/status`.
fn gaps(s: &Value) -> Vec<Value> {
    partitions(s)
        .iter()
        .flat_map(|p| p["repair_gaps"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Every partition in `which` has a gap, and every gap is repaired.
fn gaps_repaired(s: &Value, which: &[u32]) -> bool {
    let ps = partitions(s);
    which.iter().all(|n| {
        ps.iter().any(|p| {
            p["partition"] == *n && p["repair_gaps"].as_array().is_some_and(|g| !g.is_empty())
        })
    }) && gaps(s).iter().all(|g| g["state"] == "repaired")
}

/// Gap lengths and how long each took to close, in seconds: `[(length, repair)]`.
fn gap_times(s: &Value) -> Vec<(f64, f64)> {
    let ms = |g: &Value, k: &str| g[k].as_u64().unwrap_or(0);
    gaps(s)
        .iter()
        .map(|g| {
            let length = ms(g, "end_ms").saturating_sub(ms(g, "start_ms")) as f64 / 1000.0;
            let repair = ms(g, "repaired_ms").saturating_sub(ms(g, "found_ms")) as f64 / 1000.0;
            (length, repair)
        })
        .collect()
}

/// `tandem_gaps_repaired_total` of a zone by kind: (covered_by_peer, recovery).
async fn repaired_by_kind(zone: &Zone) -> (f64, f64) {
    let name = "tandem_gaps_repaired_total";
    let by_peer = zone.metric_sum(name, &[("kind", "covered_by_peer")]).await;
    let by_recovery = zone.metric_sum(name, &[("kind", "recovery")]).await;
    (
        by_peer.expect("/metrics answers"),
        by_recovery.expect("/metrics answers"),
    )
}

/// Fails, naming the setup script, when `tool` is not installed: a scenario that needs it
/// never passes by skipping.
fn require(tool: &str, version_flag: &str) {
    let found = Command::new(tool)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed (scripts/setup-test-deps installs it)"
    );
}

/// Zone b's partition 1 connection gets heartbeats but no activities: with one path per
/// process there is no sibling, and the peer's reports (zone a received activities newer by
/// more than `data_silence_ms`) make it stale (`peer_ahead`) before its own rate would; it
/// reconnects with backfill, zone a is never judged behind, and the stream holds every
/// activity once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_heartbeats_only_is_stale_against_the_peer() {
    let name = "pair_heartbeats_only_is_stale_against_the_peer";
    // 10 activities/s per partition: the partition's own rate would call the silence stale
    // only after 10 s (silence_rate_multiple 100), so the peer's evidence is what counts.
    let (run, b) = pair(|c| c.rate_per_sec = 20.0, |_| {}).await;
    let (ca, cb) = start_both(&run, &b).await;
    run.publish(run.cfg.rate_per_sec);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let faulted = live_connections(&run, ZONE_B, 1);
    assert_eq!(faulted.len(), 1, "zone b has one connection on partition 1");
    let target = Target {
        partition: Some(1),
        client_ip: Some(IpAddr::V4(ZONE_B)),
        ..Target::default()
    };
    let matched = run.sim.fault(Fault::HeartbeatsOnly { target }).unwrap();
    assert_eq!(
        matched, 1,
        "the fault reached zone b's partition 1 connection"
    );
    let fault_at = Instant::now();

    // Detected: zone b closes the connection as stale on the peer's evidence.
    let stale = "tandem_stale_connections_total";
    let on_p1 = |reason| [("partition", "1"), ("reason", reason)];
    let deadline = fault_at + Duration::from_secs(30);
    let detected_after = loop {
        let peer_ahead = b.metric_sum(stale, &on_p1("peer_ahead")).await;
        if peer_ahead.is_some_and(|n| n >= 1.0) {
            break fault_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "zone b never closed its silent connection as peer_ahead\n--- zone b log tail ---\n{}",
            b.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_rate = b.metric_sum(stale, &on_p1("rate_silence")).await;
    assert_eq!(
        by_rate,
        Some(0.0),
        "the peer's evidence, not the partition's own rate, detected the silence"
    );
    // Reconnected: a new connection of zone b on partition 1.
    let deadline = fault_at + Duration::from_secs(60);
    let reconnected_after = loop {
        let now = live_connections(&run, ZONE_B, 1);
        if now.iter().any(|id| !faulted.contains(id)) {
            break fault_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "zone b did not reconnect partition 1\n--- zone b log tail ---\n{}",
            b.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The silence the connection was closed after, as zone b logged it.
    let log = b.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("stale connection closed") && l.contains("peer_ahead"))
        .unwrap_or_else(|| panic!("zone b logged the stale connection\n{}", b.log_tail(60)));
    let silence_secs: f64 = line
        .split("silent_secs=")
        .nth(1)
        .and_then(|v| v.split([' ', '}']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a silence in {line:?}"));
    let bound = run.cfg.data_silence_ms as f64 / 1000.0 + 1.0;
    println!(
        "{name}: detected after {silence_secs:.1} s of silence (bound {bound:.1} s: {}), seen {:.1} s after the fault, reconnected {:.1} s after it",
        if silence_secs <= bound {
            "within"
        } else {
            "OVER, on a loaded machine"
        },
        detected_after.as_secs_f64(),
        reconnected_after.as_secs_f64()
    );
    // Generous on a loaded machine: well under the rate's own 10 s.
    assert!(
        silence_secs <= bound + 4.0,
        "detected after {silence_secs} s of silence"
    );
    let a_stale = run.metric_sum(stale, &[("reason", "peer_ahead")]).await;
    assert_eq!(
        a_stale,
        Some(0.0),
        "zone a, ahead all along, saw no peer evidence against itself"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.finish_zones(vec![(&*run, ca), (&b, cb)], name).await;
    let stats = run.sim.stats(&run.cfg.stream).unwrap();
    println!("{name}: {} recovery requests", stats.recovery_jobs);
}

/// Zone b SIGKILLed for three backfill windows (15 s of 1 s "minutes") while zone a stays
/// live, then started again: its gaps lie in what zone a stored, so they close as
/// `covered_by_peer` and the simulator receives no recovery request at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_zone_b_away_three_backfill_windows_requests_no_recovery() {
    let name = "pair_zone_b_away_three_backfill_windows_requests_no_recovery";
    let (run, b) = pair(|_| {}, |_| {}).await;
    let (ca, mut cb) = start_both(&run, &b).await;
    run.publish(run.cfg.rate_per_sec);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cb.sigkill();
    let away = Duration::from_millis(run.cfg.minute_ms * 5 * 3);
    tokio::time::sleep(away).await;
    let cb = b.start(None);
    let s = b
        .wait_status(
            Duration::from_secs(90),
            "zone b's gap on each partition closed",
            |s| gaps_repaired(s, &[1, 2]),
        )
        .await;
    let (by_peer, by_recovery) = repaired_by_kind(&b).await;
    let times = gap_times(&s);
    println!(
        "{name}: away {:.0} s; zone b's gaps (length s, closed after s): {times:?}; covered_by_peer {by_peer}, recovery {by_recovery}",
        away.as_secs_f64()
    );
    let stats = run.sim.stats(&run.cfg.stream).unwrap();
    assert_eq!(stats.recovery_jobs, 0, "no recovery request: {stats:?}");
    assert_eq!(by_recovery, 0.0, "no gap closed by recovery");
    assert_eq!(
        by_peer,
        times.len() as f64,
        "every gap of zone b closed as covered_by_peer"
    );
    run.finish_zones(vec![(&*run, ca), (&b, cb)], name).await;
    assert_eq!(
        run.sim.stats(&run.cfg.stream).unwrap().recovery_jobs,
        0,
        "no recovery request up to the end"
    );
}

/// Both zones away past backfill: every connection of both partitions refused (503) for
/// 9 s (backfill reaches 5 s) and dropped. Each missing interval is recovered once across
/// the pair (one zone recovers it, the other closes its gap as `covered_by_peer`), the
/// upstream never refuses a recovery job (it runs at most 2 per account and answers a third
/// with 429), and the stream holds every activity once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_both_zones_away_past_backfill_recover_each_interval_once() {
    let name = "pair_both_zones_away_past_backfill_recover_each_interval_once";
    let (run, b) = pair(|_| {}, |_| {}).await;
    let (ca, cb) = start_both(&run, &b).await;
    run.publish(run.cfg.rate_per_sec);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused_ms = 9_000;
    run.sim
        .fault(Fault::Reject {
            stream: run.cfg.stream.clone(),
            partition: None,
            status: 503,
            count: None,
            for_ms: Some(refused_ms),
        })
        .unwrap();
    let dropped = run
        .sim
        .fault(Fault::Drop {
            target: Target::default(),
        })
        .unwrap();
    assert_eq!(
        dropped, 4,
        "both zones' connections of both partitions dropped"
    );
    // The recovery connections open at once, sampled while the gaps close.
    let mut most_at_once = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut closed = [false, false];
    while closed != [true, true] {
        most_at_once = most_at_once.max(
            run.sim
                .connections()
                .iter()
                .filter(|c| c.kind == ConnectionKind::Recovery)
                .count(),
        );
        for (i, zone) in [&*run, &b].into_iter().enumerate() {
            closed[i] = zone
                .status()
                .await
                .is_some_and(|s| gaps_repaired(&s, &[1, 2]));
        }
        if Instant::now() > deadline {
            let (sa, sb) = (run.status().await, b.status().await);
            panic!(
                "the gaps of both zones did not close: zone a {:#?}, zone b {:#?}\n--- zone a ---\n{}\n--- zone b ---\n{}",
                sa.as_ref().map(gaps),
                sb.as_ref().map(gaps),
                run.log_tail(60),
                b.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut kinds = Vec::new();
    let mut zone_gaps = 0;
    for (zone, id) in [(&*run, "zone a"), (&b, "zone b")] {
        let s = zone.status().await.expect("/status");
        zone_gaps += gaps(&s).len();
        let (by_peer, by_recovery) = repaired_by_kind(zone).await;
        kinds.push(format!(
            "{id}: gaps {:?} covered_by_peer {by_peer} recovery {by_recovery}",
            gap_times(&s)
        ));
    }
    let stats = run.sim.stats(&run.cfg.stream).unwrap();
    println!(
        "{name}: {}; {} recovery requests, at most {most_at_once} seen at once, responses {:?}",
        kinds.join("; "),
        stats.recovery_jobs,
        stats.responses
    );
    assert_eq!(
        stats.responses.get(&429),
        None,
        "no request refused with 429 (no third recovery job)"
    );
    // Both partitions missed one interval: each recovered once, by one zone.
    assert_eq!(zone_gaps, 4, "each zone found a gap on each partition");
    assert_eq!(
        stats.recovery_jobs, 2,
        "one recovery request per missing interval across the pair"
    );
    run.finish_zones(vec![(&*run, ca), (&b, cb)], name).await;
}

/// Both zones restarted again and again (each SIGKILLed and started three times, 2 s
/// apart): every start asks for a connection per partition, more than the upstream's 10
/// per 60 s allow, yet the pair's shared budget (10 per 61 s across both zones) keeps the
/// simulator's busiest 60 s window at 10 requests at most, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_both_zones_restarting_keep_to_the_shared_connect_budget() {
    let name = "pair_both_zones_restarting_keep_to_the_shared_connect_budget";
    let (run, b) = pair(
        |c| {
            c.connect_limit = 10;
            // The simulator's window is a second shorter: 60 s.
            c.connect_window_ms = 61_000;
        },
        |_| {},
    )
    .await;
    let (mut ca, mut cb) = start_both(&run, &b).await;
    run.publish(run.cfg.rate_per_sec);
    for _ in 0..3 {
        for (zone, consumer) in [(&*run, &mut ca), (&b, &mut cb)] {
            tokio::time::sleep(Duration::from_secs(2)).await;
            consumer.sigkill();
            *consumer = zone.start(None);
        }
    }
    let restarts_done = run.started.elapsed();
    for zone in [&*run, &b] {
        zone.wait_status(
            Duration::from_secs(150),
            "live again after the restarts",
            |s| zone.all_live(s),
        )
        .await;
    }
    let live_after = run.started.elapsed();
    // The stop at the end silences the stream, and each connection then reconnects once
    // (rate silence): let those requests find the budget, so that they replay within
    // backfill. (A reconnect held back longer lands past the quiet stream's last activity,
    // where the peers' reports of the latest activity are their replay starts instead, and
    // the zones close each other's connections as peer_ahead in turn.)
    wait_for_budget(&run, 4).await;
    let v = run.finish_zones(vec![(&*run, ca), (&b, cb)], name).await;
    let stats = run.sim.stats(&run.cfg.stream).unwrap();
    println!(
        "{name}: 8 starts; {} connection requests, busiest 60 s window {}, responses {:?}, {} recovery requests; restarts done at {:.1} s, both live at {:.1} s; published {}",
        stats.requests,
        stats.max_requests_per_window,
        stats.responses,
        stats.recovery_jobs,
        restarts_done.as_secs_f64(),
        live_after.as_secs_f64(),
        v.published
    );
    assert!(
        stats.requests > 10,
        "the restarts asked for more than one window's budget: {stats:?}"
    );
    assert!(
        stats.max_requests_per_window <= 10,
        "the busiest 60 s window: {stats:?}"
    );
}

/// Waits until the simulator's connect window (60 s) has room for `free` more requests,
/// watching its request count.
async fn wait_for_budget(run: &Run, free: usize) {
    let window = Duration::from_millis(run.cfg.connect_window_ms);
    let limit = run.cfg.connect_limit as usize;
    let mut seen = run.sim.stats(&run.cfg.stream).unwrap().requests;
    let mut at: Vec<Instant> = vec![Instant::now(); seen.min(limit as u64) as usize];
    let deadline = Instant::now() + window * 2;
    loop {
        let now = run.sim.stats(&run.cfg.stream).unwrap().requests;
        at.extend((seen..now).map(|_| Instant::now()));
        seen = now;
        at.retain(|t| t.elapsed() < window);
        if at.len() + free <= limit || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `socat` TCP proxy on its own loopback address, killed when dropped.
struct Proxy {
    child: Child,
    listen: (Ipv4Addr, u16),
}

impl Proxy {
    fn start(listen: Ipv4Addr, to: &str) -> Proxy {
        require("socat", "-V");
        let port = tandem_scenario::free_port().expect("a free port");
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind={listen},reuseaddr,fork"))
            .arg(format!("TCP:{to}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat starts");
        Proxy {
            child,
            listen: (listen, port),
        }
    }

    fn url(&self) -> String {
        format!("nats://{}:{}", self.listen.0, self.listen.1)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An nftables table that drops every packet to and from one TCP address, removed when
/// dropped (also when the test fails).
struct Blackhole {
    table: String,
}

impl Blackhole {
    fn drop_traffic(addr: Ipv4Addr, port: u16) -> Blackhole {
        require("nft", "--version");
        let table = format!("tandem_pair_test_{}_{port}", std::process::id());
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {addr} tcp dport {port} drop\n    ip saddr {addr} tcp sport {port} drop\n  }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        std::fs::write(&path, script).unwrap();
        let out = Command::new("nft")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("nft runs");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "nft -f (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Blackhole { table }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// Waits (up to 30 s) until the zone's `/metrics` shows `name` (one series) at `value`.
async fn wait_metric(zone: &Zone, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = zone.metric_sum(name, &[]).await;
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {now:?}, not {value}\n--- log tail ---\n{}",
            zone.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An alert of `name` in a `/status`'s firing alerts.
fn firing(s: &Value, name: &str) -> bool {
    s["alerts"]
        .as_array()
        .is_some_and(|a| a.iter().any(|a| a["name"] == name))
}

/// Zone b reaches NATS through a proxy of its own, and nftables drops that traffic while
/// zone b still reaches the upstream: `pair_coordination_lost` fires on zone b (and
/// `tandem_pair_coordinated` is 0) while its connections stay live; the rule removed, it is
/// coordinated again, and the stream holds every activity once (zone b's spool within the
/// stream's duplicate window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_zone_b_cut_off_from_nats_falls_back_and_loses_nothing() {
    let name = "pair_zone_b_cut_off_from_nats_falls_back_and_loses_nothing";
    let mut run = Run::new(true, |c| {
        c.paths = vec![Some(IpAddr::V4(ZONE_A))];
        c.pair_consumer = Some("zone-a".to_owned());
    })
    .await;
    let nats = run.nats().url();
    let proxy = Proxy::start(
        Ipv4Addr::new(127, 0, 0, 5),
        nats.trim_start_matches("nats://"),
    );
    let b = run.zone("zone-b", |c| {
        c.paths = vec![Some(IpAddr::V4(ZONE_B))];
        c.nats_url = Some(proxy.url());
    });
    let (ca, cb) = start_both(&run, &b).await;
    run.publish(run.cfg.rate_per_sec);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let cut = Blackhole::drop_traffic(proxy.listen.0, proxy.listen.1);
    let cut_at = Instant::now();
    b.wait_status(
        Duration::from_secs(60),
        "pair_coordination_lost firing on zone b",
        |s| s["pair_coordinated"] == false && firing(s, "pair_coordination_lost"),
    )
    .await;
    let lost_after = cut_at.elapsed();
    wait_metric(&b, "tandem_pair_coordinated", 0.0).await;
    b.wait_status(
        Duration::from_secs(30),
        "zone b live on the upstream while cut off from NATS",
        |s| b.all_live(s) && s["pair_coordinated"] == false,
    )
    .await;
    run.wait_status(Duration::from_secs(30), "zone a still coordinated", |s| {
        s["pair_coordinated"] == true
    })
    .await;
    // Cut off for 10 s in all, well within the stream's 60 s duplicate window.
    tokio::time::sleep_until(cut_at + Duration::from_secs(10)).await;
    let sb = b.status().await.expect("zone b's /status");
    println!(
        "{name}: during the cut zone b holds {} in flight, sinks {}",
        support::total(&sb, "in_flight"),
        sb["sinks"]
    );
    drop(cut);
    let restored_at = Instant::now();
    b.wait_status(
        Duration::from_secs(90),
        "zone b coordinated again, seeing the peer",
        |s| sees_peer(s) && !firing(s, "pair_coordination_lost"),
    )
    .await;
    let back_after = restored_at.elapsed();
    wait_metric(&b, "tandem_pair_coordinated", 1.0).await;
    println!(
        "{name}: coordination lost {:.1} s after the cut, back {:.1} s after the rule was removed",
        lost_after.as_secs_f64(),
        back_after.as_secs_f64()
    );
    run.finish_zones(vec![(&*run, ca), (&b, cb)], name).await;
    drop(proxy);
}

//! A real silent stall: path b reaches the simulator over its own link (a veth pair into a
//! network namespace, where `socat` relays to the simulator), and the test takes that link
//! down with `ip link set down`. No byte and no reset arrive: the connection simply goes
//! quiet, as when a router or NAT on the path dies. The consumer must notice in seconds
//! (data silence against the sibling path), keep the partition on path a, reconnect path b
//! when the link is back, and store every activity once.
//!
//! Needs root (CAP_NET_ADMIN) for `ip netns` and `ip link`, and `socat`; both are set up
//! by `scripts/setup-test-deps`. Without them the test fails and says why.
// Waits for external processes (socat, Prometheus) on the real clock, by design.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_e2e::judge;
use tandem_monitor::{AlertName, Transition};
use tandem_scenario::{Harness, HarnessConfig};
use tokio::time::Instant;

/// A network namespace joined to this one by a veth pair, with a TCP relay inside it;
/// everything is removed on drop.
struct Link {
    ns: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    relay: Option<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` runs (scripts/setup-test-deps installs iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root: CAP_NET_ADMIN)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Link {
    fn create() -> Link {
        let id = std::process::id();
        let octet = (id % 200 + 20) as u8;
        let link = Link {
            ns: format!("tandem-{id}"),
            host_if: format!("tdm{id}h"),
            host_ip: Ipv4Addr::new(10, 213, octet, 1),
            ns_ip: Ipv4Addr::new(10, 213, octet, 2),
            relay: None,
        };
        let peer = format!("tdm{id}n");
        ip(&["netns", "add", &link.ns]);
        ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &link.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", link.host_ip),
            "dev",
            &link.host_if,
        ]);
        ip(&["link", "set", &link.host_if, "up"]);
        let ns_ip = format!("{}/30", link.ns_ip);
        ip(&[
            "netns", "exec", &link.ns, "ip", "addr", "add", &ns_ip, "dev", &peer,
        ]);
        ip(&["netns", "exec", &link.ns, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &link.ns, "ip", "link", "set", "lo", "up"]);
        link
    }

    /// Relays `ns_ip:port` inside the namespace to `host_ip:port` (the simulator) across
    /// the link.
    fn relay(&mut self, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "socat"])
            .arg(format!(
                "TCP-LISTEN:{port},bind={},fork,reuseaddr",
                self.ns_ip
            ))
            .arg(format!("TCP:{}:{port}", self.host_ip))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat starts (scripts/setup-test-deps installs it)");
        self.relay = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(
            &SocketAddr::from((self.ns_ip, port)),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "socat listens in the namespace"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn set(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(mut relay) = self.relay.take() {
            let _ = relay.kill();
            let _ = relay.wait();
        }
        // Deleting one end of a veth pair deletes both; the namespace goes last.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_path_silently_stalled_by_link_down() {
    let mut link = Link::create();
    // The simulator must answer on the link's host side too, and on a port known before
    // it starts (the relay forwards the same port).
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HarnessConfig::fast(dir.path().to_path_buf());
    cfg.sim_listen = SocketAddr::from(([0, 0, 0, 0], port));
    cfg.url_host = Some("upstream.test".to_owned());
    // Off loopback: HTTPS (the consumer refuses plain HTTP to anything but loopback).
    cfg.tls = true;
    // Path a: loopback. Path b: out through the veth link to the relay in the namespace.
    cfg.paths = vec![
        Some(IpAddr::from([127, 0, 0, 2])),
        Some(IpAddr::from(link.host_ip)),
    ];
    cfg.resolve_ips = vec![
        Some(IpAddr::from([127, 0, 0, 1])),
        Some(IpAddr::from(link.ns_ip)),
    ];
    link.relay(port);
    let h = Harness::start(cfg)
        .await
        .expect("simulator and pipeline start");
    assert!(
        h.wait_connected(Duration::from_secs(10)).await,
        "both paths connect, path b through the namespace"
    );
    let b_peers: Vec<_> = h
        .sim
        .connections()
        .into_iter()
        .filter(|c| c.client.ip() == IpAddr::from(link.ns_ip))
        .collect();
    assert_eq!(
        b_peers.len(),
        2,
        "path b of each partition arrives through the relay"
    );

    let mut alerts = h.pipeline.alert_transitions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = Instant::now();
    link.set(false);
    // Both partitions' path b go quiet; each is noticed and replaced.
    let mut stale = std::collections::BTreeSet::new();
    let deadline = at + Duration::from_secs(10);
    while stale.len() < 2 {
        let t = tokio::time::timeout_at(deadline, alerts.recv())
            .await
            .expect("both stalls detected within 10 s")
            .unwrap();
        if let Transition::Fired(v) = t
            && v.key.name == AlertName::ConnectionStale
        {
            stale.insert(v.key.partition);
        }
    }
    let detected = at.elapsed();
    // While the link is down, path a alone keeps both partitions covered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = h.status();
    for p in &status.streams[0].partitions {
        assert!(
            p.live_connections >= 1,
            "partition {} stays covered by path a",
            p.partition
        );
    }
    link.set(true);
    assert!(
        h.wait_connected(Duration::from_secs(15)).await,
        "path b reconnects once its link is back"
    );
    let repaired = at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = h.finish(Duration::from_secs(20)).await;
    judge(
        "one path link down (netns)",
        &v,
        Some(detected),
        Some(repaired),
    );
}

//! The plan `tandem check` prints: what a configuration will do when it runs.

use std::fmt::Write;

use crate::load::Loaded;
use crate::schema::SinkConfig;

/// A human-readable plan: streams, partitions, the connections each will open and through
/// which path, sinks, and the endpoint.
pub fn plan(loaded: &Loaded) -> String {
    let c = &loaded.config;
    let mut out = String::new();
    let mut total = 0;
    for s in &c.streams {
        let partitions: Vec<u32> = s
            .only_partitions
            .clone()
            .unwrap_or_else(|| (1..=s.partitions).collect());
        let url = tandem_core::redact_url(&s.url);
        let _ = writeln!(out, "stream {} ({:?}) {url}", s.name, s.api);
        let _ = writeln!(
            out,
            "  {} partition(s) x {} path(s) = {} connections; connect budget {} per {} s; backfill {:?} up to {} min",
            partitions.len(),
            s.paths.len(),
            partitions.len() * s.paths.len(),
            s.budget.requests,
            s.budget.window_ms as f64 / 1000.0,
            s.backfill.policy,
            s.backfill.window_minutes
        );
        total += partitions.len() * s.paths.len();
        for p in &partitions {
            for name in &s.paths {
                let mut via = Vec::new();
                if let Some(path) = c.paths.iter().find(|x| &x.name == name) {
                    if let Some(a) = path.source_address {
                        via.push(format!("source {a}"));
                        // Checked here, on the host that will run it: a bind that fails
                        // would make every connection over the path fail locally.
                        if std::net::TcpListener::bind((a, 0)).is_err() {
                            via.push(format!("WARNING: {a} is not an address of this host"));
                        }
                    }
                    if let Some(i) = &path.interface {
                        via.push(format!("interface {i}"));
                    }
                    if let Some(x) = &path.proxy {
                        via.push(format!("proxy {}", tandem_core::redact_url(x)));
                    }
                    if let Some(ip) = path.resolve_ip {
                        via.push(format!("pinned to {ip}"));
                    }
                }
                if via.is_empty() {
                    via.push("default route".to_owned());
                }
                let _ = writeln!(out, "    partition {p} via path {name}: {}", via.join(", "));
            }
        }
        let sink = c.sinks.get(&s.sink);
        let detail = sink.map_or_else(|| "missing".to_owned(), SinkConfig::describe);
        let _ = writeln!(out, "  sink {}: {detail}", s.sink);
    }
    let _ = writeln!(
        out,
        "{total} connections in all; dedup window {} s; metrics and status on http://{}",
        c.merge.dedup_window_secs, c.monitor.listen
    );
    out
}

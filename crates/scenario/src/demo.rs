//! `tandem demo`: the simulator in-process, two partitions with two paths each, the whole
//! pipeline into local files, faults on a schedule, a live summary and a final report
//! judged by the simulator's ground truth.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tandem_monitor::{AlertKey, Status, Transition};
use tandem_sim::{Fault, Target};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::harness::{Harness, HarnessApi, HarnessConfig, HarnessError, Verdict};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    /// This run's directory (files, dead letters, spool, log).
    pub run_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    /// Activities per second over both partitions.
    pub rate_per_sec: f64,
    /// The upstream API the simulator speaks.
    pub api: DemoApi,
}

/// The upstream a demo runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoApi {
    /// A Gnip Decahose (`sample10`, 2 partitions, recovery on its own host).
    Gnip,
    /// The X API v2 partitioned sample stream (`/2/tweets/sample10/stream`, 2 partitions,
    /// 20 s heartbeats, recovery on the live URL ending by close).
    V2,
}

/// A scheduled fault.
struct Scheduled {
    at: Duration,
    what: String,
    faults: Vec<Fault>,
    done: bool,
}

/// The two source addresses of the demo's paths (loopback aliases on Linux).
fn path_addresses() -> Vec<Option<IpAddr>> {
    if cfg!(target_os = "linux") {
        vec![Some([127, 0, 0, 2].into()), Some([127, 0, 0, 3].into())]
    } else {
        vec![None, None]
    }
}

/// The result of a demo run.
#[derive(Debug)]
pub struct DemoReport {
    pub verdict: Verdict,
    pub text: String,
}

/// Runs the demo, printing the live summary to stdout.
pub async fn run(opts: DemoOptions) -> Result<DemoReport, HarnessError> {
    let h = Harness::start(demo_config(&opts)).await?;
    let transitions = h.pipeline.alert_transitions();
    let mut schedule = fault_schedule(opts.duration, &h.cfg.paths, &h.cfg.stream);
    let mut timeline = Timeline {
        started: Instant::now(),
        transitions,
        log: Vec::new(),
    };
    println!(
        "tandem demo: simulator {} | metrics http://{}/metrics | status http://{}/status | files {}",
        h.sim.base_url(),
        h.pipeline.http_addr(),
        h.pipeline.http_addr(),
        opts.run_dir.join("store").display()
    );
    watch(&h, &mut schedule, &mut timeline, opts.duration).await;
    let final_status = h.status();
    println!("\nstopping the generator and letting the consumer settle...");
    let verdict = h.finish(Duration::from_secs(30)).await;
    timeline.record_alerts();
    let text = report(&verdict, &final_status, &timeline.log, &opts);
    println!("{text}");
    Ok(DemoReport { verdict, text })
}

/// The real service's timings (10 s heartbeats, 60 s minutes, 10 connects per 61 s, the
/// published backoff schedule) on the test harness's shape.
fn demo_config(opts: &DemoOptions) -> HarnessConfig {
    let (stream, api, heartbeat_ms) = match opts.api {
        DemoApi::Gnip => ("decahose", HarnessApi::Gnip, 10_000),
        DemoApi::V2 => ("sample10", HarnessApi::V2Sample10, 20_000),
    };
    HarnessConfig {
        stream: stream.to_owned(),
        api,
        paths: path_addresses(),
        rate_per_sec: opts.rate_per_sec,
        heartbeat_ms,
        heartbeat_margin_ms: 5_000,
        data_silence_ms: 2_000,
        minute_ms: 60_000,
        dedup_window_secs: 900,
        monitor_listen: opts.metrics_listen,
        connect_limit: 10,
        connect_window_ms: 61_000,
        fast_retry: false,
        repair_margin_secs: 30,
        ..HarnessConfig::fast(opts.run_dir.clone())
    }
}

/// The faults of a run lasting `d`, through the source addresses `paths`: a dropped
/// path, a stalled path, then an outage of a whole partition.
fn fault_schedule(d: Duration, paths: &[Option<IpAddr>], stream: &str) -> [Scheduled; 3] {
    let at = |f: f64| Duration::from_secs_f64(d.as_secs_f64() * f);
    let on = |partition: u32, path: usize| Target {
        stream: Some(stream.into()),
        partition: Some(partition),
        client_ip: paths[path],
        connection: None,
    };
    let outage_ms = (d.as_millis() as u64 / 10).clamp(1_000, 4_000);
    [
        Scheduled {
            at: at(0.2),
            what: "drop path a of partition 1".into(),
            faults: vec![Fault::Drop { target: on(1, 0) }],
            done: false,
        },
        Scheduled {
            at: at(0.4),
            what: "stall path b of partition 2 (silent: no bytes at all)".into(),
            faults: vec![Fault::Stall { target: on(2, 1) }],
            done: false,
        },
        Scheduled {
            at: at(0.6),
            what: format!(
                "outage of both paths of partition 1 ({:.0} s of 503, then backfill)",
                outage_ms as f64 / 1000.0
            ),
            faults: vec![
                Fault::Reject {
                    stream: stream.into(),
                    partition: Some(1),
                    status: 503,
                    count: None,
                    for_ms: Some(outage_ms),
                },
                Fault::Drop {
                    target: Target {
                        stream: Some(stream.into()),
                        partition: Some(1),
                        ..Target::default()
                    },
                },
            ],
            done: false,
        },
    ]
}

/// What happened during a run, one line per event (a fault injected, an alert firing
/// or resolved), timed from the start.
struct Timeline {
    started: Instant,
    transitions: broadcast::Receiver<Transition>,
    log: Vec<String>,
}

impl Timeline {
    /// Logs every alert transition received since the last call.
    fn record_alerts(&mut self) {
        while let Ok(t) = self.transitions.try_recv() {
            self.log.push(describe(&t, self.started.elapsed()));
        }
    }
}

/// Until `total` has passed: injects each fault when it is due, logs the alerts, and shows
/// the live summary (the whole screen on a terminal, a line every 5 s otherwise).
async fn watch(h: &Harness, schedule: &mut [Scheduled], timeline: &mut Timeline, total: Duration) {
    let tty = std::io::stdout().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    while timeline.started.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let elapsed = timeline.started.elapsed();
        inject_due(h, schedule, elapsed, &mut timeline.log);
        timeline.record_alerts();
        let status = h.status();
        if tty {
            print!(
                "\x1b[2J\x1b[H{}",
                screen(&status, elapsed, total, &timeline.log)
            );
        } else if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            println!("{}", one_line(&status, elapsed));
        }
    }
}

/// Injects the faults due by `elapsed` that are not injected yet, and logs them.
fn inject_due(h: &Harness, schedule: &mut [Scheduled], elapsed: Duration, log: &mut Vec<String>) {
    for s in schedule.iter_mut().filter(|s| !s.done && elapsed >= s.at) {
        for f in &s.faults {
            let _ = h.sim.fault(f.clone());
        }
        s.done = true;
        log.push(format!(
            "{:>5.1}s  fault: {}",
            elapsed.as_secs_f64(),
            s.what
        ));
    }
}

fn describe(t: &Transition, at: Duration) -> String {
    match t {
        Transition::Fired(v) => format!(
            "{:>5.1}s  alert firing: {} ({})",
            at.as_secs_f64(),
            alert_subject(&v.key),
            v.message
        ),
        Transition::Resolved(r) => format!(
            "{:>5.1}s  alert resolved: {} after {:.1} s",
            at.as_secs_f64(),
            alert_subject(&r.key),
            r.firing_secs
        ),
    }
}

/// An alert's name and what it is about: `name stream[/partition][/path]`.
fn alert_subject(key: &AlertKey) -> String {
    format!(
        "{} {}{}{}",
        key.name.as_str(),
        key.stream,
        key.partition.map(|p| format!("/{p}")).unwrap_or_default(),
        key.path
            .as_ref()
            .map(|p| format!("/{p}"))
            .unwrap_or_default()
    )
}

/// The live one-screen summary.
pub fn screen(s: &Status, elapsed: Duration, total: Duration, log: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tandem demo  {:.0} s of {:.0} s\n",
        elapsed.as_secs_f64(),
        total.as_secs_f64()
    );
    for st in &s.streams {
        let _ = writeln!(out, "stream {}  stored {:.0}/s", st.name, st.stored_per_sec);
        for p in &st.partitions {
            let c = &p.counts;
            let gaps = p.coverage_gaps.len();
            let _ = writeln!(
                out,
                "  partition {}  live {}/{}  raw {}  unique {}  duplicates removed {}  stored {}  in flight {}  dead letters {}  coverage gaps {}",
                p.partition,
                p.live_connections,
                p.configured_connections,
                c.raw,
                c.unique,
                c.duplicates,
                c.stored,
                c.in_flight,
                c.dead_lettered,
                gaps
            );
            for conn in &p.connections {
                let err = conn
                    .last_error
                    .as_deref()
                    .map(|e| e.chars().take(70).collect::<String>())
                    .unwrap_or_else(|| "-".to_owned());
                let _ = writeln!(
                    out,
                    "    path {:<2} {:<10} received {:<8} connects {:<3} last error: {}",
                    conn.path, conn.phase, conn.items_received, conn.connects, err
                );
            }
        }
    }
    let _ = writeln!(out, "\nalerts now:");
    if s.alerts.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for a in &s.alerts {
        let _ = writeln!(
            out,
            "  {:?} {} {} {:?} {}",
            a.phase,
            a.key.name.as_str(),
            a.key.stream,
            a.key.partition,
            a.message
        );
    }
    let _ = writeln!(out, "\nevents:");
    for line in log.iter().rev().take(12).rev() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

fn one_line(s: &Status, elapsed: Duration) -> String {
    let mut out = format!("{:>5.1}s", elapsed.as_secs_f64());
    for st in &s.streams {
        for p in &st.partitions {
            let _ = write!(
                out,
                "  p{} live {}/{} unique {} stored {}",
                p.partition,
                p.live_connections,
                p.configured_connections,
                p.counts.unique,
                p.counts.stored
            );
        }
    }
    let _ = write!(out, "  alerts {}", s.alerts.len());
    out
}

fn report(v: &Verdict, s: &Status, log: &[String], opts: &DemoOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== tandem demo report ==");
    let _ = writeln!(
        out,
        "published by the simulator (ground truth): {}",
        v.published
    );
    let _ = writeln!(
        out,
        "stored in files:                            {} lines, {} distinct",
        v.stored_lines, v.stored_distinct
    );
    let _ = writeln!(
        out,
        "duplicates removed by the merger:           {}",
        v.duplicates_removed
    );
    let _ = writeln!(
        out,
        "dead letters:                               {}",
        v.dead_lettered
    );
    let _ = writeln!(
        out,
        "lost: {}   stored twice: {}   stored but never published: {}",
        v.lost, v.stored_twice, v.not_published
    );
    for st in &s.streams {
        for p in &st.partitions {
            for g in &p.coverage_gaps {
                let _ = writeln!(
                    out,
                    "coverage gap: {} partition {}: {:.1} s",
                    st.name, p.partition, g.secs
                );
            }
        }
    }
    let _ = writeln!(out, "timeline:");
    for line in log {
        let _ = writeln!(out, "  {line}");
    }
    for (sink, r) in &v.shutdown.sinks {
        let _ = writeln!(
            out,
            "sink {sink}: drained {} at shutdown, {} left in spool, {} stored in all",
            r.drained, r.left_in_spool, r.stored_total
        );
    }
    let _ = writeln!(out, "files: {}", opts.run_dir.join("store").display());
    let verdict = if v.clean() && v.settled {
        "nothing lost, nothing duplicated".to_owned()
    } else {
        format!(
            "NOT CLEAN: {} lost (e.g. {:?}), {} stored twice, settled: {}",
            v.lost, v.lost_examples, v.stored_twice, v.settled
        )
    };
    let _ = writeln!(out, "verdict: {verdict}");
    out
}

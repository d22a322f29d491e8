//! Connections against the simulator: paths, status classes, backoff, the connect budget,
//! stale detection and backfill.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_conn::*;
use tandem_core::{
    ActivityId, Batch, LineKind, Origin, PathId, Secret, SecretSource, StreamId, identify,
};
use tandem_sim::{Fault, RateProfile, SimConfig, Simulator, StreamConfig, Target};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const USER: &str = "ops@example.com";
const PASS: &str = "s3cret";

fn sim_stream(per_sec: f64) -> StreamConfig {
    let mut s = StreamConfig::decahose("d", "acme", USER, PASS);
    s.rate = RateProfile::Constant { per_sec };
    s.heartbeat_interval_ms = Some(200);
    s.minute_ms = 1_000;
    s.info_every = 0;
    // Tests that are not about the connect budget reconnect far more often than the real
    // limit allows; the budget test sets both sides to the same limit.
    s.connect_limit = 10_000;
    s
}

async fn start(stream: StreamConfig) -> Simulator {
    install_crypto_provider();
    Simulator::start(SimConfig {
        streams: vec![stream],
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn fast_retry() -> RetryConfig {
    RetryConfig {
        network_initial_backoff_ms: 50,
        network_backoff_step_ms: 50,
        network_max_backoff_ms: 500,
        http_initial_backoff_ms: 100,
        http_max_backoff_ms: 400,
        rate_limit_initial_backoff_ms: 300,
        rate_limit_max_backoff_ms: 600,
        refused_initial_backoff_ms: 300,
        refused_max_backoff_ms: 600,
        healthy_after_ms: 500,
        ..RetryConfig::default()
    }
}

fn fast_liveness() -> LivenessConfig {
    LivenessConfig {
        heartbeat_interval_ms: Some(200),
        heartbeat_margin_ms: 300,
        data_silence_ms: 1_000,
        read_timeout_ms: 5_000,
        connect_timeout_ms: 2_000,
        ..LivenessConfig::default()
    }
}

/// A stream's connections (`paths` per partition) feeding one channel per partition.
struct Harness {
    conns: Vec<Connection>,
    /// Each partition's shared liveness (a test plays the pair's other consumer here).
    partitions: Vec<Arc<PartitionLiveness>>,
    batches: Vec<mpsc::Receiver<Batch>>,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    shutdown: watch::Sender<bool>,
}

struct Setup {
    partitions: u32,
    paths: Vec<&'static str>,
    retry: RetryConfig,
    liveness: LivenessConfig,
    budget: BudgetConfig,
    backfill: BackfillConfig,
    password: &'static str,
    /// Read the password from this file instead (again before each attempt).
    password_file: Option<std::path::PathBuf>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            partitions: 1,
            paths: vec!["127.0.0.2", "127.0.0.3"],
            retry: fast_retry(),
            liveness: fast_liveness(),
            budget: BudgetConfig {
                requests: 100,
                window_ms: 1_000,
            },
            backfill: BackfillConfig {
                minute_ms: 1_000,
                ..BackfillConfig::default()
            },
            password: PASS,
            password_file: None,
        }
    }
}

fn spawn(sim: &Simulator, setup: Setup) -> Harness {
    let url = sim.stream_url("d").unwrap();
    let budget = Arc::new(ConnectBudget::new(&setup.budget));
    let (events_tx, events) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut conns = Vec::new();
    let mut batches = Vec::new();
    let mut partitions = Vec::new();
    for partition in 1..=setup.partitions {
        let (tx, rx) = mpsc::channel(1024);
        batches.push(rx);
        let liveness = Arc::new(PartitionLiveness::new(setup.paths.len()));
        partitions.push(liveness.clone());
        for (i, ip) in setup.paths.iter().enumerate() {
            let path = PathConfig {
                name: format!("p{i}"),
                source_address: Some(ip.parse::<IpAddr>().unwrap()),
                interface: None,
                proxy: None,
                resolve_ip: None,
            };
            let tls = TlsSettings {
                extra_ca_pem: None,
                allow_plain_http: true,
            };
            let client =
                build_client(&path, &tls, &setup.liveness, "127.0.0.1", sim.addr().port()).unwrap();
            let spec = ConnectionSpec {
                key: ConnKey {
                    stream: "d".into(),
                    partition,
                    path: path.name.clone().into(),
                },
                origin: Origin {
                    stream: StreamId(0),
                    partition,
                    path: PathId(i as u8),
                },
                endpoint: Endpoint {
                    url: url.clone(),
                    recovery_url: sim.recovery_url("d").unwrap(),
                    api: ApiKind::Gnip,
                    partitioned: true,
                    auth: Auth::Basic {
                        username: USER.into(),
                        password: match &setup.password_file {
                            Some(f) => SecretSource::File(f.clone()),
                            None => SecretSource::Value(Secret::new(setup.password)),
                        },
                    },
                },
                client,
                retry: setup.retry.clone(),
                liveness: setup.liveness.clone(),
                backfill: setup.backfill.clone(),
                read: ReadConfig::default(),
                budget: budget.clone(),
                partition: liveness.clone(),
                tally: Arc::new(tandem_core::Tally::default()),
            };
            conns.push(Connection::spawn(
                spec,
                tx.clone(),
                events_tx.clone(),
                shutdown_rx.clone(),
            ));
        }
    }
    Harness {
        conns,
        partitions,
        batches,
        events,
        shutdown,
    }
}

impl Harness {
    async fn wait_event(
        &mut self,
        within: Duration,
        mut want: impl FnMut(&ConnEvent) -> bool,
    ) -> ConnEvent {
        tokio::time::timeout(within, async {
            loop {
                let ev = self.events.recv().await.expect("events flow");
                if want(&ev) {
                    return ev;
                }
            }
        })
        .await
        .expect("the expected event arrived in time")
    }

    /// Activity ids received on partition `p` (index from 0) so far.
    fn drain_ids(&mut self, p: usize, into: &mut Vec<ActivityId>) {
        while let Ok(b) = self.batches[p].try_recv() {
            for l in &b.lines {
                if let Ok(LineKind::Activity(id)) = identify(l) {
                    into.push(id);
                }
            }
        }
    }

    /// Stops generation, then collects partition `p`'s ids until every published one has
    /// arrived (or `within` passed): judged by what arrives, not by how long it took.
    async fn all_of_partition_1(
        &mut self,
        sim: &Simulator,
        p: usize,
        within: Duration,
    ) -> (usize, usize) {
        sim.set_rate("d", RateProfile::Constant { per_sec: 0.0 })
            .unwrap();
        let deadline = Instant::now() + within;
        let mut got = HashSet::new();
        loop {
            let mut ids = Vec::new();
            self.drain_ids(p, &mut ids);
            got.extend(ids);
            let truth: HashSet<ActivityId> =
                sim.truth("d", 1).unwrap().iter().map(|r| r.id).collect();
            let missing = truth.difference(&got).count();
            if missing == 0 || Instant::now() >= deadline {
                return (missing, truth.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        for c in self.conns {
            tokio::time::timeout(Duration::from_secs(5), c.join())
                .await
                .expect("connections stop on shutdown");
        }
    }
}

/// The two connections of a partition leave through different source addresses.
#[tokio::test]
async fn paths_use_their_own_source_addresses() {
    let sim = start(sim_stream(50.0)).await;
    let mut h = spawn(&sim, Setup::default());
    for _ in 0..2 {
        h.wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Connected { .. })
        })
        .await;
    }
    let ips: HashSet<String> = sim
        .connections()
        .iter()
        .map(|c| c.client.ip().to_string())
        .collect();
    assert_eq!(
        ips,
        HashSet::from(["127.0.0.2".to_owned(), "127.0.0.3".to_owned()])
    );
    h.stop().await;
}

/// 401 is retried on the slow schedule, never given up, the password read from its file
/// again before each attempt: a rotated password heals without a restart.
#[tokio::test]
async fn unauthorized_is_retried_slowly_and_heals_when_the_password_file_changes() {
    let sim = start(sim_stream(10.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "wrong\n").unwrap();
    let mut h = spawn(
        &sim,
        Setup {
            paths: vec!["127.0.0.2"],
            password_file: Some(file.clone()),
            ..Setup::default()
        },
    );
    let mut refused = 0;
    while refused < 2 {
        match h.wait_event(Duration::from_secs(10), |_| true).await {
            ConnEvent::Disconnected { error, .. } => {
                assert_eq!(error.kind, ErrorKind::Authentication);
                assert_eq!(error.status, Some(401));
                refused += 1;
            }
            ConnEvent::Reconnecting { delay, .. } => assert!(
                delay >= Duration::from_millis(240),
                "refusals wait on the slow schedule: {delay:?}"
            ),
            ConnEvent::Fatal { error, .. } => panic!("gave up: {error}"),
            ConnEvent::Connected { .. } => panic!("connected with the wrong password"),
            _ => {}
        }
    }
    assert_ne!(h.conns[0].state.borrow().phase, ConnPhase::Stopped);
    std::fs::write(&file, format!("{PASS}\n")).unwrap();
    h.wait_event(Duration::from_secs(10), |e| {
        matches!(e, ConnEvent::Connected { .. })
    })
    .await;
    h.stop().await;
}

/// 406 and other 4xx are refusals, retried on the slow schedule; 503 and 429 are retried
/// with their schedules; the connection comes up once the upstream recovers.
#[tokio::test]
async fn status_classes_are_handled() {
    let sim = start(sim_stream(10.0)).await;
    sim.fault(Fault::Reject {
        stream: "d".into(),
        partition: None,
        status: 406,
        count: Some(1),
        for_ms: None,
    })
    .unwrap();
    let mut h = spawn(
        &sim,
        Setup {
            paths: vec!["127.0.0.2"],
            ..Setup::default()
        },
    );
    let ev = h
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Disconnected { .. })
        })
        .await;
    assert!(
        matches!(&ev, ConnEvent::Disconnected { error, .. } if error.kind == ErrorKind::ClientError && error.status == Some(406)),
        "{ev:?}"
    );
    let ev = h
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Reconnecting { .. })
        })
        .await;
    assert!(
        matches!(ev, ConnEvent::Reconnecting { delay, .. } if delay >= Duration::from_millis(240)),
        "{ev:?}"
    );
    h.wait_event(Duration::from_secs(10), |e| {
        matches!(e, ConnEvent::Connected { .. })
    })
    .await;
    h.stop().await;

    sim.fault(Fault::Reject {
        stream: "d".into(),
        partition: None,
        status: 503,
        count: Some(2),
        for_ms: None,
    })
    .unwrap();
    sim.fault(Fault::Reject {
        stream: "d".into(),
        partition: None,
        status: 429,
        count: Some(1),
        for_ms: None,
    })
    .unwrap();
    let started = Instant::now();
    let mut h = spawn(
        &sim,
        Setup {
            paths: vec!["127.0.0.2"],
            ..Setup::default()
        },
    );
    let mut delays = Vec::new();
    loop {
        match h.wait_event(Duration::from_secs(10), |_| true).await {
            ConnEvent::Reconnecting { delay, .. } => delays.push(delay),
            ConnEvent::Connected { .. } => break,
            ConnEvent::Fatal { error, .. } => panic!("gave up: {error}"),
            _ => {}
        }
    }
    // Two 503s (exponential from 100 ms) then a 429 (from 300 ms), with ±20 % jitter.
    assert_eq!(delays.len(), 3, "{delays:?}");
    assert!(
        delays[0] >= Duration::from_millis(80) && delays[0] <= Duration::from_millis(120),
        "{delays:?}"
    );
    assert!(
        delays[1] >= Duration::from_millis(160) && delays[1] <= Duration::from_millis(240),
        "{delays:?}"
    );
    assert!(
        delays[2] >= Duration::from_millis(300),
        "429 waits at least its minimum: {delays:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(540));
    h.stop().await;
}

/// A server that accepts and closes at once gets growing delays, not a tight loop.
#[tokio::test]
async fn accept_then_close_is_not_a_tight_loop() {
    install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let liveness = fast_liveness();
    let path = PathConfig {
        name: "a".into(),
        source_address: None,
        interface: None,
        proxy: None,
        resolve_ip: None,
    };
    let client = build_client(
        &path,
        &TlsSettings {
            extra_ca_pem: None,
            allow_plain_http: true,
        },
        &liveness,
        "127.0.0.1",
        addr.port(),
    )
    .unwrap();
    let (tx, _rx) = mpsc::channel(16);
    let (events_tx, _events) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let spec = ConnectionSpec {
        key: ConnKey {
            stream: "x".into(),
            partition: 1,
            path: "a".into(),
        },
        origin: Origin {
            stream: StreamId(0),
            partition: 1,
            path: PathId(0),
        },
        endpoint: Endpoint {
            url: format!("http://{addr}/stream"),
            recovery_url: format!("http://{addr}/stream"),
            api: ApiKind::Gnip,
            partitioned: true,
            auth: Auth::Bearer(SecretSource::Value(Secret::new("t"))),
        },
        client,
        retry: RetryConfig {
            network_initial_backoff_ms: 250,
            network_backoff_step_ms: 250,
            ..RetryConfig::default()
        },
        liveness,
        backfill: BackfillConfig::default(),
        read: ReadConfig::default(),
        budget: Arc::new(ConnectBudget::new(&BudgetConfig {
            requests: 1000,
            window_ms: 1000,
        })),
        partition: Arc::new(PartitionLiveness::new(1)),
        tally: Arc::new(tandem_core::Tally::default()),
    };
    let conn = Connection::spawn(spec, tx, events_tx, shutdown_rx);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // 250 + 500 + 750 + 1000 ms (±20 %) fit at most 5 attempts into 3 s; a loaded machine
    // fits fewer, a tight loop hundreds.
    assert!((1..=6).contains(&n), "{n} connections in 3 s");
    shutdown.send_replace(true);
    conn.join().await;
}

/// Four connections flapping every 100 ms never send more requests per window than the
/// budget allows, so the upstream never answers 429.
#[tokio::test]
async fn connect_budget_holds_while_flapping() {
    let mut stream = sim_stream(50.0);
    stream.connect_limit = 10;
    stream.connect_window_ms = 2_000;
    let sim = start(stream).await;
    let h = spawn(
        &sim,
        Setup {
            partitions: 2,
            budget: BudgetConfig {
                requests: 10,
                window_ms: 2_050,
            },
            retry: RetryConfig {
                network_initial_backoff_ms: 10,
                network_backoff_step_ms: 10,
                healthy_after_ms: 60_000,
                ..fast_retry()
            },
            ..Setup::default()
        },
    );
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim.fault(Fault::Drop {
            target: Target::default(),
        })
        .unwrap();
    }
    let stats = sim.stats("d").unwrap();
    assert!(
        stats.requests >= 25,
        "the connections did flap: {} requests",
        stats.requests
    );
    assert!(
        stats.max_requests_per_window <= 10,
        "busiest window: {}",
        stats.max_requests_per_window
    );
    assert_eq!(stats.responses.get(&429), None);
    h.stop().await;
}

/// A silently stalled path is detected by data silence against its sibling within the
/// threshold and reconnected; the two paths together lose nothing.
#[tokio::test]
async fn stalled_path_is_detected_and_nothing_is_lost() {
    let sim = start(sim_stream(200.0)).await;
    let mut h = spawn(&sim, Setup::default());
    for _ in 0..2 {
        h.wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Connected { .. })
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled_at = Instant::now();
    sim.fault(Fault::Stall {
        target: Target {
            client_ip: Some("127.0.0.2".parse().unwrap()),
            ..Target::default()
        },
    })
    .unwrap();
    let ev = h
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Stale { .. })
        })
        .await;
    let detected = stalled_at.elapsed();
    let ConnEvent::Stale { key, reason, .. } = ev else {
        unreachable!()
    };
    assert_eq!(&*key.path, "p0");
    // A full stall stops heartbeats too: the 500 ms heartbeat gap fires before the 1 s
    // silence threshold.
    assert_eq!(reason, StaleReason::HeartbeatGap);
    println!("stall detected after {detected:?} (heartbeat gap, 500 ms threshold)");
    h.wait_event(
        Duration::from_secs(5),
        |e| matches!(e, ConnEvent::Connected { key, .. } if &*key.path == "p0"),
    )
    .await;
    let (missing, published) = h.all_of_partition_1(&sim, 0, Duration::from_secs(20)).await;
    assert_eq!(missing, 0, "{missing} of {published} missing");
    h.stop().await;
}

/// A path that keeps sending heartbeats but no activities is stale by data silence,
/// judged against its sibling, within the threshold.
#[tokio::test]
async fn heartbeats_without_data_is_data_silence() {
    let sim = start(sim_stream(200.0)).await;
    let mut h = spawn(&sim, Setup::default());
    for _ in 0..2 {
        h.wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Connected { .. })
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = Instant::now();
    sim.fault(Fault::HeartbeatsOnly {
        target: Target {
            client_ip: Some("127.0.0.3".parse().unwrap()),
            ..Target::default()
        },
    })
    .unwrap();
    let ev = h
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Stale { .. })
        })
        .await;
    let detected = at.elapsed();
    let ConnEvent::Stale { key, reason, .. } = ev else {
        unreachable!()
    };
    assert_eq!((&*key.path, reason), ("p1", StaleReason::DataSilence));
    // Never before the threshold (silence counts from the last activity, a little before
    // the fault); how much later depends on the machine's load, so it is printed only.
    assert!(
        detected >= Duration::from_millis(900),
        "detected after {detected:?} (threshold 1 s)"
    );
    println!("data silence detected after {detected:?} (threshold 1 s)");
    h.stop().await;
}

/// One path per process (a zone of the pair): heartbeats but no activities on a partition
/// that ran 200/s is stale by its own rate, with no sibling to judge against.
#[tokio::test]
async fn single_path_silence_is_judged_by_the_partitions_rate() {
    let sim = start(sim_stream(200.0)).await;
    let mut h = spawn(
        &sim,
        Setup {
            paths: vec!["127.0.0.2"],
            ..Setup::default()
        },
    );
    h.wait_event(Duration::from_secs(5), |e| {
        matches!(e, ConnEvent::Connected { .. })
    })
    .await;
    // A few seconds of its rate first (the average builds up over time).
    tokio::time::sleep(Duration::from_secs(2)).await;
    sim.fault(Fault::HeartbeatsOnly {
        target: Target::default(),
    })
    .unwrap();
    let ev = h
        .wait_event(Duration::from_secs(10), |e| {
            matches!(e, ConnEvent::Stale { .. })
        })
        .await;
    assert!(
        matches!(ev, ConnEvent::Stale { reason: StaleReason::RateSilence, silent_for, .. } if silent_for >= Duration::from_secs(1)),
        "{ev:?}"
    );
    h.stop().await;
}

/// One path per process, the pair's other consumer reporting newer activities of the
/// partition while this path gets heartbeats only: stale on the peer's evidence.
#[tokio::test]
async fn single_path_silence_is_judged_against_the_peer() {
    let sim = start(sim_stream(200.0)).await;
    let mut h = spawn(
        &sim,
        Setup {
            paths: vec!["127.0.0.2"],
            liveness: LivenessConfig {
                // Rate silence out of the way: only the peer's evidence can decide.
                silence_min_rate_per_sec: 1e9,
                ..fast_liveness()
            },
            ..Setup::default()
        },
    );
    h.wait_event(Duration::from_secs(5), |e| {
        matches!(e, ConnEvent::Connected { .. })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The peer's beacon: the latest activity it received is always "now".
    let partition = h.partitions[0].clone();
    let beacon = tokio::spawn(async move {
        loop {
            partition.set_peer_latest(Some(partition.upstream_now_ms()));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    sim.fault(Fault::HeartbeatsOnly {
        target: Target::default(),
    })
    .unwrap();
    let ev = h
        .wait_event(Duration::from_secs(10), |e| {
            matches!(e, ConnEvent::Stale { .. })
        })
        .await;
    beacon.abort();
    assert!(
        matches!(
            ev,
            ConnEvent::Stale {
                reason: StaleReason::PeerAhead,
                ..
            }
        ),
        "{ev:?}"
    );
    h.stop().await;
}

/// When both paths of a partition go down, the reconnect asks for ceil(gap) minutes of
/// backfill and the replay closes the gap.
#[tokio::test]
async fn both_paths_down_reconnect_with_backfill() {
    let sim = start(sim_stream(200.0)).await; // one "minute" = 1 s
    let mut h = spawn(&sim, Setup::default());
    for _ in 0..2 {
        h.wait_event(Duration::from_secs(5), |e| {
            matches!(e, ConnEvent::Connected { .. })
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.fault(Fault::Reject {
        stream: "d".into(),
        partition: None,
        status: 503,
        count: None,
        for_ms: Some(1_500),
    })
    .unwrap();
    sim.fault(Fault::Drop {
        target: Target::default(),
    })
    .unwrap();
    let ev = h
        .wait_event(
            Duration::from_secs(10),
            |e| matches!(e, ConnEvent::Connected { backfill_minutes, .. } if *backfill_minutes > 0),
        )
        .await;
    let ConnEvent::Connected {
        backfill_minutes, ..
    } = ev
    else {
        unreachable!()
    };
    assert!(
        (2..=5).contains(&backfill_minutes),
        "a ~1.6 s gap plus slack asks for 2-4 one-second minutes: {backfill_minutes}"
    );
    let (missing, _) = h.all_of_partition_1(&sim, 0, Duration::from_secs(20)).await;
    assert_eq!(missing, 0, "the backfill closed the gap");
    h.stop().await;
}

/// Both paths of a partition down for longer than backfill reaches: the part the replays
/// cannot reach goes to gap repair once, as one interval, whatever the number of failed
/// attempts during the outage and however far apart the two paths' answers are. An
/// outage the window reaches hands nothing over.
#[tokio::test]
async fn an_outage_beyond_backfill_is_one_gap() {
    let sim = start(sim_stream(200.0)).await;
    let mut h = spawn(
        &sim,
        Setup {
            // One "minute" = 2 s, one of them at most: the window reaches 2 s.
            backfill: BackfillConfig {
                minute_ms: 2_000,
                window_minutes: 1,
                ..BackfillConfig::default()
            },
            ..Setup::default()
        },
    );
    let outage = |status_for_ms: u64| {
        sim.fault(Fault::Reject {
            stream: "d".into(),
            partition: None,
            status: 503,
            count: None,
            for_ms: Some(status_for_ms),
        })
        .unwrap();
        sim.fault(Fault::Drop {
            target: Target::default(),
        })
        .unwrap();
    };
    // Collects events until both paths are live again.
    async fn gaps_until_both_connected(h: &mut Harness) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut connected = 0;
        while connected < 2 {
            let ev = h
                .wait_event(Duration::from_secs(20), |e| {
                    matches!(
                        e,
                        ConnEvent::Connected { .. } | ConnEvent::UncoveredBeyondBackfill { .. }
                    )
                })
                .await;
            match ev {
                ConnEvent::UncoveredBeyondBackfill {
                    start_ms, end_ms, ..
                } => gaps.push((start_ms, end_ms)),
                _ => connected += 1,
            }
        }
        gaps
    }
    assert!(gaps_until_both_connected(&mut h).await.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Well past the window: refused for 4 s, many failed attempts.
    outage(4_000);
    let gaps = gaps_until_both_connected(&mut h).await;
    assert_eq!(gaps.len(), 1, "one gap for one outage: {gaps:?}");
    let (start_ms, end_ms) = gaps[0];
    assert!(
        end_ms - start_ms >= 1_000,
        "the gap is the outage less the window: {gaps:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A drop the window reaches (refused for 50 ms, reconnected at once) hands nothing over.
    outage(50);
    let gaps = gaps_until_both_connected(&mut h).await;
    assert!(gaps.is_empty(), "nothing beyond backfill: {gaps:?}");
    h.stop().await;
}

/// Three paths on a partition that admits two connections: each new connection evicts
/// the oldest, which the upstream says in a last line. The evicted path waits on the slow
/// refusal schedule instead of reconnecting at once, so the paths do not evict each other
/// in a loop bounded only by the connect budget.
#[tokio::test]
async fn an_eviction_waits_on_the_slow_schedule() {
    let mut stream = sim_stream(50.0);
    stream.max_connections_per_partition = 2;
    let sim = start(stream).await;
    let mut h = spawn(
        &sim,
        Setup {
            paths: vec!["127.0.0.2", "127.0.0.3", "127.0.0.4"],
            ..Setup::default()
        },
    );
    let mut evicted = 0;
    while evicted < 2 {
        match h.wait_event(Duration::from_secs(10), |_| true).await {
            ConnEvent::Disconnected { error, .. } if error.kind == ErrorKind::Evicted => {
                assert!(
                    error.message.contains("maximum number of connections"),
                    "{error}"
                );
                evicted += 1;
                let ev = h
                    .wait_event(Duration::from_secs(5), |e| {
                        matches!(e, ConnEvent::Reconnecting { .. })
                    })
                    .await;
                assert!(
                    matches!(ev, ConnEvent::Reconnecting { delay, .. } if delay >= Duration::from_millis(240)),
                    "an evicted connection waits: {ev:?}"
                );
            }
            ConnEvent::Disconnected { error, .. } => panic!("unexpected end: {error}"),
            _ => {}
        }
    }
    assert!(
        sim.stats("d").unwrap().evictions <= 4,
        "no eviction loop: {:?}",
        sim.stats("d").unwrap()
    );
    h.stop().await;
}

/// HTTPS with an extra CA, and a path that pins the IP while keeping the host name.
#[tokio::test]
async fn tls_path_with_pinned_ip() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let sim = Simulator::start(SimConfig {
        tls: Some(tandem_sim::TlsConfig {
            names: vec!["gnip-stream.test".into()],
            ca_file: ca.clone(),
        }),
        streams: vec![sim_stream(50.0)],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let liveness = fast_liveness();
    let path = PathConfig {
        name: "pinned".into(),
        source_address: None,
        interface: None,
        proxy: None,
        resolve_ip: Some("127.0.0.1".parse().unwrap()),
    };
    let tls = TlsSettings {
        extra_ca_pem: Some(std::fs::read(&ca).unwrap()),
        allow_plain_http: false,
    };
    let client = build_client(
        &path,
        &tls,
        &liveness,
        "gnip-stream.test",
        sim.addr().port(),
    )
    .unwrap();
    let url = sim
        .stream_url("d")
        .unwrap()
        .replace("127.0.0.1", "gnip-stream.test");
    assert!(url.starts_with("https://gnip-stream.test:"));
    let (tx, mut rx) = mpsc::channel(16);
    let (events_tx, _events) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let spec = ConnectionSpec {
        key: ConnKey {
            stream: "d".into(),
            partition: 1,
            path: "pinned".into(),
        },
        origin: Origin {
            stream: StreamId(0),
            partition: 1,
            path: PathId(0),
        },
        endpoint: Endpoint {
            recovery_url: url.clone(),
            url,
            api: ApiKind::Gnip,
            partitioned: true,
            auth: Auth::Basic {
                username: USER.into(),
                password: SecretSource::Value(Secret::new(PASS)),
            },
        },
        client,
        retry: fast_retry(),
        liveness,
        backfill: BackfillConfig::default(),
        read: ReadConfig::default(),
        budget: Arc::new(ConnectBudget::new(&BudgetConfig::default())),
        partition: Arc::new(PartitionLiveness::new(1)),
        tally: Arc::new(tandem_core::Tally::default()),
    };
    let conn = Connection::spawn(spec, tx, events_tx, shutdown_rx);
    let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!batch.lines.is_empty());
    // A client that refuses plain HTTP cannot be pointed at an http:// URL by mistake.
    let strict = build_client(
        &PathConfig {
            name: "s".into(),
            source_address: None,
            interface: None,
            proxy: None,
            resolve_ip: None,
        },
        &TlsSettings::default(),
        &fast_liveness(),
        "x",
        1,
    )
    .unwrap();
    assert!(strict.get("http://127.0.0.1:1/").send().await.is_err());
    shutdown.send_replace(true);
    conn.join().await;
}

/// A path whose source address is not on this host fails locally, again and again,
/// without spending the stream's connect budget: the healthy path still connects at
/// once although the budget allows only two requests a minute.
#[tokio::test]
async fn a_local_bind_failure_does_not_spend_the_connect_budget() {
    let sim = start(sim_stream(50.0)).await;
    let mut h = spawn(
        &sim,
        Setup {
            // 192.0.2.1 (TEST-NET-1) is on no host: the bind fails before any packet.
            paths: vec!["192.0.2.1", "127.0.0.2"],
            budget: BudgetConfig {
                requests: 2,
                window_ms: 60_000,
            },
            ..Setup::default()
        },
    );
    let mut local = 0;
    let mut connected = false;
    while local < 5 || !connected {
        match h.wait_event(Duration::from_secs(10), |_| true).await {
            ConnEvent::Disconnected { key, error, .. } if &*key.path == "p0" => {
                assert_eq!(error.kind, ErrorKind::Local, "{error}");
                local += 1;
            }
            ConnEvent::Connected { key, .. } => {
                assert_eq!(&*key.path, "p1");
                connected = true;
            }
            _ => {}
        }
    }
    assert_eq!(
        sim.stats("d").unwrap().requests,
        1,
        "only the healthy path's request reached the upstream"
    );
    h.stop().await;
}

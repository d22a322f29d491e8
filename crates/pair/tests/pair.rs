//! Two consumers of a pair against a real `nats-server -js` on an ephemeral loopback
//! port. Every wait is bounded generously and judged by order and outcome, never by how
//! long something took.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tandem_pair::{Lost, Pair, PairConfig, PartitionId, Progress, metric};
use tandem_sink::NatsConfig;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long any awaited outcome may take on a loaded machine before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `nats-server -js` on a loopback port, killed on drop.
struct NatsServer {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts a server on `port` keeping its JetStream store (and log) in `dir`.
    async fn start_on(port: u16, dir: &Path) -> NatsServer {
        let binary = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(Into::into))
            .map(|d: PathBuf| d.join("nats-server"))
            .find(|p| p.is_file())
            .expect("nats-server not found: run scripts/setup-test-deps");
        let conf = dir.join("nats-server.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n",
                dir.join("js").display().to_string()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("nats-server.log"))
            .unwrap();
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        let server = NatsServer {
            child,
            port,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nats-server did not open port {port}: {}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server on a fresh port with a fresh store.
async fn server() -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (NatsServer::start_on(free_port(), dir.path()).await, dir)
}

/// Short intervals, still with room for a loaded machine.
fn config(id: &str) -> PairConfig {
    let mut cfg = PairConfig::new(id);
    cfg.beacon_ms = 200;
    cfg.peer_stale_ms = 1_000;
    cfg.lease_ttl_ms = 3_000;
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    cfg
}

/// A running consumer's side of the pair and its shutdown switch.
struct Consumer {
    pair: Pair,
    shutdown: watch::Sender<bool>,
}

fn start(
    cfg: PairConfig,
    url: &str,
    partitions: Vec<PartitionId>,
    local: impl Fn(&PartitionId) -> Progress + Send + Sync + 'static,
) -> Consumer {
    let (shutdown, rx) = watch::channel(false);
    let pair = Pair::start(
        cfg,
        NatsConfig::new(url),
        None,
        partitions,
        Arc::new(local),
        rx,
    );
    Consumer { pair, shutdown }
}

fn fixed(progress: Progress) -> impl Fn(&PartitionId) -> Progress + Send + Sync + 'static {
    move |_| progress.clone()
}

/// Waits until `cond` holds, failing the test with `what` after [`PATIENCE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn coordinated(pair: &Pair, want: bool) {
    let mut state = pair.state();
    let reached = tokio::time::timeout(PATIENCE, state.wait_for(|s| s.coordinated == want)).await;
    assert!(
        reached.is_ok(),
        "{} never became coordinated={want}: {:?}",
        pair.consumer_id(),
        pair.state().borrow()
    );
}

/// The value of the series `name` (with `labels`, as rendered) in the scrape.
fn scraped(metrics: &PrometheusHandle, series: &str) -> Option<f64> {
    metrics.render().lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

/// Waits until the coordinated gauge reads `want` (it follows the state, which a loaded
/// machine may flip for a moment between two reads).
async fn gauge(metrics: &PrometheusHandle, want: f64) {
    eventually(&format!("{} reads {want}", metric::COORDINATED), || {
        scraped(metrics, metric::COORDINATED) == Some(want)
    })
    .await;
}

fn partition() -> PartitionId {
    PartitionId::new("decahose", 1)
}

/// Each consumer sees the other's beacon for a partition and never its own; a consumer
/// that stops disappears from its peer's view once its last beacon is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_sees_the_others_beacon_until_it_stops() {
    let (server, _dir) = server().await;
    let p = partition();
    let a_progress = Progress {
        latest_ms: 1_700_000_000_000,
        stored_until_ms: 1_699_999_990_000,
        stored_from_ms: 1_699_990_000_000,
        live: 1,
        open_gaps: vec![(1_699_999_000_000, 1_699_999_060_000)],
    };
    let b_progress = Progress {
        latest_ms: 1_700_000_000_500,
        stored_until_ms: 1_700_000_000_000,
        stored_from_ms: 0,
        live: 1,
        open_gaps: Vec::new(),
    };
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let a = metrics::with_local_recorder(&recorder, || {
        start(
            config("a"),
            &server.url(),
            vec![p.clone()],
            fixed(a_progress.clone()),
        )
    });
    assert_eq!(
        scraped(
            &metrics,
            &format!("{}{{{}=\"lease\"}}", metric::ERRORS, metric::OP)
        ),
        Some(0.0),
        "the error series exist from the start"
    );
    let b = start(
        config("b"),
        &server.url(),
        vec![p.clone()],
        fixed(b_progress.clone()),
    );
    coordinated(&a.pair, true).await;
    coordinated(&b.pair, true).await;
    gauge(&metrics, 1.0).await;

    eventually("a sees b's beacon", || !a.pair.peers(&p).is_empty()).await;
    eventually("b sees a's beacon", || !b.pair.peers(&p).is_empty()).await;
    let seen_by_a = a.pair.peers(&p);
    assert_eq!(seen_by_a.len(), 1, "only b, never a itself: {seen_by_a:?}");
    assert_eq!(seen_by_a[0].consumer, "b");
    assert_eq!(seen_by_a[0].progress, b_progress);
    let seen_by_b = b.pair.peers(&p);
    assert_eq!(seen_by_b.len(), 1, "only a, never b itself: {seen_by_b:?}");
    assert_eq!(seen_by_b[0].consumer, "a");
    assert_eq!(seen_by_b[0].progress, a_progress);
    assert!(
        a.pair.peers(&PartitionId::new("decahose", 2)).is_empty(),
        "no beacon for a partition nobody publishes"
    );

    b.shutdown.send(true).unwrap();
    coordinated(&b.pair, false).await;
    assert_eq!(
        b.pair.state().borrow().last_error.as_deref(),
        Some("stopped")
    );
    eventually("b's last beacon goes stale for a", || {
        a.pair.peers(&p).is_empty()
    })
    .await;
}

/// Three acquirers across the pair share two job slots: never more than two hold one at
/// once, a held lease outlives lease_ttl_ms by renewing itself, and all three run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_leases_are_shared_by_the_pair() {
    let (server, _dir) = server().await;
    let a = start(
        config("a"),
        &server.url(),
        vec![partition()],
        fixed(Progress::default()),
    );
    let b = start(
        config("b"),
        &server.url(),
        vec![partition()],
        fixed(Progress::default()),
    );
    coordinated(&a.pair, true).await;
    coordinated(&b.pair, true).await;

    // An X API v2 URL is an account name too.
    let account = "https://api.x.com/2/tweets/search/stream";
    // Longer than lease_ttl_ms: a lease that did not renew itself would be taken.
    let hold = Duration::from_millis(config("a").lease_ttl_ms * 3 / 2);
    let holders = Arc::new(Mutex::new((0usize, 0usize))); // (now, most at once)
    let ran = Arc::new(AtomicUsize::new(0));
    let mut jobs = Vec::new();
    for pair in [&a.pair, &b.pair, &a.pair] {
        let (pair, holders, ran) = (pair.clone(), holders.clone(), ran.clone());
        jobs.push(tokio::spawn(async move {
            let lease = pair.job_lease(account, 2).await.expect("the bucket is up");
            {
                let mut h = holders.lock().unwrap();
                h.0 += 1;
                h.1 = h.1.max(h.0);
            }
            tokio::time::sleep(hold).await;
            holders.lock().unwrap().0 -= 1;
            drop(lease);
            ran.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for job in jobs {
        tokio::time::timeout(PATIENCE * 2, job)
            .await
            .expect("every job gets a slot")
            .unwrap();
    }
    assert_eq!(ran.load(Ordering::SeqCst), 3, "all three ran");
    assert_eq!(holders.lock().unwrap().1, 2, "two at once, never three");

    // A holder that vanishes without releasing (its guard forgotten, its pair stopped)
    // holds the slot until the bucket's max_age removes it.
    let c = start(
        config("c"),
        &server.url(),
        Vec::new(),
        fixed(Progress::default()),
    );
    coordinated(&c.pair, true).await;
    let lease = c.pair.job_lease("acct-2", 1).await.unwrap();
    let waiting = {
        let a = a.pair.clone();
        tokio::spawn(async move { a.job_lease("acct-2", 1).await })
    };
    // While c lives and renews, its lease outlives lease_ttl_ms and a keeps waiting.
    tokio::time::sleep(Duration::from_millis(config("c").lease_ttl_ms * 2)).await;
    assert!(!waiting.is_finished(), "a renewed lease is not taken over");
    std::mem::forget(lease);
    c.shutdown.send(true).unwrap();
    let taken = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the vanished holder's lease expires")
        .unwrap();
    assert!(taken.is_ok(), "{taken:?}");
}

/// Two consumers asking for six connect tokens each get four between them (the limit);
/// non-urgent requests stop one short of it, and only an urgent one takes the last token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_budget_is_shared_and_keeps_a_token_for_urgent_requests() {
    let (server, _dir) = server().await;
    let a = start(
        config("a"),
        &server.url(),
        vec![partition()],
        fixed(Progress::default()),
    );
    let b = start(
        config("b"),
        &server.url(),
        vec![partition()],
        fixed(Progress::default()),
    );
    coordinated(&a.pair, true).await;
    coordinated(&b.pair, true).await;

    // Nothing expires during the test.
    let window = Duration::from_secs(600);
    let (limit, stream) = (4, "decahose");
    let granted = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let request = |pair: &Pair, urgent: bool| {
        let (pair, granted) = (pair.clone(), granted.clone());
        tokio::spawn(async move {
            pair.connect_token(stream, limit, window, urgent)
                .await
                .expect("the bucket is up");
            granted
                .lock()
                .unwrap()
                .push((pair.consumer_id().to_owned(), urgent));
        })
    };
    let mut waiting = Vec::new();
    for _ in 0..6 {
        waiting.push(request(&a.pair, false));
        waiting.push(request(&b.pair, false));
    }
    eventually("three non-urgent requests are granted", || {
        granted.lock().unwrap().len() >= 3
    })
    .await;
    // The last token is left for urgent requests: one of them gets it.
    waiting.push(request(&a.pair, true));
    waiting.push(request(&b.pair, true));
    eventually("an urgent request takes the reserved token", || {
        granted.lock().unwrap().len() >= 4
    })
    .await;
    // Everything else waits for the window: give it a few rounds of retries, then cancel.
    let rest = futures_util::future::join_all(waiting);
    assert!(
        tokio::time::timeout(Duration::from_secs(3), rest)
            .await
            .is_err(),
        "the remaining requests are still waiting"
    );
    let granted = granted.lock().unwrap().clone();
    assert_eq!(granted.len(), limit, "{granted:?}");
    assert_eq!(
        granted.iter().filter(|(_, urgent)| *urgent).count(),
        1,
        "exactly one urgent request took the reserved token: {granted:?}"
    );
    assert!(
        granted[..3].iter().all(|(_, urgent)| !urgent),
        "{granted:?}"
    );

    // The bucket holds exactly the four tokens.
    let client = async_nats::connect(server.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value("tandem_pair_connects_decahose")
        .await
        .unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    assert_eq!(keys.len(), limit, "{keys:?}");
}

/// Killing the server makes coordination lost (leases and tokens answer `Lost`, the
/// gauge drops); a server back on the same port and store brings it back, and beacons
/// flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_server_is_lost_coordination_and_its_return_restores_it() {
    let (mut server, dir) = server().await;
    let port = server.port;
    let p = partition();
    // a's beacons carry a counter: a beacon after the restart is newer than any before.
    let beacons = Arc::new(AtomicU64::new(1));
    let counter = beacons.clone();
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let a = metrics::with_local_recorder(&recorder, || {
        start(config("a"), &server.url(), vec![p.clone()], move |_| {
            Progress {
                latest_ms: counter.fetch_add(1, Ordering::SeqCst),
                ..Progress::default()
            }
        })
    });
    let b = start(
        config("b"),
        &server.url(),
        vec![p.clone()],
        fixed(Progress::default()),
    );
    coordinated(&a.pair, true).await;
    coordinated(&b.pair, true).await;
    eventually("b sees a", || !b.pair.peers(&p).is_empty()).await;
    gauge(&metrics, 1.0).await;

    server.kill();
    coordinated(&a.pair, false).await;
    coordinated(&b.pair, false).await;
    assert!(a.pair.state().borrow().last_error.is_some());
    gauge(&metrics, 0.0).await;
    let beacon_errors = format!("{}{{{}=\"beacon\"}}", metric::ERRORS, metric::OP);
    assert!(scraped(&metrics, &beacon_errors).unwrap() >= 1.0);
    // Bounded well beyond the ~2 s they may take: a hang fails here.
    let lease = tokio::time::timeout(Duration::from_secs(10), a.pair.job_lease("acct", 2)).await;
    assert_eq!(lease.expect("no hang").map(|_| ()), Err(Lost));
    let token = tokio::time::timeout(
        Duration::from_secs(10),
        b.pair
            .connect_token("decahose", 4, Duration::from_secs(60), true),
    )
    .await;
    assert_eq!(token.expect("no hang"), Err(Lost));
    let before_restart = beacons.load(Ordering::SeqCst);

    let _server = NatsServer::start_on(port, dir.path()).await;
    coordinated(&a.pair, true).await;
    coordinated(&b.pair, true).await;
    gauge(&metrics, 1.0).await;
    eventually("b sees a beacon a put after the restart", || {
        b.pair
            .peers(&p)
            .iter()
            .any(|peer| peer.consumer == "a" && peer.progress.latest_ms > before_restart)
    })
    .await;
    let lease = tokio::time::timeout(PATIENCE, a.pair.job_lease("acct", 2)).await;
    assert!(lease.expect("no hang").is_ok(), "leases work again");
    let token = tokio::time::timeout(
        PATIENCE,
        b.pair
            .connect_token("decahose", 4, Duration::from_secs(60), true),
    )
    .await;
    assert_eq!(token.expect("no hang"), Ok(()), "tokens work again");
}

/// A configuration with problems never coordinates: the state names the problem, and
/// leases and tokens answer `Lost` at once (no server needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_configuration_never_coordinates() {
    let mut cfg = config("a");
    cfg.lease_ttl_ms = cfg.beacon_ms;
    let a = start(
        cfg,
        "nats://127.0.0.1:1",
        Vec::new(),
        fixed(Progress::default()),
    );
    let state = a.pair.state().borrow().clone();
    assert!(!state.coordinated);
    let why = state.last_error.unwrap_or_default();
    assert!(why.contains("pair.lease_ttl_ms"), "{why}");
    assert_eq!(a.pair.job_lease("acct", 2).await.map(|_| ()), Err(Lost));
    assert_eq!(
        a.pair
            .connect_token("decahose", 10, Duration::from_secs(60), false)
            .await,
        Err(Lost)
    );
}

/// A server back without its store (a new cluster, a deleted bucket) gets the bucket
/// created again, and beacons flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_its_store_gets_the_bucket_again() {
    let (mut server, _dir) = server().await;
    let port = server.port;
    let p = partition();
    let beacons = Arc::new(AtomicU64::new(1));
    let counter = beacons.clone();
    let a = start(config("a"), &server.url(), vec![p.clone()], move |_| {
        Progress {
            latest_ms: counter.fetch_add(1, Ordering::SeqCst),
            ..Progress::default()
        }
    });
    let b = start(
        config("b"),
        &server.url(),
        vec![p.clone()],
        fixed(Progress::default()),
    );
    coordinated(&a.pair, true).await;
    eventually("b sees a", || !b.pair.peers(&p).is_empty()).await;

    server.kill();
    coordinated(&a.pair, false).await;
    let before_restart = beacons.load(Ordering::SeqCst);
    let empty = tempfile::tempdir().unwrap();
    let _server = NatsServer::start_on(port, empty.path()).await;
    coordinated(&a.pair, true).await;
    coordinated(&b.pair, true).await;
    eventually("b sees a beacon a put after the restart", || {
        b.pair
            .peers(&p)
            .iter()
            .any(|peer| peer.consumer == "a" && peer.progress.latest_ms > before_restart)
    })
    .await;
}

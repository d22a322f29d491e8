//! What the process tests share: a run (simulator, optional NATS server, and one consumer's
//! configuration and log, or two for a pair of zones), the `tandem` binary as a child
//! process that can be killed, `/status` and `/metrics` and their conditions, a real tmpfs
//! mount, and the final judgement against the ground truth.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tandem_scenario::HarnessConfig;
use tandem_scenario::harness::{PASSWORD, PASSWORD_VAR, Verdict, compare};
use tandem_scenario::nats::NatsServer;
use tandem_sim::{RateProfile, SimConfig, Simulator};
use tokio::time::Instant;

/// SIGABRT: how a process that reached its crash point ends.
pub(crate) const SIGABRT: i32 = 6;

pub(crate) fn loopback_addr() -> SocketAddr {
    let port = tandem_scenario::free_port().expect("a free port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// A link to the `tandem` binary that cargo built for these tests (with the crash
/// points), in `dir`: the target directory's `tandem` is replaced whenever anyone builds
/// the workspace (a plain `cargo build` without the crash points, too), and a scenario
/// must run one binary from its first start to its last. Waits (up to 120 s) while the
/// target directory holds a build without crash points, e.g. one another build is about
/// to replace.
async fn pinned_binary(dir: &Path) -> PathBuf {
    let target = Path::new(env!("CARGO_BIN_EXE_tandem"));
    let link = dir.join("tandem");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let _ = std::fs::remove_file(&link);
        if std::fs::hard_link(target, &link).is_err() {
            std::fs::copy(target, &link).expect("a copy of the tandem binary");
        }
        let has_points = Command::new("grep")
            .args(["-q", "-a", "-F", "TANDEM_CRASH_AT"])
            .arg(&link)
            .status()
            .is_ok_and(|s| s.success());
        if has_points {
            return link;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no crash points (TANDEM_CRASH_AT): another build replaced the test build; \
             run the tests again",
            target.display()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Everything one scenario needs, under one temporary directory. The run is also its
/// first consumer (it derefs to that [`Zone`]); a pair's second consumer is [`Run::zone`].
pub(crate) struct Run {
    first: Zone,
    pub(crate) sim: Simulator,
    pub(crate) nats: Option<NatsServer>,
    /// The Kafka-protocol broker the sink stores to, when the run has one.
    pub(crate) kafka: Option<tandem_scenario::kafka::KafkaBroker>,
    // Last: removed after everything else (a tmpfs guard declared later is unmounted first).
    pub(crate) dir: tempfile::TempDir,
}

impl Deref for Run {
    type Target = Zone;

    fn deref(&self) -> &Zone {
        &self.first
    }
}

/// One consumer of a run: its configuration (and run directory), its log, its monitor, and
/// the `tandem run` processes started from it.
pub(crate) struct Zone {
    pub(crate) cfg: HarnessConfig,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
    /// This run's own link to the `tandem` test binary.
    pub(crate) binary: PathBuf,
    pub(crate) started: Instant,
    starts: std::cell::Cell<u32>,
    client: reqwest::Client,
}

/// A `tandem run` process. Killed (SIGKILL) if still running when dropped.
pub(crate) struct Consumer {
    child: Child,
    pub(crate) label: String,
}

impl Consumer {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (it has not exited, panicked or aborted).
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`, and reaps it.
    pub(crate) fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "{} was running until the SIGKILL: {status:?}",
            self.label
        );
    }

    pub(crate) fn sigterm(&self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(term.success(), "kill -TERM {}", self.pid());
    }

    /// Waits for the process to exit; `None` if it is still running at the deadline.
    pub(crate) async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The partitions of every stream in a `/status`.
pub(crate) fn partitions(s: &Value) -> Vec<&Value> {
    s["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|st| st["partitions"].as_array().into_iter().flatten())
        .collect()
}

/// The sum of a count over every partition.
pub(crate) fn total(s: &Value, count: &str) -> u64 {
    partitions(s)
        .iter()
        .map(|p| p["counts"][count].as_u64().unwrap_or(0))
        .sum()
}

/// The sink's `up` (the run has one sink, `store`).
pub(crate) fn sink_up(s: &Value) -> Option<bool> {
    s["sinks"]
        .as_array()?
        .iter()
        .find(|k| k["name"] == "store")?["up"]
        .as_bool()
}

/// Segment files in a spool directory.
pub(crate) fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("segment-") && name.ends_with(".spool")
                })
                .count()
        })
        .unwrap_or(0)
}

impl Run {
    /// A simulator, a JetStream server when `nats` (the sink is then JetStream, otherwise
    /// the file store) and the consumer's configuration. The sink holds 300 activities in
    /// memory, so that an outage spills to the spool.
    pub(crate) async fn new(nats: bool, tweak: impl FnOnce(&mut HarnessConfig)) -> Run {
        Run::with_stores(nats, false, tweak).await
    }

    /// A run whose sink is a Kafka topic on a `tansu` broker started here; with `nats`, a
    /// NATS server too, for a pair's coordination only.
    pub(crate) async fn kafka(nats: bool, tweak: impl FnOnce(&mut HarnessConfig)) -> Run {
        Run::with_stores(nats, true, tweak).await
    }

    async fn with_stores(nats: bool, kafka: bool, tweak: impl FnOnce(&mut HarnessConfig)) -> Run {
        tandem_conn::install_crypto_provider();
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let nats = nats.then(|| {
            NatsServer::start(&dir.path().join("nats"))
                .expect("nats-server (scripts/setup-test-deps installs it)")
        });
        let kafka = kafka.then(|| {
            tandem_scenario::kafka::KafkaBroker::start(&dir.path().join("kafka"))
                .expect("the tansu broker (scripts/setup-test-deps installs it)")
        });
        let mut cfg = HarnessConfig::fast(dir.path().to_path_buf());
        cfg.monitor_listen = loopback_addr();
        cfg.max_memory_activities = 300;
        cfg.nats_url = nats.as_ref().map(NatsServer::url);
        cfg.kafka_bootstrap = kafka
            .as_ref()
            .map(tandem_scenario::kafka::KafkaBroker::bootstrap);
        tweak(&mut cfg);
        let sim = Simulator::start(SimConfig {
            streams: cfg.sim_streams(),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let binary = pinned_binary(dir.path()).await;
        let first = Zone::new(cfg, &sim, binary, started);
        Run {
            first,
            sim,
            nats,
            kafka,
            dir,
        }
    }

    /// The second consumer of a pair: the first one's configuration with its own run
    /// directory (`<run>/<id>`: store, spool, ledger), monitor address and `[pair]`
    /// consumer id `id`, then `tweak` (its paths, how it reaches NATS).
    pub(crate) fn zone(&self, id: &str, tweak: impl FnOnce(&mut HarnessConfig)) -> Zone {
        let mut cfg = self.cfg.clone();
        cfg.run_dir = self.path().join(id);
        cfg.monitor_listen = loopback_addr();
        cfg.pair_consumer = Some(id.to_owned());
        tweak(&mut cfg);
        std::fs::create_dir_all(&cfg.run_dir).unwrap();
        Zone::new(cfg, &self.sim, self.binary.clone(), self.started)
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn nats(&mut self) -> &mut NatsServer {
        self.nats.as_mut().expect("a run with a NATS server")
    }

    pub(crate) fn publish(&self, per_sec: f64) {
        self.sim
            .set_rate(&self.cfg.stream, RateProfile::Constant { per_sec })
            .unwrap();
    }

    /// Activities the simulator published so far (ground truth).
    pub(crate) fn published(&self) -> usize {
        (1..=self.cfg.partitions)
            .map(|p| self.sim.truth(&self.cfg.stream, p).unwrap().len())
            .sum()
    }

    /// Stops publishing and waits until the consumer has caught up for 3 s in a row.
    pub(crate) async fn settle(&self, consumer: &mut Consumer) {
        self.settle_zones(&mut [(&self.first, consumer)]).await;
    }

    /// Stops publishing and waits until every zone's consumer has caught up, all at once,
    /// for 3 s in a row.
    pub(crate) async fn settle_zones(&self, zones: &mut [(&Zone, &mut Consumer)]) {
        self.publish(0.0);
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut since: Option<Instant> = None;
        let mut last = None;
        loop {
            let mut all = true;
            for (zone, consumer) in zones.iter_mut() {
                assert!(
                    consumer.alive(),
                    "{} died while catching up\n--- log tail ---\n{}",
                    consumer.label,
                    zone.log_tail(80)
                );
                match zone.status().await {
                    Some(s) if zone.caught_up(&s) => {}
                    other => {
                        all = false;
                        last = other.map(|s| (consumer.label.clone(), s)).or(last);
                    }
                }
            }
            if !all {
                since = None;
            } else if since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(3) {
                return;
            }
            if Instant::now() >= deadline {
                let tails: Vec<String> = zones
                    .iter()
                    .map(|(z, c)| format!("--- {} log tail ---\n{}", c.label, z.log_tail(80)))
                    .collect();
                panic!(
                    "never caught up; last status not caught up: {last:#?}\n{}",
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the store holds.
    pub(crate) async fn stored(
        &self,
    ) -> HashMap<(String, tandem_core::Partition), Vec<tandem_core::ActivityId>> {
        if let Some(k) = &self.kafka {
            return tandem_scenario::kafka::stored_ids(
                &k.bootstrap(),
                tandem_scenario::harness::KAFKA_TOPIC,
            )
            .await
            .expect("the Kafka topic can be read");
        }
        match &self.nats {
            Some(n) => tandem_scenario::nats::stored_ids(&n.url(), "TANDEM")
                .await
                .expect("the JetStream stream can be read"),
            None => tandem_scenario::store::stored_ids(&self.path().join("store"))
                .expect("the file store can be read"),
        }
    }

    /// Stops publishing, lets the consumer catch up, stops it with SIGTERM (it must exit
    /// successfully) and judges the store against the simulator's ground truth:
    /// published = stored once.
    pub(crate) async fn finish(&self, consumer: Consumer, name: &str) -> Verdict {
        self.finish_zones(vec![(&self.first, consumer)], name).await
    }

    /// [`Run::finish`] for every zone of the run at once: all caught up together, each
    /// stopped with SIGTERM (each must exit successfully), then the one store judged.
    pub(crate) async fn finish_zones(
        &self,
        mut zones: Vec<(&Zone, Consumer)>,
        name: &str,
    ) -> Verdict {
        {
            let mut settling: Vec<(&Zone, &mut Consumer)> =
                zones.iter_mut().map(|(z, c)| (*z, c)).collect();
            self.settle_zones(&mut settling).await;
        }
        for (_, consumer) in &zones {
            consumer.sigterm();
        }
        for (zone, consumer) in &mut zones {
            let code = consumer.wait_exit(Duration::from_secs(60)).await;
            let Some(code) = code else {
                panic!(
                    "{}: still running 60 s after SIGTERM\n--- log tail ---\n{}",
                    consumer.label,
                    zone.log_tail(80)
                );
            };
            assert!(
                code.success(),
                "{}: graceful stop: {code:?}\n--- log tail ---\n{}",
                consumer.label,
                zone.log_tail(80)
            );
        }
        let stored = self.stored().await;
        let v = compare(&self.cfg, &self.sim, &stored);
        println!(
            "{name}: {} ({:.1} s)",
            v.line(),
            self.started.elapsed().as_secs_f64()
        );
        if std::env::var_os("TANDEM_TEST_LOG").is_some() {
            for (zone, consumer) in &zones {
                println!("--- {} log ---\n{}", consumer.label, zone.log_text());
            }
        }
        if !v.clean() {
            println!("lost, as published: {:?}", v.lost_detail);
            for (zone, consumer) in &zones {
                println!(
                    "--- {} log tail ---\n{}",
                    consumer.label,
                    zone.log_tail(120)
                );
            }
        }
        assert!(v.published > 0, "{name}: nothing was published");
        assert!(
            v.clean(),
            "{name}: {} lost e.g. {:?}",
            v.line(),
            v.lost_examples
        );
        v
    }
}

impl Zone {
    /// Writes the consumer's configuration (`tandem.toml`, for `sim`) into its run
    /// directory; its log is `tandem.log` beside it.
    fn new(cfg: HarnessConfig, sim: &Simulator, binary: PathBuf, started: Instant) -> Zone {
        let config = cfg.run_dir.join("tandem.toml");
        std::fs::write(&config, cfg.consumer_toml(&cfg.stream_urls(sim).unwrap())).unwrap();
        let log = cfg.run_dir.join("tandem.log");
        Zone {
            cfg,
            config,
            log,
            binary,
            started,
            starts: std::cell::Cell::new(0),
            client: http(),
        }
    }

    /// The sink's spool directory.
    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.cfg.run_dir.join("spool").join("store")
    }

    pub(crate) fn spool_segments(&self) -> usize {
        segments(&self.spool_dir())
    }

    /// Starts `tandem run`, aborting at `crash_at` (`TANDEM_CRASH_AT`) if given. Its
    /// stderr goes to the zone's log, after a line naming the start (and the zone's pair
    /// consumer id, if any).
    pub(crate) fn start(&self, crash_at: Option<&str>) -> Consumer {
        let n = self.starts.get() + 1;
        self.starts.set(n);
        let zone = self
            .cfg
            .pair_consumer
            .as_ref()
            .map_or_else(String::new, |id| format!("{id} "));
        let label = match crash_at {
            Some(at) => format!("{zone}start #{n} (TANDEM_CRASH_AT={at})"),
            None => format!("{zone}start #{n}"),
        };
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(
            log,
            "===== {label} at {:.1} s =====",
            self.started.elapsed().as_secs_f64()
        )
        .unwrap();
        let mut cmd = Command::new(&self.binary);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env(PASSWORD_VAR, PASSWORD)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("TANDEM_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(at) = crash_at {
            cmd.env("TANDEM_CRASH_AT", at);
        }
        let child = cmd.spawn().expect("tandem starts");
        Consumer { child, label }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the consumers' log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the crash point `name` was reached (the binary says so before aborting).
    pub(crate) fn crashed_at(&self, name: &str) -> bool {
        self.log_text()
            .contains(&format!("tandem: crash point {name} reached"))
    }

    /// The consumer's `/status`, once it answers.
    pub(crate) async fn status(&self) -> Option<Value> {
        let url = format!("http://{}/status", self.cfg.monitor_listen);
        self.client.get(url).send().await.ok()?.json().await.ok()
    }

    /// The HTTP status code of `/readyz` or `/healthz`.
    pub(crate) async fn probe(&self, which: &str) -> Option<u16> {
        let url = format!("http://{}/{which}", self.cfg.monitor_listen);
        Some(self.client.get(url).send().await.ok()?.status().as_u16())
    }

    /// The consumer's `/metrics` text, once it answers.
    pub(crate) async fn metrics_text(&self) -> Option<String> {
        let url = format!("http://{}/metrics", self.cfg.monitor_listen);
        self.client.get(url).send().await.ok()?.text().await.ok()
    }

    /// A sample's value from `/metrics` (the first series whose name and labels start
    /// with `prefix`).
    pub(crate) async fn metric(&self, prefix: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The sum of every series of the metric `name` from `/metrics` whose labels include
    /// all of `labels`; `None` if `/metrics` does not answer.
    pub(crate) async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        Some(metric_sum(&self.metrics_text().await?, name, labels))
    }

    /// Waits until `/status` satisfies `done`; fails the test (with the last status and
    /// the log's tail) if it does not within `within`.
    pub(crate) async fn wait_status(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.try_wait_status(within, done).await {
            Ok(s) => s,
            Err(last) => panic!(
                "waited {within:?} for: {what}; last status: {last:#?}\n--- log tail ---\n{}",
                self.log_tail(80)
            ),
        }
    }

    /// Waits until `/status` satisfies `done`; the last status seen if it does not within
    /// `within`.
    pub(crate) async fn try_wait_status(
        &self,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, Option<Value>> {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status().await {
                if done(&s) {
                    return Ok(s);
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }

    /// Waits for a condition that is not in `/status` (a file, the log).
    pub(crate) async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "waited {within:?} for: {what}\n--- log tail ---\n{}",
            self.log_tail(80)
        );
    }

    /// Every partition has all its connections live.
    pub(crate) fn all_live(&self, s: &Value) -> bool {
        let ps = partitions(s);
        ps.len() == self.cfg.partitions as usize
            && ps
                .iter()
                .all(|p| p["live_connections"].as_u64() == Some(self.cfg.paths.len() as u64))
    }

    pub(crate) async fn wait_live(&self) -> Value {
        self.wait_status(Duration::from_secs(60), "every connection live", |s| {
            self.all_live(s)
        })
        .await
    }

    /// Nothing waits anywhere: every connection live, nothing queued or in flight (held
    /// in memory, spooled or awaiting the store's acknowledgement), no gap under recovery.
    /// (Whether the sink *reports* up is for the scenarios to check.)
    pub(crate) fn caught_up(&self, s: &Value) -> bool {
        self.all_live(s)
            && partitions(s).iter().all(|p| {
                p["counts"]["in_flight"] == 0
                    && p["counts"]["queued"] == 0
                    && p["repair_gaps"]
                        .as_array()
                        .is_none_or(|gaps| gaps.iter().all(|g| g["state"] != "open"))
            })
    }
}

/// The sum of every series of the metric `name` in a `/metrics` text whose labels include
/// all of `labels` (0 when none does).
pub(crate) fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            if !(series.is_empty() || series.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A real tmpfs mounted on a directory, unmounted when dropped (also when the test fails).
pub(crate) struct Tmpfs {
    pub(crate) path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`8m`) on `path` (created). Needs root.
    pub(crate) fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} (the test needs root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Fills the file system with `filler` until it refuses, then gives back `leave`
    /// bytes. Returns the filler's path.
    pub(crate) fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.path.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        assert!(written > leave, "the file system was already full");
        f.set_len(written - leave).unwrap();
        f.sync_all().unwrap();
        path
    }

    /// Bytes free, as `df` sees it.
    pub(crate) fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.path);
    }
}

/// Unmounts `path`; lazily if it is busy.
fn unmount(path: &Path) {
    let ok = Command::new("umount")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

/// A real ext4 file system in a loop-mounted image file, which can be frozen
/// (`fsfreeze`): every write to it then hangs in the kernel until it is thawed, like a
/// disk that stops answering. Thawed and unmounted when dropped (also when the test
/// fails), so nothing stays hung.
pub(crate) struct FreezableDisk {
    pub(crate) path: PathBuf,
    image: PathBuf,
}

impl FreezableDisk {
    /// Makes a `mb` MiB ext4 image next to `path` and mounts it on `path`. Needs root.
    pub(crate) fn mount(path: &Path, mb: u64) -> FreezableDisk {
        std::fs::create_dir_all(path).unwrap();
        let image = path.with_extension("img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(mb << 20).unwrap();
        drop(f);
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("the command runs");
            assert!(
                out.status.success(),
                "{cmd:?} (the test needs root, e2fsprogs and util-linux): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(path));
        FreezableDisk {
            path: path.to_path_buf(),
            image,
        }
    }

    /// From now on every write to the file system hangs.
    pub(crate) fn freeze(&self) {
        let ok = Command::new("fsfreeze")
            .arg("-f")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "fsfreeze -f {}", self.path.display());
    }

    /// Writes go through again (the hung ones complete).
    pub(crate) fn thaw(&self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.path)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        self.thaw();
        unmount(&self.path);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A cgroup (v1) memory limit for one process, removed when dropped.
pub(crate) struct MemoryLimit {
    dir: PathBuf,
}

impl MemoryLimit {
    /// Puts `pid` under a limit of `bytes` (no swap). Needs root and the cgroup v1 memory
    /// controller (`/sys/fs/cgroup/memory`).
    pub(crate) fn apply(pid: u32, bytes: u64) -> MemoryLimit {
        let dir = PathBuf::from(format!("/sys/fs/cgroup/memory/tandem-test-{pid}"));
        std::fs::create_dir_all(&dir).expect("a cgroup (the test needs root and cgroup v1 memory)");
        std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).unwrap();
        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        MemoryLimit { dir }
    }

    /// The most the cgroup ever used, in bytes.
    pub(crate) fn max_usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// How often the limit stopped an allocation (the kernel then reclaims or kills).
    pub(crate) fn failures(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.failcnt"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        // Whatever is left moves back to the root group; then the group can go.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write("/sys/fs/cgroup/memory/cgroup.procs", pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

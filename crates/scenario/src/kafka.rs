//! A real Kafka-protocol broker for tests and benchmarks: `tansu` (installed by
//! `scripts/setup-test-deps` into the cargo bin directory), on an ephemeral loopback port,
//! storing in SQLite under a directory that outlives a restart; optionally requiring SASL
//! (`--authentication`, SCRAM users made with [`KafkaBroker::create_scram_user`]) and
//! speaking TLS ([`BrokerTls`]); and reading back every record of a topic.
//!
//! TLS: tansu 0.6.0 cannot serve it itself. Its `--cert` and `--key` share a clap group
//! that lets only one of them be given ("the argument `--cert <CERT>` cannot be used with
//! `--key <KEY>`"), and its listener loop never uses the `TlsAcceptor` it builds
//! (`tansu-broker` 0.6.0 `broker.rs`: `let _acceptor = …`, then `service.serve(c, stream)`
//! on the plain TCP stream). So `socat` (also installed by `scripts/setup-test-deps`)
//! terminates TLS on the clients' port and forwards each connection to tansu on a loopback
//! port of its own; tansu advertises the clients' port, so every connection a client makes,
//! bootstrap or not, goes through TLS. SASL is tansu's own, inside the TLS tunnel.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tandem_core::{ActivityId, Partition};

/// A running `tansu` broker (and its TLS front, with [`BrokerTls`]). Killed on drop.
#[derive(Debug)]
pub struct KafkaBroker {
    binary: PathBuf,
    /// The port clients connect to, and the one the broker advertises.
    port: u16,
    store: PathBuf,
    child: Option<Child>,
    /// Further arguments of `tansu broker` (`--authentication`): every (re)start uses them.
    args: Vec<OsString>,
    /// TLS on `port`: every (re)start uses it.
    tls: Option<BrokerTls>,
    /// With TLS, where tansu itself listens (behind the TLS front); chosen once.
    inner_port: Option<u16>,
    /// The TLS front (`socat`), with TLS.
    front: Option<Child>,
}

/// The broker's TLS: clients reach it over TLS only, and verify this certificate (it must
/// name 127.0.0.1: librdkafka checks the broker's name by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTls {
    /// PEM certificate (chain) of the broker.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
}

/// A SCRAM mechanism of a broker user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scram {
    Sha256,
    Sha512,
}

impl Scram {
    /// `tansu user create --mechanism`'s name.
    fn tansu_name(self) -> &'static str {
        match self {
            Scram::Sha256 => "scram256",
            Scram::Sha512 => "scram512",
        }
    }

    /// librdkafka's `sasl.mechanism`.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Scram::Sha256 => "SCRAM-SHA-256",
            Scram::Sha512 => "SCRAM-SHA-512",
        }
    }
}

/// `tansu` was not found or did not start, or a user could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KafkaBrokerError {
    #[error("the tansu broker is not installed (scripts/setup-test-deps installs it)")]
    Missing,
    #[error("tansu did not start: {0}")]
    Start(String),
    #[error("the TLS front (socat, which scripts/setup-test-deps installs) did not start: {0}")]
    TlsFront(String),
    #[error("tansu user create: {0}")]
    User(String),
}

/// `tansu` on the PATH or in the cargo bin directory.
pub fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
}

/// Sleeps a synchronous step (also used outside a runtime).
fn pause(d: Duration) {
    #[allow(clippy::disallowed_methods)]
    std::thread::sleep(d);
}

/// Waits up to 10 s until `port` takes connections; fails early when `child` exits.
fn wait_listening(port: u16, child: &mut Child) -> Result<(), String> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}) before port {port} opened"));
        }
        pause(Duration::from_millis(50));
    }
    Err(format!("port {port} did not open within 10 s"))
}

/// Kills and reaps a child process, if any.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl KafkaBroker {
    /// Starts a broker storing under `store` (a directory that outlives restarts).
    pub fn start(store: &Path) -> Result<KafkaBroker, KafkaBrokerError> {
        let binary = find_binary().ok_or(KafkaBrokerError::Missing)?;
        let port = crate::free_port().map_err(|e| KafkaBrokerError::Start(e.to_string()))?;
        let mut broker = KafkaBroker {
            binary,
            port,
            store: store.to_path_buf(),
            child: None,
            args: Vec::new(),
            tls: None,
            inner_port: None,
            front: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// `host:port` for `bootstrap_servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker and its TLS front (its store stays).
    pub fn stop(&mut self) {
        // The front first: no new connection reaches the broker. A connection the front
        // forwards ends when the broker does.
        kill(&mut self.front);
        kill(&mut self.child);
    }

    /// Starts again on the same port and store, with the arguments and TLS of the last
    /// start: with [`KafkaBroker::restart_with`]'s, once it was called.
    pub fn restart(&mut self) -> Result<(), KafkaBrokerError> {
        self.stop();
        let start = |e: std::io::Error| KafkaBrokerError::Start(e.to_string());
        std::fs::create_dir_all(&self.store).map_err(start)?;
        let listen_port = match (&self.tls, self.inner_port) {
            (None, _) => self.port,
            (Some(_), Some(p)) => p,
            (Some(_), None) => {
                let p = crate::free_port().map_err(start)?;
                self.inner_port = Some(p);
                p
            }
        };
        let listen = format!("tcp://127.0.0.1:{listen_port}");
        let advertised = format!("tcp://127.0.0.1:{}", self.port);
        let log = self.log_file("tansu.log").map_err(start)?;
        let mut child = Command::new(&self.binary)
            .arg("broker")
            .args([
                "--listener-url",
                &listen,
                "--advertised-listener-url",
                &advertised,
            ])
            // tansu opens a SQLite path relative to its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .args(&self.args)
            .current_dir(&self.store)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(start)?;
        let up = wait_listening(listen_port, &mut child);
        self.child = Some(child);
        if let Err(e) = up {
            self.stop();
            return Err(KafkaBrokerError::Start(format!("{e}: {}", self.log())));
        }
        if let Some(tls) = self.tls.clone() {
            self.start_front(&tls, listen_port)?;
        }
        Ok(())
    }

    /// Starts again on the same port and store with further `tansu broker` arguments
    /// (`--authentication`: clients must authenticate with SASL) and, with `tls`, over TLS
    /// only. Later restarts keep both.
    pub fn restart_with(
        &mut self,
        args: &[OsString],
        tls: Option<BrokerTls>,
    ) -> Result<(), KafkaBrokerError> {
        self.args = args.to_vec();
        self.tls = tls;
        self.restart()
    }

    /// `socat` terminating TLS on the clients' port, forwarding to tansu on `to`.
    fn start_front(&mut self, tls: &BrokerTls, to: u16) -> Result<(), KafkaBrokerError> {
        let front = |m: String| KafkaBrokerError::TlsFront(m);
        // socat's address syntax separates options with ',' and ':'.
        for p in [&tls.cert, &tls.key] {
            let s = p.to_str().unwrap_or(",");
            if s.contains([',', ':', '!']) {
                return Err(front(format!("{s:?}: a path socat cannot take")));
            }
        }
        let listen = format!(
            "OPENSSL-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            self.port,
            tls.cert.display(),
            tls.key.display()
        );
        let log = self
            .log_file("tls-front.log")
            .map_err(|e| front(e.to_string()))?;
        let mut child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:127.0.0.1:{to}"))
            .current_dir(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| front(e.to_string()))?;
        let up = wait_listening(self.port, &mut child);
        self.front = Some(child);
        if let Err(e) = up {
            self.stop();
            let log = std::fs::read_to_string(self.store.join("tls-front.log")).unwrap_or_default();
            return Err(front(format!("{e}: {log}")));
        }
        Ok(())
    }

    /// Makes (or replaces) the SCRAM user `name` with `password` by running
    /// `tansu user create` against the broker itself (behind the TLS front, if any). The
    /// broker must be running without `--authentication`: tansu answers nothing but the
    /// SASL requests before a client authenticates, and its command line client cannot.
    /// Synchronous; fails with tansu's output, or after 30 s.
    pub fn create_scram_user(
        &self,
        name: &str,
        password: &str,
        mechanism: Scram,
    ) -> Result<(), KafkaBrokerError> {
        let user = KafkaBrokerError::User;
        if self.args.iter().any(|a| a == "--authentication") {
            return Err(user(
                "the broker requires authentication, which tansu's user command cannot do: create users before restart_with(--authentication)".to_owned(),
            ));
        }
        let port = self
            .inner_port
            .filter(|_| self.tls.is_some())
            .unwrap_or(self.port);
        let mut child = Command::new(&self.binary)
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args(["--mechanism", mechanism.tansu_name(), name, password])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| user(e.to_string()))?;
        // Bounded: the command retries a refused connection for a while.
        let mut exited = false;
        for _ in 0..600 {
            match child.try_wait() {
                Ok(Some(_)) => {
                    exited = true;
                    break;
                }
                Ok(None) => pause(Duration::from_millis(50)),
                Err(e) => return Err(user(e.to_string())),
            }
        }
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            return Err(user(format!("no answer within 30 s from port {port}")));
        }
        let out = child.wait_with_output().map_err(|e| user(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(user(format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.join("tansu.log")).unwrap_or_default()
    }

    /// What the TLS front logged (a connection it refused: "SSL_accept(): …").
    pub fn tls_front_log(&self) -> String {
        std::fs::read_to_string(self.store.join("tls-front.log")).unwrap_or_default()
    }

    /// A log file in the store, appended to.
    fn log_file(&self, name: &str) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.join(name))
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A throwaway CA and a broker certificate it signs, made with the `openssl` command line
/// (which `scripts/setup-test-deps` installs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCertificates {
    /// The CA's PEM certificate: what clients trust (`tls_ca_file`).
    pub ca: PathBuf,
    /// The broker's: for 127.0.0.1 and localhost.
    pub tls: BrokerTls,
}

/// Makes a CA named `name` and a certificate it signs for 127.0.0.1 (an IP subject
/// alternative name) and localhost, under `dir`; valid for two days.
pub fn generate_certificates(dir: &Path, name: &str) -> Result<TestCertificates, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let ca_conf = format!(
        "[req]\nprompt = no\ndistinguished_name = dn\nx509_extensions = ca\n[dn]\nCN = {name}\n[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n"
    );
    let server_conf = "[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = 127.0.0.1\n[server]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1, DNS:localhost\nauthorityKeyIdentifier = keyid\n";
    std::fs::write(dir.join("ca.cnf"), ca_conf).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("server.cnf"), server_conf).map_err(|e| e.to_string())?;
    let serial = format!(
        "0x{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    // P-256 keys: quick to make.
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        format!("req -x509 -new {key} -keyout ca.key -out ca.pem -days 2 -config ca.cnf"),
        format!("req -new {key} -keyout server.key -out server.csr -config server.cnf"),
        format!(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial {serial} -days 2 -out server.pem -extfile server.cnf -extensions server"
        ),
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("openssl (scripts/setup-test-deps installs it): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(TestCertificates {
        ca: dir.join("ca.pem"),
        tls: BrokerTls {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        },
    })
}

/// librdkafka settings of a client that authenticates with SASL `mechanism` over TLS,
/// trusting the CA in `ca`: what [`topic_records_with`] and [`stored_ids_with`] add to
/// `bootstrap.servers`.
pub fn sasl_ssl_settings(
    mechanism: Scram,
    user: &str,
    password: &str,
    ca: &Path,
) -> Vec<(String, String)> {
    [
        ("security.protocol", "sasl_ssl"),
        ("sasl.mechanism", mechanism.librdkafka_name()),
        ("sasl.username", user),
        ("sasl.password", password),
        ("ssl.ca.location", &ca.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// What librdkafka reported while a [`probe`] ran: its error events and its warnings.
#[derive(Debug, Default)]
struct Reports(std::sync::Mutex<Vec<String>>);

impl Reports {
    fn push(&self, line: String) {
        let mut lines = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
}

impl rdkafka::client::ClientContext for Reports {
    // `log_level` 4: warnings and worse only.
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.push(format!("{fac}: {message}"));
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.push(format!("{error}: {reason}"));
    }
}

impl rdkafka::consumer::ConsumerContext for Reports {}

/// Connects a client with further librdkafka `settings` ([`sasl_ssl_settings`]) and asks
/// for the cluster's metadata: `Ok` once a broker answered within `timeout` (over TLS and
/// authenticated, if so configured), else librdkafka's own account of why not ("SASL authentication error:
/// …", "SSL handshake failed: … certificate verify failed"), so that a test can tell one
/// refusal from another. Synchronous: call it from a blocking task.
pub fn probe(
    bootstrap: &str,
    settings: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tandem-test-probe")
        .set("log_level", "4");
    for (k, v) in settings {
        config.set(k, v);
    }
    let consumer: BaseConsumer<Reports> = config
        .create_with_context(Reports::default())
        .map_err(|e| e.to_string())?;
    let result = consumer.fetch_metadata(None, timeout);
    // Error events arrive through the consumer's queue.
    let _ = consumer.poll(Duration::from_millis(100));
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            let reports = consumer.context().0.lock().map(|l| l.join("; "));
            Err(format!("{e}; librdkafka: {}", reports.unwrap_or_default()))
        }
    }
}

/// One record of a topic, as tandem wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRecord {
    pub topic_partition: i32,
    pub key: Option<String>,
    pub value: Vec<u8>,
    /// Headers by name (values as text).
    pub headers: HashMap<String, String>,
}

/// Every record of `topic`, in partition then offset order (synchronous: call it from a
/// blocking task).
pub fn topic_records(bootstrap: &str, topic: &str) -> Result<Vec<TopicRecord>, String> {
    topic_records_with(bootstrap, &[], topic)
}

/// [`topic_records`] through a client with further librdkafka `settings`
/// ([`sasl_ssl_settings`]: a broker that requires SASL and TLS).
pub fn topic_records_with(
    bootstrap: &str,
    settings: &[(String, String)],
    topic: &str,
) -> Result<Vec<TopicRecord>, String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tandem-test-reader")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in settings {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let parts: Vec<i32> = (md.topics().iter())
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut out = Vec::new();
    for p in parts {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| e.to_string())?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut next = low;
        while next < high {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("{topic}/{p}: read to {next} of {high} in 60 s"));
            }
            // An error here is a broker connection going down: librdkafka reconnects.
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            next = m.offset() + 1;
            let headers = m.headers().map_or_else(HashMap::new, |h| {
                h.iter()
                    .map(|h| {
                        let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                        (h.key.to_owned(), v.unwrap_or_default())
                    })
                    .collect()
            });
            out.push(TopicRecord {
                topic_partition: p,
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    Ok(out)
}

/// Every stored activity id per (stream, partition) from the records' headers, repeats
/// included (a repeat is a duplicate in the store). A record tandem did not write (no
/// headers, a key that is not an activity id) is an error.
pub async fn stored_ids(
    bootstrap: &str,
    topic: &str,
) -> Result<HashMap<(String, Partition), Vec<ActivityId>>, String> {
    stored_ids_with(bootstrap, &[], topic).await
}

/// [`stored_ids`] through a client with further librdkafka `settings`
/// ([`sasl_ssl_settings`]: a broker that requires SASL and TLS).
pub async fn stored_ids_with(
    bootstrap: &str,
    settings: &[(String, String)],
    topic: &str,
) -> Result<HashMap<(String, Partition), Vec<ActivityId>>, String> {
    let (b, s, t) = (bootstrap.to_owned(), settings.to_vec(), topic.to_owned());
    let records = tokio::task::spawn_blocking(move || topic_records_with(&b, &s, &t))
        .await
        .map_err(|e| e.to_string())??;
    let mut out: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
    for r in records {
        let stream = r
            .headers
            .get("tandem-stream")
            .ok_or("a record without tandem-stream")?;
        let partition: Partition = (r.headers.get("tandem-partition"))
            .and_then(|p| p.parse().ok())
            .ok_or("a record without tandem-partition")?;
        let id: ActivityId = (r.key.as_deref())
            .ok_or("a record without a key")?
            .parse()
            .map_err(|e| format!("{e}"))?;
        out.entry((stream.clone(), partition)).or_default().push(id);
    }
    Ok(out)
}

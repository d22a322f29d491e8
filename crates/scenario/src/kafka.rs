//! A real Kafka-protocol broker for tests and benchmarks: `tansu` (installed by
//! `scripts/setup-test-deps` into the cargo bin directory), on an ephemeral loopback port,
//! storing in SQLite under a directory that outlives a restart; and reading back every
//! record of a topic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tandem_core::{ActivityId, Partition};

/// A running `tansu` broker. Killed on drop.
#[derive(Debug)]
pub struct KafkaBroker {
    binary: PathBuf,
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// `tansu` was not found or did not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaBrokerError {
    #[error("the tansu broker is not installed (scripts/setup-test-deps installs it)")]
    Missing,
    #[error("tansu did not start: {0}")]
    Start(String),
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
        };
        broker.restart()?;
        Ok(broker)
    }

    /// `host:port` for `bootstrap_servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (its store stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (again) on the same port and store.
    pub fn restart(&mut self) -> Result<(), KafkaBrokerError> {
        self.stop();
        std::fs::create_dir_all(&self.store).map_err(|e| KafkaBrokerError::Start(e.to_string()))?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.join("tansu.log"))
            .map_err(|e| KafkaBrokerError::Start(e.to_string()))?;
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // tansu opens a SQLite path relative to its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.store)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| KafkaBrokerError::Start(e.to_string()))?;
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            // Synchronous on purpose (also used outside a runtime); 50 ms at a time.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(KafkaBrokerError::Start(format!(
            "port {} did not open within 10 s: {}",
            self.port,
            self.log()
        )))
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
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
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tandem-test-reader")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| e.to_string())?;
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
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    let records = tokio::task::spawn_blocking(move || topic_records(&b, &t))
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

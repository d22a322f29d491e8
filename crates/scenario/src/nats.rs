//! A real `nats-server -js` for tests and benchmarks, on an ephemeral loopback port with a
//! temporary store, and reading back what a JetStream stream holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_core::{ActivityId, Partition};

/// A running `nats-server` with JetStream enabled. Killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// `nats-server` was not found or did not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error("nats-server is not installed (scripts/setup-test-deps installs it)")]
    Missing,
    #[error("nats-server did not start: {0}")]
    Start(String),
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

impl NatsServer {
    /// Starts a server storing under `store` (a directory that outlives restarts).
    pub fn start(store: &Path) -> Result<NatsServer, NatsServerError> {
        let binary = find_binary().ok_or(NatsServerError::Missing)?;
        let port = crate::free_port().map_err(|e| NatsServerError::Start(e.to_string()))?;
        let mut server = NatsServer {
            binary,
            port,
            store: store.to_path_buf(),
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its store stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (again) on the same port and store.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.stop();
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| NatsServerError::Start(e.to_string()))?;
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            // Synchronous on purpose (also used outside a runtime); 50 ms at a time.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(NatsServerError::Start(format!(
            "port {} did not open within 5 s",
            self.port
        )))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every message of a JetStream stream: (stream name, partition) from the subject
/// `<prefix>.<stream>.<partition>`, and the id from `Nats-Msg-Id`, in stream order.
pub async fn stored_ids(
    url: &str,
    stream: &str,
) -> Result<HashMap<(String, Partition), Vec<ActivityId>>, String> {
    let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let last = s
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    let mut out: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
    for seq in 1..=last {
        let m = s
            .get_raw_message(seq)
            .await
            .map_err(|e| format!("message {seq}: {e}"))?;
        let mut parts = m.subject.rsplitn(3, '.');
        let partition: Partition = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("subject without partition")?;
        let name = parts.next().ok_or("subject without stream")?.to_owned();
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .and_then(|v| v.as_str().parse::<ActivityId>().ok())
            .ok_or_else(|| format!("message {seq} has no valid Nats-Msg-Id"))?;
        out.entry((name, partition)).or_default().push(id);
    }
    Ok(out)
}

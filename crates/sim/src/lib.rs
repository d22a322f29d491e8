//! A simulator of the upstream streaming services (Gnip 2.0 volume streams and X API v2
//! streams), faithful to `UPSTREAM.md`, with fault injection and a ground-truth log.
//!
//! It is the peer of every test and the embedded upstream of `tandem demo`. Start it
//! in-process with [`Simulator::start`] (on `127.0.0.1:0` by default) and drive it through
//! the [`SimHandle`], or run it standalone (`tandem sim`) and drive it through its admin
//! HTTP API (`/admin/...`, see `README.md` in this crate).
//!
//! It listens twice, as the real services are two hosts: the live host (every stream, X
//! API v2 recovery, the admin API) and the Gnip recovery host ([`SimHandle::recovery_url`]).
//!
//! # Layout
//! - [`config`]: streams, APIs, rates and limits ([`SimConfig`]).
//! - `generate`: realistic activities from the sample payloads, unique snowflake ids.
//! - `corpus`: a pre-encoded corpus for full-speed benchmarks.
//! - `encode`: gzip with a flush per write, or identity.
//! - `messages`: the in-stream disconnect and completion messages in each API's form.
//! - `log`: per-partition retained lines (live, backfill, recovery) and ground truth.
//! - [`fault`]: the faults ([`Fault`]) and per-connection controls.
//! - `state`: streams, connections, connect-rate accounting, recovery jobs.
//! - `writer`: the task behind each streaming response.
//! - `admission`: the checks before a stream is served (credentials, gzip, parameters,
//!   connect-rate limit, recovery jobs, injected rejections) and their status codes.
//! - `http`: listener (plain or TLS), stream endpoints, admin API.
//! - `tls`: a generated CA and server certificate.

mod admission;
pub mod config;
mod corpus;
mod encode;
pub mod fault;
mod generate;
mod http;
mod log;
mod messages;
mod state;
mod tls;
mod writer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_core::time::unix_ms_now;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::{Api, Content, CorpusConfig, RateProfile, SimConfig, StreamConfig, TlsConfig};

/// The gzip body a benchmark corpus stream sends for `activities` posts of one partition
/// (the header, then the deflate chunks, each ending with a sync flush): what `tandem
/// bench` inflates alone to measure the floor under the pipeline.
pub fn corpus_body(activities: u64) -> Vec<bytes::Bytes> {
    let corpus = corpus::Corpus::build(Content::Posts, 1, activities, 1 << 40, None);
    std::iter::once(bytes::Bytes::from_static(&encode::GZIP_HEADER))
        .chain(corpus.chunks(1).iter().cloned())
        .collect()
}
pub use fault::{Fault, Injection, Target};
pub use log::TruthRecord;
pub use state::{ConnectionInfo, ConnectionKind, StreamStats};

use crate::state::Shared;

/// What can go wrong starting or driving the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls setup failed: {0}")]
    Tls(String),
    #[error("cannot write the CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no stream named {0:?}")]
    UnknownStream(String),
    #[error("stream {stream:?} has no partition {partition}")]
    UnknownPartition { stream: String, partition: u32 },
    #[error("invalid simulator config: {0}")]
    Config(String),
}

/// A running simulator. Dropping it stops the server and ends every connection.
#[derive(Debug)]
pub struct Simulator {
    handle: SimHandle,
    tasks: Vec<JoinHandle<()>>,
}

/// A cheap, clonable handle to drive a running simulator.
#[derive(Debug, Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    recovery_addr: SocketAddr,
    scheme: &'static str,
    ca_file: Option<PathBuf>,
}

impl Simulator {
    /// Starts the server and the generators. Must be called inside a tokio runtime.
    pub async fn start(config: SimConfig) -> Result<Simulator, SimError> {
        check_streams(&config.streams)?;
        // Built before the port opens (a pre-encoded corpus can take seconds), so that an
        // open port means ready.
        let streams = config.streams.clone();
        let shared = Arc::new(
            tokio::task::spawn_blocking(move || Shared::new(streams))
                .await
                .map_err(|e| SimError::Config(format!("building the streams failed: {e}")))?,
        );
        let tcp = bind(config.listen).await?;
        let recovery_tcp = bind(config.recovery_listen).await?;
        let addr = local_addr(&tcp, config.listen)?;
        let recovery_addr = local_addr(&recovery_tcp, config.recovery_listen)?;
        let (acceptor, ca_file) = match &config.tls {
            Some(tls) => {
                let material = tls::generate(&tls.names)?;
                std::fs::write(&tls.ca_file, &material.ca_pem).map_err(|source| {
                    SimError::CaFile {
                        path: tls.ca_file.clone(),
                        source,
                    }
                })?;
                (Some(material.acceptor), Some(tls.ca_file.clone()))
            }
            None => (None, None),
        };
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let mut tasks = vec![
            serve(tcp, addr, acceptor.clone(), http::router(shared.clone()))?,
            serve(
                recovery_tcp,
                recovery_addr,
                acceptor,
                http::recovery_router(shared.clone()),
            )?,
        ];
        for stream in &shared.streams {
            if stream.corpus.is_none() {
                tasks.push(tokio::spawn(generate_forever(shared.clone(), stream.idx)));
            }
        }
        tracing::info!(%addr, %recovery_addr, scheme, streams = shared.streams.len(), "simulator listening");
        Ok(Simulator {
            handle: SimHandle {
                shared,
                addr,
                recovery_addr,
                scheme,
                ca_file,
            },
            tasks,
        })
    }

    /// A handle that outlives borrows of the simulator.
    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for Simulator {
    type Target = SimHandle;
    fn deref(&self) -> &SimHandle {
        &self.handle
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.handle.shared.shutdown.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SimHandle {
    /// The bound address of the live host (streams and the admin API).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the Gnip recovery host.
    pub fn recovery_addr(&self) -> SocketAddr {
        self.recovery_addr
    }

    /// `http://127.0.0.1:PORT` (or `https://`) of the live host.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// `http://127.0.0.1:PORT` (or `https://`) of the Gnip recovery host.
    pub fn recovery_base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.recovery_addr)
    }

    /// The CA certificate file clients must trust (TLS mode only).
    pub fn ca_file(&self) -> Option<&PathBuf> {
        self.ca_file.as_ref()
    }

    /// The full URL of a stream, without query parameters.
    pub fn stream_url(&self, stream: &str) -> Result<String, SimError> {
        let s = self.shared.stream(stream)?;
        Ok(format!("{}{}", self.base_url(), s.cfg.url_path()))
    }

    /// The full URL recovery requests for a stream go to, without query parameters: on
    /// Gnip the recovery host with the live path shape, on X API v2 the live endpoint
    /// itself (the same as [`SimHandle::stream_url`]).
    pub fn recovery_url(&self, stream: &str) -> Result<String, SimError> {
        let s = self.shared.stream(stream)?;
        let base = if s.cfg.is_v2() {
            self.base_url()
        } else {
            self.recovery_base_url()
        };
        Ok(format!("{base}{}", s.cfg.url_path()))
    }

    /// Replaces a stream's secret, the Gnip password or the v2 bearer token: requests with
    /// the old one get 401 from now on. Open connections are left alone.
    pub fn set_credentials(&self, stream: &str, secret: &str) -> Result<(), SimError> {
        self.shared.set_secret(stream, secret)
    }

    /// Injects a fault; returns how many connections (or rules) it affected.
    pub fn fault(&self, fault: Fault) -> Result<usize, SimError> {
        self.shared.apply_fault(&fault)
    }

    /// Publishes lines verbatim to a partition; returns how many are activities (those
    /// enter the ground truth).
    pub fn publish(
        &self,
        stream: &str,
        partition: u32,
        lines: Vec<Bytes>,
    ) -> Result<usize, SimError> {
        let s = self.shared.stream(stream)?;
        if s.partition(partition).is_none() {
            return Err(SimError::UnknownPartition {
                stream: stream.to_owned(),
                partition,
            });
        }
        Ok(s.publish(partition, lines, unix_ms_now()))
    }

    /// Every activity published to a partition so far.
    pub fn truth(&self, stream: &str, partition: u32) -> Result<Vec<TruthRecord>, SimError> {
        Ok(self.shared.stream(stream)?.truth(partition))
    }

    /// Every activity published to any partition of a stream so far.
    pub fn truth_all(&self, stream: &str) -> Result<Vec<TruthRecord>, SimError> {
        let s = self.shared.stream(stream)?;
        Ok((1..=s.cfg.partitions).flat_map(|p| s.truth(p)).collect())
    }

    /// Open connections.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared.connections()
    }

    /// Counters of one stream.
    pub fn stats(&self, stream: &str) -> Result<StreamStats, SimError> {
        Ok(self.shared.stream(stream)?.stats())
    }

    /// Faults injected so far, by kind.
    pub fn fault_counts(&self) -> BTreeMap<&'static str, u64> {
        self.shared.fault_counts()
    }

    /// Changes a stream's generation rate.
    pub fn set_rate(&self, stream: &str, rate: RateProfile) -> Result<(), SimError> {
        *self.shared.stream(stream)?.rate.lock().expect("rate lock") = rate;
        Ok(())
    }

    /// The id of the `k`-th corpus activity of a partition (corpus mode).
    pub fn corpus_id(&self, stream: &str, partition: u32, k: u64) -> Result<u64, SimError> {
        let s = self.shared.stream(stream)?;
        Ok(s.corpus_base + k * u64::from(s.cfg.partitions) + u64::from(partition - 1))
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, SimError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })
}

fn local_addr(tcp: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, SimError> {
    tcp.local_addr().map_err(|source| SimError::Bind {
        addr: asked,
        source,
    })
}

/// Serves `router` on `tcp` (TLS when an acceptor is given) until the simulator stops.
fn serve(
    tcp: TcpListener,
    addr: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
) -> Result<JoinHandle<()>, SimError> {
    let listener = http::SimListener::spawn(tcp, acceptor)
        .map_err(|source| SimError::Bind { addr, source })?;
    let app = router.into_make_service_with_connect_info::<http::ClientAddr>();
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, %addr, "simulator server stopped");
        }
    }))
}

/// Refuses streams that cannot be served: a name used twice, a stream without partitions.
fn check_streams(streams: &[StreamConfig]) -> Result<(), SimError> {
    let mut names = std::collections::HashSet::new();
    for s in streams {
        if !names.insert(s.name.clone()) {
            return Err(SimError::Config(format!(
                "stream name {:?} is used twice",
                s.name
            )));
        }
        if s.partitions == 0 {
            return Err(SimError::Config(format!(
                "stream {:?} needs at least one partition",
                s.name
            )));
        }
    }
    Ok(())
}

/// Generates a stream's activities at its rate profile, forever.
async fn generate_forever(shared: Arc<Shared>, idx: usize) {
    const TICK: Duration = Duration::from_millis(10);
    let stream = shared.streams[idx].clone();
    let started = tokio::time::Instant::now();
    let mut owed = 0.0f64;
    let mut last = started;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let partitions = stream.cfg.partitions as usize;
    loop {
        ticker.tick().await;
        let now = tokio::time::Instant::now();
        let rate = stream
            .rate
            .lock()
            .expect("rate lock")
            .rate_at(now.duration_since(started).as_millis() as u64);
        owed += rate * now.duration_since(last).as_secs_f64();
        last = now;
        let n = owed.floor() as usize;
        if n == 0 {
            continue;
        }
        owed -= n as f64;
        let now_ms = unix_ms_now();
        let mut per_partition: Vec<Vec<(Bytes, Option<tandem_core::ActivityId>, u64)>> =
            vec![Vec::new(); partitions];
        {
            let mut generator = stream.generator.lock().expect("generator lock");
            for i in 0..n {
                let g = generator.next(now_ms);
                let p =
                    g.id.map_or((i % partitions) as u32 + 1, |id| stream.partition_of(&id));
                per_partition[(p - 1) as usize].push((g.line, g.id, g.created_ms));
            }
        }
        for (i, lines) in per_partition.into_iter().enumerate() {
            if !lines.is_empty() {
                stream.partitions[i].log.append(now_ms, lines);
            }
        }
    }
}

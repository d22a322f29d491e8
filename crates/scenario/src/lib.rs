//! Runs tandem against its simulator and judges the result by the simulator's ground
//! truth: what was published, what was stored, what was lost or stored twice.
//!
//! The demo (`tandem demo`), the end-to-end fault matrix (`tests/`) and the benchmark all
//! use this harness, so they judge the same way.
//!
//! # Layout
//! - [`harness`]: [`Harness`] (simulator + pipeline from a rendered configuration; one
//!   or more streams; paths by source address and resolved IP; restart), quiescing, and
//!   the [`Verdict`].
//! - [`store`]: reading back what the file sink stored.
//! - [`nats`]: a real `nats-server -js` for tests, and reading back a JetStream stream.
//! - [`ceiling`]: what a NATS server accepts from a bare JetStream producer.
//! - [`kafka`]: a real Kafka-protocol broker (`tansu`) for tests, and reading back a topic.
//! - [`demo`]: the embedded demo with its fault schedule and live summary.
//! - [`free_port`]: an ephemeral loopback port, for every test peer.
//! - [`mod@bench`]: `tandem bench`, the full pipeline at full speed or a fixed rate, beside
//!   the inflate floor, each store's own ceiling and the X SDK baseline.

pub mod bench;
pub mod ceiling;
pub mod demo;
pub mod harness;
pub mod kafka;
pub mod nats;
pub mod store;

pub use harness::{Harness, HarnessApi, HarnessConfig, StreamUrls, Verdict};

/// A loopback port free right now, for a peer a test or benchmark starts (the simulator,
/// NATS, Prometheus, a consumer's monitor endpoint).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

//! The task behind each streaming response: reads the partition log from a cursor (live,
//! backfill), a time range (recovery) or the corpus, encodes, and feeds the HTTP body,
//! obeying the connection's fault controls.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tandem_core::time::unix_ms_now;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};

use crate::corpus::Corpus;
use crate::encode::Encoder;
use crate::fault::{Command, Disconnect, Injection};
use crate::messages;
use crate::state::{ConnEntry, ConnectionKind, Shared, StreamState};

/// Lines per body chunk when catching up.
const MAX_LINES_PER_CHUNK: usize = 512;
/// How often a delayed connection re-checks for lines that have become old enough.
const DELAY_POLL: Duration = Duration::from_millis(20);

pub(crate) type BodyTx = mpsc::Sender<Result<Bytes, io::Error>>;

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

enum Wake {
    Data,
    Heartbeat,
    Order,
    Closed,
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub stream: Arc<StreamState>,
    pub entry: Arc<ConnEntry>,
    pub tx: BodyTx,
    pub enc: Encoder,
    last_send: Instant,
    corrupt_next: bool,
    /// Pre-encoded gzip data went around the encoder (corpus mode): its checksum would be
    /// wrong, so the gzip stream is not finished on a clean close.
    encoder_bypassed: bool,
    rng: fastrand::Rng,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("connection", &self.entry.id)
            .finish()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stream.release(self.entry.id, self.entry.partition);
        if self.entry.kind == ConnectionKind::Recovery {
            let mut jobs = self.shared.recovery_jobs.lock().expect("jobs lock");
            if let Some(n) = jobs.get_mut(&self.stream.cfg.account()) {
                *n = n.saturating_sub(1);
            }
        }
        tracing::debug!(connection = self.entry.id, "simulator connection closed");
    }
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        stream: Arc<StreamState>,
        entry: Arc<ConnEntry>,
        tx: BodyTx,
        enc: Encoder,
    ) -> Writer {
        let seed = entry.id;
        Writer {
            shared,
            stream,
            entry,
            tx,
            enc,
            last_send: Instant::now(),
            corrupt_next: false,
            encoder_bypassed: false,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn heartbeat_every(&self) -> Duration {
        Duration::from_millis(self.stream.cfg.heartbeat_ms())
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) -> Flow {
        let bps = self
            .entry
            .control
            .throttle_bytes_per_sec
            .load(Ordering::Relaxed);
        if bps > 0 {
            sleep(Duration::from_secs_f64(bytes.len() as f64 / bps as f64)).await;
        }
        self.entry
            .bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if self.tx.send(Ok(Bytes::from(bytes))).await.is_err() {
            return Flow::Stop;
        }
        self.last_send = Instant::now();
        Flow::Go
    }

    async fn send_plain(&mut self, plain: &[u8]) -> Flow {
        let mut out = Vec::with_capacity(plain.len() / 3 + 64);
        self.enc.encode(plain, &mut out);
        self.send_raw(out).await
    }

    /// Ends the body with an error: hyper drops the connection without a final chunk.
    async fn abort(&mut self) {
        let _ = self
            .tx
            .send(Err(io::Error::other("connection dropped by the simulator")))
            .await;
    }

    /// Ends the body cleanly: an optional last line, the end of the gzip stream, then the
    /// end of the response (the channel closes when the writer is dropped).
    async fn close_with(&mut self, line: Option<&str>) {
        let mut out = Vec::new();
        if let Some(line) = line {
            let mut plain = line.as_bytes().to_vec();
            plain.extend_from_slice(b"\r\n");
            self.enc.encode(&plain, &mut out);
        }
        if !self.encoder_bypassed {
            self.enc.finish(&mut out);
        }
        if !out.is_empty() {
            let _ = self.send_raw(out).await;
        }
    }

    fn fake_id(&mut self) -> u64 {
        // Far above any generated snowflake, so an injected line never collides with one.
        (1 << 62) | self.rng.u64(..1 << 60)
    }

    async fn obey_orders(&mut self) -> Flow {
        for order in self.entry.control.take_orders() {
            match order {
                Command::Drop => {
                    self.abort().await;
                    return Flow::Stop;
                }
                Command::Close(why) => {
                    let line = messages::disconnect_line(&self.stream.cfg.api, why);
                    tracing::info!(stream = %self.stream.cfg.name, partition = self.entry.partition, connection = self.entry.id, reason = ?why, "simulator closing a connection");
                    self.close_with(Some(line)).await;
                    return Flow::Stop;
                }
                Command::Inject(injection) => {
                    if self.inject(injection).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
            }
        }
        Flow::Go
    }

    async fn inject(&mut self, injection: Injection) -> Flow {
        let id = self.fake_id();
        match injection {
            Injection::MalformedLine => {
                let line = format!("{{\"id_str\":\"{id}\",\"text\":\"cut off by the simulator\r\n");
                self.send_plain(line.as_bytes()).await
            }
            Injection::OversizeLine { bytes } => {
                let head = format!("{{\"id_str\":\"{id}\",\"text\":\"");
                let mut line = head.into_bytes();
                line.resize(bytes.saturating_sub(4).max(line.len()), b'x');
                line.extend_from_slice(b"\"}\r\n");
                self.send_plain(&line).await
            }
            Injection::InvalidUtf8Line => {
                let mut line = format!("{{\"id_str\":\"{id}\",\"text\":\"").into_bytes();
                line.extend_from_slice(b"\xff\xfe\xfd");
                line.extend_from_slice(b"\"}\r\n");
                self.send_plain(&line).await
            }
            Injection::TruncateAndClose => {
                let line =
                    format!("{{\"id_str\":\"{id}\",\"text\":\"the connection ends in the mid");
                let _ = self.send_plain(line.as_bytes()).await;
                self.abort().await;
                Flow::Stop
            }
            Injection::BrokenGzip => {
                // 0xff starts a block of reserved type 3: no inflater accepts it.
                let _ = self.send_raw(vec![0xff; 64]).await;
                self.abort().await;
                Flow::Stop
            }
            Injection::CorruptNextActivity => {
                self.corrupt_next = true;
                Flow::Go
            }
        }
    }

    /// Waits for one of: new data, heartbeat due, an order or fault change, the client
    /// going away, or shutdown. `heartbeat` false means stalled (nothing is sent at all).
    async fn wait(
        &self,
        head: &mut watch::Receiver<u64>,
        heartbeat: bool,
        poll: Option<Duration>,
    ) -> Wake {
        let mut shutdown = self.shared.shutdown.subscribe();
        if *shutdown.borrow_and_update() {
            return Wake::Closed;
        }
        let hb_at = self.last_send + self.heartbeat_every();
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            r = head.changed() => if r.is_ok() { Wake::Data } else { Wake::Closed },
            () = sleep_until(if heartbeat { hb_at } else { far }) => Wake::Heartbeat,
            () = sleep(poll.unwrap_or(Duration::from_secs(3600))) => Wake::Data,
            () = self.entry.control.wake.notified() => Wake::Order,
            () = self.tx.closed() => Wake::Closed,
            _ = shutdown.changed() => Wake::Closed,
        }
    }

    /// Serves a live (or backfill) connection from `cursor` until it ends.
    pub(crate) async fn run_live(mut self, mut cursor: u64) {
        let stream = self.stream.clone();
        let Some(partition) = stream.partition(self.entry.partition) else {
            return;
        };
        let mut head = partition.log.subscribe();
        let mut header = Vec::new();
        self.enc.header(&mut header);
        if !header.is_empty() && self.send_raw(header).await == Flow::Stop {
            return;
        }
        loop {
            if *self.shared.shutdown.borrow() {
                self.abort().await;
                return;
            }
            if self.obey_orders().await == Flow::Stop {
                return;
            }
            let control = &self.entry.control;
            if control.stalled.load(Ordering::SeqCst) {
                if let Wake::Closed = self.wait(&mut head, false, None).await {
                    return;
                }
                continue;
            }
            let delay = control.delay_ms.load(Ordering::SeqCst);
            let read = partition.log.read(
                cursor,
                MAX_LINES_PER_CHUNK,
                unix_ms_now().saturating_sub(delay),
            );
            if read.fell_behind {
                self.entry
                    .control
                    .order(Command::Close(Disconnect::FellBehind));
                continue;
            }
            if !read.entries.is_empty() {
                cursor = read.next;
                if control.heartbeats_only.load(Ordering::SeqCst) {
                    continue;
                }
                let mut plain =
                    Vec::with_capacity(read.entries.iter().map(|e| e.line.len() + 2).sum());
                for e in &read.entries {
                    if std::mem::take(&mut self.corrupt_next) {
                        plain.extend_from_slice(&e.line[..e.line.len() / 2]);
                    } else {
                        plain.extend_from_slice(&e.line);
                    }
                    plain.extend_from_slice(b"\r\n");
                }
                self.entry
                    .activities_sent
                    .fetch_add(read.entries.len() as u64, Ordering::Relaxed);
                if self.send_plain(&plain).await == Flow::Stop {
                    return;
                }
                continue;
            }
            let poll = (delay > 0).then_some(DELAY_POLL);
            match self.wait(&mut head, true, poll).await {
                Wake::Closed => return,
                Wake::Heartbeat => {
                    if self.send_plain(b"\r\n").await == Flow::Stop {
                        return;
                    }
                }
                Wake::Data | Wake::Order => {}
            }
        }
    }

    /// Serves a recovery request: the range oldest first, then (Gnip) the completion
    /// message, and a clean end of the body.
    pub(crate) async fn run_recovery(mut self, start_ms: u64, end_ms: u64) {
        let stream = self.stream.clone();
        let Some(partition) = stream.partition(self.entry.partition) else {
            return;
        };
        let mut head = partition.log.subscribe();
        let mut header = Vec::new();
        self.enc.header(&mut header);
        if !header.is_empty() && self.send_raw(header).await == Flow::Stop {
            return;
        }
        // A range that reaches into the future completes once it has passed.
        while unix_ms_now() < end_ms {
            let left = Duration::from_millis(end_ms - unix_ms_now());
            if self.obey_orders().await == Flow::Stop {
                return;
            }
            match self.wait(&mut head, true, Some(left)).await {
                Wake::Closed => return,
                Wake::Heartbeat => {
                    if self.send_plain(b"\r\n").await == Flow::Stop {
                        return;
                    }
                }
                Wake::Data | Wake::Order => {}
            }
        }
        let entries = partition.log.created_between(start_ms, end_ms);
        let per_tick = (stream.cfg.recovery_rate_per_sec / 20).max(1) as usize;
        let mut sent = 0u64;
        for chunk in entries.chunks(per_tick) {
            loop {
                if self.obey_orders().await == Flow::Stop {
                    return;
                }
                if !self.entry.control.stalled.load(Ordering::SeqCst) {
                    break;
                }
                if let Wake::Closed = self.wait(&mut head, false, None).await {
                    return;
                }
            }
            let mut plain = Vec::new();
            for e in chunk {
                plain.extend_from_slice(&e.line);
                plain.extend_from_slice(b"\r\n");
            }
            sent += chunk.len() as u64;
            self.entry
                .activities_sent
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if self.send_plain(&plain).await == Flow::Stop {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
        // Gnip announces the end; v2 only closes the stream.
        let done = messages::recovery_completed(&stream.cfg.api, sent, unix_ms_now());
        self.close_with(done.as_deref()).await;
        tracing::info!(stream = %stream.cfg.name, partition = self.entry.partition, sent, "recovery request completed");
    }

    /// Streams the pre-encoded corpus (at full speed, or a chunk whenever its first
    /// activity is due at the corpus's rate), then idles with heartbeats.
    pub(crate) async fn run_corpus(mut self, corpus: Arc<Corpus>) {
        let start = Instant::now();
        let stream = self.stream.clone();
        let partition_no = self.entry.partition;
        let mut header = Vec::new();
        self.enc.header(&mut header);
        if !header.is_empty() && self.send_raw(header).await == Flow::Stop {
            return;
        }
        if self.enc.is_gzip() {
            // A connection counts the corpus as sent chunk by chunk.
            let chunks = corpus.chunks(partition_no);
            let per_chunk = corpus.per_partition().div_ceil(chunks.len().max(1) as u64);
            self.encoder_bypassed = true;
            let mut sent = 0u64;
            for chunk in chunks {
                if self.obey_orders().await == Flow::Stop {
                    return;
                }
                if let Some(due) = corpus.due(start, sent) {
                    sleep_until(due).await;
                }
                let n = per_chunk.min(corpus.per_partition() - sent);
                sent += n;
                self.entry.activities_sent.fetch_add(n, Ordering::Relaxed);
                self.entry
                    .bytes_sent
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if self.tx.send(Ok(chunk.clone())).await.is_err() {
                    return;
                }
                self.last_send = Instant::now();
            }
        } else {
            let mut k = 0;
            while k < corpus.per_partition() {
                if self.obey_orders().await == Flow::Stop {
                    return;
                }
                let to = (k + 256).min(corpus.per_partition());
                let mut out = Vec::with_capacity(256 * 5_000);
                corpus.plain(partition_no, k, to, &mut out);
                self.entry
                    .activities_sent
                    .fetch_add(to - k, Ordering::Relaxed);
                k = to;
                if self.send_raw(out).await == Flow::Stop {
                    return;
                }
            }
        }
        let Some(partition) = stream.partition(self.entry.partition) else {
            return;
        };
        let mut head = partition.log.subscribe();
        loop {
            if self.obey_orders().await == Flow::Stop {
                return;
            }
            match self.wait(&mut head, true, None).await {
                Wake::Closed => return,
                Wake::Heartbeat => {
                    if self.send_plain(b"\r\n").await == Flow::Stop {
                        return;
                    }
                }
                Wake::Data | Wake::Order => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::config::StreamConfig;
    use crate::fault::{Control, Fault, Target};

    type BodyRx = mpsc::Receiver<Result<Bytes, io::Error>>;

    /// A writer for a live connection on partition 1 of a fresh stream, and its body.
    fn live_writer(heartbeat_ms: u64) -> (Arc<StreamState>, Arc<ConnEntry>, Writer, BodyRx) {
        let mut cfg = StreamConfig::decahose("d", "acme", "user", "password");
        cfg.heartbeat_interval_ms = Some(heartbeat_ms);
        writer_for(cfg)
    }

    /// A writer for a live connection on partition 1 of a fresh stream of `cfg`, and its body.
    fn writer_for(cfg: StreamConfig) -> (Arc<StreamState>, Arc<ConnEntry>, Writer, BodyRx) {
        let shared = Arc::new(Shared::new(vec![cfg]));
        let stream = shared.streams[0].clone();
        let entry = Arc::new(ConnEntry {
            id: 1,
            partition: 1,
            client: SocketAddr::from(([127, 0, 0, 1], 9)),
            kind: ConnectionKind::Live,
            opened_ms: unix_ms_now(),
            control: Control::default(),
            bytes_sent: AtomicU64::new(0),
            activities_sent: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(4);
        let writer = Writer::new(shared, stream.clone(), entry.clone(), tx, Encoder::Identity);
        (stream, entry, writer, rx)
    }

    /// Idle heartbeats come one interval after the last write, so an activity postpones them.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_follow_the_interval_from_the_last_write() {
        let start = Instant::now();
        let (stream, _entry, writer, mut rx) = live_writer(200);
        tokio::spawn(writer.run_live(stream.partitions[0].log.head()));
        let mut got = Vec::new();
        for _ in 0..2 {
            let chunk = rx.recv().await.unwrap().unwrap();
            got.push((start.elapsed().as_millis(), chunk));
        }
        sleep_until(start + Duration::from_millis(450)).await;
        let line = Bytes::from_static(b"{\"id_str\":\"7\",\"text\":\"t\"}");
        stream.publish(1, vec![line], unix_ms_now());
        for _ in 0..2 {
            let chunk = rx.recv().await.unwrap().unwrap();
            got.push((start.elapsed().as_millis(), chunk));
        }
        let heartbeat = Bytes::from_static(b"\r\n");
        let activity = Bytes::from_static(b"{\"id_str\":\"7\",\"text\":\"t\"}\r\n");
        assert_eq!(
            got,
            vec![
                (200, heartbeat.clone()),
                (400, heartbeat.clone()),
                (450, activity),
                (650, heartbeat),
            ]
        );
    }

    /// An idle X API v2 connection heartbeats every 20 s by default, a Gnip one every 10 s.
    #[tokio::test(start_paused = true)]
    async fn default_heartbeat_interval_per_api() {
        for (cfg, every_ms) in [
            (StreamConfig::v2_filtered("f", "token"), 20_000),
            (StreamConfig::v2_sample10("s", "token"), 20_000),
            (
                StreamConfig::decahose("d", "acme", "user", "password"),
                10_000,
            ),
        ] {
            let start = Instant::now();
            let (stream, _entry, writer, mut rx) = writer_for(cfg);
            tokio::spawn(writer.run_live(stream.partitions[0].log.head()));
            let mut at = Vec::new();
            for _ in 0..3 {
                assert_eq!(
                    rx.recv().await.unwrap().unwrap(),
                    Bytes::from_static(b"\r\n")
                );
                at.push(start.elapsed().as_millis());
            }
            assert_eq!(at, vec![every_ms, 2 * every_ms, 3 * every_ms]);
        }
    }

    /// A throttled connection waits each write's size divided by the rate before making it.
    #[tokio::test(start_paused = true)]
    async fn throttle_spaces_writes_by_their_size() {
        let (stream, entry, writer, mut rx) = live_writer(60_000);
        entry.control.apply(&Fault::Throttle {
            target: Target::default(),
            bytes_per_sec: 1_000,
        });
        let start = Instant::now();
        tokio::spawn(writer.run_live(stream.partitions[0].log.head()));
        let mut got = Vec::new();
        // Lines of 498 and 998 bytes, 500 and 1 000 with their `\r\n`.
        for len in [498, 998] {
            let line = format!("{{\"id_str\":\"7\",\"text\":\"{}\"}}", "x".repeat(len - 24));
            stream.publish(1, vec![Bytes::from(line)], unix_ms_now());
            let chunk = rx.recv().await.unwrap().unwrap();
            got.push((start.elapsed().as_millis(), chunk.len()));
        }
        assert_eq!(got, vec![(500, 500), (1_500, 1_000)]);
        assert_eq!(entry.bytes_sent.load(Ordering::Relaxed), 1_500);
    }
}

//! The Kafka store: a librdkafka producer whose delivery reports are the acknowledgements.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tandem_core::time::unix_ms_now;
use tandem_core::{ActivityId, Partition, StreamId, UniqueBatch};

use super::topic::{
    HEADER_PARTITION, HEADER_PATH, HEADER_RECEIVED, HEADER_STREAM, HeldIds, TopicFollower, TopicIds,
};
use super::{KafkaConfig, WriterGate};
use crate::store::{Ack, Store, StoreError, StreamNames};
use crate::window::{InFlight, Sent};

fn err(message: impl std::fmt::Display) -> StoreError {
    StoreError::transient("kafka", message.to_string())
}

/// How long `put` waits for the oldest delivery report when the window is full.
const WAIT_OLDEST: Duration = Duration::from_secs(5);
/// A record whose delivery failed is looked for in the topic from this long before it was
/// sent (clocks of this host and the brokers).
const READ_BACK_SLACK_MS: u64 = 60_000;

/// A read-back running beside the driver.
type ReadBack = tokio::task::JoinHandle<Result<HeldIds, StoreError>>;

/// One activity on its way.
struct Pending {
    stream: StreamId,
    partition: Partition,
    seq: u64,
    id: ActivityId,
    line: bytes::Bytes,
    path: u8,
    received_ms: u64,
    /// When it was (last) handed to the producer, Unix ms.
    sent_ms: u64,
    /// A standby writes it only after the follower has read the topic as of this moment
    /// (set when its own delivery failed: it may have landed all the same).
    not_before: Option<Instant>,
    report: Option<DeliveryFuture>,
}

impl Sent for Pending {
    fn line_len(&self) -> usize {
        self.line.len()
    }
}

/// The pair's part: who writes each partition.
struct Standby {
    gate: Arc<dyn WriterGate>,
    /// Per partition, received while the other consumer writes it: acknowledged once the
    /// topic holds them, or written by this one once it holds the lease and has read what
    /// the last writer left.
    held: HashMap<(StreamId, Partition), VecDeque<Pending>>,
}

impl Standby {
    fn held(&self) -> usize {
        self.held.values().map(VecDeque::len).sum()
    }

    /// Whether this consumer may write `p` now: it holds the partition's lease, and the
    /// follower has read the topic as of the moment it took it (and of `p`'s own failure).
    fn may_write(&self, follower: &TopicFollower, stream: &str, p: &Pending) -> bool {
        let Some(since) = self.gate.writer_since(stream, p.partition) else {
            return false;
        };
        let since = p.not_before.map_or(since, |n| n.max(since));
        follower.caught_up().is_some_and(|c| c >= since)
    }
}

/// The Kafka store.
pub struct KafkaStore {
    producer: FutureProducer,
    cfg: KafkaConfig,
    names: StreamNames,
    ids: TopicIds,
    /// The SASL password, for the clients made later (topic creation).
    password: Option<String>,
    /// Sent, delivery report not seen yet: at most `max_in_flight` records and
    /// `max_in_flight_bytes` (or a quarter of the driver's budget, if less).
    pending: InFlight<Pending>,
    /// Delivery failed: looked for in the topic, then sent again.
    failed: Vec<Pending>,
    /// Failed deliveries being looked for in the topic, and the read-back doing it.
    checking: Option<(Vec<Pending>, ReadBack)>,
    /// Delivered (or found in the topic), not reported yet.
    done: Vec<Ack>,
    /// A batch a full window interrupted: (stream, partition, first id, items taken).
    partial: Option<(StreamId, Partition, ActivityId, usize)>,
    /// The topic was found (or created).
    ready: bool,
    /// What the topic holds: every record is checked against it before it is sent, so
    /// that what a spool or an upstream replay repeats after a restart, or what the other
    /// consumer of a pair stored, is not stored twice.
    follower: TopicFollower,
    /// When the store was made: nothing is sent before the follower has read the topic as
    /// of then.
    started: Instant,
    standby: Option<Standby>,
    /// Failed deliveries not logged yet, and when that was last logged.
    unlogged: (u64, Option<Instant>),
    /// A refusal for good, reported at the next collection (after the acknowledgements
    /// gathered with it).
    refused: Option<StoreError>,
}

impl std::fmt::Debug for KafkaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStore")
            .field("topic", &self.cfg.topic)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl KafkaStore {
    /// A producer for `cfg`. Nothing is sent yet: an unreachable broker shows at the first
    /// `put`, which the driver retries while it spools. In a pair (`gate`), only the
    /// consumer holding a partition's writer lease writes it. The topic is followed from
    /// the records produced at `follow_since_ms` on, and what is read is kept for `keep`.
    pub fn new(
        cfg: KafkaConfig,
        names: StreamNames,
        password: Option<String>,
        gate: Option<Arc<dyn WriterGate>>,
        follow_since_ms: u64,
        keep: Duration,
    ) -> Result<KafkaStore, StoreError> {
        let mut delivery_ms = cfg.delivery_timeout_ms;
        if let Some(g) = &gate {
            // A record must be delivered or failed before the lease it was sent under can
            // pass to the other consumer.
            let fence = g.fence().as_millis() as u64;
            if fence < delivery_ms {
                tracing::info!(
                    delivery_timeout_ms = fence,
                    configured = delivery_ms,
                    "in a pair, the delivery timeout is capped at a third of pair.lease_ttl_ms"
                );
                delivery_ms = fence;
            }
        }
        let mut c = cfg.client(password.as_deref());
        c.set("acks", "all")
            .set(
                "enable.idempotence",
                if cfg.idempotence { "true" } else { "false" },
            )
            .set("compression.type", cfg.compression.as_str())
            .set("batch.size", cfg.batch_bytes.to_string())
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("message.max.bytes", cfg.max_message_bytes.to_string())
            .set("message.timeout.ms", delivery_ms.to_string())
            .set("request.timeout.ms", delivery_ms.min(30_000).to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.max_in_flight.max(1).to_string(),
            )
            .set("queue.buffering.max.kbytes", "1048576");
        let producer: FutureProducer = c
            .create()
            .map_err(|e| StoreError::fatal("kafka", format!("producer: {e}")))?;
        let ids = TopicIds::new(&cfg, password.clone());
        // A single consumer reads the topic once, as it is at the start (what a spool or an
        // upstream replay repeats is then recognised, for `keep`); a pair follows it all
        // along, to learn what the other consumer writes.
        let stop_after = gate.is_none().then_some(Duration::ZERO);
        let follower = TopicFollower::start(
            &cfg,
            names.clone(),
            password.clone(),
            follow_since_ms,
            keep,
            stop_after,
        );
        let standby = gate.map(|gate| Standby {
            gate,
            held: HashMap::new(),
        });
        let pending = InFlight::new(cfg.max_in_flight, cfg.max_in_flight_bytes);
        Ok(KafkaStore {
            producer,
            cfg,
            names,
            ids,
            password,
            pending,
            failed: Vec::new(),
            checking: None,
            done: Vec::new(),
            partial: None,
            ready: false,
            follower,
            started: Instant::now(),
            standby,
            unlogged: (0, None),
            refused: None,
        })
    }

    /// Reads back what this store's topic holds.
    pub fn topic_ids(&self) -> TopicIds {
        self.ids.clone()
    }

    fn name(&self, stream: StreamId) -> &str {
        self.names
            .get(usize::from(stream.0))
            .map_or("unknown", |s| s)
    }

    /// Finds the topic (creating it if so configured).
    async fn prepare(&mut self) -> Result<(), StoreError> {
        if self.ready {
            return Ok(());
        }
        self.find_topic().await?;
        if self.follower.caught_up().is_none_or(|c| c < self.started) {
            return Err(err(format!(
                "reading what topic {} already holds before writing to it",
                self.cfg.topic
            )));
        }
        self.ready = true;
        tracing::info!(topic = %self.cfg.topic, "Kafka topic ready");
        Ok(())
    }

    /// Finds the topic (creating it if so configured).
    async fn find_topic(&mut self) -> Result<(), StoreError> {
        let topic = self.cfg.topic.clone();
        let client = self.producer.clone();
        let found = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map(|t| (t.error(), t.partitions().len()))
                })
        })
        .await
        .map_err(|e| err(format!("metadata task: {e}")))?
        .map_err(|e| err(format!("brokers {}: {e}", self.cfg.bootstrap_servers)))?;
        match found {
            Some((None, n)) if n > 0 => {}
            _ if self.cfg.create_topic => self.create_topic().await?,
            Some((e, _)) => {
                return Err(StoreError::fatal(
                    "kafka",
                    format!(
                        "topic {} not usable ({:?}) and create_topic is false",
                        self.cfg.topic, e
                    ),
                ));
            }
            None => {
                return Err(StoreError::fatal(
                    "kafka",
                    format!(
                        "topic {} not found and create_topic is false",
                        self.cfg.topic
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn create_topic(&self) -> Result<(), StoreError> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<_> = self
            .cfg
            .client(self.password.as_deref())
            .create()
            .map_err(|e| err(format!("admin client: {e}")))?;
        let new = NewTopic::new(
            &self.cfg.topic,
            self.cfg.topic_partitions,
            TopicReplication::Fixed(self.cfg.replication_factor),
        );
        let results = admin
            .create_topics([&new], &AdminOptions::new())
            .await
            .map_err(|e| err(format!("creating topic {}: {e}", self.cfg.topic)))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(err(format!("creating topic {t}: {code}"))),
            }
        }
        tracing::info!(topic = %self.cfg.topic, partitions = self.cfg.topic_partitions, "created the Kafka topic");
        Ok(())
    }

    /// Hands one activity to the producer. `Err` when its queue is full.
    fn send(&self, p: &mut Pending) -> Result<(), KafkaError> {
        let key = p.id.to_string();
        let partition = p.partition.to_string();
        let path = p.path.to_string();
        let received = p.received_ms.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: HEADER_STREAM,
                value: Some(self.name(p.stream)),
            })
            .insert(Header {
                key: HEADER_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: HEADER_PATH,
                value: Some(&path),
            })
            .insert(Header {
                key: HEADER_RECEIVED,
                value: Some(&received),
            });
        let record = FutureRecord::to(&self.cfg.topic)
            .key(&key)
            .payload(&p.line[..])
            .headers(headers);
        p.sent_ms = unix_ms_now();
        match self.producer.send_result(record) {
            Ok(report) => {
                p.report = Some(report);
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    fn record(&mut self, p: &Pending, duplicate: bool) {
        match self.done.last_mut() {
            Some(a) if a.stream == p.stream && a.partition == p.partition => {
                a.ids.push(p.id);
                a.seqs.push(p.seq);
                a.duplicates += usize::from(duplicate);
            }
            _ => self.done.push(Ack {
                stream: p.stream,
                partition: p.partition,
                ids: vec![p.id],
                seqs: vec![p.seq],
                duplicates: usize::from(duplicate),
            }),
        }
    }

    /// A delivery report arrived.
    fn settle<C>(
        &mut self,
        mut p: Pending,
        report: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, C>,
    ) -> Result<(), StoreError> {
        p.report = None;
        let e = match report {
            Ok(Ok(_)) => {
                self.record(&p, false);
                return Ok(());
            }
            Ok(Err((e, _))) => e,
            Err(_) => KafkaError::Canceled,
        };
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
            let message = format!(
                "the brokers refused a record of {} bytes as too large: lower max_message_bytes ({}) to the topic's max.message.bytes",
                p.line.len(),
                self.cfg.max_message_bytes
            );
            self.failed.push(p);
            return Err(StoreError::fatal("kafka", message));
        }
        let (count, last) = &mut self.unlogged;
        *count += 1;
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            tracing::warn!(records = *count, last_id = %p.id, error = %e, "deliveries failed; each is looked for in the topic before it is sent again");
            *count = 0;
            *last = Some(Instant::now());
        }
        self.failed.push(p);
        Ok(())
    }

    /// Moves every delivery report that has arrived out of the window, without waiting.
    fn harvest(&mut self) -> Result<(), StoreError> {
        let mut still = VecDeque::with_capacity(self.pending.len());
        let mut fatal = None;
        while let Some(mut p) = self.pending.pop_front() {
            let ready = p.report.as_mut().and_then(FutureExt::now_or_never);
            match ready {
                Some(report) => {
                    if let Err(e) = self.settle(p, report) {
                        fatal = Some(e);
                    }
                }
                None => still.push_back(p),
            }
        }
        for p in still {
            self.pending.push_back(p);
        }
        fatal.map_or(Ok(()), Err)
    }

    /// Waits (bounded) for the oldest delivery report.
    async fn wait_oldest(&mut self) -> Result<(), StoreError> {
        let Some(mut p) = self.pending.pop_front() else {
            return Ok(());
        };
        let Some(report) = p.report.as_mut() else {
            return Ok(());
        };
        match tokio::time::timeout(WAIT_OLDEST, report).await {
            Ok(report) => self.settle(p, report),
            Err(_) => {
                self.pending.push_front(p);
                Err(err(format!(
                    "no delivery report within {} s: are the brokers {} reachable?",
                    WAIT_OLDEST.as_secs(),
                    self.cfg.bootstrap_servers
                )))
            }
        }
    }

    /// Bounds the in-flight window's bytes by the driver's memory budget as well: the
    /// window is part of what the driver holds, and a quarter of its budget leaves the
    /// driver's queue its room (it asks for acknowledgements at half).
    pub fn with_memory_budget(mut self, max_memory_bytes: u64) -> KafkaStore {
        self.pending.within_budget(max_memory_bytes);
        self
    }

    /// Value bytes of the records sent and not yet reported delivered.
    pub fn in_flight_bytes(&self) -> u64 {
        self.pending.bytes()
    }

    /// Makes room in the window for a record of `len` bytes: collects what was delivered,
    /// then waits for the oldest reports until it fits.
    async fn room(&mut self, len: usize) -> Result<(), StoreError> {
        if self.pending.full_for(len) {
            self.harvest()?;
            while self.pending.full_for(len) {
                self.wait_oldest().await?;
            }
        }
        Ok(())
    }

    /// Sends `p` now, waiting for room; gives it back when it could not be sent.
    async fn write(&mut self, mut p: Pending) -> Result<(), (Pending, StoreError)> {
        if let Err(e) = self.room(p.line.len()).await {
            return Err((p, e));
        }
        match self.send(&mut p) {
            Ok(()) => {
                self.pending.push_back(p);
                Ok(())
            }
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                if let Err(e) = self.wait_oldest().await {
                    return Err((p, e));
                }
                match self.send(&mut p) {
                    Ok(()) => {
                        self.pending.push_back(p);
                        Ok(())
                    }
                    Err(e) => Err((p, err(format!("producer: {e}")))),
                }
            }
            Err(e) => Err((p, err(format!("producer: {e}")))),
        }
    }

    /// Looks for the failed deliveries in the topic: those there are stored, the others are
    /// sent again. Never sends blind: a delivery can fail after the brokers stored it.
    async fn resend_failed(&mut self) -> Result<(), StoreError> {
        if self.failed.is_empty() && self.checking.is_none() {
            return Ok(());
        }
        if let Some(sb) = &mut self.standby {
            // The follower tells whether they landed; written again only by the writer.
            let now = Instant::now();
            for mut p in self.failed.drain(..) {
                p.not_before = Some(now);
                let q = sb.held.entry((p.stream, p.partition)).or_default();
                q.push_front(p);
            }
            for q in sb.held.values_mut() {
                q.make_contiguous().sort_by_key(|p| p.seq);
            }
            return Ok(());
        }
        // The read-back runs beside the driver (a slow broker must not hold up the
        // acknowledgements of everything else); its answer is taken at a later collection.
        let Some((_, task)) = &self.checking else {
            let failed = std::mem::take(&mut self.failed);
            let since = (failed.iter().map(|p| p.sent_ms).min()).unwrap_or(0);
            let ids = self.ids.clone();
            let task = tokio::spawn(async move {
                ids.between(
                    None,
                    since.saturating_sub(READ_BACK_SLACK_MS),
                    unix_ms_now() + READ_BACK_SLACK_MS,
                )
                .await
            });
            self.checking = Some((failed, task));
            return Ok(());
        };
        if !task.is_finished() {
            return Ok(());
        }
        let Some((checked, task)) = self.checking.take() else {
            return Ok(());
        };
        let held = match task.await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                self.failed.splice(0..0, checked);
                return Err(e);
            }
            Err(e) => {
                self.failed.splice(0..0, checked);
                return Err(err(format!("read-back task: {e}")));
            }
        };
        let mut again = VecDeque::new();
        for p in checked {
            let name = self.name(p.stream).to_owned();
            if held
                .get(&(name, p.partition))
                .is_some_and(|ids| ids.contains(&p.id))
            {
                self.record(&p, false);
            } else {
                again.push_back(p);
            }
        }
        if !again.is_empty() {
            tracing::info!(
                records = again.len(),
                "sending again the records the topic does not hold"
            );
        }
        while let Some(p) = again.pop_front() {
            if let Err((p, e)) = self.write(p).await {
                self.failed.push(p);
                self.failed.extend(again);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The standby's part of collecting: what the topic now holds is acknowledged (stored by
    /// the other consumer); what it does not is written once this consumer is the writer
    /// and has read everything the last writer left.
    async fn standby(&mut self) -> Result<(), StoreError> {
        let Some(mut sb) = self.standby.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        let mut held = std::mem::take(&mut sb.held);
        for q in held.values_mut() {
            let mut keep = VecDeque::new();
            while let Some(p) = q.pop_front() {
                let name = self.name(p.stream).to_owned();
                if self.follower.holds(p.stream, p.partition, p.id) {
                    self.record(&p, true);
                } else if result.is_err()
                    || !keep.is_empty()
                    || !sb.may_write(&self.follower, &name, &p)
                {
                    keep.push_back(p);
                } else if let Err((p, e)) = self.write(p).await {
                    keep.push_back(p);
                    result = Err(e);
                }
            }
            *q = keep;
        }
        held.retain(|_, q| !q.is_empty());
        sb.held = held;
        self.standby = Some(sb);
        result
    }
}

impl Store for KafkaStore {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn put(&mut self, batch: &UniqueBatch) -> Result<(), StoreError> {
        self.prepare().await?;
        self.harvest()?;
        // The producer queues while the brokers are away: a report this late means they
        // are, and the driver should spool (and say the sink is down) rather than queue more.
        if let Some(oldest) = self.pending.front()
            && unix_ms_now().saturating_sub(oldest.sent_ms) > WAIT_OLDEST.as_millis() as u64
        {
            return Err(err(format!(
                "no delivery report for {} s: are the brokers {} reachable?",
                WAIT_OLDEST.as_secs(),
                self.cfg.bootstrap_servers
            )));
        }
        let skip = match (&self.partial, batch.items.first()) {
            (Some((s, p, first, n)), Some(u))
                if *s == batch.stream && *p == batch.partition && *first == u.id =>
            {
                *n
            }
            _ => 0,
        };
        self.partial = None;
        let name = self.name(batch.stream).to_owned();
        let now_ms = unix_ms_now();
        let now = tokio::time::Instant::now();
        for (i, u) in batch.items.iter().enumerate().skip(skip) {
            let age = now.saturating_duration_since(u.received).as_millis() as u64;
            let p = Pending {
                stream: batch.stream,
                partition: batch.partition,
                seq: u.seq,
                id: u.id,
                line: u.line.clone(),
                path: u.path.0,
                received_ms: now_ms.saturating_sub(age),
                sent_ms: 0,
                not_before: None,
                report: None,
            };
            if self.follower.holds(batch.stream, batch.partition, u.id) {
                // Stored already: by the other consumer of a pair, or before a restart.
                self.record(&p, true);
                continue;
            }
            if let Some(sb) = &mut self.standby {
                let waiting = sb.held.contains_key(&(batch.stream, batch.partition));
                if waiting || !sb.may_write(&self.follower, &name, &p) {
                    if sb.held() >= self.cfg.max_in_flight {
                        self.partial =
                            (i > 0).then(|| (batch.stream, batch.partition, batch.items[0].id, i));
                        return Err(err(format!(
                            "{} activities wait for the other consumer of the pair to store them",
                            sb.held()
                        )));
                    }
                    sb.held
                        .entry((batch.stream, batch.partition))
                        .or_default()
                        .push_back(p);
                    continue;
                }
            }
            if let Err((_, e)) = self.write(p).await {
                self.partial =
                    (i > 0).then(|| (batch.stream, batch.partition, batch.items[0].id, i));
                return Err(e);
            }
        }
        Ok(())
    }

    async fn acks(&mut self, force: bool) -> Result<Vec<Ack>, StoreError> {
        if let Some(e) = self.refused.take() {
            return Err(e);
        }
        let mut result = self.harvest();
        if result.is_ok() {
            result = self.resend_failed().await;
        }
        if result.is_ok() {
            result = self.standby().await;
        }
        if force {
            while !self.pending.is_empty() {
                if self.wait_oldest().await.is_err() {
                    break;
                }
            }
        }
        let done = std::mem::take(&mut self.done);
        match result {
            Err(e) if done.is_empty() => Err(e),
            Err(e) if e.class == crate::store::ErrorClass::Fatal => {
                self.refused = Some(e);
                Ok(done)
            }
            _ => Ok(done),
        }
    }

    fn unacknowledged(&self) -> usize {
        self.pending.len() + self.failed.len() + self.standby.as_ref().map_or(0, Standby::held)
    }
}

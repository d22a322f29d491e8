//! What the topic holds, read from the brokers: by time ([`TopicIds::between`], for gap
//! repair, a restart and a record whose delivery failed) and as it grows
//! ([`TopicFollower`], for the standby of a pair).
//!
//! Records are keyed by activity id and carry the upstream stream and partition in
//! headers, so a read-back is a scan of every topic partition from the first record at or
//! after a time (the brokers' time index), keeping the ids whose headers match.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tandem_core::{ActivityId, Partition};

use super::KafkaConfig;
use crate::store::StoreError;

/// Header naming the upstream stream (its configured name).
pub const HEADER_STREAM: &str = "tandem-stream";
/// Header with the upstream partition, in decimal.
pub const HEADER_PARTITION: &str = "tandem-partition";
/// Header with the path whose copy was stored first (its index in the stream's `paths`).
pub const HEADER_PATH: &str = "tandem-path";
/// Header with the time the stored copy was received, Unix ms in decimal.
pub const HEADER_RECEIVED: &str = "tandem-received-ms";

/// How often a follower asks where the topic ends.
const TARGET_EVERY: Duration = Duration::from_millis(500);

/// How long one metadata or offset request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn err(message: impl std::fmt::Display) -> StoreError {
    StoreError::transient("kafka", message.to_string())
}

/// A consumer that reads by assignment, never joins a group and commits nothing.
fn reader(cfg: &KafkaConfig, password: Option<&str>) -> Result<BaseConsumer, StoreError> {
    let mut c = cfg.client(password);
    c.set("group.id", "tandem-read-back")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    c.create()
        .map_err(|e| StoreError::fatal("kafka", format!("read-back client: {e}")))
}

/// The topic's partitions.
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, StoreError> {
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| err(format!("metadata of topic {topic}: {e}")))?;
    let t = (md.topics().iter())
        .find(|t| t.name() == topic)
        .ok_or_else(|| err(format!("topic {topic} not in the metadata")))?;
    if let Some(e) = t.error() {
        return Err(err(format!("topic {topic}: {:?}", e)));
    }
    let parts: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if parts.is_empty() {
        return Err(err(format!("topic {topic} has no partitions")));
    }
    Ok(parts)
}

/// Per topic partition: the first offset at or after `since_ms`, and the end now.
fn ranges(
    consumer: &BaseConsumer,
    topic: &str,
    parts: &[i32],
    since_ms: u64,
) -> Result<HashMap<i32, (i64, i64)>, StoreError> {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, *p, Offset::Offset(since_ms as i64))
            .map_err(err)?;
    }
    let found = consumer
        .offsets_for_times(tpl, REQUEST_TIMEOUT)
        .map_err(|e| err(format!("offsets of topic {topic} by time: {e}")))?;
    let mut out = HashMap::new();
    for p in parts {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, REQUEST_TIMEOUT)
            .map_err(|e| err(format!("end of {topic}/{p}: {e}")))?;
        let start = match found.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            // No record at or after the time.
            _ => high,
        };
        out.insert(*p, (start, high));
    }
    Ok(out)
}

/// Reads from each partition's offset.
fn assign(
    consumer: &BaseConsumer,
    topic: &str,
    from: &HashMap<i32, i64>,
) -> Result<(), StoreError> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in from {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .map_err(err)?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| err(format!("assign: {e}")))
}

/// What a record says about itself: (stream, partition, activity id), when it is one of
/// tandem's.
fn identify(m: &BorrowedMessage<'_>) -> Option<(String, Partition, ActivityId)> {
    let id = std::str::from_utf8(m.key()?).ok()?.parse().ok()?;
    let headers = m.headers()?;
    let (mut stream, mut partition) = (None, None);
    for h in headers.iter() {
        match h.key {
            HEADER_STREAM => stream = h.value.and_then(|v| std::str::from_utf8(v).ok()),
            HEADER_PARTITION => {
                partition = h
                    .value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
    Some((stream?.to_owned(), partition?, id))
}

/// Ids by (stream name, partition).
pub type HeldIds = HashMap<(String, Partition), HashSet<ActivityId>>;

/// Reads back what the topic holds.
#[derive(Clone)]
pub struct TopicIds {
    cfg: KafkaConfig,
    password: Option<String>,
}

impl std::fmt::Debug for TopicIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicIds")
            .field("topic", &self.cfg.topic)
            .finish()
    }
}

impl TopicIds {
    pub fn new(cfg: &KafkaConfig, password: Option<String>) -> TopicIds {
        TopicIds {
            cfg: cfg.clone(),
            password,
        }
    }

    /// The ids of records written from `since_ms` to `until_ms` (Unix ms, the records'
    /// timestamps: when they were produced), of one upstream partition or of all. Reads to
    /// the end the topic had when the call began, or to the first record after `until_ms`,
    /// on every topic partition.
    pub async fn between(
        &self,
        only: Option<(&str, Partition)>,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<HeldIds, StoreError> {
        let this = self.clone();
        let only = only.map(|(s, p)| (s.to_owned(), p));
        tokio::task::spawn_blocking(move || this.read(only, since_ms, until_ms))
            .await
            .map_err(|e| err(format!("read-back task: {e}")))?
    }

    fn read(
        &self,
        only: Option<(String, Partition)>,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<HeldIds, StoreError> {
        let topic = &self.cfg.topic;
        let consumer = reader(&self.cfg, self.password.as_deref())?;
        let parts = partitions(&consumer, topic)?;
        let ranges = ranges(&consumer, topic, &parts, since_ms)?;
        let mut open: HashMap<i32, i64> = (ranges.iter())
            .filter(|(_, (start, high))| start < high)
            .map(|(p, (_, high))| (*p, *high))
            .collect();
        let mut out = HeldIds::new();
        if open.is_empty() {
            return Ok(out);
        }
        let from = ranges.iter().map(|(p, (s, _))| (*p, *s)).collect();
        assign(&consumer, topic, &from)?;
        let records: i64 = ranges.values().map(|(s, h)| h - s).sum();
        // Generous: any broker serves a hundred records a second.
        let deadline =
            Instant::now() + Duration::from_secs(30) + Duration::from_millis(10 * records as u64);
        let mut last_error = None;
        while !open.is_empty() {
            if Instant::now() > deadline {
                return Err(err(format!(
                    "reading back {topic}: {} partitions not read to their end in time (last error: {})",
                    open.len(),
                    last_error.as_deref().unwrap_or("none")
                )));
            }
            let m = match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Ok(m)) => m,
                // librdkafka reports a broker connection going down (and reconnects): the
                // deadline bounds how long that may last.
                Some(Err(e)) => {
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            let Some(&high) = open.get(&m.partition()) else {
                continue;
            };
            let late = (m.timestamp().to_millis()).is_some_and(|t| t > until_ms as i64);
            if m.offset() + 1 >= high || late {
                open.remove(&m.partition());
            }
            if late {
                continue;
            }
            if let Some((stream, partition, id)) = identify(&m)
                && only
                    .as_ref()
                    .is_none_or(|(s, p)| *s == stream && *p == partition)
            {
                out.entry((stream, partition)).or_default().insert(id);
            }
        }
        Ok(out)
    }
}

/// An activity of a configured stream, compactly: (stream index, partition, dedup key).
type SeenKey = (u16, Partition, tandem_core::DedupKey);

/// What a [`TopicFollower`] has read.
#[derive(Debug, Default)]
struct Seen {
    /// Each id of a configured stream read, with its record's timestamp (Unix ms).
    ids: HashMap<SeenKey, i64>,
    /// The latest moment for which everything the topic held then has been read.
    caught_up: Option<Instant>,
}

/// Follows the topic from a time on, in a thread of its own, remembering the ids of the
/// records read for `keep` (pruned by record time), and when it had last read everything
/// the topic held: the standby of a pair learns from it what the writer stored, and a new
/// writer waits until it has read what the old one left.
#[derive(Debug)]
pub struct TopicFollower {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl Drop for TopicFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl TopicFollower {
    /// Starts following `cfg.topic` from the records produced at `since_ms` on. With
    /// `stop_after`, it stops reading once that has passed and it has read the topic as of
    /// its start (what it read is still answered until older than `keep`). Records of
    /// streams not in `names` are skipped.
    pub fn start(
        cfg: &KafkaConfig,
        names: crate::StreamNames,
        password: Option<String>,
        since_ms: u64,
        keep: Duration,
        stop_after: Option<Duration>,
    ) -> TopicFollower {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (cfg, s, st) = (cfg.clone(), seen.clone(), stop.clone());
        let until = stop_after.map(|d| Instant::now() + d);
        let spawned = std::thread::Builder::new()
            .name("kafka-follow".into())
            .spawn(move || {
                follow(
                    &cfg,
                    &names,
                    password.as_deref(),
                    since_ms,
                    keep,
                    until,
                    &s,
                    &st,
                );
                // Stopped by its deadline: what it read is still asked until it is older
                // than `keep`; pruned here until nothing is left (or the store is gone).
                while !st.load(Ordering::Relaxed) {
                    let oldest = tandem_core::time::unix_ms_now()
                        .saturating_sub(keep.as_millis() as u64)
                        as i64;
                    let mut seen = s.lock().unwrap_or_else(PoisonError::into_inner);
                    seen.ids.retain(|_, at| *at >= oldest);
                    if seen.ids.is_empty() {
                        break;
                    }
                    drop(seen);
                    // The follower's own thread, never a runtime worker.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_secs(1));
                }
                s.lock().unwrap_or_else(PoisonError::into_inner).ids = HashMap::new();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start following the topic");
        }
        TopicFollower { seen, stop }
    }

    /// Whether the topic holds a record of this activity (read since the follower began,
    /// within `keep`).
    pub fn holds(
        &self,
        stream: tandem_core::StreamId,
        partition: Partition,
        id: ActivityId,
    ) -> bool {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.ids
            .contains_key(&(stream.0, partition, id.dedup_key()))
    }

    /// The latest moment for which everything the topic held then has been read; for a
    /// follower that stopped, the moment it stopped (it is no longer asked).
    pub fn caught_up(&self) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .caught_up
    }
}

/// The follower's thread: (re)connects, reads, prunes, and checks how far it has caught up.
#[allow(clippy::too_many_arguments)]
fn follow(
    cfg: &KafkaConfig,
    names: &crate::StreamNames,
    password: Option<&str>,
    since_ms: u64,
    keep: Duration,
    until: Option<Instant>,
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
) {
    // Past its deadline, a follower stops once it has read the topic as of its start (a
    // broker down all along does not end it before it has).
    let stop = || {
        stop.load(Ordering::Relaxed)
            || (until.is_some_and(|u| Instant::now() >= u)
                && seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .caught_up
                    .is_some())
    };
    let topic = &cfg.topic;
    // Where each partition is read from next; survives a reconnection.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut last_error = None::<Instant>;
    while !stop() {
        let started = (|| {
            let consumer = reader(cfg, password)?;
            let parts = partitions(&consumer, topic)?;
            if parts.iter().any(|p| !next.contains_key(p)) {
                let r = ranges(&consumer, topic, &parts, since_ms)?;
                for (p, (start, _)) in r {
                    next.entry(p).or_insert(start);
                }
            }
            assign(&consumer, topic, &next)?;
            Ok::<_, StoreError>((consumer, parts))
        })();
        let (consumer, parts) = match started {
            Ok(c) => c,
            Err(e) => {
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(error = %e, "cannot follow the topic yet; retrying");
                    last_error = Some(Instant::now());
                }
                // The follower's own thread, never a runtime worker.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        // The ends to reach, and when they were asked: reached, that moment is caught up.
        let mut target: Option<(Instant, HashMap<i32, i64>)> = None;
        let mut asked = Instant::now()
            .checked_sub(TARGET_EVERY)
            .unwrap_or_else(Instant::now);
        let mut pruned = Instant::now();
        while !stop() {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    next.insert(m.partition(), m.offset() + 1);
                    if let Some((stream, partition, id)) = identify(&m)
                        && let Some(index) = names.iter().position(|n| **n == *stream)
                    {
                        let at = m.timestamp().to_millis().unwrap_or(0);
                        let key = (index as u16, partition, id.dedup_key());
                        seen.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .ids
                            .insert(key, at);
                    }
                }
                Some(Err(e))
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) =>
                {
                    tracing::warn!(error = %e, "following the topic");
                    last_error = Some(Instant::now());
                }
                Some(Err(_)) => {}
                None => {}
            }
            if let Some((at, ends)) = &target
                && ends
                    .iter()
                    .all(|(p, end)| next.get(p).is_some_and(|n| n >= end))
            {
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .caught_up = Some(*at);
                target = None;
            }
            // The ends are asked at most every TARGET_EVERY: each is a request per topic
            // partition, and a broker is asked for them by every follower all along.
            if target.is_none() && asked.elapsed() >= TARGET_EVERY {
                asked = Instant::now();
                let at = Instant::now();
                let ends: Result<HashMap<i32, i64>, _> = (parts.iter())
                    .map(|p| {
                        consumer
                            .fetch_watermarks(topic, *p, REQUEST_TIMEOUT)
                            .map(|(_, high)| (*p, high))
                    })
                    .collect();
                match ends {
                    Ok(ends) => target = Some((at, ends)),
                    Err(e) => {
                        tracing::debug!(error = %e, "end of the topic unknown; reconnecting");
                        break;
                    }
                }
            }
            if pruned.elapsed() > Duration::from_secs(1) {
                let oldest =
                    tandem_core::time::unix_ms_now().saturating_sub(keep.as_millis() as u64);
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .ids
                    .retain(|_, at| *at >= oldest as i64);
                pruned = Instant::now();
            }
        }
    }
}

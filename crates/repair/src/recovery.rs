//! One recovery chunk: a time-range request on the stream's own endpoint, read like a live
//! stream, its lines handed to the partition's merger, until the upstream says the request
//! is complete. A connection that breaks is resumed from the last minute fully received;
//! the same [`ReconnectPolicy`] as live connections decides whether and when, so a client
//! error (400 outside retention, 401, 403, 404) ends the chunk as unrecoverable instead of
//! being retried forever.
//!
//! The chunks at a gap's edges reach a margin beyond it, into time that was stored
//! before the outage (and may have left the merger's dedup window long ago). The ids
//! stored around the edges ([`EdgeIds`]) are checked here: a recovered copy of one is
//! counted as a duplicate and goes no further. Everything else goes to the merger.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tandem_conn::reader::{Frame, LineReader};
use tandem_conn::{
    ConnKey, Decision, Endpoint, ErrorKind, LivenessConfig, Query, ReadConfig, ReconnectPolicy,
    RetryConfig, StreamError,
};
use tandem_core::metric as m;
use tandem_core::time::unix_ms_now;
use tandem_core::{Batch, LineKind, Origin, Tally};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, sleep};

/// Resumption starts from the beginning of the minute of the latest activity received:
/// the minutes before it are complete, since recovery delivers oldest minute first.
pub const RESUME_GRANULARITY_MS: u64 = 60_000;

/// Everything the recovery requests of one partition need.
#[derive(Debug, Clone)]
pub struct RecoverySpec {
    /// Names for logs and metrics (the path is `recovery`).
    pub key: ConnKey,
    /// The origin recovered lines carry to the merger (a path number of its own).
    pub origin: Origin,
    pub endpoint: Endpoint,
    pub client: reqwest::Client,
    pub retry: RetryConfig,
    pub liveness: LivenessConfig,
    pub read: ReadConfig,
    pub tally: Arc<Tally>,
    /// The partition's merger.
    pub out: mpsc::Sender<Batch>,
    /// Held across a send and its count on the recovery lane, so that the chunks running
    /// at once hand their lines over as one FIFO (see [`tandem_core::tally::Lanes`]).
    pub send_lock: Arc<tokio::sync::Mutex<()>>,
    /// Recovery jobs of the account (the upstream runs 2 at once).
    pub jobs: Arc<Semaphore>,
}

/// How a chunk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The upstream sent its completion message and every line went to the merger (the
    /// chunk is done once they are stored: the repairer waits for the watermark).
    Completed { activities: u64, requests: u32 },
    /// The upstream refused it for good; the reason names the status and message.
    Unrecoverable(StreamError),
    /// The process is stopping.
    Shutdown,
}

/// Ids already stored that a recovered copy must not be stored again: posts stored around
/// a gap's edges, and, with a store shared by two consumers, whatever it already holds.
pub type EdgeIds = Arc<HashSet<tandem_core::ActivityId>>;

/// How one request ended.
enum Read {
    Completed,
    Shutdown,
    Broken(StreamError),
}

/// Recovers `[start_ms, end_ms)` of the spec's partition.
pub async fn recover(
    spec: &RecoverySpec,
    start_ms: u64,
    end_ms: u64,
    edge: EdgeIds,
    mut shutdown: watch::Receiver<bool>,
) -> ChunkOutcome {
    let seed = unix_ms_now() ^ (start_ms << 3) ^ u64::from(spec.origin.partition);
    let mut policy = ReconnectPolicy::new(spec.retry.clone(), seed);
    let mut from = start_ms;
    let mut activities = 0u64;
    let mut requests = 0u32;
    let labels = [
        (m::STREAM, spec.key.stream.to_string()),
        (m::PARTITION, spec.key.partition.to_string()),
        (m::PATH, spec.key.path.to_string()),
    ];
    let meters = Meters {
        raw: metrics::counter!(m::RAW_ACTIVITIES, &labels),
        duplicates: metrics::counter!(m::DUPLICATES, &labels),
    };
    loop {
        let permit = tokio::select! {
            p = spec.jobs.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return ChunkOutcome::Shutdown,
            },
            () = tandem_conn::connection::stopped(&mut shutdown) => return ChunkOutcome::Shutdown,
        };
        requests += 1;
        tracing::info!(
            start = %tandem_core::time::rfc3339_ms(from), end = %tandem_core::time::rfc3339_ms(end_ms),
            "recovery request"
        );
        let opened = spec
            .endpoint
            .open(
                &spec.client,
                spec.origin.partition,
                Query::Recovery {
                    start_ms: from,
                    end_ms,
                },
            )
            .await;
        let (error, live_for) = match opened {
            Err(e) => (e, None),
            Ok(resp) => {
                let started = Instant::now();
                let mut latest = None;
                let read = read(
                    spec,
                    resp,
                    Progress {
                        connection: u64::from(requests),
                        activities: &mut activities,
                        latest: &mut latest,
                    },
                    &edge,
                    &meters,
                    &mut shutdown,
                )
                .await;
                if let Some(l) = latest {
                    from = from.max(l - l % RESUME_GRANULARITY_MS).min(end_ms - 1);
                }
                match read {
                    Read::Completed => {
                        tandem_core::crash::point("repair.chunk_read");
                        return ChunkOutcome::Completed {
                            activities,
                            requests,
                        };
                    }
                    Read::Shutdown => return ChunkOutcome::Shutdown,
                    Read::Broken(e) => (e, Some(started.elapsed())),
                }
            }
        };
        drop(permit);
        tracing::warn!(
            status = error.status,
            kind = error.kind.label(), error = %error.message,
            resume = %tandem_core::time::rfc3339_ms(from), "recovery request ended early"
        );
        match policy.decide(&error, live_for, Instant::now()) {
            Decision::GiveUp(e) => return ChunkOutcome::Unrecoverable(e),
            Decision::Retry { delay, .. } => tokio::select! {
                () = sleep(delay) => {}
                () = tandem_conn::connection::stopped(&mut shutdown) => return ChunkOutcome::Shutdown,
            },
        }
    }
}

/// Whether a line is the upstream's "recovery request completed" message.
fn is_completion(line: &[u8]) -> bool {
    if !line.starts_with(b"{\"info\"") {
        return false;
    }
    matches!(
        tandem_core::identify(line),
        Ok(LineKind::System(msg)) if msg.message.to_ascii_lowercase().contains("completed")
    )
}

struct Meters {
    raw: metrics::Counter,
    duplicates: metrics::Counter,
}

/// What a request got through, for resumption.
struct Progress<'a> {
    connection: u64,
    activities: &'a mut u64,
    /// Content time of the latest activity received.
    latest: &'a mut Option<u64>,
}

/// Reads one recovery response to its end.
async fn read(
    spec: &RecoverySpec,
    mut resp: reqwest::Response,
    progress: Progress<'_>,
    edge: &HashSet<tandem_core::ActivityId>,
    meters: &Meters,
    shutdown: &mut watch::Receiver<bool>,
) -> Read {
    let Progress {
        connection,
        activities,
        latest,
    } = progress;
    let gzip = resp
        .headers()
        .get(reqwest::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let mut reader = LineReader::new(gzip, spec.read.chunk_size_bytes, spec.read.max_line_bytes);
    let quiet_limit = Duration::from_millis(
        spec.liveness.heartbeat_interval_ms + spec.liveness.heartbeat_margin_ms,
    );
    let mut frames = Vec::new();
    let mut seq = 0u64;
    let mut completed = false;
    loop {
        let chunk = tokio::select! {
            c = tokio::time::timeout(quiet_limit, resp.chunk()) => c,
            () = tandem_conn::connection::stopped(shutdown) => return Read::Shutdown,
        };
        let chunk = match chunk {
            Err(_) => {
                return Read::Broken(StreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "no byte for {:.1} s (heartbeat gap)",
                        quiet_limit.as_secs_f64()
                    ),
                ));
            }
            Ok(Err(e)) => return Read::Broken(StreamError::from_reqwest(&e)),
            Ok(Ok(None)) if completed => return Read::Completed,
            Ok(Ok(None)) => {
                return Read::Broken(StreamError::new(
                    ErrorKind::StreamInterrupted,
                    "the server closed the recovery stream before its completion message",
                ));
            }
            Ok(Ok(Some(c))) => c,
        };
        if let Err(e) = reader.feed(&chunk, &mut frames) {
            return Read::Broken(StreamError::new(
                ErrorKind::StreamInterrupted,
                format!("undecodable stream: {e}"),
            ));
        }
        let mut lines = Vec::with_capacity(frames.len());
        let mut stored_before = 0u64;
        for f in frames.drain(..) {
            if let Frame::Line(line) = f {
                if is_completion(&line) {
                    completed = true;
                } else if let Ok(LineKind::Activity(id)) = tandem_core::identify(&line) {
                    *activities += 1;
                    if let Some(t) = id.created_unix_ms() {
                        *latest = Some(latest.map_or(t, |l: u64| l.max(t)));
                    }
                    if edge.contains(&id) {
                        stored_before += 1;
                        continue;
                    }
                }
                lines.push(line);
            }
        }
        if stored_before > 0 {
            // Raw and duplicate at once: the accounting (raw = unique + duplicates + …)
            // holds without the merger seeing them.
            Tally::add(&spec.tally.duplicates, stored_before);
            Tally::add(&spec.tally.raw, stored_before);
            meters.raw.increment(stored_before);
            meters.duplicates.increment(stored_before);
        }
        if lines.is_empty() {
            if completed {
                return Read::Completed;
            }
            continue;
        }
        let n = lines.len() as u64;
        meters.raw.increment(n);
        Tally::add(&spec.tally.raw, n);
        let batch = Batch {
            origin: spec.origin,
            connection,
            received: Instant::now(),
            first_seq: seq,
            lines,
        };
        seq += n;
        let lane = spec.send_lock.lock().await;
        tokio::select! {
            sent = spec.out.send(batch) => if sent.is_err() {
                return Read::Shutdown;
            },
            () = tandem_conn::connection::stopped(shutdown) => return Read::Shutdown,
        }
        spec.tally.lanes.hand(usize::from(spec.origin.path.0), n);
        drop(lane);
        if completed {
            // Nothing follows the completion message; do not wait for the close.
            return Read::Completed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The completion message is recognised; an activity mentioning it is not.
    #[test]
    fn completion_message() {
        assert!(is_completion(
            br#"{"info":{"message":"Recovery Request Completed","sent":"2026-01-01T00:00:00.000Z","activity_count":3}}"#
        ));
        assert!(!is_completion(
            br#"{"id":1,"text":"Recovery Request Completed"}"#
        ));
        assert!(!is_completion(
            br#"{"info":{"message":"Replay Request Started"}}"#
        ));
    }
}

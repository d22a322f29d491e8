//! One recovery chunk: a time-range request on the stream's recovery endpoint (Gnip: its
//! own host; X API v2: the live URL), read like a live stream, its lines handed to the
//! partition's merger, until the request is complete: Gnip says so ("Recovery Request
//! Completed"); X API v2 re-streams the range and closes, so a clean close is complete
//! when the latest activity reached the chunk's last minute, or when the request brought
//! nothing newer than the one before it (the range holds no more).
//!
//! A connection that breaks is resumed from the last minute fully received, through the
//! path that is live now. The same [`ReconnectPolicy`] as live connections decides whether
//! and when, credentials refused (401, 403) included, which are retried slowly; any other
//! client error (400 outside retention, 404) ends the chunk as unrecoverable instead of
//! being retried forever.
//!
//! The chunks at a gap's edges reach a margin beyond it, into time that was stored
//! before the outage (and may have left the merger's dedup window long ago). The ids
//! stored around the edges ([`EdgeIds`]) are checked here: a recovered copy of one is
//! counted as a duplicate and goes no further. Everything else goes to the merger.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tandem_conn::reader::{Frame, LineReader};
use tandem_conn::{
    ConnKey, Decision, Endpoint, ErrorKind, LivenessConfig, PartitionLiveness, Query, ReadConfig,
    ReconnectPolicy, RetryConfig, StreamError,
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
    /// One client per path of the partition; a request leaves through the path that is
    /// live now ([`PartitionLiveness::freshest_live_path`]).
    pub clients: Vec<reqwest::Client>,
    /// The partition's live connections, for choosing a path.
    pub partition: Arc<PartitionLiveness>,
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
    pub jobs: Arc<dyn JobSlots>,
}

/// The recovery job slots of an account: a request runs only while it holds one.
pub trait JobSlots: Send + Sync + std::fmt::Debug {
    /// Waits for a free slot; `None` once the slots are closed (shutdown).
    fn acquire(&self) -> std::pin::Pin<Box<dyn Future<Output = Option<JobPermit>> + Send + '_>>;
}

/// A held job slot; dropping it frees the slot.
pub struct JobPermit(#[allow(dead_code)] Box<dyn Send + Sync>);

impl JobPermit {
    /// A permit that holds `guard` (whatever frees the slot when dropped).
    pub fn new(guard: impl Send + Sync + 'static) -> JobPermit {
        JobPermit(Box::new(guard))
    }
}

impl std::fmt::Debug for JobPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobPermit")
    }
}

/// The job slots of one process: a semaphore of `max_jobs_per_account` permits.
#[derive(Debug, Clone)]
pub struct LocalJobs(pub Arc<Semaphore>);

impl JobSlots for LocalJobs {
    fn acquire(&self) -> std::pin::Pin<Box<dyn Future<Output = Option<JobPermit>> + Send + '_>> {
        Box::pin(async move {
            self.0
                .clone()
                .acquire_owned()
                .await
                .ok()
                .map(JobPermit::new)
        })
    }
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

/// Recovers `[start_ms, end_ms)` of the spec's partition.
pub async fn recover(
    spec: &RecoverySpec,
    start_ms: u64,
    end_ms: u64,
    edge: EdgeIds,
    shutdown: watch::Receiver<bool>,
) -> ChunkOutcome {
    let labels = [
        (m::STREAM, spec.key.stream.to_string()),
        (m::PARTITION, spec.key.partition.to_string()),
        (m::PATH, spec.key.path.to_string()),
    ];
    let seed = unix_ms_now() ^ (start_ms << 3) ^ u64::from(spec.origin.partition);
    let mut chunk = Chunk {
        spec,
        end_ms,
        edge,
        shutdown,
        policy: ReconnectPolicy::new(spec.retry.clone(), seed),
        from: start_ms,
        latest: None,
        closes_without_progress: 0,
        activities: 0,
        requests: 0,
        raw: metrics::counter!(m::RAW_ACTIVITIES, &labels),
        duplicates: metrics::counter!(m::DUPLICATES, &labels),
    };
    loop {
        let (error, live_for) = match chunk.request().await {
            Read::Completed => {
                tandem_core::crash::point("repair.chunk_read");
                return ChunkOutcome::Completed {
                    activities: chunk.activities,
                    requests: chunk.requests,
                };
            }
            Read::Shutdown => return ChunkOutcome::Shutdown,
            Read::Broken(e, live_for) => (e, live_for),
        };
        tracing::warn!(
            status = error.status, kind = error.kind.label(), error = %error.message,
            resume = %tandem_core::time::rfc3339_ms(chunk.from), "recovery request ended early"
        );
        if error.status == Some(400) {
            // Outside retention, a bad range: the same request cannot succeed. Other
            // refusals (a wrong recovery URL's 404, credentials) are retried slowly.
            return ChunkOutcome::Unrecoverable(error);
        }
        match chunk.policy.decide(&error, live_for, Instant::now()) {
            Decision::GiveUp(e) => return ChunkOutcome::Unrecoverable(e),
            Decision::Retry { delay, .. } => tokio::select! {
                () = sleep(delay) => {}
                () = tandem_conn::connection::stopped(&mut chunk.shutdown) => return ChunkOutcome::Shutdown,
            },
        }
    }
}

/// How near the chunk's end the latest activity must be for a clean close to complete an
/// X API v2 chunk (activities are streamed in time order).
pub const CLOSE_END_TOLERANCE_MS: u64 = 5_000;

/// Whether a clean close completes an X API v2 chunk ending at `end_ms`: the latest
/// activity received reached its end, or two clean closes in a row brought nothing newer
/// (the range holds no more; one such close could be a server that closed early).
pub fn complete_by_close(latest: Option<u64>, end_ms: u64, closes_without_progress: u32) -> bool {
    latest.is_some_and(|l| l + CLOSE_END_TOLERANCE_MS >= end_ms) || closes_without_progress >= 2
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

/// One chunk on its way: where the next request resumes, and what came so far.
struct Chunk<'a> {
    spec: &'a RecoverySpec,
    end_ms: u64,
    edge: EdgeIds,
    shutdown: watch::Receiver<bool>,
    policy: ReconnectPolicy,
    /// Where the next request starts.
    from: u64,
    /// Content time of the latest activity any request of the chunk delivered.
    latest: Option<u64>,
    /// Clean closes in a row that brought nothing newer (X API v2).
    closes_without_progress: u32,
    activities: u64,
    requests: u32,
    raw: metrics::Counter,
    duplicates: metrics::Counter,
}

/// How one request ended.
enum Read {
    Completed,
    Shutdown,
    /// With how long the request was live (if it was answered).
    Broken(StreamError, Option<Duration>),
}

/// What one response delivered so far.
struct Response {
    reader: LineReader,
    frames: Vec<Frame>,
    connection: u64,
    seq: u64,
    completed: bool,
    /// Content time of the latest activity received.
    latest: Option<u64>,
    /// The last error message the upstream sent in the stream (a close after one is not
    /// a completion).
    error: Option<String>,
}

impl Chunk<'_> {
    /// One request (within the account's job limit) read to its end.
    async fn request(&mut self) -> Read {
        let spec = self.spec;
        let _permit = tokio::select! {
            p = spec.jobs.acquire() => match p {
                Some(p) => p,
                None => return Read::Shutdown,
            },
            () = tandem_conn::connection::stopped(&mut self.shutdown) => return Read::Shutdown,
        };
        self.requests += 1;
        let (from, end_ms) = (self.from, self.end_ms);
        tracing::info!(
            start = %tandem_core::time::rfc3339_ms(from), end = %tandem_core::time::rfc3339_ms(end_ms),
            "recovery request"
        );
        let query = Query::Recovery {
            start_ms: from,
            end_ms,
        };
        let path = spec
            .partition
            .freshest_live_path()
            .unwrap_or(self.requests as usize)
            % spec.clients.len();
        let resp = match spec
            .endpoint
            .open(&spec.clients[path], spec.origin.partition, query)
            .await
        {
            Err(e) => return Read::Broken(e, None),
            Ok(resp) => resp,
        };
        let started = Instant::now();
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let mut r = Response {
            reader: LineReader::new(gzip, spec.read.chunk_size_bytes, spec.read.max_line_bytes),
            frames: Vec::new(),
            connection: u64::from(self.requests),
            seq: 0,
            completed: false,
            latest: None,
            error: None,
        };
        let read = self.read(resp, &mut r).await;
        // Recovery delivers oldest minute first: the minutes before the latest are whole.
        if let Some(l) = r.latest {
            self.from = self.from.max(l - l % RESUME_GRANULARITY_MS).min(end_ms - 1);
        }
        self.latest = self.latest.max(r.latest);
        match read {
            Err(e) => Read::Broken(e, Some(started.elapsed())),
            Ok(true) => Read::Completed,
            Ok(false) => Read::Shutdown,
        }
    }

    /// Reads a response to its end: `Ok(true)` once complete, `Ok(false)` at shutdown.
    async fn read(
        &mut self,
        mut resp: reqwest::Response,
        r: &mut Response,
    ) -> Result<bool, StreamError> {
        let liveness = &self.spec.liveness;
        let quiet_limit = liveness.quiet_limit(self.spec.endpoint.api);
        loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(quiet_limit, resp.chunk()) => c,
                () = tandem_conn::connection::stopped(&mut self.shutdown) => return Ok(false),
            };
            let chunk = match chunk {
                Err(_) => {
                    let why = format!(
                        "no byte for {:.1} s (heartbeat gap)",
                        quiet_limit.as_secs_f64()
                    );
                    return Err(StreamError::new(ErrorKind::Timeout, why));
                }
                Ok(Err(e)) => return Err(StreamError::from_reqwest(&e)),
                Ok(Ok(None)) if r.completed => return Ok(true),
                Ok(Ok(None)) => return self.closed(r),
                Ok(Ok(Some(c))) => c,
            };
            let mut decoded = r.reader.feed(&chunk, &mut r.frames);
            // Decoded a bounded amount at a time, each part handed on before the next.
            loop {
                if let Err(e) = decoded {
                    let why = format!("undecodable stream: {e}");
                    return Err(StreamError::new(ErrorKind::StreamInterrupted, why));
                }
                let lines = self.sort_out(r);
                if !lines.is_empty() && !self.forward(r, lines).await {
                    return Ok(false);
                }
                if !r.reader.has_pending() {
                    break;
                }
                decoded = r.reader.resume(&mut r.frames);
            }
            if r.completed {
                // Nothing follows the completion message; do not wait for the close.
                return Ok(true);
            }
        }
    }

    /// The lines for the merger. The completion message is noted, not forwarded; copies of
    /// ids already stored (edge ids, or what a shared store holds) are counted as
    /// duplicates here, raw and duplicate at once, so the accounting holds without the
    /// merger seeing them.
    fn sort_out(&mut self, r: &mut Response) -> Vec<Bytes> {
        let mut lines = Vec::with_capacity(r.frames.len());
        let mut stored_before = 0u64;
        for f in r.frames.drain(..) {
            let Frame::Line(line) = f else { continue };
            if is_completion(&line) {
                r.completed = true;
                continue;
            }
            if line.starts_with(b"{\"error")
                && let Ok(LineKind::System(m)) = tandem_core::identify(&line)
            {
                r.error = Some(m.message);
            }
            if let Ok(LineKind::Activity(id)) = tandem_core::identify(&line) {
                self.activities += 1;
                if let Some(t) = id.created_unix_ms() {
                    r.latest = Some(r.latest.map_or(t, |l| l.max(t)));
                }
                if self.edge.contains(&id) {
                    stored_before += 1;
                    continue;
                }
            }
            lines.push(line);
        }
        if stored_before > 0 {
            Tally::add(&self.spec.tally.duplicates, stored_before);
            Tally::add(&self.spec.tally.raw, stored_before);
            self.raw.increment(stored_before);
            self.duplicates.increment(stored_before);
        }
        lines
    }

    /// The server closed the stream cleanly. Gnip completes with its message, so a close
    /// without it is an interruption. X API v2 closes when the range is done: see
    /// [`complete_by_close`].
    fn closed(&mut self, r: &Response) -> Result<bool, StreamError> {
        let interrupted = |why: String| Err(StreamError::new(ErrorKind::StreamInterrupted, why));
        if self.spec.endpoint.api.signals_recovery_completion() {
            return interrupted(
                "the server closed the recovery stream before its completion message".into(),
            );
        }
        if let Some(error) = &r.error {
            return interrupted(format!("the server closed the recovery stream: {error}"));
        }
        let progressed = r.latest.is_some_and(|l| self.latest.is_none_or(|b| l > b));
        self.closes_without_progress = if progressed {
            0
        } else {
            self.closes_without_progress + 1
        };
        let latest = self.latest.max(r.latest);
        if complete_by_close(latest, self.end_ms, self.closes_without_progress) {
            Ok(true)
        } else {
            interrupted(format!(
                "the server closed the recovery stream at {}, short of the chunk's end",
                tandem_core::time::rfc3339_ms(r.latest.unwrap_or(self.from))
            ))
        }
    }

    /// Hands lines to the merger on the recovery lane; false when the process stops.
    async fn forward(&mut self, r: &mut Response, lines: Vec<Bytes>) -> bool {
        let spec = self.spec;
        let n = lines.len() as u64;
        self.raw.increment(n);
        Tally::add(&spec.tally.raw, n);
        let batch = Batch {
            origin: spec.origin,
            connection: r.connection,
            received: Instant::now(),
            first_seq: r.seq,
            lines,
        };
        r.seq += n;
        let lane = spec.send_lock.lock().await;
        tokio::select! {
            sent = spec.out.send(batch) => if sent.is_err() {
                return false;
            },
            () = tandem_conn::connection::stopped(&mut self.shutdown) => return false,
        }
        spec.tally.lanes.hand(usize::from(spec.origin.path.0), n);
        drop(lane);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An X API v2 chunk is complete by close when its latest activity reached the end, or
    /// after two clean closes in a row without anything newer; never on one empty close.
    #[test]
    fn v2_completion_by_close() {
        let end = 1_000_000;
        assert!(complete_by_close(Some(end - 1), end, 0));
        assert!(complete_by_close(
            Some(end - CLOSE_END_TOLERANCE_MS),
            end,
            0
        ));
        assert!(
            !complete_by_close(Some(end - 60_000), end, 0),
            "a minute short"
        );
        assert!(
            !complete_by_close(None, end, 1),
            "one empty close proves nothing"
        );
        assert!(!complete_by_close(Some(end - 60_000), end, 1));
        assert!(complete_by_close(None, end, 2), "an empty range");
        assert!(complete_by_close(Some(end - 60_000), end, 2));
    }

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

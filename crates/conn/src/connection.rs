//! One supervised connection: a (stream, partition, path) kept connected for the life of
//! the process. The loop (`runner`) is mechanism only: whether and when to retry is the
//! [`ReconnectPolicy`](crate::policy::ReconnectPolicy)'s call, when a request may be sent
//! is the [`ConnectBudget`]'s.

use std::sync::Arc;
use std::time::Duration;

use tandem_core::time::{rfc3339_ms, rfc3339_secs, unix_ms_now};
use tandem_core::{Batch, Origin, Partition, SecretSource, Tally};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::budget::ConnectBudget;
use crate::config::{BackfillConfig, LivenessConfig, ReadConfig, RetryConfig};
use crate::error::{ErrorKind, StreamError};
use crate::events::{ConnEvent, ConnKey, ConnSnapshot};
use crate::liveness::PartitionLiveness;
use crate::runner::Runner;

/// Credentials for the upstream. Never logged. The secret is read from its source before
/// every request, so a rotated password or token takes effect without a restart.
#[derive(Debug, Clone)]
pub enum Auth {
    Basic {
        username: String,
        password: SecretSource,
    },
    Bearer(SecretSource),
}

/// Which API's parameter names a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// Gnip 2.0: `partition`, `backfillMinutes`, `startTime`/`endTime` (with milliseconds).
    Gnip,
    /// X API v2: `partition`, `backfill_minutes`, `start_time`/`end_time` (seconds).
    V2,
}

impl ApiKind {
    /// The heartbeat interval the API documents: Gnip 10 s, X API v2 about 20 s.
    pub fn heartbeat_interval_ms(self) -> u64 {
        match self {
            ApiKind::Gnip => 10_000,
            ApiKind::V2 => 20_000,
        }
    }

    /// How far back recovery reaches: a rolling 5 days on Gnip volume streams, 24 hours
    /// on X API v2.
    pub fn recovery_retention_secs(self) -> u64 {
        match self {
            ApiKind::Gnip => 5 * 24 * 3600,
            ApiKind::V2 => 24 * 3600,
        }
    }

    /// Whether a recovery request ends with an explicit completion message (Gnip's
    /// "Recovery Request Completed"); X API v2 re-streams the range and disconnects.
    pub fn signals_recovery_completion(self) -> bool {
        self == ApiKind::Gnip
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    Live { backfill_minutes: u64 },
    Recovery { start_ms: u64, end_ms: u64 },
}

/// A stream endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The live stream URL, possibly with query parameters of its own (v2 `tweet.fields`
    /// and the like), which every request keeps.
    pub url: String,
    /// Where recovery requests go: Gnip serves recovery on another host and path than the
    /// live stream; X API v2 on the live URL.
    pub recovery_url: String,
    pub api: ApiKind,
    /// Whether the `partition` parameter is sent (Gnip always; v2 volume streams).
    pub partitioned: bool,
    pub auth: Auth,
}

impl Endpoint {
    /// The account whose recovery jobs this stream counts against: the Gnip account in
    /// the URL (`…/accounts/<account>/…`), or (X API v2) the URL itself.
    pub fn account(&self) -> String {
        let mut parts = self.url.split('/');
        while let Some(p) = parts.next() {
            if p == "accounts"
                && let Some(account) = parts.next()
            {
                return account.to_owned();
            }
        }
        self.url.split('?').next().unwrap_or(&self.url).to_owned()
    }

    /// The request URL for a partition and a query.
    pub fn request_url(&self, partition: Partition, query: Query) -> String {
        let mut params = Vec::new();
        if self.partitioned {
            params.push(format!("partition={partition}"));
        }
        match (query, self.api) {
            (
                Query::Live {
                    backfill_minutes: 0,
                },
                _,
            ) => {}
            (Query::Live { backfill_minutes }, ApiKind::Gnip) => {
                params.push(format!("backfillMinutes={backfill_minutes}"))
            }
            (Query::Live { backfill_minutes }, ApiKind::V2) => {
                params.push(format!("backfill_minutes={backfill_minutes}"))
            }
            (Query::Recovery { start_ms, end_ms }, ApiKind::Gnip) => {
                params.push(format!("startTime={}", rfc3339_ms(start_ms)));
                params.push(format!("endTime={}", rfc3339_ms(end_ms)));
            }
            (Query::Recovery { start_ms, end_ms }, ApiKind::V2) => {
                params.push(format!("start_time={}", rfc3339_secs(start_ms)));
                params.push(format!(
                    "end_time={}",
                    rfc3339_secs(end_ms.div_ceil(1000) * 1000)
                ));
            }
        }
        let base = match query {
            Query::Live { .. } => &self.url,
            Query::Recovery { .. } => &self.recovery_url,
        };
        with_params(base, &params)
    }

    /// Sends the request; a non-200 answer becomes a classified error.
    pub async fn open(
        &self,
        client: &reqwest::Client,
        partition: Partition,
        query: Query,
    ) -> Result<reqwest::Response, StreamError> {
        let mut req = client
            .get(self.request_url(partition, query))
            .header(reqwest::header::ACCEPT, "application/json")
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .header(reqwest::header::CONNECTION, "keep-alive");
        // Read now: a rotated secret is picked up by the next attempt. An unreadable one
        // never reaches the upstream (a local failure, retried without spending budget).
        let unreadable =
            |e: String| StreamError::new(ErrorKind::Local, format!("credentials unreadable: {e}"));
        req = match &self.auth {
            Auth::Basic { username, password } => {
                let password = password.read().map_err(unreadable)?;
                req.basic_auth(username, Some(password.expose()))
            }
            Auth::Bearer(token) => req.bearer_auth(token.read().map_err(unreadable)?.expose()),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| StreamError::from_reqwest(&e))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(resp);
        }
        let retry_after = retry_after(resp.headers());
        let body = error_body(resp).await;
        Err(StreamError::from_status(status, &body, retry_after))
    }
}

/// `base` with `params` appended: after a `&` when `base` carries a query of its own.
fn with_params(base: &str, params: &[String]) -> String {
    if params.is_empty() {
        return base.to_owned();
    }
    let sep = match base.find('?') {
        None => "?",
        Some(i) if i + 1 == base.len() || base.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{base}{sep}{}", params.join("&"))
}

/// The most of an error answer's body that is read (it only names the problem).
pub const MAX_ERROR_BODY: usize = 16 * 1024;

/// The longest wait an upstream's `Retry-After` may ask for; a longer one (or a date far
/// ahead) is cut to this, so a bad header cannot park a connection for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// Reads at most [`MAX_ERROR_BODY`] bytes of an error answer, for at most 2 s.
async fn error_body(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let read = async {
        while body.len() < MAX_ERROR_BODY {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    body.extend_from_slice(&c[..c.len().min(MAX_ERROR_BODY - body.len())])
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// The content time of a batch: the creation time of its latest line that has one.
/// System, error and unparseable lines never count, so a batch of them advances nothing.
pub(crate) fn content_time(lines: &[bytes::Bytes]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| tandem_core::content_time_ms(l))
}

/// The upstream's clock minus the host's (ms), from a response's `Date` header. The header
/// has whole seconds, so offsets within a second and a half count as none.
pub fn clock_offset_ms(headers: &reqwest::header::HeaderMap, host_ms: u64) -> Option<i64> {
    let date = headers.get(reqwest::header::DATE)?.to_str().ok()?;
    let at = httpdate::parse_http_date(date).ok()?;
    let upstream_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64 + 500;
    let offset = upstream_ms - host_ms as i64;
    Some(if offset.abs() <= 1_500 { 0 } else { offset })
}

/// Resolves once `true` is (or has been) sent on the shutdown channel.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How long the upstream asks us to wait: `Retry-After` (seconds or HTTP date) or
/// `x-rate-limit-reset` (epoch seconds), at most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    asked_wait(headers).map(|d| d.min(MAX_RETRY_AFTER))
}

fn asked_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return at.duration_since(std::time::SystemTime::now()).ok();
        }
    }
    let reset = text("x-rate-limit-reset")?.parse::<u64>().ok()?;
    let now = unix_ms_now();
    Some(Duration::from_millis((reset * 1000).saturating_sub(now)))
}

/// Everything one connection needs.
#[derive(Debug, Clone)]
pub struct ConnectionSpec {
    pub key: ConnKey,
    pub origin: Origin,
    pub endpoint: Endpoint,
    pub client: reqwest::Client,
    pub retry: RetryConfig,
    pub liveness: LivenessConfig,
    pub backfill: BackfillConfig,
    pub read: ReadConfig,
    pub budget: Arc<ConnectBudget>,
    pub partition: Arc<PartitionLiveness>,
    /// The partition's shared counts (this connection adds to `raw`).
    pub tally: Arc<Tally>,
}

/// A running connection.
#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    pub state: watch::Receiver<ConnSnapshot>,
    task: JoinHandle<()>,
}

impl Connection {
    /// Starts the connection. Batches go to `out` (backpressure: reading waits while it is
    /// full); events go to `events`; a `true` on `shutdown` ends it.
    pub fn spawn(
        spec: ConnectionSpec,
        out: mpsc::Sender<Batch>,
        events: mpsc::UnboundedSender<ConnEvent>,
        shutdown: watch::Receiver<bool>,
    ) -> Connection {
        use tracing::Instrument;
        let (state_tx, state) = watch::channel(ConnSnapshot::default());
        let key = spec.key.clone();
        // Every log line of the connection carries its names through this span.
        let span = tracing::info_span!("conn", stream = %key.stream, partition = key.partition, path = %key.path);
        let runner = Runner::new(spec, out, events, shutdown, state_tx);
        Connection {
            key,
            state,
            task: tokio::spawn(runner.run().instrument(span)),
        }
    }

    /// Waits until the connection has stopped (after shutdown or a fatal error).
    pub async fn join(self) {
        let _ = self.task.await;
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(api: ApiKind, partitioned: bool) -> Endpoint {
        let url =
            "https://gnip-stream.x.com/stream/sample10/accounts/a/publishers/twitter/prod.json";
        Endpoint {
            url: url.into(),
            recovery_url: url.into(),
            api,
            partitioned,
            auth: Auth::Bearer(SecretSource::Value(tandem_core::Secret::new("t"))),
        }
    }

    /// Each API gets its own parameter spelling and time format.
    #[test]
    fn request_urls() {
        let g = endpoint(ApiKind::Gnip, true);
        assert!(
            g.request_url(
                2,
                Query::Live {
                    backfill_minutes: 0
                }
            )
            .ends_with("prod.json?partition=2")
        );
        assert!(
            g.request_url(
                1,
                Query::Live {
                    backfill_minutes: 3
                }
            )
            .ends_with("?partition=1&backfillMinutes=3")
        );
        assert!(
            g.request_url(
                1,
                Query::Recovery {
                    start_ms: 1_688_576_952_070,
                    end_ms: 1_688_580_552_070
                }
            )
            .ends_with(
                "?partition=1&startTime=2023-07-05T17:09:12.070Z&endTime=2023-07-05T18:09:12.070Z"
            )
        );
        let v = endpoint(ApiKind::V2, false);
        assert!(
            v.request_url(
                1,
                Query::Live {
                    backfill_minutes: 2
                }
            )
            .ends_with("prod.json?backfill_minutes=2")
        );
        assert!(
            v.request_url(
                1,
                Query::Recovery {
                    start_ms: 1_688_576_952_070,
                    end_ms: 1_688_580_552_070
                }
            )
            .ends_with("?start_time=2023-07-05T17:09:12Z&end_time=2023-07-05T18:09:13Z")
        );
    }

    /// Recovery goes to its own endpoint; a URL's own query is kept and extended with `&`.
    #[test]
    fn recovery_url_and_own_query() {
        let mut g = endpoint(ApiKind::Gnip, true);
        g.recovery_url =
            "https://stream-data-api.x.com/stream/sample10/accounts/a/publishers/twitter/prod.json"
                .into();
        let recovery = Query::Recovery {
            start_ms: 1_688_576_952_070,
            end_ms: 1_688_580_552_070,
        };
        assert!(
            g.request_url(1, recovery)
                .starts_with("https://stream-data-api.x.com/stream/sample10/")
        );
        let live = Query::Live {
            backfill_minutes: 2,
        };
        assert!(
            g.request_url(1, live)
                .starts_with("https://gnip-stream.x.com/")
        );
        let mut v = endpoint(ApiKind::V2, true);
        v.url = "https://api.x.com/2/tweets/sample10/stream?tweet.fields=created_at&expansions=author_id".into();
        v.recovery_url = v.url.clone();
        assert_eq!(
            v.request_url(2, live),
            "https://api.x.com/2/tweets/sample10/stream?tweet.fields=created_at&expansions=author_id&partition=2&backfill_minutes=2"
        );
        assert!(v.request_url(2, recovery).ends_with(
            "author_id&partition=2&start_time=2023-07-05T17:09:12Z&end_time=2023-07-05T18:09:13Z"
        ));
        let bare = Query::Live {
            backfill_minutes: 0,
        };
        v.url = "https://api.x.com/2/tweets/search/stream?".into();
        v.partitioned = false;
        assert_eq!(v.request_url(1, bare), v.url);
        assert_eq!(
            v.request_url(1, live),
            "https://api.x.com/2/tweets/search/stream?backfill_minutes=2"
        );
    }

    /// Retry-After in seconds and x-rate-limit-reset in epoch seconds both count.
    #[test]
    fn retry_after_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let mut h = reqwest::header::HeaderMap::new();
        let reset = unix_ms_now() / 1000 + 90;
        h.insert("x-rate-limit-reset", reset.to_string().parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(85) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        // A wait of days (a bad header or a hostile peer) is cut to the cap.
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "864000".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }
}

//! Why a connection ended, classified so that the caller knows what to do.

use std::fmt;
use std::time::Duration;

/// The class of a connection error (the X SDK's `StreamErrorType`, in Rust).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// TCP or TLS failure, reset, refused.
    Connection,
    /// The request never left this host: the path's source address or interface is not
    /// available here. It does not count against the upstream's connect budget.
    Local,
    /// No byte or no activity for too long (heartbeat gap, data silence, read timeout).
    Timeout,
    /// 5xx from the upstream.
    ServerError,
    /// 429 from the upstream.
    RateLimited,
    /// An established stream ended: clean close, broken body, corrupt gzip.
    StreamInterrupted,
    /// The upstream closed the stream for its own operational reasons (X API v2
    /// `OperationalDisconnect`): reconnect at once.
    Operational,
    /// The upstream closed the stream because a newer connection exceeded the partition's
    /// connection limit: another consumer (or path) holds the slot. Retried on the slow
    /// schedule, so that two misconfigured consumers do not evict each other in a loop.
    Evicted,
    /// 401 or 403: the credentials were refused. Retried on the slow schedule, the
    /// secret read again before each attempt.
    Authentication,
    /// Other 4xx (including 406, a configuration bug). Retried on the slow schedule.
    ClientError,
    /// Anything that retrying cannot fix (an invalid URL, retries exhausted).
    Fatal,
}

impl ErrorKind {
    /// Every kind, for metric series created at zero.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Connection,
        ErrorKind::Local,
        ErrorKind::Timeout,
        ErrorKind::ServerError,
        ErrorKind::RateLimited,
        ErrorKind::StreamInterrupted,
        ErrorKind::Operational,
        ErrorKind::Evicted,
        ErrorKind::Authentication,
        ErrorKind::ClientError,
        ErrorKind::Fatal,
    ];

    /// Whether reconnecting can help. Every answer other than 200 is retried (the
    /// upstream's guidance), refusals on a slow schedule; only errors of this host's own
    /// making that no retry can change are not.
    pub fn is_retryable(self) -> bool {
        self != ErrorKind::Fatal
    }

    /// The upstream refused this client (credentials, a client error, or its connection
    /// limit): retrying soon would only hammer it, and an operator should look.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            ErrorKind::Authentication | ErrorKind::ClientError | ErrorKind::Evicted
        )
    }

    /// The fixed label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Local => "local",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ServerError => "server_error",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::StreamInterrupted => "stream_interrupted",
            ErrorKind::Operational => "operational",
            ErrorKind::Evicted => "evicted",
            ErrorKind::Authentication => "authentication",
            ErrorKind::ClientError => "client_error",
            ErrorKind::Fatal => "fatal",
        }
    }
}

/// A connection error with its class and what the upstream said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub kind: ErrorKind,
    pub message: String,
    /// The HTTP status, when the upstream answered with one.
    pub status: Option<u16>,
    /// How long the upstream asked us to wait (`Retry-After`, `x-rate-limit-reset`).
    pub retry_after: Option<Duration>,
}

impl StreamError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> StreamError {
        StreamError {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// Classifies a non-200 answer.
    pub fn from_status(status: u16, body: &str, retry_after: Option<Duration>) -> StreamError {
        let kind = match status {
            401 | 403 => ErrorKind::Authentication,
            429 => ErrorKind::RateLimited,
            500..=599 => ErrorKind::ServerError,
            400..=499 => ErrorKind::ClientError,
            _ => ErrorKind::ServerError,
        };
        let mut detail: String = body.trim().chars().take(300).collect();
        if detail.is_empty() {
            detail = "no body".to_owned();
        }
        StreamError {
            kind,
            message: format!("status {status}: {detail}"),
            status: Some(status),
            retry_after,
        }
    }

    /// Classifies an HTTP client error.
    pub fn from_reqwest(e: &reqwest::Error) -> StreamError {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_builder() {
            ErrorKind::Fatal
        } else if e.is_body() || e.is_decode() {
            ErrorKind::StreamInterrupted
        } else if local_failure(e) {
            ErrorKind::Local
        } else {
            ErrorKind::Connection
        };
        // The chain carries the useful part (refused, reset, certificate...).
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        StreamError::new(kind, message)
    }
}

/// Whether a request failed before leaving the host: binding the source address or the
/// interface was refused.
fn local_failure(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            // EADDRNOTAVAIL: the address is not on the host; ENODEV: no such interface.
            if io.kind() == std::io::ErrorKind::AddrNotAvailable || io.raw_os_error() == Some(19) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind.label(), self.message)
    }
}

impl std::error::Error for StreamError {}

impl tandem_core::Retryable for StreamError {
    fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each status class gets the action UPSTREAM.md gives it.
    #[test]
    fn status_classes() {
        let k = |s| StreamError::from_status(s, "", None).kind;
        assert_eq!(k(401), ErrorKind::Authentication);
        assert_eq!(k(403), ErrorKind::Authentication);
        assert_eq!(k(406), ErrorKind::ClientError);
        assert_eq!(k(404), ErrorKind::ClientError);
        assert_eq!(k(429), ErrorKind::RateLimited);
        assert_eq!(k(503), ErrorKind::ServerError);
        assert_eq!(k(500), ErrorKind::ServerError);
        assert!(k(401).is_refusal() && k(406).is_refusal() && k(404).is_refusal());
        assert!(!k(429).is_refusal() && !k(503).is_refusal());
        for s in [400, 401, 403, 404, 406, 429, 500, 503] {
            assert!(k(s).is_retryable(), "every non-200 reconnects: {s}");
        }
        let e = StreamError::from_status(406, "{\"error\":\"requires compression\"}", None);
        assert!(e.to_string().contains("406") && e.to_string().contains("compression"));
    }
}

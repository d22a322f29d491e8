//! Faults a test or an operator can inject, and the per-connection controls they act on.
//!
//! Faults are plain data (serde), so the Rust handle and the admin HTTP API accept the
//! same thing: `{"fault":"stall","target":{"partition":1,"client_ip":"127.0.0.2"}}`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Which live connections a fault applies to; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Stream name.
    #[serde(default)]
    pub stream: Option<String>,
    /// Partition number.
    #[serde(default)]
    pub partition: Option<u32>,
    /// The client's source address (how a test picks one network path).
    #[serde(default)]
    pub client_ip: Option<IpAddr>,
    /// A connection id as listed by the handle or `/admin/connections`.
    #[serde(default)]
    pub connection: Option<u64>,
}

/// A fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Close matching connections abruptly (no final chunk: the client sees a broken body).
    Drop { target: Target },
    /// Send nothing at all, not even heartbeats, until resumed or dropped.
    Stall { target: Target },
    /// Send heartbeats but no activities (activities are skipped, never sent).
    HeartbeatsOnly { target: Target },
    /// Deliver activities only once they are `ms` old (this path lags its sibling).
    Delay { target: Target, ms: u64 },
    /// Limit the connection to `bytes_per_sec` of encoded output.
    Throttle { target: Target, bytes_per_sec: u64 },
    /// Undo stall, heartbeats-only, delay and throttle.
    Resume { target: Target },
    /// Corrupt the output of matching connections once.
    Inject {
        target: Target,
        injection: Injection,
    },
    /// End matching connections cleanly with the API's operational-disconnect message (v2:
    /// an `{"errors":[…]}` object of type `operational-disconnect`; Gnip: an
    /// `{"error":{…}}` line), as the services do before maintenance.
    OperationalDisconnect { target: Target },
    /// Answer connection requests with `status` instead of serving them: the next `count`
    /// requests, or all requests for `for_ms`, or both (whichever ends first).
    Reject {
        stream: String,
        #[serde(default)]
        partition: Option<u32>,
        status: u16,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        for_ms: Option<u64>,
    },
}

impl Fault {
    /// A fixed label for counting faults by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Drop { .. } => "drop",
            Fault::Stall { .. } => "stall",
            Fault::HeartbeatsOnly { .. } => "heartbeats_only",
            Fault::Delay { .. } => "delay",
            Fault::Throttle { .. } => "throttle",
            Fault::Resume { .. } => "resume",
            Fault::Inject { injection, .. } => injection.kind(),
            Fault::OperationalDisconnect { .. } => "operational_disconnect",
            Fault::Reject { .. } => "reject",
        }
    }
}

/// Ways to corrupt a connection's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Injection {
    /// An extra line that starts like a post and is cut off inside a string.
    MalformedLine,
    /// An extra line of the given size (a well-formed post with a huge text).
    OversizeLine { bytes: usize },
    /// An extra post whose text holds bytes that are not UTF-8.
    InvalidUtf8Line,
    /// Half of a line, then the connection is dropped.
    TruncateAndClose,
    /// Bytes that are not deflate data, then the connection is dropped.
    BrokenGzip,
    /// The next activity sent on this connection only is cut in half (its sibling
    /// connections receive it intact).
    CorruptNextActivity,
}

impl Injection {
    pub fn kind(&self) -> &'static str {
        match self {
            Injection::MalformedLine => "malformed_line",
            Injection::OversizeLine { .. } => "oversize_line",
            Injection::InvalidUtf8Line => "invalid_utf8_line",
            Injection::TruncateAndClose => "truncate_and_close",
            Injection::BrokenGzip => "broken_gzip",
            Injection::CorruptNextActivity => "corrupt_next_activity",
        }
    }
}

/// Why the simulator ends a connection cleanly; the writer words it in its API's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// A newer connection exceeded the partition's connection limit.
    ConnectionLimit,
    /// The client read so slowly that the retained buffer moved past its cursor.
    FellBehind,
    /// The operational-disconnect fault.
    Operational,
}

/// One-shot orders for a connection's writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Drop,
    /// Send the disconnect message, then end the response cleanly.
    Close(Disconnect),
    Inject(Injection),
}

/// What a writer consults before every write.
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub stalled: AtomicBool,
    pub heartbeats_only: AtomicBool,
    pub delay_ms: AtomicU64,
    pub throttle_bytes_per_sec: AtomicU64,
    commands: Mutex<VecDeque<Command>>,
    pub wake: Notify,
}

impl Control {
    pub(crate) fn order(&self, command: Command) {
        self.commands
            .lock()
            .expect("control lock")
            .push_back(command);
        self.wake.notify_one();
    }

    pub(crate) fn take_orders(&self) -> Vec<Command> {
        self.commands
            .lock()
            .expect("control lock")
            .drain(..)
            .collect()
    }

    /// Applies a connection-level fault; returns false for faults that are not.
    pub(crate) fn apply(&self, fault: &Fault) -> bool {
        match fault {
            Fault::Drop { .. } => self.order(Command::Drop),
            Fault::Stall { .. } => self.stalled.store(true, Ordering::SeqCst),
            Fault::HeartbeatsOnly { .. } => self.heartbeats_only.store(true, Ordering::SeqCst),
            Fault::Delay { ms, .. } => self.delay_ms.store(*ms, Ordering::SeqCst),
            Fault::Throttle { bytes_per_sec, .. } => self
                .throttle_bytes_per_sec
                .store(*bytes_per_sec, Ordering::SeqCst),
            Fault::Resume { .. } => {
                self.stalled.store(false, Ordering::SeqCst);
                self.heartbeats_only.store(false, Ordering::SeqCst);
                self.delay_ms.store(0, Ordering::SeqCst);
                self.throttle_bytes_per_sec.store(0, Ordering::SeqCst);
            }
            Fault::Inject { injection, .. } => self.order(Command::Inject(*injection)),
            Fault::OperationalDisconnect { .. } => {
                self.order(Command::Close(Disconnect::Operational));
            }
            Fault::Reject { .. } => return false,
        }
        self.wake.notify_one();
        true
    }
}

/// A rule that answers connection requests with a fixed status.
#[derive(Debug, Clone)]
pub(crate) struct RejectRule {
    pub partition: Option<u32>,
    pub status: u16,
    pub remaining: Option<u32>,
    pub until_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The admin API's JSON form is the documented one.
    #[test]
    fn faults_parse_from_json() {
        let f: Fault = serde_json::from_str(
            r#"{"fault":"stall","target":{"partition":1,"client_ip":"127.0.0.2"}}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            Fault::Stall {
                target: Target {
                    partition: Some(1),
                    client_ip: Some("127.0.0.2".parse().unwrap()),
                    ..Target::default()
                }
            }
        );
        let f: Fault = serde_json::from_str(
            r#"{"fault":"inject","target":{},"injection":{"kind":"oversize_line","bytes":2000000}}"#,
        )
        .unwrap();
        assert_eq!(f.kind(), "oversize_line");
        let f: Fault =
            serde_json::from_str(r#"{"fault":"operational_disconnect","target":{"stream":"f"}}"#)
                .unwrap();
        assert_eq!(f.kind(), "operational_disconnect");
        let err = serde_json::from_str::<Fault>(r#"{"fault":"stall","target":{"nope":1}}"#);
        assert!(err.is_err());
    }
}

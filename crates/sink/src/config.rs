//! The `[sinks.<name>]` section: which kind of store, and its settings. A sink kind is
//! one arm here and one module with its store and its `start`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::file::FileConfig;
use crate::kafka::KafkaConfig;
use crate::nats::NatsConfig;

/// A sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// Local NDJSON files (the default).
    File(FileConfig),
    /// NATS JetStream, the shared store of consumers in several zones.
    Nats(NatsConfig),
    /// A Kafka-protocol service (Apache Kafka, OCI Streaming), one record per activity
    /// keyed by its id.
    Kafka(KafkaConfig),
    /// Lines on standard output, for piping.
    Stdout,
    /// Discard everything (benchmarks).
    Null,
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Nats(_) => "nats",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Stdout => "stdout",
            SinkConfig::Null => "null",
        }
    }

    /// What cannot work, by field (relative to the sink's section).
    pub fn problems(&self, dedup_window_secs: u64) -> Vec<(&'static str, String)> {
        match self {
            SinkConfig::File(f) => f.problems(),
            SinkConfig::Nats(n) => n.problems(dedup_window_secs),
            SinkConfig::Kafka(k) => k.problems(),
            SinkConfig::Stdout | SinkConfig::Null => Vec::new(),
        }
    }

    /// Where the sink's credential comes from: the environment variable (`token_env`) and
    /// the file (`token_file`) it names; both `None` when it takes none.
    pub fn token_sources(&self) -> (Option<&str>, Option<&Path>) {
        match self {
            SinkConfig::Nats(n) => (n.token_env.as_deref(), n.token_file.as_deref()),
            SinkConfig::Kafka(k) => (k.password_env.as_deref(), k.password_file.as_deref()),
            _ => (None, None),
        }
    }

    /// The longest line the sink stores; a longer one is dead-lettered by the merger.
    pub fn max_line_bytes(&self) -> Option<usize> {
        match self {
            SinkConfig::Kafka(k) => Some(k.max_line_bytes()),
            _ => None,
        }
    }

    /// The names of the credential's two sources and what it is: (environment variable
    /// field, file field, noun), for messages that name the field.
    pub fn credential_fields(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            SinkConfig::Kafka(_) => ("password_env", "password_file", "password"),
            _ => ("token_env", "token_file", "token"),
        }
    }

    /// One line for `tandem check`'s plan.
    pub fn describe(&self) -> String {
        match self {
            SinkConfig::File(f) => format!(
                "file under {}, {} s buckets{}",
                f.dir.display(),
                f.bucket_secs,
                if f.gzip { ", gzip" } else { "" }
            ),
            // Not the URL: it may carry credentials.
            SinkConfig::Nats(n) => format!(
                "nats, JetStream stream {}{}",
                n.stream,
                match &n.tls_ca_file {
                    Some(ca) => format!(", TLS trusting {}", ca.display()),
                    None if n.tls_required() => ", TLS".to_owned(),
                    None => String::new(),
                }
            ),
            // Not the user or the password.
            SinkConfig::Kafka(k) => format!(
                "kafka, topic {} at {} ({}{}), acks from all replicas{}",
                k.topic,
                k.bootstrap_servers,
                k.security_protocol.as_str(),
                if k.security_protocol.sasl() {
                    format!(" {}", k.sasl_mechanism.as_str())
                } else {
                    String::new()
                },
                if k.idempotence { ", idempotent" } else { "" }
            ),
            other => other.kind().to_owned(),
        }
    }
}

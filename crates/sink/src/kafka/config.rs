//! The `kind = "kafka"` sink section. Field docs are the configuration reference.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of a Kafka-protocol sink (Apache Kafka, OCI Streaming, Redpanda, MSK, Event
/// Hubs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Brokers to bootstrap from, comma-separated `host:port` (OCI Streaming: the stream
    /// pool's Kafka endpoint, `cell-1.streaming.<region>.oci.oraclecloud.com:9092`).
    pub bootstrap_servers: String,
    /// The topic (OCI Streaming: the stream's name). Its partition is chosen by the broker's
    /// client from the message key, the activity id.
    pub topic: String,
    /// Create the topic when it does not exist, with `topic_partitions` partitions and
    /// `replication_factor` replicas (OCI streams are created in the console or by
    /// Terraform: leave this false there).
    #[serde(default)]
    pub create_topic: bool,
    /// Partitions of a topic tandem creates.
    #[serde(default = "default_topic_partitions")]
    pub topic_partitions: i32,
    /// Replicas of a topic tandem creates.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl` (OCI Streaming: `sasl_ssl`).
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// `plain`, `scram_sha_256` or `scram_sha_512`, with a `sasl_*` protocol (OCI
    /// Streaming: `plain`).
    #[serde(default)]
    pub sasl_mechanism: SaslMechanism,
    /// SASL user name (OCI Streaming: `<tenancy name>/<user name>/<stream pool OCID>`).
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// Environment variable holding the SASL password (OCI Streaming: an auth token); not
    /// with `password_file`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the SASL password, trailing newline ignored (a mounted Kubernetes
    /// Secret, a systemd credential); not with `password_env`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the brokers' certificates, trusted instead
    /// of the system roots (with `ssl` or `sasl_ssl`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `none`, `gzip`, `snappy` or `lz4`.
    #[serde(default)]
    pub compression: Compression,
    /// Bytes the producer collects per partition before it sends a batch.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u64,
    /// How long the producer waits for a batch to fill, in milliseconds.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// The idempotent producer: no duplicate and no reordering from the producer's own
    /// retries. Every replica acknowledges every record either way (`acks=all`). Turn off
    /// only for a service without it (it needs the `IDEMPOTENT_WRITE` permission).
    #[serde(default = "yes")]
    pub idempotence: bool,
    /// The largest record (value, key and headers) the service takes, in bytes: OCI
    /// Streaming's limit is 1 MiB. A line that would exceed it is dead-lettered with its
    /// reason, never truncated.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long the producer keeps trying to deliver a record, in milliseconds, before it
    /// reports it failed. A failed record is looked for in the topic before it is sent again.
    /// In a pair it is capped by the writer lease (see `deploy/README.md`).
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Records sent and not yet reported delivered, at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Value bytes of records sent and not yet reported delivered at most (besides
    /// `max_in_flight`), and never more than a quarter of `delivery.max_memory_bytes`:
    /// they are part of what the sink holds in memory, and the rest of that budget stays
    /// for the activities queued behind them.
    #[serde(default = "default_in_flight_bytes")]
    pub max_in_flight_bytes: u64,
}

/// How the client talks to the brokers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// The SASL mechanism.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaslMechanism {
    #[default]
    Plain,
    #[serde(rename = "scram_sha_256", alias = "scram_sha256")]
    ScramSha256,
    #[serde(rename = "scram_sha_512", alias = "scram_sha512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Record batch compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
}

impl Compression {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

fn default_topic_partitions() -> i32 {
    3
}
fn default_replication_factor() -> i32 {
    1
}
fn default_batch_bytes() -> u64 {
    1_000_000
}
fn default_linger_ms() -> u64 {
    5
}
fn yes() -> bool {
    true
}
fn default_max_message_bytes() -> usize {
    1_048_576
}
fn default_delivery_timeout_ms() -> u64 {
    120_000
}
fn default_in_flight() -> usize {
    50_000
}
fn default_in_flight_bytes() -> u64 {
    8 * 1024 * 1024
}

/// Bytes a record takes beyond its value: the key (an activity id) and the four headers,
/// with the record's own framing, rounded up. A line longer than `max_message_bytes` minus
/// this is dead-lettered.
pub const RECORD_OVERHEAD_BYTES: usize = 512;

impl KafkaConfig {
    /// A configuration with defaults for `bootstrap_servers` and `topic`.
    pub fn new(bootstrap_servers: &str, topic: &str) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.to_owned(),
            topic: topic.to_owned(),
            create_topic: false,
            topic_partitions: default_topic_partitions(),
            replication_factor: default_replication_factor(),
            security_protocol: SecurityProtocol::default(),
            sasl_mechanism: SaslMechanism::default(),
            sasl_username: None,
            password_env: None,
            password_file: None,
            tls_ca_file: None,
            compression: Compression::default(),
            batch_bytes: default_batch_bytes(),
            linger_ms: default_linger_ms(),
            idempotence: true,
            max_message_bytes: default_max_message_bytes(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            max_in_flight: default_in_flight(),
            max_in_flight_bytes: default_in_flight_bytes(),
        }
    }

    /// The longest line stored: longer ones are dead-lettered.
    pub fn max_line_bytes(&self) -> usize {
        self.max_message_bytes.saturating_sub(RECORD_OVERHEAD_BYTES)
    }

    /// Every problem, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self
            .bootstrap_servers
            .split(',')
            .all(|s| s.trim().is_empty())
        {
            out.push((
                "bootstrap_servers",
                "must name at least one broker".to_owned(),
            ));
        }
        for server in self.bootstrap_servers.split(',').map(str::trim) {
            if !server.is_empty()
                && !server
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                out.push(("bootstrap_servers", format!("{server:?} is not host:port")));
            }
        }
        let topic_ok = !self.topic.is_empty()
            && self.topic.len() <= 249
            && self.topic != "."
            && self.topic != ".."
            && (self.topic.bytes()).all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !topic_ok {
            out.push((
                "topic",
                format!(
                    "{:?} is not a topic name (1 to 249 of letters, digits, '.', '_', '-')",
                    self.topic
                ),
            ));
        }
        if self.create_topic && (self.topic_partitions < 1 || self.replication_factor < 1) {
            out.push((
                "topic_partitions",
                "a created topic needs at least 1 partition and 1 replica".to_owned(),
            ));
        }
        let password = self.password_env.is_some() || self.password_file.is_some();
        if self.security_protocol.sasl() {
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                out.push((
                    "sasl_username",
                    format!(
                        "missing: security_protocol {} needs a user (OCI Streaming: <tenancy>/<user>/<stream pool OCID>)",
                        self.security_protocol.as_str()
                    ),
                ));
            }
            if !password {
                out.push((
                    "password_env",
                    "missing: SASL needs a password from password_env or password_file".to_owned(),
                ));
            }
        } else if self.sasl_username.is_some() || password {
            out.push((
                "security_protocol",
                format!(
                    "{} sends no credentials: use sasl_ssl (or sasl_plaintext) with sasl_username and a password",
                    self.security_protocol.as_str()
                ),
            ));
        }
        if let Some(ca) = &self.tls_ca_file {
            if !self.security_protocol.tls() {
                out.push((
                    "tls_ca_file",
                    format!(
                        "security_protocol {} does not use TLS",
                        self.security_protocol.as_str()
                    ),
                ));
            } else if let Err(message) = crate::nats::pem_certificates(ca) {
                out.push(("tls_ca_file", message));
            }
        }
        if self.max_message_bytes < 4 * RECORD_OVERHEAD_BYTES {
            out.push((
                "max_message_bytes",
                format!("must be at least {}", 4 * RECORD_OVERHEAD_BYTES),
            ));
        }
        if self.max_message_bytes > 100 * 1_048_576 {
            out.push(("max_message_bytes", "must be at most 100 MiB".to_owned()));
        }
        if self.max_in_flight == 0 {
            out.push(("max_in_flight", "must be positive".to_owned()));
        }
        if self.max_in_flight_bytes == 0 {
            out.push(("max_in_flight_bytes", "must be positive".to_owned()));
        }
        if self.delivery_timeout_ms < 1_000 {
            out.push(("delivery_timeout_ms", "must be at least 1000".to_owned()));
        }
        if self.batch_bytes == 0 || self.batch_bytes > 100 * 1_048_576 {
            out.push(("batch_bytes", "must be between 1 and 100 MiB".to_owned()));
        }
        out
    }

    /// The client settings common to the producer and the readers: brokers, TLS, SASL.
    pub(crate) fn client(&self, password: Option<&str>) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", "tandem")
            // A missing topic is an error (or created with the configured partitions and
            // replicas), never created by the broker with its defaults.
            .set("allow.auto.create.topics", "false")
            .set("security.protocol", self.security_protocol.as_str())
            .set("log_level", "4");
        if self.security_protocol.sasl() {
            c.set("sasl.mechanism", self.sasl_mechanism.as_str());
            if let Some(user) = &self.sasl_username {
                c.set("sasl.username", user);
            }
            if let Some(p) = password {
                c.set("sasl.password", p);
            }
        }
        if let Some(ca) = &self.tls_ca_file {
            c.set("ssl.ca.location", ca.display().to_string());
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(cfg: &KafkaConfig) -> Vec<&'static str> {
        cfg.problems().into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn the_defaults_are_valid() {
        assert!(
            KafkaConfig::new("127.0.0.1:9092", "tandem")
                .problems()
                .is_empty()
        );
    }

    #[test]
    fn each_mistake_names_its_field() {
        let mut c = KafkaConfig::new("broker", "bad topic");
        assert_eq!(fields(&c), ["bootstrap_servers", "topic"]);
        c = KafkaConfig::new("b:9092", "t");
        c.security_protocol = SecurityProtocol::SaslSsl;
        assert_eq!(fields(&c), ["sasl_username", "password_env"]);
        c.sasl_username = Some("tenancy/user/ocid1.streampool.oc1..x".into());
        c.password_env = Some("OCI_AUTH_TOKEN".into());
        assert!(fields(&c).is_empty());
        c.security_protocol = SecurityProtocol::Plaintext;
        assert_eq!(fields(&c), ["security_protocol"]);
        c = KafkaConfig::new("b:9092", "t");
        c.max_message_bytes = 100;
        assert_eq!(fields(&c), ["max_message_bytes"]);
    }

    #[test]
    fn the_line_limit_leaves_room_for_key_and_headers() {
        let c = KafkaConfig::new("b:9092", "t");
        assert_eq!(c.max_line_bytes(), 1_048_576 - RECORD_OVERHEAD_BYTES);
    }
}

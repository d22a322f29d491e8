//! The `[pair]` section. Field docs are the configuration reference.

use serde::{Deserialize, Serialize};

/// How the two consumers of a pair coordinate through the NATS cluster they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// This consumer's name in the pair (`zone-a`): letters, digits, `-` and `_`, at most
    /// 64 characters, different from the other consumer's. Its beacons and the leases it
    /// holds carry this name.
    pub consumer_id: String,
    /// The NATS sink (`[sinks.<name>]`) whose connection (URL, token, TLS) is used.
    /// Absent: the configuration's only NATS sink.
    #[serde(default)]
    pub sink: Option<String>,
    /// The key-value bucket both consumers of the pair share: created if missing
    /// (history 1, `max_age` = `lease_ttl_ms`, file storage, 1 replica), used as it is
    /// if it exists. Letters, digits, `-` and `_`. The shared connect budgets live in
    /// buckets named `<bucket>_connects_<stream>`.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// How often this consumer publishes its progress per partition (latest activity,
    /// stored watermark, live connections, open gaps), in milliseconds.
    #[serde(default = "default_beacon_ms")]
    pub beacon_ms: u64,
    /// The bucket's `max_age`, in milliseconds: a beacon or a recovery-job lease not
    /// refreshed within it is gone, so the lease of a consumer that crashed expires after
    /// it. Leases are renewed every third of it. At least 3 × `beacon_ms`.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// A peer's beacon received longer ago than this, in milliseconds, counts as absent:
    /// the peer is treated as down for that partition. At least 2 × `beacon_ms`.
    #[serde(default = "default_peer_stale_ms")]
    pub peer_stale_ms: u64,
}

fn default_bucket() -> String {
    "tandem_pair".to_owned()
}
fn default_beacon_ms() -> u64 {
    1_000
}
fn default_lease_ttl_ms() -> u64 {
    10_000
}
fn default_peer_stale_ms() -> u64 {
    5_000
}

/// The longest consumer id: it is part of every beacon key.
const MAX_CONSUMER_ID: usize = 64;

impl PairConfig {
    /// The defaults for the consumer named `consumer_id`.
    pub fn new(consumer_id: impl Into<String>) -> PairConfig {
        PairConfig {
            consumer_id: consumer_id.into(),
            sink: None,
            bucket: default_bucket(),
            beacon_ms: default_beacon_ms(),
            lease_ttl_ms: default_lease_ttl_ms(),
            peer_stale_ms: default_peer_stale_ms(),
        }
    }

    /// What makes this configuration unusable, as (field, why).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let id = &self.consumer_id;
        if id.is_empty() {
            out.push(("consumer_id", "must not be empty".to_owned()));
        } else if !name_chars(id) {
            out.push((
                "consumer_id",
                format!("{id:?}: only letters, digits, '-' and '_' are allowed"),
            ));
        } else if id.len() > MAX_CONSUMER_ID {
            out.push((
                "consumer_id",
                format!("{} characters: at most {MAX_CONSUMER_ID}", id.len()),
            ));
        }
        if self.bucket.is_empty() || !name_chars(&self.bucket) {
            out.push((
                "bucket",
                format!(
                    "{:?}: a bucket name is letters, digits, '-' and '_'",
                    self.bucket
                ),
            ));
        }
        if self.beacon_ms == 0 {
            out.push(("beacon_ms", "must be positive".to_owned()));
        }
        if self.lease_ttl_ms < self.beacon_ms.saturating_mul(3) {
            out.push((
                "lease_ttl_ms",
                format!(
                    "{} ms: at least 3 × beacon_ms ({} ms), or a live consumer's beacons expire between two puts",
                    self.lease_ttl_ms,
                    self.beacon_ms.saturating_mul(3)
                ),
            ));
        }
        if self.peer_stale_ms < self.beacon_ms.saturating_mul(2) {
            out.push((
                "peer_stale_ms",
                format!(
                    "{} ms: at least 2 × beacon_ms ({} ms), or a live peer looks absent between two beacons",
                    self.peer_stale_ms,
                    self.beacon_ms.saturating_mul(2)
                ),
            ));
        }
        out
    }
}

/// Letters, digits, `-` and `_`: valid in a bucket name and as one token of a key.
fn name_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example parses, takes the defaults, and has no problems.
    #[test]
    fn the_documented_example_round_trips() {
        let cfg: PairConfig = serde_json::from_str(r#"{"consumer_id": "zone-a"}"#).unwrap();
        assert_eq!(cfg, PairConfig::new("zone-a"));
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let back: PairConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    /// Unknown fields and a missing consumer id are refused.
    #[test]
    fn unknown_fields_and_a_missing_id_are_refused() {
        assert!(serde_json::from_str::<PairConfig>(r#"{"consumer_id": "a", "ttl": 1}"#).is_err());
        assert!(serde_json::from_str::<PairConfig>(r#"{"bucket": "b"}"#).is_err());
    }

    /// Each unusable setting is named by its field.
    #[test]
    fn problems_name_the_field() {
        let fields = |cfg: &PairConfig| cfg.problems().iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(fields(&PairConfig::new("")), ["consumer_id"]);
        assert_eq!(fields(&PairConfig::new("zone a")), ["consumer_id"]);
        assert_eq!(fields(&PairConfig::new("zone.a")), ["consumer_id"]);
        assert_eq!(fields(&PairConfig::new("x".repeat(65))), ["consumer_id"]);
        let mut cfg = PairConfig::new("zone_a-1");
        cfg.bucket = "pair.kv".to_owned();
        assert_eq!(fields(&cfg), ["bucket"]);
        let mut cfg = PairConfig::new("a");
        cfg.lease_ttl_ms = 2_999;
        assert_eq!(fields(&cfg), ["lease_ttl_ms"]);
        let mut cfg = PairConfig::new("a");
        cfg.peer_stale_ms = 1_999;
        assert_eq!(fields(&cfg), ["peer_stale_ms"]);
        let mut cfg = PairConfig::new("a");
        cfg.beacon_ms = 0;
        assert_eq!(fields(&cfg), ["beacon_ms"]);
    }
}

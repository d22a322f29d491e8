//! Names in the bucket. Keys are NATS subject tokens joined by `.`; the names inside
//! them (streams, accounts) are escaped into `[A-Za-z0-9_-]`, which is valid both in a key
//! token and in a bucket name, so that a name never splits a key or meets another name.

use std::fmt::Write;

/// Escaped names longer than this keep a prefix and a hash of the whole name.
const MAX_ESCAPED: usize = 48;
/// The readable prefix kept of a long name.
const LONG_PREFIX: usize = 32;

/// `name` in `[A-Za-z0-9_-]`: letters, digits and `-` stay, every other byte becomes `_`
/// and two hex digits (`_` too), so distinct names stay distinct. A name whose escape
/// exceeds 48 characters (an X API v2 URL used as the account) keeps its first 32 and a
/// hash of the whole name; an empty name is `_`.
pub(crate) fn escape(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "_{b:02X}");
        }
    }
    if out.len() > MAX_ESCAPED {
        out.truncate(LONG_PREFIX);
        let _ = write!(out, "-{:016x}", fnv1a(name.as_bytes()));
    }
    out
}

/// FNV-1a, 64 bits: stable across processes and Rust versions (both zones must agree).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The beacon of `consumer` for a partition.
pub(crate) fn beacon(consumer: &str, stream: &str, partition: u32) -> String {
    format!("beacon.{consumer}.{}.{partition}", escape(stream))
}

/// The beacon a consumer without partitions puts, so that its puts still prove the
/// bucket reachable and its watch alive.
pub(crate) fn probe(consumer: &str) -> String {
    format!("beacon.{consumer}")
}

/// What the watch of `beacon.>` delivers.
pub(crate) enum BeaconKey<'a> {
    /// A consumer without partitions.
    Probe { consumer: &'a str },
    /// A partition's beacon; `stream` is escaped.
    Partition {
        consumer: &'a str,
        stream: &'a str,
        partition: u32,
    },
}

impl BeaconKey<'_> {
    pub(crate) fn parse(key: &str) -> Option<BeaconKey<'_>> {
        let mut parts = key.split('.');
        if parts.next()? != "beacon" {
            return None;
        }
        let consumer = parts.next()?;
        let Some(stream) = parts.next() else {
            return Some(BeaconKey::Probe { consumer });
        };
        let partition = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(BeaconKey::Partition {
            consumer,
            stream,
            partition,
        })
    }

    pub(crate) fn consumer(&self) -> &str {
        match self {
            BeaconKey::Probe { consumer } | BeaconKey::Partition { consumer, .. } => consumer,
        }
    }
}

/// Slot `slot` of the recovery jobs of `account`.
pub(crate) fn job(account: &str, slot: usize) -> String {
    format!("job.{}.{slot}", escape(account))
}

/// Token `slot` of a connect-budget bucket.
/// The writer lease of a partition of `sink` (a Kafka topic the pair shares).
pub(crate) fn writer(sink: &str, stream: &str, partition: u32) -> String {
    format!("writer.{}.{}.{partition}", escape(sink), escape(stream))
}

pub(crate) fn token(slot: usize) -> String {
    format!("token.{slot}")
}

/// The connect-budget bucket of `stream`.
pub(crate) fn connects_bucket(bucket: &str, stream: &str) -> String {
    format!("{bucket}_connects_{}", escape(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_token(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// Names that need no escaping stay readable; others become valid tokens, and
    /// different names stay different.
    #[test]
    fn escaping_is_valid_and_keeps_names_apart() {
        assert_eq!(escape("decahose"), "decahose");
        assert_eq!(escape("power-track"), "power-track");
        let names = [
            "a_b",
            "a.b",
            "a_2Eb",
            "",
            "_",
            "https://api.x.com/2/tweets/search/stream",
            "https://api.x.com/2/tweets/search/stream?x=1",
            "ünïcode",
        ];
        let escaped: Vec<String> = names.iter().map(|n| escape(n)).collect();
        for (n, e) in names.iter().zip(&escaped) {
            assert!(valid_token(e), "{n:?} -> {e:?}");
            assert!(e.len() <= MAX_ESCAPED + 1, "{n:?} -> {e:?}");
        }
        let mut unique = escaped.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{escaped:?}");
    }

    /// A beacon key parses back to its parts; other keys do not parse as beacons.
    #[test]
    fn beacon_keys_parse_back() {
        let key = beacon("zone-a", "https://api.x.com/2/tweets/sample/stream", 3);
        let Some(BeaconKey::Partition {
            consumer,
            stream,
            partition,
        }) = BeaconKey::parse(&key)
        else {
            panic!("{key} does not parse");
        };
        assert_eq!(
            (consumer, stream, partition),
            (
                "zone-a",
                escape("https://api.x.com/2/tweets/sample/stream").as_str(),
                3
            )
        );
        assert!(matches!(
            BeaconKey::parse(&probe("zone-b")),
            Some(BeaconKey::Probe { consumer: "zone-b" })
        ));
        assert!(BeaconKey::parse(&job("acct", 0)).is_none());
        assert!(BeaconKey::parse("beacon.a.s.x").is_none());
        assert!(BeaconKey::parse("beacon.a.s.1.2").is_none());
    }
}

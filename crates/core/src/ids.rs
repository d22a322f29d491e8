//! Activity identities and the keys the dedup cache remembers.

use std::fmt;
use std::str::FromStr;

/// Milliseconds since the Unix epoch at which snowflake time starts (2010-11-04T01:42:54.657Z).
pub const SNOWFLAKE_EPOCH_MS: u64 = 1_288_834_974_657;

/// The identity of one activity, as defined by the upstream for each payload type.
///
/// Two lines with the same `ActivityId` are copies of the same activity, whichever
/// connection delivered them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActivityId {
    /// A post (native, Activity Streams or v2): its 64-bit snowflake id.
    Post(u64),
    /// A like: its 128-bit id, written upstream as 32 hex digits.
    Like(u128),
    /// An unlike has no id of its own: the liked post, the user and the event time identify it.
    Unlike {
        tweet: u64,
        user: u64,
        timestamp_ms: u64,
    },
    /// A post deletion or other compliance event: the deleted post and the event time.
    Delete { status: u64, timestamp_ms: u64 },
}

/// What the dedup cache stores for an id.
///
/// Posts (the bulk of every volume stream) are remembered as their exact 64-bit id. Other
/// identities need more bits: likes are exact 128-bit values, composite identities are
/// folded into 128 bits by [`ActivityId::dedup_key`], where a collision needs about 2^64
/// distinct events in one dedup window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DedupKey {
    /// An exact 64-bit snowflake.
    Narrow(u64),
    /// A 128-bit key for every other identity.
    Wide(u128),
}

impl ActivityId {
    /// The key under which the dedup cache remembers this activity.
    pub fn dedup_key(&self) -> DedupKey {
        match *self {
            ActivityId::Post(id) => DedupKey::Narrow(id),
            ActivityId::Like(id) => DedupKey::Wide(id),
            ActivityId::Unlike {
                tweet,
                user,
                timestamp_ms,
            } => DedupKey::Wide(fold128(1, &[tweet, user, timestamp_ms])),
            ActivityId::Delete {
                status,
                timestamp_ms,
            } => DedupKey::Wide(fold128(2, &[status, timestamp_ms])),
        }
    }

    /// When the activity was created, in milliseconds since the Unix epoch, where the
    /// identity says so (snowflakes embed their creation time; events carry a timestamp).
    pub fn created_unix_ms(&self) -> Option<u64> {
        match *self {
            ActivityId::Post(id) => Some(snowflake_unix_ms(id)),
            ActivityId::Like(_) => None,
            ActivityId::Unlike { timestamp_ms, .. } | ActivityId::Delete { timestamp_ms, .. } => {
                Some(timestamp_ms)
            }
        }
    }
}

/// The creation time embedded in a snowflake id, in milliseconds since the Unix epoch.
pub fn snowflake_unix_ms(id: u64) -> u64 {
    (id >> 22) + SNOWFLAKE_EPOCH_MS
}

/// Builds a snowflake id from a creation time, a worker number (10 bits) and a sequence
/// number (12 bits), the layout the upstream uses.
pub fn snowflake(unix_ms: u64, worker: u16, sequence: u16) -> u64 {
    let since_epoch = unix_ms.saturating_sub(SNOWFLAKE_EPOCH_MS);
    (since_epoch << 22) | (u64::from(worker & 0x3ff) << 12) | u64::from(sequence & 0xfff)
}

/// Folds a tagged tuple of 64-bit values into 128 bits with two independent mixes.
fn fold128(tag: u64, parts: &[u64]) -> u128 {
    let mut hi: u64 = 0x9e37_79b9_7f4a_7c15 ^ tag;
    let mut lo: u64 = 0xc2b2_ae3d_27d4_eb4f ^ tag.rotate_left(32);
    for &part in parts {
        hi = mix64(hi ^ part);
        lo = mix64(lo.wrapping_add(part).rotate_left(17));
    }
    (u128::from(hi) << 64) | u128::from(lo)
}

/// The splitmix64 finaliser: every input bit affects every output bit.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl fmt::Display for ActivityId {
    /// The canonical text form: used as `Nats-Msg-Id`, in the ground truth and in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ActivityId::Post(id) => write!(f, "{id}"),
            ActivityId::Like(id) => write!(f, "{id:032x}"),
            ActivityId::Unlike {
                tweet,
                user,
                timestamp_ms,
            } => write!(f, "unlike:{tweet}:{user}:{timestamp_ms}"),
            ActivityId::Delete {
                status,
                timestamp_ms,
            } => write!(f, "delete:{status}:{timestamp_ms}"),
        }
    }
}

/// The text was not the canonical form of an [`ActivityId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an activity id: {0:?}")]
pub struct ParseActivityIdError(pub String);

impl FromStr for ActivityId {
    type Err = ParseActivityIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseActivityIdError(s.to_owned());
        let num = |t: &str| t.parse::<u64>().map_err(|_| bad());
        if let Some(rest) = s.strip_prefix("unlike:") {
            let mut it = rest.split(':');
            let (Some(t), Some(u), Some(ts), None) = (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(bad());
            };
            return Ok(ActivityId::Unlike {
                tweet: num(t)?,
                user: num(u)?,
                timestamp_ms: num(ts)?,
            });
        }
        if let Some(rest) = s.strip_prefix("delete:") {
            let (st, ts) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(ActivityId::Delete {
                status: num(st)?,
                timestamp_ms: num(ts)?,
            });
        }
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return u128::from_str_radix(s, 16)
                .map(ActivityId::Like)
                .map_err(|_| bad());
        }
        num(s).map(ActivityId::Post)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The canonical text form parses back to the same id for every kind.
    #[test]
    fn display_round_trips() {
        let ids = [
            ActivityId::Post(804_451_830_033_948_672),
            ActivityId::Like(0x4356_0406_e0ad_9f68_3744_45f5_f30c_33fc),
            ActivityId::Unlike {
                tweet: 1,
                user: 2,
                timestamp_ms: 3,
            },
            ActivityId::Delete {
                status: 9,
                timestamp_ms: 10,
            },
        ];
        for id in ids {
            assert_eq!(id.to_string().parse::<ActivityId>(), Ok(id));
        }
        assert!("12x".parse::<ActivityId>().is_err());
        assert!("unlike:1:2".parse::<ActivityId>().is_err());
    }

    /// A snowflake built from a time gives that time back, and keeps its ordering.
    #[test]
    fn snowflake_time_round_trips() {
        let t = 1_700_000_000_123;
        let id = snowflake(t, 7, 42);
        assert_eq!(snowflake_unix_ms(id), t);
        assert!(snowflake(t + 1, 0, 0) > id);
        // A real id from the samples: posted 2014-08-31T00:29:15Z.
        assert_eq!(
            snowflake_unix_ms(505_874_924_095_815_681) / 1000,
            1_409_444_955
        );
    }

    /// Composite identities that differ in any field get different keys.
    #[test]
    fn composite_keys_differ() {
        let a = ActivityId::Unlike {
            tweet: 1,
            user: 2,
            timestamp_ms: 3,
        };
        let b = ActivityId::Unlike {
            tweet: 1,
            user: 2,
            timestamp_ms: 4,
        };
        let c = ActivityId::Delete {
            status: 1,
            timestamp_ms: 3,
        };
        assert_ne!(a.dedup_key(), b.dedup_key());
        assert_ne!(a.dedup_key(), c.dedup_key());
        assert_eq!(a.dedup_key(), a.dedup_key());
    }
}

//! The connect budget shared by the pair: at most `limit` connection requests of a
//! stream per sliding `window`, across both consumers.
//!
//! Each stream has a bucket whose `max_age` is the window. A request takes a token by
//! creating one of the keys `token.0` .. `token.<limit - 1>` (a create fails while the key
//! exists); the key is never deleted, so it comes back exactly one window after it was
//! taken. Non-urgent requests may only create the first `limit - reserve` keys, so the
//! last `reserve = max(1, limit / 5)` tokens of every window stay for urgent requests
//! (partitions with no live connection). Each create is atomic on the server, so two
//! consumers can never take the same token, nor more than `limit` between them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::CreateErrorKind;
use tokio::time::timeout;

use crate::bucket;
use crate::events::Op;
use crate::keys;
use crate::pair::{Inner, Lost, OP_TIMEOUT};

/// The shortest window: a bucket `max_age` of zero would keep tokens forever.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// The tokens a non-urgent request leaves to urgent ones: `max(1, limit / 5)`, and never
/// all of them (a limit of 1 keeps none back).
pub(crate) fn reserve(limit: usize) -> usize {
    (limit / 5).max(1).min(limit.saturating_sub(1))
}

pub(crate) async fn take(
    inner: &Arc<Inner>,
    stream: &str,
    limit: usize,
    window: Duration,
    urgent: bool,
) -> Result<(), Lost> {
    let limit = limit.max(1);
    let window = window.max(MIN_WINDOW);
    let usable = if urgent {
        limit
    } else {
        limit - reserve(limit)
    };
    // A token comes back one window after it was taken; a few tries per window suffice.
    let retry = (window / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let id = &inner.cfg.consumer_id;
    loop {
        let kv = tokens_bucket(inner, stream, window).await?;
        for slot in 0..usable {
            let key = keys::token(slot);
            match timeout(OP_TIMEOUT, kv.create(&key, id.clone().into())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {}
                Ok(Err(e)) => {
                    inner.failed(Op::ConnectToken, &format!("creating {key}: {e}"));
                    return Err(Lost);
                }
                Err(_) => {
                    let why = format!("creating {key}: no answer within 2 s");
                    inner.failed(Op::ConnectToken, &why);
                    return Err(Lost);
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// The connect-budget bucket of `stream`, opened (or created) on first use.
async fn tokens_bucket(
    inner: &Inner,
    stream: &str,
    window: Duration,
) -> Result<async_nats::jetstream::kv::Store, Lost> {
    // Reachable only while the pair's own bucket is: one verdict for the whole pair.
    inner.reachable_bucket()?;
    if let Some(kv) = inner.connects_bucket(stream) {
        return Ok(kv);
    }
    let js = inner.js().ok_or(Lost)?;
    let name = keys::connects_bucket(&inner.cfg.bucket, stream);
    match bucket::open(js, &name, window).await {
        Ok(kv) => {
            inner.set_connects_bucket(stream, kv.clone());
            Ok(kv)
        }
        Err(e) => {
            inner.failed(Op::ConnectToken, &e);
            Err(Lost)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reserve;

    /// The reserve is a fifth of the limit, at least one, and never the whole limit.
    #[test]
    fn the_reserve_leaves_non_urgent_requests_something() {
        assert_eq!(reserve(1), 0);
        assert_eq!(reserve(2), 1);
        assert_eq!(reserve(4), 1);
        assert_eq!(reserve(10), 2);
        assert_eq!(reserve(11), 2);
    }
}

//! Opening a bucket, creating it when missing.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::pair::OP_TIMEOUT;

/// The bucket `name`: opened if it exists (as it is: a warning when its `max_age` is not
/// `max_age`), else created with history 1, `max_age`, file storage and one replica. Two
/// consumers creating it at once both end up with the same bucket.
pub(crate) async fn open(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, String> {
    let store = match tokio::time::timeout(OP_TIMEOUT, js.get_key_value(name)).await {
        Err(_) => return Err(format!("opening bucket {name}: no answer within 2 s")),
        Ok(Ok(store)) => store,
        Ok(Err(missing)) => {
            match tokio::time::timeout(OP_TIMEOUT, js.create_stream(kv_stream(name, max_age))).await
            {
                Err(_) => return Err(format!("creating bucket {name}: no answer within 2 s")),
                Ok(Ok(_)) => {
                    tracing::info!(
                        bucket = name,
                        max_age_ms = max_age.as_millis() as u64,
                        "created the bucket"
                    );
                }
                // The peer may have created it meanwhile (with its own settings).
                Ok(Err(failed)) => tracing::debug!(
                    bucket = name,
                    error = %failed,
                    "bucket not created; opening it again"
                ),
            }
            get(js, name)
                .await
                .map_err(|e| format!("{e} (before creating it: {missing})"))?
        }
    };
    let found = store.stream.cached_info().config.max_age;
    if found != max_age {
        tracing::warn!(
            bucket = name,
            found_ms = found.as_millis() as u64,
            configured_ms = max_age.as_millis() as u64,
            "the bucket exists with another max_age, which applies: beacons and leases expire after it (compare lease_ttl_ms, or the connect window, with the peer's)"
        );
    }
    Ok(store)
}

async fn get(js: &jetstream::Context, name: &str) -> Result<kv::Store, String> {
    match tokio::time::timeout(OP_TIMEOUT, js.get_key_value(name)).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => Err(format!("opening bucket {name}: {e}")),
        Err(_) => Err(format!("opening bucket {name}: no answer within 2 s")),
    }
}

/// The stream behind a key-value bucket, as the client library would configure it.
/// Created directly: the library's `create_key_value` first reads the account's limits,
/// a reply nats-server 2.9 words in a way it cannot parse.
fn kv_stream(name: &str, max_age: Duration) -> stream::Config {
    stream::Config {
        name: format!("KV_{name}"),
        description: Some("tandem pair coordination".to_owned()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        max_bytes: -1,
        max_message_size: -1,
        storage: stream::StorageType::File,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    }
}

//! What a NATS server accepts from a bare JetStream producer: the ceiling the JetStream
//! sink's throughput is judged against (the Kafka run's `broker_ceiling` in [`crate::bench`]
//! is the same for a Kafka-protocol broker).

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use tokio::time::Instant;

/// The stream and subjects the producer writes to, apart from tandem's.
const STREAM: &str = "CEILING";
const SUBJECTS: &str = "ceiling.>";

/// Publishes `n` of `lines` round-robin to a JetStream stream of its own and awaits every
/// acknowledgement; returns (messages/s, MB/s of payload) from the first publish to the
/// last acknowledgement. The stream must then hold exactly `n` messages (an error
/// otherwise); it is deleted before returning.
///
/// The comparison with the sink is fair: the stream (`CEILING`, subjects `ceiling.>`,
/// deleted first if an earlier call left it) has the settings the sink gives the stream it
/// creates, as [`tandem_sink::NatsConfig`] defaults them (file storage, the duplicate
/// window, replicas, no age limit); each message carries a unique `Nats-Msg-Id`, so the
/// server checks its duplicate window as it does for tandem's; the JetStream context is
/// built as the sink's, and at most the sink's default window (`max_in_flight` publishes,
/// `max_in_flight_bytes`) awaits its acknowledgement, the oldest awaited first. What the
/// producer leaves out is tandem's own work: decoding, dedup, the driver.
pub async fn jetstream_ceiling(url: &str, lines: &[&str], n: usize) -> Result<(f64, f64), String> {
    if lines.is_empty() {
        return Err("no payload lines to publish".to_owned());
    }
    let cfg = tandem_sink::NatsConfig::new(url);
    let client = async_nats::connect(url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cfg.ack_timeout_ms))
        .max_ack_inflight(cfg.max_in_flight.max(1) * 2)
        .backpressure_on_inflight(true)
        .build(client);
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![SUBJECTS.to_owned()],
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        num_replicas: cfg.replicas.max(1),
        max_age: Duration::from_secs(cfg.max_age_secs),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("creating stream {STREAM}: {e}"))?;
    // Payloads built once; a publish clones the handle, as the sink does with its lines.
    let messages: Vec<(PublishMessage, u64)> = lines
        .iter()
        .map(|l| {
            let payload = l.as_bytes().to_vec().into();
            (PublishMessage::build().payload(payload), l.len() as u64)
        })
        .collect();
    let mut window: VecDeque<(PublishAckFuture, u64)> = VecDeque::new();
    let (mut in_flight_bytes, mut total_bytes) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..n {
        let (message, len) = &messages[i % messages.len()];
        while !window.is_empty()
            && (window.len() >= cfg.max_in_flight
                || in_flight_bytes + len > cfg.max_in_flight_bytes)
        {
            if let Some((ack, acked_len)) = window.pop_front() {
                await_ack(ack).await?;
                in_flight_bytes -= acked_len;
            }
        }
        // Two subjects, as the sink writes the bench's two partitions; ids as long as a
        // post's.
        let message = message.clone().message_id(format!("{:019}", i + 1));
        let ack = js
            .send_publish(format!("ceiling.{}", i % 2), message)
            .await
            .map_err(|e| format!("publish {i}: {e}"))?;
        window.push_back((ack, *len));
        in_flight_bytes += len;
        total_bytes += len;
    }
    while let Some((ack, _)) = window.pop_front() {
        await_ack(ack).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    // Every message must be in the stream, once; then the stream goes, so that the run
    // measured next on this server does not share it with 'n' messages' files.
    let held = js
        .get_stream(STREAM)
        .await
        .map_err(|e| format!("stream {STREAM}: {e}"))?
        .info()
        .await
        .map_err(|e| format!("stream {STREAM} info: {e}"))?
        .state
        .messages;
    if held != n as u64 {
        return Err(format!(
            "stream {STREAM} holds {held} messages of {n} published"
        ));
    }
    js.delete_stream(STREAM)
        .await
        .map_err(|e| format!("deleting stream {STREAM}: {e}"))?;
    Ok((n as f64 / secs, total_bytes as f64 / secs / 1e6))
}

async fn await_ack(ack: PublishAckFuture) -> Result<(), String> {
    match ack.into_future().await {
        Ok(a) if a.duplicate => Err(format!("message {} taken as a duplicate", a.sequence)),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("publish not acknowledged: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a real server: every message lands once (checked inside, the call fails
    /// otherwise), even over a stream an interrupted call left holding the same message
    /// ids; the stream is gone afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_message_lands_in_the_ceiling_stream() {
        // A store of its own (the crate has no temporary-directory helper), removed at the
        // end.
        let dir = std::env::temp_dir().join(format!(
            "tandem-ceiling-test-{}-{}",
            std::process::id(),
            crate::free_port().unwrap()
        ));
        let server = crate::nats::NatsServer::start(&dir).expect("nats-server starts");
        let url = server.url();
        let js = jetstream::new(async_nats::connect(&url).await.unwrap());
        // What an interrupted call leaves: the stream, holding the first message id.
        js.create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![SUBJECTS.to_owned()],
            duplicate_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
        let left = PublishMessage::build()
            .payload(b"{}".to_vec().into())
            .message_id(format!("{:019}", 1));
        let ack = js.send_publish("ceiling.0", left).await.unwrap();
        await_ack(ack).await.unwrap();
        let lines = ["{\"id\":1,\"text\":\"a\"}", "{\"id\":2,\"text\":\"bb\"}"];
        let (per_sec, mb_per_sec) = jetstream_ceiling(&url, &lines, 5_000).await.unwrap();
        assert!(per_sec > 0.0 && mb_per_sec > 0.0, "{per_sec} {mb_per_sec}");
        assert!(
            js.get_stream(STREAM).await.is_err(),
            "the stream is deleted"
        );
        assert!(jetstream_ceiling(&url, &[], 1).await.is_err());
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

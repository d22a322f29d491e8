//! The coordination task: connects, opens the bucket, puts this consumer's beacons every
//! `beacon_ms` and watches the other consumers' beacons.
//!
//! `coordinated` follows the beacons: a round that stored every beacon makes it true; a
//! failed put, or no round stored within 2 × `beacon_ms` (a round still waiting on a
//! server that does not answer), makes it false. Rounds run beside the clock, so a
//! stuck one cannot delay that verdict.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tandem_sink::NatsConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use crate::bucket;
use crate::events::Op;
use crate::keys;
use crate::pair::{Inner, LocalProgress, OP_TIMEOUT, stopped};
use crate::progress::PartitionId;

/// The longest wait between two attempts to connect to a server that refused tandem.
const MAX_CONNECT_RETRY: Duration = Duration::from_secs(30);

pub(crate) async fn run(
    inner: Arc<Inner>,
    nats: NatsConfig,
    token: Option<String>,
    partitions: Vec<PartitionId>,
    local: LocalProgress,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        () = connect(&inner, &nats, token) => {}
        () = stopped(&mut shutdown) => {
            inner.stop();
            return;
        }
    }
    let id = &inner.cfg.consumer_id;
    let keys: Arc<[(PartitionId, String)]> = partitions
        .into_iter()
        .map(|p| {
            let key = keys::beacon(id, &p.stream, p.partition);
            (p, key)
        })
        .collect();
    tokio::spawn(watch_peers(inner.clone(), shutdown.clone()).in_current_span());

    let every = Duration::from_millis(inner.cfg.beacon_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut round: Option<JoinHandle<Result<(), String>>> = None;
    let mut last_stored = Instant::now();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            _ = tick.tick() => {
                if round.is_none() {
                    let task = beacon_round(inner.clone(), keys.clone(), local.clone());
                    round = Some(tokio::spawn(task.in_current_span()));
                }
                if last_stored.elapsed() > every * 2 {
                    inner.lost("no beacon stored within 2 × beacon_ms");
                }
            }
            done = async {
                match round.as_mut() {
                    Some(r) => r.await,
                    None => std::future::pending().await,
                }
            } => {
                round = None;
                match done {
                    Ok(Ok(())) => {
                        last_stored = Instant::now();
                        inner.succeeded();
                    }
                    Ok(Err(e)) => inner.failed(Op::Beacon, &e),
                    Err(e) => inner.failed(Op::Beacon, &format!("beacon round ended: {e}")),
                }
                if !inner.coordinated() && inner.connected() {
                    inner.forget_buckets();
                }
            }
        }
    }
    if let Some(r) = round {
        r.abort();
    }
    inner.stop();
}

/// Connects to the NATS servers (a server that cannot be reached yet is retried in the
/// background by the client; one that refuses tandem is tried again, slowly).
async fn connect(inner: &Inner, nats: &NatsConfig, token: Option<String>) {
    let mut wait = Duration::from_secs(1);
    loop {
        match tandem_sink::nats_client(nats, token.clone()).await {
            Ok(client) => {
                inner.set_nats(client);
                return;
            }
            Err(e) => {
                inner.failed(Op::Beacon, &e.to_string());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_CONNECT_RETRY);
            }
        }
    }
}

/// Puts the beacon of every partition (asking `local` for each), opening the bucket
/// first if needed.
async fn beacon_round(
    inner: Arc<Inner>,
    keys: Arc<[(PartitionId, String)]>,
    local: LocalProgress,
) -> Result<(), String> {
    if !inner.connected() {
        return Err("not connected to the NATS server".to_owned());
    }
    let kv = match inner.bucket() {
        Some(kv) => kv,
        None => {
            let js = inner.js().ok_or("no NATS client")?;
            let ttl = Duration::from_millis(inner.cfg.lease_ttl_ms);
            let kv = bucket::open(js, &inner.cfg.bucket, ttl).await?;
            inner.set_bucket(kv.clone());
            kv
        }
    };
    if keys.is_empty() {
        return put(&kv, &keys::probe(&inner.cfg.consumer_id), Vec::new()).await;
    }
    let puts = keys.iter().map(|(partition, key)| {
        let body = serde_json::to_vec(&local(partition)).unwrap_or_default();
        put(&kv, key, body)
    });
    futures_util::future::join_all(puts)
        .await
        .into_iter()
        .collect()
}

async fn put(kv: &kv::Store, key: &str, body: Vec<u8>) -> Result<(), String> {
    match tokio::time::timeout(OP_TIMEOUT, kv.put(key, body.into())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("putting {key}: {e}")),
        Err(_) => Err(format!("putting {key}: no answer within 2 s")),
    }
}

/// Keeps the other consumers' latest beacons. The watch delivers new beacons only, so
/// a beacon's age is counted from its arrival here. A watch that ends, fails, or stops
/// delivering this consumer's own beacons while they are being stored (a consumer lost
/// with a server restart) is started again.
async fn watch_peers(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(inner.cfg.beacon_ms);
    let silent = every * 3 + OP_TIMEOUT;
    loop {
        if let Some(kv) = inner.bucket() {
            match tokio::time::timeout(OP_TIMEOUT, kv.watch("beacon.>")).await {
                Ok(Ok(mut beacons)) => {
                    let mut own = Instant::now();
                    loop {
                        tokio::select! {
                            () = stopped(&mut shutdown) => return,
                            item = beacons.next() => match item {
                                Some(Ok(entry)) => {
                                    if inner.heard(&entry) {
                                        own = Instant::now();
                                    }
                                }
                                Some(Err(e)) => {
                                    inner.failed(Op::Watch, &format!("watching beacons: {e}"));
                                    break;
                                }
                                None => {
                                    inner.failed(Op::Watch, "the watch of beacons ended");
                                    break;
                                }
                            },
                            () = tokio::time::sleep_until(own + silent) => {
                                if inner.coordinated() {
                                    inner.failed(Op::Watch, "the watch stopped delivering beacons");
                                    break;
                                }
                                own = Instant::now();
                            }
                        }
                    }
                }
                Ok(Err(e)) => inner.failed(Op::Watch, &format!("watching beacons: {e}")),
                Err(_) => inner.failed(Op::Watch, "watching beacons: no answer within 2 s"),
            }
        }
        tokio::select! {
            () = stopped(&mut shutdown) => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

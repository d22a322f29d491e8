//! The connections' lifecycle events, fanned out: every observer (the monitor, the
//! broadcast for tests and the demo) gets every event; each partition's gap repair gets
//! its own.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_conn::ConnEvent;
use tandem_core::Partition;
use tokio::sync::{broadcast, mpsc};

pub(crate) fn fan_out(
    mut events: mpsc::UnboundedReceiver<ConnEvent>,
    repair: HashMap<(Arc<str>, Partition), mpsc::UnboundedSender<ConnEvent>>,
    monitor: mpsc::UnboundedSender<ConnEvent>,
    broadcast: broadcast::Sender<ConnEvent>,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let partition = match &ev {
                ConnEvent::Connected { key, .. } => Some((key.stream.clone(), key.partition)),
                ConnEvent::UncoveredBeyondBackfill {
                    stream, partition, ..
                } => Some((stream.clone(), *partition)),
                _ => None,
            };
            if let Some(k) = partition
                && let Some(tx) = repair.get(&k)
            {
                let _ = tx.send(ev.clone());
            }
            let _ = broadcast.send(ev.clone());
            let _ = monitor.send(ev);
        }
    });
}

//! Delivery of alert transitions to an Alertmanager-compatible endpoint.

use tandem_core::time::rfc3339_ms;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::alert::{Phase, Transition};

/// Posts every firing and resolved alert to `<url>/api/v2/alerts`. Failures are logged
/// and never touch the monitor.
pub fn spawn(url: String, mut transitions: broadcast::Receiver<Transition>) -> JoinHandle<()> {
    tandem_conn::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("a default client builds");
    let endpoint = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
    // What the logs name: never the credentials an operator may have put in the URL.
    let shown = tandem_core::redact_url(&endpoint);
    tokio::spawn(async move {
        loop {
            let t = match transitions.recv().await {
                Ok(t) => t,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "alert webhook fell behind");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let body = serde_json::json!([payload(&t)]);
            match client.post(&endpoint).json(&body).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(status = r.status().as_u16(), endpoint = %shown, "alert webhook refused")
                }
                Err(e) => {
                    tracing::warn!(error = %tandem_core::redact_url(&e.to_string()), endpoint = %shown, "alert webhook unreachable")
                }
            }
        }
    })
}

/// One alert in Alertmanager's v2 format.
pub fn payload(t: &Transition) -> serde_json::Value {
    let (key, severity, message, starts, ends) = match t {
        Transition::Fired(v) => {
            let since = match v.phase {
                Phase::Firing { since_ms } | Phase::Pending { since_ms } => since_ms,
            };
            (&v.key, v.severity, &v.message, since, None)
        }
        Transition::Resolved(r) => (
            &r.key,
            r.severity,
            &r.message,
            r.fired_ms,
            Some(r.resolved_ms),
        ),
    };
    let mut labels = serde_json::json!({
        "alertname": key.name.as_str(),
        "severity": severity.as_str(),
        "stream": key.stream,
        "service": "tandem",
    });
    if let Some(p) = key.partition {
        labels["partition"] = p.to_string().into();
    }
    if let Some(path) = &key.path {
        labels["path"] = path.clone().into();
    }
    let mut alert = serde_json::json!({
        "labels": labels,
        "annotations": { "summary": message },
        "startsAt": rfc3339_ms(starts),
    });
    if let Some(end) = ends {
        alert["endsAt"] = rfc3339_ms(end).into();
    }
    alert
}

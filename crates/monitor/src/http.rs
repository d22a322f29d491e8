//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tandem_core::metric as m;
use tandem_core::time::unix_ms_now;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::status::Status;

static EXPORTER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> PrometheusHandle {
    EXPORTER
        .get_or_init(|| {
            let seconds = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let repair = [
                1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(m::PATH_LAG.to_owned()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(m::HANDOFF_LATENCY.to_owned()), &seconds)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(m::GAP_REPAIR_DURATION.to_owned()),
                        &repair,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        // A plain thread outside any runtime: nothing to pause here.
                        #[allow(clippy::disallowed_methods)]
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("a thread can be started");
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<Arc<Status>>,
    prometheus: PrometheusHandle,
}

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<Arc<Status>>,
) -> std::io::Result<()> {
    let state = AppState {
        status,
        prometheus: prometheus(),
    };
    let app = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .with_state(state);
    axum::serve(listener, app).await
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

/// Alive while the monitor keeps publishing (a stuck process fails this).
async fn healthz(State(s): State<AppState>) -> Response {
    let status = s.status.borrow().clone();
    let at = status.at_ms;
    if let Some(dead) = status.sinks.iter().find(|k| !k.alive) {
        let text = format!("sink {} has stopped\n", dead.name);
        return (StatusCode::SERVICE_UNAVAILABLE, text).into_response();
    }
    if at == 0 || unix_ms_now().saturating_sub(at) < 10_000 {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "monitor stalled\n").into_response()
    }
}

/// Ready when every partition has a live connection and every sink writes.
async fn readyz(State(s): State<AppState>) -> Response {
    let status = s.status.borrow().clone();
    if status.at_ms > 0 && status.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut reasons = status.not_ready_because.clone();
        if status.at_ms == 0 {
            reasons.push("starting".to_owned());
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "because": reasons })),
        )
            .into_response()
    }
}

async fn status_json(State(s): State<AppState>) -> Response {
    let status = s.status.borrow().clone();
    Json(status.as_ref()).into_response()
}

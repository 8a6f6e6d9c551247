//! A webhook receiver inside the simulator: verifies each delivery's signature and records
//! telemetry -> webhook latency (arrival minus the device time of the point that raised the
//! alert, `data.values.ts`, of `orb.alert.triggered`), so the harness measures the whole path without another process.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Percentiles, new_histogram, percentiles, workload};
use crate::model::alert::signature;

#[derive(Default)]
struct Seen {
    received: u64,
    bad_signatures: u64,
    by_type: std::collections::BTreeMap<String, u64>,
    latency: Option<Histogram<u64>>,
}

#[derive(Clone)]
struct Rx {
    secret: Arc<str>,
    seen: Arc<Mutex<Seen>>,
}

/// What the receiver saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WebhookSummary {
    pub received: u64,
    pub bad_signatures: u64,
    pub by_type: std::collections::BTreeMap<String, u64>,
    /// Device timestamp of the point that raised an alert -> arrival of `orb.alert.triggered`.
    pub telemetry_to_webhook_ms: Percentiles,
}

async fn hook(State(rx): State<Rx>, headers: HeaderMap, body: String) -> StatusCode {
    let now = workload::now_ms();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let ts = header("x-orbmanager-timestamp").parse::<u64>().unwrap_or(0);
    let fresh = (now / 1000).abs_diff(ts) < 300;
    let mut seen = rx.seen.lock().expect("receiver lock");
    seen.received += 1;
    if !fresh || header("x-orbmanager-signature") != signature(&rx.secret, ts, &body) {
        seen.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { return StatusCode::BAD_REQUEST };
    *seen.by_type.entry(v["type"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    // A triggered alert's values are those of the point that raised it (a resolved alert
    // keeps its opening values, so it says nothing about the clearing point's latency).
    if v["type"] == "orb.alert.triggered"
        && let Some(at) = v["data"]["values"]["ts"].as_u64()
    {
        let h = seen.latency.get_or_insert_with(new_histogram);
        let _ = h.record(now.saturating_sub(at).max(1) * 1000);
    }
    StatusCode::NO_CONTENT
}

/// A running receiver; `finish` stops it and returns what it saw.
pub struct Receiver {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(addr: &str, secret: &str) -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let rx = Rx { secret: secret.into(), seen: Arc::default() };
        let seen = rx.seen.clone();
        let app = axum::Router::new().fallback(axum::routing::post(hook)).with_state(rx);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the webhook receiver stopped");
            }
        });
        Ok(Receiver { seen, task })
    }

    pub fn finish(self) -> WebhookSummary {
        self.task.abort();
        let seen = self.seen.lock().expect("receiver lock");
        WebhookSummary {
            received: seen.received,
            bad_signatures: seen.bad_signatures,
            by_type: seen.by_type.clone(),
            telemetry_to_webhook_ms: seen.latency.as_ref().map(percentiles).unwrap_or_default(),
        }
    }
}

//! Commands in the simulation: a creator issues commands through the gRPC API at a fixed rate
//! (open loop, to random simulated orbs), and each simulated orb receives its commands on
//! `commands/{t}/{o}` and acknowledges them (`commands/{t}/{o}/ack`, `succeeded`). Each
//! command carries a simulator id in its payload, registered before the create call, so a
//! command delivered before the API's answer is still measured.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tonic::Request;

use super::{Percentiles, new_histogram, orb_id, percentiles, stopped};
use crate::net::grpc::pb;
use pb::command_service_client::CommandServiceClient;

/// Create calls in flight at once.
const CREATES_IN_FLIGHT_MAX: usize = 64;

/// What the command traffic of a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CommandSummary {
    pub rate_per_s: f64,
    /// Create calls the API answered with a command.
    pub created: u64,
    /// Create calls refused or failed (transport or API errors).
    pub create_failures: u64,
    /// Commands received by their simulated orb.
    pub delivered: u64,
    /// Acknowledgements of commands (`succeeded`) the server acknowledged in turn.
    pub acked: u64,
    /// Intended create time -> the orb receives the command.
    pub delivery_ms: Percentiles,
    /// Intended create time -> the server acknowledged the orb's `succeeded` (the command is
    /// durably complete).
    pub round_trip_ms: Percentiles,
}

/// Shared between the creator and the orbs.
pub struct Tracker {
    rate_per_s: f64,
    next_id: AtomicU64,
    /// Simulator id -> intended create time, until the round trip is complete.
    started: Mutex<HashMap<u64, Instant>>,
    /// Orbs connected and subscribed to their commands (indexes), the creator's targets.
    ready: Mutex<Vec<usize>>,
    delivery: Mutex<Histogram<u64>>,
    round_trip: Mutex<Histogram<u64>>,
    created: AtomicU64,
    create_failures: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
}

/// A command as an orb receives it: what it needs to acknowledge and measure it.
#[derive(Debug)]
pub struct Received {
    /// The PUBLISH's packet id (QoS 1: the orb sends the PUBACK).
    pub pkid: u16,
    pub command_id: String,
    pub sim_id: Option<u64>,
}

impl Tracker {
    pub fn new(rate_per_s: f64) -> Tracker {
        Tracker {
            rate_per_s,
            next_id: AtomicU64::new(1),
            started: Mutex::new(HashMap::new()),
            ready: Mutex::new(Vec::new()),
            delivery: Mutex::new(new_histogram()),
            round_trip: Mutex::new(new_histogram()),
            created: AtomicU64::new(0),
            create_failures: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
        }
    }

    /// Orb `i` is connected and subscribed to its commands.
    pub fn ready(&self, i: usize) {
        self.ready.lock().expect("tracker lock").push(i);
    }

    /// An orb received a command PUBLISH (`payload` as sent by the platform).
    pub fn received(&self, pkid: u16, payload: &[u8]) -> Option<Received> {
        let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let command_id = v["command_id"].as_str()?.to_string();
        let sim_id = v["payload"]["sim_id"].as_u64();
        if let Some(id) = sim_id
            && let Some(at) = self.started.lock().expect("tracker lock").get(&id).copied()
        {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            record(&self.delivery, at);
        }
        Some(Received { pkid, command_id, sim_id })
    }

    /// The server acknowledged an orb's `succeeded` for the command `sim_id`.
    pub fn acked(&self, sim_id: u64) {
        if let Some(at) = self.started.lock().expect("tracker lock").remove(&sim_id) {
            self.acked.fetch_add(1, Ordering::Relaxed);
            record(&self.round_trip, at);
        }
    }

    pub fn summary(&self) -> CommandSummary {
        CommandSummary {
            rate_per_s: self.rate_per_s,
            created: self.created.load(Ordering::Relaxed),
            create_failures: self.create_failures.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            delivery_ms: percentiles(&self.delivery.lock().expect("histogram lock")),
            round_trip_ms: percentiles(&self.round_trip.lock().expect("histogram lock")),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, since: Instant) {
    let us = (since.elapsed().as_micros() as u64).max(1);
    let _ = h.lock().expect("histogram lock").record(us);
}

/// The acknowledgement an orb publishes for a received command.
pub fn ack_payload(command_id: &str) -> Vec<u8> {
    serde_json::json!({"command_id": command_id, "status": "succeeded", "detail": "sim"}).to_string().into_bytes()
}

/// Creates commands at the tracker's rate from `start` until `end` (or until `stop` turns
/// true), each for a random orb among those connected and subscribed (a tick with none is
/// skipped); at most [`CREATES_IN_FLIGHT_MAX`] create calls wait for their answer.
#[allow(clippy::too_many_arguments)]
pub async fn create_loop(
    addr: &str,
    token: Option<&str>,
    tenant: &str,
    prefix: &str,
    tracker: &std::sync::Arc<Tracker>,
    start: Instant,
    end: Instant,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => match e.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(addr, error = %e, "cannot reach the gRPC API: no commands");
                return;
            }
        },
        Err(e) => {
            tracing::error!(addr, error = %e, "bad gRPC address: no commands");
            return;
        }
    };
    let client = CommandServiceClient::new(channel);
    let bearer: Option<tonic::metadata::MetadataValue<_>> = token.and_then(|t| format!("Bearer {t}").parse().ok());
    let interval = Duration::from_secs_f64(1.0 / tracker.rate_per_s.max(1e-3));
    let mut next = start;
    let mut calls = tokio::task::JoinSet::new();
    let stopped = stopped(stop.as_mut());
    tokio::pin!(stopped);
    while next < end {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut stopped => break,
        }
        let intended = next;
        next += interval;
        while calls.len() >= CREATES_IN_FLIGHT_MAX {
            calls.join_next().await;
        }
        let target = {
            let ready = tracker.ready.lock().expect("tracker lock");
            (!ready.is_empty()).then(|| ready[fastrand::usize(..ready.len())])
        };
        let Some(target) = target else { continue };
        let sim_id = tracker.next_id.fetch_add(1, Ordering::Relaxed);
        tracker.started.lock().expect("tracker lock").insert(sim_id, intended);
        let mut req = Request::new(pb::CreateCommandRequest {
            tenant_id: tenant.to_string(),
            orb_id: orb_id(prefix, target),
            command_type: "sim.ping".into(),
            payload_json: serde_json::json!({"sim_id": sim_id}).to_string(),
            expiry_ts: None,
            timeout_s: None,
            idempotency_key: String::new(),
            supersede: false,
        });
        req.set_timeout(Duration::from_secs(10));
        if let Some(b) = &bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        let (mut client, tracker) = (client.clone(), tracker.clone());
        calls.spawn(async move {
            match client.create_command(req).await {
                Ok(_) => tracker.created.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::debug!(error = %e, "command not created");
                    tracker.started.lock().expect("tracker lock").remove(&sim_id);
                    tracker.create_failures.fetch_add(1, Ordering::Relaxed)
                }
            };
        });
    }
    while calls.join_next().await.is_some() {}
}

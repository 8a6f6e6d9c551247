//! The telemetry write path shared by MQTT and the HTTP fallback: validate, make durable,
//! then update the orb's live state. One implementation so both doors mean the same thing
//! by "acknowledged".

use std::sync::Arc;

use crate::actors::Fleet;
use crate::broker::{Broker, Message, Props};
use crate::clock::Clock;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::model::{OrbKey, TelemetryPoint, telemetry};
use crate::storage::{Batch, Outcome, Store};

/// What the write path needs.
pub struct Ingest {
    /// The tenant-scoped MQTT broker: durable platform messages are routed to its subscribers.
    pub broker: Arc<Broker>,
    pub fleet: Fleet,
    pub store: Store,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub max_payload_bytes: usize,
}

impl Ingest {
    /// Parses and validates a raw payload; refusals are counted and reported to the orb.
    pub fn parse(&self, key: &OrbKey, payload: &[u8]) -> Result<TelemetryPoint, ApiError> {
        telemetry::parse(payload, self.clock.now_ms(), self.max_payload_bytes).map_err(|e| {
            let err = ApiError::new(e.code(), e.to_string());
            self.refuse(key, &err);
            err
        })
    }

    /// Counts a refusal and makes it visible on the orb.
    pub fn refuse(&self, key: &OrbKey, err: &ApiError) {
        self.metrics.refused(err.code);
        self.fleet.refused(key, err.code, err.message.clone());
    }

    /// Makes a validated point durable and then applies it to the live state. `raw` is the
    /// payload as received (it names the point when it carries no `msg_id`).
    pub async fn store(&self, key: &OrbKey, point: TelemetryPoint, raw: &[u8]) -> Result<Outcome, ApiError> {
        let mut batch = Batch::new();
        Store::add_telemetry(&mut batch, key, &point, self.clock.now_ms(), raw);
        let outcome = self.store.commit(batch).await.map_err(|e| {
            tracing::error!(orb = %key, error = %e, "telemetry commit failed");
            ApiError::new(ErrorCode::Unavailable, "telemetry could not be made durable")
        })?;
        match outcome {
            Outcome::Stored => {
                self.metrics.telemetry_stored.inc();
                self.fleet.telemetry(key, Arc::new(point)).await;
                self.forward(key, "telemetry", raw).await;
            }
            Outcome::Duplicate => self.metrics.telemetry_duplicates.inc(),
        }
        Ok(outcome)
    }

    /// Routes a durable platform message (`{kind}/{tenant}/{orb}`) to the tenant's MQTT
    /// subscribers of its topic, at QoS 1 (the platform acknowledged it); copies for
    /// persistent sessions are durable before the device's acknowledgement. The message itself
    /// is already durable, so a failure to queue a copy is logged, not reported to the device.
    pub async fn forward(&self, key: &OrbKey, kind: &str, raw: &[u8]) {
        if !self.broker.has_subscribers(&key.tenant) {
            return;
        }
        let msg = Message {
            topic: format!("{kind}/{}/{}", key.tenant, key.orb),
            payload: ntex::util::Bytes::copy_from_slice(raw),
            qos: 1,
            retain: false,
            props: Props::default(),
            origin: 0,
        };
        if let Err(e) = self.broker.route(&key.tenant, &Arc::new(msg)).await {
            tracing::warn!(orb = %key, error = %e, "platform message not queued for subscribers");
        }
    }
}

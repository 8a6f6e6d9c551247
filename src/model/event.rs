//! Tenant events: what happened to an orb, in one envelope shared by the event log, the
//! event stream (SSE, gRPC) and webhook bodies.

use serde::{Deserialize, Serialize};

use super::TenantId;

/// Every event type, as webhooks subscribe to them and streams filter them.
pub const EVENT_TYPES: [&str; 11] = [
    "orb.alert.triggered",
    "orb.alert.acknowledged",
    "orb.alert.resolved",
    "orb.alert.assigned",
    "orb.alert.commented",
    "orb.command.status",
    "orb.presence.online",
    "orb.presence.offline",
    "orb.registered",
    "orb.attributes.updated",
    "orb.decommissioned",
];

/// One event as the log keeps it. `seq` is the event id: per tenant, increasing, never reused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub tenant: TenantId,
    pub seq: u64,
    pub event_type: String,
    pub orb: String,
    pub occurred_ms: u64,
    /// The envelope every consumer receives, as compact JSON:
    /// `{"event_id", "type", "tenant_id", "orb_id", "occurred_ms", "data"}`.
    pub body: String,
}

impl Event {
    pub fn new(
        tenant: TenantId,
        seq: u64,
        event_type: &str,
        orb: &str,
        occurred_ms: u64,
        data: serde_json::Value,
    ) -> Event {
        let body = serde_json::json!({
            "event_id": seq.to_string(),
            "type": event_type,
            "tenant_id": tenant,
            "orb_id": orb,
            "occurred_ms": occurred_ms,
            "data": data,
        })
        .to_string();
        Event { tenant, seq, event_type: event_type.to_string(), orb: orb.to_string(), occurred_ms, body }
    }

    /// The id clients resume from.
    pub fn event_id(&self) -> String {
        self.seq.to_string()
    }
}

/// Parses an event id as clients send it back (`after`, `Last-Event-ID`).
pub fn parse_event_id(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| format!("event id {s:?} is not an event id (a decimal number)"))
}

/// Validates a list of event types (a stream filter or a webhook subscription).
pub fn check_types(types: &[String]) -> Result<(), String> {
    match types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
        Some(t) => Err(format!("unknown event type {t:?}; types: {}", EVENT_TYPES.join(" "))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_carries_the_id_and_the_data() {
        let e = Event::new(
            TenantId::parse("acme").unwrap(),
            42,
            "orb.presence.online",
            "orb-1",
            7,
            serde_json::json!({"online": true}),
        );
        let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
        assert_eq!(v["event_id"], "42");
        assert_eq!(v["type"], "orb.presence.online");
        assert_eq!(v["tenant_id"], "acme");
        assert_eq!(v["orb_id"], "orb-1");
        assert_eq!(v["data"]["online"], true);
        assert_eq!(e.event_id(), "42");
    }

    #[test]
    fn ids_and_types_are_checked() {
        assert_eq!(parse_event_id(" 17 "), Ok(17));
        assert!(parse_event_id("abc").unwrap_err().contains("not an event id"));
        assert!(check_types(&["orb.command.status".into()]).is_ok());
        assert!(check_types(&["orb.nope".into()]).unwrap_err().contains("orb.nope"));
    }
}

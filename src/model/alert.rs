//! Alerts (one open alert per rule and orb; open -> acknowledged -> resolved), webhook
//! subscriptions and their deliveries: plain data, the signature and the retry schedule.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::rule::Severity;
use super::{OrbId, TenantId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertState {
    pub fn parse(s: &str) -> Option<AlertState> {
        match s {
            "open" => Some(AlertState::Open),
            "acknowledged" => Some(AlertState::Acknowledged),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub tenant: TenantId,
    /// Sortable by opening time: 12 hex digits of ms then 8 random.
    pub alert_id: String,
    pub rule_id: String,
    pub rule_name: String,
    pub orb: OrbId,
    pub severity: Severity,
    pub state: AlertState,
    pub opened_ms: u64,
    pub updated_ms: u64,
    pub resolved_ms: Option<u64>,
    /// `rule` (the clear condition held) or `operator`.
    pub resolved_by: Option<String>,
    /// Observations that matched again while it was open.
    pub repeats: u64,
    /// The orb's values when it fired (compact JSON).
    pub values: String,
    /// Who works on it (free text: a person, a team, an on-call rotation).
    pub assignee: Option<String>,
    /// Operator notes, oldest first, at most `ALERT_COMMENTS_MAX`.
    pub comments: Vec<Comment>,
}

/// Comments one alert keeps.
pub const ALERT_COMMENTS_MAX: usize = 100;
/// Longest comment, in bytes.
pub const COMMENT_LEN_MAX: usize = 2_000;

/// An operator's note on an alert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comment {
    /// The API token id (or `root`, `dev`) that wrote it.
    pub author: String,
    pub text: String,
    pub at_ms: u64,
}

/// Checks an assignee as an operator sends it.
pub fn check_assignee(a: &str) -> Result<(), String> {
    if a.trim().is_empty() || a.len() > 128 || a.chars().any(char::is_control) {
        return Err("assignee must be 1..128 bytes without control characters (empty to unassign: null)".into());
    }
    Ok(())
}

/// Checks a comment's text.
pub fn check_comment(text: &str) -> Result<(), String> {
    if text.trim().is_empty() || text.len() > COMMENT_LEN_MAX {
        return Err(format!("comment text must be 1..{COMMENT_LEN_MAX} bytes"));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err("comment text may hold newlines and tabs but no other control characters".into());
    }
    Ok(())
}

impl Alert {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "alert_id": self.alert_id,
            "tenant_id": self.tenant,
            "rule_id": self.rule_id,
            "rule_name": self.rule_name,
            "orb_id": self.orb,
            "severity": self.severity.as_str(),
            "state": self.state.as_str(),
            "opened_ms": self.opened_ms,
            "updated_ms": self.updated_ms,
            "resolved_ms": self.resolved_ms,
            "resolved_by": self.resolved_by,
            "repeats": self.repeats,
            "values": serde_json::from_str::<serde_json::Value>(&self.values).unwrap_or(serde_json::Value::Null),
            "assignee": self.assignee,
            "comments": self.comments.iter().map(|c| serde_json::json!({
                "author": c.author, "text": c.text, "at_ms": c.at_ms,
            })).collect::<Vec<_>>(),
        })
    }

    /// Sets or clears the assignee; a resolved alert is closed to assignment.
    pub fn assign(&mut self, assignee: Option<String>, now_ms: u64) -> Result<(), String> {
        if self.state == AlertState::Resolved {
            return Err(format!("alert {} is resolved; it takes no assignee", self.alert_id));
        }
        self.assignee = assignee;
        self.updated_ms = now_ms;
        Ok(())
    }

    /// Adds a comment (also to resolved alerts: post-mortem notes).
    pub fn comment(&mut self, author: &str, text: &str, now_ms: u64) -> Result<(), String> {
        if self.comments.len() >= ALERT_COMMENTS_MAX {
            return Err(format!("alert {} has {ALERT_COMMENTS_MAX} comments, the most it keeps", self.alert_id));
        }
        self.comments.push(Comment { author: author.to_string(), text: text.to_string(), at_ms: now_ms });
        self.updated_ms = now_ms;
        Ok(())
    }

    /// Operator acknowledgement: only an open alert can be acknowledged.
    pub fn acknowledge(&mut self, now_ms: u64) -> Result<(), String> {
        match self.state {
            AlertState::Open => {
                self.state = AlertState::Acknowledged;
                self.updated_ms = now_ms;
                Ok(())
            }
            s => Err(format!("alert {} is {}, only an open alert can be acknowledged", self.alert_id, s.as_str())),
        }
    }

    /// Resolution by the rule or an operator; resolving twice is refused.
    pub fn resolve(&mut self, by: &str, now_ms: u64) -> Result<(), String> {
        if self.state == AlertState::Resolved {
            return Err(format!("alert {} is resolved already", self.alert_id));
        }
        self.state = AlertState::Resolved;
        self.updated_ms = now_ms;
        self.resolved_ms = Some(now_ms);
        self.resolved_by = Some(by.to_string());
        Ok(())
    }
}

/// A webhook subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub tenant: TenantId,
    pub webhook_id: String,
    pub url: String,
    pub events: Vec<String>,
    /// The HMAC key; never shown again after creation.
    pub secret: String,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Deliveries in flight at once (each for a different orb).
    pub concurrency: u32,
    pub created_ms: u64,
    /// For an https URL: the CA certificates (PEM) to trust instead of the public roots.
    pub ca_pem: Option<String>,
}

impl Webhook {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "webhook_id": self.webhook_id,
            "tenant_id": self.tenant,
            "url": self.url,
            "events": self.events,
            "max_attempts": self.max_attempts,
            "concurrency": self.concurrency,
            "created_ms": self.created_ms,
            "ca_pem": self.ca_pem,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

/// One event for one webhook. Pending deliveries live in the outbox in sequence order; the
/// finished ones are kept in the delivery log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub tenant: TenantId,
    pub webhook_id: String,
    pub seq: u64,
    /// The orb the event is about: deliveries of one orb are sent one at a time, in order.
    pub orb: String,
    pub event_type: String,
    pub body: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

impl Delivery {
    pub fn to_json(&self) -> serde_json::Value {
        let state = match self.state {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        };
        serde_json::json!({
            "seq": self.seq,
            "orb_id": self.orb,
            "event_type": self.event_type,
            "state": state,
            "attempts": self.attempts,
            "next_attempt_ms": self.next_attempt_ms,
            "last_error": self.last_error,
            "created_ms": self.created_ms,
            "finished_ms": self.finished_ms,
            "body": serde_json::from_str::<serde_json::Value>(&self.body).unwrap_or(serde_json::Value::Null),
        })
    }
}

/// `sha256=<hex HMAC-SHA256 of "timestamp.body">`, the `X-Orbmanager-Signature` header.
pub fn signature(secret: &str, timestamp: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delay before attempt `attempt + 1` after `attempt` failures: exponential from 500 ms,
/// capped at 60 s, with jitter in [half, full] (`jitter` in 0..=1).
pub fn backoff_ms(attempt: u32, jitter: f64) -> u64 {
    let full = 500u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(60_000);
    let half = full / 2;
    half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Reference value computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            signature("s3cret", 1_700_000_000, r#"{"a":1}"#),
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
        assert_ne!(signature("other", 1_700_000_000, r#"{"a":1}"#), signature("s3cret", 1_700_000_000, r#"{"a":1}"#));
        assert_ne!(signature("s3cret", 1_700_000_001, r#"{"a":1}"#), signature("s3cret", 1_700_000_000, r#"{"a":1}"#));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        assert_eq!(backoff_ms(1, 1.0), 500);
        assert_eq!(backoff_ms(2, 1.0), 1_000);
        assert_eq!(backoff_ms(3, 0.0), 1_000);
        assert_eq!(backoff_ms(30, 1.0), 60_000);
        assert_eq!(backoff_ms(30, 0.0), 30_000);
    }

    #[test]
    fn alerts_move_forward_only() {
        let mut a = Alert {
            tenant: TenantId::parse("acme").unwrap(),
            alert_id: "a".into(),
            rule_id: "r".into(),
            rule_name: "low".into(),
            orb: OrbId::parse("o").unwrap(),
            severity: Severity::Major,
            state: AlertState::Open,
            opened_ms: 1,
            updated_ms: 1,
            resolved_ms: None,
            resolved_by: None,
            repeats: 0,
            values: "{}".into(),
            assignee: None,
            comments: Vec::new(),
        };
        a.assign(Some("ops-team".into()), 2).unwrap();
        a.comment("tok-1", "looking", 2).unwrap();
        a.acknowledge(2).unwrap();
        assert!(a.acknowledge(3).is_err());
        a.resolve("operator", 4).unwrap();
        assert_eq!(
            (a.state, a.resolved_ms, a.resolved_by.as_deref()),
            (AlertState::Resolved, Some(4), Some("operator"))
        );
        assert!(a.resolve("rule", 5).is_err());
        assert!(a.acknowledge(6).is_err());
        assert!(a.assign(None, 7).unwrap_err().contains("resolved"));
        assert_eq!(a.assignee.as_deref(), Some("ops-team"));
        a.comment("tok-1", "root cause: worn cell", 8).unwrap();
        assert_eq!(a.comments.len(), 2);
        for i in 2..ALERT_COMMENTS_MAX {
            a.comment("tok-1", &format!("note {i}"), 9).unwrap();
        }
        assert!(a.comment("tok-1", "one more", 10).unwrap_err().contains("most it keeps"));
        assert!(check_comment("").is_err() && check_comment("a\u{7}b").is_err() && check_comment("a\nb").is_ok());
        assert!(check_assignee("x\u{0}").is_err() && check_assignee("on-call").is_ok());
    }
}

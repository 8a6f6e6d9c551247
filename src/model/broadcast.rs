//! Broadcasts: one command fanned out to many orbs as individually tracked per-orb commands,
//! at a bounded rate, aborted when too many fail (AWS IoT Jobs' abort semantics).

use serde::{Deserialize, Serialize};

use super::command::{CommandStatus, CreateRequest, ValidCreate};
use super::ids::{OrbId, TenantId};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{BROADCAST_ORB_IDS_MAX, BROADCAST_RATE_MAX_PER_S};

/// When to give up: once `min_samples` commands finished, if at least `failure_pct` percent of
/// the finished ones failed, were rejected or timed out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbortPolicy {
    pub failure_pct: f64,
    pub min_samples: u64,
}

/// The request as received.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    pub command_type: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    pub expiry_ts: Option<u64>,
    pub timeout_s: Option<u64>,
    /// The targets: a list of orb ids ...
    pub orb_ids: Option<Vec<String>>,
    /// ... or every registered orb of the tenant.
    #[serde(default)]
    pub all_orbs: bool,
    /// Orbs per second (default 1,000).
    pub rate_per_s: Option<u32>,
    pub abort: Option<AbortPolicy>,
}

/// Who a broadcast is for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Target {
    Orbs(Vec<OrbId>),
    AllOrbs,
}

/// Where a broadcast is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastStatus {
    /// Fanning out.
    Running,
    /// Every target has its command.
    Completed,
    /// Stopped by its abort policy; undelivered commands canceled.
    Aborted,
    /// Stopped by an operator; undelivered commands canceled.
    Canceled,
}

impl BroadcastStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BroadcastStatus::Running => "running",
            BroadcastStatus::Completed => "completed",
            BroadcastStatus::Aborted => "aborted",
            BroadcastStatus::Canceled => "canceled",
        }
    }
}

/// The mutable record of a broadcast (its target list is stored once, apart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Broadcast {
    pub id: String,
    pub tenant: TenantId,
    pub command_type: String,
    pub payload: String,
    pub expiry_ts: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub all_orbs: bool,
    pub rate_per_s: u32,
    pub abort: Option<AbortPolicy>,
    pub status: BroadcastStatus,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub reason: Option<String>,
    /// Targets handed to fan-out so far (list index, or orbs of the registry walked).
    pub fanned_out: u64,
    /// For `all_orbs`: the last orb id handed to fan-out.
    pub cursor: Option<String>,
    /// Number of targets (for `all_orbs`, the registry size at creation).
    pub total: u64,
}

impl BroadcastRequest {
    /// Validates the request; returns the record (without id, status and total) and the list.
    pub fn validate(self, tenant: TenantId, now_ms: u64) -> Result<(Broadcast, Target), ApiError> {
        let template = CreateRequest {
            command_type: self.command_type,
            payload: self.payload,
            expiry_ts: self.expiry_ts,
            timeout_s: self.timeout_s,
            idempotency_key: None,
            supersede: false,
        }
        .validate(now_ms)?;
        let target = match (self.orb_ids, self.all_orbs) {
            (Some(_), true) => return Err(invalid("give orb_ids or all_orbs, not both")),
            (None, false) => return Err(invalid("give the targets: orb_ids or all_orbs")),
            (None, true) => Target::AllOrbs,
            (Some(ids), false) => {
                if ids.is_empty() || ids.len() > BROADCAST_ORB_IDS_MAX {
                    return Err(invalid(format!(
                        "orb_ids holds 1..{BROADCAST_ORB_IDS_MAX} ids; use all_orbs for more"
                    )));
                }
                let mut parsed = Vec::with_capacity(ids.len());
                for (i, id) in ids.iter().enumerate() {
                    parsed.push(OrbId::parse(id).map_err(|e| invalid(format!("orb_ids[{i}]: {e}")))?);
                }
                let mut seen = std::collections::HashSet::new();
                if let Some(dup) = parsed.iter().find(|o| !seen.insert(*o)) {
                    return Err(invalid(format!("orb_ids lists {dup} twice")));
                }
                Target::Orbs(parsed)
            }
        };
        let rate = self.rate_per_s.unwrap_or(1_000);
        if rate == 0 || rate > BROADCAST_RATE_MAX_PER_S {
            return Err(invalid(format!("rate_per_s must be 1..{BROADCAST_RATE_MAX_PER_S}")));
        }
        if let Some(a) = &self.abort
            && (!(a.failure_pct > 0.0 && a.failure_pct <= 100.0) || a.min_samples == 0)
        {
            return Err(invalid("abort needs failure_pct in (0, 100] and min_samples >= 1"));
        }
        let total = match &target {
            Target::Orbs(ids) => ids.len() as u64,
            Target::AllOrbs => 0,
        };
        let b = Broadcast {
            id: String::new(),
            tenant,
            command_type: template.command_type,
            payload: template.payload,
            expiry_ts: template.expiry_ts,
            timeout_ms: template.timeout_ms,
            all_orbs: matches!(target, Target::AllOrbs),
            rate_per_s: rate,
            abort: self.abort,
            status: BroadcastStatus::Running,
            created_ms: now_ms,
            finished_ms: None,
            reason: None,
            fanned_out: 0,
            cursor: None,
            total,
        };
        Ok((b, target))
    }
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

impl Broadcast {
    /// The per-orb command request; the idempotency key makes a resumed fan-out create each
    /// orb's command once.
    pub fn command_request(&self) -> ValidCreate {
        let key = format!("bc-{}", self.id);
        ValidCreate {
            command_type: self.command_type.clone(),
            payload: self.payload.clone(),
            expiry_ts: self.expiry_ts,
            timeout_ms: self.timeout_ms,
            body_hash: crate::model::ids::hash64(key.as_bytes()),
            idempotency_key: Some(key),
            supersede: false,
            broadcast_id: Some(self.id.clone()),
        }
    }
}

/// Counts of a broadcast's commands per state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts(pub [u64; CommandStatus::ALL.len()]);

impl Counts {
    fn idx(s: CommandStatus) -> usize {
        CommandStatus::ALL.iter().position(|x| *x == s).expect("every status is in ALL")
    }

    pub fn moved(&mut self, from: Option<CommandStatus>, to: CommandStatus) {
        if let Some(f) = from {
            self.0[Self::idx(f)] = self.0[Self::idx(f)].saturating_sub(1);
        }
        self.0[Self::idx(to)] += 1;
    }

    pub fn get(&self, s: CommandStatus) -> u64 {
        self.0[Self::idx(s)]
    }

    /// Finished commands, and of those the failures (failed, rejected, timed out).
    pub fn finished_and_failed(&self) -> (u64, u64) {
        let failed = [CommandStatus::Failed, CommandStatus::Rejected, CommandStatus::TimedOut]
            .iter()
            .map(|s| self.get(*s))
            .sum();
        let finished = failed + [CommandStatus::Succeeded].iter().map(|s| self.get(*s)).sum::<u64>();
        (finished, failed)
    }

    /// Whether `policy` says to abort now.
    pub fn should_abort(&self, policy: &AbortPolicy) -> bool {
        let (finished, failed) = self.finished_and_failed();
        finished >= policy.min_samples && (failed as f64) * 100.0 >= policy.failure_pct * finished as f64
    }

    pub fn to_json(&self) -> serde_json::Value {
        let m: serde_json::Map<String, serde_json::Value> =
            CommandStatus::ALL.iter().map(|s| (s.as_str().to_string(), self.get(*s).into())).collect();
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> BroadcastRequest {
        BroadcastRequest {
            command_type: "update".into(),
            payload: serde_json::json!({}),
            expiry_ts: None,
            timeout_s: None,
            orb_ids: Some(vec!["a".into(), "b".into()]),
            all_orbs: false,
            rate_per_s: None,
            abort: Some(AbortPolicy { failure_pct: 50.0, min_samples: 4 }),
        }
    }

    #[test]
    fn validation() {
        let t = TenantId::parse("acme").unwrap();
        let (b, target) = req().validate(t.clone(), 1).unwrap();
        assert_eq!((b.total, b.rate_per_s), (2, 1_000));
        assert!(matches!(target, Target::Orbs(ref v) if v.len() == 2));
        let mut r = req();
        r.orb_ids = Some(vec!["a".into(), "a".into()]);
        assert!(r.validate(t.clone(), 1).unwrap_err().message.contains("twice"));
        let mut r = req();
        r.all_orbs = true;
        assert!(r.validate(t.clone(), 1).is_err());
        let mut r = req();
        r.orb_ids = Some(vec!["x/y".into()]);
        assert!(r.validate(t.clone(), 1).unwrap_err().message.contains("orb_ids[0]"));
        let mut r = req();
        r.rate_per_s = Some(0);
        assert!(r.validate(t, 1).is_err());
    }

    #[test]
    fn abort_after_min_samples_at_the_threshold() {
        let policy = AbortPolicy { failure_pct: 50.0, min_samples: 4 };
        let mut c = Counts::default();
        for _ in 0..3 {
            c.moved(None, CommandStatus::Failed);
        }
        assert!(!c.should_abort(&policy), "3 finished < min_samples");
        c.moved(None, CommandStatus::Succeeded);
        assert!(c.should_abort(&policy), "3 of 4 failed");
        let mut ok = Counts::default();
        for s in [CommandStatus::Succeeded, CommandStatus::Succeeded, CommandStatus::Succeeded, CommandStatus::TimedOut]
        {
            ok.moved(None, s);
        }
        assert!(!ok.should_abort(&policy), "1 of 4 failed");
    }

    #[test]
    fn counts_move_between_states() {
        let mut c = Counts::default();
        c.moved(None, CommandStatus::Queued);
        c.moved(Some(CommandStatus::Queued), CommandStatus::Succeeded);
        assert_eq!((c.get(CommandStatus::Queued), c.get(CommandStatus::Succeeded)), (0, 1));
    }
}

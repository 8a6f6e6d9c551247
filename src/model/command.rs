//! Commands: the request an operator makes, the record of its lifecycle, and the per-orb queue
//! that decides every transition, purely.
//!
//! Lifecycle: QUEUED -> SENT -> DELIVERED (the device's MQTT PUBACK) -> IN_PROGRESS ->
//! SUCCEEDED | FAILED | REJECTED, plus EXPIRED, TIMED_OUT, CANCELED and SUPERSEDED. A device
//! acknowledgement may skip ahead (a device can report success before its PUBACK was seen).
//! Terminal states are final: late and duplicate acknowledgements change nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};
use crate::limits::{
    COMMAND_ACK_DETAIL_LEN_MAX, COMMAND_PAYLOAD_MAX_BYTES, COMMAND_TIMEOUT_MAX_S, COMMAND_TYPE_LEN_MAX,
    COMMANDS_PENDING_MAX, IDEMPOTENCY_KEY_LEN_MAX,
};
use crate::model::ids::hash64;

/// Where a command is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandStatus {
    Queued,
    Sent,
    Delivered,
    InProgress,
    Succeeded,
    Failed,
    Rejected,
    Expired,
    TimedOut,
    Canceled,
    Superseded,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 11] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Delivered,
        CommandStatus::InProgress,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Rejected,
        CommandStatus::Expired,
        CommandStatus::TimedOut,
        CommandStatus::Canceled,
        CommandStatus::Superseded,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            CommandStatus::Queued | CommandStatus::Sent | CommandStatus::Delivered | CommandStatus::InProgress
        )
    }

    /// Not yet taken up by the device: still to be (re)delivered.
    pub fn awaiting_device(self) -> bool {
        matches!(self, CommandStatus::Queued | CommandStatus::Sent | CommandStatus::Delivered)
    }

    /// Progress order for merging observations: terminal states rank highest and equal.
    pub fn rank(self) -> u8 {
        match self {
            CommandStatus::Queued => 0,
            CommandStatus::Sent => 1,
            CommandStatus::Delivered => 2,
            CommandStatus::InProgress => 3,
            _ => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Delivered => "delivered",
            CommandStatus::InProgress => "in_progress",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Rejected => "rejected",
            CommandStatus::Expired => "expired",
            CommandStatus::TimedOut => "timed_out",
            CommandStatus::Canceled => "canceled",
            CommandStatus::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<CommandStatus> {
        CommandStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One recorded transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub status: CommandStatus,
    pub at_ms: u64,
    pub reason: Option<String>,
}

/// A command and its history, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub command_id: String,
    pub seq: u64,
    pub command_type: String,
    /// Compact JSON.
    pub payload: String,
    pub created_ms: u64,
    pub expiry_ts: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub supersede: bool,
    pub status: CommandStatus,
    pub history: Vec<Transition>,
    /// Times the command was handed to a device.
    pub attempts: u32,
    pub in_progress_ms: Option<u64>,
    /// The broadcast this command was fanned out from.
    pub broadcast_id: Option<String>,
}

impl Command {
    /// The next time something must happen to this command on its own (expiry or timeout).
    pub fn deadline(&self) -> Option<u64> {
        match self.status {
            s if s.awaiting_device() => self.expiry_ts,
            CommandStatus::InProgress => self.in_progress_ms.zip(self.timeout_ms).map(|(t, d)| t.saturating_add(d)),
            _ => None,
        }
    }

    /// For an expired or timed-out command, the deadline that fired.
    pub fn fired_deadline(&self) -> Option<u64> {
        match self.status {
            CommandStatus::Expired => self.expiry_ts,
            CommandStatus::TimedOut => self.in_progress_ms.zip(self.timeout_ms).map(|(t, d)| t.saturating_add(d)),
            _ => None,
        }
    }

    fn set(&mut self, status: CommandStatus, now_ms: u64, reason: Option<String>) {
        self.status = status;
        self.history.push(Transition { status, at_ms: now_ms, reason });
    }

    /// What the device receives on `commands/{tenant}/{orb}`.
    pub fn wire(&self) -> Vec<u8> {
        let payload: serde_json::Value = serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "command_id": self.command_id,
            "seq": self.seq,
            "command_type": self.command_type,
            "payload": payload,
            "expiry_ts": self.expiry_ts,
        })
        .to_string()
        .into_bytes()
    }

    /// The API view.
    pub fn to_json(&self) -> serde_json::Value {
        let payload: serde_json::Value = serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null);
        let history: Vec<serde_json::Value> = self
            .history
            .iter()
            .map(|t| serde_json::json!({"status": t.status.as_str(), "at_ms": t.at_ms, "reason": t.reason}))
            .collect();
        serde_json::json!({
            "command_id": self.command_id,
            "seq": self.seq,
            "command_type": self.command_type,
            "payload": payload,
            "status": self.status.as_str(),
            "created_ms": self.created_ms,
            "expiry_ts": self.expiry_ts,
            "timeout_s": self.timeout_ms.map(|t| t / 1000),
            "idempotency_key": self.idempotency_key,
            "supersede": self.supersede,
            "attempts": self.attempts,
            "broadcast_id": self.broadcast_id,
            "history": history,
        })
    }
}

/// `command_id`s carry their sequence number (`cmd-<seq hex>-<random>`), so an acknowledgement
/// finds its command without an index; the random part makes ids unguessable.
pub fn new_command_id(seq: u64) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("operating system random source failed");
    let mut s = format!("cmd-{seq:x}-");
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The sequence number inside a `command_id`.
pub fn seq_of(command_id: &str) -> Option<u64> {
    let rest = command_id.strip_prefix("cmd-")?;
    let (seq, _) = rest.split_once('-')?;
    u64::from_str_radix(seq, 16).ok()
}

/// An operator's request, as received.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub command_type: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    pub expiry_ts: Option<u64>,
    pub timeout_s: Option<u64>,
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub supersede: bool,
}

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidCreate {
    pub command_type: String,
    pub payload: String,
    pub expiry_ts: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub supersede: bool,
    /// Hash of everything but the idempotency key: "the same body".
    pub body_hash: u64,
    pub broadcast_id: Option<String>,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

fn id_like(field: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.is_empty()
        || s.len() > max
        || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(invalid(format!("{field} must be 1..{max} bytes of A-Z a-z 0-9 - _ . :")));
    }
    Ok(())
}

impl CreateRequest {
    pub fn validate(self, now_ms: u64) -> Result<ValidCreate, ApiError> {
        id_like("command_type", &self.command_type, COMMAND_TYPE_LEN_MAX)?;
        if let Some(k) = &self.idempotency_key {
            id_like("idempotency_key", k, IDEMPOTENCY_KEY_LEN_MAX)?;
        }
        let payload = self.payload.to_string();
        if payload.len() > COMMAND_PAYLOAD_MAX_BYTES {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("payload is {} bytes of JSON; the limit is {COMMAND_PAYLOAD_MAX_BYTES}", payload.len()),
            ));
        }
        if let Some(e) = self.expiry_ts
            && e <= now_ms
        {
            return Err(invalid(format!("expiry_ts {e} is not in the future")));
        }
        let timeout_ms = match self.timeout_s {
            Some(0) => return Err(invalid("timeout_s must be at least 1")),
            Some(t) if t > COMMAND_TIMEOUT_MAX_S => {
                return Err(invalid(format!("timeout_s must be at most {COMMAND_TIMEOUT_MAX_S}")));
            }
            Some(t) => Some(t * 1000),
            None => None,
        };
        let body =
            format!("{}\0{}\0{:?}\0{:?}\0{}", self.command_type, payload, self.expiry_ts, timeout_ms, self.supersede);
        Ok(ValidCreate {
            body_hash: hash64(body.as_bytes()),
            command_type: self.command_type,
            payload,
            expiry_ts: self.expiry_ts,
            timeout_ms,
            idempotency_key: self.idempotency_key,
            supersede: self.supersede,
            broadcast_id: None,
        })
    }
}

/// A device's acknowledgement (`commands/{tenant}/{orb}/ack` or the HTTP fallback).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceAck {
    pub command_id: String,
    pub status: CommandStatus,
    pub detail: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAck {
    command_id: String,
    status: String,
    detail: Option<String>,
}

/// Parses an acknowledgement; only `in_progress`, `succeeded`, `failed` and `rejected` are
/// states a device may report.
pub fn parse_ack(payload: &[u8]) -> Result<DeviceAck, ApiError> {
    let raw: RawAck = serde_json::from_slice(payload)
        .map_err(|e| ApiError::new(ErrorCode::MalformedPayload, format!("acknowledgement: {e}")))?;
    let status = match CommandStatus::parse(&raw.status) {
        Some(
            s
            @ (CommandStatus::InProgress | CommandStatus::Succeeded | CommandStatus::Failed | CommandStatus::Rejected),
        ) => s,
        _ => {
            return Err(invalid(format!(
                "status {:?}: a device reports in_progress, succeeded, failed or rejected",
                raw.status
            )));
        }
    };
    if raw.detail.as_ref().is_some_and(|d| d.len() > COMMAND_ACK_DETAIL_LEN_MAX) {
        return Err(invalid(format!("detail longer than {COMMAND_ACK_DETAIL_LEN_MAX} bytes")));
    }
    if seq_of(&raw.command_id).is_none() {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no command {:?}", raw.command_id)));
    }
    Ok(DeviceAck { command_id: raw.command_id, status, detail: raw.detail })
}

/// What an acknowledgement did.
#[derive(Clone, Debug, PartialEq)]
pub enum AckOutcome {
    /// The command moved; persist it.
    Moved(Box<Command>),
    /// Nothing to do: a duplicate, a late ack of a terminal command, or a step backwards.
    Unchanged,
    /// No pending command has this id (it may be terminal: the caller checks the store).
    NotPending,
}

/// The non-terminal commands of one orb, in sequence order.
#[derive(Clone, Debug, Default)]
pub struct Queue {
    pending: BTreeMap<u64, Command>,
    /// The next sequence number to assign.
    pub next_seq: u64,
}

impl Queue {
    pub fn new(pending: Vec<Command>, next_seq: u64) -> Queue {
        Queue { pending: pending.into_iter().map(|c| (c.seq, c)).collect(), next_seq: next_seq.max(1) }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn get(&self, seq: u64) -> Option<&Command> {
        self.pending.get(&seq)
    }

    fn by_id(&mut self, command_id: &str) -> Option<&mut Command> {
        let seq = seq_of(command_id)?;
        self.pending.get_mut(&seq).filter(|c| c.command_id == command_id)
    }

    /// Creates a command. Returns it and the commands it superseded (now terminal), all to be
    /// persisted together.
    pub fn create(
        &mut self,
        req: &ValidCreate,
        command_id: String,
        now_ms: u64,
    ) -> Result<(Command, Vec<Command>), ApiError> {
        let mut superseded = Vec::new();
        if req.supersede {
            let older: Vec<u64> = self
                .pending
                .values()
                .filter(|c| {
                    c.command_type == req.command_type
                        && matches!(c.status, CommandStatus::Queued | CommandStatus::Sent)
                })
                .map(|c| c.seq)
                .collect();
            for seq in older {
                if let Some(mut c) = self.pending.remove(&seq) {
                    c.set(CommandStatus::Superseded, now_ms, Some(format!("superseded by {command_id}")));
                    superseded.push(c);
                }
            }
        }
        if self.pending.len() >= COMMANDS_PENDING_MAX {
            // Put back what supersede took: a refused request changes nothing.
            for mut c in superseded {
                c.history.pop();
                c.status = c.history.last().map_or(CommandStatus::Queued, |t| t.status);
                self.pending.insert(c.seq, c);
            }
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                format!("the orb has {COMMANDS_PENDING_MAX} pending commands; wait for some to finish"),
            ));
        }
        let seq = self.next_seq;
        debug_assert_eq!(seq_of(&command_id), Some(seq));
        let mut cmd = Command {
            command_id,
            seq,
            command_type: req.command_type.clone(),
            payload: req.payload.clone(),
            created_ms: now_ms,
            expiry_ts: req.expiry_ts,
            timeout_ms: req.timeout_ms,
            idempotency_key: req.idempotency_key.clone(),
            supersede: req.supersede,
            status: CommandStatus::Queued,
            history: Vec::new(),
            attempts: 0,
            in_progress_ms: None,
            broadcast_id: req.broadcast_id.clone(),
        };
        cmd.set(CommandStatus::Queued, now_ms, None);
        self.next_seq += 1;
        self.pending.insert(seq, cmd.clone());
        Ok((cmd, superseded))
    }

    /// Commands to hand to a device now, in order: awaiting the device and not expired.
    pub fn deliverable(&self, after_seq: u64, now_ms: u64) -> Vec<u64> {
        self.pending
            .range(after_seq + 1..)
            .filter(|(_, c)| c.status.awaiting_device() && c.expiry_ts.is_none_or(|e| e > now_ms))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Records a hand-over to the device (QUEUED -> SENT the first time; every hand-over counts
    /// as an attempt). Returns the command to persist.
    pub fn sent(&mut self, seq: u64, now_ms: u64) -> Option<Command> {
        let c = self.pending.get_mut(&seq)?;
        c.attempts += 1;
        if c.status == CommandStatus::Queued {
            c.set(CommandStatus::Sent, now_ms, None);
        }
        Some(c.clone())
    }

    /// The device's MQTT PUBACK arrived.
    pub fn delivered(&mut self, command_id: &str, now_ms: u64) -> Option<Command> {
        let c = self.by_id(command_id)?;
        if matches!(c.status, CommandStatus::Queued | CommandStatus::Sent) {
            c.set(CommandStatus::Delivered, now_ms, None);
            return Some(c.clone());
        }
        None
    }

    /// A device acknowledgement.
    pub fn ack(&mut self, ack: &DeviceAck, now_ms: u64) -> AckOutcome {
        let Some(c) = self.by_id(&ack.command_id) else { return AckOutcome::NotPending };
        let moves = match ack.status {
            CommandStatus::InProgress => c.status.awaiting_device(),
            s if s.is_terminal() => true,
            _ => false,
        };
        if !moves {
            return AckOutcome::Unchanged;
        }
        if ack.status == CommandStatus::InProgress {
            c.in_progress_ms = Some(now_ms);
        }
        c.set(ack.status, now_ms, ack.detail.clone());
        let c = c.clone();
        if c.status.is_terminal() {
            self.pending.remove(&c.seq);
        }
        AckOutcome::Moved(Box::new(c))
    }

    /// Operator cancel: only before the device has taken the command up.
    pub fn cancel(&mut self, command_id: &str, now_ms: u64) -> Result<Command, ApiError> {
        let Some(c) = self.by_id(command_id) else {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no pending command {command_id}")));
        };
        if !c.status.awaiting_device() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "command {command_id} is {}; only commands the device has not taken up can be canceled",
                    c.status.as_str()
                ),
            ));
        }
        c.set(CommandStatus::Canceled, now_ms, Some("canceled by operator".into()));
        let c = c.clone();
        self.pending.remove(&c.seq);
        Ok(c)
    }

    /// Expiries and timeouts due at `now_ms`, now terminal.
    pub fn due(&mut self, now_ms: u64) -> Vec<Command> {
        let due: Vec<u64> =
            self.pending.values().filter(|c| c.deadline().is_some_and(|d| d <= now_ms)).map(|c| c.seq).collect();
        let mut out = Vec::with_capacity(due.len());
        for seq in due {
            if let Some(mut c) = self.pending.remove(&seq) {
                if c.status == CommandStatus::InProgress {
                    c.set(CommandStatus::TimedOut, now_ms, Some("no result within timeout_s".into()));
                } else {
                    c.set(CommandStatus::Expired, now_ms, Some("not taken up before expiry_ts".into()));
                }
                out.push(c);
            }
        }
        out
    }

    /// The earliest deadline of any pending command.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending.values().filter_map(Command::deadline).min()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Command> {
        self.pending.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn req(t: &str) -> ValidCreate {
        CreateRequest {
            command_type: t.into(),
            payload: serde_json::json!({"v": 1}),
            expiry_ts: None,
            timeout_s: None,
            idempotency_key: None,
            supersede: false,
        }
        .validate(NOW)
        .unwrap()
    }

    fn create(q: &mut Queue, r: &ValidCreate) -> Command {
        let id = new_command_id(q.next_seq);
        q.create(r, id, NOW).unwrap().0
    }

    fn ack(c: &Command, s: CommandStatus) -> DeviceAck {
        DeviceAck { command_id: c.command_id.clone(), status: s, detail: None }
    }

    #[test]
    fn ids_carry_their_sequence() {
        let id = new_command_id(0x2a);
        assert!(id.starts_with("cmd-2a-"));
        assert_eq!(seq_of(&id), Some(42));
        assert_eq!(seq_of("cmd-zz-1"), None);
        assert_eq!(seq_of("nope"), None);
    }

    #[test]
    fn full_lifecycle_and_terminal_is_final() {
        let mut q = Queue::new(vec![], 1);
        let c = create(&mut q, &req("move"));
        assert_eq!((c.seq, c.status), (1, CommandStatus::Queued));
        assert_eq!(q.deliverable(0, NOW), vec![1]);
        assert_eq!(q.sent(1, NOW).unwrap().status, CommandStatus::Sent);
        assert_eq!(q.delivered(&c.command_id, NOW).unwrap().status, CommandStatus::Delivered);
        assert!(matches!(q.ack(&ack(&c, CommandStatus::InProgress), NOW), AckOutcome::Moved(_)));
        assert_eq!(q.ack(&ack(&c, CommandStatus::InProgress), NOW), AckOutcome::Unchanged, "duplicate");
        let AckOutcome::Moved(done) = q.ack(&ack(&c, CommandStatus::Succeeded), NOW) else { panic!() };
        assert_eq!(done.status, CommandStatus::Succeeded);
        let statuses: Vec<_> = done.history.iter().map(|t| t.status).collect();
        assert_eq!(
            statuses,
            vec![
                CommandStatus::Queued,
                CommandStatus::Sent,
                CommandStatus::Delivered,
                CommandStatus::InProgress,
                CommandStatus::Succeeded
            ]
        );
        assert_eq!(q.ack(&ack(&c, CommandStatus::Failed), NOW), AckOutcome::NotPending, "terminal never moves");
        assert!(q.is_empty());
    }

    #[test]
    fn device_may_report_success_before_the_puback_is_seen() {
        let mut q = Queue::new(vec![], 1);
        let c = create(&mut q, &req("x"));
        q.sent(1, NOW);
        assert!(matches!(q.ack(&ack(&c, CommandStatus::Succeeded), NOW), AckOutcome::Moved(_)));
        assert_eq!(q.delivered(&c.command_id, NOW), None, "a late PUBACK changes nothing");
    }

    #[test]
    fn expiry_and_timeout_fire_at_their_deadlines() {
        let mut q = Queue::new(vec![], 1);
        let mut r = req("a");
        r.expiry_ts = Some(NOW + 1_000);
        let a = create(&mut q, &r);
        let mut r2 = req("b");
        r2.timeout_ms = Some(5_000);
        let b = create(&mut q, &r2);
        assert_eq!(q.next_deadline(), Some(NOW + 1_000));
        assert_eq!(q.deliverable(0, NOW + 1_000), vec![b.seq], "an expired command is never delivered");
        let due = q.due(NOW + 1_000);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].seq, due[0].status), (a.seq, CommandStatus::Expired));
        assert_eq!(q.next_deadline(), None, "no timeout before in_progress");
        q.ack(&ack(&b, CommandStatus::InProgress), NOW + 2_000);
        assert_eq!(q.next_deadline(), Some(NOW + 7_000));
        assert!(q.due(NOW + 6_999).is_empty());
        assert_eq!(q.due(NOW + 7_000)[0].status, CommandStatus::TimedOut);
    }

    #[test]
    fn supersede_replaces_undelivered_commands_of_the_same_type() {
        let mut q = Queue::new(vec![], 1);
        let a = create(&mut q, &req("setpoint"));
        let b = create(&mut q, &req("setpoint"));
        q.sent(b.seq, NOW);
        q.delivered(&b.command_id, NOW);
        let other = create(&mut q, &req("other"));
        let mut r = req("setpoint");
        r.supersede = true;
        let id = new_command_id(q.next_seq);
        let (_, superseded) = q.create(&r, id, NOW).unwrap();
        assert_eq!(superseded.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![a.seq], "delivered ones stay");
        assert_eq!(superseded[0].status, CommandStatus::Superseded);
        assert!(q.get(other.seq).is_some());
    }

    #[test]
    fn the_queue_is_bounded_and_a_refusal_changes_nothing() {
        let mut q = Queue::new(vec![], 1);
        for _ in 0..COMMANDS_PENDING_MAX {
            create(&mut q, &req("t"));
        }
        let mut r = req("t");
        r.supersede = true;
        // Supersede would free slots, but a full queue before it refuses... unless it frees them.
        let id = new_command_id(q.next_seq);
        assert!(q.create(&r, id, NOW).is_ok(), "superseding all queued commands makes room");
        assert_eq!(q.len(), 1);
        for _ in 1..COMMANDS_PENDING_MAX {
            let mut r = req("u");
            r.supersede = false;
            let id = new_command_id(q.next_seq);
            q.create(&r, id, NOW).unwrap();
        }
        let before: Vec<_> = q.iter().map(|c| (c.seq, c.status)).collect();
        let id = new_command_id(q.next_seq);
        let err = q.create(&req("u"), id, NOW).unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert_eq!(q.iter().map(|c| (c.seq, c.status)).collect::<Vec<_>>(), before);
    }

    #[test]
    fn cancel_only_before_the_device_takes_it_up() {
        let mut q = Queue::new(vec![], 1);
        let a = create(&mut q, &req("a"));
        let b = create(&mut q, &req("b"));
        q.ack(&ack(&b, CommandStatus::InProgress), NOW);
        assert_eq!(q.cancel(&a.command_id, NOW).unwrap().status, CommandStatus::Canceled);
        assert_eq!(q.cancel(&b.command_id, NOW).unwrap_err().code, ErrorCode::AlreadyExists);
        assert_eq!(q.cancel(&a.command_id, NOW).unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn validation_names_the_field() {
        let base = || CreateRequest {
            command_type: "ok".into(),
            payload: serde_json::Value::Null,
            expiry_ts: None,
            timeout_s: None,
            idempotency_key: None,
            supersede: false,
        };
        let mut r = base();
        r.command_type = "a b".into();
        assert!(r.validate(NOW).unwrap_err().message.contains("command_type"));
        let mut r = base();
        r.expiry_ts = Some(NOW - 1);
        assert!(r.validate(NOW).unwrap_err().message.contains("expiry_ts"));
        let mut r = base();
        r.timeout_s = Some(0);
        assert!(r.validate(NOW).unwrap_err().message.contains("timeout_s"));
        let mut r = base();
        r.payload = serde_json::Value::String("x".repeat(COMMAND_PAYLOAD_MAX_BYTES));
        assert_eq!(r.validate(NOW).unwrap_err().code, ErrorCode::PayloadTooLarge);
        let a = base().validate(NOW).unwrap();
        let mut other = base();
        other.idempotency_key = Some("k".into());
        assert_eq!(a.body_hash, other.validate(NOW).unwrap().body_hash, "the key is not part of the body");
    }

    #[test]
    fn acks_are_validated() {
        let id = new_command_id(3);
        assert_eq!(
            parse_ack(format!(r#"{{"command_id":"{id}","status":"succeeded"}}"#).as_bytes()).unwrap().status,
            CommandStatus::Succeeded
        );
        assert_eq!(
            parse_ack(format!(r#"{{"command_id":"{id}","status":"expired"}}"#).as_bytes()).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert_eq!(parse_ack(b"{").unwrap_err().code, ErrorCode::MalformedPayload);
        assert_eq!(parse_ack(br#"{"command_id":"x","status":"failed"}"#).unwrap_err().code, ErrorCode::NotFound);
    }
}

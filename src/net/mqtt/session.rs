//! One MQTT connection, independent of protocol version: authentication at CONNECT, the
//! authorization and handling of each PUBLISH, and exactly one presence event when it ends.
//!
//! ntex-mqtt services run on a worker thread and are not `Send`; this code talks to actors
//! only by sending owned messages through `Fleet`, and holds no lock across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::MqttCtx;
use super::topic::{self, Topic};
use crate::actors::orb::Outbound;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{COMMAND_OUTBOX_MAX, MQTT_CLIENT_ID_LEN_MAX, MQTT_PASSWORD_LEN_MAX};
use crate::metrics::MsgKind;
use crate::model::orb::{ConnectRequest, Credential, DisconnectReason, OrbStatus};
use crate::model::{OrbKey, state_report};

/// Who is on the other end.
#[derive(Clone, Debug)]
pub enum Identity {
    /// An orb that authenticated (or a token-less dev orb).
    Orb { key: OrbKey, conn_seq: u64 },
    /// `--dev` only: no username; may publish for any orb of the dev tenant.
    Anonymous,
}

/// The per-connection state handed to every service of the connection.
#[derive(Clone)]
pub struct Conn(pub(super) Rc<ConnInner>);

pub struct ConnInner {
    pub(super) ctx: Arc<MqttCtx>,
    pub(super) identity: Identity,
    sink: Sink,
    /// Whether this connection's command outbox runs (started by its first SUBSCRIBE to the
    /// orb's command topic).
    commands_started: Cell<bool>,
    /// Why the connection is ending, when we know better than the transport does.
    pub(super) end_reason: Cell<Option<DisconnectReason>>,
    /// Dev-tenant orbs this connection has published for and found registered.
    ensured: RefCell<HashSet<OrbKey>>,
    reported: Cell<bool>,
    /// Dropped with the connection: ends its closer task.
    _ended: oneshot::Sender<()>,
}

/// What may close an accepted connection from the server side; see [`spawn_closer`].
pub struct Closer {
    /// The orb's actor closing the connection (takeover, decommission); `None` for anonymous
    /// dev connections.
    kick: Option<oneshot::Receiver<DisconnectReason>>,
    /// Fires when the connection ends on its own.
    ended: oneshot::Receiver<()>,
    /// Flips to `true` when the server starts draining.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Most orbs one anonymous dev connection remembers as registered.
const ENSURED_MAX: usize = 1024;

/// A refused CONNECT: the code and a reason for the v5 reason string.
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

fn refusal(code: ErrorCode, reason: impl Into<String>) -> Refusal {
    Refusal { code, reason: reason.into() }
}

/// The error type of every MQTT service. Returning it closes the connection: for a v3
/// publish that is the only refusal MQTT 3.1.1 has; in v5 it becomes a DISCONNECT.
#[derive(Debug)]
pub struct CloseConnection(pub String);

/// What the version adapters do with a PUBLISH.
pub enum Verdict {
    Accepted,
    /// Refused: v5 answers with a PUBACK reason code; v3 acknowledges and counts it.
    Refused(ApiError),
    /// Refused so that MQTT 3.1.1 must close the connection (no PUBACK reason exists there);
    /// v5 answers with a PUBACK reason code.
    NotAuthorized(ApiError),
}

/// Checks a CONNECT's client id: printable, bounded, and unable to widen a topic pattern.
pub fn check_client_id(client_id: &str) -> Result<(), Refusal> {
    if client_id.len() > MQTT_CLIENT_ID_LEN_MAX {
        return Err(refusal(
            ErrorCode::InvalidArgument,
            format!("client id longer than {MQTT_CLIENT_ID_LEN_MAX} bytes"),
        ));
    }
    if client_id.chars().any(|c| c.is_control() || matches!(c, '+' | '#' | '/')) {
        return Err(refusal(ErrorCode::InvalidArgument, "client id contains '+', '#', '/' or a control character"));
    }
    Ok(())
}

/// Authenticates a CONNECT and, for an orb identity, registers the connection with the orb's
/// actor. `kick` closes the connection when the actor says so (takeover, decommission).
pub async fn authenticate(
    ctx: &Arc<MqttCtx>,
    sink: Sink,
    protocol: u8,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Result<(Conn, Closer), Refusal> {
    check_client_id(client_id)?;
    if ctx.draining.load(Ordering::Acquire) {
        return Err(refusal(ErrorCode::Unavailable, "server is shutting down"));
    }
    let identity_and_kick = match username {
        None | Some("") if ctx.dev => {
            if password.is_some() {
                return Err(refusal(ErrorCode::Unauthenticated, "a password needs a username of the form tenant/orb"));
            }
            (Identity::Anonymous, None)
        }
        None | Some("") => {
            return Err(refusal(ErrorCode::Unauthenticated, "username tenant/orb and device token required"));
        }
        Some(user) => {
            let key = OrbKey::parse_path(user)
                .map_err(|e| refusal(ErrorCode::Unauthenticated, format!("username must be tenant/orb: {e}")))?;
            let credential = match password {
                Some(p) if p.len() > MQTT_PASSWORD_LEN_MAX => {
                    return Err(refusal(ErrorCode::Unauthenticated, "password too long"));
                }
                Some(p) => Credential::Token(p.to_vec()),
                None => Credential::None,
            };
            let req = ConnectRequest { credential, protocol, client_id: client_id.to_string(), dev: ctx.dev };
            let (tx, rx) = oneshot::channel();
            let conn_seq = ctx.ingest.fleet.connect(&key, req, tx).await.map_err(|code| {
                let reason = match code {
                    ErrorCode::Unauthenticated => "bad username or token",
                    ErrorCode::Decommissioned => "orb is decommissioned",
                    _ => "server unavailable",
                };
                refusal(code, reason)
            })?;
            (Identity::Orb { key, conn_seq }, Some(rx))
        }
    };
    let (identity, kick) = identity_and_kick;
    ctx.ingest.metrics.mqtt_connects.inc();
    ctx.ingest.metrics.mqtt_connections.inc();
    let (ended_tx, ended) = oneshot::channel();
    let closer = Closer { kick, ended, shutdown: ctx.shutdown.clone() };
    let conn = Conn(Rc::new(ConnInner {
        ctx: ctx.clone(),
        identity,
        sink,
        end_reason: Cell::new(None),
        ensured: RefCell::new(HashSet::new()),
        reported: Cell::new(false),
        commands_started: Cell::new(false),
        _ended: ended_tx,
    }));
    Ok((conn, closer))
}

/// Runs on the connection's worker until the connection ends: closes it when its orb's actor
/// says so (takeover: v5 DISCONNECT 0x8E; decommission: 0x87) or when the server drains
/// (0x8B), so a drain never waits on clients that would stay connected.
pub fn spawn_closer(conn: &Conn, closer: Closer) {
    let weak = Rc::downgrade(&conn.0);
    let sink = conn.0.sink.clone();
    let Closer { kick, mut ended, mut shutdown } = closer;
    ntex::rt::spawn(async move {
        let kicked = async {
            match kick {
                Some(kick) => kick.await.ok(),
                None => None,
            }
        };
        let reason = tokio::select! {
            Some(reason) = kicked => reason,
            Ok(_) = shutdown.wait_for(|draining| *draining) => DisconnectReason::ServerShutdown,
            _ = &mut ended => return,
        };
        if let Some(inner) = weak.upgrade() {
            Conn(inner).set_end_reason(reason);
        }
        match sink {
            Sink::V3(s) => s.close(),
            Sink::V5(s) => {
                s.close_with_reason(ntex_mqtt::v5::codec::Disconnect::new(super::v5::disconnect_code(reason)))
            }
        }
    });
}

impl Conn {
    /// Records why the connection is ending (the first reason wins).
    pub fn set_end_reason(&self, reason: DisconnectReason) {
        if self.0.end_reason.get().is_none() {
            self.0.end_reason.set(Some(reason));
        }
    }

    /// Reports the end of the connection to the orb, once; `fallback` is used when nothing
    /// better is known.
    pub fn ended(&self, fallback: DisconnectReason) {
        self.0.report_end(fallback);
    }

    /// May this connection act for `key`?
    fn authorized_for(&self, key: &OrbKey) -> bool {
        let ctx = &self.0.ctx;
        match &self.0.identity {
            Identity::Orb { key: own, .. } => own == key || (ctx.dev && own.tenant.is_dev() && key.tenant.is_dev()),
            Identity::Anonymous => ctx.dev && key.tenant.is_dev(),
        }
    }

    /// Called for every granted subscription: the orb's own command topic starts delivery of
    /// its queue to this connection.
    pub fn subscribed(&self, filter: &str) {
        let Identity::Orb { key, conn_seq } = &self.0.identity else { return };
        if filter != format!("commands/{}/{}", key.tenant, key.orb) || self.0.commands_started.replace(true) {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Outbound>(COMMAND_OUTBOX_MAX);
        let fleet = self.0.ctx.ingest.fleet.clone();
        fleet.commands_subscribed(key, *conn_seq, tx);
        let (key, conn_seq, sink) = (key.clone(), *conn_seq, self.0.sink.clone());
        let topic = filter.to_string();
        // Delivers in order, one command awaiting its PUBACK at a time, for as long as the
        // connection lives; each PUBACK is reported to the orb (DELIVERED).
        ntex::rt::spawn(async move {
            while let Some(out) = rx.recv().await {
                if sink.publish_qos1(&topic, out.payload).await.is_err() {
                    break;
                }
                fleet.command_delivered(&key, conn_seq, out.command_id);
            }
        });
    }

    /// May this connection subscribe to `filter`?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let ctx = &self.0.ctx;
        match &self.0.identity {
            Identity::Orb { key, .. } if ctx.dev && key.tenant.is_dev() => true,
            Identity::Orb { key, .. } => topic::may_subscribe(filter, key),
            Identity::Anonymous => ctx.dev,
        }
    }

    /// Makes sure a dev-tenant orb this connection publishes for exists (registering it on
    /// first contact) and is not decommissioned. The connection's own orb was checked at CONNECT.
    async fn ensure(&self, key: &OrbKey) -> Result<(), ApiError> {
        if matches!(&self.0.identity, Identity::Orb { key: own, .. } if own == key)
            || self.0.ensured.borrow().contains(key)
        {
            return Ok(());
        }
        match self.0.ctx.ingest.fleet.touch(key).await? {
            Some(OrbStatus::Decommissioned) => {
                Err(ApiError::new(ErrorCode::Decommissioned, format!("orb {key} is decommissioned")))
            }
            Some(_) => {
                let mut ensured = self.0.ensured.borrow_mut();
                if ensured.len() >= ENSURED_MAX {
                    ensured.clear();
                }
                ensured.insert(key.clone());
                Ok(())
            }
            None => Err(ApiError::new(ErrorCode::NotFound, format!("orb {key} is not registered"))),
        }
    }

    /// Handles one PUBLISH. Returns only after the effect is durable.
    pub async fn publish(&self, topic_name: &str, payload: &[u8]) -> Verdict {
        let ingest = &self.0.ctx.ingest;
        let topic = topic::parse(topic_name);
        let kind = match &topic {
            Topic::Telemetry(_) => MsgKind::Telemetry,
            Topic::State(_) => MsgKind::State,
            _ => MsgKind::Other,
        };
        ingest.metrics.message_in(kind);
        let key = match &topic {
            Topic::Telemetry(k) | Topic::State(k) | Topic::CommandAck(k) | Topic::OtaProgress(k) => k.clone(),
            Topic::Invalid(shape) => {
                let err =
                    ApiError::new(ErrorCode::TopicInvalid, format!("topic {topic_name:?} does not match {shape}"));
                ingest.metrics.refused(err.code);
                return Verdict::Refused(err);
            }
            Topic::Other if self.0.ctx.dev => return Verdict::Accepted,
            Topic::Other => {
                let err =
                    ApiError::new(ErrorCode::PermissionDenied, format!("devices may not publish to {topic_name:?}"));
                ingest.metrics.refused(err.code);
                return Verdict::NotAuthorized(err);
            }
        };
        if !self.authorized_for(&key) {
            let err = ApiError::new(ErrorCode::PermissionDenied, format!("not authorized to publish for orb {key}"));
            ingest.metrics.refused(err.code);
            return Verdict::NotAuthorized(err);
        }
        if let Err(err) = self.ensure(&key).await {
            ingest.metrics.refused(err.code);
            return Verdict::Refused(err);
        }
        match topic {
            Topic::Telemetry(_) => {
                let point = match ingest.parse(&key, payload) {
                    Ok(p) => p,
                    Err(err) => return Verdict::Refused(err),
                };
                match ingest.store(&key, point, payload).await {
                    Ok(_) => Verdict::Accepted,
                    Err(err) => Verdict::Refused(err),
                }
            }
            Topic::State(_) => {
                let report = match state_report::parse(payload) {
                    Ok(r) => r,
                    Err(e) => {
                        let err = ApiError::new(e.code(), e.to_string());
                        ingest.refuse(&key, &err);
                        return Verdict::Refused(err);
                    }
                };
                match ingest.fleet.report(&key, report).await {
                    Ok(()) => Verdict::Accepted,
                    Err(err) => {
                        ingest.refuse(&key, &err);
                        Verdict::Refused(err)
                    }
                }
            }
            Topic::CommandAck(_) => {
                let result = match crate::model::command::parse_ack(payload) {
                    Ok(ack) => ingest.fleet.command_ack(&key, ack).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => Verdict::Accepted,
                    Err(err) => {
                        ingest.refuse(&key, &err);
                        Verdict::Refused(err)
                    }
                }
            }
            Topic::OtaProgress(_) => {
                let err = ApiError::new(ErrorCode::NotImplemented, "OTA jobs are not served by this build");
                ingest.refuse(&key, &err);
                Verdict::Refused(err)
            }
            Topic::Invalid(_) | Topic::Other => unreachable!("handled above"),
        }
    }
}

/// Why a connection ended, as far as ntex-mqtt tells (the orb's own reason wins, see
/// [`Conn::set_end_reason`]).
pub fn stop_reason<E>(reason: &ntex_mqtt::Reason<E>) -> DisconnectReason {
    match reason {
        ntex_mqtt::Reason::Error(_) => DisconnectReason::NotAuthorized,
        ntex_mqtt::Reason::Protocol(e) if matches!(e.get_ref(), ntex_mqtt::error::ProtocolError::KeepAliveTimeout) => {
            DisconnectReason::KeepAliveTimeout
        }
        ntex_mqtt::Reason::Protocol(_) => DisconnectReason::ProtocolError,
        ntex_mqtt::Reason::PeerGone(_) => DisconnectReason::ConnectionLost,
    }
}

/// The QoS granted to an allowed subscription: what was asked, at most 1.
pub fn granted_qos(requested: ntex_mqtt::QoS) -> ntex_mqtt::QoS {
    if requested == ntex_mqtt::QoS::AtMostOnce { ntex_mqtt::QoS::AtMostOnce } else { ntex_mqtt::QoS::AtLeastOnce }
}

/// The connection's sink, for publishing to the device.
#[derive(Clone)]
pub enum Sink {
    V3(ntex_mqtt::v3::MqttSink),
    V5(ntex_mqtt::v5::MqttSink),
}

impl Sink {
    /// Publishes at QoS 1 and waits for the device's PUBACK.
    async fn publish_qos1(&self, topic: &str, payload: Vec<u8>) -> Result<(), ()> {
        let topic = ntex::util::ByteString::from(topic);
        let payload = ntex::util::Bytes::from(payload);
        match self {
            Sink::V3(s) => s.publish(topic).send_at_least_once(payload).await.map_err(|_| ()),
            Sink::V5(s) => match s.publish(topic).send_at_least_once(payload).await {
                Ok(ack) if (ack.reason_code as u8) < 0x80 => Ok(()),
                _ => Err(()),
            },
        }
    }
}

impl ConnInner {
    fn report_end(&self, fallback: DisconnectReason) {
        if self.reported.replace(true) {
            return;
        }
        self.ctx.ingest.metrics.mqtt_connections.dec();
        if let Identity::Orb { key, conn_seq } = &self.identity {
            let reason = if self.ctx.draining.load(Ordering::Acquire) {
                DisconnectReason::ServerShutdown
            } else {
                self.end_reason.get().unwrap_or(fallback)
            };
            self.ctx.ingest.fleet.disconnected(key, *conn_seq, reason);
        }
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        // Every accepted connection produces exactly one presence event, even when the
        // dispatcher stops without a control message (server shutdown).
        self.report_end(DisconnectReason::ConnectionLost);
    }
}

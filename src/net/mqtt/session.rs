//! One MQTT connection, independent of protocol version: authentication at CONNECT, the
//! authorization and handling of each PUBLISH, and exactly one presence event when it ends.
//!
//! ntex-mqtt services run on a worker thread and are not `Send`; this code talks to actors
//! only by sending owned messages through `Fleet`, and holds no lock across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Notify, oneshot};

use super::MqttCtx;
use super::topic::{self, Topic};
use crate::actors::orb::Outbound;
use crate::broker::{AttachError, Delivery, Message, Props, Session, SubOpts, Will};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{
    COMMAND_OUTBOX_MAX, GATEWAY_ADMISSIONS_IN_FLIGHT, GATEWAY_CHILDREN_MAX, GATEWAY_CONNECT_BATCH_MAX,
    MQTT_CLIENT_ID_LEN_MAX, MQTT_PASSWORD_LEN_MAX,
};
use crate::metrics::MsgKind;
use crate::model::orb::{ConnectRequest, Credential, DisconnectReason, OrbStatus};
use crate::model::topics;
use crate::model::{OrbKey, TenantId, state_report};

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
    /// The tenant whose topic space this connection lives in.
    tenant: TenantId,
    /// Its broker session and this connection's tenure of it.
    session: Arc<Session>,
    generation: u64,
    /// The will, published unless the client ends with a normal DISCONNECT.
    will: RefCell<Option<Will>>,
    /// v5 DISCONNECT may change the session expiry.
    expiry_on_disconnect: Cell<Option<u32>>,
    delivery_started: Cell<bool>,
    /// This connection's publish rate bucket.
    publish_bucket: RefCell<crate::model::rate::Bucket>,
    /// MQTT protocol level and client id (children connected through a gateway inherit them).
    protocol: u8,
    client_id: String,
    /// Edge gateway: the orbs connected through this connection, with their connection
    /// sequence numbers.
    children: RefCell<HashMap<OrbKey, u64>>,
    /// Children whose command outbox runs on this connection.
    child_outboxes: RefCell<HashSet<OrbKey>>,
    /// The gateway subscribed to `commands/{tenant}/+`: every child's commands come here.
    child_commands: Cell<bool>,
    sink: Sink,
    /// Whether this connection's command outbox runs (started by its first SUBSCRIBE to the
    /// orb's command topic).
    commands_started: Cell<bool>,
    /// Why the connection is ending, when we know better than the transport does.
    pub(super) end_reason: Cell<Option<DisconnectReason>>,
    /// Dev-tenant orbs this connection has published for and found registered.
    ensured: RefCell<HashSet<OrbKey>>,
    /// The framing guard's QoS 2 bookkeeping (v5).
    qos2: Option<Rc<super::framing::Qos2>>,
    /// Retained messages granted by the SUBSCRIBE being handled, queued once it is saved.
    retained: RefCell<Vec<Delivery>>,
    reported: Cell<bool>,
    /// Dropped with the connection: ends its closer task.
    _ended: oneshot::Sender<()>,
    /// Dropped with the connection: ends its delivery task.
    _delivery_ended: oneshot::Sender<()>,
    delivery_ended: RefCell<Option<oneshot::Receiver<()>>>,
}

/// What may close an accepted connection from the server side; see [`spawn_closer`].
pub struct Closer {
    /// The orb's actor closing the connection (takeover, decommission); `None` for anonymous
    /// dev connections.
    kick: Option<oneshot::Receiver<DisconnectReason>>,
    /// The broker closing the connection: another connection took its session over.
    session_kick: oneshot::Receiver<DisconnectReason>,
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
    /// Over a publish rate for longer than a short hold-back: the connection is closed
    /// (v5 DISCONNECT 0x96).
    RateLimited(ApiError),
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

/// What a CONNECT asks for, independent of the protocol version.
pub struct ConnectInfo<'a> {
    pub protocol: u8,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub clean_start: bool,
    /// Session expiry asked for (v3: 0 with a clean session, the maximum without).
    pub expiry_s: u32,
    pub will: Option<Will>,
    /// The verified client certificate's identity (MQTTS listener).
    pub cert: Option<Result<super::tls::DeviceCert, String>>,
    /// The framing guard's QoS 2 bookkeeping (v5 connections).
    pub qos2: Option<Rc<super::framing::Qos2>>,
}

/// The client certificate of a TLS connection, if any.
pub fn peer_cert(io: &ntex::io::IoBoxed) -> Option<Result<super::tls::DeviceCert, String>> {
    let item = io.query::<ntex_tls::rustls::PeerCert<'static>>();
    item.as_ref().map(|c| super::tls::device_identity(&c.0))
}

/// An accepted CONNECT.
pub struct Accepted {
    pub conn: Conn,
    pub closer: Closer,
    pub session_present: bool,
    pub expiry_s: u32,
}

/// Authenticates a CONNECT and, for an orb identity, registers the connection with the orb's
/// actor; then opens or resumes its broker session. `kick` closes the connection when the
/// actor says so (takeover, decommission).
pub async fn authenticate(ctx: &Arc<MqttCtx>, sink: Sink, info: ConnectInfo<'_>) -> Result<Accepted, Refusal> {
    let ConnectInfo { protocol, client_id, username, password, clean_start, expiry_s, will, cert, qos2 } = info;
    check_client_id(client_id)?;
    if ctx.draining.load(Ordering::Acquire) {
        return Err(refusal(ErrorCode::Unavailable, "server is shutting down"));
    }
    if !ctx.rates.admit_connect(ctx.ingest.clock.now_ms()) {
        return Err(refusal(ErrorCode::RateLimited, "connection rate exceeded; retry with backoff"));
    }
    let identity_and_kick = match (cert, username) {
        (Some(cert), _) => {
            // MQTTS: the certificate is the identity; the client id must be its orb id and a
            // username, if any, must name the same orb.
            let cert = cert.map_err(|e| refusal(ErrorCode::Unauthenticated, e))?;
            if client_id != cert.key.orb.as_str() {
                return Err(refusal(
                    ErrorCode::InvalidArgument,
                    format!("the client id must be the certificate's orb id {:?}", cert.key.orb.as_str()),
                ));
            }
            if username.is_some_and(|u| !u.is_empty() && u != cert.key.to_string()) {
                return Err(refusal(ErrorCode::Unauthenticated, "the username does not match the certificate"));
            }
            let credential = Credential::Certificate(cert.serial);
            let not_current = "the certificate is not this orb's current certificate";
            admit_orb(ctx, cert.key, credential, protocol, client_id, not_current).await?
        }
        (None, None | Some("")) if ctx.dev => {
            if password.is_some() {
                return Err(refusal(ErrorCode::Unauthenticated, "a password needs a username of the form tenant/orb"));
            }
            (Identity::Anonymous, None)
        }
        (None, None | Some("")) => {
            return Err(refusal(ErrorCode::Unauthenticated, "username tenant/orb and device token required"));
        }
        (None, Some(user)) => {
            let key = OrbKey::parse_path(user)
                .map_err(|e| refusal(ErrorCode::Unauthenticated, format!("username must be tenant/orb: {e}")))?;
            let credential = match password {
                Some(p) if p.len() > MQTT_PASSWORD_LEN_MAX => {
                    return Err(refusal(ErrorCode::Unauthenticated, "password too long"));
                }
                Some(p) => Credential::Token(p.to_vec()),
                None => Credential::None,
            };
            admit_orb(ctx, key, credential, protocol, client_id, "bad username or token").await?
        }
    };
    let (identity, kick) = identity_and_kick;
    let (tenant, owner) = match &identity {
        Identity::Orb { key, .. } => (key.tenant.clone(), Some(key)),
        Identity::Anonymous => (TenantId::dev(), None),
    };
    if let Some(w) = &will {
        check_will(ctx, &identity, &tenant, &w.msg.topic)?;
    }
    let (session_kick_tx, session_kick) = oneshot::channel();
    let attached =
        ctx.ingest.broker.attach(&tenant, client_id, owner, clean_start, expiry_s, session_kick_tx).map_err(
            |e| match e {
                AttachError::ClientIdInUse => {
                    refusal(ErrorCode::InvalidArgument, "client id is in use by another identity in this tenant")
                }
                AttachError::TooManySessions => refusal(ErrorCode::Overloaded, "too many sessions on this server"),
            },
        )?;
    ctx.ingest.metrics.mqtt_connects.inc();
    ctx.ingest.metrics.mqtt_connections.inc();
    let (ended_tx, ended) = oneshot::channel();
    let (delivery_ended_tx, delivery_ended) = oneshot::channel();
    let closer = Closer { kick, session_kick, ended, shutdown: ctx.shutdown.clone() };
    if let Some(q) = &qos2 {
        q.attach(attached.session.clone());
    }
    let conn = Conn(Rc::new(ConnInner {
        qos2,
        ctx: ctx.clone(),
        identity,
        tenant,
        session: attached.session,
        generation: attached.generation,
        will: RefCell::new(will),
        expiry_on_disconnect: Cell::new(None),
        delivery_started: Cell::new(false),
        publish_bucket: RefCell::new(crate::model::rate::Bucket::new(
            ctx.rates.publish_per_connection as u32,
            ctx.ingest.clock.now_ms(),
        )),
        protocol,
        client_id: client_id.to_string(),
        children: RefCell::new(HashMap::new()),
        child_outboxes: RefCell::new(HashSet::new()),
        child_commands: Cell::new(false),
        sink,
        end_reason: Cell::new(None),
        ensured: RefCell::new(HashSet::new()),
        retained: RefCell::new(Vec::new()),
        reported: Cell::new(false),
        commands_started: Cell::new(false),
        _ended: ended_tx,
        _delivery_ended: delivery_ended_tx,
        delivery_ended: RefCell::new(Some(delivery_ended)),
    }));
    Ok(Accepted { conn, closer, session_present: attached.present, expiry_s: attached.expiry_s })
}

/// Registers a connection of `key` with its actor, which decides the credential; `kick`
/// receives the actor's reason when it closes the connection.
async fn admit_orb(
    ctx: &MqttCtx,
    key: OrbKey,
    credential: Credential,
    protocol: u8,
    client_id: &str,
    bad_credential: &str,
) -> Result<(Identity, Option<oneshot::Receiver<DisconnectReason>>), Refusal> {
    let req = ConnectRequest { credential, protocol, client_id: client_id.to_string(), dev: ctx.dev };
    let (tx, rx) = oneshot::channel();
    let conn_seq = ctx.ingest.fleet.connect(&key, req, tx).await.map_err(|code| {
        let reason = match code {
            ErrorCode::Unauthenticated => bad_credential,
            ErrorCode::Decommissioned => "orb is decommissioned",
            _ => "server unavailable",
        };
        refusal(code, reason)
    })?;
    Ok((Identity::Orb { key, conn_seq }, Some(rx)))
}

/// A will must name a topic its client may publish to, and not a platform topic (presence
/// already reports a device going away; a will cannot bypass payload validation).
fn check_will(ctx: &MqttCtx, identity: &Identity, tenant: &TenantId, name: &str) -> Result<(), Refusal> {
    topics::check_name(name).map_err(|e| refusal(ErrorCode::TopicInvalid, format!("will topic: {e}")))?;
    if !matches!(topic::parse(name), Topic::Other) || !may_publish_other(ctx, identity, tenant, name) {
        ctx.ingest.metrics.broker_denied.inc();
        return Err(refusal(ErrorCode::PermissionDenied, format!("will topic {name:?} is not allowed")));
    }
    Ok(())
}

/// The orb id a policy's `{orb}` binds to.
fn orb_of(identity: &Identity) -> Option<&str> {
    match identity {
        Identity::Orb { key, .. } => Some(key.orb.as_str()),
        Identity::Anonymous => None,
    }
}

/// Is the tenant open to any topic (`--dev` and the dev tenant)?
fn open_tenant(ctx: &MqttCtx, tenant: &TenantId) -> bool {
    ctx.dev && tenant.is_dev()
}

/// May this identity publish to a non-platform topic?
fn may_publish_other(ctx: &MqttCtx, identity: &Identity, tenant: &TenantId, name: &str) -> bool {
    open_tenant(ctx, tenant) || ctx.ingest.broker.policy(tenant).allows_publish(orb_of(identity), name)
}

/// Why a subscription was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubRefusal {
    FilterInvalid,
    NotAuthorized,
    Quota,
}

/// Runs on the connection's worker until the connection ends: closes it when its orb's actor
/// says so (takeover: v5 DISCONNECT 0x8E; decommission: 0x87) or when the server drains
/// (0x8B), so a drain never waits on clients that would stay connected.
pub fn spawn_closer(conn: &Conn, closer: Closer) {
    let weak = Rc::downgrade(&conn.0);
    let sink = conn.0.sink.clone();
    let Closer { kick, session_kick, mut ended, mut shutdown } = closer;
    ntex::rt::spawn(async move {
        let kicked = async {
            match kick {
                Some(kick) => kick.await.ok(),
                None => None,
            }
        };
        let reason = tokio::select! {
            Some(reason) = kicked => reason,
            Ok(reason) = session_kick => reason,
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
    pub fn now_ms(&self) -> u64 {
        self.0.ctx.ingest.clock.now_ms()
    }

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
            Identity::Orb { key: own, .. } => {
                own == key
                    || (ctx.dev && own.tenant.is_dev() && key.tenant.is_dev())
                    || self.0.children.borrow().contains_key(key)
            }
            Identity::Anonymous => ctx.dev && key.tenant.is_dev(),
        }
    }

    /// Called for every granted subscription: the orb's own command topic starts delivery of
    /// its queue to this connection.
    fn subscribed(&self, filter: &str) {
        let Identity::Orb { key, conn_seq } = &self.0.identity else { return };
        if filter != format!("commands/{}/{}", key.tenant, key.orb) || self.0.commands_started.replace(true) {
            return;
        }
        self.start_outbox(key.clone(), *conn_seq);
    }

    /// Starts delivering `key`'s command queue on this connection, on `commands/{t}/{o}`: in
    /// order, one command awaiting its PUBACK at a time, for as long as the connection lives;
    /// each PUBACK is reported to the orb (DELIVERED).
    fn start_outbox(&self, key: OrbKey, conn_seq: u64) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Outbound>(COMMAND_OUTBOX_MAX);
        let fleet = self.0.ctx.ingest.fleet.clone();
        fleet.commands_subscribed(&key, conn_seq, tx);
        let sink = self.0.sink.clone();
        let topic = format!("commands/{}/{}", key.tenant, key.orb);
        ntex::rt::spawn(async move {
            while let Some(out) = rx.recv().await {
                if sink.publish_qos1(&topic, out.payload).await.is_err() {
                    break;
                }
                fleet.command_delivered(&key, conn_seq, out.command_id);
            }
        });
    }

    /// Starts the command outbox of a connected child, once.
    fn start_child_outbox(&self, child: &OrbKey) {
        let Some(seq) = self.0.children.borrow().get(child).copied() else { return };
        if self.0.child_outboxes.borrow_mut().insert(child.clone()) {
            self.start_outbox(child.clone(), seq);
        }
    }

    /// A gateway's subscription to its children's commands: `commands/{t}/+` (every child,
    /// now and later) or `commands/{t}/{child}` of a connected child.
    fn subscribe_child_commands(&self, filter: &str) -> bool {
        let Identity::Orb { key: own, .. } = &self.0.identity else { return false };
        let Some(rest) = filter.strip_prefix(&format!("commands/{}/", own.tenant)) else { return false };
        if rest == "+" {
            self.0.child_commands.set(true);
            let children: Vec<OrbKey> = self.0.children.borrow().keys().cloned().collect();
            for c in &children {
                self.start_child_outbox(c);
            }
            return true;
        }
        let Ok(orb) = crate::model::OrbId::parse(rest) else { return false };
        let child = OrbKey::new(own.tenant.clone(), orb);
        if !self.0.children.borrow().contains_key(&child) {
            return false;
        }
        self.start_child_outbox(&child);
        true
    }

    /// `gateway/{t}/{gw}/connect` `{"orbs": [...]}`: connects each listed orb through this
    /// gateway (each must name it in its `gateway` attribute). Accepted when every orb was
    /// admitted; the refused ones are named (the admitted ones stay connected).
    async fn connect_children(&self, payload: &[u8]) -> Verdict {
        let Identity::Orb { key: gw, .. } = &self.0.identity else {
            return Verdict::NotAuthorized(ApiError::new(ErrorCode::PermissionDenied, "only an orb can be a gateway"));
        };
        let orbs = match child_list(payload) {
            Ok(o) => o,
            Err(err) => return Verdict::Refused(err),
        };
        let fresh: Vec<OrbKey> = {
            let children = self.0.children.borrow();
            orbs.into_iter().map(|o| OrbKey::new(gw.tenant.clone(), o)).filter(|k| !children.contains_key(k)).collect()
        };
        if self.0.children.borrow().len() + fresh.len() > GATEWAY_CHILDREN_MAX {
            return Verdict::Refused(ApiError::new(
                ErrorCode::Overloaded,
                format!("a gateway connection carries at most {GATEWAY_CHILDREN_MAX} orbs"),
            ));
        }
        let fleet = &self.0.ctx.ingest.fleet;
        let admissions = fresh.iter().filter(|k| *k != gw).map(|child| {
            let (tx, rx) = oneshot::channel();
            let req = ConnectRequest {
                credential: Credential::Gateway(gw.orb.to_string()),
                protocol: self.0.protocol,
                client_id: self.0.client_id.clone(),
                dev: self.0.ctx.dev,
            };
            async move { (child.clone(), fleet.connect(child, req, tx).await, rx) }
        });
        let mut refused = Vec::new();
        // A bounded number of admissions in flight: thousands of children activating at once
        // would queue in the shards past the call timeout.
        let results: Vec<_> = {
            use futures::StreamExt;
            futures::stream::iter(admissions).buffer_unordered(GATEWAY_ADMISSIONS_IN_FLIGHT).collect().await
        };
        for (child, result, kick) in results {
            match result {
                Ok(seq) => {
                    self.0.children.borrow_mut().insert(child.clone(), seq);
                    self.watch_child(child.clone(), seq, kick);
                    if self.0.child_commands.get() {
                        self.start_child_outbox(&child);
                    }
                }
                Err(_) => refused.push(child.orb.to_string()),
            }
        }
        if refused.is_empty() {
            return Verdict::Accepted;
        }
        let shown: Vec<&str> = refused.iter().take(10).map(String::as_str).collect();
        Verdict::Refused(ApiError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{} orbs not connected (not children of {} or unavailable): {}",
                refused.len(),
                gw.orb,
                shown.join(", ")
            ),
        ))
    }

    /// A child's actor closing its connection (it connected elsewhere, was decommissioned or
    /// lost its credentials) detaches it from this gateway; the gateway connection stays.
    fn watch_child(&self, child: OrbKey, seq: u64, kick: oneshot::Receiver<DisconnectReason>) {
        let weak = Rc::downgrade(&self.0);
        ntex::rt::spawn(async move {
            if kick.await.is_ok()
                && let Some(inner) = weak.upgrade()
            {
                let mut children = inner.children.borrow_mut();
                if children.get(&child) == Some(&seq) {
                    children.remove(&child);
                    inner.child_outboxes.borrow_mut().remove(&child);
                }
            }
        });
    }

    /// `gateway/{t}/{gw}/disconnect` `{"orbs": [...]}`: those children go offline
    /// (`client_disconnect`); unknown ones are ignored.
    fn disconnect_children(&self, payload: &[u8]) -> Verdict {
        let Identity::Orb { key: gw, .. } = &self.0.identity else {
            return Verdict::NotAuthorized(ApiError::new(ErrorCode::PermissionDenied, "only an orb can be a gateway"));
        };
        let orbs = match child_list(payload) {
            Ok(o) => o,
            Err(err) => return Verdict::Refused(err),
        };
        for orb in orbs {
            let child = OrbKey::new(gw.tenant.clone(), orb);
            let seq = self.0.children.borrow_mut().remove(&child);
            self.0.child_outboxes.borrow_mut().remove(&child);
            if let Some(seq) = seq {
                self.0.ctx.ingest.fleet.disconnected(&child, seq, DisconnectReason::ClientDisconnect);
            }
        }
        Verdict::Accepted
    }

    /// Handles one filter of a SUBSCRIBE: the orb's own downstream platform topics (its
    /// commands start the command outbox), or a broker subscription allowed by the tenant's
    /// policy. Returns the granted QoS.
    pub fn subscribe(&self, filter: &str, opts: SubOpts) -> Result<u8, SubRefusal> {
        let inner = &self.0;
        if let Identity::Orb { key, .. } = &inner.identity
            && topic::may_subscribe(filter, key)
        {
            self.subscribed(filter);
            return Ok(opts.qos.min(1));
        }
        if self.subscribe_child_commands(filter) {
            return Ok(opts.qos.min(1));
        }
        let sub = topics::parse_subscription(filter).map_err(|_| SubRefusal::FilterInvalid)?;
        let allowed = open_tenant(&inner.ctx, &inner.tenant)
            || inner.ctx.ingest.broker.policy(&inner.tenant).allows_subscribe(orb_of(&inner.identity), sub.filter);
        if !allowed {
            inner.ctx.ingest.metrics.broker_denied.inc();
            return Err(SubRefusal::NotAuthorized);
        }
        let mut retained = inner.retained.borrow_mut();
        match inner.ctx.ingest.broker.subscribe(&inner.session, filter, opts, &mut retained) {
            Ok(_) => Ok(opts.qos),
            Err(e) if e.code == ErrorCode::Overloaded => Err(SubRefusal::Quota),
            Err(_) => Err(SubRefusal::FilterInvalid),
        }
    }

    /// Ends a SUBSCRIBE or UNSUBSCRIBE before its acknowledgement: a persistent session's
    /// subscriptions are made durable, then the retained messages the new ones match are
    /// queued. An error closes the connection (the client resubscribes when it comes back).
    pub async fn subscriptions_changed(&self) -> Result<(), ApiError> {
        let broker = &self.0.ctx.ingest.broker;
        broker.save_session(&self.0.session).await?;
        let retained: Vec<Delivery> = std::mem::take(&mut *self.0.retained.borrow_mut());
        if !retained.is_empty() {
            broker.enqueue(retained.into_iter().map(|d| (self.0.session.clone(), d)).collect()).await?;
        }
        Ok(())
    }

    /// Handles one filter of an UNSUBSCRIBE; returns whether the subscription existed.
    pub fn unsubscribe(&self, filter: &str) -> bool {
        if let Identity::Orb { key, .. } = &self.0.identity
            && topic::may_subscribe(filter, key)
        {
            // The command outbox runs for the connection's lifetime.
            return true;
        }
        self.0.ctx.ingest.broker.unsubscribe(&self.0.session, filter)
    }

    /// The client sent DISCONNECT: a normal one drops the will (v5 0x04 keeps it); v5 may
    /// change the session expiry.
    pub fn disconnecting(&self, keep_will: bool, expiry_s: Option<u32>) {
        self.set_end_reason(DisconnectReason::ClientDisconnect);
        if !keep_will {
            self.0.will.borrow_mut().take();
        }
        self.0.expiry_on_disconnect.set(expiry_s);
    }

    /// Starts sending the session's queue (and first what an earlier connection left
    /// unacknowledged) to this connection. Called once the CONNACK is out.
    pub fn start_delivery(&self) {
        if self.0.delivery_started.replace(true) {
            return;
        }
        let Some(ended) = self.0.delivery_ended.borrow_mut().take() else { return };
        let session = self.0.session.clone();
        let sink = self.0.sink.clone();
        let ctx = self.0.ctx.clone();
        ntex::rt::spawn(deliver(ctx, session, sink, ended));
    }

    /// Makes sure a dev-tenant orb this connection publishes for exists (registering it on
    /// first contact) and is not decommissioned. The connection's own orb was checked at CONNECT.
    async fn ensure(&self, key: &OrbKey) -> Result<(), ApiError> {
        if matches!(&self.0.identity, Identity::Orb { key: own, .. } if own == key)
            || self.0.children.borrow().contains_key(key)
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

    /// Applies the connection's and the tenant's publish rates: waits for this publish's turn
    /// when it is near (up to [`super::THROTTLE_MAX_MS`]), refuses it otherwise.
    async fn throttle(&self) -> Result<(), ApiError> {
        let inner = &self.0;
        let rates = &inner.ctx.rates;
        let now = inner.ctx.ingest.clock.now_ms();
        // A gateway speaks for its children too: its rate scales with them.
        let conn_rate = rates.publish_per_connection * (1 + inner.children.borrow().len()) as f64;
        let conn_wait = inner.publish_bucket.borrow_mut().reserve(conn_rate, conn_rate, now);
        let over = |what: &str| {
            inner.ctx.ingest.metrics.refused(ErrorCode::RateLimited);
            ApiError::new(ErrorCode::RateLimited, format!("publishing faster than the {what} rate limit"))
        };
        if conn_wait > super::THROTTLE_MAX_MS {
            inner.publish_bucket.borrow_mut().refund();
            return Err(over("connection's"));
        }
        let Some(tenant_wait) = rates.reserve_tenant(&inner.tenant, now) else {
            inner.publish_bucket.borrow_mut().refund();
            return Err(over("tenant's"));
        };
        let wait = conn_wait.max(tenant_wait);
        if wait > 0 {
            ntex::time::sleep(ntex::time::Millis(wait as u32)).await;
        }
        Ok(())
    }

    /// Closes the connection for publishing too fast (v5: DISCONNECT 0x96).
    pub fn close_rate_limited(&self) {
        self.set_end_reason(DisconnectReason::ProtocolError);
        match &self.0.sink {
            Sink::V3(s) => s.close(),
            Sink::V5(s) => s.close_with_reason(ntex_mqtt::v5::codec::Disconnect::new(
                ntex_mqtt::v5::codec::DisconnectReasonCode::MessageRateTooHigh,
            )),
        }
    }

    /// Handles one PUBLISH; returns only after its effect is durable. A QoS 2 publish the
    /// session took on an earlier connection and the client has not released yet is a resend
    /// after a reconnect: acknowledged (PUBREC), not processed again [MQTT-4.3.3-10]. ntex-mqtt
    /// does the same within one connection.
    pub async fn publish(&self, incoming: Incoming) -> Verdict {
        let qos2 = incoming.packet_id.filter(|_| incoming.qos == 2);
        if let Some(id) = qos2
            && self.0.session.qos2_pending(id)
        {
            return Verdict::Accepted;
        }
        let verdict = self.take(incoming).await;
        if let (Some(id), Verdict::Accepted) = (qos2, &verdict) {
            self.0.session.qos2_taken(id);
        }
        verdict
    }

    /// Whether a PUBLISH the framing guard handed over as QoS 1 was sent at QoS 2 (v5).
    pub fn was_qos2(&self, id: u16) -> bool {
        self.0.qos2.as_ref().is_some_and(|q| q.was_qos2(id))
    }

    /// The client released a QoS 2 publish (PUBREL).
    pub fn released(&self, id: u16) {
        self.0.session.qos2_released(id);
    }

    async fn take(&self, incoming: Incoming) -> Verdict {
        if let Err(err) = self.throttle().await {
            return Verdict::RateLimited(err);
        }
        let ingest = &self.0.ctx.ingest;
        let topic_name: &str = &incoming.topic;
        let payload = &incoming.payload[..];
        let topic = topic::parse(topic_name);
        let kind = match &topic {
            Topic::Telemetry(_) => MsgKind::Telemetry,
            Topic::State(_) => MsgKind::State,
            _ => MsgKind::Other,
        };
        ingest.metrics.message_in(kind);
        let key = match &topic {
            Topic::Telemetry(k)
            | Topic::State(k)
            | Topic::CommandAck(k)
            | Topic::OtaProgress(k)
            | Topic::GatewayConnect(k)
            | Topic::GatewayDisconnect(k) => k.clone(),
            Topic::Invalid(shape) => {
                let err =
                    ApiError::new(ErrorCode::TopicInvalid, format!("topic {topic_name:?} does not match {shape}"));
                ingest.metrics.refused(err.code);
                return Verdict::Refused(err);
            }
            Topic::Other => return self.publish_other(incoming).await,
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
                    Ok(()) => {
                        ingest.forward(&key, "state", payload).await;
                        Verdict::Accepted
                    }
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
            Topic::GatewayConnect(_) => self.connect_children(payload).await,
            Topic::GatewayDisconnect(_) => self.disconnect_children(payload),
            Topic::Invalid(_) | Topic::Other => unreachable!("handled above"),
        }
    }

    /// A PUBLISH to a topic outside the platform's: checked against the tenant's policy and
    /// handed to the broker (a retained one is durable before this returns).
    async fn publish_other(&self, incoming: Incoming) -> Verdict {
        let inner = &self.0;
        let metrics = &inner.ctx.ingest.metrics;
        if let Err(e) = topics::check_name(&incoming.topic) {
            let err = ApiError::new(ErrorCode::TopicInvalid, format!("topic {:?}: {e}", incoming.topic));
            metrics.refused(err.code);
            return Verdict::Refused(err);
        }
        if !may_publish_other(&inner.ctx, &inner.identity, &inner.tenant, &incoming.topic) {
            metrics.broker_denied.inc();
            let err = ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "the topic policy of tenant {} does not allow publishing to {:?}",
                    inner.tenant, incoming.topic
                ),
            );
            metrics.refused(err.code);
            return Verdict::NotAuthorized(err);
        }
        let msg = Message {
            topic: incoming.topic.to_string(),
            payload: incoming.payload,
            qos: incoming.qos,
            retain: incoming.retain,
            props: incoming.props,
            origin: inner.session.id,
        };
        match inner.ctx.ingest.broker.publish(&inner.tenant, msg).await {
            Ok(_) => Verdict::Accepted,
            Err(err) => {
                metrics.refused(err.code);
                Verdict::Refused(err)
            }
        }
    }
}

/// A PUBLISH as the version adapters hand it over.
pub struct Incoming {
    /// The topic as decoded (a topic alias already resolved); shared, not copied.
    pub topic: ntex::util::ByteString,
    pub payload: ntex::util::Bytes,
    pub qos: u8,
    /// The packet id (QoS 1 and 2).
    pub packet_id: Option<u16>,
    pub retain: bool,
    pub props: Props,
}

/// The delivery task of one connection: takes the session's queue (waiting for a connection
/// it took over to give it back), sends first what an earlier connection left unacknowledged,
/// then every queued message; QoS 1 publishes are pipelined up to the client's receive
/// maximum. A QoS 2 exchange (PUBLISH, PUBREC, PUBREL, PUBCOMP) runs alone, once every
/// earlier PUBACK is in: ntex-mqtt matches acknowledgements to publishes in send order. When
/// the connection ends, what was sent without its final acknowledgement goes back to the
/// session, to be sent again (DUP, a QoS 2 message with its packet id) on its next
/// connection. Each final acknowledgement deletes the message from a persistent session's
/// durable queue.
async fn deliver(ctx: Arc<MqttCtx>, session: Arc<Session>, sink: Sink, mut ended: oneshot::Receiver<()>) {
    let rx = session.rx.clone();
    let mut rx = tokio::select! {
        guard = rx.lock_owned() => guard,
        _ = &mut ended => return,
    };
    let clock = ctx.ingest.clock.clone();
    let unacked: Rc<RefCell<BTreeMap<u64, Delivery>>> = Rc::default();
    let drained = Rc::new(Notify::new());
    let mut next = 0u64;
    let mut pending = session.take_redeliver();
    loop {
        if !sink.is_open() {
            break;
        }
        let d = match pending.pop_front() {
            Some(d) => d,
            None => tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => d,
                    None => break,
                },
                _ = session.overflow.notified() => {
                    sink.close_quota();
                    break;
                }
                _ = &mut ended => break,
            },
        };
        let now = clock.now_ms();
        if d.msg.remaining_s(now) == Some(0) {
            continue;
        }
        if d.qos == 0 {
            sink.send_qos0(&d, now);
            ctx.ingest.metrics.messages_out.inc();
            continue;
        }
        if d.qos == 2 {
            let idle = loop {
                let notified = drained.notified();
                if unacked.borrow().is_empty() {
                    break true;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = session.overflow.notified() => {
                        sink.close_quota();
                        break false;
                    }
                    _ = &mut ended => break false,
                }
            };
            if !idle {
                pending.push_front(d);
                break;
            }
            ctx.ingest.metrics.messages_out.inc();
            if sink.send_qos2(&d, now).await {
                ctx.ingest.broker.acked(&session, &d);
                continue;
            }
            pending.push_front(d);
            break;
        }
        // Waiting for the client's receive maximum to free a slot: a session whose queue
        // overflows meanwhile is closed.
        let ready = tokio::select! {
            ready = sink.ready() => ready,
            _ = session.overflow.notified() => {
                sink.close_quota();
                false
            }
            _ = &mut ended => false,
        };
        if !ready {
            pending.push_front(d);
            break;
        }
        next += 1;
        let id = next;
        let mut fut = sink.send_qos1(&d, now);
        unacked.borrow_mut().insert(id, d);
        // The first poll writes the PUBLISH (credit is available), so the order on the wire is
        // the queue's; the PUBACK is awaited by its own task. Ready at once: not sent.
        if let std::task::Poll::Ready(done) = futures::poll!(fut.as_mut()) {
            if !done {
                // The connection is gone: it stays in `unacked`, for the next connection.
                break;
            }
            if let Some(d) = unacked.borrow_mut().remove(&id) {
                ctx.ingest.broker.acked(&session, &d);
            }
            continue;
        }
        ctx.ingest.metrics.messages_out.inc();
        let (unacked, drained) = (unacked.clone(), drained.clone());
        let (broker, session) = (ctx.ingest.broker.clone(), session.clone());
        ntex::rt::spawn(async move {
            if fut.await {
                let d = unacked.borrow_mut().remove(&id);
                if let Some(d) = d {
                    broker.acked(&session, &d);
                }
                drained.notify_waiters();
            }
        });
    }
    let left: Vec<Delivery> = std::mem::take(&mut *unacked.borrow_mut()).into_values().chain(pending).collect();
    session.return_unacked(left);
    drop(rx);
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

/// A QoS as a number.
pub fn qos_u8(q: ntex_mqtt::QoS) -> u8 {
    match q {
        ntex_mqtt::QoS::AtMostOnce => 0,
        ntex_mqtt::QoS::AtLeastOnce => 1,
        ntex_mqtt::QoS::ExactlyOnce => 2,
    }
}

/// A QoS from its number (above 2: 2).
pub fn qos_of(q: u8) -> ntex_mqtt::QoS {
    match q {
        0 => ntex_mqtt::QoS::AtMostOnce,
        1 => ntex_mqtt::QoS::AtLeastOnce,
        _ => ntex_mqtt::QoS::ExactlyOnce,
    }
}

/// The connection's sink, for publishing to the device.
#[derive(Clone)]
pub enum Sink {
    V3(ntex_mqtt::v3::MqttSink),
    V5(ntex_mqtt::v5::MqttSink),
}

impl Sink {
    fn is_open(&self) -> bool {
        match self {
            Sink::V3(s) => s.is_open(),
            Sink::V5(s) => s.is_open(),
        }
    }

    async fn ready(&self) -> bool {
        match self {
            Sink::V3(s) => s.ready().await,
            Sink::V5(s) => s.ready().await,
        }
    }

    /// Closes a subscriber that cannot keep up (v5: DISCONNECT 0x97 quota exceeded).
    fn close_quota(&self) {
        match self {
            Sink::V3(s) => s.close(),
            Sink::V5(s) => s.close_with_reason(ntex_mqtt::v5::codec::Disconnect::new(
                ntex_mqtt::v5::codec::DisconnectReasonCode::QuotaExceeded,
            )),
        }
    }

    fn v5_builder(s: &ntex_mqtt::v5::MqttSink, d: &Delivery, now_ms: u64) -> ntex_mqtt::v5::PublishBuilder {
        let m = &d.msg;
        let remaining = m.remaining_s(now_ms);
        s.publish(ntex::util::ByteString::from(m.topic.as_str())).dup(d.dup).retain(d.retain).properties(|p| {
            p.user_properties = m.props.user.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect();
            p.content_type = m.props.content_type.as_deref().map(Into::into);
            p.response_topic = m.props.response_topic.as_deref().map(Into::into);
            p.correlation_data = m.props.correlation.as_deref().map(ntex::util::Bytes::copy_from_slice);
            p.is_utf8_payload = m.props.utf8;
            p.message_expiry_interval = remaining.and_then(std::num::NonZeroU32::new);
            p.subscription_ids = d.sub_ids.iter().filter_map(|id| std::num::NonZeroU32::new(*id)).collect();
        })
    }

    fn v3_builder(s: &ntex_mqtt::v3::MqttSink, d: &Delivery) -> ntex_mqtt::v3::PublishBuilder {
        let b = s.publish(ntex::util::ByteString::from(d.msg.topic.as_str())).dup(d.dup);
        if d.retain { b.retain() } else { b }
    }

    fn send_qos0(&self, d: &Delivery, now_ms: u64) {
        let payload = d.msg.payload.clone();
        let _ = match self {
            Sink::V3(s) => Self::v3_builder(s, d).send_at_most_once(payload),
            Sink::V5(s) => Self::v5_builder(s, d, now_ms).send_at_most_once(payload),
        };
    }

    /// A QoS 1 publish; resolves to whether it is done with (acknowledged, or too large for
    /// the client, see [`Sink::done`]).
    fn send_qos1(&self, d: &Delivery, now_ms: u64) -> Pin<Box<dyn Future<Output = bool>>> {
        let payload = d.msg.payload.clone();
        match self {
            Sink::V3(s) => {
                let f = Self::v3_builder(s, d).send_at_least_once(payload);
                Box::pin(async move { Self::done(f.await) })
            }
            Sink::V5(s) => {
                let f = Self::v5_builder(s, d, now_ms).send_at_least_once(payload);
                Box::pin(async move { Self::done(f.await) })
            }
        }
    }

    /// Whether a send is done with: acknowledged, or not encodable because it is larger than
    /// the client's maximum packet size, which the server must treat as sent
    /// [MQTT-3.1.2-25]. Anything else (the connection ended) keeps it for the next connection.
    fn done<T>(r: Result<T, ntex_mqtt::error::SendPacketError>) -> bool {
        match r {
            Ok(_) => true,
            Err(ntex_mqtt::error::SendPacketError::Encode(e)) => {
                tracing::debug!(error = %e, "a message larger than the client's maximum packet size is discarded");
                true
            }
            Err(_) => false,
        }
    }

    /// A QoS 2 publish with the delivery's own packet id; resolves to whether the exchange
    /// completed (PUBCOMP, or a v5 PUBREC refusing it: the client's decision).
    async fn send_qos2(&self, d: &Delivery, now_ms: u64) -> bool {
        let payload = d.msg.payload.clone();
        let id = d.packet_id();
        match self {
            Sink::V3(s) => match Self::v3_builder(s, d).packet_id(id).send_exactly_once(payload).await {
                Ok(rec) => rec.release().await.is_ok(),
                Err(e) => Self::done::<()>(Err(e)),
            },
            Sink::V5(s) => match Self::v5_builder(s, d, now_ms).packet_id(id).send_exactly_once(payload).await {
                Ok(rec) if (rec.packet().reason_code as u8) >= 0x80 => true,
                Ok(rec) => rec.release().await.is_ok(),
                Err(e) => Self::done::<()>(Err(e)),
            },
        }
    }

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
        let will = self.will.borrow_mut().take();
        self.ctx.ingest.broker.detach(&self.session, self.generation, will, self.expiry_on_disconnect.get());
        if let Identity::Orb { key, conn_seq } = &self.identity {
            let reason = if self.ctx.draining.load(Ordering::Acquire) {
                DisconnectReason::ServerShutdown
            } else {
                self.end_reason.get().unwrap_or(fallback)
            };
            self.ctx.ingest.fleet.disconnected(key, *conn_seq, reason);
            // Children connected through a gateway go with it, for the same reason.
            for (child, seq) in self.children.borrow_mut().drain() {
                self.ctx.ingest.fleet.disconnected(&child, seq, reason);
            }
        }
    }
}

/// The `{"orbs": [...]}` of a gateway connect or disconnect message.
fn child_list(payload: &[u8]) -> Result<Vec<crate::model::OrbId>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        orbs: Vec<String>,
    }
    let body: Body = serde_json::from_slice(payload)
        .map_err(|e| ApiError::new(ErrorCode::MalformedPayload, format!("expected {{\"orbs\": [orb ids]}}: {e}")))?;
    if body.orbs.len() > GATEWAY_CONNECT_BATCH_MAX {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("at most {GATEWAY_CONNECT_BATCH_MAX} orbs per message"),
        ));
    }
    body.orbs
        .iter()
        .map(|o| {
            crate::model::OrbId::parse(o).map_err(|e| ApiError::new(ErrorCode::InvalidArgument, format!("orbs: {e}")))
        })
        .collect()
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        // Every accepted connection produces exactly one presence event, even when the
        // dispatcher stops without a control message (server shutdown).
        self.report_end(DisconnectReason::ConnectionLost);
    }
}

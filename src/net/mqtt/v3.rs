//! MQTT 3.1.1 adapter: CONNECT return codes, PUBACK-or-disconnect, control and stop events.

use std::sync::Arc;

use ntex::time::Seconds;
use ntex_mqtt::Control;
use ntex_mqtt::v3::{self, codec};

use super::MqttCtx;
use super::session::{self, CloseConnection, Conn, Incoming, Verdict};
use crate::broker::{Message, Props, SubOpts, Will};
use crate::error::ErrorCode;
use crate::limits::MQTT_FILTERS_PER_SUBSCRIBE_MAX;
use crate::model::orb::DisconnectReason;

pub async fn handshake(ctx: Arc<MqttCtx>, h: v3::Handshake) -> Result<v3::HandshakeAck<Conn>, CloseConnection> {
    let pkt = h.packet();
    if pkt.client_id.is_empty() && !pkt.clean_session {
        // [MQTT-3.1.3-8]: a zero-length client id needs a clean session.
        ctx.ingest.metrics.connect_refused(ErrorCode::InvalidArgument);
        return Ok(h.identifier_rejected());
    }
    let client_id = if pkt.client_id.is_empty() { super::assigned_client_id() } else { pkt.client_id.to_string() };
    let username = pkt.username.as_ref().map(|u| u.to_string());
    let password = pkt.password.as_ref().map(|p| p.to_vec());
    let keepalive = super::idle_timeout_s(pkt.keep_alive, ctx.keepalive_max_s);
    let will = pkt.last_will.as_ref().map(|w| Will {
        msg: Message {
            topic: w.topic.to_string(),
            payload: w.message.clone(),
            qos: session::qos_u8(w.qos).min(1),
            retain: w.retain,
            props: Props::default(),
            origin: 0,
        },
        delay_s: 0,
    });
    let clean_session = pkt.clean_session;
    let info = session::ConnectInfo {
        protocol: 4,
        client_id: &client_id,
        username: username.as_deref(),
        password: password.as_deref(),
        clean_start: clean_session,
        // MQTT 3.1.1 sessions without clean session last until the server's maximum.
        expiry_s: if clean_session { 0 } else { u32::MAX },
        will,
        cert: session::peer_cert(h.io()),
        qos2: None,
    };
    match session::authenticate(&ctx, session::Sink::V3(h.sink()), info).await {
        Ok(accepted) => {
            session::spawn_closer(&accepted.conn, accepted.closer);
            Ok(h.ack(accepted.conn, accepted.session_present).idle_timeout(Seconds(keepalive)))
        }
        Err(refusal) => {
            ctx.ingest.metrics.connect_refused(refusal.code);
            tracing::debug!(client_id, code = %refusal.code, reason = refusal.reason, "v3 connect refused");
            Ok(match refusal.code {
                ErrorCode::InvalidArgument => h.identifier_rejected(),
                ErrorCode::Unauthenticated => h.bad_username_or_pwd(),
                ErrorCode::PermissionDenied | ErrorCode::Decommissioned | ErrorCode::TopicInvalid => h.not_authorized(),
                _ => h.service_unavailable(),
            })
        }
    }
}

pub async fn publish(conn: &Conn, p: v3::Publish) -> Result<(), CloseConnection> {
    if p.publish_topic().is_empty() {
        // A protocol error, not a refusal: no topic and (v5) no topic alias naming one.
        return Err(CloseConnection("PUBLISH with an empty topic and no topic alias".into()));
    }
    let payload = p.read_all().await.map_err(|e| CloseConnection(format!("payload: {e:?}")))?;
    let incoming = Incoming {
        topic: p.packet().topic.clone(),
        payload,
        qos: session::qos_u8(p.qos()),
        packet_id: p.id().map(|id| id.get()),
        retain: p.retain(),
        props: Props::default(),
    };
    match conn.publish(incoming).await {
        Verdict::Accepted => Ok(()),
        // MQTT 3.1.1 cannot carry a reason: acknowledge so the device does not resend forever;
        // the refusal is counted and shown on the orb.
        Verdict::Refused(err) if err.code != ErrorCode::Unavailable && err.code != ErrorCode::Internal => Ok(()),
        // Not durable: close without PUBACK so the device resends after reconnecting.
        Verdict::Refused(err) => Err(CloseConnection(err.to_string())),
        Verdict::NotAuthorized(err) => {
            conn.set_end_reason(DisconnectReason::NotAuthorized);
            Err(CloseConnection(err.to_string()))
        }
        Verdict::RateLimited(err) => {
            conn.close_rate_limited();
            Err(CloseConnection(err.to_string()))
        }
    }
}

pub async fn protocol(conn: &Conn, msg: v3::ProtocolMessage) -> Result<v3::ProtocolMessageAck, CloseConnection> {
    Ok(match msg {
        v3::ProtocolMessage::Subscribe(mut sub) => {
            // Without filters it is a protocol violation [MQTT-3.8.3-3]: close.
            if sub.iter_mut().next().is_none() {
                return Err(CloseConnection("SUBSCRIBE without topic filters".into()));
            }
            for (i, mut s) in sub.iter_mut().enumerate() {
                let opts = SubOpts { qos: session::qos_u8(s.qos()), ..SubOpts::default() };
                let granted = if i < MQTT_FILTERS_PER_SUBSCRIBE_MAX {
                    conn.subscribe(s.topic(), opts)
                } else {
                    Err(session::SubRefusal::Quota)
                };
                match granted {
                    Ok(qos) => s.confirm(session::qos_of(qos)),
                    Err(_) => s.fail(),
                }
            }
            conn.subscriptions_changed().await.map_err(|e| CloseConnection(e.to_string()))?;
            sub.ack()
        }
        v3::ProtocolMessage::Unsubscribe(unsub) => {
            if unsub.iter().next().is_none() {
                return Err(CloseConnection("UNSUBSCRIBE without topic filters".into()));
            }
            for f in unsub.iter() {
                conn.unsubscribe(f);
            }
            conn.subscriptions_changed().await.map_err(|e| CloseConnection(e.to_string()))?;
            unsub.ack()
        }
        v3::ProtocolMessage::Disconnect(d) => {
            conn.disconnecting(false, None);
            d.ack()
        }
        v3::ProtocolMessage::Ping(p) => p.ack(),
        v3::ProtocolMessage::PublishRelease(r) => {
            conn.released(r.id().get());
            r.ack()
        }
    })
}

pub async fn control(conn: &Conn, ctl: Control<CloseConnection>) -> Result<Option<codec::Encoded>, CloseConnection> {
    if let Control::Stop(reason) = ctl {
        conn.ended(session::stop_reason(&reason));
    }
    Ok(None)
}

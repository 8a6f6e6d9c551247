//! MQTT 5 adapter: CONNACK and PUBACK reason codes (with reason strings), server keep-alive,
//! assigned client ids, DISCONNECT reasons for takeover and decommission.

use std::sync::Arc;

use ntex::util::ByteString;
use ntex_mqtt::v5::{self, codec};
use ntex_mqtt::{Control, QoS};

use super::MqttCtx;
use super::session::{self, CloseConnection, Conn, Incoming, SubRefusal, Verdict};
use crate::broker::{Message, Props, SubOpts, Will};
use crate::error::{ApiError, ErrorCode};
use crate::limits::MQTT_FILTERS_PER_SUBSCRIBE_MAX;
use crate::model::orb::DisconnectReason;

impl TryFrom<CloseConnection> for v5::PublishAck {
    type Error = CloseConnection;
    fn try_from(err: CloseConnection) -> Result<Self, Self::Error> {
        Err(err)
    }
}

fn connack_reason(code: ErrorCode) -> codec::ConnectAckReason {
    match code {
        ErrorCode::InvalidArgument => codec::ConnectAckReason::ClientIdentifierNotValid,
        ErrorCode::Unauthenticated => codec::ConnectAckReason::BadUserNameOrPassword,
        ErrorCode::PermissionDenied | ErrorCode::Decommissioned => codec::ConnectAckReason::NotAuthorized,
        ErrorCode::TopicInvalid => codec::ConnectAckReason::TopicNameInvalid,
        ErrorCode::Overloaded => codec::ConnectAckReason::ServerBusy,
        ErrorCode::RateLimited => codec::ConnectAckReason::ConnectionRateExceeded,
        _ => codec::ConnectAckReason::ServerUnavailable,
    }
}

fn puback_reason(code: ErrorCode) -> codec::PublishAckReason {
    match code.mqtt5_puback_reason() {
        0x99 => codec::PublishAckReason::PayloadFormatInvalid,
        0x87 => codec::PublishAckReason::NotAuthorized,
        0x90 => codec::PublishAckReason::TopicNameInvalid,
        0x97 => codec::PublishAckReason::QuotaExceeded,
        _ => codec::PublishAckReason::UnspecifiedError,
    }
}

pub(super) fn disconnect_code(reason: DisconnectReason) -> codec::DisconnectReasonCode {
    match reason {
        DisconnectReason::Takeover => codec::DisconnectReasonCode::SessionTakenOver,
        DisconnectReason::Decommissioned | DisconnectReason::NotAuthorized | DisconnectReason::AuthRevoked => {
            codec::DisconnectReasonCode::NotAuthorized
        }
        DisconnectReason::ServerShutdown => codec::DisconnectReasonCode::ServerShuttingDown,
        _ => codec::DisconnectReasonCode::AdministrativeAction,
    }
}

pub async fn handshake(ctx: Arc<MqttCtx>, h: v5::Handshake) -> Result<v5::HandshakeAck<Conn>, CloseConnection> {
    let pkt = h.packet();
    let assigned = pkt.client_id.is_empty().then(super::assigned_client_id);
    let client_id = assigned.clone().unwrap_or_else(|| pkt.client_id.to_string());
    let username = pkt.username.as_ref().map(|u| u.to_string());
    let password = pkt.password.as_ref().map(|p| p.to_vec());
    let requested_ka = pkt.keep_alive;
    let now = ctx.ingest.clock.now_ms();
    let will = pkt.last_will.as_ref().map(|w| Will {
        msg: Message {
            topic: w.topic.to_string(),
            payload: w.message.clone(),
            qos: session::qos_u8(w.qos).min(1),
            retain: w.retain,
            props: Props {
                user: w.user_properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                content_type: w.content_type.as_ref().map(|c| c.to_string()),
                response_topic: w.response_topic.as_ref().map(|c| c.to_string()),
                correlation: w.correlation_data.as_ref().map(|c| c.to_vec()),
                utf8: w.is_utf8_payload.unwrap_or(false),
                expires_at_ms: w.message_expiry_interval.map(|s| now + s.get() as u64 * 1000),
            },
            origin: 0,
        },
        delay_s: w.will_delay_interval_sec.unwrap_or(0),
    });
    let asked_expiry = pkt.session_expiry_interval_secs;
    let info = session::ConnectInfo {
        protocol: 5,
        client_id: &client_id,
        username: username.as_deref(),
        password: password.as_deref(),
        clean_start: pkt.clean_start,
        expiry_s: asked_expiry,
        will,
        cert: session::peer_cert(h.io()),
        qos2: h.io().query::<std::rc::Rc<super::framing::Qos2>>().as_ref().cloned(),
    };
    match session::authenticate(&ctx, session::Sink::V5(h.sink()), info).await {
        Ok(accepted) => {
            let session::Accepted { conn, closer, session_present, expiry_s } = accepted;
            session::spawn_closer(&conn, closer);
            let cap = ctx.keepalive_max_s;
            let mut ack = h.ack(conn).with(|a| {
                a.session_present = session_present;
                a.assigned_client_id = assigned.map(ByteString::from);
                a.retain_available = true;
                a.wildcard_subscription_available = true;
                a.subscription_identifiers_available = true;
                a.shared_subscription_available = true;
                // QoS 2 both ways: publishes are taken exactly once (ntex-mqtt holds the
                // packet id until PUBREL) and subscriptions are granted QoS 2.
                a.max_qos = QoS::ExactlyOnce;
                if expiry_s != asked_expiry {
                    a.session_expiry_interval_secs = Some(expiry_s);
                }
            });
            if requested_ka == 0 || requested_ka > cap {
                // Tell the client the keep-alive it must use; expire at 1.5x of it.
                let granted = if requested_ka == 0 { crate::limits::MQTT_KEEPALIVE_DEFAULT_S.min(cap) } else { cap };
                ack = ack
                    .with(|a| a.server_keepalive_sec = Some(granted))
                    .keep_alive(super::idle_timeout_s(granted, cap));
            }
            Ok(ack)
        }
        Err(refusal) => {
            ctx.ingest.metrics.connect_refused(refusal.code);
            tracing::debug!(client_id, code = %refusal.code, reason = refusal.reason, "v5 connect refused");
            let reason = ByteString::from(refusal.reason);
            Ok(h.failed(connack_reason(refusal.code)).with(|a| a.reason_string = Some(reason)))
        }
    }
}

fn refused_ack(p: v5::Publish, err: &ApiError) -> v5::PublishAck {
    p.ack().reason_code(puback_reason(err.code)).reason(ByteString::from(err.message.clone()))
}

pub async fn publish(conn: &Conn, p: v5::Publish) -> Result<v5::PublishAck, CloseConnection> {
    if p.publish_topic().is_empty() {
        // A protocol error, not a refusal: no topic and (v5) no topic alias naming one.
        return Err(CloseConnection("PUBLISH with an empty topic and no topic alias".into()));
    }
    let payload = p.read_all().await.map_err(|e| CloseConnection(format!("payload: {e:?}")))?;
    let pp = &p.packet().properties;
    let props = Props {
        user: pp.user_properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        content_type: pp.content_type.as_ref().map(|c| c.to_string()),
        response_topic: pp.response_topic.as_ref().map(|c| c.to_string()),
        correlation: pp.correlation_data.as_ref().map(|c| c.to_vec()),
        utf8: pp.is_utf8_payload,
        expires_at_ms: pp.message_expiry_interval.map(|s| conn.now_ms() + s.get() as u64 * 1000),
    };
    let incoming = Incoming {
        topic: p.packet().topic.clone(),
        payload,
        // The framing guard hands QoS 2 over as QoS 1 (see `framing`).
        qos: match p.id() {
            Some(id) if conn.was_qos2(id.get()) => 2,
            _ => session::qos_u8(p.qos()),
        },
        packet_id: p.id().map(|id| id.get()),
        retain: p.retain(),
        props,
    };
    match conn.publish(incoming).await {
        Verdict::Accepted => Ok(p.ack()),
        Verdict::Refused(err) | Verdict::NotAuthorized(err) => Ok(refused_ack(p, &err)),
        Verdict::RateLimited(err) => {
            conn.close_rate_limited();
            Err(CloseConnection(err.to_string()))
        }
    }
}

pub async fn protocol(conn: &Conn, msg: v5::ProtocolMessage) -> Result<v5::ProtocolMessageAck, CloseConnection> {
    Ok(match msg {
        v5::ProtocolMessage::Subscribe(mut sub) => {
            // Without filters it is a protocol violation [MQTT-3.8.3-2]: close.
            if sub.packet().topic_filters.is_empty() {
                return Err(CloseConnection("SUBSCRIBE without topic filters".into()));
            }
            let id = sub.packet().id.map(|i| i.get());
            for (i, mut s) in sub.iter_mut().enumerate() {
                let o = s.options();
                let opts = SubOpts {
                    qos: session::qos_u8(o.qos),
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: match o.retain_handling {
                        codec::RetainHandling::AtSubscribe => 0,
                        codec::RetainHandling::AtSubscribeNew => 1,
                        codec::RetainHandling::NoAtSubscribe => 2,
                    },
                    id,
                };
                let granted = if i < MQTT_FILTERS_PER_SUBSCRIBE_MAX {
                    conn.subscribe(s.topic(), opts)
                } else {
                    Err(SubRefusal::Quota)
                };
                match granted {
                    Ok(qos) => s.confirm(session::qos_of(qos)),
                    Err(SubRefusal::FilterInvalid) => s.fail(codec::SubscribeAckReason::TopicFilterInvalid),
                    Err(SubRefusal::NotAuthorized) => s.fail(codec::SubscribeAckReason::NotAuthorized),
                    Err(SubRefusal::Quota) => s.fail(codec::SubscribeAckReason::QuotaExceeded),
                }
            }
            conn.subscriptions_changed().await.map_err(|e| CloseConnection(e.to_string()))?;
            sub.ack()
        }
        v5::ProtocolMessage::Unsubscribe(mut unsub) => {
            if unsub.packet().topic_filters.is_empty() {
                return Err(CloseConnection("UNSUBSCRIBE without topic filters".into()));
            }
            for mut f in unsub.iter_mut() {
                if conn.unsubscribe(f.topic()) {
                    f.success();
                } else {
                    f.fail(codec::UnsubscribeAckReason::NoSubscriptionExisted);
                }
            }
            conn.subscriptions_changed().await.map_err(|e| CloseConnection(e.to_string()))?;
            unsub.ack()
        }
        v5::ProtocolMessage::Disconnect(d) => {
            let pkt = d.packet();
            let keep_will = pkt.reason_code == codec::DisconnectReasonCode::DisconnectWithWillMessage;
            conn.disconnecting(keep_will, pkt.session_expiry_interval_secs);
            d.ack()
        }
        v5::ProtocolMessage::Ping(p) => p.ack(),
        v5::ProtocolMessage::PublishRelease(r) => {
            conn.released(r.packet().packet_id.get());
            r.ack()
        }
        // Enhanced authentication is not offered.
        m @ v5::ProtocolMessage::Auth(_) => {
            m.disconnect_with(codec::Disconnect::new(codec::DisconnectReasonCode::BadAuthenticationMethod))
        }
    })
}

pub async fn control(conn: &Conn, ctl: Control<CloseConnection>) -> Result<Option<codec::Encoded>, CloseConnection> {
    if let Control::Stop(reason) = ctl {
        conn.ended(session::stop_reason(&reason));
    }
    Ok(None)
}

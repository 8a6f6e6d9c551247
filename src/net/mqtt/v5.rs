//! MQTT 5 adapter: CONNACK and PUBACK reason codes (with reason strings), server keep-alive,
//! assigned client ids, DISCONNECT reasons for takeover and decommission.

use std::sync::Arc;

use ntex::util::ByteString;
use ntex_mqtt::v5::{self, codec};
use ntex_mqtt::{Control, QoS};

use super::MqttCtx;
use super::session::{self, CloseConnection, Conn, Verdict};
use crate::error::{ApiError, ErrorCode};
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
        ErrorCode::Overloaded => codec::ConnectAckReason::ServerBusy,
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
        DisconnectReason::Decommissioned | DisconnectReason::NotAuthorized => {
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
    match session::authenticate(
        &ctx,
        session::Sink::V5(h.sink()),
        5,
        &client_id,
        username.as_deref(),
        password.as_deref(),
    )
    .await
    {
        Ok((conn, closer)) => {
            session::spawn_closer(&conn, closer);
            let cap = ctx.keepalive_max_s;
            let mut ack = h.ack(conn).with(|a| {
                a.assigned_client_id = assigned.map(ByteString::from);
                a.retain_available = false;
                a.wildcard_subscription_available = false;
                a.subscription_identifiers_available = false;
                a.shared_subscription_available = false;
                a.max_qos = QoS::AtLeastOnce;
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
    let payload = p.read_all().await.map_err(|e| CloseConnection(format!("payload: {e:?}")))?;
    match conn.publish(p.publish_topic(), &payload).await {
        Verdict::Accepted => Ok(p.ack()),
        Verdict::Refused(err) | Verdict::NotAuthorized(err) => Ok(refused_ack(p, &err)),
    }
}

pub async fn protocol(conn: &Conn, msg: v5::ProtocolMessage) -> Result<v5::ProtocolMessageAck, CloseConnection> {
    Ok(match msg {
        v5::ProtocolMessage::Subscribe(mut sub) => {
            for mut s in sub.iter_mut() {
                if conn.may_subscribe(s.topic()) {
                    s.confirm(session::granted_qos(s.options().qos));
                    conn.subscribed(s.topic());
                } else {
                    s.fail(codec::SubscribeAckReason::NotAuthorized);
                }
            }
            sub.ack()
        }
        v5::ProtocolMessage::Unsubscribe(unsub) => unsub.ack(),
        v5::ProtocolMessage::Disconnect(d) => {
            conn.set_end_reason(DisconnectReason::ClientDisconnect);
            d.ack()
        }
        v5::ProtocolMessage::Ping(p) => p.ack(),
        v5::ProtocolMessage::PublishRelease(r) => r.ack(),
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

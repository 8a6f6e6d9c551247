//! Platform topics of DESIGN.md, parsed without allocation beyond the ids.

use crate::model::{OrbId, OrbKey, TenantId};

/// A topic a device publishes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic {
    /// `telemetry/{tenant}/{orb}`
    Telemetry(OrbKey),
    /// `state/{tenant}/{orb}`
    State(OrbKey),
    /// `commands/{tenant}/{orb}/ack`
    CommandAck(OrbKey),
    /// `ota/{tenant}/{orb}/progress`
    OtaProgress(OrbKey),
    /// `gateway/{tenant}/{gateway}/connect`: children connecting through the gateway.
    GatewayConnect(OrbKey),
    /// `gateway/{tenant}/{gateway}/disconnect`
    GatewayDisconnect(OrbKey),
    /// A platform prefix with ids that are not valid ids or extra levels.
    Invalid(&'static str),
    /// Anything else (`$`-topics included): not a platform topic.
    Other,
}

fn key(tenant: &str, orb: &str) -> Option<OrbKey> {
    Some(OrbKey::new(TenantId::parse(tenant).ok()?, OrbId::parse(orb).ok()?))
}

/// Classifies a PUBLISH topic name.
pub fn parse(topic: &str) -> Topic {
    let mut parts = topic.split('/');
    let (Some(kind), t, o, rest, extra) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Topic::Other;
    };
    let shape = |want_rest: Option<&str>| -> Option<OrbKey> {
        if extra.is_some() || rest != want_rest {
            return None;
        }
        key(t?, o?)
    };
    match kind {
        "telemetry" => shape(None).map_or(Topic::Invalid("telemetry/{tenant}/{orb}"), Topic::Telemetry),
        "state" => shape(None).map_or(Topic::Invalid("state/{tenant}/{orb}"), Topic::State),
        "commands" => shape(Some("ack")).map_or(Topic::Invalid("commands/{tenant}/{orb}/ack"), Topic::CommandAck),
        "ota" => shape(Some("progress")).map_or(Topic::Invalid("ota/{tenant}/{orb}/progress"), Topic::OtaProgress),
        "gateway" => match rest {
            Some("connect") => {
                shape(rest).map_or(Topic::Invalid("gateway/{tenant}/{gateway}/connect"), Topic::GatewayConnect)
            }
            Some("disconnect") => {
                shape(rest).map_or(Topic::Invalid("gateway/{tenant}/{gateway}/disconnect"), Topic::GatewayDisconnect)
            }
            _ => Topic::Invalid("gateway/{tenant}/{gateway}/connect|disconnect"),
        },
        _ => Topic::Other,
    }
}

/// Whether a device with identity `own` may subscribe to `filter`: only its own downstream
/// topics (`commands/{t}/{o}`, `ota/{t}/{o}`), no wildcards.
pub fn may_subscribe(filter: &str, own: &OrbKey) -> bool {
    let t = own.tenant.as_str();
    let o = own.orb.as_str();
    filter == format!("commands/{t}/{o}") || filter == format!("ota/{t}/{o}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(t: &str, o: &str) -> OrbKey {
        key(t, o).unwrap()
    }

    #[test]
    fn platform_topics_parse() {
        assert_eq!(parse("telemetry/acme/o1"), Topic::Telemetry(k("acme", "o1")));
        assert_eq!(parse("state/acme/o1"), Topic::State(k("acme", "o1")));
        assert_eq!(parse("commands/acme/o1/ack"), Topic::CommandAck(k("acme", "o1")));
        assert_eq!(parse("ota/acme/o1/progress"), Topic::OtaProgress(k("acme", "o1")));
        assert_eq!(parse("gateway/acme/g1/connect"), Topic::GatewayConnect(k("acme", "g1")));
        assert_eq!(parse("gateway/acme/g1/disconnect"), Topic::GatewayDisconnect(k("acme", "g1")));
        assert!(matches!(parse("gateway/acme/g1"), Topic::Invalid(_)));
        assert!(matches!(parse("gateway/acme/g1/other"), Topic::Invalid(_)));
    }

    #[test]
    fn malformed_platform_topics_are_invalid_not_other() {
        for t in [
            "telemetry/acme",
            "telemetry/acme/o1/x",
            "telemetry/ac+me/o1",
            "telemetry//o1",
            "commands/acme/o1",
            "state/a/b/c",
        ] {
            assert!(matches!(parse(t), Topic::Invalid(_)), "{t}");
        }
    }

    #[test]
    fn other_topics_are_other() {
        for t in ["foo", "foo/bar", "$SYS/broker", "telemetryx/a/b", ""] {
            assert_eq!(parse(t), Topic::Other, "{t}");
        }
    }

    #[test]
    fn subscriptions_are_limited_to_own_downstream_topics() {
        let own = k("acme", "o1");
        assert!(may_subscribe("commands/acme/o1", &own));
        assert!(may_subscribe("ota/acme/o1", &own));
        assert!(!may_subscribe("commands/acme/o2", &own));
        assert!(!may_subscribe("commands/acme/+", &own));
        assert!(!may_subscribe("#", &own));
    }
}

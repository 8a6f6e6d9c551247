//! On-disk format fixtures: bytes written by format version 1. Every later build must still
//! decode them (and, while version 1 is current, encode to exactly them). When a record type
//! changes, add a new fixture beside these; never edit these bytes.

use std::collections::BTreeMap;

use orbmanager::model::orb::{DisconnectReason, OrbRecord, OrbStatus, Presence};
use orbmanager::model::state_report::Reported;
use orbmanager::model::{OrbId, TelemetryPoint, TenantId};
use orbmanager::storage::{FORMAT_VERSION, StoredPoint, TenantRecord, decode, encode};

fn check<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    what: &'static str,
    value: &T,
    fixture_hex: &str,
) {
    let fixture = hex::decode(fixture_hex).unwrap();
    let decoded: T = decode(what, &fixture).unwrap_or_else(|e| panic!("{what}: v1 fixture no longer decodes: {e}"));
    assert_eq!(&decoded, value, "{what}: v1 fixture decodes to a different value");
    if FORMAT_VERSION == 1 {
        assert_eq!(
            hex::encode(encode(value)),
            fixture_hex,
            "{what}: the v1 encoding changed; bump FORMAT_VERSION and add a fixture"
        );
    }
}

fn record() -> OrbRecord {
    let mut attributes = BTreeMap::new();
    attributes.insert("depot".to_string(), "sf-3".to_string());
    OrbRecord {
        tenant: TenantId::parse("acme").unwrap(),
        orb: OrbId::parse("orb-1").unwrap(),
        status: OrbStatus::Active,
        attributes,
        token_hash: Some([7u8; 32]),
        created_ms: 1_700_000_000_000,
        updated_ms: 1_700_000_000_500,
        auto_registered: false,
        cert_serial: Some("0a0b".into()),
    }
}

#[test]
fn orb_record_v1() {
    check("orb", &record(), ORB_V1);
}

#[test]
fn presence_v1() {
    let p = Presence {
        online: false,
        conn_seq: 3,
        connected_at_ms: Some(1_700_000_000_000),
        disconnected_at_ms: Some(1_700_000_100_000),
        disconnect_reason: Some(DisconnectReason::KeepAliveTimeout),
        protocol: Some(5),
        client_id: Some("orb-1".into()),
        boot_id: 42,
    };
    check("presence", &p, PRESENCE_V1);
}

#[test]
fn reported_v1() {
    let mut versions = BTreeMap::new();
    versions.insert("firmware".to_string(), "2.3.1".to_string());
    let r = Reported { versions, config: Some(r#"{"x":1}"#.into()), updated_ms: Some(1_700_000_000_000) };
    check("reported", &r, REPORTED_V1);
}

#[test]
fn stored_point_v1() {
    let p = StoredPoint {
        point: TelemetryPoint {
            ts: 1_700_000_000_000,
            msg_id: Some("m-1".into()),
            battery: Some(55.5),
            position: Some((37.7, -122.4)),
            speed: Some(3.0),
            mode: Some("mission".into()),
            metrics: orbmanager::model::telemetry::MetricSet::from_pairs([("temp", 21.0)]).unwrap(),
        },
        received_ms: 1_700_000_000_010,
    };
    check("telemetry", &p, POINT_V1);
}

#[test]
fn command_v1() {
    use orbmanager::model::command::{Command, CommandStatus, Transition};
    let c = Command {
        command_id: "cmd-7-0a0b0c0d0e0f".into(),
        seq: 7,
        command_type: "go_to".into(),
        payload: r#"{"lat":1.5}"#.into(),
        created_ms: 1_700_000_000_000,
        expiry_ts: Some(1_700_000_060_000),
        timeout_ms: Some(30_000),
        idempotency_key: Some("op-1".into()),
        supersede: false,
        status: CommandStatus::InProgress,
        history: vec![
            Transition { status: CommandStatus::Queued, at_ms: 1_700_000_000_000, reason: None },
            Transition { status: CommandStatus::InProgress, at_ms: 1_700_000_000_100, reason: Some("started".into()) },
        ],
        attempts: 1,
        in_progress_ms: Some(1_700_000_000_100),
        broadcast_id: Some("bc-1".into()),
    };
    check("command", &c, COMMAND_V1);
}

#[test]
fn tenant_record_v1() {
    check(
        "tenant",
        &TenantRecord { tenant: TenantId::parse("acme").unwrap(), created_ms: 1_700_000_000_000 },
        TENANT_V1,
    );
}

const ORB_V1: &str = "010461636d65056f72622d310101056465706f740473662d3301070707070707070707070707070707070707070707070707070707070707070780d095ffbc31f4d395ffbc3100010430613062";
const PRESENCE_V1: &str = "0100030180d095ffbc3101a0dd9bffbc310102010501056f72622d312a";
const REPORTED_V1: &str = "0101086669726d7761726505322e332e3101077b2278223a317d0180d095ffbc31";
const POINT_V1: &str = "0180d095ffbc3101036d2d31010000000000c04b40019a99999999d942409a99999999995ec001000000000000084001076d697373696f6e010474656d7000000000000035408ad095ffbc31";
const TENANT_V1: &str = "010461636d6580d095ffbc31";
const COMMAND_V1: &str = "0112636d642d372d3061306230633064306530660705676f5f746f0b7b226c6174223a312e357d80d095ffbc3101e0a499ffbc3101b0ea0101046f702d310003020080d095ffbc310003e4d095ffbc310107737461727465640101e4d095ffbc31010462632d31";

//! Property tests ("fuzzing" that runs in CI; cargo-fuzz needs a nightly toolchain) over every
//! decoder of untrusted input: MQTT topic names, telemetry payloads (raw bytes and structured
//! JSON), state reports, the fleet query language, and the Parquet row round trip. Each must be
//! total (never panic) and what it accepts must satisfy the model's invariants. proptest keeps
//! any failing input in `proptest-regressions/`, which is committed and replayed first.

use orbmanager::model::{query, state_report, telemetry};
use orbmanager::net::mqtt::topic::{self, Topic};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const NOW: u64 = 1_800_000_000_000;

/// Strings over an alphabet that hits the interesting cases: separators, wildcards, NUL,
/// control characters, multi-byte characters, the platform prefixes.
fn topicish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "telemetry",
        "state",
        "commands",
        "ota",
        "gateway",
        "ack",
        "progress",
        "connect",
        "disconnect",
        "/",
        "+",
        "#",
        "$SYS",
        "\0",
        "\u{7}",
        "é",
        "acme",
        "o1",
        "a",
        "-",
        "_",
        ".",
        " ",
        "",
    ]);
    prop::collection::vec(atoms, 0..9).prop_map(|v| v.concat())
}

fn id_is_safe(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_control())
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        (-200.0f64..200.0).prop_map(|f| json!(f)),
        any::<i64>().prop_map(|i| json!(i)),
        Just(json!("12")),
        Just(Value::Null),
        Just(json!(true)),
    ]
}

fn metric_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z_]{1,12}",
        1 => Just(String::new()),
        1 => Just("x".repeat(65)),
        1 => Just("bad\u{1}name".to_string()),
        1 => Just("temp".to_string()),
    ]
}

/// Mostly valid values in `lo..hi`, sometimes anything a JSON number (or not) can be.
fn field(lo: f64, hi: f64) -> impl Strategy<Value = Value> {
    prop_oneof![8 => (lo..hi).prop_map(|f| json!(f)), 2 => number()]
}

/// Telemetry-shaped JSON objects: the standard fields (mostly valid; sometimes absent, out of
/// range or mistyped), a metrics object and stray top-level fields.
fn telemetry_json() -> impl Strategy<Value = Value> {
    (
        prop::option::weighted(
            0.9,
            prop_oneof![
                8 => (NOW - 23 * 3_600_000..NOW + 23 * 3_600_000).prop_map(|t| json!(t)),
                1 => (NOW + 25 * 3_600_000..NOW + 48 * 3_600_000).prop_map(|t| json!(t)),
                1 => Just(json!(5)),
                1 => Just(json!("now"))
            ],
        ),
        prop::option::weighted(
            0.7,
            prop_oneof![8 => "[a-z0-9-]{1,10}".prop_map(|s| json!(s)), 1 => Just(json!("x".repeat(200)))],
        ),
        prop::option::weighted(0.8, field(0.0, 100.0)),
        prop::option::weighted(0.8, field(-90.0, 90.0)),
        prop::option::weighted(0.8, field(-180.0, 180.0)),
        prop::option::weighted(0.8, field(0.0, 60.0)),
        prop::option::weighted(0.8, prop_oneof![8 => "[a-z]{1,8}".prop_map(|s| json!(s)), 1 => Just(json!(7))]),
        prop::collection::vec((metric_name(), field(-1e6, 1e6)), 0..8),
        prop::collection::vec((metric_name(), number()), 0..2),
    )
        .prop_map(|(ts, msg_id, battery, lat, lon, speed, mode, metrics, extra)| {
            let mut o = Map::new();
            for (k, v) in [
                ("ts", ts),
                ("msg_id", msg_id),
                ("battery", battery),
                ("lat", lat),
                ("lon", lon),
                ("speed", speed),
                ("mode", mode),
            ] {
                if let Some(v) = v {
                    o.insert(k.into(), v);
                }
            }
            let m: Map<String, Value> = metrics.into_iter().collect();
            o.insert("metrics".into(), Value::Object(m));
            for (k, v) in extra {
                o.entry(k).or_insert(v);
            }
            Value::Object(o)
        })
}

fn queryish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "battery",
        "speed",
        "mode",
        "version.firmware",
        "attr.depot",
        "orb_id",
        "<",
        "<=",
        ">",
        "=",
        "!=",
        " AND ",
        " OR ",
        "NOT ",
        "(",
        ")",
        "\"mission\"",
        "\"",
        "12",
        "-3.5",
        "1e400",
        "within(",
        ",",
        "5km",
        "37.7",
        " ",
        "é",
        "\0",
    ]);
    prop::collection::vec(atoms, 0..14).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn topic_parsing_is_total_and_accepts_only_canonical_safe_names(t in topicish()) {
        match topic::parse(&t) {
            Topic::Telemetry(k) | Topic::State(k) => {
                prop_assert!(id_is_safe(k.tenant.as_str()) && id_is_safe(k.orb.as_str()));
                let kind = t.split('/').next().unwrap();
                prop_assert_eq!(format!("{kind}/{}/{}", k.tenant, k.orb), t);
            }
            Topic::CommandAck(k) => {
                prop_assert_eq!(format!("commands/{}/{}/ack", k.tenant, k.orb), t);
                prop_assert!(id_is_safe(k.tenant.as_str()) && id_is_safe(k.orb.as_str()));
            }
            Topic::OtaProgress(k) => {
                prop_assert_eq!(format!("ota/{}/{}/progress", k.tenant, k.orb), t);
                prop_assert!(id_is_safe(k.tenant.as_str()) && id_is_safe(k.orb.as_str()));
            }
            Topic::GatewayConnect(k) | Topic::GatewayDisconnect(k) => {
                let verb = t.rsplit('/').next().unwrap();
                prop_assert!(verb == "connect" || verb == "disconnect");
                prop_assert_eq!(format!("gateway/{}/{}/{verb}", k.tenant, k.orb), t);
                prop_assert!(id_is_safe(k.tenant.as_str()) && id_is_safe(k.orb.as_str()));
            }
            Topic::Invalid(shape) => {
                let kind = t.split('/').next().unwrap();
                prop_assert!(["telemetry", "state", "commands", "ota", "gateway"].contains(&kind));
                prop_assert!(shape.starts_with(kind));
            }
            Topic::Other => {
                let kind = t.split('/').next().unwrap();
                prop_assert!(
                    !["telemetry", "state", "commands", "ota", "gateway"].contains(&kind) || !t.contains('/')
                );
            }
        }
    }

    #[test]
    fn telemetry_parsing_is_total_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = telemetry::parse(&b, NOW, 64 * 1024);
        let _ = state_report::parse(&b);
    }

    #[test]
    fn accepted_telemetry_keeps_the_invariants_and_round_trips(v in telemetry_json()) {
        let raw = v.to_string().into_bytes();
        match telemetry::parse(&raw, NOW, 64 * 1024) {
            Ok(p) => {
                prop_assert!(p.battery.is_none_or(|b| (0.0..=100.0).contains(&b)));
                prop_assert!(p.position.is_none_or(|(la, lo)| (-90.0..=90.0).contains(&la) && (-180.0..=180.0).contains(&lo)));
                prop_assert!(p.speed.is_none_or(|s| s >= 0.0));
                let names: Vec<&str> = p.metrics.iter().map(|(n, _)| n).collect();
                prop_assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
                prop_assert!(names.iter().all(|n| p.metrics.get(n).is_some()), "every name found");
                prop_assert!(p.metrics.iter().all(|(n, v)| !n.is_empty() && n.len() <= 64 && v.is_finite()));
                prop_assert!(p.ts >= 946_684_800_000 && p.ts <= NOW + 24 * 3_600_000);
                let again = telemetry::parse(p.to_json().to_string().as_bytes(), NOW, 64 * 1024);
                prop_assert_eq!(again.as_ref(), Ok(&p));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn state_reports_are_total(v in telemetry_json()) {
        let _ = state_report::parse(v.to_string().as_bytes());
    }

    #[test]
    fn query_parsing_is_total_and_errors_point_inside_the_input(q in queryish()) {
        if let Err(e) = query::parse(&q) {
            prop_assert!(e.pos <= q.len(), "position {} past the end of {:?}", e.pos, q);
            prop_assert!(!e.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn spilled_rows_read_back_exactly(points in prop::collection::vec(telemetry_json(), 1..40)) {
        use orbmanager::model::OrbId;
        use orbmanager::storage::StoredPoint;
        use orbmanager::storage::cold::columns::{self, ColdRow};
        let mut rows: Vec<ColdRow> = points
            .iter()
            .filter_map(|v| telemetry::parse(v.to_string().as_bytes(), NOW, 64 * 1024).ok())
            .enumerate()
            .map(|(i, p)| ColdRow {
                orb: OrbId::parse(&format!("o{}", i % 3)).unwrap(),
                suffix: i as u64,
                point: StoredPoint { received_ms: p.ts + 1, point: p },
            })
            .collect();
        rows.sort_by(|a, b| a.orb.as_str().cmp(b.orb.as_str()).then(a.cursor().cmp(&b.cursor())));
        let bytes = columns::encode(&rows).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let mut back = Vec::new();
        for b in reader {
            columns::from_batch(&b.unwrap(), |_, _| true, &mut back).unwrap();
        }
        prop_assert_eq!(back, rows);
    }
}

//! Rule evaluation: one observation (an orb's row and metrics) against CEL conditions, through
//! the rule partitions' own path (`Conditions::scope` binds only the variables the rules read,
//! then each condition runs), against the same threshold written as plain Rust (the baseline,
//! same run).
//!
//! `cargo bench --bench rule_eval`

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orbmanager::actors::rules::{Conditions, holds};
use orbmanager::model::orb::OrbStatus;
use orbmanager::model::rule::{Compiled, RuleSpec, validate};
use orbmanager::model::{OrbId, TenantId};
use orbmanager::search::Row;

fn compiled(condition: &str) -> Compiled {
    let spec: RuleSpec =
        serde_json::from_value(serde_json::json!({"name": "r", "condition": condition, "severity": "major"})).unwrap();
    Compiled::new(validate(spec, TenantId::parse("bench").unwrap(), "r".into(), 1).unwrap()).unwrap()
}

fn bench(c: &mut Criterion) {
    let row = Row {
        orb: OrbId::parse("orb-00001").unwrap(),
        status: OrbStatus::Active,
        online: true,
        battery: Some(12.0),
        speed: Some(4.2),
        lat: Some(37.7749),
        lon: Some(-122.4194),
        mode: Some(Arc::from("mission")),
        last_seen_ms: Some(1_800_000_000_000),
        versions: vec![("firmware".into(), "2.3.1".into())].into_boxed_slice(),
        attrs: vec![("depot".into(), "sf-3".into())].into_boxed_slice(),
    };
    let metrics = orbmanager::model::telemetry::MetricSet::from_pairs(
        (0..20).map(|i| (format!("m{i:02}"), i as f64)).chain([("motor_temp_c".to_string(), 85.0)]),
    )
    .unwrap();
    let env = Conditions::default();
    let mut g = c.benchmark_group("rule_eval");

    let threshold = compiled(r#"battery < 15.0 && mode == "mission""#);
    let mode: Arc<str> = Arc::from("mission");
    g.bench_function("baseline_rust_threshold", |b| {
        b.iter(|| {
            let r = std::hint::black_box(&row);
            r.battery.is_some_and(|v| v < 15.0) && r.mode.as_ref() == Some(&mode)
        })
    });
    g.bench_function("threshold_1_rule", |b| {
        b.iter(|| {
            let scope = env.scope(threshold.vars, std::hint::black_box(&row), &metrics);
            holds(threshold.condition.as_ref().unwrap(), &scope)
        })
    });

    // A tenant with ten rules of the kinds the rules issue names: thresholds, a metric, a
    // geofence, a version check; one scope per observation, every rule run.
    let rules: Vec<Compiled> = [
        r#"battery < 15.0 && mode == "mission""#,
        "metrics.motor_temp_c > 80.0",
        "speed > 12.0",
        r#"!in_polygon(lat, lon, [37.70, -122.52, 37.83, -122.52, 37.83, -122.35, 37.70, -122.35])"#,
        r#"version.firmware != "2.3.1""#,
        r#"attr.depot == "sf-3" && battery < 30.0"#,
        "distance_km(lat, lon, 37.7749, -122.4194) > 50.0",
        "metrics.m05 > 100.0",
        r#"mode == "charging" && speed > 0.5"#,
        "online && battery < 5.0",
    ]
    .iter()
    .map(|c| compiled(c))
    .collect();
    let vars = rules.iter().fold(0, |v, r| v | r.vars);
    g.throughput(Throughput::Elements(rules.len() as u64));
    g.bench_function("mixed_10_rules", |b| {
        b.iter(|| {
            let scope = env.scope(vars, std::hint::black_box(&row), &metrics);
            rules.iter().filter(|r| holds(r.condition.as_ref().unwrap(), &scope)).count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

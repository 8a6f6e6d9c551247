//! Fleet search on 500,000 orbs: the issue's example filter plus the first page, a sorted first
//! page, and aggregations, over the in-memory index (`src/search.rs`).
//! `cargo bench --bench search` (set OM_SEARCH_ORBS for another size).

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use orbmanager::model::orb::OrbStatus;
use orbmanager::model::query::{Field, parse};
use orbmanager::model::{OrbId, OrbKey, TenantId};
use orbmanager::search::{Aggregate, FleetIndex, Row, SearchRequest, Sort};

/// The index, its tenant, and the same rows in a plain `Vec` for the baseline.
fn index(n: usize) -> (FleetIndex, TenantId, Vec<Row>) {
    let idx = FleetIndex::default();
    let t = TenantId::parse("fleet").unwrap();
    let modes: [Arc<str>; 4] = ["mission".into(), "idle".into(), "charging".into(), "parked".into()];
    let mut rng = fastrand::Rng::with_seed(7);
    let mut plain = Vec::with_capacity(n);
    for i in 0..n {
        let orb = OrbId::parse(&format!("orb-{i:07}")).unwrap();
        let fw = if rng.u8(0..10) < 7 { "2.3.1" } else { "2.3.0" };
        let row = Row {
            orb: orb.clone(),
            status: OrbStatus::Active,
            online: rng.bool(),
            battery: Some(rng.f64() * 100.0),
            speed: Some(rng.f64() * 15.0),
            // Spread over ~100 km around San Francisco.
            lat: Some(37.77 + (rng.f64() - 0.5) * 0.9),
            lon: Some(-122.42 + (rng.f64() - 0.5) * 1.1),
            mode: Some(modes[rng.usize(0..4)].clone()),
            last_seen_ms: Some(1_800_000_000_000 + i as u64),
            versions: vec![("firmware".into(), fw.into()), ("model".into(), "yolo-7".into())].into_boxed_slice(),
            attrs: vec![("depot".into(), format!("d{}", i % 50).into())].into_boxed_slice(),
        };
        plain.push(row.clone());
        idx.upsert(OrbKey::new(t.clone(), orb), row);
    }
    idx.set_ready();
    (idx, t, plain)
}

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("OM_SEARCH_ORBS").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000);
    let (idx, t, rows) = index(n);
    let q = parse(r#"battery < 20 AND mode = "mission" AND version.firmware = "2.3.1" AND within(37.7, -122.4, 5km)"#)
        .unwrap();
    let mut g = c.benchmark_group(format!("search_{n}_orbs"));
    g.sample_size(20);
    // Baseline: one sequential pass over the same rows in a plain Vec, reading one field of
    // each; a full-scan query cannot beat it on one core.
    g.bench_function("baseline_one_pass_over_a_vec", |b| {
        b.iter(|| rows.iter().filter(|r| r.battery.is_some_and(|v| v < 20.0)).count())
    });
    let plain = SearchRequest { query: q.clone(), sort: None, page_size: 100, page_token: None, aggregate: None };
    g.bench_function("issue_filter_first_page", |b| b.iter(|| idx.search(&t, &plain).unwrap()));
    let sorted = SearchRequest {
        query: parse("battery < 50").unwrap(),
        sort: Some(Sort { field: Field::Battery, descending: false }),
        page_size: 100,
        page_token: None,
        aggregate: None,
    };
    g.bench_function("half_the_fleet_sorted_first_page", |b| b.iter(|| idx.search(&t, &sorted).unwrap()));
    let count = SearchRequest {
        query: parse("online").unwrap(),
        sort: None,
        page_size: 1,
        page_token: None,
        aggregate: Some(Aggregate::CountBy(Field::Mode)),
    };
    g.bench_function("count_by_mode_of_online", |b| b.iter(|| idx.search(&t, &count).unwrap()));
    let stats = SearchRequest {
        query: parse("").unwrap(),
        sort: None,
        page_size: 1,
        page_token: None,
        aggregate: Some(Aggregate::Stats(Field::Battery)),
    };
    g.bench_function("battery_percentiles_of_all", |b| b.iter(|| idx.search(&t, &stats).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

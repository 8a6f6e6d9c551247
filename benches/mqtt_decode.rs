//! The per-message CPU of the ingest front: decoding a 1 KiB QoS 1 PUBLISH with ntex-mqtt's
//! v3 codec, then our topic parse and telemetry parse + validate, against a baseline of
//! copying the same bytes, in the same run. `cargo bench --bench mqtt_decode`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ntex::codec::Decoder;
use ntex::util::BytesMut;
use ntex_mqtt::v3::codec::{Codec, Decoded};
use orbmanager::model::telemetry;
use orbmanager::net::mqtt::topic;
use orbmanager::sim::Workload;

/// A QoS 1 PUBLISH as a device sends it.
fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let remaining = 2 + topic.len() + 2 + payload.len();
    let mut out = vec![0x32];
    let mut n = remaining;
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&7u16.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn bench(c: &mut Criterion) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let w = Workload::Synthetic { payload_bytes: 1024 };
    let mut m = w.start(0);
    let payload = w.payload("sim-00001", 1, &mut m, std::time::Duration::from_secs(2));
    let topic_name = "telemetry/default/sim-00001";
    let raw = publish_packet(topic_name, &payload);
    let codec = Codec::new();

    let mut g = c.benchmark_group("mqtt_decode");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("baseline_copy_1KiB", |b| {
        b.iter(|| BytesMut::from(std::hint::black_box(&raw[..])));
    });
    g.bench_function("v3_publish_1KiB", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(std::hint::black_box(&raw[..]));
            match codec.decode(&mut buf) {
                Ok(Some(Decoded::Publish(p, body, _))) => (p, body),
                other => panic!("not a publish: {other:?}"),
            }
        });
    });
    g.bench_function("v3_publish_topic_telemetry_1KiB", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(std::hint::black_box(&raw[..]));
            let Ok(Some(Decoded::Publish(p, body, _))) = codec.decode(&mut buf) else { panic!("not a publish") };
            let t = topic::parse(&p.topic);
            assert!(matches!(t, topic::Topic::Telemetry(_)));
            telemetry::parse(&body, now, 64 * 1024).unwrap()
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

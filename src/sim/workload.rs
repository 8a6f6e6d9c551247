//! What simulated orbs send: synthetic payloads of a fixed size, or a city fleet whose
//! robots drive around, drain their batteries and go charging.

use std::io::Write as _;
use std::time::Duration;

/// The kind of telemetry to generate.
#[derive(Clone, Debug)]
pub enum Workload {
    /// JSON telemetry padded with metrics to about `payload_bytes`.
    Synthetic { payload_bytes: usize },
    /// Robots moving around a city centre.
    City,
}

/// Per-orb motion state for the city workload.
#[derive(Clone, Debug)]
pub struct Motion {
    lat: f64,
    lon: f64,
    heading: f64,
    speed: f64,
    battery: f64,
    charging: bool,
}

/// San Francisco's centre; orbs start within ~5 km of it.
const CITY: (f64, f64) = (37.7749, -122.4194);

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Workload {
    pub fn payload_bytes(&self) -> usize {
        match self {
            Workload::Synthetic { payload_bytes } => *payload_bytes,
            Workload::City => 200,
        }
    }

    /// Initial state of orb `i`.
    pub fn start(&self, _i: usize) -> Motion {
        Motion {
            lat: CITY.0 + (fastrand::f64() - 0.5) * 0.09,
            lon: CITY.1 + (fastrand::f64() - 0.5) * 0.11,
            heading: fastrand::f64() * std::f64::consts::TAU,
            speed: 2.0 + fastrand::f64() * 10.0,
            battery: 20.0 + fastrand::f64() * 80.0,
            charging: false,
        }
    }

    /// Room for one payload: the target size (at most the server's payload limit; synthetic
    /// payloads never exceed ~19 KiB whatever the target) and the standard fields.
    pub fn buffer_bytes(&self) -> usize {
        self.payload_bytes().min(crate::limits::TELEMETRY_PAYLOAD_MAX_BYTES) + 64
    }

    /// The next telemetry payload of `orb`.
    pub fn payload(&self, orb: &str, seq: u64, m: &mut Motion, dt: Duration) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buffer_bytes());
        self.payload_into(&mut out, orb, seq, m, dt);
        out
    }

    /// Appends the next telemetry payload of `orb` to `out` (the simulator reuses one buffer
    /// per connection).
    pub fn payload_into(&self, out: &mut Vec<u8>, orb: &str, seq: u64, m: &mut Motion, dt: Duration) {
        let ts = now_ms();
        match self {
            Workload::Synthetic { payload_bytes } => synthetic_into(out, orb, seq, ts, *payload_bytes),
            Workload::City => {
                step(m, dt.as_secs_f64());
                let mode = if m.charging {
                    "charging"
                } else if m.speed > 0.1 {
                    "mission"
                } else {
                    "idle"
                };
                let _ = write!(
                    out,
                    r#"{{"ts":{ts},"msg_id":"{orb}-{seq}","battery":{:.1},"lat":{:.6},"lon":{:.6},"speed":{:.2},"mode":"{mode}","metrics":{{"motor_temp_c":{:.1},"odometer_km":{:.3}}}}}"#,
                    m.battery,
                    m.lat,
                    m.lon,
                    m.speed,
                    30.0 + m.speed * 2.0 + fastrand::f64() * 3.0,
                    seq as f64 * m.speed * dt.as_secs_f64() / 1000.0,
                );
            }
        }
    }
}

/// Moves an orb for `dt` seconds: drive, turn a little, drain; charge when low.
fn step(m: &mut Motion, dt: f64) {
    if m.charging {
        m.speed = 0.0;
        m.battery = (m.battery + 0.5 * dt).min(100.0);
        if m.battery >= 95.0 {
            m.charging = false;
            m.speed = 2.0 + fastrand::f64() * 10.0;
        }
        return;
    }
    m.heading += (fastrand::f64() - 0.5) * 0.4;
    let metres = m.speed * dt;
    m.lat += metres * m.heading.cos() / 111_320.0;
    m.lon += metres * m.heading.sin() / (111_320.0 * m.lat.to_radians().cos());
    // Stay within ~6 km of the centre: turn back when outside.
    if (m.lat - CITY.0).abs() > 0.055 || (m.lon - CITY.1).abs() > 0.07 {
        m.heading += std::f64::consts::PI;
    }
    m.battery = (m.battery - (0.02 + m.speed * 0.004) * dt).max(0.0);
    if m.battery < 15.0 {
        m.charging = true;
    }
}

/// Synthetic telemetry of about `size` bytes: the standard fields, then numeric metrics.
pub fn synthetic(orb: &str, seq: u64, ts: u64, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(Workload::Synthetic { payload_bytes: size }.buffer_bytes());
    synthetic_into(&mut out, orb, seq, ts, size);
    out
}

/// [`synthetic`], appended to `out`. Written digit by digit rather than through `fmt`: at
/// saturation the simulator shares the machine with the server, and building a 1 KiB payload
/// (~190 numbers through `fmt`: 64 metrics of three numbers each, and the standard fields) was
/// 45% of its CPU (BENCHMARKS.md, "The simulator's own cost").
pub fn synthetic_into(out: &mut Vec<u8>, orb: &str, seq: u64, ts: u64, size: usize) {
    let start = out.len();
    out.extend_from_slice(br#"{"ts":"#);
    push_decimal(out, ts, 0);
    out.extend_from_slice(br#","msg_id":""#);
    out.extend_from_slice(orb.as_bytes());
    out.push(b'-');
    push_decimal(out, seq, 0);
    // battery 50.0 ..= 99.0, speed 0.00 ..= 9.50 in steps of 0.5: exact in decimal.
    out.extend_from_slice(br#"","battery":"#);
    push_decimal(out, 50 + seq % 50, 0);
    out.extend_from_slice(br#".0,"lat":37."#);
    push_decimal(out, seq % 1_000_000, 6);
    out.extend_from_slice(br#","lon":-122."#);
    push_decimal(out, (seq * 7) % 1_000_000, 6);
    let speed = (seq % 20) * 50;
    out.extend_from_slice(br#","speed":"#);
    push_decimal(out, speed / 100, 0);
    out.push(b'.');
    push_decimal(out, speed % 100, 2);
    out.extend_from_slice(br#","mode":"mission","metrics":{"#);
    // As many metrics as keep the payload under `size`. Their text is the same in every
    // payload of this size but for the three decimals (the sequence number), so it is copied
    // from a template and the decimals are written in.
    let head = out.len() - start;
    METRICS.with_borrow_mut(|t| {
        if t.size != size || t.ends.is_empty() {
            *t = MetricsTemplate::new(size);
        }
        let room = size.saturating_sub(head + t.name_len + 12);
        let n = t.ends[..t.ends.len() - 1].partition_point(|&end| (end as usize) < room);
        let at = out.len();
        out.extend_from_slice(&t.text[..t.ends[n] as usize]);
        let frac = (seq % 1000) as u16;
        let digits = [b'0' + (frac / 100) as u8, b'0' + (frac / 10 % 10) as u8, b'0' + (frac % 10) as u8];
        for &end in &t.ends[1..=n] {
            let end = at + end as usize;
            out[end - 3..end].copy_from_slice(&digits);
        }
    });
    out.extend_from_slice(b"}}");
}

thread_local! {
    static METRICS: std::cell::RefCell<MetricsTemplate> = std::cell::RefCell::new(MetricsTemplate::default());
}

/// The metrics of a synthetic payload of `size` bytes with `000` decimals: metric `n`'s text
/// (with its leading comma) ends at `ends[n + 1]`.
#[derive(Default)]
struct MetricsTemplate {
    size: usize,
    name_len: usize,
    text: Vec<u8>,
    ends: Vec<u32>,
}

impl MetricsTemplate {
    fn new(size: usize) -> MetricsTemplate {
        // Metric names grow with the target so 256 metrics can fill large payloads.
        let name_len = (size / crate::limits::TELEMETRY_METRICS_MAX).clamp(4, 60);
        let mut text = Vec::new();
        let mut ends = vec![0];
        for n in 0..crate::limits::TELEMETRY_METRICS_MAX {
            if n > 0 {
                text.push(b',');
            }
            text.extend_from_slice(b"\"m");
            push_decimal(&mut text, n as u64, name_len - 1);
            text.extend_from_slice(b"\":");
            push_decimal(&mut text, n as u64 * 3, 0);
            text.extend_from_slice(b".000");
            ends.push(text.len() as u32);
        }
        MetricsTemplate { size, name_len, text, ends }
    }
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
fn push_decimal(out: &mut Vec<u8>, mut v: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    out.resize(out.len() + width.saturating_sub(len), b'0');
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::telemetry;
    use std::fmt::Write as _;

    #[test]
    fn synthetic_payloads_are_valid_and_near_the_size() {
        for size in [100, 256, 1024, 4096, 16 * 1024] {
            let p = synthetic("sim-00001", 42, 1_700_000_000_000, size);
            let pt = telemetry::parse(&p, 1_700_000_000_000, 64 * 1024).unwrap_or_else(|e| panic!("{size}: {e}"));
            assert_eq!(pt.msg_id.as_deref(), Some("sim-00001-42"));
            // The standard fields alone take ~140 bytes; above that the size is met closely.
            assert!(p.len() <= size.max(150) && p.len() + 80 >= size, "size {size}: got {}", p.len());
        }
    }

    /// The layout [`synthetic_into`] writes by hand, as the format string it replaced.
    fn synthetic_by_format(orb: &str, seq: u64, ts: u64, size: usize) -> Vec<u8> {
        let mut s = String::with_capacity(size + 64);
        let _ = write!(
            s,
            r#"{{"ts":{ts},"msg_id":"{orb}-{seq}","battery":{:.1},"lat":37.{:06},"lon":-122.{:06},"speed":{:.2},"mode":"mission","metrics":{{"#,
            50.0 + (seq % 50) as f64,
            seq % 1_000_000,
            (seq * 7) % 1_000_000,
            (seq % 20) as f64 * 0.5,
        );
        let name_len = (size / crate::limits::TELEMETRY_METRICS_MAX).clamp(4, 60);
        let mut n = 0;
        while s.len() + name_len + 12 < size && n < crate::limits::TELEMETRY_METRICS_MAX {
            if n > 0 {
                s.push(',');
            }
            let _ = write!(s, r#""m{:0width$}":{}.{:03}"#, n, n * 3, seq % 1000, width = name_len - 1);
            n += 1;
        }
        s.push_str("}}");
        s.into_bytes()
    }

    #[test]
    fn synthetic_payloads_match_their_format_string() {
        let mut out = b"prefix".to_vec();
        for size in [0, 100, 150, 151, 1024, 1031, 4096, 16 * 1024, 64 * 1024] {
            for seq in [0, 1, 9, 10, 49, 999, 1_000, 123_456, 999_999, 1_000_000, 98_765_432_109, u64::MAX / 7] {
                for (orb, ts) in [("sim-00001", 1_700_000_000_000), ("o", 0), ("sim.0badcafe-longer-prefix", 9)] {
                    let want = synthetic_by_format(orb, seq, ts, size);
                    assert_eq!(synthetic(orb, seq, ts, size), want, "size {size} seq {seq} orb {orb}");
                    out.truncate(6);
                    synthetic_into(&mut out, orb, seq, ts, size);
                    assert_eq!(&out[..6], b"prefix");
                    assert_eq!(&out[6..], &want[..], "appended: size {size} seq {seq} orb {orb}");
                }
            }
        }
    }

    #[test]
    fn decimals_pad_to_their_width() {
        let mut out = Vec::new();
        for (v, w, want) in [
            (0, 0, "0"),
            (7, 3, "007"),
            (1234, 2, "1234"),
            (u64::MAX, 0, "18446744073709551615"),
            (5, 25, "0000000000000000000000005"),
        ] {
            out.clear();
            push_decimal(&mut out, v, w);
            assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        }
    }

    #[test]
    fn city_orbs_stay_near_the_city_and_keep_valid_batteries() {
        let w = Workload::City;
        let mut m = w.start(0);
        for seq in 0..5_000 {
            let p = w.payload("demo-00001", seq, &mut m, Duration::from_secs(2));
            let pt = telemetry::parse(&p, now_ms(), 64 * 1024).expect("valid");
            let (lat, lon) = pt.position.unwrap();
            assert!((lat - CITY.0).abs() < 0.1 && (lon - CITY.1).abs() < 0.12);
            assert!((0.0..=100.0).contains(&pt.battery.unwrap()));
        }
    }
}

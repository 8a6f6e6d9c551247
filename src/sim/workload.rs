//! What simulated orbs send: synthetic payloads of a fixed size, or a city fleet whose
//! robots drive around, drain their batteries and go charging.

use std::fmt::Write as _;
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

    /// The next telemetry payload of `orb`.
    pub fn payload(&self, orb: &str, seq: u64, m: &mut Motion, dt: Duration) -> Vec<u8> {
        let ts = now_ms();
        match self {
            Workload::Synthetic { payload_bytes } => synthetic(orb, seq, ts, *payload_bytes),
            Workload::City => {
                step(m, dt.as_secs_f64());
                let mode = if m.charging {
                    "charging"
                } else if m.speed > 0.1 {
                    "mission"
                } else {
                    "idle"
                };
                format!(
                    r#"{{"ts":{ts},"msg_id":"{orb}-{seq}","battery":{:.1},"lat":{:.6},"lon":{:.6},"speed":{:.2},"mode":"{mode}","metrics":{{"motor_temp_c":{:.1},"odometer_km":{:.3}}}}}"#,
                    m.battery,
                    m.lat,
                    m.lon,
                    m.speed,
                    30.0 + m.speed * 2.0 + fastrand::f64() * 3.0,
                    seq as f64 * m.speed * dt.as_secs_f64() / 1000.0,
                )
                .into_bytes()
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
    let mut s = String::with_capacity(size + 64);
    let _ = write!(
        s,
        r#"{{"ts":{ts},"msg_id":"{orb}-{seq}","battery":{:.1},"lat":37.{:06},"lon":-122.{:06},"speed":{:.2},"mode":"mission","metrics":{{"#,
        50.0 + (seq % 50) as f64,
        seq % 1_000_000,
        (seq * 7) % 1_000_000,
        (seq % 20) as f64 * 0.5,
    );
    // Metric names grow with the target so 256 metrics can fill large payloads.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::telemetry;

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

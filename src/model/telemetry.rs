//! Telemetry points: parsing and validating the device JSON of DESIGN.md, purely.
//!
//! `{"ts": <unix ms>, "msg_id": "...", "battery": 0..100, "lat", "lon", "speed", "mode",
//! "metrics": {"name": number}}`; any other top-level number (or boolean, as 0/1) is kept as a
//! metric. Anything else is refused with a reason naming the field, and nothing is stored.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ErrorCode;
use crate::limits::{
    TELEMETRY_CLOCK_SKEW_MAX_MS, TELEMETRY_METRIC_NAME_LEN_MAX, TELEMETRY_METRICS_MAX, TELEMETRY_MODE_LEN_MAX,
    TELEMETRY_MSG_ID_LEN_MAX, TELEMETRY_TS_MIN_MS,
};

mod scan;

/// One validated telemetry point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TelemetryPoint {
    /// Device time in unix ms (server receive time when the device sent none).
    pub ts: u64,
    pub msg_id: Option<String>,
    pub battery: Option<f64>,
    /// `(lat, lon)` in degrees; both or neither.
    pub position: Option<(f64, f64)>,
    /// Metres per second.
    pub speed: Option<f64>,
    pub mode: Option<String>,
    /// Sorted by name, names unique.
    pub metrics: MetricSet,
}

/// A point's named metrics, sorted by name, names unique. The names share one buffer: every
/// live orb holds its latest point, and ~60 metrics as a `String` each (plus the `Vec` of
/// pairs) cost ~2.3 KB of it; here they cost ~1 KB, in three allocations instead of ~60.
/// Serialized as a sequence of `(name, value)` pairs, as the `Vec<(String, f64)>` it replaced
/// (stored points keep their encoding).
#[derive(Clone, Default, PartialEq)]
pub struct MetricSet {
    /// The names, one after another.
    names: Box<str>,
    /// Where each name ends in `names`.
    ends: Box<[u32]>,
    values: Box<[f64]>,
}

impl MetricSet {
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn name(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.names[start..self.ends[i] as usize]
    }

    /// `(name, value)` in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, f64)> + '_ {
        (0..self.len()).map(|i| (self.name(i), self.values[i]))
    }

    /// The value of metric `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.name(mid).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.values[mid]),
            }
        }
        None
    }

    /// About the bytes of the set in a stored point (a buffer size hint).
    pub fn encoded_len_hint(&self) -> usize {
        self.names.len() + 10 * self.len() + 2
    }

    /// Builds a set from pairs in any order; a name given twice is the error.
    pub fn from_pairs<S: AsRef<str>>(pairs: impl IntoIterator<Item = (S, f64)>) -> Result<MetricSet, String> {
        let mut b = MetricsBuilder::default();
        for (name, value) in pairs {
            b.push(name.as_ref(), value);
        }
        b.finish()
    }
}

impl fmt::Debug for MetricSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for MetricSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for MetricSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetricSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of (name, value) pairs")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<MetricSet, A::Error> {
                let mut b = MetricsBuilder::default();
                while let Some((name, value)) = seq.next_element::<(std::borrow::Cow<'de, str>, f64)>()? {
                    b.push(&name, value);
                }
                b.finish().map_err(|name| de::Error::custom(format!("metric {name:?} appears twice")))
            }
        }
        d.deserialize_seq(V)
    }
}

/// Collects metrics into one name buffer while parsing (no allocation per name). The entries'
/// names tile `names` in entry order: each name is appended, then made an entry
/// ([`MetricsBuilder::end_name`]) or cut off again.
#[derive(Default)]
struct MetricsBuilder {
    names: String,
    /// `(start, end, value)`: the name is `names[start..end]`.
    entries: Vec<(u32, u32, f64)>,
}

impl MetricsBuilder {
    /// Sized for a JSON payload of `len` bytes, so that parsing it does not grow the buffers
    /// (growing them was ten reallocations per 1 KiB point): its metric names take at most
    /// its bytes, and a metric at least six of them (`"a":0,`).
    fn for_payload(len: usize) -> Self {
        MetricsBuilder {
            names: String::with_capacity(len.min(TELEMETRY_METRICS_MAX * TELEMETRY_METRIC_NAME_LEN_MAX)),
            entries: Vec::with_capacity((len / 6).min(TELEMETRY_METRICS_MAX)),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn push(&mut self, name: &str, value: f64) {
        let start = self.names.len();
        self.names.push_str(name);
        self.end_name(start, Some(value));
    }

    /// The name appended to `names` since `start` becomes an entry with `value`, or is cut off
    /// without one (a null metric).
    fn end_name(&mut self, start: usize, value: Option<f64>) {
        match value {
            Some(v) => self.entries.push((start as u32, self.names.len() as u32, v)),
            None => self.names.truncate(start),
        }
    }

    fn name(&self, e: &(u32, u32, f64)) -> &str {
        &self.names[e.0 as usize..e.1 as usize]
    }

    fn iter(&self) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.entries.iter().map(|e| (self.name(e), e.2))
    }

    /// Sorts by name; the name that appears twice is the error.
    fn finish(mut self) -> Result<MetricSet, String> {
        let names = &self.names;
        let name = |e: &(u32, u32, f64)| &names[e.0 as usize..e.1 as usize];
        // Devices usually send the same names in the same order, often sorted: then the
        // buffer (whose names tile it in entry order) is kept as it is.
        if self.entries.windows(2).all(|w| name(&w[0]) < name(&w[1])) {
            let ends = self.entries.iter().map(|e| e.1).collect();
            let values = self.entries.iter().map(|e| e.2).collect();
            return Ok(MetricSet { names: self.names.into_boxed_str(), ends, values });
        }
        self.entries.sort_unstable_by(|a, b| name(a).cmp(name(b)));
        if let Some(w) = self.entries.windows(2).find(|w| name(&w[0]) == name(&w[1])) {
            return Err(name(&w[0]).to_string());
        }
        let mut sorted = String::with_capacity(names.len());
        let mut ends = Vec::with_capacity(self.entries.len());
        let mut values = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            sorted.push_str(name(e));
            ends.push(sorted.len() as u32);
            values.push(e.2);
        }
        Ok(MetricSet {
            names: sorted.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            values: values.into_boxed_slice(),
        })
    }
}

/// Appends a map key to the builder's name buffer (borrowed from the payload when it has no
/// escapes: no allocation).
struct NameInto<'a>(&'a mut String);

impl<'de> DeserializeSeed<'de> for NameInto<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameInto<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a metric name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push_str(v);
        Ok(())
    }
}

/// Why a payload was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not a telemetry JSON object: {0}")]
    Malformed(String),
    #[error("field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

impl PayloadError {
    pub fn code(&self) -> ErrorCode {
        match self {
            PayloadError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            PayloadError::Malformed(_) => ErrorCode::MalformedPayload,
            PayloadError::Invalid { .. } => ErrorCode::InvalidArgument,
        }
    }

    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        PayloadError::Invalid { field: field.to_string(), reason: reason.into() }
    }
}

/// Parses and validates one JSON telemetry object. `now_ms` fills a missing `ts` and bounds
/// clock skew; `max_bytes` is the configured payload limit.
pub fn parse(payload: &[u8], now_ms: u64, max_bytes: usize) -> Result<TelemetryPoint, PayloadError> {
    if payload.len() <= max_bytes
        && let Some(raw) = scan::raw(payload)
    {
        return validate(raw, now_ms);
    }
    parse_general(payload, now_ms, max_bytes)
}

/// [`parse`] without its fast path: the serde parser alone (what `parse` falls back to, and the
/// benchmark's same-run baseline).
#[doc(hidden)]
pub fn parse_general(payload: &[u8], now_ms: u64, max_bytes: usize) -> Result<TelemetryPoint, PayloadError> {
    if payload.len() > max_bytes {
        return Err(PayloadError::TooLarge { size: payload.len(), max: max_bytes });
    }
    validate(parse_raw(payload)?, now_ms)
}

/// The general parser (serde_json): every payload the fast path declines, and the one that
/// names what is wrong with a payload.
fn parse_raw(payload: &[u8]) -> Result<Raw, PayloadError> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let raw = RawSeed { payload_len: payload.len() }.deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(json_error)?;
    Ok(raw)
}

/// Parses a JSON value that is already in memory (the HTTP fallback's batches).
pub fn parse_value(value: &serde_json::Value, now_ms: u64) -> Result<TelemetryPoint, PayloadError> {
    let raw = RawSeed { payload_len: 0 }.deserialize(value).map_err(json_error)?;
    validate(raw, now_ms)
}

fn json_error(e: serde_json::Error) -> PayloadError {
    let msg = e.to_string();
    // Field errors raised by our visitor carry a marker so they map to `Invalid`.
    if let Some((field, reason)) = msg.strip_prefix(FIELD_MARK).and_then(|rest| rest.split_once(FIELD_SEP)) {
        return PayloadError::invalid(field, reason.to_string());
    }
    PayloadError::Malformed(msg)
}

const FIELD_MARK: &str = "\u{1}field:";
const FIELD_SEP: &str = "\u{1}";

fn field_err<E: de::Error>(field: &str, reason: impl fmt::Display) -> E {
    E::custom(format!("{FIELD_MARK}{field}{FIELD_SEP}{reason}"))
}

/// The payload as parsed, before range checks.
#[derive(Default)]
struct Raw {
    ts: Option<u64>,
    msg_id: Option<String>,
    battery: Option<f64>,
    lat: Option<f64>,
    lon: Option<f64>,
    speed: Option<f64>,
    mode: Option<String>,
    metrics: MetricsBuilder,
    seen: u16,
}

/// Parses a payload of `payload_len` bytes (0: unknown), which sizes the metric buffers.
struct RawSeed {
    payload_len: usize,
}

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Raw;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        d.deserialize_map(RawVisitor { payload_len: self.payload_len })
    }
}

struct RawVisitor {
    payload_len: usize,
}

/// A JSON value that may stand as a metric: a finite number, or a boolean as 0/1.
struct MetricValue(Option<f64>);

impl<'de> Deserialize<'de> for MetricValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetricValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a boolean")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<MetricValue, E> {
                Ok(MetricValue(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MetricValue, E> {
                Ok(MetricValue(Some(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MetricValue, E> {
                Ok(MetricValue(Some(v as f64)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<MetricValue, E> {
                Ok(MetricValue(Some(if v { 1.0 } else { 0.0 })))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MetricValue, E> {
                Ok(MetricValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The `metrics` object: names to numbers, appended to the point's builder.
struct MetricsSeed<'a>(&'a mut MetricsBuilder);

impl<'de> DeserializeSeed<'de> for MetricsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MetricsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of metric names to numbers")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let b = self.0;
        loop {
            let start = b.names.len();
            if map.next_key_seed(NameInto(&mut b.names))?.is_none() {
                return Ok(());
            }
            if b.len() >= TELEMETRY_METRICS_MAX {
                return Err(field_err("metrics", format!("more than {TELEMETRY_METRICS_MAX} metrics")));
            }
            let v: MetricValue =
                map.next_value().map_err(|e| field_err::<A::Error>(&format!("metrics.{}", &b.names[start..]), e))?;
            b.end_name(start, v.0);
        }
    }
}

fn opt_f64<'de, A: MapAccess<'de>>(map: &mut A, field: &str) -> Result<Option<f64>, A::Error> {
    map.next_value::<Option<f64>>().map_err(|e| field_err(field, e))
}

fn opt_string<'de, A: MapAccess<'de>>(map: &mut A, field: &str) -> Result<Option<String>, A::Error> {
    map.next_value::<Option<String>>().map_err(|e| field_err(field, e))
}

/// A top-level key; the known ones are matched without allocating.
enum Key {
    Ts,
    MsgId,
    Battery,
    Lat,
    Lon,
    Speed,
    Mode,
    Metrics,
    Other(String),
}

impl Key {
    /// The known field called `name`, if it is one (no allocation).
    fn known(name: &str) -> Option<Key> {
        Some(match name {
            "ts" => Key::Ts,
            "msg_id" => Key::MsgId,
            "battery" => Key::Battery,
            "lat" => Key::Lat,
            "lon" => Key::Lon,
            "speed" => Key::Speed,
            "mode" => Key::Mode,
            "metrics" => Key::Metrics,
            _ => return None,
        })
    }

    fn name(&self) -> &str {
        match self {
            Key::Ts => "ts",
            Key::MsgId => "msg_id",
            Key::Battery => "battery",
            Key::Lat => "lat",
            Key::Lon => "lon",
            Key::Speed => "speed",
            Key::Mode => "mode",
            Key::Metrics => "metrics",
            Key::Other(s) => s,
        }
    }

    /// Bit in `Raw::seen` for duplicate detection; 0 for other keys.
    fn bit(&self) -> u16 {
        match self {
            Key::Ts => 1,
            Key::MsgId => 2,
            Key::Battery => 4,
            Key::Lat => 8,
            Key::Lon => 16,
            Key::Speed => 32,
            Key::Mode => 64,
            Key::Metrics => 128,
            Key::Other(_) => 0,
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key::known(v).unwrap_or_else(|| Key::Other(v.to_string())))
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut raw = Raw { metrics: MetricsBuilder::for_payload(self.payload_len), ..Raw::default() };
        while let Some(key) = map.next_key::<Key>()? {
            let bit = key.bit();
            if bit != 0 {
                if raw.seen & bit != 0 {
                    return Err(field_err(key.name(), "appears twice"));
                }
                raw.seen |= bit;
            }
            let field = key.name();
            match &key {
                Key::Ts => {
                    raw.ts = map
                        .next_value::<Option<u64>>()
                        .map_err(|e| field_err(field, format!("{e}; expected unix milliseconds")))?
                }
                Key::MsgId => raw.msg_id = opt_string(&mut map, field)?,
                Key::Battery => raw.battery = opt_f64(&mut map, field)?,
                Key::Lat => raw.lat = opt_f64(&mut map, field)?,
                Key::Lon => raw.lon = opt_f64(&mut map, field)?,
                Key::Speed => raw.speed = opt_f64(&mut map, field)?,
                Key::Mode => raw.mode = opt_string(&mut map, field)?,
                Key::Metrics => map.next_value_seed(MetricsSeed(&mut raw.metrics))?,
                Key::Other(name) => {
                    let v: MetricValue = map.next_value().map_err(|e| {
                        field_err::<A::Error>(name, format!("{e}; unknown top-level fields must be numbers"))
                    })?;
                    if let Some(v) = v.0 {
                        if raw.metrics.len() >= TELEMETRY_METRICS_MAX {
                            return Err(field_err(name, format!("more than {TELEMETRY_METRICS_MAX} metrics")));
                        }
                        raw.metrics.push(name, v);
                    }
                }
            }
        }
        Ok(raw)
    }
}

fn finite(field: &str, v: f64) -> Result<f64, PayloadError> {
    if v.is_finite() { Ok(v) } else { Err(PayloadError::invalid(field, "must be a finite number")) }
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), PayloadError> {
    if s.is_empty() {
        return Err(PayloadError::invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(PayloadError::invalid(field, format!("is {} bytes; the limit is {max}", s.len())));
    }
    if has_control(s) {
        return Err(PayloadError::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Whether `s` holds a control character (`char::is_control`). Text of printable ASCII only
/// (metric names nearly always are) has none, which one pass over its bytes shows.
fn has_control(s: &str) -> bool {
    let printable_ascii = s.bytes().fold(true, |ok, b| ok & (0x20..0x7f).contains(&b));
    !printable_ascii && s.chars().any(char::is_control)
}

fn validate(raw: Raw, now_ms: u64) -> Result<TelemetryPoint, PayloadError> {
    let ts = match raw.ts {
        None => now_ms,
        Some(ts) if ts < TELEMETRY_TS_MIN_MS => {
            return Err(PayloadError::invalid("ts", format!("{ts} is before 2000-01-01; expected unix milliseconds")));
        }
        Some(ts) if ts > now_ms.saturating_add(TELEMETRY_CLOCK_SKEW_MAX_MS) => {
            return Err(PayloadError::invalid("ts", format!("{ts} is more than 24 h in the future")));
        }
        Some(ts) => ts,
    };
    if let Some(id) = &raw.msg_id {
        check_text("msg_id", id, TELEMETRY_MSG_ID_LEN_MAX)?;
    }
    if let Some(b) = raw.battery {
        let b = finite("battery", b)?;
        if !(0.0..=100.0).contains(&b) {
            return Err(PayloadError::invalid("battery", format!("{b} is outside 0..100")));
        }
    }
    let position = match (raw.lat, raw.lon) {
        (None, None) => None,
        (Some(lat), Some(lon)) => {
            let (lat, lon) = (finite("lat", lat)?, finite("lon", lon)?);
            if !(-90.0..=90.0).contains(&lat) {
                return Err(PayloadError::invalid("lat", format!("{lat} is outside -90..90")));
            }
            if !(-180.0..=180.0).contains(&lon) {
                return Err(PayloadError::invalid("lon", format!("{lon} is outside -180..180")));
            }
            Some((lat, lon))
        }
        (Some(_), None) => return Err(PayloadError::invalid("lon", "missing; lat and lon come together")),
        (None, Some(_)) => return Err(PayloadError::invalid("lat", "missing; lat and lon come together")),
    };
    if let Some(s) = raw.speed {
        let s = finite("speed", s)?;
        if s < 0.0 {
            return Err(PayloadError::invalid("speed", format!("{s} is negative")));
        }
    }
    if let Some(m) = &raw.mode {
        check_text("mode", m, TELEMETRY_MODE_LEN_MAX)?;
    }
    if raw.metrics.len() > TELEMETRY_METRICS_MAX {
        return Err(PayloadError::invalid("metrics", format!("more than {TELEMETRY_METRICS_MAX} metrics")));
    }
    for (name, v) in raw.metrics.iter() {
        // The field's name is built only for an error: this loop runs for every metric of
        // every message.
        let fine =
            !name.is_empty() && name.len() <= TELEMETRY_METRIC_NAME_LEN_MAX && !has_control(name) && v.is_finite();
        if !fine {
            let field = format!("metrics.{name}");
            check_text(&field, name, TELEMETRY_METRIC_NAME_LEN_MAX)?;
            finite(&field, v)?;
        }
    }
    let metrics =
        raw.metrics.finish().map_err(|name| PayloadError::invalid(&format!("metrics.{name}"), "appears twice"))?;
    Ok(TelemetryPoint {
        ts,
        msg_id: raw.msg_id,
        battery: raw.battery,
        position,
        speed: raw.speed,
        mode: raw.mode,
        metrics,
    })
}

impl TelemetryPoint {
    /// The point in the JSON shape devices send, for read APIs.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("ts".into(), self.ts.into());
        if let Some(id) = &self.msg_id {
            m.insert("msg_id".into(), id.clone().into());
        }
        if let Some(b) = self.battery {
            m.insert("battery".into(), b.into());
        }
        if let Some((lat, lon)) = self.position {
            m.insert("lat".into(), lat.into());
            m.insert("lon".into(), lon.into());
        }
        if let Some(s) = self.speed {
            m.insert("speed".into(), s.into());
        }
        if let Some(mode) = &self.mode {
            m.insert("mode".into(), mode.clone().into());
        }
        let metrics: serde_json::Map<_, _> =
            self.metrics.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v))).collect();
        m.insert("metrics".into(), metrics.into());
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const MAX: usize = 64 * 1024;

    fn p(s: &str) -> Result<TelemetryPoint, PayloadError> {
        parse(s.as_bytes(), NOW, MAX)
    }

    /// Parses `payload` as `parse` does and returns the metric buffers' capacities, before
    /// and after.
    fn metric_buffers(payload: &str) -> ((usize, usize), (usize, usize), usize) {
        let fresh = MetricsBuilder::for_payload(payload.len());
        let mut de = serde_json::Deserializer::from_slice(payload.as_bytes());
        let raw = RawSeed { payload_len: payload.len() }.deserialize(&mut de).unwrap();
        let m = &raw.metrics;
        ((fresh.names.capacity(), fresh.entries.capacity()), (m.names.capacity(), m.entries.capacity()), m.len())
    }

    #[test]
    fn the_control_check_is_char_is_control_for_every_character() {
        let mut buf = [0u8; 4];
        for c in (0..=0x10_ffffu32).filter_map(char::from_u32) {
            let one: &str = c.encode_utf8(&mut buf);
            assert_eq!(has_control(one), c.is_control(), "{c:?}");
            assert_eq!(has_control(&format!("ok{one}é")), c.is_control(), "{c:?} among others");
        }
    }

    #[test]
    fn parsing_does_not_grow_the_metric_buffers() {
        // A typical point: 80 metrics in metrics{}, unsorted, plus top-level extras.
        let metrics: Vec<String> = (0..80).rev().map(|i| format!(r#""sensor_{i:02}_temp":{i}.5"#)).collect();
        let typical = format!(r#"{{"ts":{NOW},"msg_id":"m1","rpm":1200,"metrics":{{{}}}}}"#, metrics.join(","));
        // The densest: one-letter names and one-digit values, at the metric limit.
        let names: Vec<String> = (0..TELEMETRY_METRICS_MAX)
            .map(|i| format!(r#""{}{}":{}"#, char::from(b'a' + (i % 26) as u8), i / 26, i % 10))
            .collect();
        let dense = format!(r#"{{"metrics":{{{}}}}}"#, names.join(","));
        // Escaped names decode shorter than they are written.
        let escaped = r#"{"metrics":{"\u0061\u0062":1,"c\"d":2,"e":3}}"#.to_string();
        for (what, payload, count) in
            [("typical", typical, 81), ("dense", dense, TELEMETRY_METRICS_MAX), ("escaped", escaped, 3)]
        {
            let (before, after, n) = metric_buffers(&payload);
            assert_eq!(n, count, "{what}: every metric parsed");
            assert_eq!(after, before, "{what}: the buffers kept their first size");
        }
    }

    #[test]
    fn full_point_parses_with_extra_numbers_as_metrics() {
        let pt = p(r#"{"ts":1700000000001,"msg_id":"m1","battery":55.5,"lat":37.7,"lon":-122.4,
            "speed":3.2,"mode":"mission","metrics":{"temp":21},"rpm":900,"charging":true,"note":null}"#)
        .unwrap();
        assert_eq!(pt.ts, 1_700_000_000_001);
        assert_eq!(pt.msg_id.as_deref(), Some("m1"));
        assert_eq!(pt.battery, Some(55.5));
        assert_eq!(pt.position, Some((37.7, -122.4)));
        assert_eq!(pt.mode.as_deref(), Some("mission"));
        let metrics: Vec<(&str, f64)> = pt.metrics.iter().collect();
        assert_eq!(metrics, vec![("charging", 1.0), ("rpm", 900.0), ("temp", 21.0)]);
        assert_eq!(
            (pt.metrics.get("rpm"), pt.metrics.get("temp"), pt.metrics.get("nope")),
            (Some(900.0), Some(21.0), None)
        );
    }

    #[test]
    fn metric_sets_sort_find_refuse_duplicates_and_encode_as_pairs() {
        let set = MetricSet::from_pairs([("rpm", 900.0), ("a", 1.0), ("temp_c", -3.5), ("", 0.0)]).unwrap();
        let pairs: Vec<(&str, f64)> = set.iter().collect();
        assert_eq!(pairs, vec![("", 0.0), ("a", 1.0), ("rpm", 900.0), ("temp_c", -3.5)]);
        assert_eq!(
            (set.len(), set.get("a"), set.get("rpm"), set.get("temp"), set.get("")),
            (4, Some(1.0), Some(900.0), None, Some(0.0))
        );
        assert_eq!(MetricSet::from_pairs([("x", 1.0), ("y", 2.0), ("x", 3.0)]), Err("x".to_string()));
        // Already in order (the buffer is kept): the same set as from any other order.
        let sorted = MetricSet::from_pairs([("", 0.0), ("a", 1.0), ("rpm", 900.0), ("temp_c", -3.5)]).unwrap();
        assert_eq!(sorted, set);
        assert_eq!(MetricSet::from_pairs([("a", 1.0), ("a", 2.0), ("b", 3.0)]), Err("a".to_string()));
        assert!(MetricSet::default().is_empty() && MetricSet::default().get("x").is_none());
        // Stored points encoded a `Vec<(String, f64)>`: the same bytes, both ways.
        let old: Vec<(String, f64)> = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let bytes = postcard::to_allocvec(&set).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&old).unwrap());
        assert_eq!(postcard::from_bytes::<MetricSet>(&bytes).unwrap(), set);
        let dup: Vec<(String, f64)> = vec![("x".into(), 1.0), ("x".into(), 2.0)];
        assert!(postcard::from_bytes::<MetricSet>(&postcard::to_allocvec(&dup).unwrap()).is_err());
    }

    #[test]
    fn escaped_and_null_metric_names_parse() {
        let pt = p(r#"{"metrics":{"a\u0062":2,"skip":null,"c":3},"d":null,"e":false}"#).unwrap();
        let pairs: Vec<(&str, f64)> = pt.metrics.iter().collect();
        assert_eq!(pairs, vec![("ab", 2.0), ("c", 3.0), ("e", 0.0)]);
    }

    #[test]
    fn missing_ts_takes_server_time() {
        assert_eq!(p("{}").unwrap().ts, NOW);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (r#"{"battery":101}"#, "battery"),
            (r#"{"battery":"full"}"#, "battery"),
            (r#"{"lat":91,"lon":0}"#, "lat"),
            (r#"{"lat":1}"#, "lon"),
            (r#"{"speed":-1}"#, "speed"),
            (r#"{"ts":5}"#, "ts"),
            (r#"{"ts":-5}"#, "ts"),
            (r#"{"ts":99999999999999}"#, "ts"),
            (r#"{"mode":""}"#, "mode"),
            (r#"{"colour":"red"}"#, "colour"),
            (r#"{"metrics":{"a":"x"}}"#, "metrics.a"),
            (r#"{"metrics":{"a":1},"a":2}"#, "metrics.a"),
            (r#"{"battery":1,"battery":2}"#, "battery"),
        ];
        for (json, field) in cases {
            match p(json) {
                Err(PayloadError::Invalid { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: expected Invalid({field}), got {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_json_and_non_objects_are_malformed() {
        for json in ["{", "[]", "42", "\"x\"", "{} {}", "not json", ""] {
            assert!(matches!(p(json), Err(PayloadError::Malformed(_))), "{json:?}");
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_parsing() {
        let big = vec![b' '; MAX + 1];
        assert_eq!(parse(&big, NOW, MAX), Err(PayloadError::TooLarge { size: MAX + 1, max: MAX }));
    }

    #[test]
    fn too_many_metrics_is_refused() {
        let body: Vec<String> = (0..=TELEMETRY_METRICS_MAX).map(|i| format!("\"m{i}\":1")).collect();
        let json = format!("{{\"metrics\":{{{}}}}}", body.join(","));
        assert!(matches!(p(&json), Err(PayloadError::Invalid { .. })));
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let pt = p(
            r#"{"ts":1700000000001,"msg_id":"m","battery":5,"lat":1,"lon":2,"speed":0,"mode":"x","metrics":{"t":1}}"#,
        )
        .unwrap();
        let again = parse_value(&pt.to_json(), NOW).unwrap();
        assert_eq!(pt, again);
    }

    /// Seeded mutations of valid payloads: the parser never panics, and whatever it accepts
    /// re-parses to the same point. Rerun a failure with OM_TEST_SEED=<seed>.
    #[test]
    fn mutated_payloads_never_panic_and_accepted_points_round_trip() {
        let seed = std::env::var("OM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
        let result = std::panic::catch_unwind(|| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let base = br#"{"ts":1700000000001,"msg_id":"m1","battery":55.5,"lat":37.7,"lon":-122.4,"speed":3.2,"mode":"mission","metrics":{"temp":21,"x":-1e3},"rpm":900}"#;
            let alphabet = b"{}[]\":,.-+eE0123456789 truefalsnul\\u00";
            for _ in 0..20_000 {
                let mut bytes = base.to_vec();
                for _ in 0..rng.usize(1..6) {
                    let i = rng.usize(0..bytes.len());
                    match rng.u8(0..3) {
                        0 => bytes[i] = alphabet[rng.usize(0..alphabet.len())],
                        1 => bytes.insert(i, alphabet[rng.usize(0..alphabet.len())]),
                        _ => {
                            bytes.remove(i);
                        }
                    }
                }
                if let Ok(pt) = parse(&bytes, NOW, MAX) {
                    assert_eq!(parse_value(&pt.to_json(), NOW), Ok(pt));
                }
            }
        });
        if let Err(e) = result {
            eprintln!("telemetry parser property broken with OM_TEST_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}

//! The telemetry parser's fast path: a single forward scan of the payload shapes devices send
//! (one JSON object of plain ASCII strings, numbers, booleans and nulls, with at most the
//! `metrics` object inside), straight into the parser's [`Raw`]. It accepts only what the serde
//! path accepts and then yields the same `Raw`; on anything else (escapes, non-ASCII text,
//! another shape, a syntax error, a repeated field, an out-of-range number, a full metric set)
//! it declines, and the serde path parses the payload and names the error. So the fast path
//! changes what a payload costs, never what it means; a differential test holds it to that.
//!
//! Numbers of up to 19 significant digits (a device's doubles have 17): `m x 10^e` with
//! `m <= 2^53` and `|e| <= 22` is one exactly rounded IEEE operation on two exact operands
//! (Clinger's fast path); the others go through `str::parse::<f64>`. Both round correctly, as
//! serde_json does for such numbers with its `float_roundtrip` feature, so every number reads
//! as the same `f64` on both paths (an integer the serde path reads as `u64` or `i64` and then
//! converts rounds to the same nearest double). Longer numbers are declined: serde_json's
//! long-number algorithm truncates at 768 digits and can round a tie differently.

use super::{Key, MetricsBuilder, Raw};
use crate::limits::TELEMETRY_METRICS_MAX;

/// Powers of ten that a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// Parses `payload` when it has the plain shape, else `None` (the serde path then parses it).
pub(super) fn raw(payload: &[u8]) -> Option<Raw> {
    // Checked once here, so that every string found inside is a slice of it.
    let text = std::str::from_utf8(payload).ok()?;
    let mut s = Scan { b: payload, text, i: 0 };
    let mut raw = Raw { metrics: MetricsBuilder::for_payload(payload.len()), ..Raw::default() };
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            let key = s.string()?;
            s.ws();
            s.eat(b':')?;
            s.ws();
            match Key::known(key) {
                Some(field) => {
                    if field.bit() & raw.seen != 0 {
                        return None; // a field given twice: the serde path names it
                    }
                    raw.seen |= field.bit();
                    match field {
                        Key::Ts => raw.ts = s.opt_u64()?,
                        Key::MsgId => raw.msg_id = s.opt_string()?.map(str::to_owned),
                        Key::Battery => raw.battery = s.opt_f64()?,
                        Key::Lat => raw.lat = s.opt_f64()?,
                        Key::Lon => raw.lon = s.opt_f64()?,
                        Key::Speed => raw.speed = s.opt_f64()?,
                        Key::Mode => raw.mode = s.opt_string()?.map(str::to_owned),
                        Key::Metrics => s.metrics(&mut raw.metrics)?,
                        Key::Other(_) => return None, // `known` gives no other
                    }
                }
                // Any other top-level number (or boolean) is a metric.
                None => {
                    if let Some(v) = s.metric_value()? {
                        if raw.metrics.len() >= TELEMETRY_METRICS_MAX {
                            return None;
                        }
                        raw.metrics.push(key, v);
                    }
                }
            }
            s.ws();
            match s.next()? {
                b',' => s.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.ws();
    (s.i == s.b.len()).then_some(raw)
}

struct Scan<'a> {
    b: &'a [u8],
    /// `b` as text.
    text: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// A literal such as `null` at the current position (its first byte peeked, not consumed).
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string of printable ASCII without escapes (anything else declines).
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        // Eight bytes at a time while none of them ends the string or needs a look.
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            if needs_look(u64::from_le_bytes(chunk.try_into().ok()?)) {
                break;
            }
            self.i += 8;
        }
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' | 0..=0x1f | 0x7f.. => return None,
                _ => {}
            }
        }
        self.text.get(start..self.i - 1)
    }

    fn opt_string(&mut self) -> Option<Option<&'a str>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.string().map(Some),
        }
    }

    /// Unix milliseconds: digits only (a sign, fraction or exponent is the serde path's error).
    fn opt_u64(&mut self) -> Option<Option<u64>> {
        match self.peek()? {
            b'n' => return self.literal(b"null").map(|()| None),
            b'0' => {
                self.i += 1;
                return match self.peek() {
                    Some(b'0'..=b'9' | b'.' | b'e' | b'E') => None,
                    _ => Some(Some(0)),
                };
            }
            b'1'..=b'9' => {}
            _ => return None,
        }
        let mut v: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        match self.peek() {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(Some(v)),
        }
    }

    fn opt_f64(&mut self) -> Option<Option<f64>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.number().map(Some),
        }
    }

    /// A metric's value: a number, a boolean as 1/0, or null (no metric).
    fn metric_value(&mut self) -> Option<Option<f64>> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| Some(1.0)),
            b'f' => self.literal(b"false").map(|()| Some(0.0)),
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.number().map(Some),
        }
    }

    /// The `metrics` object (or null).
    fn metrics(&mut self, b: &mut MetricsBuilder) -> Option<()> {
        if self.peek()? == b'n' {
            return self.literal(b"null");
        }
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let name = self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            if b.len() >= TELEMETRY_METRICS_MAX {
                return None;
            }
            if let Some(v) = self.metric_value()? {
                b.push(name, v);
            }
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A JSON number (RFC 8259 grammar), as the nearest double; out of range declines.
    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        let neg = self.peek()? == b'-';
        if neg {
            self.i += 1;
        }
        let mut m: u64 = 0;
        let mut digits = 0u32;
        match self.next()? {
            b'0' => {}
            c @ b'1'..=b'9' => {
                m = u64::from(c - b'0');
                digits = 1;
                while let Some(c @ b'0'..=b'9') = self.peek() {
                    m = m.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
                    digits = digits.saturating_add(1);
                    self.i += 1;
                }
            }
            _ => return None,
        }
        let mut frac = 0i32;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let at = self.i;
            while let Some(c @ b'0'..=b'9') = self.peek() {
                if m != 0 || c != b'0' {
                    digits = digits.saturating_add(1);
                }
                m = m.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
                frac = frac.saturating_add(1);
                self.i += 1;
            }
            if self.i == at {
                return None;
            }
        }
        let mut exp = 0i32;
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            let eneg = match self.peek()? {
                b'-' => {
                    self.i += 1;
                    true
                }
                b'+' => {
                    self.i += 1;
                    false
                }
                _ => false,
            };
            let at = self.i;
            while let Some(c @ b'0'..=b'9') = self.peek() {
                exp = exp.saturating_mul(10).saturating_add(i32::from(c - b'0'));
                self.i += 1;
            }
            if self.i == at {
                return None;
            }
            if eneg {
                exp = -exp;
            }
        }
        // A digit right after the number (`01`) is the serde path's syntax error.
        if let Some(b'0'..=b'9') = self.peek() {
            return None;
        }
        // More than 19 significant digits: serde_json reads such a number with its own
        // long-number algorithm, which keeps 768 digits and counts any beyond as non-zero, so a
        // correctly rounded parse can differ from it at a tie. Devices' doubles have 17.
        if digits > 19 {
            return None;
        }
        let e10 = exp.saturating_sub(frac);
        let v = if m <= 1 << 53 && (-22..=22).contains(&e10) {
            let m = m as f64;
            if e10 >= 0 { m * POW10[e10 as usize] } else { m / POW10[(-e10) as usize] }
        } else {
            let text = self.text.get(start..self.i)?;
            let v = text.parse::<f64>().ok()?.abs();
            // Overflow is the serde path's error; underflow to zero is left to it as well.
            if !v.is_finite() || (v == 0.0 && mantissa_nonzero(text)) {
                return None;
            }
            v
        };
        Some(if neg { -v } else { v })
    }
}

/// Whether any of the eight bytes in `w` is a quote, a backslash, a control byte (below 0x20,
/// or 0x7f) or not ASCII (the classic "has a byte less than / equal to" word tricks).
fn needs_look(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (w & HIGH) != 0
        || below_space != 0
        || zero_byte(w ^ (ONES * u64::from(b'"'))) != 0
        || zero_byte(w ^ (ONES * u64::from(b'\\'))) != 0
        || zero_byte(w ^ (ONES * 0x7f)) != 0
}

/// Whether the digits before the exponent of a JSON number are not all zero.
fn mantissa_nonzero(text: &str) -> bool {
    text.bytes().take_while(|c| !matches!(c, b'e' | b'E')).any(|c| matches!(c, b'1'..=b'9'))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::{PayloadError, Raw, parse, parse_general, parse_raw, validate};
    use crate::limits::TELEMETRY_METRICS_MAX;

    const NOW: u64 = 1_700_000_000_000;
    const MAX: usize = 64 * 1024;

    /// A parse result compared bit for bit (postcard keeps each double's bits: -0.0 is not 0.0).
    fn encoded(r: Result<super::super::TelemetryPoint, PayloadError>) -> Result<Vec<u8>, PayloadError> {
        r.map(|p| postcard::to_allocvec(&p).unwrap())
    }

    /// What the serde path alone makes of `b`.
    fn general(b: &[u8]) -> Result<Vec<u8>, PayloadError> {
        encoded(parse_general(b, NOW, MAX))
    }

    /// Checks that the fast path, where it accepts `b`, yields what the serde path yields, and
    /// that `parse` as a whole agrees with the serde path. Returns whether the fast path took it.
    fn agrees(b: &[u8]) -> bool {
        let text = String::from_utf8_lossy(b);
        let expected = general(b);
        assert_eq!(encoded(parse(b, NOW, MAX)), expected, "parse vs the serde path on {text:?}");
        let Some(raw) = super::raw(b) else { return false };
        // Field by field before validation (which stops at the first refusal and would hide a
        // later difference), doubles by their bits.
        let serde = parse_raw(b).unwrap_or_else(|e| panic!("the fast path took what serde refuses ({e}): {text:?}"));
        assert_eq!(fields(&raw), fields(&serde), "fast path vs the serde path on {text:?}");
        assert_eq!(encoded(validate(raw, NOW)), expected, "fast path on {text:?}");
        true
    }

    /// Everything a `Raw` holds, doubles as bits.
    fn fields(r: &Raw) -> impl PartialEq + std::fmt::Debug {
        let bits = |v: Option<f64>| v.map(f64::to_bits);
        let metrics: Vec<(u32, u32, u64)> = r.metrics.entries.iter().map(|&(a, b, v)| (a, b, v.to_bits())).collect();
        (
            (r.ts, r.msg_id.clone(), r.mode.clone(), r.seen),
            (bits(r.battery), bits(r.lat), bits(r.lon), bits(r.speed)),
            (r.metrics.names.clone(), metrics),
        )
    }

    #[test]
    fn takes_what_the_simulator_sends_and_reads_it_as_serde_does() {
        let mut out = Vec::new();
        for size in [0usize, 64, 200, 256, 1000, 1024, 4096, 16 * 1024] {
            for seq in [0u64, 1, 7, 999, 123_456_789] {
                out.clear();
                crate::sim::workload::synthetic_into(&mut out, "sim-00042", seq, NOW - 5, size);
                assert!(agrees(&out), "declined a simulator payload of {size} B: {:?}", String::from_utf8_lossy(&out));
            }
        }
    }

    #[test]
    fn the_word_check_flags_exactly_the_bytes_that_need_a_look() {
        for b in 0..=255u8 {
            let flagged = b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b);
            for at in 0..8 {
                let mut w = *b"abcdefgh";
                w[at] = b;
                assert_eq!(super::needs_look(u64::from_le_bytes(w)), flagged, "byte {b:#04x} at {at}");
            }
        }
    }

    #[test]
    fn plain_payloads_take_the_fast_path_and_read_the_same() {
        let taken = [
            r#"{}"#,
            r#"  { "ts" : 1700000000000 , "battery" : 50 }  "#,
            "{\n\t\"ts\":1699999999999,\r\n\"lat\":-0,\"lon\":-0.0,\"speed\":0}\n",
            r#"{"battery":99.5,"lat":37.774929,"lon":-122.419416,"speed":12.25,"mode":"mission","msg_id":"a-1"}"#,
            r#"{"ts":null,"msg_id":null,"battery":null,"lat":null,"lon":null,"speed":null,"mode":null,"metrics":null}"#,
            r#"{"metrics":{}}"#,
            r#"{"metrics":{"b":1,"a":2,"c":null,"d":true,"e":false}}"#,
            r#"{"x":1e3,"y":1E-3,"z":-2.5e+2,"v":0.1e-30,"u":9007199254740993,"t":0.0000000000000000000000001}"#,
            r#"{"a":9223372036854775807,"b":-9223372036854775808,"c":1844674407370955161,"d":1999999999999999999}"#,
            r#"{"p":2.2250738585072014e-308,"q":1.7976931348623157e308,"r":4.9e-324,"s":0.30000000000000004}"#,
            r#"{"u":1e22,"v":1e23,"w":123.456e-5,"x":0e99999999999,"z":-0e-5}"#,
            r#"{"d":-9223372036854775809,"e":-1844674407370955162}"#,
            "{ \"metrics\" : { \"a\" :\t1 ,\n\"bb_long_name_1\" : 2 } , \"lat\":1,\"lon\" : 2 }",
            r#"{"same":1,"other":2,"metrics":{"m":3}}"#,
            r#"{"ts":1700000000000,"battery":150}"#,
            r#"{"lat":10}"#,
            r#"{"metrics":{"":1}}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"mode":""}"#,
        ];
        for p in taken {
            assert!(agrees(p.as_bytes()), "declined {p}");
        }
    }

    #[test]
    fn anything_else_is_left_to_the_serde_path_with_the_same_outcome() {
        let too_many: String = format!(
            "{{\"metrics\":{{{}}}}}",
            (0..=TELEMETRY_METRICS_MAX).map(|i| format!("\"m{i}\":{i}")).collect::<Vec<_>>().join(",")
        );
        let too_many_top: String = format!(
            "{{{}}}",
            (0..=TELEMETRY_METRICS_MAX).map(|i| format!("\"m{i}\":{i}")).collect::<Vec<_>>().join(",")
        );
        // 1 + 2^-53 (a tie between two doubles) written with 800 more zeros: serde_json's long
        // reading (768 digits kept, the rest counted as non-zero) rounds it up; a correctly
        // rounded parse rounds it to even (1.0).
        let long_tie =
            format!("{{\"battery\":100000000000000011102230246251565404236316680908203125{}e-853}}", "0".repeat(800));
        // A full metric set and one more name with a null value: serde refuses the name.
        let full_then_null = format!(
            "{{\"metrics\":{{{},\"z\":null}}}}",
            (0..TELEMETRY_METRICS_MAX).map(|i| format!("\"m{i}\":{i}")).collect::<Vec<_>>().join(",")
        );
        let declined = [
            "",
            " ",
            "[]",
            "null",
            "{",
            "}",
            r#"{"ts":1700000000000,}"#,
            r#"{"ts":1700000000000}x"#,
            r#"{"ts":1700000000000}{}"#,
            r#"{"ts":01}"#,
            r#"{"ts":-1}"#,
            r#"{"ts":1.5}"#,
            r#"{"ts":1e12}"#,
            r#"{"ts":18446744073709551616}"#,
            r#"{"ts":"1700000000000"}"#,
            r#"{"t\u0073":1700000000000}"#,
            r#"{"msg_id":"a\"b"}"#,
            r#"{"msg_id":"é"}"#,
            "{\"msg_id\":\"a\tb\"}",
            r#"{"msg_id":5}"#,
            r#"{"battery":true}"#,
            r#"{"battery":"50"}"#,
            r#"{"battery":.5}"#,
            r#"{"battery":5.}"#,
            r#"{"battery":+5}"#,
            r#"{"battery":-}"#,
            r#"{"battery":1e}"#,
            r#"{"battery":1e+}"#,
            r#"{"battery":00}"#,
            r#"{"battery":-01}"#,
            r#"{"battery":1.2.3}"#,
            r#"{"battery":1e400}"#,
            r#"{"battery":-1e400}"#,
            r#"{"battery":1e-400}"#,
            r#"{"battery":1e99999999999999}"#,
            r#"{"battery":1e-99999999999999}"#,
            // More than 19 significant digits: left to serde_json's own long-number reading.
            r#"{"w":123456789012345678901234567890}"#,
            r#"{"a":18446744073709551615,"b":18446744073709551616}"#,
            r#"{"t":1.00000000000000011102230246251565404236316680908203125}"#,
            r#"{"x":1.0000000000000000000}"#,
            &long_tie,
            &full_then_null,
            r#"{"battery":nul}"#,
            r#"{"battery":NaN}"#,
            r#"{"battery":Infinity}"#,
            r#"{"ts":1,"ts":2}"#,
            r#"{"metrics":{},"metrics":{}}"#,
            r#"{"metrics":[]}"#,
            r#"{"metrics":5}"#,
            r#"{"metrics":{"a":{}}}"#,
            r#"{"metrics":{"a":"1"}}"#,
            r#"{"metrics":{"a":[1]}}"#,
            r#"{"metrics":{"a":1,}}"#,
            r#"{"metrics":{"a" 1}}"#,
            r#"{"metrics":{"a":1 "b":2}}"#,
            r#"{"x":"text"}"#,
            r#"{"x":{}}"#,
            r#"{"x":[1,2]}"#,
            r#"{"x":tru}"#,
            r#"{"x":falsey}"#,
            "{\"ts\":1700000000000}\u{0}",
            &too_many,
            &too_many_top,
        ];
        for p in declined {
            assert!(!agrees(p.as_bytes()), "the fast path took {p:?}");
        }
        // Not valid UTF-8 inside a string, and a lone byte outside one.
        assert!(!agrees(b"{\"msg_id\":\"\xff\"}"));
        assert!(!agrees(b"{\"a\":1}\xff"));
    }

    /// Text that is close to a telemetry payload, right or wrong.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["ts", "msg_id", "battery", "lat", "lon", "speed", "mode", "metrics"])
                .prop_map(|k| format!("\"{k}\"")),
            4 => "[a-z_]{0,6}".prop_map(|k| format!("\"{k}\"")),
            1 => "[a-z_0-9 ]{7,24}".prop_map(|k| format!("\"{k}\"")),
            1 => prop::sample::select(vec![r#""t\u0073""#, r#""b\"""#, "\"é\"", "\"a\tb\"", "x", "\"m\\n\""])
                .prop_map(str::to_string),
        ]
    }

    fn number() -> impl Strategy<Value = String> {
        let digits = "[0-9]{1,25}";
        prop_oneof![
            (
                any::<bool>(),
                digits,
                prop::option::of("[0-9]{1,20}"),
                prop::option::of(("[eE]", "[+-]?", "[0-9]{1,14}"))
            )
                .prop_map(|(neg, int, frac, exp)| {
                    let mut s = String::new();
                    if neg {
                        s.push('-');
                    }
                    s.push_str(&int);
                    if let Some(f) = frac {
                        s.push('.');
                        s.push_str(&f);
                    }
                    if let Some((e, sign, d)) = exp {
                        s.push_str(&e);
                        s.push_str(&sign);
                        s.push_str(&d);
                    }
                    s
                }),
            // Long numbers, up to past serde_json's 768 kept digits.
            (
                "[1-9]",
                prop::collection::vec(prop::sample::select(vec!['0', '0', '0', '5', '9']), 18..900),
                "-?[0-9]{1,3}"
            )
                .prop_map(|(first, rest, e)| format!("{first}.{}e{e}", rest.into_iter().collect::<String>())),
            any::<f64>().prop_map(|v| format!("{v}")),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            prop::sample::select(vec!["-0", "0", "1e308", "1e309", "2e-324", "1.", ".1", "+1", "-", "1e", "01"])
                .prop_map(str::to_string),
        ]
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => number(),
            1 => prop::sample::select(vec!["true", "false", "null", "nul", "\"mission\"", "\"a\\\"b\"", "\"é\"", "[]", "[1]"])
                .prop_map(str::to_string),
        ]
    }

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n", "\t", "\r\n "])
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            5 => scalar(),
            1 => prop::collection::vec((key(), ws(), scalar()), 0..6).prop_map(|entries| {
                let inner: Vec<String> = entries.into_iter().map(|(k, w, v)| format!("{k}{w}:{w}{v}{w}")).collect();
                format!("{{{}}}", inner.join(","))
            }),
        ]
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let object =
            (ws(), prop::collection::vec((key(), ws(), value(), ws()), 0..10), ws()).prop_map(|(a, entries, b)| {
                let inner: Vec<String> =
                    entries.into_iter().map(|(k, w, v, w2)| format!("{w2}{k}{w}:{w2}{v}{w2}")).collect();
                format!("{a}{{{}}}{b}", inner.join(",")).into_bytes()
            });
        // And the same, with one byte deleted, replaced or inserted.
        (object, any::<prop::sample::Index>(), 0u8..4, any::<u8>()).prop_map(|(mut b, at, how, byte)| {
            if !b.is_empty() {
                let i = at.index(b.len());
                match how {
                    1 => {
                        b.remove(i);
                    }
                    2 => b[i] = byte,
                    3 => b.insert(i, byte),
                    _ => {}
                }
            }
            b
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        #[test]
        fn the_fast_path_reads_every_payload_as_the_serde_path_does(b in payload()) {
            agrees(&b);
        }

        #[test]
        fn numbers_read_as_the_same_double(n in number()) {
            agrees(format!("{{\"battery\":{n},\"metrics\":{{\"m\":{n}}},\"x\":{n}}}").as_bytes());
        }

        /// Metric sets around the limit, with nulls anywhere, in `metrics` or at the top level.
        #[test]
        fn metric_sets_near_the_limit_are_read_or_refused_alike(
            values in prop::collection::vec(prop::option::of(0u16..1000), TELEMETRY_METRICS_MAX - 3..TELEMETRY_METRICS_MAX + 3),
            top in any::<bool>(),
        ) {
            let entries: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Some(v) => format!("\"m{i}\":{v}"),
                    None => format!("\"m{i}\":null"),
                })
                .collect();
            let payload = if top {
                format!("{{{}}}", entries.join(","))
            } else {
                format!("{{\"metrics\":{{{}}}}}", entries.join(","))
            };
            agrees(payload.as_bytes());
        }
    }
}

//! The fleet search language, parsed into a predicate tree:
//!
//! ```text
//! battery < 20 AND mode = "mission" AND version.firmware = "2.3.1" AND within(37.7, -122.4, 5km)
//! NOT online OR (status != "active" AND attr.depot = "sf-3")
//! ```
//!
//! Fields: `orb_id`, `status`, `online`, `battery`, `speed`, `lat`, `lon`, `mode`,
//! `last_seen_ms`, `version.<component>`, `attr.<key>`. Operators `= != < <= > >=`; values are
//! numbers, "strings" or true/false; `within(lat, lon, distance)` with `km` or `m`. Keywords are
//! case-insensitive. A parse error names the byte position where it went wrong.

use std::fmt;

/// A searchable field.
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    OrbId,
    Status,
    Online,
    Battery,
    Speed,
    Lat,
    Lon,
    Mode,
    LastSeen,
    Version(String),
    Attr(String),
}

impl Field {
    /// The field a name refers to (`battery`, `version.firmware`, ...).
    pub fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "orb_id" | "id" => Field::OrbId,
            "status" => Field::Status,
            "online" => Field::Online,
            "battery" => Field::Battery,
            "speed" => Field::Speed,
            "lat" => Field::Lat,
            "lon" => Field::Lon,
            "mode" => Field::Mode,
            "last_seen_ms" => Field::LastSeen,
            _ => {
                let (ns, rest) = name.split_once('.')?;
                if rest.is_empty() {
                    return None;
                }
                match ns {
                    "version" => Field::Version(rest.to_string()),
                    "attr" => Field::Attr(rest.to_string()),
                    _ => return None,
                }
            }
        })
    }

    /// Whether the field holds numbers (ordering comparisons, aggregations).
    pub fn is_numeric(&self) -> bool {
        matches!(self, Field::Battery | Field::Speed | Field::Lat | Field::Lon | Field::LastSeen)
    }
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A literal.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Num(f64),
    Str(String),
    Bool(bool),
}

/// A parsed query.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Field, Op, Value),
    /// Within `radius_m` metres of (lat, lon).
    Within {
        lat: f64,
        lon: f64,
        radius_m: f64,
    },
    /// The empty query: everything.
    True,
}

/// A parse error with its byte position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError {
    pub pos: usize,
    pub message: String,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "query: at position {}: {}", self.pos, self.message)
    }
}

/// Longest query accepted, in bytes.
pub const QUERY_LEN_MAX: usize = 4096;
/// Deepest nesting accepted.
const DEPTH_MAX: usize = 32;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Num(f64),
    Str(String),
    Op(Op),
    LParen,
    RParen,
    Comma,
}

fn err<T>(pos: usize, message: impl Into<String>) -> Result<T, QueryError> {
    Err(QueryError { pos, message: message.into() })
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, QueryError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((start, Tok::LParen));
                i += 1;
            }
            b')' => {
                out.push((start, Tok::RParen));
                i += 1;
            }
            b',' => {
                out.push((start, Tok::Comma));
                i += 1;
            }
            b'=' => {
                out.push((start, Tok::Op(Op::Eq)));
                i += if b.get(i + 1) == Some(&b'=') { 2 } else { 1 };
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push((start, Tok::Op(Op::Ne)));
                i += 2;
            }
            b'<' | b'>' => {
                let eq = b.get(i + 1) == Some(&b'=');
                let op = match (c, eq) {
                    (b'<', true) => Op::Le,
                    (b'<', false) => Op::Lt,
                    (_, true) => Op::Ge,
                    _ => Op::Gt,
                };
                out.push((start, Tok::Op(op)));
                i += if eq { 2 } else { 1 };
            }
            b'"' | b'\'' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return err(start, "unterminated string"),
                        Some(&q) if q == quote => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if i + 1 < b.len() => {
                            s.push(b[i + 1] as char);
                            i += 2;
                        }
                        Some(_) => {
                            let ch = src[i..].chars().next().expect("in bounds");
                            s.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                out.push((start, Tok::Str(s)));
            }
            b'0'..=b'9' | b'-' | b'.' => {
                i += 1;
                while i < b.len()
                    && (b[i].is_ascii_digit()
                        || matches!(b[i], b'.' | b'e' | b'E')
                        || ((b[i] == b'-' || b[i] == b'+') && matches!(b[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                let n: f64 = src[start..i]
                    .parse()
                    .map_err(|_| QueryError { pos: start, message: format!("{:?} is not a number", &src[start..i]) })?;
                out.push((start, Tok::Num(n)));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'-' | b':')) {
                    i += 1;
                }
                out.push((start, Tok::Ident(src[start..i].to_string())));
            }
            _ => return err(start, format!("unexpected character {:?}", src[start..].chars().next().unwrap_or('?'))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    at: usize,
    end: usize,
}

impl Parser {
    fn pos(&self) -> usize {
        self.toks.get(self.at).map_or(self.end, |t| t.0)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|t| &t.1)
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s.eq_ignore_ascii_case(kw))
    }

    fn bump(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).map(|t| t.1.clone());
        self.at += 1;
        t
    }

    fn or(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut left = self.and(depth)?;
        while self.keyword("OR") {
            self.at += 1;
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut left = self.unary(depth)?;
        while self.keyword("AND") {
            self.at += 1;
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, QueryError> {
        if depth > DEPTH_MAX {
            return err(self.pos(), "nested too deeply");
        }
        if self.keyword("NOT") {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.unary(depth + 1)?)));
        }
        let pos = self.pos();
        match self.bump() {
            Some(Tok::LParen) => {
                let e = self.or(depth + 1)?;
                match self.bump() {
                    Some(Tok::RParen) => Ok(e),
                    _ => err(self.pos().min(self.end), "expected ')'"),
                }
            }
            Some(Tok::Ident(name)) if name.eq_ignore_ascii_case("within") => self.within(pos),
            Some(Tok::Ident(name)) => {
                let Some(field) = Field::parse(&name) else {
                    return err(
                        pos,
                        format!(
                            "unknown field {name:?}; fields: orb_id status online battery speed lat lon mode last_seen_ms version.<c> attr.<k>"
                        ),
                    );
                };
                // A bare boolean field: `online`.
                let op_pos = self.pos();
                let op = match self.peek() {
                    Some(Tok::Op(op)) => {
                        let op = *op;
                        self.at += 1;
                        op
                    }
                    _ if field == Field::Online => return Ok(Expr::Cmp(field, Op::Eq, Value::Bool(true))),
                    _ => return err(op_pos, "expected an operator (= != < <= > >=)"),
                };
                let vpos = self.pos();
                let value = match self.bump() {
                    Some(Tok::Num(n)) => Value::Num(n),
                    Some(Tok::Str(s)) => Value::Str(s),
                    Some(Tok::Ident(s)) if s.eq_ignore_ascii_case("true") => Value::Bool(true),
                    Some(Tok::Ident(s)) if s.eq_ignore_ascii_case("false") => Value::Bool(false),
                    _ => return err(vpos, "expected a value: a number, a \"string\", true or false"),
                };
                match (&field, &value) {
                    (f, Value::Num(_)) if f.is_numeric() => {}
                    (f, _) if f.is_numeric() => return err(vpos, format!("{name} takes a number")),
                    (Field::Online, Value::Bool(_)) => {}
                    (Field::Online, _) => return err(vpos, "online takes true or false"),
                    (_, Value::Str(_)) => {}
                    _ => return err(vpos, format!("{name} takes a \"string\"")),
                }
                if !field.is_numeric() && !matches!(op, Op::Eq | Op::Ne) {
                    return err(op_pos, format!("{name} can only be compared with = or !="));
                }
                Ok(Expr::Cmp(field, op, value))
            }
            _ => err(pos, "expected a condition"),
        }
    }

    fn num(&mut self, what: &str) -> Result<f64, QueryError> {
        let pos = self.pos();
        match self.bump() {
            Some(Tok::Num(n)) => Ok(n),
            _ => err(pos, format!("within: expected {what}")),
        }
    }

    fn within(&mut self, pos: usize) -> Result<Expr, QueryError> {
        if self.bump() != Some(Tok::LParen) {
            return err(pos, "within needs (lat, lon, distance)");
        }
        let lat = self.num("a latitude")?;
        if self.bump() != Some(Tok::Comma) {
            return err(self.pos(), "within: expected ','");
        }
        let lon = self.num("a longitude")?;
        if self.bump() != Some(Tok::Comma) {
            return err(self.pos(), "within: expected ','");
        }
        let d = self.num("a distance")?;
        let upos = self.pos();
        let radius_m = match self.peek() {
            Some(Tok::Ident(u)) if u.eq_ignore_ascii_case("km") => {
                self.at += 1;
                d * 1000.0
            }
            Some(Tok::Ident(u)) if u.eq_ignore_ascii_case("m") => {
                self.at += 1;
                d
            }
            _ => return err(upos, "within: the distance needs a unit, km or m"),
        };
        if self.bump() != Some(Tok::RParen) {
            return err(self.pos(), "within: expected ')'");
        }
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) || radius_m.is_nan() || radius_m < 0.0 {
            return err(pos, "within: lat -90..90, lon -180..180, distance >= 0");
        }
        Ok(Expr::Within { lat, lon, radius_m })
    }
}

/// Parses a query; the empty query matches everything.
pub fn parse(src: &str) -> Result<Expr, QueryError> {
    if src.len() > QUERY_LEN_MAX {
        return err(QUERY_LEN_MAX, format!("longer than {QUERY_LEN_MAX} bytes"));
    }
    let toks = lex(src)?;
    if toks.is_empty() {
        return Ok(Expr::True);
    }
    let mut p = Parser { toks, at: 0, end: src.len() };
    let e = p.or(0)?;
    if p.at < p.toks.len() {
        return err(p.pos(), "expected AND, OR or the end of the query");
    }
    Ok(e)
}

/// Great-circle distance in metres (haversine).
pub fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let r = 6_371_000.0;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * r * a.sqrt().asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses() {
        let e =
            parse(r#"battery < 20 AND mode = "mission" AND version.firmware = "2.3.1" AND within(37.7, -122.4, 5km)"#)
                .unwrap();
        let Expr::And(l, r) = e else { panic!() };
        assert_eq!(*r, Expr::Within { lat: 37.7, lon: -122.4, radius_m: 5000.0 });
        let Expr::And(_, fw) = *l else { panic!() };
        assert_eq!(*fw, Expr::Cmp(Field::Version("firmware".into()), Op::Eq, Value::Str("2.3.1".into())));
    }

    #[test]
    fn precedence_not_and_or_and_parentheses() {
        let e = parse("NOT online OR status != 'active' and attr.depot = \"sf\"").unwrap();
        assert!(matches!(e, Expr::Or(ref l, ref r) if matches!(**l, Expr::Not(_)) && matches!(**r, Expr::And(_, _))));
        let e = parse("(battery > 1 OR speed >= 2) AND lat <= 3").unwrap();
        assert!(matches!(e, Expr::And(ref l, _) if matches!(**l, Expr::Or(_, _))));
        assert_eq!(parse("").unwrap(), Expr::True);
        assert_eq!(parse("online").unwrap(), Expr::Cmp(Field::Online, Op::Eq, Value::Bool(true)));
    }

    #[test]
    fn errors_name_the_position() {
        let cases = [
            ("battery < ", 10),
            ("battery < \"x\"", 10),
            ("colour = 1", 0),
            ("battery 5", 8),
            ("mode > \"a\"", 5),
            ("battery < 5 AND", 15),
            ("battery < 5 extra", 12),
            ("within(1, 2, 3)", 14),
            ("(battery < 5", 12),
            ("mode = \"open", 7),
            ("battery < 5 # x", 12),
        ];
        for (q, pos) in cases {
            let e = parse(q).unwrap_err();
            assert_eq!(e.pos, pos, "{q:?}: {e}");
        }
        assert!(parse(&"(".repeat(100)).is_err());
        assert!(parse(&"x".repeat(QUERY_LEN_MAX + 1)).is_err());
    }

    #[test]
    fn haversine_is_about_right() {
        // San Francisco to Oakland, ~13 km.
        let d = distance_m(37.7749, -122.4194, 37.8044, -122.2712);
        assert!((12_000.0..14_500.0).contains(&d), "{d}");
        assert_eq!(distance_m(1.0, 2.0, 1.0, 2.0), 0.0);
    }
}

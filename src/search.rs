//! Fleet search: an in-memory row per registered orb (registry + live state, not the actors),
//! scanned with a compiled predicate.
//!
//! Why a scan and no secondary index: a row is ~150 bytes and a predicate is a handful of
//! comparisons, so 500,000 rows scan in well under 50 ms on one core (`benches/search.rs`),
//! for any combination of fields, while a secondary index per field would cost memory and
//! write amplification on every telemetry message. The first page comes from a bounded heap
//! (O(n log k)); cursors are (sort value, orb id). Rows are sharded 16 ways behind `RwLock`s;
//! orb actors update their row after each applied change, registration inserts it, and a
//! start-up scan of the store fills the rest.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{ApiError, ErrorCode};
use crate::model::orb::{OrbState, OrbStatus};
use crate::model::query::{Expr, Field, Op, Value, distance_m};
use crate::model::{OrbId, OrbKey, TenantId};

pub const SHARDS: usize = 16;

/// The searchable fields of one orb.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub orb: OrbId,
    pub status: OrbStatus,
    pub online: bool,
    pub battery: Option<f64>,
    pub speed: Option<f64>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub mode: Option<Arc<str>>,
    pub last_seen_ms: Option<u64>,
    pub versions: Box<[(Box<str>, Box<str>)]>,
    pub attrs: Box<[(Box<str>, Box<str>)]>,
}

impl Row {
    pub fn of(s: &OrbState) -> Row {
        let pairs =
            |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect();
        let mut row = Row {
            orb: s.record.orb.clone(),
            status: s.record.status,
            online: false,
            battery: None,
            speed: None,
            lat: None,
            lon: None,
            mode: None,
            last_seen_ms: None,
            versions: pairs(&s.reported.versions),
            attrs: pairs(&s.record.attributes),
        };
        row.refresh(s);
        row
    }

    /// Takes what a telemetry point changes (the values, status, presence and last-seen time)
    /// from `s`, keeping the row's strings: no allocation unless the mode changed.
    fn refresh(&mut self, s: &OrbState) {
        let last = s.last.as_ref();
        self.status = s.record.status;
        self.online = s.presence.online;
        self.battery = last.and_then(|p| p.battery);
        self.speed = last.and_then(|p| p.speed);
        self.lat = last.and_then(|p| p.position.map(|x| x.0));
        self.lon = last.and_then(|p| p.position.map(|x| x.1));
        let mode = last.and_then(|p| p.mode.as_deref());
        if self.mode.as_deref() != mode {
            self.mode = mode.map(Arc::from);
        }
        self.last_seen_ms = s.last_seen_ms;
    }

    fn num(&self, f: &Field) -> Option<f64> {
        match f {
            Field::Battery => self.battery,
            Field::Speed => self.speed,
            Field::Lat => self.lat,
            Field::Lon => self.lon,
            Field::LastSeen => self.last_seen_ms.map(|v| v as f64),
            _ => None,
        }
    }

    fn text(&self, f: &Field) -> Option<&str> {
        fn find<'a>(pairs: &'a [(Box<str>, Box<str>)], k: &str) -> Option<&'a str> {
            pairs.iter().find(|(n, _)| &**n == k).map(|(_, v)| &**v)
        }
        match f {
            Field::OrbId => Some(self.orb.as_str()),
            Field::Status => Some(self.status.as_str()),
            Field::Mode => self.mode.as_deref(),
            Field::Version(c) => find(&self.versions, c),
            Field::Attr(k) => find(&self.attrs, k),
            _ => None,
        }
    }

    /// The field as a grouping key (for `count_by`), borrowed where it can be.
    fn group(&self, f: &Field) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match f {
            Field::Online => Cow::Borrowed(if self.online { "true" } else { "false" }),
            f if f.is_numeric() => self.num(f).map_or(Cow::Borrowed("-"), |v| Cow::Owned(v.to_string())),
            f => Cow::Borrowed(self.text(f).unwrap_or("-")),
        }
    }

    pub fn matches(&self, e: &Expr) -> bool {
        match e {
            Expr::True => true,
            Expr::And(a, b) => self.matches(a) && self.matches(b),
            Expr::Or(a, b) => self.matches(a) || self.matches(b),
            Expr::Not(a) => !self.matches(a),
            Expr::Within { lat, lon, radius_m } => match (self.lat, self.lon) {
                (Some(a), Some(b)) => distance_m(*lat, *lon, a, b) <= *radius_m,
                _ => false,
            },
            Expr::Cmp(Field::Online, op, Value::Bool(v)) => (self.online == *v) == (*op == Op::Eq),
            Expr::Cmp(f, op, Value::Num(v)) => match self.num(f) {
                // A missing value matches no comparison.
                None => false,
                Some(x) => match op {
                    Op::Eq => x == *v,
                    Op::Ne => x != *v,
                    Op::Lt => x < *v,
                    Op::Le => x <= *v,
                    Op::Gt => x > *v,
                    Op::Ge => x >= *v,
                },
            },
            Expr::Cmp(f, op, Value::Str(v)) => match self.text(f) {
                None => false,
                Some(x) => (x == v) == (*op == Op::Eq),
            },
            Expr::Cmp(..) => false,
        }
    }

    pub fn to_json(&self, tenant: &TenantId, fields: Option<&[String]>) -> serde_json::Value {
        let all = serde_json::json!({
            "tenant_id": tenant,
            "orb_id": self.orb,
            "status": self.status.as_str(),
            "online": self.online,
            "battery": self.battery,
            "speed": self.speed,
            "lat": self.lat,
            "lon": self.lon,
            "mode": self.mode.as_deref(),
            "last_seen_ms": self.last_seen_ms,
            "versions": self.versions.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_string()))).collect::<serde_json::Map<_, _>>(),
            "attributes": self.attrs.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_string()))).collect::<serde_json::Map<_, _>>(),
        });
        match fields {
            None => all,
            Some(fs) => {
                let mut m = serde_json::Map::new();
                m.insert("orb_id".into(), all["orb_id"].clone());
                for f in fs {
                    if let Some(v) = all.get(f.as_str()) {
                        m.insert(f.clone(), v.clone());
                    }
                }
                serde_json::Value::Object(m)
            }
        }
    }
}

/// How to order results.
#[derive(Clone, Debug, PartialEq)]
pub struct Sort {
    pub field: Field,
    pub descending: bool,
}

/// An aggregation over every match.
#[derive(Clone, Debug, PartialEq)]
pub enum Aggregate {
    CountBy(Field),
    Stats(Field),
}

/// A search.
#[derive(Clone, Debug)]
pub struct SearchRequest {
    pub query: Expr,
    pub sort: Option<Sort>,
    pub page_size: usize,
    pub page_token: Option<String>,
    pub aggregate: Option<Aggregate>,
}

/// A page of matches and the aggregation.
#[derive(Clone, Debug)]
pub struct SearchResult {
    pub rows: Vec<Row>,
    pub total: u64,
    pub next_page_token: Option<String>,
    pub aggregate: Option<serde_json::Value>,
}

/// A sortable value: numbers or text, missing last.
#[derive(Clone, Debug, PartialEq)]
enum KeyVal<'a> {
    Num(f64),
    Text(&'a str),
    Missing,
}

impl KeyVal<'_> {
    fn cmp(&self, other: &KeyVal<'_>) -> CmpOrdering {
        match (self, other) {
            (KeyVal::Num(a), KeyVal::Num(b)) => a.total_cmp(b),
            (KeyVal::Text(a), KeyVal::Text(b)) => a.cmp(b),
            (KeyVal::Missing, KeyVal::Missing) => CmpOrdering::Equal,
            (KeyVal::Missing, _) => CmpOrdering::Greater,
            (_, KeyVal::Missing) => CmpOrdering::Less,
            (KeyVal::Num(_), KeyVal::Text(_)) => CmpOrdering::Less,
            (KeyVal::Text(_), KeyVal::Num(_)) => CmpOrdering::Greater,
        }
    }
}

/// Ordering under a sort direction: missing values last either way, ties by orb id.
fn order(a: (&KeyVal<'_>, &str), b: (&KeyVal<'_>, &str), desc: bool) -> CmpOrdering {
    let by_value = match (a.0, b.0, desc) {
        (KeyVal::Missing, _, _) | (_, KeyVal::Missing, _) => a.0.cmp(b.0),
        (_, _, true) => b.0.cmp(a.0),
        _ => a.0.cmp(b.0),
    };
    by_value.then_with(|| a.1.cmp(b.1))
}

fn key_of<'a>(row: &'a Row, sort: &Option<Sort>) -> KeyVal<'a> {
    match sort {
        None => KeyVal::Missing,
        Some(s) if s.field.is_numeric() => row.num(&s.field).map_or(KeyVal::Missing, KeyVal::Num),
        Some(s) if s.field == Field::Online => KeyVal::Text(if row.online { "true" } else { "false" }),
        Some(s) => row.text(&s.field).map_or(KeyVal::Missing, KeyVal::Text),
    }
}

/// A cursor: the sort value and orb id of the last row of a page.
#[derive(Clone, Debug)]
struct Cursor {
    v: OwnedVal,
    orb: String,
}

#[derive(Clone, Debug)]
enum OwnedVal {
    Num(f64),
    Text(String),
    Missing,
}

impl Cursor {
    fn val(&self) -> KeyVal<'_> {
        match &self.v {
            OwnedVal::Num(n) => KeyVal::Num(*n),
            OwnedVal::Text(t) => KeyVal::Text(t),
            OwnedVal::Missing => KeyVal::Missing,
        }
    }

    fn of(k: &KeyVal<'_>, orb: &str) -> Cursor {
        let v = match k {
            KeyVal::Num(n) => OwnedVal::Num(*n),
            KeyVal::Text(t) => OwnedVal::Text(t.to_string()),
            KeyVal::Missing => OwnedVal::Missing,
        };
        Cursor { v, orb: orb.to_string() }
    }

    fn encode(&self) -> String {
        let v = match &self.v {
            OwnedVal::Num(n) => serde_json::json!(n),
            OwnedVal::Text(t) => serde_json::json!(t),
            OwnedVal::Missing => serde_json::Value::Null,
        };
        hex::encode(serde_json::json!([v, self.orb]).to_string())
    }

    fn decode(t: &str) -> Result<Cursor, ApiError> {
        let bad = || ApiError::new(ErrorCode::InvalidArgument, "page_token is not one this server issued");
        let bytes = hex::decode(t).map_err(|_| bad())?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let orb = OrbId::parse(v[1].as_str().ok_or_else(bad)?).map_err(|_| bad())?.to_string();
        let val = match &v[0] {
            serde_json::Value::Number(n) => OwnedVal::Num(n.as_f64().ok_or_else(bad)?),
            serde_json::Value::String(s) => OwnedVal::Text(s.clone()),
            serde_json::Value::Null => OwnedVal::Missing,
            _ => return Err(bad()),
        };
        Ok(Cursor { v: val, orb })
    }
}

/// A heap entry borrowing its row while the shard's lock is held.
struct HeapItem<'a>(KeyVal<'a>, &'a Row, bool);

impl PartialEq for HeapItem<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == CmpOrdering::Equal
    }
}
impl Eq for HeapItem<'_> {}
impl PartialOrd for HeapItem<'_> {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for HeapItem<'_> {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        order((&self.0, self.1.orb.as_str()), (&o.0, o.1.orb.as_str()), self.2)
    }
}

/// One tenant's rows in one shard: contiguous, for scanning.
#[derive(Default)]
struct TenantRows {
    rows: Vec<Row>,
    pos: HashMap<OrbId, usize>,
}

type Shard = RwLock<HashMap<TenantId, TenantRows>>;

/// The index; cheap to clone.
#[derive(Clone, Default)]
pub struct FleetIndex(Arc<Inner>);

#[derive(Default)]
struct Inner {
    shards: [Shard; SHARDS],
    ready: AtomicBool,
    loaded: AtomicU64,
}

/// What one shard's scan found.
#[derive(Default)]
struct Partial {
    page: Vec<(Cursor, Row)>,
    total: u64,
    groups: HashMap<String, u64>,
    values: Vec<f64>,
}

impl FleetIndex {
    fn shard(&self, key: &OrbKey) -> &Shard {
        &self.0.shards[(key.route_hash() % SHARDS as u64) as usize]
    }

    fn put(&self, key: OrbKey, row: Row, replace: bool) {
        let mut shard = self.shard(&key).write().expect("index lock");
        let t = shard.entry(key.tenant).or_default();
        match t.pos.get(&key.orb) {
            Some(&i) if replace => t.rows[i] = row,
            Some(_) => {}
            None => {
                t.pos.insert(key.orb, t.rows.len());
                t.rows.push(row);
            }
        }
    }

    /// Inserts or replaces an orb's row (orb actors, registration).
    pub fn upsert(&self, key: OrbKey, row: Row) {
        self.put(key, row, true);
    }

    /// Applies a telemetry point's change to the orb's row in place (per message: rebuilding
    /// the row would copy its attributes and versions); a missing row is built whole.
    pub fn refresh_telemetry(&self, key: &OrbKey, state: &OrbState) {
        {
            let mut shard = self.shard(key).write().expect("index lock");
            if let Some(t) = shard.get_mut(&key.tenant)
                && let Some(&i) = t.pos.get(&key.orb)
            {
                t.rows[i].refresh(state);
                return;
            }
        }
        self.upsert(key.clone(), Row::of(state));
    }

    /// Inserts a row unless one exists (the start-up load never overwrites fresher rows).
    pub fn insert_if_absent(&self, key: OrbKey, row: Row) {
        self.put(key, row, false);
        self.0.loaded.fetch_add(1, Ordering::Relaxed);
    }

    /// An orb's row.
    pub fn get(&self, key: &OrbKey) -> Option<Row> {
        let shard = self.shard(key).read().expect("index lock");
        let t = shard.get(&key.tenant)?;
        t.pos.get(&key.orb).map(|&i| t.rows[i].clone())
    }

    /// Calls `f` with each row of `tenant` matching `expr` among the orbs whose routing hash is
    /// `part` modulo `parts` (`parts` divides the shard count, so whole shards are skipped).
    pub fn for_each_in_partition(
        &self,
        tenant: &TenantId,
        expr: &Expr,
        part: usize,
        parts: usize,
        mut f: impl FnMut(&Row),
    ) {
        debug_assert!(SHARDS.is_multiple_of(parts), "partitions divide the shards");
        for (i, shard) in self.0.shards.iter().enumerate() {
            if i % parts != part {
                continue;
            }
            let rows = shard.read().expect("index lock");
            if let Some(t) = rows.get(tenant) {
                t.rows.iter().filter(|r| r.matches(expr)).for_each(&mut f);
            }
        }
    }

    pub fn set_ready(&self) {
        self.0.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.0.shards.iter().map(|s| s.read().expect("index lock").values().map(|t| t.rows.len()).sum::<usize>()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scans one shard's rows of `tenant`.
    fn scan(shard: &Shard, tenant: &TenantId, req: &SearchRequest, after: Option<&Cursor>) -> Partial {
        let rows = shard.read().expect("index lock");
        let Some(t) = rows.get(tenant) else { return Partial::default() };
        let desc = req.sort.as_ref().is_some_and(|s| s.descending);
        let k = req.page_size.max(1) + 1; // one extra tells whether a next page exists
        let mut heap: BinaryHeap<HeapItem<'_>> = BinaryHeap::with_capacity(k + 1);
        let mut p = Partial::default();
        let mut groups: HashMap<std::borrow::Cow<'_, str>, u64> = HashMap::new();
        for row in &t.rows {
            if !row.matches(&req.query) {
                continue;
            }
            p.total += 1;
            match &req.aggregate {
                Some(Aggregate::CountBy(f)) => *groups.entry(row.group(f)).or_default() += 1,
                Some(Aggregate::Stats(f)) => p.values.extend(row.num(f)),
                None => {}
            }
            let key = key_of(row, &req.sort);
            if after.is_some_and(|a| order((&key, row.orb.as_str()), (&a.val(), &a.orb), desc) != CmpOrdering::Greater)
            {
                continue;
            }
            if heap.len() < k {
                heap.push(HeapItem(key, row, desc));
            } else if heap.peek().is_some_and(|top| {
                order((&key, row.orb.as_str()), (&top.0, top.1.orb.as_str()), desc) == CmpOrdering::Less
            }) {
                heap.pop();
                heap.push(HeapItem(key, row, desc));
            }
        }
        p.page = heap.into_iter().map(|HeapItem(k, row, _)| (Cursor::of(&k, row.orb.as_str()), row.clone())).collect();
        p.groups = groups.into_iter().map(|(g, n)| (g.into_owned(), n)).collect();
        p
    }

    /// Runs a search over one tenant's rows, the shards scanned in parallel.
    pub fn search(&self, tenant: &TenantId, req: &SearchRequest) -> Result<SearchResult, ApiError> {
        if !self.is_ready() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "the fleet index is loading ({} orbs so far); retry shortly",
                    self.0.loaded.load(Ordering::Relaxed)
                ),
            ));
        }
        let after = req.page_token.as_deref().map(Cursor::decode).transpose()?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, SHARDS);
        let per = SHARDS.div_ceil(threads);
        let partials: Vec<Partial> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .0
                .shards
                .chunks(per)
                .map(|chunk| {
                    let after = after.as_ref();
                    s.spawn(move || chunk.iter().map(|sh| Self::scan(sh, tenant, req, after)).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("search thread")).collect()
        });
        let desc = req.sort.as_ref().is_some_and(|s| s.descending);
        let mut total = 0;
        let mut groups: HashMap<String, u64> = HashMap::new();
        let mut values = Vec::new();
        let mut page: Vec<(Cursor, Row)> = Vec::new();
        for p in partials {
            total += p.total;
            for (g, n) in p.groups {
                *groups.entry(g).or_default() += n;
            }
            values.extend(p.values);
            page.extend(p.page);
        }
        page.sort_by(|a, b| order((&a.0.val(), &a.0.orb), (&b.0.val(), &b.0.orb), desc));
        let k = req.page_size.max(1);
        let more = page.len() > k;
        page.truncate(k);
        let next_page_token = if more { page.last().map(|(c, _)| c.encode()) } else { None };
        let aggregate = match &req.aggregate {
            None => None,
            Some(Aggregate::CountBy(_)) => Some(serde_json::json!({ "count_by": groups })),
            Some(Aggregate::Stats(_)) => Some(stats(&mut values)),
        };
        Ok(SearchResult { rows: page.into_iter().map(|(_, r)| r).collect(), total, next_page_token, aggregate })
    }
}

fn stats(values: &mut [f64]) -> serde_json::Value {
    if values.is_empty() {
        return serde_json::json!({"stats": {"count": 0}});
    }
    let n = values.len();
    let sum: f64 = values.iter().sum();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // Selection, not a sort: O(n) per percentile.
    let mut q = |p: f64| {
        let i = ((p * (n - 1) as f64).round() as usize).min(n - 1);
        *values.select_nth_unstable_by(i, f64::total_cmp).1
    };
    let (p50, p90, p99) = (q(0.5), q(0.9), q(0.99));
    serde_json::json!({"stats": {
        "count": n, "min": min, "max": max, "avg": sum / n as f64,
        "p50": p50, "p90": p90, "p99": p99,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::query::parse;

    fn row(id: &str, battery: Option<f64>, mode: &str, fw: &str, pos: (f64, f64)) -> Row {
        Row {
            orb: OrbId::parse(id).unwrap(),
            status: OrbStatus::Active,
            online: battery.is_some(),
            battery,
            speed: Some(1.0),
            lat: Some(pos.0),
            lon: Some(pos.1),
            mode: Some(Arc::from(mode)),
            last_seen_ms: Some(1),
            versions: vec![("firmware".into(), fw.into())].into_boxed_slice(),
            attrs: Box::new([]),
        }
    }

    fn index() -> (FleetIndex, TenantId) {
        let idx = FleetIndex::default();
        let t = TenantId::parse("acme").unwrap();
        let rows = [
            row("a", Some(10.0), "mission", "2.3.1", (37.70, -122.40)),
            row("b", Some(15.0), "mission", "2.3.1", (37.71, -122.41)),
            row("c", Some(15.0), "mission", "2.3.0", (37.70, -122.40)),
            row("d", Some(50.0), "idle", "2.3.1", (37.70, -122.40)),
            row("e", Some(5.0), "mission", "2.3.1", (40.0, -74.0)),
            row("f", None, "mission", "2.3.1", (37.70, -122.40)),
        ];
        for r in rows {
            idx.upsert(OrbKey::new(t.clone(), r.orb.clone()), r);
        }
        let other = TenantId::parse("globex").unwrap();
        idx.upsert(
            OrbKey::new(other, OrbId::parse("a").unwrap()),
            row("a", Some(1.0), "mission", "2.3.1", (37.7, -122.4)),
        );
        idx.set_ready();
        (idx, t)
    }

    fn ids(r: &SearchResult) -> Vec<&str> {
        r.rows.iter().map(|r| r.orb.as_str()).collect()
    }

    fn req(q: &str) -> SearchRequest {
        SearchRequest { query: parse(q).unwrap(), sort: None, page_size: 10, page_token: None, aggregate: None }
    }

    #[test]
    fn the_issue_query_finds_exactly_the_matching_orbs_of_the_tenant() {
        let (idx, t) = index();
        let r = idx
            .search(
                &t,
                &req(
                    r#"battery < 20 AND mode = "mission" AND version.firmware = "2.3.1" AND within(37.7, -122.4, 5km)"#,
                ),
            )
            .unwrap();
        assert_eq!(ids(&r), ["a", "b"]);
        assert_eq!(r.total, 2);
    }

    #[test]
    fn a_telemetry_refresh_matches_a_rebuilt_row_and_inserts_a_missing_one() {
        use crate::model::orb::{OrbRecord, OrbState};
        use crate::model::telemetry::parse;
        let (idx, t) = index();
        let key = OrbKey::new(t.clone(), OrbId::parse("g").unwrap());
        let mut record = OrbRecord::provisioned(key.clone(), None, 1);
        record.attributes.insert("depot".into(), "sf-3".into());
        let mut state = OrbState::new(record);
        idx.refresh_telemetry(&key, &state);
        assert_eq!(idx.get(&key), Some(Row::of(&state)), "inserted whole");
        for (json, seen) in [
            (r#"{"ts":1700000000000,"battery":42,"lat":1,"lon":2,"speed":3,"mode":"idle"}"#, 5),
            (r#"{"ts":1700000000001,"battery":41,"mode":"idle"}"#, 6),
            (r#"{"ts":1700000000002,"mode":"charging"}"#, 7),
        ] {
            state.last = Some(Arc::new(parse(json.as_bytes(), 1_800_000_000_000, 4096).unwrap()));
            state.last_seen_ms = Some(seen);
            state.presence.online = true;
            idx.refresh_telemetry(&key, &state);
            assert_eq!(idx.get(&key), Some(Row::of(&state)), "{json}");
        }
        assert_eq!(ids(&idx.search(&t, &req(r#"mode = "charging""#)).unwrap()), ["g"]);
    }

    #[test]
    fn missing_values_match_no_comparison() {
        let (idx, t) = index();
        assert!(!ids(&idx.search(&t, &req("battery != 10")).unwrap()).contains(&"f"));
        assert!(ids(&idx.search(&t, &req("NOT online")).unwrap()).contains(&"f"));
    }

    #[test]
    fn sorted_pages_with_cursors_cover_everything_once() {
        let (idx, t) = index();
        let mut r = req("");
        r.sort = Some(Sort { field: Field::Battery, descending: true });
        r.page_size = 2;
        let mut seen = Vec::new();
        loop {
            let page = idx.search(&t, &r).unwrap();
            seen.extend(ids(&page).into_iter().map(str::to_string));
            match page.next_page_token {
                Some(tok) => r.page_token = Some(tok),
                None => break,
            }
        }
        // Descending by battery, ties by id, missing last.
        assert_eq!(seen, ["d", "b", "c", "a", "e", "f"]);
    }

    #[test]
    fn aggregations() {
        let (idx, t) = index();
        let mut r = req("mode = \"mission\"");
        r.aggregate = Some(Aggregate::CountBy(Field::Version("firmware".into())));
        let a = idx.search(&t, &r).unwrap().aggregate.unwrap();
        assert_eq!(a["count_by"]["2.3.1"], 4);
        assert_eq!(a["count_by"]["2.3.0"], 1);
        r.aggregate = Some(Aggregate::Stats(Field::Battery));
        let s = idx.search(&t, &r).unwrap().aggregate.unwrap();
        assert_eq!(
            (s["stats"]["count"].as_u64(), s["stats"]["min"].as_f64(), s["stats"]["max"].as_f64()),
            (Some(4), Some(5.0), Some(15.0))
        );
        assert_eq!(s["stats"]["avg"].as_f64(), Some(11.25));
    }

    #[test]
    fn a_loading_index_says_so() {
        let idx = FleetIndex::default();
        let err = idx.search(&TenantId::parse("acme").unwrap(), &req("")).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
    }
}

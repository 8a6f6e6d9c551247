//! Alert rules: what an operator writes (`RuleSpec`), its validated form (`Rule`), and the pure
//! per-(rule, orb) state machine that decides when an alert fires and clears (`Window`).
//!
//! Conditions are CEL expressions (the `cel-interpreter` crate) over one orb's latest values:
//! `battery`, `speed`, `lat`, `lon` (doubles), `mode`, `orb_id`, `status` (strings), `online`
//! (bool), `metrics`, `attr`, `version` (maps), `rate` (per-second change of each numeric field
//! since the orb's previous observation) and `zscore` (each numeric field against its per-orb
//! exponentially weighted mean and variance, present after a warm-up: the anomaly detector,
//! whose sensitivity is the threshold the condition compares with). Functions beyond CEL's:
//! `in_polygon(lat, lon, [lat1, lon1, lat2, lon2, ...])` (geofences: the condition
//! `!in_polygon(...)` fires on exit and clears on entry) and `distance_km(lat, lon, lat2, lon2)`.
//! A variable that the orb has not reported makes
//! the condition false, never an error. `for_s` makes a duration rule ("battery < 15 for 60 s");
//! `clear_condition` gives hysteresis (default: the condition no longer holds); `absent_s` makes
//! a heartbeat-absence rule that fires when an orb in scope sent nothing for that long;
//! `repeat_count` with `repeat_window_s` makes a repeat rule ("3 hard brakes within 60 s"):
//! it fires when the condition held in that many observations within the window and clears
//! once a whole window passes without one (or by `clear_condition`).

use serde::{Deserialize, Serialize};

use super::TenantId;
use super::query::{self, Expr};

/// Variables a condition may use.
pub const VARIABLES: [&str; 13] = [
    "battery", "speed", "lat", "lon", "mode", "orb_id", "status", "online", "metrics", "attr", "version", "rate",
    "zscore",
];
/// Observations before `zscore` has a value for a field.
pub const ZSCORE_WARMUP: u32 = 20;
/// Weight of the newest observation in the exponentially weighted statistics.
pub const EWMA_ALPHA: f64 = 0.1;

/// Longest condition source, in bytes.
pub const CONDITION_LEN_MAX: usize = 4_096;
/// Longest duration window or absence period, in seconds (one week).
pub const WINDOW_S_MAX: u64 = 7 * 24 * 3600;
/// Rules one tenant may have.
pub const RULES_PER_TENANT_MAX: usize = 1_000;
/// Most observations a repeat rule counts (its state keeps one time per observation).
pub const REPEAT_COUNT_MAX: u32 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Critical,
    Major,
    Minor,
    Warning,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "critical" => Some(Severity::Critical),
            "major" => Some(Severity::Major),
            "minor" => Some(Severity::Minor),
            "warning" => Some(Severity::Warning),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
        }
    }
}

/// A rule as an operator writes it (`POST /v1/alerts/rules`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    /// CEL; required unless `absent_s` is given.
    #[serde(default)]
    pub condition: String,
    #[serde(default)]
    pub clear_condition: Option<String>,
    pub severity: String,
    #[serde(default)]
    pub for_s: u64,
    #[serde(default)]
    pub absent_s: Option<u64>,
    /// A fleet query (the search language); empty: every orb of the tenant.
    #[serde(default)]
    pub scope: String,
    /// Repeat rules: observations in which the condition must hold within `repeat_window_s`.
    #[serde(default)]
    pub repeat_count: Option<u32>,
    #[serde(default)]
    pub repeat_window_s: u64,
}

/// A stored rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub tenant: TenantId,
    pub rule_id: String,
    pub name: String,
    pub condition: String,
    pub clear_condition: Option<String>,
    pub severity: Severity,
    pub for_s: u64,
    pub absent_s: Option<u64>,
    pub scope: String,
    pub created_ms: u64,
    pub repeat_count: Option<u32>,
    pub repeat_window_s: u64,
}

impl Rule {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tenant_id": self.tenant,
            "rule_id": self.rule_id,
            "name": self.name,
            "condition": self.condition,
            "clear_condition": self.clear_condition,
            "severity": self.severity.as_str(),
            "for_s": self.for_s,
            "absent_s": self.absent_s,
            "scope": self.scope,
            "created_ms": self.created_ms,
            "repeat_count": self.repeat_count,
            "repeat_window_s": self.repeat_window_s,
        })
    }
}

/// Compiles a CEL condition and checks that it only names known variables.
pub fn compile(what: &str, src: &str) -> Result<cel_interpreter::Program, String> {
    if src.len() > CONDITION_LEN_MAX {
        return Err(format!("{what} is longer than {CONDITION_LEN_MAX} bytes"));
    }
    let program = cel_interpreter::Program::compile(src).map_err(|e| format!("{what}: {e}"))?;
    let refs = program.references();
    let mut unknown: Vec<&str> = refs.variables().into_iter().filter(|v| !VARIABLES.contains(v)).collect();
    unknown.sort_unstable();
    if let Some(v) = unknown.first() {
        return Err(format!("{what}: unknown variable {v:?}; variables: {}", VARIABLES.join(" ")));
    }
    Ok(program)
}

/// Validates a spec into a rule (nothing is stored on error).
pub fn validate(spec: RuleSpec, tenant: TenantId, rule_id: String, now_ms: u64) -> Result<Rule, String> {
    let name = spec.name.trim().to_string();
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err("name must be 1..128 characters without control characters".into());
    }
    let severity = Severity::parse(&spec.severity)
        .ok_or_else(|| format!("severity {:?}: critical, major, minor or warning", spec.severity))?;
    if spec.for_s > WINDOW_S_MAX {
        return Err(format!("for_s must be at most {WINDOW_S_MAX}"));
    }
    match spec.absent_s {
        Some(a) if a == 0 || a > WINDOW_S_MAX => return Err(format!("absent_s must be 1..{WINDOW_S_MAX}")),
        Some(_) if !spec.condition.is_empty() || spec.clear_condition.is_some() || spec.for_s > 0 => {
            return Err("an absence rule (absent_s) takes no condition, clear_condition or for_s".into());
        }
        Some(_) => {}
        None if spec.condition.trim().is_empty() => return Err("condition is required".into()),
        None => {
            compile("condition", &spec.condition)?;
        }
    }
    match spec.repeat_count {
        Some(n) if !(2..=REPEAT_COUNT_MAX).contains(&n) => {
            return Err(format!("repeat_count must be 2..{REPEAT_COUNT_MAX} (1 is a plain threshold rule)"));
        }
        Some(_) if spec.repeat_window_s == 0 || spec.repeat_window_s > WINDOW_S_MAX => {
            return Err(format!("repeat_window_s must be 1..{WINDOW_S_MAX} with repeat_count"));
        }
        Some(_) if spec.for_s > 0 || spec.absent_s.is_some() => {
            return Err("a repeat rule (repeat_count) takes no for_s or absent_s".into());
        }
        None if spec.repeat_window_s > 0 => return Err("repeat_window_s needs repeat_count".into()),
        _ => {}
    }
    if let Some(c) = &spec.clear_condition {
        compile("clear_condition", c)?;
    }
    query::parse(&spec.scope).map_err(|e| format!("scope: {e}"))?;
    Ok(Rule {
        tenant,
        rule_id,
        name,
        condition: spec.condition,
        clear_condition: spec.clear_condition,
        severity,
        for_s: spec.for_s,
        absent_s: spec.absent_s,
        scope: spec.scope,
        created_ms: now_ms,
        repeat_count: spec.repeat_count,
        repeat_window_s: spec.repeat_window_s,
    })
}

/// A rule ready to evaluate.
pub struct Compiled {
    pub rule: Rule,
    pub condition: Option<cel_interpreter::Program>,
    pub clear: Option<cel_interpreter::Program>,
    pub scope: Expr,
    /// Whether it reads `rate` or `zscore` (which need the orb's previous observations).
    pub needs_history: bool,
    /// The variables it reads, one bit per entry of [`VARIABLES`]: only those are built.
    pub vars: u16,
}

/// The bit of a variable in [`Compiled::vars`].
pub fn var_bit(name: &str) -> u16 {
    VARIABLES.iter().position(|v| *v == name).map_or(0, |i| 1 << i)
}

impl Compiled {
    /// Compiles a stored rule (validated when it was created).
    pub fn new(rule: Rule) -> Result<Compiled, String> {
        let condition = if rule.absent_s.is_some() { None } else { Some(compile("condition", &rule.condition)?) };
        let clear = rule.clear_condition.as_deref().map(|c| compile("clear_condition", c)).transpose()?;
        let scope = query::parse(&rule.scope).map_err(|e| e.to_string())?;
        let needs_history = [&condition, &clear].iter().any(|p| {
            p.as_ref().is_some_and(|p| {
                let r = p.references();
                r.has_variable("rate") || r.has_variable("zscore")
            })
        });
        let mut vars = 0;
        for p in [&condition, &clear].into_iter().flatten() {
            for v in p.references().variables() {
                vars |= var_bit(v);
            }
        }
        Ok(Compiled { rule, condition, clear, scope, needs_history, vars })
    }
}

/// Exponentially weighted mean and variance of one field of one orb.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ewma {
    pub n: u32,
    pub mean: f64,
    pub var: f64,
}

impl Ewma {
    /// The z-score of `x` against what was seen before it (after the warm-up), then `x` is
    /// folded in.
    pub fn observe(&mut self, x: f64) -> Option<f64> {
        let z = (self.n >= ZSCORE_WARMUP && self.var > 0.0).then(|| (x - self.mean) / self.var.sqrt());
        if self.n == 0 {
            self.mean = x;
        } else {
            let d = x - self.mean;
            self.mean += EWMA_ALPHA * d;
            self.var = (1.0 - EWMA_ALPHA) * (self.var + EWMA_ALPHA * d * d);
        }
        self.n = self.n.saturating_add(1);
        z
    }
}

/// Whether (lat, lon) is inside the polygon given as a flat list of vertex coordinates
/// (ray casting; the polygon closes itself).
pub fn in_polygon(lat: f64, lon: f64, flat: &[f64]) -> bool {
    let n = flat.len() / 2;
    let mut inside = false;
    let mut j = n.wrapping_sub(1);
    for i in 0..n {
        let (yi, xi, yj, xj) = (flat[2 * i], flat[2 * i + 1], flat[2 * j], flat[2 * j + 1]);
        if (yi > lat) != (yj > lat) && lon < (xj - xi) * (lat - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The durable per-(rule, orb) evaluation state: checkpointed whenever it changes, so a
/// duration window (or a repeat rule's count) survives a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Since when the condition has held (duration rules), while not firing.
    pub since_ms: Option<u64>,
    pub firing: bool,
    /// Repeat rules: times the condition held within the window, oldest first (at most
    /// `repeat_count`).
    pub hits: Vec<u64>,
}

/// What one evaluation decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing visible changed (the window may have started or reset).
    None,
    Fire,
    /// Still firing and the condition held again: the open alert counts a repeat.
    Repeat,
    Clear,
}

impl Window {
    /// One observation: `holds` is the condition, `clears` the clear condition (the default
    /// clear condition is `!holds`). Returns the transition and whether the state changed.
    pub fn observe(&mut self, holds: bool, clears: bool, for_ms: u64, now_ms: u64) -> (Transition, bool) {
        let before = self.clone();
        let t = if self.firing {
            if clears {
                *self = Window::default();
                Transition::Clear
            } else if holds {
                Transition::Repeat
            } else {
                Transition::None
            }
        } else if holds {
            let since = *self.since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= for_ms {
                *self = Window::fired();
                Transition::Fire
            } else {
                Transition::None
            }
        } else {
            self.since_ms = None;
            Transition::None
        };
        (t, *self != before)
    }

    /// A window that has just fired.
    pub fn fired() -> Window {
        Window { since_ms: None, firing: true, hits: Vec::new() }
    }

    /// One observation of a repeat rule: fires when `holds` was true in `count` observations
    /// within `window_ms`; clears when `clears` (a clear condition, if the rule has one) or,
    /// by default, once a whole window passed without the condition holding.
    pub fn observe_repeat(
        &mut self,
        holds: bool,
        clears: Option<bool>,
        count: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> (Transition, bool) {
        let before = self.clone();
        self.hits.retain(|t| now_ms.saturating_sub(*t) < window_ms);
        if holds {
            if self.hits.len() >= count as usize {
                self.hits.remove(0);
            }
            self.hits.push(now_ms);
        }
        let t = if self.firing {
            if clears.unwrap_or(self.hits.is_empty()) {
                *self = Window::default();
                Transition::Clear
            } else if holds {
                Transition::Repeat
            } else {
                Transition::None
            }
        } else if self.hits.len() >= count as usize {
            self.firing = true;
            Transition::Fire
        } else {
            Transition::None
        };
        (t, *self != before)
    }

    /// A clock tick without a new observation: a duration window whose time has come fires
    /// (the condition held at the last observation and nothing since said otherwise).
    pub fn tick(&mut self, for_ms: u64, now_ms: u64) -> Transition {
        match self.since_ms {
            Some(since) if !self.firing && now_ms.saturating_sub(since) >= for_ms => {
                *self = Window::fired();
                Transition::Fire
            }
            _ => Transition::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(condition: &str) -> RuleSpec {
        RuleSpec {
            name: "low".into(),
            condition: condition.into(),
            clear_condition: None,
            severity: "major".into(),
            for_s: 0,
            absent_s: None,
            scope: String::new(),
            repeat_count: None,
            repeat_window_s: 0,
        }
    }

    fn t() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    #[test]
    fn repeat_rules_count_within_a_sliding_window_and_clear_after_a_quiet_one() {
        let mut w = Window::default();
        // 3 within 10 s: hits at 0, 5 s, then 12 s (0 has left the window): no fire yet.
        assert_eq!(w.observe_repeat(true, None, 3, 10_000, 0).0, Transition::None);
        assert_eq!(w.observe_repeat(true, None, 3, 10_000, 5_000).0, Transition::None);
        assert_eq!(w.observe_repeat(false, None, 3, 10_000, 6_000).0, Transition::None);
        assert_eq!(w.observe_repeat(true, None, 3, 10_000, 12_000).0, Transition::None);
        assert_eq!(w.hits, vec![5_000, 12_000]);
        assert_eq!(w.observe_repeat(true, None, 3, 10_000, 13_000).0, Transition::Fire);
        assert_eq!(w.observe_repeat(true, None, 3, 10_000, 14_000).0, Transition::Repeat);
        assert!(w.hits.len() <= 3, "hits are bounded by the count");
        // Not holding, but hits remain in the window: still firing.
        assert_eq!(w.observe_repeat(false, None, 3, 10_000, 20_000).0, Transition::None);
        // A whole window without a hit clears.
        let (t, changed) = w.observe_repeat(false, None, 3, 10_000, 24_001);
        assert_eq!((t, changed), (Transition::Clear, true));
        assert_eq!(w, Window::default());
        // An explicit clear condition wins over the window.
        let mut w = Window::default();
        for at in [0, 1, 2] {
            w.observe_repeat(true, Some(false), 3, 10_000, at);
        }
        assert!(w.firing);
        assert_eq!(w.observe_repeat(true, Some(true), 3, 10_000, 3).0, Transition::Clear);
    }

    #[test]
    fn repeat_specs_are_checked() {
        let mut s = spec("speed > 30.0");
        s.repeat_count = Some(3);
        s.repeat_window_s = 60;
        assert!(validate(s.clone(), t(), "r".into(), 1).is_ok());
        let mut bad = s.clone();
        bad.repeat_count = Some(1);
        assert!(validate(bad, t(), "r".into(), 1).unwrap_err().contains("repeat_count must be 2.."));
        let mut bad = s.clone();
        bad.repeat_window_s = 0;
        assert!(validate(bad, t(), "r".into(), 1).unwrap_err().contains("repeat_window_s"));
        let mut bad = s.clone();
        bad.for_s = 5;
        assert!(validate(bad, t(), "r".into(), 1).unwrap_err().contains("no for_s"));
        let mut bad = spec("speed > 30.0");
        bad.repeat_window_s = 60;
        assert!(validate(bad, t(), "r".into(), 1).unwrap_err().contains("needs repeat_count"));
    }

    #[test]
    fn specs_are_validated_with_precise_errors() {
        assert!(validate(spec("battery < 15.0"), t(), "r".into(), 1).is_ok());
        let e = validate(spec("battery <"), t(), "r".into(), 1).unwrap_err();
        assert!(e.starts_with("condition:"), "{e}");
        let e = validate(spec("batery < 15.0"), t(), "r".into(), 1).unwrap_err();
        assert!(e.contains("unknown variable \"batery\""), "{e}");
        let e = validate(RuleSpec { severity: "loud".into(), ..spec("online") }, t(), "r".into(), 1).unwrap_err();
        assert!(e.contains("severity"), "{e}");
        let e = validate(RuleSpec { scope: "battery <".into(), ..spec("online") }, t(), "r".into(), 1).unwrap_err();
        assert!(e.starts_with("scope:"), "{e}");
        let e = validate(RuleSpec { absent_s: Some(30), ..spec("online") }, t(), "r".into(), 1).unwrap_err();
        assert!(e.contains("absence rule"), "{e}");
        assert!(validate(RuleSpec { absent_s: Some(30), ..spec("") }, t(), "r".into(), 1).is_ok());
        let e = validate(spec(""), t(), "r".into(), 1).unwrap_err();
        assert_eq!(e, "condition is required");
    }

    #[test]
    fn a_duration_window_fires_only_after_holding_for_its_length() {
        let mut w = Window::default();
        assert_eq!(w.observe(true, false, 60_000, 0), (Transition::None, true));
        assert_eq!(w.observe(true, false, 60_000, 30_000).0, Transition::None);
        // A false observation resets the window.
        assert_eq!(w.observe(false, true, 60_000, 40_000), (Transition::None, true));
        assert_eq!(w.observe(true, false, 60_000, 50_000).0, Transition::None);
        assert_eq!(w.tick(60_000, 100_000), Transition::None);
        assert_eq!(w.tick(60_000, 110_000), Transition::Fire);
        assert!(w.firing);
        assert_eq!(w.observe(true, false, 60_000, 111_000), (Transition::Repeat, false));
        assert_eq!(w.observe(false, true, 60_000, 112_000), (Transition::Clear, true));
        assert_eq!(w, Window::default());
    }

    #[test]
    fn hysteresis_keeps_firing_until_the_clear_condition() {
        // condition battery < 15, clear battery > 25: 20 neither repeats nor clears.
        let mut w = Window::default();
        assert_eq!(w.observe(true, false, 0, 1).0, Transition::Fire);
        assert_eq!(w.observe(false, false, 0, 2), (Transition::None, false));
        assert!(w.firing);
        assert_eq!(w.observe(false, true, 0, 3).0, Transition::Clear);
    }

    #[test]
    fn polygons_contain_what_is_inside_them() {
        // A square around (37.75, -122.45).
        let sq = [37.7, -122.5, 37.8, -122.5, 37.8, -122.4, 37.7, -122.4];
        assert!(in_polygon(37.75, -122.45, &sq));
        assert!(!in_polygon(37.85, -122.45, &sq));
        assert!(!in_polygon(37.75, -122.35, &sq));
        assert!(!in_polygon(37.75, -122.45, &sq[..4]), "two points enclose nothing");
    }

    #[test]
    fn zscores_appear_after_the_warm_up_and_flag_outliers() {
        let mut e = Ewma::default();
        for i in 0..ZSCORE_WARMUP {
            assert_eq!(e.observe(50.0 + (i % 3) as f64), None, "warming up");
        }
        let normal = e.observe(51.0).unwrap();
        assert!(normal.abs() < 2.0, "{normal}");
        let outlier = e.observe(80.0).unwrap();
        assert!(outlier > 5.0, "{outlier}");
    }

    #[test]
    fn cel_compares_doubles_with_integer_literals() {
        let p = compile("c", "battery < 15 && mode == 'mission'").unwrap();
        let mut ctx = cel_interpreter::Context::default();
        ctx.add_variable_from_value("battery", 10.0);
        ctx.add_variable_from_value("mode", "mission");
        assert_eq!(p.execute(&ctx).unwrap(), cel_interpreter::Value::Bool(true));
    }
}

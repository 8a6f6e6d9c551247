//! MQTT topic names and filters within a tenant's namespace: validation, matching, shared
//! subscriptions, and the per-tenant topic policy that decides what a device may publish and
//! subscribe to beyond its platform topics.
//!
//! Everything here is pure; the broker (`net::mqtt::broker`) keeps the subscriptions.

use serde::{Deserialize, Serialize};

/// Longest topic name or filter accepted, in bytes (MQTT allows 65,535; nothing real needs it).
pub const TOPIC_LEN_MAX: usize = 1024;
/// Most levels in a topic name or filter.
pub const TOPIC_LEVELS_MAX: usize = 32;
/// Most allow-list entries in one policy (publish and subscribe together).
pub const POLICY_ENTRIES_MAX: usize = 64;
/// The placeholder a policy entry may use for the connecting orb's id.
pub const ORB_PLACEHOLDER: &str = "{orb}";

/// Why a topic name or filter was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {TOPIC_LEN_MAX} bytes")]
    TooLong,
    #[error("topic has more than {TOPIC_LEVELS_MAX} levels")]
    TooDeep,
    #[error("topic contains NUL or a control character")]
    Control,
    #[error("a topic name may not contain '+' or '#'")]
    WildcardInName,
    #[error("'#' must be the whole last level of a filter")]
    MisplacedHash,
    #[error("'+' must be a whole level of a filter")]
    MisplacedPlus,
    #[error("shared subscription must be $share/<group>/<filter> with a group without '+', '#' or '/'")]
    BadShare,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > TOPIC_LEN_MAX {
        return Err(TopicError::TooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(TopicError::Control);
    }
    if s.split('/').count() > TOPIC_LEVELS_MAX {
        return Err(TopicError::TooDeep);
    }
    Ok(())
}

/// Checks a PUBLISH topic name.
pub fn check_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a (non-shared) topic filter.
pub fn check_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != last) {
            return Err(TopicError::MisplacedHash);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::MisplacedPlus);
        }
    }
    Ok(())
}

/// A SUBSCRIBE filter: plain, or shared by a group (`$share/<group>/<filter>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription<'a> {
    pub group: Option<&'a str>,
    pub filter: &'a str,
}

/// Parses and checks a SUBSCRIBE filter.
pub fn parse_subscription(s: &str) -> Result<Subscription<'_>, TopicError> {
    if let Some(rest) = s.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || group.chars().any(char::is_control) {
            return Err(TopicError::BadShare);
        }
        check_filter(filter)?;
        return Ok(Subscription { group: Some(group), filter });
    }
    if s == "$share" {
        return Err(TopicError::BadShare);
    }
    check_filter(s)?;
    Ok(Subscription { group: None, filter: s })
}

/// Does `filter` match topic `name`? Both must be valid. Topics starting with `$` are not
/// matched by a filter starting with a wildcard [MQTT-4.7.2-1].
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does every topic matched by `requested` also match `allowed`? (Both valid filters.)
pub fn covers(allowed: &str, requested: &str) -> bool {
    if requested.starts_with('$') && allowed.starts_with(['+', '#']) {
        // `#` and `+` at the first level never match `$` topics, which `$...` requests.
        return false;
    }
    let mut a = allowed.split('/');
    let mut r = requested.split('/');
    loop {
        match (a.next(), r.next()) {
            (Some("#"), _) => {
                // `a/#` also matches `a` itself, which `a` requested is.
                return true;
            }
            (Some("+"), Some(rl)) if rl != "#" => {}
            (Some(al), Some(rl)) if al == rl && al != "+" && al != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What a tenant lets its devices do beyond their platform topics. Entries are topic filters
/// that may contain `{orb}` as a whole level, replaced by the connecting orb's id; an empty
/// policy (the default) allows only the platform topics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicPolicy {
    /// Filters a device may publish to (a topic name must match one).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Filters a device may subscribe within (a requested filter must be covered by one).
    #[serde(default)]
    pub subscribe: Vec<String>,
}

impl TopicPolicy {
    /// Checks every entry; the error names the entry.
    pub fn validate(&self) -> Result<(), String> {
        if self.publish.len() + self.subscribe.len() > POLICY_ENTRIES_MAX {
            return Err(format!("a policy has at most {POLICY_ENTRIES_MAX} entries"));
        }
        for (list, entries) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            for e in entries {
                if e.split('/').any(|l| l.contains(ORB_PLACEHOLDER) && l != ORB_PLACEHOLDER) {
                    return Err(format!("{list} entry {e:?}: {ORB_PLACEHOLDER} must be a whole level"));
                }
                if e.starts_with("$share") {
                    return Err(format!("{list} entry {e:?}: name the filter, not a $share group"));
                }
                check_filter(&e.replace(ORB_PLACEHOLDER, "x")).map_err(|err| format!("{list} entry {e:?}: {err}"))?;
            }
        }
        Ok(())
    }

    /// May orb `orb` (or an anonymous client, `None`: entries with `{orb}` never apply)
    /// publish to `name`?
    pub fn allows_publish(&self, orb: Option<&str>, name: &str) -> bool {
        self.publish.iter().any(|e| bind(e, orb).is_some_and(|f| matches(&f, name)))
    }

    /// May orb `orb` subscribe to `filter`?
    pub fn allows_subscribe(&self, orb: Option<&str>, filter: &str) -> bool {
        self.subscribe.iter().any(|e| bind(e, orb).is_some_and(|f| covers(&f, filter)))
    }
}

/// `entry` with `{orb}` replaced; `None` when it needs an orb and there is none. Orb ids never
/// contain `/`, `+` or `#` (checked at parse), so a binding cannot widen the filter.
fn bind(entry: &str, orb: Option<&str>) -> Option<String> {
    if !entry.contains(ORB_PLACEHOLDER) {
        return Some(entry.to_string());
    }
    Some(entry.replace(ORB_PLACEHOLDER, orb?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters_are_checked() {
        assert!(check_name("a/b/c").is_ok());
        assert!(check_name("/").is_ok());
        assert_eq!(check_name(""), Err(TopicError::Empty));
        assert_eq!(check_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(check_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(check_name("a\0b"), Err(TopicError::Control));
        assert_eq!(check_name(&"a/".repeat(40)), Err(TopicError::TooDeep));
        for ok in ["#", "+", "a/#", "+/+/#", "a/+/c", "/+", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(check_filter("a/#/b"), Err(TopicError::MisplacedHash));
        assert_eq!(check_filter("a#"), Err(TopicError::MisplacedHash));
        assert_eq!(check_filter("a/b+"), Err(TopicError::MisplacedPlus));
    }

    #[test]
    fn shared_subscriptions_parse() {
        assert_eq!(parse_subscription("$share/g1/a/+").unwrap(), Subscription { group: Some("g1"), filter: "a/+" });
        assert_eq!(parse_subscription("a/b").unwrap(), Subscription { group: None, filter: "a/b" });
        for bad in ["$share/g1", "$share//a", "$share/g+/a", "$share", "$share/g/a/#/b"] {
            assert!(parse_subscription(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_follows_the_spec() {
        let yes = [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("#", "a/b"),
            ("+/+", "/a"),
            ("+", ""),
            ("$SYS/#", "$SYS/x"),
            ("+/b", "a/b"),
        ];
        let no = [
            ("a/b", "a/c"),
            ("a/+", "a/b/c"),
            ("a/+", "a"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("a/b", "a/b/c"),
            ("a/b/c", "a/b"),
        ];
        for (f, n) in yes {
            assert!(matches(f, n), "{f} should match {n}");
        }
        for (f, n) in no {
            assert!(!matches(f, n), "{f} should not match {n}");
        }
    }

    #[test]
    fn coverage_is_subsumption() {
        assert!(covers("#", "a/b"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers("a/b", "#"));
        assert!(!covers("#", "$SYS/#"));
        assert!(covers("$SYS/#", "$SYS/a"));
    }

    #[test]
    fn policies_bind_the_orb_and_never_apply_orb_entries_to_anonymous_clients() {
        let p = TopicPolicy {
            publish: vec!["fleet/{orb}/#".into(), "broadcast/all".into()],
            subscribe: vec!["fleet/+/status".into(), "inbox/{orb}".into()],
        };
        p.validate().unwrap();
        assert!(p.allows_publish(Some("o1"), "fleet/o1/status"));
        assert!(!p.allows_publish(Some("o1"), "fleet/o2/status"));
        assert!(p.allows_publish(Some("o1"), "broadcast/all"));
        assert!(!p.allows_publish(None, "fleet/o1/status"));
        assert!(p.allows_subscribe(Some("o1"), "fleet/o9/status"));
        assert!(p.allows_subscribe(Some("o1"), "fleet/+/status"));
        assert!(!p.allows_subscribe(Some("o1"), "fleet/#"));
        assert!(p.allows_subscribe(Some("o1"), "inbox/o1"));
        assert!(!p.allows_subscribe(Some("o1"), "inbox/+"));
        assert!(TopicPolicy::default().validate().is_ok());
        assert!(!TopicPolicy::default().allows_publish(Some("o1"), "a"));
    }

    #[test]
    fn bad_policies_name_the_entry() {
        let bad = |publish: &str| TopicPolicy { publish: vec![publish.into()], subscribe: vec![] }.validate();
        assert!(bad("a/{orb}x").unwrap_err().contains("a/{orb}x"));
        assert!(bad("a/#/b").unwrap_err().contains("'#'"));
        assert!(bad("$share/g/a").is_err());
        assert!(bad("").is_err());
        let many = TopicPolicy { publish: vec!["a".into(); POLICY_ENTRIES_MAX + 1], subscribe: vec![] };
        assert!(many.validate().is_err());
    }
}

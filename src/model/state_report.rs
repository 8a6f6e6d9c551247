//! Reported state from `state/{tenant}/{orb}`: component versions and configuration.
//!
//! `{"firmware": "2.3.1", "model": "yolo-7", "components": {"lidar": "1.2"}, "config": {...}}`.
//! Top-level strings and the `components` object name component versions (any number of
//! components, not just firmware); `config` is any JSON object, kept verbatim. A report
//! replaces the components it names and leaves the others, like a device shadow's "reported".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::telemetry::PayloadError;
use crate::limits::{STATE_COMPONENT_LEN_MAX, STATE_COMPONENTS_MAX, STATE_REPORT_MAX_BYTES};

/// One parsed report.
#[derive(Clone, Debug, PartialEq)]
pub struct StateReport {
    pub versions: BTreeMap<String, String>,
    /// Compact JSON of the `config` object, when the report carries one.
    pub config: Option<String>,
}

/// What is known of an orb's reported state, merged over all reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    pub versions: BTreeMap<String, String>,
    pub config: Option<String>,
    pub updated_ms: Option<u64>,
}

/// One change of a reported component version, kept in the orb's inventory history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionChange {
    pub component: String,
    /// `None` the first time the component is reported.
    pub from: Option<String>,
    pub to: String,
    /// When the report that carried it was applied (server time, strictly increasing per orb).
    pub at_ms: u64,
}

impl VersionChange {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"component": self.component, "from": self.from, "to": self.to, "at_ms": self.at_ms})
    }
}

impl Reported {
    /// Merges a report received at `at_ms`; returns whether anything changed.
    pub fn merge(&mut self, report: &StateReport, at_ms: u64) -> Result<bool, PayloadError> {
        let mut versions = self.versions.clone();
        for (k, v) in &report.versions {
            versions.insert(k.clone(), v.clone());
        }
        if versions.len() > STATE_COMPONENTS_MAX {
            return Err(PayloadError::Invalid {
                field: "components".into(),
                reason: format!("an orb reports at most {STATE_COMPONENTS_MAX} components"),
            });
        }
        let config = report.config.clone().or_else(|| self.config.clone());
        let changed = versions != self.versions || config != self.config;
        self.versions = versions;
        self.config = config;
        self.updated_ms = Some(at_ms);
        Ok(changed)
    }

    /// The component versions that differ in `next`, as history entries at `at_ms`.
    pub fn changes_to(&self, next: &Reported, at_ms: u64) -> Vec<VersionChange> {
        next.versions
            .iter()
            .filter(|(k, v)| self.versions.get(*k) != Some(*v))
            .map(|(k, v)| VersionChange {
                component: k.clone(),
                from: self.versions.get(k).cloned(),
                to: v.clone(),
                at_ms,
            })
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let config = self
            .config
            .as_deref()
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "versions": self.versions,
            "config": config,
            "updated_ms": self.updated_ms,
        })
    }
}

fn check_component(field: &str, s: &str) -> Result<(), PayloadError> {
    if s.is_empty() || s.len() > STATE_COMPONENT_LEN_MAX || s.chars().any(char::is_control) {
        return Err(PayloadError::Invalid {
            field: field.to_string(),
            reason: format!("must be 1..{STATE_COMPONENT_LEN_MAX} bytes without control characters"),
        });
    }
    Ok(())
}

/// Parses a state report.
pub fn parse(payload: &[u8]) -> Result<StateReport, PayloadError> {
    if payload.len() > STATE_REPORT_MAX_BYTES {
        return Err(PayloadError::TooLarge { size: payload.len(), max: STATE_REPORT_MAX_BYTES });
    }
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| PayloadError::Malformed(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(PayloadError::Malformed("expected a JSON object".into()));
    };
    let mut versions = BTreeMap::new();
    let mut config = None;
    for (key, value) in map {
        match (key.as_str(), value) {
            ("config", serde_json::Value::Object(c)) => {
                config = Some(serde_json::Value::Object(c).to_string());
            }
            ("config", serde_json::Value::Null) => {}
            ("config", _) => {
                return Err(PayloadError::Invalid { field: key, reason: "must be an object".into() });
            }
            ("components", serde_json::Value::Object(c)) => {
                for (name, v) in c {
                    let field = format!("components.{name}");
                    let serde_json::Value::String(v) = v else {
                        return Err(PayloadError::Invalid { field, reason: "must be a version string".into() });
                    };
                    check_component(&field, &name)?;
                    check_component(&field, &v)?;
                    versions.insert(name, v);
                }
            }
            (_, serde_json::Value::String(v)) => {
                check_component(&key, &key)?;
                check_component(&key, &v)?;
                versions.insert(key, v);
            }
            (_, serde_json::Value::Null) => {}
            _ => {
                return Err(PayloadError::Invalid {
                    field: key,
                    reason: "must be a version string (or `components` / `config` objects)".into(),
                });
            }
        }
    }
    if versions.len() > STATE_COMPONENTS_MAX {
        return Err(PayloadError::Invalid {
            field: "components".into(),
            reason: format!("more than {STATE_COMPONENTS_MAX} components"),
        });
    }
    Ok(StateReport { versions, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_only_components_that_differ_with_their_old_version() {
        let mut old = Reported::default();
        old.merge(&parse(br#"{"firmware":"1","model":"a"}"#).unwrap(), 10).unwrap();
        let mut next = old.clone();
        next.merge(&parse(br#"{"firmware":"2","model":"a","components":{"lidar":"7"}}"#).unwrap(), 20).unwrap();
        let changes = old.changes_to(&next, 20);
        assert_eq!(
            changes,
            vec![
                VersionChange { component: "firmware".into(), from: Some("1".into()), to: "2".into(), at_ms: 20 },
                VersionChange { component: "lidar".into(), from: None, to: "7".into(), at_ms: 20 },
            ]
        );
        assert!(next.changes_to(&next, 30).is_empty(), "a report that repeats itself changes nothing");
    }

    #[test]
    fn top_level_strings_and_components_are_versions() {
        let r =
            parse(br#"{"firmware":"2.3.1","model":"yolo-7","components":{"lidar":"1.2"},"config":{"x":1}}"#).unwrap();
        assert_eq!(r.versions.get("firmware").map(String::as_str), Some("2.3.1"));
        assert_eq!(r.versions.get("lidar").map(String::as_str), Some("1.2"));
        assert_eq!(r.config.as_deref(), Some(r#"{"x":1}"#));
    }

    #[test]
    fn merge_keeps_components_not_named() {
        let mut rep = Reported::default();
        assert!(rep.merge(&parse(br#"{"firmware":"1","model":"a"}"#).unwrap(), 10).unwrap());
        assert!(rep.merge(&parse(br#"{"firmware":"2"}"#).unwrap(), 20).unwrap());
        assert_eq!(rep.versions.get("model").map(String::as_str), Some("a"));
        assert_eq!(rep.versions.get("firmware").map(String::as_str), Some("2"));
        assert!(!rep.merge(&parse(br#"{"firmware":"2"}"#).unwrap(), 30).unwrap());
        assert_eq!(rep.updated_ms, Some(30));
    }

    #[test]
    fn refuses_non_strings_and_bad_shapes() {
        assert!(matches!(parse(br#"{"firmware":2}"#), Err(PayloadError::Invalid { .. })));
        assert!(matches!(parse(br#"{"config":[1]}"#), Err(PayloadError::Invalid { .. })));
        assert!(matches!(parse(br#"[1]"#), Err(PayloadError::Malformed(_))));
        assert!(matches!(parse(b"{"), Err(PayloadError::Malformed(_))));
        let big = vec![b' '; STATE_REPORT_MAX_BYTES + 1];
        assert!(matches!(parse(&big), Err(PayloadError::TooLarge { .. })));
    }
}

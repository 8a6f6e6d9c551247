//! Configuration: one serde tree, read from defaults, then the TOML file, then `ORBMANAGER_*`
//! environment variables, then command-line flags; validated once at start.
//!
//! Every key has an environment twin named after its path: `mqtt_addr` is
//! `ORBMANAGER_MQTT_ADDR`, `[mqtt] max_packet_size` is `ORBMANAGER_MQTT_MAX_PACKET_SIZE`.
//! The twins are derived from the tree itself, so a new key gets one without extra code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits;

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, `endpoints.json` and object files live.
    pub data_dir: PathBuf,
    /// Development mode: the dev tenant `default` is open (see DESIGN.md).
    pub dev: bool,
    pub mqtt_addr: String,
    /// The MQTTS listener: TLS with a client certificate issued at registration (mTLS);
    /// empty: none.
    pub mqtts_addr: String,
    pub grpc_addr: String,
    pub http_addr: String,
    /// Where cold telemetry, checkpoints and exports go: `file://<dir>` or `s3://bucket/prefix`
    /// (empty: `file://<data_dir>/objects`).
    pub object_store: String,
    /// Log filter in `tracing` syntax (`info`, `orbmanager=debug,info`).
    pub log: String,
    pub mqtt: MqttConfig,
    pub telemetry: TelemetryConfig,
    pub storage: StorageConfig,
    pub actors: ActorsConfig,
    pub stream: StreamConfig,
    pub events: EventsConfig,
    pub auth: AuthConfig,
}

/// The tenant event log (`GET /v1/events`, the event stream, webhooks' source).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// How long events are kept, in seconds; a client can resume from any id this young.
    pub retention_s: u64,
    /// Newest events kept per tenant, whatever their age.
    pub max_per_tenant: u64,
    /// How often old events are pruned, in seconds.
    pub prune_interval_s: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { retention_s: 7 * 24 * 3600, max_per_tenant: 1_000_000, prune_interval_s: 60 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Live-stream ring size, in events; a subscriber further behind is told and resynced.
    pub buffer: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { buffer: limits::STREAM_BUFFER_DEFAULT }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Largest MQTT packet either way, in bytes (v5 clients are told in CONNACK).
    pub max_packet_size: u32,
    /// QoS 1 publishes a client may have unacknowledged (v5 Receive Maximum).
    pub receive_maximum: u16,
    /// Payload bytes a connection may have in flight before the server stops reading.
    pub inflight_bytes_max: usize,
    /// Longest keep-alive granted, in seconds.
    pub keepalive_max_s: u16,
    /// Time to complete CONNECT, in seconds.
    pub connect_timeout_s: u16,
    /// Concurrent connections per node.
    pub max_connections: usize,
    /// Worker threads (0: one per core).
    pub workers: usize,
    /// Longest session expiry granted to persistent sessions (v3 clean session 0, v5 session
    /// expiry), in seconds; longer requests are capped and v5 clients told.
    pub session_expiry_max_s: u32,
    /// DNS names in the MQTTS server certificate besides `localhost` and the listener's IP.
    pub tls_server_names: Vec<String>,
    /// PUBLISHes per second one connection may send (an edge gateway: this many per orb it
    /// carries, itself included); beyond, publishes are held back up to one second, then the
    /// connection is closed (v5 DISCONNECT 0x96). 0: no limit.
    pub publish_rate_per_connection: u32,
    /// PUBLISHes per second all connections of one tenant may send on this node; 0: no limit.
    pub publish_rate_per_tenant: u32,
    /// New connections per second on this node; beyond, CONNACK 0x9F (v3: server
    /// unavailable). 0: no limit.
    pub connect_rate_per_s: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Largest telemetry payload, in bytes.
    pub max_payload_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Block cache, in MiB.
    pub cache_mb: u64,
    /// Write requests waiting for group commit before writers wait.
    pub commit_queue_max: usize,
    /// How long a small commit group (fewer than 32 writes) may wait for more writes to share
    /// its fsync, in microseconds; 0: never. Adds at most this to an acknowledgement.
    pub commit_linger_us: u64,
    /// Stored telemetry points of at least this many bytes are kept in blob files, which the
    /// LSM tree's merges do not rewrite (more disk, far less rewriting); 0: all in the tree.
    /// Applies when the store is created: an existing store keeps what it was created with.
    pub telemetry_blob_min_bytes: u32,
    /// How often expired `msg_id` dedupe entries are removed, in seconds.
    pub dedupe_sweep_interval_s: u64,
    /// Size of each of the two in-memory `msg_id` filters, in MiB (about 1% false positives
    /// at 10 million ids per 10-minute bucket with 16 MiB).
    pub dedupe_filter_mb: usize,
    /// Telemetry older than this (device time) moves to the cold tier: a duration such as
    /// `90s`, `30m`, `6h`, `7d`.
    pub hot_window: String,
    /// How often eligible telemetry is spilled, in seconds (0: only on request).
    pub spill_interval_s: u64,
    /// Points a spill buffers before writing a file, in MiB (estimated decoded size).
    pub spill_buffer_mb: usize,
    /// How often a checkpoint is written to the object store, in seconds (0: only on request).
    pub checkpoint_interval_s: u64,
    /// Cold telemetry older than this is deleted (a duration; `0` keeps it forever).
    pub cold_retention: String,
    /// Rows per file of an export job.
    pub export_file_rows: u64,
    /// S3 connection for an `s3://` object store.
    pub s3: crate::storage::cold::S3Settings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorsConfig {
    /// Shard supervisors (orbs are routed by a hash of tenant and orb).
    pub shards: usize,
    /// Idle time after which an offline orb actor is passivated, in seconds.
    pub idle_passivate_s: u64,
    /// Durable telemetry points waiting in orb actors' mailboxes, across the node; beyond it
    /// acknowledgements wait (backpressure to devices).
    pub telemetry_in_flight_max: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bootstrap operator token for the REST API (empty: none). Prefer the environment twin
    /// `ORBMANAGER_AUTH_ADMIN_TOKEN` over writing it into a file.
    pub admin_token: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./orbmanager-data"),
            dev: false,
            mqtt_addr: "127.0.0.1:1883".into(),
            mqtts_addr: "127.0.0.1:8883".into(),
            grpc_addr: "127.0.0.1:50051".into(),
            http_addr: "127.0.0.1:8080".into(),
            object_store: String::new(),
            log: "info".into(),
            mqtt: MqttConfig::default(),
            telemetry: TelemetryConfig::default(),
            storage: StorageConfig::default(),
            actors: ActorsConfig::default(),
            stream: StreamConfig::default(),
            events: EventsConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: limits::MQTT_PACKET_SIZE_MAX_BYTES,
            receive_maximum: limits::MQTT_RECEIVE_MAXIMUM,
            inflight_bytes_max: limits::MQTT_INFLIGHT_BYTES_MAX,
            keepalive_max_s: limits::MQTT_KEEPALIVE_MAX_S,
            connect_timeout_s: limits::MQTT_CONNECT_TIMEOUT_S,
            max_connections: limits::MQTT_CONNECTIONS_MAX,
            workers: 0,
            session_expiry_max_s: limits::MQTT_SESSION_EXPIRY_MAX_S,
            tls_server_names: Vec::new(),
            publish_rate_per_connection: limits::MQTT_PUBLISH_RATE_PER_CONNECTION,
            publish_rate_per_tenant: 0,
            connect_rate_per_s: limits::MQTT_CONNECT_RATE_PER_S,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { max_payload_bytes: limits::TELEMETRY_PAYLOAD_MAX_BYTES }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_mb: 64,
            commit_queue_max: limits::COMMIT_QUEUE_MAX,
            commit_linger_us: limits::COMMIT_LINGER_US,
            telemetry_blob_min_bytes: limits::TELEMETRY_BLOB_MIN_BYTES,
            dedupe_sweep_interval_s: 60,
            dedupe_filter_mb: 16,
            hot_window: "6h".into(),
            spill_interval_s: 300,
            spill_buffer_mb: 64,
            checkpoint_interval_s: 300,
            cold_retention: "0".into(),
            export_file_rows: crate::storage::cold::export::EXPORT_FILE_ROWS as u64,
            s3: Default::default(),
        }
    }
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig {
            shards: limits::SHARDS_DEFAULT,
            idle_passivate_s: limits::ORB_IDLE_PASSIVATE_S,
            telemetry_in_flight_max: limits::TELEMETRY_IN_FLIGHT_MAX,
        }
    }
}

/// Configuration errors, each naming the key or source at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}={value:?}: {message}")]
    Env { name: String, value: String, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Values given on the command line; they win over everything else.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub object_store: Option<String>,
    pub mqtt_addr: Option<String>,
    pub mqtts_addr: Option<String>,
    pub grpc_addr: Option<String>,
    pub http_addr: Option<String>,
    pub dev: bool,
}

/// Parses a duration: a whole number with a unit `s`, `m`, `h` or `d` (`0` alone is zero).
/// Returns milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(0);
    }
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration such as 90s, 30m, 6h or 7d"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} is not a duration such as 90s, 30m, 6h or 7d")),
    };
    n.checked_mul(ms).ok_or_else(|| format!("{s:?} is too long"))
}

/// Environment variable name of a config path.
pub fn env_name(path: &[&str]) -> String {
    format!("ORBMANAGER_{}", path.join("_").to_uppercase())
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Leaf paths of a table, with their default values.
fn leaves(t: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    for (k, v) in t {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(inner) => leaves(inner, prefix, out),
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

fn set_path(t: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("leaf paths are never empty");
    let mut cur = t;
    for p in parents {
        cur = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("parents of leaves are tables");
    }
    cur.insert(last.clone(), value);
}

/// Reads an environment value with the type of the key's default.
fn env_value(name: &str, raw: &str, default: &toml::Value) -> Result<toml::Value, ConfigError> {
    let err = |message: &str| ConfigError::Env { name: name.into(), value: raw.into(), message: message.into() };
    Ok(match default {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Boolean(_) => match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" | "" => toml::Value::Boolean(false),
            _ => return Err(err("expected true or false")),
        },
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().map_err(|_| err("expected an integer"))?),
        toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().map_err(|_| err("expected a number"))?),
        // Lists of strings: comma-separated.
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| toml::Value::String(v.into())).collect(),
        ),
        _ => return Err(err("this key cannot be set from the environment")),
    })
}

impl Config {
    /// Loads the configuration: defaults, then `file`, then `env` (`ORBMANAGER_*` pairs),
    /// then `overrides`. Returns the config and warnings (unknown `ORBMANAGER_*` variables).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let defaults = toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut table = defaults.clone();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            let over: toml::Table =
                toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
            merge(&mut table, over);
            // Unknown keys are reported here, with the file's name, rather than later.
            table
                .clone()
                .try_into::<Config>()
                .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        }
        let mut keys = Vec::new();
        leaves(&defaults, &mut Vec::new(), &mut keys);
        let mut warnings = Vec::new();
        for (name, raw) in env {
            if !name.starts_with("ORBMANAGER_") || name == "ORBMANAGER_CONFIG" {
                continue;
            }
            match keys.iter().find(|(path, _)| env_name(&path.iter().map(String::as_str).collect::<Vec<_>>()) == name) {
                Some((path, default)) => set_path(&mut table, path, env_value(&name, &raw, default)?),
                None => warnings.push(format!("ignoring unknown environment variable {name}")),
            }
        }
        let o = overrides;
        let string_overrides = [
            ("data_dir", o.data_dir.as_ref().map(|p| p.display().to_string())),
            ("mqtt_addr", o.mqtt_addr.clone()),
            ("mqtts_addr", o.mqtts_addr.clone()),
            ("grpc_addr", o.grpc_addr.clone()),
            ("http_addr", o.http_addr.clone()),
            ("object_store", o.object_store.clone()),
        ];
        for (k, v) in string_overrides {
            if let Some(v) = v {
                table.insert(k.into(), toml::Value::String(v));
            }
        }
        if o.dev {
            table.insert("dev".into(), toml::Value::Boolean(true));
        }
        let config: Config = table.try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok((config, warnings))
    }

    /// Checks ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (name, addr) in
            [("mqtt_addr", &self.mqtt_addr), ("grpc_addr", &self.grpc_addr), ("http_addr", &self.http_addr)]
        {
            if addr.parse::<SocketAddr>().is_err() {
                return invalid(format!("{name} = {addr:?} is not an ip:port address"));
            }
        }
        if !self.mqtts_addr.is_empty() && self.mqtts_addr.parse::<SocketAddr>().is_err() {
            return invalid(format!("mqtts_addr = {:?} is not an ip:port address (or empty: none)", self.mqtts_addr));
        }
        for name in &self.mqtt.tls_server_names {
            if name.is_empty()
                || name.len() > 253
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return invalid(format!("mqtt.tls_server_names: {name:?} is not a DNS name"));
            }
        }
        let m = &self.mqtt;
        if !(1024..=256 * 1024 * 1024).contains(&m.max_packet_size) {
            return invalid(format!("mqtt.max_packet_size = {} must be 1 KiB..256 MiB", m.max_packet_size));
        }
        if m.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum must be at least 1".into());
        }
        if m.inflight_bytes_max < m.max_packet_size as usize {
            return invalid(format!(
                "mqtt.inflight_bytes_max = {} must be at least mqtt.max_packet_size",
                m.inflight_bytes_max
            ));
        }
        if m.session_expiry_max_s > 30 * 86_400 {
            return invalid(format!(
                "mqtt.session_expiry_max_s = {} must be at most 2592000 (30 days)",
                m.session_expiry_max_s
            ));
        }
        if !(5..=3600).contains(&m.keepalive_max_s) {
            return invalid(format!("mqtt.keepalive_max_s = {} must be 5..3600", m.keepalive_max_s));
        }
        if !(1..=300).contains(&m.connect_timeout_s) {
            return invalid(format!("mqtt.connect_timeout_s = {} must be 1..300", m.connect_timeout_s));
        }
        if !(1..=1_000_000).contains(&m.max_connections) {
            return invalid(format!("mqtt.max_connections = {} must be 1..1000000", m.max_connections));
        }
        if m.workers > 256 {
            return invalid(format!("mqtt.workers = {} must be at most 256", m.workers));
        }
        let t = &self.telemetry;
        if t.max_payload_bytes < 256 || t.max_payload_bytes + 1024 > m.max_packet_size as usize {
            return invalid(format!(
                "telemetry.max_payload_bytes = {} must be at least 256 and leave 1 KiB under mqtt.max_packet_size = {}",
                t.max_payload_bytes, m.max_packet_size
            ));
        }
        let s = &self.storage;
        if s.cache_mb == 0 || s.cache_mb > 1024 * 1024 {
            return invalid(format!("storage.cache_mb = {} must be 1..1048576", s.cache_mb));
        }
        if !(1..=1_000_000).contains(&s.commit_queue_max) {
            return invalid(format!("storage.commit_queue_max = {} must be 1..1000000", s.commit_queue_max));
        }
        if s.commit_linger_us > limits::COMMIT_LINGER_US_MAX {
            return invalid(format!(
                "storage.commit_linger_us = {} must be 0..{}",
                s.commit_linger_us,
                limits::COMMIT_LINGER_US_MAX
            ));
        }
        if s.telemetry_blob_min_bytes > limits::TELEMETRY_BLOB_MIN_BYTES_MAX {
            return invalid(format!(
                "storage.telemetry_blob_min_bytes = {} must be 0..{}",
                s.telemetry_blob_min_bytes,
                limits::TELEMETRY_BLOB_MIN_BYTES_MAX
            ));
        }
        if !(1..=4096).contains(&s.dedupe_filter_mb) {
            return invalid(format!("storage.dedupe_filter_mb = {} must be 1..4096", s.dedupe_filter_mb));
        }
        let hot =
            parse_duration(&s.hot_window).map_err(|e| ConfigError::Invalid(format!("storage.hot_window: {e}")))?;
        if hot < 60_000 {
            return invalid(format!("storage.hot_window = {:?} must be at least 1m", s.hot_window));
        }
        parse_duration(&s.cold_retention).map_err(|e| ConfigError::Invalid(format!("storage.cold_retention: {e}")))?;
        if !(100..=10_000_000).contains(&s.export_file_rows) {
            return invalid(format!("storage.export_file_rows = {} must be 100..10000000", s.export_file_rows));
        }
        if !(1..=4096).contains(&s.spill_buffer_mb) {
            return invalid(format!("storage.spill_buffer_mb = {} must be 1..4096", s.spill_buffer_mb));
        }
        crate::storage::cold::ObjectTarget::parse(&self.object_store, &self.data_dir, &s.s3)
            .map_err(|e| ConfigError::Invalid(format!("object_store: {e}")))?;
        if s.dedupe_sweep_interval_s == 0 {
            return invalid("storage.dedupe_sweep_interval_s must be at least 1".into());
        }
        let a = &self.actors;
        if !(1..=4096).contains(&a.shards) {
            return invalid(format!("actors.shards = {} must be 1..4096", a.shards));
        }
        if a.idle_passivate_s == 0 {
            return invalid("actors.idle_passivate_s must be at least 1".into());
        }
        if !(1..=16 * 1024 * 1024).contains(&a.telemetry_in_flight_max) {
            return invalid(format!(
                "actors.telemetry_in_flight_max = {} must be 1..16777216",
                a.telemetry_in_flight_max
            ));
        }
        let e = &self.events;
        if !(60..=366 * 24 * 3600).contains(&e.retention_s) {
            return invalid(format!(
                "events.retention_s = {} must be 60..31622400 (a minute to a year)",
                e.retention_s
            ));
        }
        if !(1_000..=1_000_000_000).contains(&e.max_per_tenant) {
            return invalid(format!("events.max_per_tenant = {} must be 1000..1000000000", e.max_per_tenant));
        }
        if !(1..=3600).contains(&e.prune_interval_s) {
            return invalid(format!("events.prune_interval_s = {} must be 1..3600", e.prune_interval_s));
        }
        if !(16..=16 * 1024 * 1024).contains(&self.stream.buffer) {
            return invalid(format!("stream.buffer = {} must be 16..16777216", self.stream.buffer));
        }
        if !self.auth.admin_token.is_empty() && self.auth.admin_token.len() < 16 {
            return invalid("auth.admin_token must be at least 16 characters".into());
        }
        if self.log.trim().is_empty() {
            return invalid("log must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], o: &Overrides) -> Result<(Config, Vec<String>), ConfigError> {
        Config::load(None, env.iter().map(|(k, v)| (k.to_string(), v.to_string())), o)
    }

    #[test]
    fn defaults_are_valid() {
        let (c, w) = load(&[], &Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
        assert!(w.is_empty());
    }

    #[test]
    fn env_twins_exist_for_every_key_and_are_typed() {
        let (c, _) = load(
            &[
                ("ORBMANAGER_MQTT_ADDR", "127.0.0.1:0"),
                ("ORBMANAGER_DEV", "true"),
                ("ORBMANAGER_MQTT_MAX_PACKET_SIZE", "131072"),
                ("ORBMANAGER_ACTORS_SHARDS", "4"),
                ("ORBMANAGER_AUTH_ADMIN_TOKEN", "0123456789abcdef"),
            ],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.mqtt_addr, "127.0.0.1:0");
        assert!(c.dev);
        assert_eq!(c.mqtt.max_packet_size, 131_072);
        assert_eq!(c.actors.shards, 4);
        assert_eq!(c.auth.admin_token, "0123456789abcdef");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let err = load(&[("ORBMANAGER_ACTORS_SHARDS", "many")], &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("ORBMANAGER_ACTORS_SHARDS") && err.contains("integer"), "{err}");
        let (_, warnings) = load(&[("ORBMANAGER_NOPE", "1")], &Overrides::default()).unwrap();
        assert_eq!(warnings, vec!["ignoring unknown environment variable ORBMANAGER_NOPE".to_string()]);
    }

    #[test]
    fn flags_beat_env() {
        let o = Overrides { http_addr: Some("127.0.0.1:9".into()), ..Default::default() };
        let (c, _) = load(&[("ORBMANAGER_HTTP_ADDR", "127.0.0.1:8")], &o).unwrap();
        assert_eq!(c.http_addr, "127.0.0.1:9");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::default();
        c.telemetry.max_payload_bytes = c.mqtt.max_packet_size as usize;
        assert!(c.validate().unwrap_err().to_string().contains("telemetry.max_payload_bytes"));
        let c = Config { http_addr: "localhost".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("http_addr"));
        let mut c = Config::default();
        c.actors.shards = 0;
        assert!(c.validate().unwrap_err().to_string().contains("actors.shards"));
        let mut c = Config::default();
        c.events.retention_s = 10;
        assert!(c.validate().unwrap_err().to_string().contains("events.retention_s"));
        let mut c = Config::default();
        c.events.max_per_tenant = 0;
        assert!(c.validate().unwrap_err().to_string().contains("events.max_per_tenant"));
        let mut c = Config::default();
        c.storage.commit_linger_us = limits::COMMIT_LINGER_US_MAX + 1;
        assert!(c.validate().unwrap_err().to_string().contains("storage.commit_linger_us"));
        c.storage.commit_linger_us = 0;
        c.storage.telemetry_blob_min_bytes = limits::TELEMETRY_BLOB_MIN_BYTES_MAX + 1;
        assert!(c.validate().unwrap_err().to_string().contains("storage.telemetry_blob_min_bytes"));
        c.storage.telemetry_blob_min_bytes = 0;
        assert!(c.validate().is_ok(), "0 turns either off");
    }
}

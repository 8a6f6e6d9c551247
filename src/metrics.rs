//! Metric names in one place and a Prometheus text renderer.
//!
//! Plain atomics, no per-orb labels, no registry lookups on hot paths. Hot loops update a
//! counter once per batch where they can (the committer records per group, not per message).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorCode;
use crate::model::command::CommandStatus;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n as i64, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n as i64, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BOUNDS_S: [f64; 14] =
    [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_S.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS_S.iter().position(|b| s <= *b).unwrap_or(LATENCY_BOUNDS_S.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Kinds of inbound device messages.
#[derive(Clone, Copy, Debug)]
pub enum MsgKind {
    Telemetry = 0,
    State = 1,
    Other = 2,
}

const MSG_KINDS: [&str; 3] = ["telemetry", "state", "other"];
const CODES: usize = ErrorCode::ALL.len();

/// Every metric of one server instance.
#[derive(Debug, Default)]
pub struct Metrics {
    pub mqtt_connections: Gauge,
    pub mqtt_connects: Counter,
    pub mqtt_connect_refused: [Counter; CODES],
    pub messages_in: [Counter; 3],
    pub messages_out: Counter,
    pub telemetry_stored: Counter,
    pub telemetry_duplicates: Counter,
    pub refusals: [Counter; CODES],
    pub commit_groups: Counter,
    pub commit_requests: Counter,
    /// Answer lists handed to MQTT workers' reply hubs (one per worker per group).
    pub commit_hub_lists: Counter,
    /// Small commit groups held back to gather more writes (`storage.commit_linger_us`).
    pub commit_lingers: Counter,
    /// Commit answers delivered through MQTT workers' reply hubs.
    pub commit_hub_answers: Counter,
    pub commit_latency: Histogram,
    /// How long a commit request waited in the queue before its group started.
    pub commit_wait: Histogram,
    pub live_actors: Gauge,
    /// Durable telemetry points handed to orb actors and not applied yet.
    pub telemetry_in_flight: Gauge,
    /// The telemetry keyspace's backlog, read from the store when metrics are scraped
    /// (`storage::TelemetryBacklog`): L0 tables not merged into L1 yet, L0 runs (fjall stops
    /// writers at 30), memtables waiting for their flush (fjall stops writers at 4).
    pub storage_telemetry_l0_tables: Gauge,
    pub storage_telemetry_l0_runs: Gauge,
    pub storage_telemetry_sealed_memtables: Gauge,
    pub storage_telemetry_blob_files: Gauge,
    pub storage_telemetry_blob_stale_bytes: Gauge,
    pub actor_activations: Counter,
    pub actor_passivations: Counter,
    pub actor_restarts: Counter,
    pub http_requests: Counter,
    pub commands_created: Counter,
    pub commands_terminal: [Counter; CommandStatus::ALL.len()],
    /// How late expiries and timeouts fire after their deadline.
    pub deadline_lateness: Histogram,
    pub alerts_triggered: Counter,
    pub rule_partition_restarts: Counter,
    pub alerts_resolved: Counter,
    /// Events committed to the tenant event logs.
    pub events: Counter,
    pub webhook_delivered: Counter,
    pub webhook_failed_attempts: Counter,
    pub webhook_dead: Counter,
    /// Event time (its cause decided) to a receiver's 2xx.
    pub webhook_latency: Histogram,
    /// Points moved to the cold tier, files written, Parquet bytes, failed spills.
    pub spill_rows: Counter,
    pub spill_files: Counter,
    pub spill_bytes: Counter,
    pub spill_failures: Counter,
    pub checkpoints: Counter,
    pub checkpoint_failures: Counter,
    /// Cold files opened by reads (history, playback, exports).
    pub cold_files_read: Counter,
    /// Messages queued for broker sessions.
    pub broker_routed: Counter,
    /// Messages a full session queue could not take.
    pub broker_shed: Counter,
    /// PUBLISHes and subscriptions refused by a topic policy.
    pub broker_denied: Counter,
    pub broker_sessions: Gauge,
    pub broker_retained: Gauge,
}

impl Metrics {
    pub fn message_in(&self, kind: MsgKind) {
        self.messages_in[kind as usize].inc();
    }

    pub fn refused(&self, code: ErrorCode) {
        self.refusals[code.metric_index()].inc();
    }

    pub fn connect_refused(&self, code: ErrorCode) {
        self.mqtt_connect_refused[code.metric_index()].inc();
    }

    pub fn alert_event(&self, kind: &str) {
        match kind {
            "orb.alert.triggered" => self.alerts_triggered.inc(),
            "orb.alert.resolved" => self.alerts_resolved.inc(),
            _ => {}
        }
    }

    pub fn command_terminal(&self, status: CommandStatus) {
        if let Some(i) = CommandStatus::ALL.iter().position(|s| *s == status) {
            self.commands_terminal[i].inc();
        }
    }

    /// Refusals with this code so far.
    pub fn refusal_count(&self, code: ErrorCode) -> u64 {
        self.refusals[code.metric_index()].get()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut simple = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP orbmanager_{name} {help}\n# TYPE orbmanager_{name} {kind}\norbmanager_{name} {v}"
            );
        };
        simple("mqtt_connections", "gauge", "Open MQTT connections.", self.mqtt_connections.get().to_string());
        simple("mqtt_connects_total", "counter", "Accepted MQTT connections.", self.mqtt_connects.get().to_string());
        simple("messages_out_total", "counter", "Messages sent to devices.", self.messages_out.get().to_string());
        simple(
            "telemetry_stored_total",
            "counter",
            "Telemetry points made durable.",
            self.telemetry_stored.get().to_string(),
        );
        simple(
            "telemetry_duplicates_total",
            "counter",
            "Telemetry points dropped as msg_id duplicates.",
            self.telemetry_duplicates.get().to_string(),
        );
        simple(
            "commit_groups_total",
            "counter",
            "Group commits (one fsync each).",
            self.commit_groups.get().to_string(),
        );
        simple("commit_requests_total", "counter", "Write requests committed.", self.commit_requests.get().to_string());
        simple(
            "commit_lingers_total",
            "counter",
            "Small commit groups held back (storage.commit_linger_us) so more writes share their fsync.",
            self.commit_lingers.get().to_string(),
        );
        simple(
            "commit_hub_lists_total",
            "counter",
            "Answer lists handed to MQTT workers' reply hubs (one per worker per group).",
            self.commit_hub_lists.get().to_string(),
        );
        simple(
            "commit_hub_answers_total",
            "counter",
            "Commit answers delivered through MQTT workers' reply hubs.",
            self.commit_hub_answers.get().to_string(),
        );
        simple(
            "broker_sessions",
            "gauge",
            "MQTT sessions, online and offline.",
            self.broker_sessions.get().to_string(),
        );
        simple("broker_retained", "gauge", "Retained MQTT messages.", self.broker_retained.get().to_string());
        simple("live_actors", "gauge", "Orb actors currently active.", self.live_actors.get().to_string());
        simple(
            "telemetry_in_flight",
            "gauge",
            "Durable telemetry points queued for orb actors (bounded by actors.telemetry_in_flight_max).",
            self.telemetry_in_flight.get().to_string(),
        );
        simple(
            "storage_telemetry_l0_tables",
            "gauge",
            &format!(
                "Telemetry keyspace tables in L0, not merged into L1 yet (a merge starts at {}).",
                crate::limits::TELEMETRY_L0_MERGE_TABLES
            ),
            self.storage_telemetry_l0_tables.get().to_string(),
        );
        simple(
            "storage_telemetry_l0_runs",
            "gauge",
            "Telemetry keyspace runs in L0, one per flush (writes spin briefly from 21, stop at 30).",
            self.storage_telemetry_l0_runs.get().to_string(),
        );
        simple(
            "storage_telemetry_sealed_memtables",
            "gauge",
            "Telemetry memtables waiting for their flush (writes stop while there are 4).",
            self.storage_telemetry_sealed_memtables.get().to_string(),
        );
        simple(
            "storage_telemetry_blob_files",
            "gauge",
            "Blob files holding telemetry values (storage.telemetry_blob_min_bytes and more).",
            self.storage_telemetry_blob_files.get().to_string(),
        );
        simple(
            "storage_telemetry_blob_stale_bytes",
            "gauge",
            "Telemetry blob bytes merges have found deleted, not yet reclaimed (a file with nothing live goes whole).",
            self.storage_telemetry_blob_stale_bytes.get().to_string(),
        );
        simple(
            "actor_activations_total",
            "counter",
            "Orb actor activations.",
            self.actor_activations.get().to_string(),
        );
        simple(
            "actor_passivations_total",
            "counter",
            "Idle orb actors passivated.",
            self.actor_passivations.get().to_string(),
        );
        simple(
            "actor_restarts_total",
            "counter",
            "Orb actors restarted after a failure.",
            self.actor_restarts.get().to_string(),
        );
        simple("http_requests_total", "counter", "HTTP requests served.", self.http_requests.get().to_string());
        simple("commands_created_total", "counter", "Commands created.", self.commands_created.get().to_string());
        simple("alerts_triggered_total", "counter", "Alerts opened by rules.", self.alerts_triggered.get().to_string());
        simple("alerts_resolved_total", "counter", "Alerts resolved.", self.alerts_resolved.get().to_string());
        simple("events_total", "counter", "Events committed to the event log.", self.events.get().to_string());
        simple(
            "rule_partition_restarts_total",
            "counter",
            "Rule partitions restarted from the store after a failure.",
            self.rule_partition_restarts.get().to_string(),
        );
        simple(
            "webhook_delivered_total",
            "counter",
            "Webhook deliveries answered 2xx.",
            self.webhook_delivered.get().to_string(),
        );
        simple(
            "webhook_failed_attempts_total",
            "counter",
            "Webhook attempts that failed (retried or dead-lettered).",
            self.webhook_failed_attempts.get().to_string(),
        );
        simple(
            "webhook_dead_total",
            "counter",
            "Webhook deliveries dead-lettered.",
            self.webhook_dead.get().to_string(),
        );
        for (name, help, c) in [
            ("spill_rows_total", "Telemetry points moved to the cold tier.", &self.spill_rows),
            ("spill_files_total", "Parquet files written by spills.", &self.spill_files),
            ("spill_bytes_total", "Parquet bytes written by spills.", &self.spill_bytes),
            ("spill_failures_total", "Spills that failed (their points stay hot).", &self.spill_failures),
            ("checkpoints_total", "Checkpoints written to the object store.", &self.checkpoints),
            ("checkpoint_failures_total", "Checkpoints that failed.", &self.checkpoint_failures),
            ("cold_files_read_total", "Cold Parquet files opened by reads.", &self.cold_files_read),
            ("broker_routed_total", "Messages queued for MQTT subscribers.", &self.broker_routed),
            ("broker_shed_total", "Messages a full session queue could not take.", &self.broker_shed),
            ("broker_denied_total", "PUBLISHes and SUBSCRIBEs refused by topic policy.", &self.broker_denied),
        ] {
            simple(name, "counter", help, c.get().to_string());
        }

        let _ = writeln!(
            out,
            "# HELP orbmanager_messages_in_total Messages received from devices.\n# TYPE orbmanager_messages_in_total counter"
        );
        for (i, kind) in MSG_KINDS.iter().enumerate() {
            let _ = writeln!(out, "orbmanager_messages_in_total{{kind=\"{kind}\"}} {}", self.messages_in[i].get());
        }
        let _ = writeln!(
            out,
            "# HELP orbmanager_refusals_total Device messages refused, by reason.\n# TYPE orbmanager_refusals_total counter"
        );
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "orbmanager_refusals_total{{reason=\"{}\"}} {}",
                code.as_str(),
                self.refusals[code.metric_index()].get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP orbmanager_mqtt_connect_refused_total MQTT connections refused, by reason.\n# TYPE orbmanager_mqtt_connect_refused_total counter"
        );
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "orbmanager_mqtt_connect_refused_total{{reason=\"{}\"}} {}",
                code.as_str(),
                self.mqtt_connect_refused[code.metric_index()].get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP orbmanager_commands_terminal_total Commands that reached a terminal state, by state.\n# TYPE orbmanager_commands_terminal_total counter"
        );
        for (i, s) in CommandStatus::ALL.iter().enumerate().filter(|(_, s)| s.is_terminal()) {
            let _ = writeln!(
                out,
                "orbmanager_commands_terminal_total{{status=\"{}\"}} {}",
                s.as_str(),
                self.commands_terminal[i].get()
            );
        }
        histogram(
            &mut out,
            "commit_latency_seconds",
            "Duration of one group commit including fsync.",
            &self.commit_latency,
        );
        histogram(
            &mut out,
            "commit_wait_seconds",
            "Time a commit request waits in the queue before its group starts (the committer is behind, or an fsync stalled).",
            &self.commit_wait,
        );
        histogram(
            &mut out,
            "deadline_lateness_seconds",
            "How late command expiries and timeouts fire.",
            &self.deadline_lateness,
        );
        histogram(
            &mut out,
            "webhook_latency_seconds",
            "From the event (alert opened or changed) to the receiver's 2xx.",
            &self.webhook_latency,
        );
        out
    }
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP orbmanager_{name} {help}\n# TYPE orbmanager_{name} histogram");
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BOUNDS_S.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(out, "orbmanager_{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += h.buckets[LATENCY_BOUNDS_S.len()].load(Ordering::Relaxed);
    let _ = writeln!(out, "orbmanager_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "orbmanager_{name}_sum {}", h.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(out, "orbmanager_{name}_count {}", h.count());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let m = Metrics::default();
        m.commit_latency.observe(Duration::from_micros(300));
        m.commit_latency.observe(Duration::from_millis(3));
        m.commit_latency.observe(Duration::from_secs(10));
        let text = m.render();
        assert!(text.contains("orbmanager_commit_latency_seconds_bucket{le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("orbmanager_commit_latency_seconds_bucket{le=\"0.004\"} 2\n"));
        assert!(text.contains("orbmanager_commit_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("orbmanager_commit_latency_seconds_count 3\n"));
    }

    #[test]
    fn storage_backlog_gauges_render_what_was_read() {
        let m = Metrics::default();
        m.storage_telemetry_l0_tables.set(13);
        m.storage_telemetry_l0_runs.set(11);
        m.storage_telemetry_sealed_memtables.set(2);
        m.storage_telemetry_blob_files.set(5);
        m.storage_telemetry_blob_stale_bytes.set(1 << 33);
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE orbmanager_storage_telemetry_l0_tables gauge\norbmanager_storage_telemetry_l0_tables 13\n"
            ),
            "{text}"
        );
        assert!(text.contains("orbmanager_storage_telemetry_l0_runs 11\n"));
        assert!(text.contains("orbmanager_storage_telemetry_sealed_memtables 2\n"));
        assert!(text.contains("orbmanager_storage_telemetry_blob_files 5\n"));
        assert!(text.contains("orbmanager_storage_telemetry_blob_stale_bytes 8589934592\n"));
    }

    #[test]
    fn refusals_are_labelled_by_stable_code() {
        let m = Metrics::default();
        m.refused(ErrorCode::MalformedPayload);
        m.refused(ErrorCode::MalformedPayload);
        assert!(m.render().contains("orbmanager_refusals_total{reason=\"malformed_payload\"} 2\n"));
        assert_eq!(m.refusal_count(ErrorCode::MalformedPayload), 2);
    }
}

//! The command line (a stable contract: tests and scripts rely on it; see DESIGN.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(name = "orbmanager", version, about = "Fleet control plane for smart hardware")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Run the server in dev mode with a simulated city fleet, and print where to look.
    Demo(DemoArgs),
    /// Fleet simulator / MQTT load generator; prints a JSON summary.
    Sim(SimArgs),
    /// Tenants (bootstrap token).
    Tenants {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: TenantsCmd,
    },
    /// API tokens of a tenant.
    Tokens {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// The registry: register, read, list, decommission orbs.
    Orbs {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: OrbsCmd,
    },
    /// Telemetry history.
    Telemetry {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: TelemetryCmd,
    },
    /// Commands and broadcasts.
    Commands {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: CommandsCmd,
    },
    /// Alerts: list them, acknowledge, resolve, assign, comment.
    Alerts {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: AlertsCmd,
    },
    /// The tenant's event log (alerts, command status, presence).
    Events {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: EventsCmd,
    },
    /// The cold tier: spill now, checkpoint now.
    Storage {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: StorageCmd,
    },
    /// Batch export jobs (telemetry of a fleet query and time range to Parquet or JSON lines).
    Exports {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        cmd: ExportsCmd,
    },
    /// Rebuild an empty data directory from the newest checkpoint in the object store.
    Restore(RestoreArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum StorageCmd {
    /// Spill telemetry older than the hot window to Parquet in the object store now.
    Spill {
        /// Override storage.hot_window for this spill (30m, 6h, ...).
        #[arg(long)]
        hot_window: Option<String>,
    },
    /// Write a checkpoint of registry, state and command queues now.
    Checkpoint,
    /// Show the tenant's hot window and cold retention; with a flag, set both (an omitted one,
    /// or `default`, returns to the node's setting).
    Retention {
        /// How long telemetry stays hot (30m, 6h, 2d).
        #[arg(long)]
        hot_window: Option<String>,
        /// How long cold telemetry is kept (90d; 0 keeps it forever).
        #[arg(long)]
        cold_retention: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ExportsCmd {
    /// Start an export job.
    Create {
        /// Start of the range, unix ms.
        #[arg(long)]
        from: u64,
        /// End of the range, unix ms.
        #[arg(long)]
        to: u64,
        /// Fleet query (search language); default: every orb.
        #[arg(long, default_value = "")]
        query: String,
        /// parquet or jsonl.
        #[arg(long, default_value = "parquet")]
        format: String,
        /// Relative path under exports/tenant=<t>/ in the object store.
        #[arg(long)]
        destination: String,
    },
    Get {
        export_id: String,
    },
    List,
    Cancel {
        export_id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// A checkpoint path under the object store (default: the one checkpoints/LATEST names).
    #[arg(long)]
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AlertsCmd {
    /// Alerts, newest first.
    List {
        /// open, acknowledged or resolved.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        orb_id: Option<String>,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long)]
        page_token: Option<String>,
    },
    Ack {
        alert_id: String,
    },
    Resolve {
        alert_id: String,
    },
    /// Set the assignee (omit it to unassign).
    Assign {
        alert_id: String,
        assignee: Option<String>,
    },
    Comment {
        alert_id: String,
        text: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum EventsCmd {
    /// Events after an id, oldest first.
    List {
        /// Continue after this event id (default: the oldest kept).
        #[arg(long)]
        after: Option<String>,
        /// Only these types (comma-separated).
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Follow events as they happen (after an id: first what was missed) until interrupted.
    Tail {
        #[arg(long)]
        after: Option<String>,
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

/// How the operator CLI reaches the server (gRPC).
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// gRPC address of the server.
    #[arg(long, global = true, env = "ORBMANAGER_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// API token (or the bootstrap token).
    #[arg(long, global = true, env = "ORBMANAGER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Tenant to act in (optional with a tenant-scoped token).
    #[arg(long, global = true, env = "ORBMANAGER_TENANT")]
    pub tenant: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TenantsCmd {
    Create {
        tenant_id: String,
    },
    /// The tenant's MQTT topic policy, sessions and retained topics.
    Mqtt,
    /// Replaces the tenant's MQTT topic policy (filters; `{orb}` is the device's own id).
    Policy {
        /// A filter devices may publish to (repeatable).
        #[arg(long)]
        publish: Vec<String>,
        /// A filter devices may subscribe within (repeatable).
        #[arg(long)]
        subscribe: Vec<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokensCmd {
    /// Issue a token (its secret is printed once).
    Create {
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    List,
    Revoke {
        token_id: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum OrbsCmd {
    /// Register an orb; prints its device token once.
    Register {
        /// Orb id (generated when omitted).
        #[arg(long)]
        id: Option<String>,
        /// Attribute `key=value` (repeatable).
        #[arg(long = "attr", value_parser = parse_attr)]
        attrs: Vec<(String, String)>,
        /// PEM certificate signing request file.
        #[arg(long)]
        csr: Option<PathBuf>,
    },
    Get {
        orb_id: String,
    },
    /// Search the fleet: `--query 'battery < 20 AND mode = "mission"'`.
    List {
        #[arg(long, short = 'q', default_value = "")]
        query: String,
        #[arg(long)]
        sort: Option<String>,
        #[arg(long)]
        desc: bool,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long)]
        page_token: Option<String>,
        /// Count matches by this field instead of listing them.
        #[arg(long)]
        count_by: Option<String>,
        /// Min/max/avg/percentiles of this numeric field over the matches.
        #[arg(long)]
        stats: Option<String>,
    },
    Decommission {
        orb_id: String,
    },
    /// Issue a new device certificate from a CSR file; the previous one stops working.
    RenewCert {
        orb_id: String,
        #[arg(long)]
        csr: PathBuf,
    },
    /// Revoke the orb's certificate (closes its live MQTTS session).
    RevokeCert {
        orb_id: String,
    },
    /// Set (`key=value`) and remove (`--remove key`) operator attributes; all or nothing.
    Tag {
        orb_id: String,
        #[arg(value_parser = parse_attr)]
        set: Vec<(String, String)>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// History of reported component versions, oldest first.
    Versions {
        orb_id: String,
        #[arg(long)]
        component: Option<String>,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long)]
        page_token: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TelemetryCmd {
    /// History of one orb, ordered by device time.
    Query {
        orb_id: String,
        /// Unix ms.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Unix ms (0: no bound).
        #[arg(long, default_value_t = 0)]
        to: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Follow live changes (all of the tenant's orbs, or the named ones) until interrupted.
    Tail {
        orb_ids: Vec<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum CommandsCmd {
    /// Send a command to one orb.
    Send {
        orb_id: String,
        command_type: String,
        /// JSON payload.
        #[arg(long)]
        payload: Option<String>,
        #[arg(long)]
        expiry_ts: Option<u64>,
        #[arg(long)]
        timeout_s: Option<u64>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        supersede: bool,
    },
    Get {
        orb_id: String,
        command_id: String,
    },
    List {
        orb_id: String,
        /// `pending`, a state, or all when omitted.
        #[arg(long)]
        status: Option<String>,
    },
    Cancel {
        orb_id: String,
        command_id: String,
    },
    /// Fan a command out to every orb of the tenant, or to `--orb` ids.
    Broadcast {
        command_type: String,
        #[arg(long)]
        payload: Option<String>,
        #[arg(long = "orb")]
        orbs: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        rate_per_s: u32,
    },
    /// A broadcast's live summary.
    BroadcastStatus {
        broadcast_id: String,
    },
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Options shared by `serve` and `demo`. Each has an `ORBMANAGER_*` twin and a config key.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "ORBMANAGER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./orbmanager-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// MQTT listener, ip:port (port 0 picks one) [default: 127.0.0.1:1883].
    #[arg(long)]
    pub mqtt_addr: Option<String>,
    /// MQTTS (mTLS) listener, ip:port; an empty value disables it [default: 127.0.0.1:8883].
    #[arg(long)]
    pub mqtts_addr: Option<String>,
    /// gRPC listener [default: 127.0.0.1:50051].
    #[arg(long)]
    pub grpc_addr: Option<String>,
    /// HTTP listener [default: 127.0.0.1:8080].
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Object store for cold telemetry, checkpoints and exports: file://DIR or
    /// s3://BUCKET/PREFIX [default: file://<data-dir>/objects].
    #[arg(long)]
    pub object_store: Option<String>,
    /// Development mode: open dev tenant `default`, anonymous clients, auto-registration.
    #[arg(long)]
    pub dev: bool,
}

impl ServeArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            object_store: self.object_store.clone(),
            mqtt_addr: self.mqtt_addr.clone(),
            mqtts_addr: self.mqtts_addr.clone(),
            grpc_addr: self.grpc_addr.clone(),
            http_addr: self.http_addr.clone(),
            dev: self.dev,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Simulated orbs.
    #[arg(long, default_value_t = 1000)]
    pub orbs: usize,
    /// Telemetry interval per orb, in ms.
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// MQTT broker address (host:port). Any MQTT broker works (`--target` is an alias).
    #[arg(long, alias = "target", default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    /// Simulated orbs, one connection each (or through gateways, see `--gateway-children`).
    #[arg(long, default_value_t = 100)]
    pub orbs: usize,
    /// Orbs per edge-gateway connection: the orbs connect through ceil(orbs / N) gateway
    /// connections (`<prefix>gw0000`...), which is how one machine simulates 500K orbs. 0: one
    /// connection per orb. OrbManager only.
    #[arg(long, default_value_t = 0)]
    pub gateway_children: usize,
    /// Telemetry interval per orb, in ms.
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
    /// Telemetry payload size, in bytes (JSON padded with metrics; synthetic workload).
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// What the orbs send: `synthetic` (fixed-size payloads whose values advance with the
    /// sequence number, the same for every orb) or `city` (robots driving around a city,
    /// each with its own speed, battery and motor temperature: desynchronised values).
    #[arg(long, default_value = "synthetic", value_parser = ["synthetic", "city"])]
    pub workload: String,
    /// QoS of telemetry publishes (0 or 1).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// How long to publish, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Leave messages of the first N seconds of publishing out of the PUBACK and stream
    /// latencies (each orb's first message activates it); counts and rates cover the whole run.
    #[arg(long, default_value_t = 0)]
    pub warmup_s: u64,
    /// Tenant of the simulated orbs.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Orb id prefix; orbs are `<prefix>00001`...
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// MQTT protocol level: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    pub protocol: u8,
    /// New connections per second during ramp-up.
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    /// JSON lines `{"tenant_id","orb_id","device_token"}` to authenticate with (non-dev servers).
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Use anonymous connections with no username (dev mode, or brokers such as mosquitto).
    #[arg(long)]
    pub anonymous: bool,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Measure ingest -> live-stream latency through the server's SSE stream at this HTTP
    /// address (host:port).
    #[arg(long)]
    pub stream_http: Option<String>,
    /// Run a webhook receiver on this address (host:port) and measure telemetry -> webhook
    /// latency of the alerts it receives (point the server's webhook at it).
    #[arg(long)]
    pub webhook_listen: Option<String>,
    /// The webhook's secret, to verify each delivery's signature.
    #[arg(long, default_value = "")]
    pub webhook_secret: String,
    /// Every Nth message of each orb is a state report (`state/{t}/{o}`) instead of telemetry;
    /// 0: telemetry only. OrbManager, direct connections.
    #[arg(long, default_value_t = 0)]
    pub state_every: u64,
    /// Commands created per second through the gRPC API (`--api-grpc`), to random orbs, each
    /// received and acknowledged (`succeeded`) by its simulated orb; reports create ->
    /// delivered and create -> acknowledgement applied latency. Direct connections.
    #[arg(long, default_value_t = 0.0)]
    pub commands_per_s: f64,
    /// OrbManager gRPC address (host:port) to create commands through.
    #[arg(long)]
    pub api_grpc: Option<String>,
    /// Bearer token for `--stream-http` and `--api-grpc` (not needed under --dev).
    #[arg(long, env = "ORBMANAGER_TOKEN", hide_env_values = true)]
    pub stream_token: Option<String>,
}

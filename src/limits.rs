//! Every bound in the system as a named constant, unit last.
//!
//! Configurable bounds have their defaults here and their ranges checked in `config.rs`;
//! the rest are fixed by design and asserted where they are used.

/// Longest tenant or orb identifier, in bytes.
pub const ID_LEN_MAX: usize = 64;

/// Default MQTT maximum packet size (both directions), in bytes.
pub const MQTT_PACKET_SIZE_MAX_BYTES: u32 = 256 * 1024;
/// Default number of unacknowledged QoS 1/2 publishes a client may have in flight.
pub const MQTT_RECEIVE_MAXIMUM: u16 = 64;
/// Default total payload bytes a client may have in flight before reads pause.
pub const MQTT_INFLIGHT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Default longest keep-alive the server grants, in seconds; longer requests are capped.
pub const MQTT_KEEPALIVE_MAX_S: u16 = 300;
/// Keep-alive the server imposes on clients that ask for none, in seconds.
pub const MQTT_KEEPALIVE_DEFAULT_S: u16 = 60;
/// Default time a new TCP connection has to complete CONNECT, in seconds.
pub const MQTT_CONNECT_TIMEOUT_S: u16 = 10;
/// Default cap on concurrent MQTT connections per node (the process has 20,000 files).
pub const MQTT_CONNECTIONS_MAX: usize = 18_000;
/// Longest MQTT client identifier accepted, in bytes.
pub const MQTT_CLIENT_ID_LEN_MAX: usize = 128;
/// Longest password (device token) accepted at CONNECT, in bytes.
pub const MQTT_PASSWORD_LEN_MAX: usize = 256;
/// Default longest session expiry granted, in seconds (one day).
pub const MQTT_SESSION_EXPIRY_MAX_S: u32 = 86_400;
/// Default PUBLISHes per second per connection (times the orbs a gateway carries).
pub const MQTT_PUBLISH_RATE_PER_CONNECTION: u32 = 1_000;
/// Default new connections per second per node.
pub const MQTT_CONNECT_RATE_PER_S: u32 = 5_000;
/// Most topic filters in one SUBSCRIBE; more is refused (v5 0x97 for each, v3 0x80).
pub const MQTT_FILTERS_PER_SUBSCRIBE_MAX: usize = 32;

/// Orbs one edge-gateway connection may carry.
pub const GATEWAY_CHILDREN_MAX: usize = 20_000;
/// Child admissions one gateway connection has in flight at once.
pub const GATEWAY_ADMISSIONS_IN_FLIGHT: usize = 64;
/// Orbs named in one gateway connect or disconnect message.
pub const GATEWAY_CONNECT_BATCH_MAX: usize = 1_000;

/// Messages queued for one session (online or offline) before the broker sheds QoS 0 and
/// disconnects a slow QoS 1 subscriber (v5 0x97); offline sessions then lose new messages.
pub const BROKER_SESSION_QUEUE_MAX: usize = 1_000;
/// Session writes (records, acknowledged queue entries) waiting for the broker's writer task;
/// beyond it a write waits in its own task (order kept by the channel's fair queueing).
pub const BROKER_WRITES_MAX: usize = 65_536;
/// Sessions (online and offline) per node.
pub const BROKER_SESSIONS_MAX: usize = 100_000;
/// Subscriptions per session.
pub const BROKER_SUBSCRIPTIONS_MAX: usize = 100;
/// Retained messages per tenant.
pub const BROKER_RETAINED_MAX: usize = 10_000;
/// Bytes of retained topics and payloads per tenant.
pub const BROKER_RETAINED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Default largest telemetry payload, in bytes (JSON as received).
pub const TELEMETRY_PAYLOAD_MAX_BYTES: usize = 64 * 1024;
/// Most metrics one telemetry point may carry.
pub const TELEMETRY_METRICS_MAX: usize = 256;
/// Longest metric name, in bytes.
pub const TELEMETRY_METRIC_NAME_LEN_MAX: usize = 64;
/// Longest `msg_id`, in bytes.
pub const TELEMETRY_MSG_ID_LEN_MAX: usize = 128;
/// Longest `mode` string, in bytes.
pub const TELEMETRY_MODE_LEN_MAX: usize = 64;
/// How far into the future a device clock may be before its `ts` is refused, in ms.
pub const TELEMETRY_CLOCK_SKEW_MAX_MS: u64 = 24 * 3600 * 1000;
/// Earliest accepted `ts` (2000-01-01T00:00:00Z), in unix ms.
pub const TELEMETRY_TS_MIN_MS: u64 = 946_684_800_000;
/// Most points one HTTP fallback request may carry.
pub const TELEMETRY_HTTP_BATCH_MAX: usize = 1_000;
/// Width of one dedupe bucket, in ms. A `msg_id` is remembered for one to two buckets.
pub const DEDUPE_BUCKET_MS: u64 = 10 * 60 * 1000;

/// Largest `state/{tenant}/{orb}` report, in bytes.
pub const STATE_REPORT_MAX_BYTES: usize = 16 * 1024;
/// Most named component versions one orb reports.
pub const STATE_COMPONENTS_MAX: usize = 64;
/// Longest component name or version string, in bytes.
pub const STATE_COMPONENT_LEN_MAX: usize = 128;

/// Most operator attributes (tags) per orb.
pub const ORB_ATTRIBUTES_MAX: usize = 64;
/// Longest attribute key or value, in bytes.
pub const ORB_ATTRIBUTE_LEN_MAX: usize = 256;

/// Default bound of the group-commit queue, in requests; senders wait when it is full.
pub const COMMIT_QUEUE_MAX: usize = 16_384;
/// Most requests folded into one group commit (one fsync).
pub const COMMIT_BATCH_MAX: usize = 8_192;
/// Default `storage.commit_linger_us`: how long a small commit group may wait for more writes
/// to share its fsync. Adds at most this to a PUBACK; BENCHMARKS.md has the trade.
pub const COMMIT_LINGER_US: u64 = 2_000;
/// Largest `storage.commit_linger_us`.
pub const COMMIT_LINGER_US_MAX: u64 = 100_000;

/// Fewest fjall worker threads (flushes and compactions). fjall 3.1.13 keeps worker 0 of a
/// pool for flushes: it hands every compaction request back to the queue and takes it again,
/// spinning while the other workers are busy. Its default on two cores is a pool of two, so
/// worker 0 spun through every compaction (~6% of the server's samples at saturation); with
/// three, two workers take compactions and the spin is rare (BENCHMARKS.md). Not one worker:
/// 3.1.13 can deadlock with one.
pub const FJALL_WORKERS_MIN: usize = 3;
/// Most fjall worker threads (fjall's own default cap).
pub const FJALL_WORKERS_MAX: usize = 4;
/// L0 tables of the telemetry keyspace (flushed memtables, one 64 MiB table each unless
/// flushes back up) at which all of L0 is merged into L1 (fjall's default is 4). In lsm-tree
/// 3.1 it also multiplies L1's target size (64 MiB x this) and so every deeper level's. fjall
/// 3.1.13 makes each write batch (a commit group) spin briefly from 21 L0 runs on and stops
/// writers at 30 runs or 4 sealed memtables; 12 keeps the usual L0 well under that. These are
/// fjall internals: recheck them when fjall is upgraded.
pub const TELEMETRY_L0_MERGE_TABLES: u8 = 12;
/// Default `storage.telemetry_blob_min_bytes`: stored telemetry points of this size and more
/// (a point of ~10 metrics) are kept in the telemetry keyspace's blob files, which the tree's
/// merges do not rewrite. Applies when the keyspace is created.
pub const TELEMETRY_BLOB_MIN_BYTES: u32 = 256;
/// Largest `storage.telemetry_blob_min_bytes` (a point is at most ~64 KiB of JSON).
pub const TELEMETRY_BLOB_MIN_BYTES_MAX: u32 = 1024 * 1024;

/// Default number of shard supervisors.
pub const SHARDS_DEFAULT: usize = 16;
/// Default idle time after which an offline orb actor is passivated, in seconds.
pub const ORB_IDLE_PASSIVATE_S: u64 = 120;
/// Durable telemetry points handed to orb actors and not yet applied, across the node. Ingest
/// waits for room before it acknowledges, so a backlog in the actors (or behind them, in the
/// rule partitions) slows devices down instead of growing mailboxes.
pub const TELEMETRY_IN_FLIGHT_MAX: usize = 65_536;
/// How often each shard looks for idle orb actors, in ms.
pub const SHARD_SWEEP_INTERVAL_MS: u64 = 1_000;
/// Restarts of one orb actor within `ORB_RESTART_WINDOW_MS` before its shard gives up and
/// leaves it to be re-activated by the next message.
pub const ORB_RESTARTS_MAX: u32 = 5;
/// Window for `ORB_RESTARTS_MAX`, in ms.
pub const ORB_RESTART_WINDOW_MS: u64 = 60_000;
/// Timeout of a call into an orb or shard actor, in ms.
pub const ACTOR_CALL_TIMEOUT_MS: u64 = 5_000;

/// Largest HTTP request body, in bytes.
pub const HTTP_BODY_MAX_BYTES: usize = 1024 * 1024;
/// Default number of telemetry points a history query returns.
pub const HISTORY_PAGE_DEFAULT: usize = 1_000;
/// Most telemetry points one history query returns.
pub const HISTORY_PAGE_MAX: usize = 10_000;

/// Time the drain on SIGTERM allows listeners to close connections, in ms.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Time the MQTT workers wait for connections to finish after the drain closed them, in ms;
/// what is still open then is dropped.
pub const MQTT_STOP_TIMEOUT_MS: u32 = 2_000;

/// Non-terminal commands one orb may have; creation beyond it is refused.
pub const COMMANDS_PENDING_MAX: usize = 1_000;
/// Largest command payload (compact JSON), in bytes.
pub const COMMAND_PAYLOAD_MAX_BYTES: usize = 16 * 1024;
/// Longest command type, in bytes.
pub const COMMAND_TYPE_LEN_MAX: usize = 64;
/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
/// Longest execution timeout, in seconds (7 days).
pub const COMMAND_TIMEOUT_MAX_S: u64 = 7 * 24 * 3600;
/// Longest `detail` a device may attach to an acknowledgement, in bytes.
pub const COMMAND_ACK_DETAIL_LEN_MAX: usize = 1024;
/// Commands handed to one connection and not yet acknowledged by its PUBACK.
pub const COMMAND_OUTBOX_MAX: usize = 32;
/// How often shards look for command expiries and timeouts, in ms (the bound on lateness).
pub const DEADLINE_TICK_MS: u64 = 100;
/// Most commands one list request returns.
pub const COMMANDS_PAGE_MAX: usize = 1_000;

/// Most orb ids one broadcast may list (larger fleets use `all_orbs`).
pub const BROADCAST_ORB_IDS_MAX: usize = 50_000;
/// Broadcasts kept in memory (running or finished) per node; older finished ones are read
/// from the store on request.
pub const BROADCASTS_LIVE_MAX: usize = 256;
/// Highest fan-out rate a broadcast may ask for, in orbs per second.
pub const BROADCAST_RATE_MAX_PER_S: u32 = 100_000;
/// Commands one broadcast has in creation at once.
pub const BROADCAST_IN_FLIGHT_MAX: usize = 512;
/// How often broadcasts fan out and persist their cursor, in ms.
pub const BROADCAST_TICK_MS: u64 = 100;

/// Default size of the live-stream ring, in events; a subscriber further behind is resynced.
pub const STREAM_BUFFER_DEFAULT: usize = 65_536;
/// Most orbs one stream subscription may name (and resync after a lag).
pub const STREAM_ORBS_MAX: usize = 1_000;

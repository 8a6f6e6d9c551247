//! The fleet simulator: N orbs over their own MQTT connections publishing telemetry on an
//! open-loop schedule. Latency is measured from each message's *intended* send time, so a
//! slow server cannot hide behind a client that slows down with it.

pub mod client;
mod commands;
mod webhook;
pub mod workload;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use client::Incoming;
pub use commands::CommandSummary;
pub use webhook::WebhookSummary;
pub use workload::Workload;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub addr: String,
    pub orbs: usize,
    pub interval_ms: u64,
    pub qos: u8,
    pub duration_s: u64,
    pub tenant: String,
    pub prefix: String,
    pub protocol: u8,
    pub connect_rate: u32,
    /// Device tokens by orb id (non-dev servers).
    pub tokens: HashMap<String, String>,
    /// No username at all (dev anonymous, or third-party brokers).
    pub anonymous: bool,
    pub workload: Workload,
    /// In-flight QoS 1 publishes per connection (the broker's receive maximum).
    pub inflight_max: usize,
    /// `(http host:port, bearer token)` of an OrbManager whose SSE stream to measure.
    pub stream: Option<(String, Option<String>)>,
    /// `(listen host:port, secret)` of a webhook receiver to run and measure.
    pub webhook: Option<(String, String)>,
    /// Orbs per edge-gateway connection (0: every orb has its own connection). Gateway `g`
    /// is orb `<prefix>gw<g>`; its children connect through it (`gateway/{t}/{gw}/connect`).
    pub gateway_children: usize,
    /// Every Nth message of an orb is a state report on `state/{t}/{o}` instead of telemetry
    /// (0: telemetry only). Direct connections.
    pub state_every: u64,
    /// Commands created per second through the gRPC API at `api`, each received and
    /// acknowledged (`succeeded`) by its simulated orb (0: none). Direct connections.
    pub commands_per_s: f64,
    /// `(gRPC host:port, bearer token)` of the OrbManager to create commands through.
    pub api: Option<(String, Option<String>)>,
    /// Seconds at the start of publishing whose messages are left out of the PUBACK and stream
    /// latencies (each orb's first contact activates it; caches warm up). Counts and
    /// rates cover the whole run.
    pub warmup_s: u64,
}

/// Percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: u64,
}

/// The JSON summary `orbmanager sim` prints.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub target: String,
    pub protocol: u8,
    pub qos: u8,
    pub orbs: usize,
    pub connected: u64,
    pub connect_failures: u64,
    pub payload_bytes: usize,
    pub interval_ms: u64,
    pub duration_s: f64,
    /// Leading seconds of publishing left out of the latencies (`--warmup-s`).
    pub warmup_s: u64,
    /// Messages whose intended send time fell inside the run (the offered load).
    pub scheduled: u64,
    pub sent: u64,
    pub acked: u64,
    /// PUBACKs with a failure reason code (MQTT 5).
    pub refused: u64,
    /// I/O errors and server disconnects.
    pub errors: u64,
    /// QoS 1 messages never acknowledged.
    pub unacked: u64,
    pub offered_rate: f64,
    pub sent_rate: f64,
    pub acked_rate: f64,
    pub puback_latency_ms: Percentiles,
    /// Device timestamp -> arrival on the live stream (`--stream-http`), when measured.
    pub stream_latency_ms: Option<Percentiles>,
    /// What the built-in webhook receiver saw (`--webhook-listen`).
    pub webhook: Option<WebhookSummary>,
    /// State reports among the sent messages (`--state-every`).
    pub state_reports: u64,
    /// Command traffic (`--commands-per-s`): created, delivered, acknowledged, latencies.
    pub commands: Option<CommandSummary>,
}

#[derive(Default)]
struct Stats {
    scheduled: AtomicU64,
    connected: AtomicU64,
    connect_failures: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    unacked: AtomicU64,
    state_sent: AtomicU64,
    /// This run's id, in every `msg_id` (`<orb>.<run>-<seq>`): a rerun against the same
    /// server is new data, not deduplicated as resends of the previous run.
    run: u32,
}

const HIST_SHARDS: usize = 16;

/// PUBACK latencies, in shards so the readers of many connections rarely share a lock.
/// Messages intended before `from` (the warm-up) are not recorded.
struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
    from: Instant,
}

impl Latencies {
    fn new(from: Instant) -> Self {
        Latencies { shards: (0..HIST_SHARDS).map(|_| Mutex::new(new_histogram())).collect(), from }
    }

    /// Records the latency of a message intended at `intended`, acknowledged now.
    fn record(&self, shard: usize, intended: Instant) {
        if intended < self.from {
            return;
        }
        let us = (intended.elapsed().as_micros() as u64).max(1);
        let _ = self.shards[shard % HIST_SHARDS].lock().expect("histogram lock").record(us);
    }

    fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in &self.shards {
            let _ = all.add(&*h.lock().expect("histogram lock"));
        }
        all
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Reads `{"tenant_id","orb_id","device_token"}` JSON lines.
pub fn read_credentials(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        let (Some(orb), Some(token)) = (v["orb_id"].as_str(), v["device_token"].as_str()) else {
            return Err(format!("{}:{}: needs orb_id and device_token", path.display(), i + 1));
        };
        out.insert(orb.to_string(), token.to_string());
    }
    Ok(out)
}

/// The id of simulated orb `i`.
pub fn orb_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:05}")
}

/// Runs the simulation until `duration_s` passes or `stop` turns true.
pub async fn run(cfg: SimConfig, stop: Option<watch::Receiver<bool>>) -> Summary {
    let cfg = Arc::new(cfg);
    let stats = Arc::new(Stats { run: fastrand::u32(..), ..Stats::default() });
    let start = Instant::now();
    let ramp = Duration::from_secs_f64(cfg.orbs as f64 / f64::from(cfg.connect_rate.max(1)));
    let publish_start = start + ramp;
    let end = publish_start + Duration::from_secs(cfg.duration_s);
    let measure_from = publish_start + Duration::from_secs(cfg.warmup_s);
    let hists = Arc::new(Latencies::new(measure_from));
    let receiver = match &cfg.webhook {
        Some((addr, secret)) => match webhook::Receiver::start(addr, secret).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(addr = %addr, error = %e, "cannot listen for webhooks");
                None
            }
        },
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let tracker = match (&cfg.api, cfg.commands_per_s > 0.0 && cfg.gateway_children == 0) {
        (Some((addr, token)), true) => {
            let tracker = Arc::new(commands::Tracker::new(cfg.commands_per_s));
            // The last commands get a moment to come back before the orbs leave.
            let margin = Duration::from_millis(cfg.duration_s.saturating_mul(1000).min(8_000) / 4);
            let (addr, token, tenant, prefix) = (addr.clone(), token.clone(), cfg.tenant.clone(), cfg.prefix.clone());
            let (t, stop) = (tracker.clone(), stop.clone());
            tasks.spawn(async move {
                commands::create_loop(&addr, token.as_deref(), &tenant, &prefix, &t, publish_start, end - margin, stop)
                    .await;
            });
            Some(tracker)
        }
        _ => None,
    };
    if cfg.gateway_children > 0 {
        // Connections are gateways: the ramp is their children's admissions.
        let k = cfg.gateway_children;
        for (g, first) in (0..cfg.orbs).step_by(k).enumerate() {
            let children = first..(first + k).min(cfg.orbs);
            let (cfg, stats, hists, stop) = (cfg.clone(), stats.clone(), hists.clone(), stop.clone());
            tasks.spawn(async move {
                gateway_task(g, children, &cfg, &stats, hists, publish_start, end, stop).await;
            });
        }
    }
    for i in (0..cfg.orbs).filter(|_| cfg.gateway_children == 0) {
        let connect_at = start + Duration::from_secs_f64(i as f64 / f64::from(cfg.connect_rate.max(1)));
        let (cfg, stats, hists, stop) = (cfg.clone(), stats.clone(), hists.clone(), stop.clone());
        let tracker = tracker.clone();
        tasks.spawn(async move {
            orb_task(i, &cfg, &stats, hists, tracker, connect_at, publish_start, end, stop).await;
        });
    }
    let stream_task = cfg.stream.clone().map(|(addr, token)| {
        let tenant = cfg.tenant.clone();
        let until = end + Duration::from_secs(2);
        // The stream carries device timestamps (wall clock): the warm-up's end on that clock.
        let from_ms = workload::now_ms() + measure_from.saturating_duration_since(Instant::now()).as_millis() as u64;
        tokio::spawn(async move { stream_latency(&addr, token.as_deref(), &tenant, from_ms, until).await })
    });
    while tasks.join_next().await.is_some() {}
    // Deliveries of the last points are still on their way.
    let webhook = match receiver {
        Some(r) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Some(r.finish())
        }
        None => None,
    };
    let stream_latency_ms = match stream_task {
        Some(t) => t.await.ok().flatten().map(|h| percentiles(&h)),
        None => None,
    };
    let elapsed = Instant::now().saturating_duration_since(publish_start).as_secs_f64().max(1e-9);
    let all = hists.merged();
    let s = &stats;
    Summary {
        target: cfg.addr.clone(),
        protocol: cfg.protocol,
        qos: cfg.qos,
        orbs: cfg.orbs,
        connected: s.connected.load(Ordering::Relaxed),
        connect_failures: s.connect_failures.load(Ordering::Relaxed),
        payload_bytes: cfg.workload.payload_bytes(),
        interval_ms: cfg.interval_ms,
        duration_s: elapsed,
        warmup_s: cfg.warmup_s,
        scheduled: s.scheduled.load(Ordering::Relaxed),
        sent: s.sent.load(Ordering::Relaxed),
        acked: s.acked.load(Ordering::Relaxed),
        refused: s.refused.load(Ordering::Relaxed),
        errors: s.errors.load(Ordering::Relaxed),
        unacked: s.unacked.load(Ordering::Relaxed),
        offered_rate: s.scheduled.load(Ordering::Relaxed) as f64 / elapsed,
        sent_rate: s.sent.load(Ordering::Relaxed) as f64 / elapsed,
        acked_rate: s.acked.load(Ordering::Relaxed) as f64 / elapsed,
        puback_latency_ms: percentiles(&all),
        stream_latency_ms,
        webhook,
        state_reports: s.state_sent.load(Ordering::Relaxed),
        commands: tracker.map(|t| t.summary()),
    }
}

/// Resolves once `stop` turns true (never without one).
pub(crate) async fn stopped(stop: Option<&mut watch::Receiver<bool>>) {
    match stop {
        Some(s) => {
            let _ = s.wait_for(|v| *v).await;
        }
        None => std::future::pending::<()>().await,
    }
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles { p50: ms(0.5), p95: ms(0.95), p99: ms(0.99), max: h.max() as f64 / 1000.0, samples: h.len() }
}

/// Reads the server's SSE stream until `until` and records, for every telemetry change with a
/// device timestamp from `from_ms` on, the time from that timestamp (set when the sim built
/// the payload) to arrival.
async fn stream_latency(
    addr: &str,
    token: Option<&str>,
    tenant: &str,
    from_ms: u64,
    until: Instant,
) -> Option<Histogram<u64>> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut sock = tokio::net::TcpStream::connect(addr).await.ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "GET /v1/orbs/stream?tenant_id={tenant} HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: text/event-stream\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await.ok()?;
    let mut lines = BufReader::new(sock).lines();
    let mut h = new_histogram();
    loop {
        let line = match tokio::time::timeout_at(until, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => break,
        };
        let Some(data) = line.strip_prefix("data: ") else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { continue };
        if v["kind"] != "telemetry" {
            continue;
        }
        if let Some(ts) = v["ts"].as_u64().filter(|ts| *ts >= from_ms) {
            let now = workload::now_ms();
            let _ = h.record(now.saturating_sub(ts).max(1) * 1000);
        }
    }
    Some(h)
}

#[allow(clippy::too_many_arguments)]
async fn orb_task(
    i: usize,
    cfg: &SimConfig,
    stats: &Arc<Stats>,
    hists: Arc<Latencies>,
    tracker: Option<Arc<commands::Tracker>>,
    connect_at: Instant,
    publish_start: Instant,
    end: Instant,
    mut stop: Option<watch::Receiver<bool>>,
) {
    tokio::time::sleep_until(connect_at).await;
    let orb = orb_id(&cfg.prefix, i);
    let username = (!cfg.anonymous).then(|| format!("{}/{}", cfg.tenant, orb));
    let token = cfg.tokens.get(&orb).map(|t| t.as_bytes().to_vec());
    let keepalive = 60;
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        client::connect(&cfg.addr, cfg.protocol, &orb, username.as_deref(), token.as_deref(), keepalive),
    )
    .await;
    let (reader, mut writer) = match connected {
        Ok(Ok(Ok(rw))) => rw,
        Ok(Ok(Err(code))) => {
            tracing::debug!(orb, code, "connect refused");
            stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(orb, error = %e, "connect failed");
            stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let topic = format!("telemetry/{}/{}", cfg.tenant, orb);
    let state_topic = format!("state/{}/{}", cfg.tenant, orb);
    let msg_prefix = format!("{orb}.{:08x}", stats.run);
    let ack_topic = format!("commands/{}/{}/ack", cfg.tenant, orb);
    let inflight: Arc<Mutex<HashMap<u16, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let permits = Arc::new(Semaphore::new(cfg.inflight_max.max(1)));
    // Commands: received by the reader, acknowledged from here (the writer's task).
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<commands::Received>(64);
    let acks: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
    if tracker.is_some() {
        let sub = client::subscribe_packet(cfg.protocol, 1, &format!("commands/{}/{}", cfg.tenant, orb), 1);
        if writer.write_all(&sub).await.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    if let Some(t) = &tracker {
        t.ready(i);
    }
    let side = Commands { tracker: tracker.clone(), tx: cmd_tx, acks: acks.clone() };
    let reader_task =
        spawn_reader(reader, cfg.protocol, inflight.clone(), permits.clone(), stats.clone(), hists, i, side);

    let interval = Duration::from_millis(cfg.interval_ms.max(1));
    let phase = Duration::from_micros(fastrand::u64(..interval.as_micros() as u64));
    let mut next = publish_start + phase;
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    let mut motion = cfg.workload.start(i);
    let mut out = Vec::with_capacity(cfg.workload.buffer_bytes() + 128);
    let mut payload = Vec::with_capacity(cfg.workload.buffer_bytes());
    let mut last_write = Instant::now();
    let ping_every = Duration::from_secs(u64::from(keepalive) / 2);
    // The offered load: every intended send time inside the run, sent or not.
    let first = publish_start + phase;
    if first < end {
        let n = (end - first).as_nanos().div_ceil(interval.as_nanos()) as u64;
        stats.scheduled.fetch_add(n, Ordering::Relaxed);
    }
    let stopped = stopped(stop.as_mut());
    tokio::pin!(stopped);
    let mut was_stopped = false;
    // Messages behind schedule are sent as soon as the window allows (open loop), but never
    // after the end of the run: what is still unsent then counts as offered but not sent.
    while next < end && Instant::now() < end {
        let wake = next.min(last_write + ping_every);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            Some(cmd) = cmd_rx.recv() => {
                // PUBACK the command, then acknowledge it (QoS 1, outside the telemetry window).
                out.clear();
                out.extend_from_slice(&client::puback_packet(cmd.pkid));
                pkid = pkid.wrapping_add(1).max(1);
                if let Some(id) = cmd.sim_id {
                    acks.lock().expect("acks lock").insert(pkid, id);
                }
                client::publish_packet(&mut out, cfg.protocol, &ack_topic, &commands::ack_payload(&cmd.command_id), 1, pkid);
                if writer.write_all(&out).await.is_err() {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                last_write = Instant::now();
                continue;
            }
            _ = &mut stopped => {
                was_stopped = true;
                break;
            }
        }
        if Instant::now() < next {
            // Slow schedules still keep the connection alive.
            if writer.write_all(&client::PINGREQ).await.is_err() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            last_write = Instant::now();
            continue;
        }
        let intended = next;
        next += interval;
        if cfg.qos > 0 {
            tokio::select! {
                permit = permits.acquire() => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(end) => break,
                _ = &mut stopped => {
                was_stopped = true;
                break;
            }
            }
            if reader_task.is_finished() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        let state = cfg.state_every > 0 && seq % cfg.state_every == cfg.state_every - 1;
        payload.clear();
        if state {
            let report = serde_json::json!({"firmware": "sim-1.0", "config": {"sim_seq": seq}});
            // Writing JSON into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut payload, &report);
        } else {
            cfg.workload.payload_into(&mut payload, &msg_prefix, seq, &mut motion, interval);
        }
        seq += 1;
        out.clear();
        if cfg.qos > 0 {
            pkid = pkid.wrapping_add(1).max(1);
            inflight.lock().expect("inflight lock").insert(pkid, intended);
        }
        let topic = if state { &state_topic } else { &topic };
        client::publish_packet(&mut out, cfg.protocol, topic, &payload, cfg.qos, pkid);
        if state {
            stats.state_sent.fetch_add(1, Ordering::Relaxed);
        }
        if writer.write_all(&out).await.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        last_write = Instant::now();
        stats.sent.fetch_add(1, Ordering::Relaxed);
    }
    // Stopped before the end (Ctrl-C, the demo's unbounded run): intended sends that never
    // came due were not offered.
    if was_stopped && first < end {
        let now = Instant::now().max(first);
        if now < end {
            let due = (now - first).as_nanos().div_ceil(interval.as_nanos()) as u64;
            let planned = (end - first).as_nanos().div_ceil(interval.as_nanos()) as u64;
            stats.scheduled.fetch_sub(planned.saturating_sub(due), Ordering::Relaxed);
        }
    }
    // Wait for outstanding acknowledgements, then leave cleanly.
    finish(writer, reader_task, &inflight, &acks, stats).await;
}

/// Waits (up to 5 s) for outstanding acknowledgements (of messages and of command acks),
/// leaves cleanly and counts what was never acknowledged.
async fn finish(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    reader_task: tokio::task::JoinHandle<()>,
    inflight: &Mutex<HashMap<u16, Instant>>,
    acks: &Mutex<HashMap<u16, u64>>,
    stats: &Stats,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let waiting = || !inflight.lock().expect("inflight lock").is_empty() || !acks.lock().expect("acks lock").is_empty();
    while Instant::now() < deadline && waiting() && !reader_task.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = writer.write_all(&client::DISCONNECT).await;
    let _ = writer.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), reader_task).await;
    let left = inflight.lock().expect("inflight lock").len() as u64;
    stats.unacked.fetch_add(left, Ordering::Relaxed);
}

/// The reader's side of commands: received ones go to the orb's task; the PUBACKs of its
/// acknowledgements complete their round trip.
struct Commands {
    tracker: Option<Arc<commands::Tracker>>,
    tx: tokio::sync::mpsc::Sender<commands::Received>,
    /// Packet id of an acknowledgement -> the command's simulator id.
    acks: Arc<Mutex<HashMap<u16, u64>>>,
}

/// Reads PUBACKs: each releases a window slot and records its latency from the message's
/// intended send time. Command PUBLISHes go to the orb's task to be acknowledged.
#[allow(clippy::too_many_arguments)]
fn spawn_reader(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    protocol: u8,
    inflight: Arc<Mutex<HashMap<u16, Instant>>>,
    permits: Arc<Semaphore>,
    stats: Arc<Stats>,
    hists: Arc<Latencies>,
    shard: usize,
    commands: Commands,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(64);
        loop {
            match client::read_packet(&mut reader, protocol, &mut buf).await {
                Ok(Incoming::PubAck { pkid, reason }) => {
                    let sent_at = inflight.lock().expect("inflight lock").remove(&pkid);
                    if let Some(at) = sent_at {
                        permits.add_permits(1);
                        if reason >= 0x80 {
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        hists.record(shard, at);
                    } else if let Some(id) = commands.acks.lock().expect("acks lock").remove(&pkid)
                        && let Some(t) = &commands.tracker
                    {
                        t.acked(id);
                    }
                }
                Ok(Incoming::Publish { qos, pkid, topic, payload }) => {
                    if let Some(t) = &commands.tracker
                        && topic.starts_with("commands/")
                        && let Some(cmd) = t.received(pkid, &payload)
                    {
                        // An error means the orb's task stopped: nothing to acknowledge.
                        let _ = commands.tx.send(cmd).await;
                    } else if qos > 0 {
                        tracing::debug!(topic, "unexpected PUBLISH to a simulated orb");
                    }
                }
                Ok(Incoming::Disconnect { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
}

/// One edge gateway: connects, brings its children online through
/// `gateway/{t}/{gw}/connect` (1,000 per message, each acknowledged), then publishes each
/// child's telemetry on its own open-loop schedule over the one connection.
#[allow(clippy::too_many_arguments)]
async fn gateway_task(
    g: usize,
    children: std::ops::Range<usize>,
    cfg: &SimConfig,
    stats: &Arc<Stats>,
    hists: Arc<Latencies>,
    publish_start: Instant,
    end: Instant,
    mut stop: Option<watch::Receiver<bool>>,
) {
    let gw = format!("{}gw{g:04}", cfg.prefix);
    let username = format!("{}/{}", cfg.tenant, gw);
    let token = cfg.tokens.get(&gw).map(|t| t.as_bytes().to_vec());
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        client::connect(&cfg.addr, cfg.protocol, &gw, Some(&username), token.as_deref(), 60),
    )
    .await;
    let (mut reader, mut writer) = match connected {
        Ok(Ok(Ok(rw))) => rw,
        _ => {
            stats.connect_failures.fetch_add(children.len() as u64, Ordering::Relaxed);
            return;
        }
    };
    // Children online, in acknowledged batches.
    let mut buf = Vec::with_capacity(256);
    let mut out = Vec::new();
    let mut payload = Vec::with_capacity(cfg.workload.buffer_bytes());
    let ids: Vec<String> = children.clone().map(|i| orb_id(&cfg.prefix, i)).collect();
    let msg_prefixes: Vec<String> = ids.iter().map(|id| format!("{id}.{:08x}", stats.run)).collect();
    let topics: Vec<String> = ids.iter().map(|id| format!("telemetry/{}/{id}", cfg.tenant)).collect();
    for (n, batch) in ids.chunks(crate::limits::GATEWAY_CONNECT_BATCH_MAX).enumerate() {
        let body = serde_json::to_vec(&serde_json::json!({ "orbs": batch })).expect("json");
        out.clear();
        let pkid = (n % 60_000 + 1) as u16;
        client::publish_packet(&mut out, cfg.protocol, &format!("gateway/{}/{gw}/connect", cfg.tenant), &body, 1, pkid);
        if writer.write_all(&out).await.is_err() {
            stats.connect_failures.fetch_add(children.len() as u64, Ordering::Relaxed);
            return;
        }
        loop {
            match tokio::time::timeout(
                Duration::from_secs(60),
                client::read_packet(&mut reader, cfg.protocol, &mut buf),
            )
            .await
            {
                Ok(Ok(Incoming::PubAck { reason, .. })) => {
                    if reason < 0x80 {
                        stats.connected.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    } else {
                        stats.connect_failures.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    break;
                }
                Ok(Ok(_)) => continue,
                _ => {
                    stats.connect_failures.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
    let inflight: Arc<Mutex<HashMap<u16, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let permits = Arc::new(Semaphore::new(cfg.inflight_max.max(1)));
    let side = Commands { tracker: None, tx: tokio::sync::mpsc::channel(1).0, acks: Arc::default() };
    let reader_task =
        spawn_reader(reader, cfg.protocol, inflight.clone(), permits.clone(), stats.clone(), hists, g, side);

    // Every child's schedule, earliest first.
    let interval = Duration::from_millis(cfg.interval_ms.max(1));
    let mut due: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize)>> = ids
        .iter()
        .enumerate()
        .map(|(j, _)| {
            let phase = Duration::from_micros(fastrand::u64(..interval.as_micros() as u64));
            std::cmp::Reverse((publish_start + phase, j))
        })
        .collect();
    for std::cmp::Reverse((first, _)) in due.iter() {
        if *first < end {
            let n = (end - *first).as_nanos().div_ceil(interval.as_nanos()) as u64;
            stats.scheduled.fetch_add(n, Ordering::Relaxed);
        }
    }
    let mut seqs = vec![0u64; ids.len()];
    let mut motions: Vec<_> = children.clone().map(|i| cfg.workload.start(i)).collect();
    let mut pkid: u16 = 0;
    let stopped = stopped(stop.as_mut());
    tokio::pin!(stopped);
    while let Some(std::cmp::Reverse((at, j))) = due.pop() {
        if at >= end || Instant::now() >= end {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = &mut stopped => break,
        }
        due.push(std::cmp::Reverse((at + interval, j)));
        if cfg.qos > 0 {
            tokio::select! {
                permit = permits.acquire() => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(end) => break,
            }
            if reader_task.is_finished() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            pkid = pkid.wrapping_add(1).max(1);
            inflight.lock().expect("inflight lock").insert(pkid, at);
        }
        payload.clear();
        cfg.workload.payload_into(&mut payload, &msg_prefixes[j], seqs[j], &mut motions[j], interval);
        seqs[j] += 1;
        out.clear();
        client::publish_packet(&mut out, cfg.protocol, &topics[j], &payload, cfg.qos, pkid);
        if writer.write_all(&out).await.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
    }
    finish(writer, reader_task, &inflight, &Mutex::default(), stats).await;
}

impl Summary {
    /// A readable table of the headline numbers.
    pub fn table(&self) -> String {
        let l = &self.puback_latency_ms;
        format!(
            "target {}  mqtt {}  qos {}  orbs {} ({} connected, {} failed)\n\
             scheduled {}  sent {}  acked {}  refused {}  unacked {}  errors {}\n\
             offered {:.0} msg/s  sent {:.0} msg/s  acked {:.0} msg/s over {:.1} s{}\n\
             PUBACK latency ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}  ({} samples){}{}",
            self.target,
            if self.protocol == 5 { "5.0" } else { "3.1.1" },
            self.qos,
            self.orbs,
            self.connected,
            self.connect_failures,
            self.scheduled,
            self.sent,
            self.acked,
            self.refused,
            self.unacked,
            self.errors,
            self.offered_rate,
            self.sent_rate,
            self.acked_rate,
            self.duration_s,
            if self.warmup_s > 0 {
                format!("; latencies after a {} s warm-up", self.warmup_s)
            } else {
                String::new()
            },
            l.p50,
            l.p95,
            l.p99,
            l.max,
            l.samples,
            self.stream_latency_ms.as_ref().map_or(String::new(), |s| format!(
                "\ningest -> stream ms p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}  ({} samples)",
                s.p50, s.p95, s.p99, s.max, s.samples
            )),
            self.webhook.as_ref().map_or(String::new(), |w| {
                let l = &w.telemetry_to_webhook_ms;
                format!(
                    "\nwebhooks {} received ({} bad signatures); telemetry -> webhook ms p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}  ({} samples)",
                    w.received, w.bad_signatures, l.p50, l.p95, l.p99, l.max, l.samples
                )
            })
        ) + &self.commands_table()
    }

    fn commands_table(&self) -> String {
        let mut out = String::new();
        if self.state_reports > 0 {
            out += &format!("\nstate reports {} of the sent messages", self.state_reports);
        }
        if let Some(c) = &self.commands {
            let (d, r) = (&c.delivery_ms, &c.round_trip_ms);
            out += &format!(
                "\ncommands {:.1}/s: created {} ({} failed)  delivered {}  acked {}\n\
                 create -> delivered ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\n\
                 create -> ack applied ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                c.rate_per_s,
                c.created,
                c.create_failures,
                c.delivered,
                c.acked,
                d.p50,
                d.p95,
                d.p99,
                d.max,
                r.p50,
                r.p95,
                r.p99,
                r.max
            );
        }
        out
    }
}

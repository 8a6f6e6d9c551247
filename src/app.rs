//! Wiring: ordered start and stop of everything.
//!
//! Start: store -> fleet (shards) -> listeners bound (port 0 resolved) -> MQTT, gRPC, HTTP
//! serving -> `endpoints.json` -> ready. Stop (SIGTERM/SIGINT): refuse new work -> close MQTT
//! connections (in-flight publishes finish their commits) -> HTTP and gRPC -> orb actors ->
//! final group commit and fsync -> exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actors::{Fleet, OrbCtx};
use crate::api::Api;
use crate::clock::Clock;
use crate::config::{Config, parse_duration};
use crate::limits::SHUTDOWN_GRACE_MS;
use crate::metrics::Metrics;
use crate::net::http::{HttpCtx, Readiness};
use crate::net::ingest::Ingest;
use crate::net::mqtt::{MqttCtx, MqttListener};
use crate::storage::cold::{Cold, ObjectTarget, SpillOptions};
use crate::storage::{Store, StoreOptions};

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind { what: &'static str, addr: String, source: std::io::Error },
    #[error("starting the {what}: {message}")]
    Start { what: &'static str, message: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Where the listeners ended up (port 0 resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub mqtt: SocketAddr,
    /// MQTT over TLS with client certificates; `None` when turned off.
    pub mqtts: Option<SocketAddr>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Endpoints {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mqtt": self.mqtt.to_string(),
            "mqtts": self.mqtts.map(|a| a.to_string()),
            "grpc": self.grpc.to_string(),
            "http": self.http.to_string(),
        })
    }
}

/// A running server.
pub struct Server {
    endpoints: Endpoints,
    fleet: Fleet,
    store: Store,
    /// Its background session writes are committed before the store closes.
    broker: Arc<crate::broker::Broker>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mqtt: Option<MqttListener>,
    http: (Option<oneshot::Sender<()>>, Option<JoinHandle<()>>),
    grpc: (Option<oneshot::Sender<()>>, Option<JoinHandle<()>>),
    sweeper: JoinHandle<()>,
    pruner: JoinHandle<()>,
    /// Spills, checkpoints and cold retention on their intervals.
    maintenance: JoinHandle<()>,
    /// Ends live streams when draining starts.
    closing: tokio::sync::watch::Sender<bool>,
}

fn bind(what: &'static str, addr: &str) -> Result<std::net::TcpListener, AppError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| AppError::Bind { what, addr: addr.into(), source })?;
    l.set_nonblocking(true).map_err(|source| AppError::Bind { what, addr: addr.into(), source })?;
    Ok(l)
}

fn local(what: &'static str, l: &std::net::TcpListener) -> Result<SocketAddr, AppError> {
    l.local_addr().map_err(|source| AppError::Bind { what, addr: "?".into(), source })
}

/// Writes `endpoints.json` atomically (temp file + rename).
fn write_endpoints(dir: &Path, e: &Endpoints) -> Result<(), AppError> {
    let path = dir.join("endpoints.json");
    let tmp = dir.join("endpoints.json.tmp");
    let write = |p: &Path| std::fs::write(p, e.to_json().to_string());
    write(&tmp).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|source| AppError::Write { path, source })
}

fn boot_id() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("operating system random source failed");
    u64::from_le_bytes(b)
}

impl Server {
    /// Starts everything; returns once every listener is serving.
    pub async fn start(config: &Config, clock: Clock) -> Result<Server, AppError> {
        let metrics = Arc::new(Metrics::default());
        let store_opts = store_options(config);
        let dir = config.data_dir.clone();
        let m = metrics.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, &store_opts, m))
            .await
            .map_err(|e| AppError::Start { what: "store", message: e.to_string() })??;
        // (No registry count here: it is a scan of every orb key, ~1 s at 500K orbs; the fleet
        // index logs the count once it has loaded in the background.)
        tracing::info!(data_dir = %config.data_dir.display(), "store open");
        let target = ObjectTarget::parse(&config.object_store, &config.data_dir, &config.storage.s3)
            .map_err(|e| AppError::Start { what: "object store", message: e.to_string() })?;
        let cold = Arc::new(
            Cold::open(store.clone(), &target)
                .map_err(|e| AppError::Start { what: "object store", message: e.to_string() })?,
        );
        tracing::info!(object_store = %cold.url(), "cold tier");

        let fleet = Fleet::start(
            OrbCtx::new(
                store.clone(),
                clock.clone(),
                metrics.clone(),
                config.dev,
                boot_id(),
                config.actors.idle_passivate_s * 1000,
            )
            .with_hub(crate::stream::Hub::new(config.stream.buffer))
            .with_event_retention((&config.events).into())
            .with_telemetry_in_flight_max(config.actors.telemetry_in_flight_max),
            config.actors.shards,
        )
        .await
        .map_err(|e| AppError::Start { what: "shards", message: e.to_string() })?;

        let mqtt_l = bind("mqtt", &config.mqtt_addr)?;
        let mqtts_l = if config.mqtts_addr.is_empty() { None } else { Some(bind("mqtts", &config.mqtts_addr)?) };
        let grpc_l = bind("grpc", &config.grpc_addr)?;
        let http_l = bind("http", &config.http_addr)?;
        let endpoints = Endpoints {
            mqtt: local("mqtt", &mqtt_l)?,
            mqtts: mqtts_l.as_ref().map(|l| local("mqtts", l)).transpose()?,
            grpc: local("grpc", &grpc_l)?,
            http: local("http", &http_l)?,
        };
        let mqtts = match mqtts_l {
            None => None,
            Some(l) => {
                // The platform's server CA signs the MQTTS server certificate (devices get it
                // as `server_ca_pem` at registration); created on first start.
                let server_ca = crate::api::tenants::stored_or_new_ca(&store, None, clock.now_ms())
                    .await
                    .map_err(|e| AppError::Start { what: "server CA", message: e.message })?;
                let addr = endpoints.mqtts.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |a| a.ip());
                let tls = crate::net::mqtt::tls::server_config(
                    store.clone(),
                    &server_ca,
                    addr,
                    &config.mqtt.tls_server_names,
                    clock.now_ms(),
                )
                .map_err(|message| AppError::Start { what: "mqtts listener", message })?;
                Some((l, tls))
            }
        };

        let draining = Arc::new(AtomicBool::new(false));
        let readiness = Arc::new(Readiness { draining: draining.clone(), ..Default::default() });
        let broker = crate::broker::Broker::load(
            store.clone(),
            clock.clone(),
            metrics.clone(),
            config.mqtt.session_expiry_max_s,
        )
        .map_err(|e| AppError::Start { what: "broker", message: e.to_string() })?;
        let ingest = Arc::new(Ingest {
            broker: broker.clone(),
            fleet: fleet.clone(),
            store: store.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            max_payload_bytes: config.telemetry.max_payload_bytes,
        });

        let workers = match config.mqtt.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let mqtt_ctx = Arc::new(MqttCtx {
            ingest: ingest.clone(),
            dev: config.dev,
            keepalive_max_s: config.mqtt.keepalive_max_s,
            draining: draining.clone(),
            shutdown: closing.clone(),
            rates: crate::net::mqtt::Rates::new(&config.mqtt, clock.now_ms()),
        });
        let mqtt = MqttListener::start(mqtt_l, mqtts, mqtt_ctx, &config.mqtt, workers)
            .map_err(|e| AppError::Start { what: "mqtt listener", message: e.to_string() })?;
        readiness.mqtt.store(true, Ordering::Release);

        let spill_opts = SpillOptions {
            hot_window_ms: parse_duration(&config.storage.hot_window).unwrap_or(6 * 3_600_000),
            tenant_windows: true,
            buffer_bytes: config.storage.spill_buffer_mb * 1024 * 1024,
        };
        let storage = crate::api::storage::StorageApi::new(
            cold.clone(),
            spill_opts.clone(),
            parse_duration(&config.storage.cold_retention).unwrap_or(0),
            config.storage.export_file_rows,
        );
        let api = Arc::new(Api::new(ingest, config.dev, config.auth.admin_token.clone(), closing, storage));
        match api.resume_exports() {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "resuming export jobs"),
            Err(e) => tracing::warn!(error = %e.message, "resuming export jobs failed"),
        }
        let (grpc_tx, grpc_rx) = oneshot::channel::<()>();
        let grpc_api = api.clone();
        let grpc_l = tokio::net::TcpListener::from_std(grpc_l).map_err(|source| AppError::Bind {
            what: "grpc",
            addr: config.grpc_addr.clone(),
            source,
        })?;
        let r = readiness.clone();
        let grpc_task = tokio::spawn(async move {
            r.grpc.store(true, Ordering::Release);
            if let Err(e) = crate::net::grpc::serve(grpc_l, grpc_api, async {
                let _ = grpc_rx.await;
            })
            .await
            {
                tracing::error!(error = %e, "grpc listener failed");
            }
            r.grpc.store(false, Ordering::Release);
        });

        let http_ctx = Arc::new(HttpCtx { api: api.clone(), readiness: readiness.clone() });
        let (http_tx, http_rx) = oneshot::channel::<()>();
        let http_l = tokio::net::TcpListener::from_std(http_l).map_err(|source| AppError::Bind {
            what: "http",
            addr: config.http_addr.clone(),
            source,
        })?;
        let router = crate::net::http::router(http_ctx);
        let r = readiness.clone();
        let http_task = tokio::spawn(async move {
            r.http.store(true, Ordering::Release);
            let serve = axum::serve(http_l, router).with_graceful_shutdown(async {
                let _ = http_rx.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "http listener failed");
            }
            r.http.store(false, Ordering::Release);
        });

        let sweep_store = store.clone();
        let sweep_clock = clock.clone();
        let every = Duration::from_secs(config.storage.dedupe_sweep_interval_s);
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (s, now) = (sweep_store.clone(), sweep_clock.now_ms());
                match tokio::task::spawn_blocking(move || s.sweep_dedupe(now)).await {
                    Ok(Ok(n)) if n > 0 => tracing::debug!(removed = n, "dedupe sweep"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "dedupe sweep failed"),
                    _ => {}
                }
            }
        });

        let (events, prune_clock) = (fleet.ctx().events.clone(), clock.clone());
        let every = Duration::from_secs(config.events.prune_interval_s);
        let pruner = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let (e, now) = (events.clone(), prune_clock.now_ms());
                match tokio::task::spawn_blocking(move || e.prune(now)).await {
                    Ok(Ok(n)) if n > 0 => tracing::debug!(removed = n, "event log pruned"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "pruning the event log failed"),
                    _ => {}
                }
            }
        });

        let maintenance = tokio::spawn(cold_maintenance(
            cold.clone(),
            clock.clone(),
            spill_opts,
            config.storage.spill_interval_s,
            config.storage.checkpoint_interval_s,
            parse_duration(&config.storage.cold_retention).unwrap_or(0),
        ));

        write_endpoints(&config.data_dir, &endpoints)?;
        if config.dev {
            tracing::warn!("dev mode: tenant \"default\" admits anonymous clients and registers orbs on first contact");
        }
        if !config.dev && config.auth.admin_token.is_empty() {
            tracing::warn!("no auth.admin_token set: the operator REST API refuses every call");
        }
        tracing::info!(mqtt = %endpoints.mqtt, grpc = %endpoints.grpc, http = %endpoints.http, "ready");
        Ok(Server {
            endpoints,
            fleet,
            store,
            broker,
            metrics,
            readiness,
            mqtt: Some(mqtt),
            http: (Some(http_tx), Some(http_task)),
            grpc: (Some(grpc_tx), Some(grpc_task)),
            sweeper,
            pruner,
            maintenance,
            closing: closing_tx,
        })
    }

    pub fn endpoints(&self) -> Endpoints {
        self.endpoints
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Drains and stops, in the order of the module header. Everything acknowledged is durable
    /// when this returns.
    pub async fn shutdown(mut self) {
        tracing::info!("draining");
        self.readiness.draining.store(true, Ordering::Release);
        let _ = self.closing.send(true);
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
        if let Some(mqtt) = self.mqtt.take() {
            if tokio::time::timeout(grace, mqtt.stop()).await.is_err() {
                tracing::warn!("mqtt listener did not stop within the grace period");
            }
            self.readiness.mqtt.store(false, Ordering::Release);
        }
        for (tx, task) in [&mut self.http, &mut self.grpc] {
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
            if let Some(task) = task.take()
                && tokio::time::timeout(grace, task).await.is_err()
            {
                tracing::warn!("a listener did not stop within the grace period");
            }
        }
        self.sweeper.abort();
        let _ = (&mut self.sweeper).await;
        self.pruner.abort();
        let _ = (&mut self.pruner).await;
        self.maintenance.abort();
        let _ = (&mut self.maintenance).await;
        self.fleet.stop().await;
        self.broker.close().await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        tracing::info!("stopped; everything acknowledged is on disk");
    }
}

/// Spills telemetry past the hot window, writes checkpoints and deletes cold files past the
/// retention, each on its own interval (0 turns one off). A failed round is logged and tried
/// again next interval; nothing is lost by a failed spill (the hot copy stays until a file is
/// committed).
async fn cold_maintenance(
    cold: Arc<Cold>,
    clock: Clock,
    spill: SpillOptions,
    spill_every_s: u64,
    checkpoint_every_s: u64,
    retention_ms: u64,
) {
    let every = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let (spill_every, ckpt_every) = (every(spill_every_s), every(checkpoint_every_s));
    let mut next_spill = spill_every.map(|d| tokio::time::Instant::now() + d);
    let mut next_ckpt = ckpt_every.map(|d| tokio::time::Instant::now() + d);
    loop {
        let wake = match (next_spill, next_ckpt) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return,
        };
        tokio::time::sleep_until(wake).await;
        let now = tokio::time::Instant::now();
        if let (Some(at), Some(d)) = (next_spill, spill_every)
            && at <= now
        {
            if let Err(e) = cold.spill(clock.now_ms(), &spill, None).await {
                tracing::warn!(error = %e, "spill failed; the points stay hot and are retried");
            }
            for t in cold.store().tenant_ids().unwrap_or_default() {
                let own = cold.store().retention(&t).ok().flatten().and_then(|r| r.cold_retention_ms);
                let keep = own.unwrap_or(retention_ms);
                if keep == 0 {
                    continue;
                }
                match cold.expire(&t, clock.now_ms().saturating_sub(keep)).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tenant = %t, files = n, "cold retention removed files"),
                    Err(e) => tracing::warn!(tenant = %t, error = %e, "cold retention failed"),
                }
            }
            match cold.collect_orphans(clock.now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(objects = n, "removed unreferenced cold files left by interrupted spills"),
                Err(e) => tracing::warn!(error = %e, "collecting unreferenced cold files failed"),
            }
            next_spill = Some(tokio::time::Instant::now() + d);
        }
        if let (Some(at), Some(d)) = (next_ckpt, ckpt_every)
            && at <= now
        {
            if let Err(e) = cold.checkpoint(clock.now_ms()).await {
                tracing::warn!(error = %e, "checkpoint failed");
            }
            next_ckpt = Some(tokio::time::Instant::now() + d);
        }
    }
}

/// The store's options from the `[storage]` configuration.
fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        cache_bytes: config.storage.cache_mb * 1024 * 1024,
        commit_queue_max: config.storage.commit_queue_max,
        dedupe_filter_bytes: config.storage.dedupe_filter_mb * 1024 * 1024,
        commit_linger: std::time::Duration::from_micros(config.storage.commit_linger_us),
        telemetry_blob_min_bytes: config.storage.telemetry_blob_min_bytes,
    }
}

/// `orbmanager restore`: rebuilds an empty data directory from a checkpoint in the object
/// store (and the cold files spilled after it). Returns a one-line JSON report.
pub async fn restore(config: &Config, checkpoint: Option<&str>) -> Result<String, AppError> {
    let metrics = Arc::new(Metrics::default());
    let opts = store_options(config);
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, &opts, metrics))
        .await
        .map_err(|e| AppError::Start { what: "store", message: e.to_string() })??;
    let target = ObjectTarget::parse(&config.object_store, &config.data_dir, &config.storage.s3)
        .map_err(|e| AppError::Start { what: "object store", message: e.to_string() })?;
    let cold = Cold::open(store.clone(), &target)
        .map_err(|e| AppError::Start { what: "object store", message: e.to_string() })?;
    let result = cold.restore(checkpoint, &config.data_dir).await;
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.close()).await;
    let (info, entries) = result.map_err(|e| AppError::Start { what: "restore", message: e.to_string() })?;
    let report = serde_json::json!({
        "restored_from": format!("{}/{}", cold.url(), info.path),
        "checkpoint_created_ms": info.created_ms,
        "entries": entries,
        "orbs": store.orb_count().unwrap_or(0),
    });
    Ok(report.to_string())
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `orbmanager serve`: runs until SIGINT/SIGTERM, then drains.
pub async fn serve(config: Config) -> Result<(), AppError> {
    let server = Server::start(&config, Clock::system()).await?;
    shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}

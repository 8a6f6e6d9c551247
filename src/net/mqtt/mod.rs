//! The MQTT listener: 3.1.1 and 5 on one port (ntex-mqtt 8 on ntex 3 with tokio).
//!
//! ntex runs its own system on a dedicated thread with one worker thread per core; each
//! worker builds its services and keeps its connections. Limits are set explicitly here
//! (ntex-mqtt's max packet size defaults to unlimited).

mod framing;
mod session;
pub mod tls;
pub mod topic;
mod v3;
mod v5;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

use ntex::service::cfg::SharedCfg;
use ntex::service::{fn_factory_with_config, fn_service};
use ntex::time::Seconds;
use ntex_mqtt::{MqttServer, MqttServiceConfig, QoS};

use crate::config::MqttConfig;
use crate::net::ingest::Ingest;
pub use session::CloseConnection;
use session::Conn;

/// What every connection shares.
pub struct MqttCtx {
    pub ingest: Arc<Ingest>,
    pub dev: bool,
    pub keepalive_max_s: u16,
    /// Set when the server starts draining; new connections are refused.
    pub draining: Arc<AtomicBool>,
    /// Flips to `true` when the server starts draining: every connection is closed (v5 with
    /// DISCONNECT 0x8B) instead of waiting for clients to leave.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub rates: Rates,
}

/// Rate limits (per second; 0 = off) and their buckets.
pub struct Rates {
    pub publish_per_connection: f64,
    pub publish_per_tenant: f64,
    pub connects: f64,
    pub tenants: std::sync::Mutex<std::collections::HashMap<crate::model::TenantId, crate::model::rate::Bucket>>,
    pub connect_bucket: std::sync::Mutex<crate::model::rate::Bucket>,
}

impl Rates {
    pub fn new(cfg: &MqttConfig, now_ms: u64) -> Rates {
        Rates {
            publish_per_connection: f64::from(cfg.publish_rate_per_connection),
            publish_per_tenant: f64::from(cfg.publish_rate_per_tenant),
            connects: f64::from(cfg.connect_rate_per_s),
            tenants: std::sync::Mutex::new(std::collections::HashMap::new()),
            // Bursts of one second's worth (a reconnect storm of a whole node is the case).
            connect_bucket: std::sync::Mutex::new(crate::model::rate::Bucket::new(cfg.connect_rate_per_s, now_ms)),
        }
    }

    /// May one more connection be accepted now?
    pub fn admit_connect(&self, now_ms: u64) -> bool {
        self.connect_bucket.lock().unwrap_or_else(|e| e.into_inner()).take(self.connects, self.connects, now_ms)
    }

    /// Reserves a publish for `tenant`: the wait in ms (0: now), `None` when the tenant's
    /// backlog is over [`THROTTLE_MAX_MS`].
    pub fn reserve_tenant(&self, tenant: &crate::model::TenantId, now_ms: u64) -> Option<u64> {
        let rate = self.publish_per_tenant;
        if rate <= 0.0 {
            return Some(0);
        }
        let mut buckets = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(tenant.clone()).or_insert_with(|| crate::model::rate::Bucket::new(rate as u32, now_ms));
        let wait = b.reserve(rate, rate, now_ms);
        if wait > THROTTLE_MAX_MS {
            b.refund();
            return None;
        }
        Some(wait)
    }
}

/// Longest a publish is held back by a rate limit before the connection is closed instead
/// (v5 DISCONNECT 0x96): a device briefly over its rate is slowed down, one that keeps
/// sending faster is cut off.
pub const THROTTLE_MAX_MS: u64 = 1_000;

/// A running MQTT listener.
pub struct MqttListener {
    server: ntex::server::Server,
    thread: Option<JoinHandle<()>>,
}

/// Idle timeout for a keep-alive: 1.5 times the keep-alive, which is capped at `cap`
/// (a client asking for 0 gets the cap too: every connection has a bound).
pub(crate) fn idle_timeout_s(requested: u16, cap: u16) -> u16 {
    let ka = if requested == 0 || requested > cap { cap } else { requested };
    ka.saturating_add(ka / 2)
}

/// A client id for clients that sent none.
pub(crate) fn assigned_client_id() -> String {
    format!("om-{:016x}", fastrand::u64(..))
}

impl MqttListener {
    /// Starts serving `listener` (plain MQTT) and `tls` (MQTTS with client certificates) on
    /// `workers` threads.
    pub fn start(
        listener: TcpListener,
        tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
        ctx: Arc<MqttCtx>,
        cfg: &MqttConfig,
        workers: usize,
    ) -> std::io::Result<MqttListener> {
        let cfg = cfg.clone();
        let svc_cfg = move || {
            MqttServiceConfig::new()
                .set_max_size(cfg.max_packet_size)
                .set_max_receive(cfg.receive_maximum)
                .set_max_receive_size(cfg.inflight_bytes_max)
                .set_max_qos(QoS::ExactlyOnce)
                .set_max_topic_alias(32)
                .protocol_version_timeout(Seconds(cfg.connect_timeout_s))
                .set_connect_timeout(Seconds(cfg.connect_timeout_s))
                .set_handshake_timeout(Seconds(cfg.connect_timeout_s))
                .set_max_send(cfg.receive_maximum)
                .set_max_send_size(cfg.max_packet_size)
        };
        let per_worker = cfg.max_connections.div_ceil(workers).max(1);
        let handshake_s = cfg.connect_timeout_s;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("mqtt-system".into()).spawn(move || {
            let runner =
                ntex::rt::System::build().name("orbmanager-mqtt").disable_signals().build(ntex::rt::DefaultRuntime);
            runner.block_on(async move {
                let plain_ctx = ctx.clone();
                let factory = async move |_| {
                    on_worker_start();
                    service(plain_ctx.clone())
                };
                let builder = ntex::server::build()
                    .workers(workers)
                    .disable_signals()
                    // Connections are closed by the drain signal (see `MqttCtx::shutdown`); this
                    // bounds what is left, well inside the server's own grace period.
                    .shutdown_timeout(ntex::time::Millis(crate::limits::MQTT_STOP_TIMEOUT_MS))
                    .maxconn(per_worker)
                    .listen("mqtt", listener, factory)
                    .map(|b| b.config("mqtt", SharedCfg::new("MQTT").add(svc_cfg())));
                let builder = match (builder, tls) {
                    (Ok(b), Some((tls_listener, server_config))) => {
                        let tls_factory = async move |_| {
                            on_worker_start();
                            ntex::service::chain_factory(ntex_tls::rustls::TlsAcceptor::new(server_config.clone()))
                                .map_err(|e| {
                                    ntex_mqtt::MqttError::Handshake(ntex_mqtt::error::HandshakeError::Disconnected(
                                        Some(e),
                                    ))
                                })
                                .and_then(service(ctx.clone()))
                        };
                        let tls_cfg = ntex_tls::TlsConfig::new().set_handshake_timeout(Seconds(handshake_s));
                        b.listen("mqtts", tls_listener, tls_factory)
                            .map(|b| b.config("mqtts", SharedCfg::new("MQTTS").add(svc_cfg()).add(tls_cfg)))
                    }
                    (b, _) => b,
                };
                let built = builder.map(|b| b.run());
                match built {
                    Ok(server) => {
                        let _ = tx.send(Ok(server.clone()));
                        let _ = server.await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
        let server = rx.recv().map_err(|_| std::io::Error::other("mqtt system thread exited before starting"))??;
        Ok(MqttListener { server, thread: Some(thread) })
    }

    /// Stops accepting, closes connections (gracefully within the server's timeout) and waits
    /// for the worker threads to end.
    pub async fn stop(mut self) {
        self.server.stop(true).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Runs on each worker thread as its services are built: the worker's commit replies arrive
/// in one batch per group (`storage::commit`), so its connections' PUBACKs leave together.
fn on_worker_start() {
    crate::storage::deliver_replies_here(|task| {
        ntex::rt::spawn(task);
    });
}

fn service<F: ntex::io::Filter>(
    ctx: Arc<MqttCtx>,
) -> impl ntex::service::ServiceFactory<
    ntex::io::Io<F>,
    SharedCfg,
    Response = (),
    Error = ntex_mqtt::MqttError<CloseConnection>,
    InitError = (),
> {
    let c3 = ctx.clone();
    let c5 = ctx;
    let v3 = ntex_mqtt::v3::MqttServer::new(fn_service(async move |h| v3::handshake(c3.clone(), h).await))
        .protocol(fn_factory_with_config(async |conn: ntex_mqtt::v3::Session<Conn>| {
            let conn = Conn::clone(&conn);
            Ok::<_, CloseConnection>(fn_service(async move |m| v3::protocol(&conn, m).await))
        }))
        .control(fn_factory_with_config(async |conn: ntex_mqtt::v3::Session<Conn>| {
            let conn = Conn::clone(&conn);
            // Built once per connection, after the CONNACK is written.
            conn.start_delivery();
            Ok::<_, CloseConnection>(fn_service(async move |c| v3::control(&conn, c).await))
        }))
        .publish(fn_factory_with_config(async |conn: ntex_mqtt::v3::Session<Conn>| {
            let conn = Conn::clone(&conn);
            // Boxed: ntex nests the handler's ~3.4 KB future in six layers of its own futures
            // and moves each per message (BENCHMARKS.md, "Memory per orb through gateways").
            Ok::<_, CloseConnection>(fn_service(async move |p| Box::pin(v3::publish(&conn, p)).await))
        }));
    let v5 = ntex_mqtt::v5::MqttServer::new(fn_service(async move |h| v5::handshake(c5.clone(), h).await))
        .protocol(fn_factory_with_config(async |conn: ntex_mqtt::v5::Session<Conn>| {
            let conn = Conn::clone(&conn);
            Ok::<_, CloseConnection>(fn_service(async move |m| v5::protocol(&conn, m).await))
        }))
        .control(fn_factory_with_config(async |conn: ntex_mqtt::v5::Session<Conn>| {
            let conn = Conn::clone(&conn);
            conn.start_delivery();
            Ok::<_, CloseConnection>(fn_service(async move |c| v5::control(&conn, c).await))
        }))
        .publish(fn_factory_with_config(async |conn: ntex_mqtt::v5::Session<Conn>| {
            let conn = Conn::clone(&conn);
            Ok::<_, CloseConnection>(fn_service(async move |p| Box::pin(v5::publish(&conn, p)).await))
        }));
    // Every connection gets the framing guard under the MQTT codec.
    ntex::service::chain_factory(fn_service(async |io: ntex::io::Io<F>| {
        Ok::<_, ntex_mqtt::MqttError<CloseConnection>>(io.add_filter(framing::Framing::default()))
    }))
    .and_then(MqttServer::new().v3(v3).v5(v5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_caps_and_defaults() {
        assert_eq!(idle_timeout_s(10, 300), 15);
        assert_eq!(idle_timeout_s(0, 300), 450);
        assert_eq!(idle_timeout_s(1000, 300), 450);
    }

    #[test]
    fn assigned_ids_are_valid_client_ids() {
        let id = assigned_client_id();
        assert!(session::check_client_id(&id).is_ok());
        assert_ne!(id, assigned_client_id());
    }
}

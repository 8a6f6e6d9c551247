//! `orbmanager demo`: the server in dev mode plus a simulated city fleet on the same machine.

use std::collections::HashMap;

use tokio::sync::watch;

use crate::app::{AppError, Server, shutdown_signal};
use crate::clock::Clock;
use crate::config::Config;
use crate::sim::{self, SimConfig, Workload};

/// Runs until SIGINT/SIGTERM.
pub async fn run(mut config: Config, orbs: usize, interval_ms: u64) -> Result<(), AppError> {
    config.dev = true;
    let server = Server::start(&config, Clock::system()).await?;
    let e = server.endpoints();
    let first = sim::orb_id("demo-", 0);
    println!(
        "\nOrbManager demo: {orbs} simulated orbs in dev tenant \"default\" publishing every {interval_ms} ms\n\
         \n  MQTT       {mqtt}   (mosquitto_pub -h {mh} -p {mp} -t telemetry/default/my-orb -m '{{\"battery\":80}}')\
         \n  one orb    http://{http}/v1/orbs/{first}\
         \n  history    http://{http}/v1/orbs/{first}/telemetry?limit=20\
         \n  metrics    http://{http}/metrics\
         \n  health     http://{http}/healthz\
         \n  gRPC       {grpc}   (grpc.health.v1)\
         \n  data dir   {dir}\
         \n\nPress Ctrl-C to stop.\n",
        mqtt = e.mqtt,
        mh = e.mqtt.ip(),
        mp = e.mqtt.port(),
        http = e.http,
        grpc = e.grpc,
        dir = config.data_dir.display(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let sim_cfg = SimConfig {
        addr: e.mqtt.to_string(),
        orbs,
        interval_ms,
        qos: 1,
        duration_s: u64::MAX / 4_000_000,
        tenant: "default".into(),
        prefix: "demo-".into(),
        protocol: 4,
        connect_rate: 500,
        tokens: HashMap::new(),
        anonymous: false,
        workload: Workload::City,
        inflight_max: 16,
        stream: None,
        webhook: None,
        gateway_children: 0,
        // Now and then a state report, and a command a second (received and acknowledged).
        state_every: 30,
        commands_per_s: 1.0,
        api: Some((e.grpc.to_string(), None)),
        warmup_s: 0,
    };
    let fleet = tokio::spawn(sim::run(sim_cfg, Some(stop_rx)));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    if let Ok(summary) = fleet.await {
        println!("{}", summary.table());
    }
    server.shutdown().await;
    Ok(())
}

//! Test harness: the real server on 127.0.0.1:0 in a temp dir, real MQTT clients (rumqttc),
//! a real HTTP client (ureq). Shared by the behaviour tests; each test uses what it needs.
#![allow(dead_code)]

pub mod peer;
pub mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use orbmanager::app::Server;
use orbmanager::clock::Clock;
use orbmanager::config::Config;
use serde_json::Value;
use tempfile::TempDir;

pub const ADMIN: &str = "test-admin-token-0123456789";

pub fn init_logs() {
    let filter = std::env::var("OM_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A config for tests: loopback, port 0 everywhere, one MQTT worker, small shards.
pub fn test_config(dir: &std::path::Path, dev: bool) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        dev,
        mqtt_addr: "127.0.0.1:0".into(),
        mqtts_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    c.mqtt.workers = 1;
    c.actors.shards = 4;
    c.auth.admin_token = ADMIN.into();
    c.validate().expect("test config is valid");
    c
}

pub struct TestServer {
    pub server: Option<Server>,
    pub dir: TempDir,
    pub http: String,
    pub mqtt: SocketAddr,
    /// The MQTTS (mTLS) listener; `None` when a test turned it off.
    pub mqtts: Option<SocketAddr>,
    pub grpc: SocketAddr,
}

impl TestServer {
    pub async fn start(dev: bool) -> TestServer {
        Self::start_with(dev, |_| {}).await
    }

    pub async fn start_with(dev: bool, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, dev, tweak).await
    }

    /// Starts on an existing data dir (restarts).
    pub async fn start_in(dir: TempDir, dev: bool, tweak: impl FnOnce(&mut Config)) -> TestServer {
        init_logs();
        let mut config = test_config(dir.path(), dev);
        tweak(&mut config);
        let server = Server::start(&config, Clock::system()).await.unwrap_or_else(|e| panic!("server starts: {e}"));
        let e = server.endpoints();
        TestServer {
            http: format!("http://{}", e.http),
            mqtt: e.mqtt,
            mqtts: e.mqtts,
            grpc: e.grpc,
            server: Some(server),
            dir,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// Drains and stops; returns the data dir for a restart.
    pub async fn stop(mut self) -> TempDir {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.http, path)
    }

    /// Registers an orb as the bootstrap operator (creating its tenant the first time);
    /// returns its device token.
    pub async fn register(&self, tenant: &str, orb: &str) -> String {
        ensure_tenant(&self.http, tenant).await;
        let (status, body) = http(
            "POST",
            &self.url("/v1/orbs/register"),
            Some(ADMIN),
            Some(serde_json::json!({"tenant_id": tenant, "orb_id": orb})),
        )
        .await;
        assert_eq!(status, 201, "register {tenant}/{orb}: {body}");
        body["device_token"].as_str().expect("token").to_string()
    }

    /// `GET` as the bootstrap operator.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        http("GET", &self.url(path), Some(ADMIN), None).await
    }

    /// The value of an unlabelled metric.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.http, name).await
    }
}

/// Creates a tenant as the bootstrap operator unless it exists.
pub async fn ensure_tenant(http_base: &str, tenant: &str) {
    let (status, body) =
        http("POST", &format!("{http_base}/v1/tenants"), Some(ADMIN), Some(serde_json::json!({"tenant_id": tenant})))
            .await;
    assert!(status == 201 || status == 409, "create tenant {tenant}: {status} {body}");
}

/// Reads one sample from `/metrics` (`name` may include labels).
pub async fn metric(http_base: &str, name: &str) -> f64 {
    let url = format!("{http_base}/metrics");
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&url).call().expect("metrics").body_mut().read_to_string().expect("metrics body")
    })
    .await
    .expect("join");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().expect("number"))
        })
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// One HTTP request with an optional bearer token and JSON body; returns status and JSON
/// (or `{"text": ...}` when the body is not JSON).
pub async fn http(method: &str, url: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    http_raw(method, url, auth.as_deref(), body.map(|b| b.to_string().into_bytes())).await
}

/// Like [`http`] with a raw `Authorization` header value and raw body bytes.
pub async fn http_raw(method: &str, url: &str, authorization: Option<&str>, body: Option<Vec<u8>>) -> (u16, Value) {
    let (method, url, auth) = (method.to_string(), url.to_string(), authorization.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        let a = agent();
        let mut resp = match (method.as_str(), body) {
            ("GET" | "DELETE", _) => {
                let mut r = if method == "GET" { a.get(&url) } else { a.delete(&url) };
                if let Some(h) = &auth {
                    r = r.header("Authorization", h);
                }
                r.call()
            }
            (m, body) => {
                let mut r = match m {
                    "POST" => a.post(&url),
                    "PATCH" => a.patch(&url),
                    "PUT" => a.put(&url),
                    other => panic!("the test helper does not send {other}"),
                }
                .header("Content-Type", "application/json");
                if let Some(h) = &auth {
                    r = r.header("Authorization", h);
                }
                match body {
                    Some(b) => r.send(&b[..]),
                    None => r.send_empty(),
                }
            }
        }
        .expect("http request");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "text": text }));
        (status, json)
    })
    .await
    .expect("join")
}

/// Polls `f` every 20 ms until it is true or `secs` pass; panics naming `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn telemetry(ts: u64, msg_id: &str, battery: f64) -> Vec<u8> {
    serde_json::json!({"ts": ts, "msg_id": msg_id, "battery": battery, "lat": 37.7, "lon": -122.4, "speed": 1.5, "mode": "mission", "metrics": {"temp": 20.5}})
        .to_string()
        .into_bytes()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An MQTT 3.1.1 client (rumqttc) driven step by step.
pub struct V3 {
    pub client: rumqttc::AsyncClient,
    pub events: rumqttc::EventLoop,
}

impl V3 {
    /// Connects; returns the CONNACK refusal as an error.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<V3, rumqttc::ConnectionError> {
        let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        let (client, mut events) = rumqttc::AsyncClient::new(o, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("connack in time")? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => return Ok(V3 { client, events }),
                _ => continue,
            }
        }
    }

    /// Connects with `o`; returns the client with the CONNACK's session-present flag.
    pub async fn connect_opts(o: rumqttc::MqttOptions) -> (V3, bool) {
        let (client, mut events) = rumqttc::AsyncClient::new(o, 16);
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("connack in time");
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) = ev.expect("connected") {
                return (V3 { client, events }, a.session_present);
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), rumqttc::ConnectionError> {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.expect("request queue");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.poll()).await.expect("puback in time")? {
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => return Ok(()),
                _ => continue,
            }
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while self.events.poll().await.is_ok() {} }).await;
    }

    /// Subscribes at QoS 1 and waits for the SUBACK (publishes that arrive meanwhile are kept).
    pub async fn subscribe(&mut self, topic: &str) -> Vec<(String, Vec<u8>)> {
        self.client.subscribe(topic, rumqttc::QoS::AtLeastOnce).await.expect("request queue");
        let mut early = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.poll())
                .await
                .expect("suback in time")
                .expect("connected")
            {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => return early,
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => early.push((p.topic, p.payload.to_vec())),
                _ => continue,
            }
        }
    }

    /// The next PUBLISH from the server (acknowledged by rumqttc), or `None` after `secs`.
    pub async fn next_publish(&mut self, secs: u64) -> Option<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.poll()).await {
                Err(_) => return None,
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                    return Some((p.topic, p.payload.to_vec()));
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => panic!("connection failed: {e}"),
            }
        }
    }
}

/// An MQTT 5 client (rumqttc::v5) driven step by step.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub events: rumqttc::v5::EventLoop,
}

pub type V5Ack = rumqttc::v5::mqttbytes::v5::PubAck;

impl V5 {
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<V5, rumqttc::v5::ConnectionError> {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1024 * 1024));
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        let (client, mut events) = rumqttc::v5::AsyncClient::new(o, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("connack in time")? {
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_)) => {
                    return Ok(V5 { client, events });
                }
                _ => continue,
            }
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK (with its reason code).
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<V5Ack, rumqttc::v5::ConnectionError> {
        self.client
            .publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload)
            .await
            .expect("request queue");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.poll()).await.expect("puback in time")? {
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(ack)) => return Ok(ack),
                _ => continue,
            }
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while self.events.poll().await.is_ok() {} }).await;
    }
}

/// The orb's history as returned by the API (every page).
pub async fn history(ts: &TestServer, tenant: &str, orb: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = format!("/v1/orbs/{orb}/telemetry?tenant_id={tenant}&limit=500");
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={t}"));
        }
        let (status, body) = ts.get(&path).await;
        assert_eq!(status, 200, "{body}");
        out.extend(body["points"].as_array().expect("points").iter().cloned());
        match body["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => return out,
        }
    }
}

/// The `orbmanager` binary running as a child process.
pub struct Proc {
    pub child: std::process::Child,
    pub http: String,
    pub mqtt: SocketAddr,
}

impl Proc {
    /// Starts `orbmanager serve` on `dir` with port 0 everywhere and waits for readiness.
    pub async fn serve(dir: &std::path::Path, extra: &[&str]) -> Proc {
        let endpoints = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_orbmanager"))
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args([
                "--mqtt-addr",
                "127.0.0.1:0",
                "--mqtts-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("ORBMANAGER_AUTH_ADMIN_TOKEN", ADMIN)
            .env("ORBMANAGER_LOG", std::env::var("OM_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .spawn()
            .expect("spawn orbmanager");
        let mut proc = Proc { child, http: String::new(), mqtt: "0.0.0.0:0".parse().unwrap() };
        wait_until("endpoints.json", 30, || async { endpoints.exists() }).await;
        let e: Value = serde_json::from_str(&std::fs::read_to_string(&endpoints).unwrap()).unwrap();
        proc.http = format!("http://{}", e["http"].as_str().unwrap());
        proc.mqtt = e["mqtt"].as_str().unwrap().parse().unwrap();
        let health = format!("{}/healthz", proc.http);
        wait_until("healthz 200", 30, || {
            let h = health.clone();
            async move { http("GET", &h, None, None).await.0 == 200 }
        })
        .await;
        proc
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(status.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "orbmanager did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Authorization: Basic ...` for `user:pass`.
pub fn basic_auth(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pass}");
    let mut out = String::from("Basic ");
    for chunk in raw.as_bytes().chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= chunk.len() { T[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// One Server-Sent Event as a client sees it.
#[derive(Clone, Debug, Default)]
pub struct SseFrame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Opens an SSE stream (optionally resuming with `Last-Event-ID`) and returns its status and
/// a reader of its frames; dropping the reader closes the connection at the next frame.
pub async fn sse(
    http_base: &str,
    path: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> (u16, tokio::sync::mpsc::Receiver<SseFrame>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut sock = tokio::net::TcpStream::connect(http_base.trim_start_matches("http://")).await.unwrap();
    let resume = last_event_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(sock).lines();
    let status_line = lines.next_line().await.unwrap().unwrap();
    let status: u16 = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Headers end at the first empty line.
    while let Ok(Some(line)) = lines.next_line().await {
        if line.is_empty() {
            break;
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let mut frame = SseFrame::default();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.is_empty() {
                let done = std::mem::take(&mut frame);
                if !done.data.is_empty() && tx.send(done).await.is_err() {
                    return;
                }
            } else if let Some(v) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                frame.data.push_str(v);
            } else if let Some(v) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                frame.id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
                frame.event = Some(v.to_string());
            }
        }
    });
    (status, rx)
}

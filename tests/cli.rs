//! The operator CLI against a real server over gRPC: tables for people, `--json` for scripts,
//! the token from the environment, errors on stderr with a failing exit code.

mod common;

use common::{ADMIN, TestServer};

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn cli(ts: &TestServer, token: &str, args: &[&str]) -> Out {
    let server = format!("http://{}", ts.grpc);
    let (token, args): (String, Vec<String>) = (token.to_string(), args.iter().map(|s| s.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_orbmanager"))
            .args(&args)
            .env("ORBMANAGER_SERVER", server)
            .env("ORBMANAGER_TOKEN", token)
            .env_remove("ORBMANAGER_TENANT")
            .output()
            .expect("run orbmanager");
        Out {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_drive_the_fleet_from_the_command_line() {
    let ts = TestServer::start(false).await;
    let o = cli(&ts, ADMIN, &["tenants", "create", "acme"]).await;
    assert!(o.ok && o.stdout.contains("created tenant acme"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, ADMIN, &["tokens", "create", "--tenant", "acme", "--role", "operator", "--name", "ci", "--json"])
        .await;
    assert!(o.ok, "{}", o.stderr);
    let token: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let op = token["secret"].as_str().unwrap().to_string();

    let o = cli(&ts, &op, &["orbs", "register", "--id", "c1", "--attr", "depot=sf"]).await;
    assert!(o.ok && o.stdout.contains("registered acme/c1") && o.stdout.contains("omd_"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, &op, &["orbs", "get", "c1", "--json"]).await;
    let orb: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((orb["status"].as_str(), orb["attributes"]["depot"].as_str()), (Some("provisioned"), Some("sf")));
    let o = cli(&ts, &op, &["orbs", "tag", "c1", "team=a", "shift=night", "--remove", "depot", "--json"]).await;
    assert!(o.ok, "{}", o.stderr);
    let orb: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(orb["attributes"], serde_json::json!({"team": "a", "shift": "night"}));
    let o = cli(&ts, &op, &["orbs", "tag", "c1", "team=b", "--remove", "team"]).await;
    assert!(!o.ok && o.stderr.contains("both set and removed"), "{}", o.stderr);
    let o = cli(&ts, &op, &["orbs", "versions", "c1"]).await;
    assert!(o.ok && o.stdout.starts_with("AT_MS") && o.stdout.lines().count() == 1, "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, &op, &["orbs", "list"]).await;
    assert!(o.ok);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines[0].starts_with("ORB") && lines[1].starts_with("c1 "), "{}", o.stdout);

    let o =
        cli(&ts, &op, &["commands", "send", "c1", "reboot", "--payload", r#"{"delay":1}"#, "--idempotency-key", "r1"])
            .await;
    assert!(o.ok && o.stdout.contains("reboot") && o.stdout.contains("queued"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, &op, &["commands", "list", "c1", "--status", "pending", "--json"]).await;
    let list: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(list["commands"].as_array().unwrap().len(), 1);
    let o = cli(&ts, &op, &["commands", "send", "c1", "reboot", "--payload", "{nope"]).await;
    assert!(!o.ok && o.stderr.contains("--payload is not JSON"), "{}", o.stderr);
    let o = cli(&ts, &op, &["telemetry", "query", "c1"]).await;
    assert!(o.ok && o.stdout.starts_with("TS"), "{}", o.stdout);

    // `telemetry tail` follows live changes: keep posting until the tail has printed one.
    let server = format!("http://{}", ts.grpc);
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_orbmanager"))
        .args(["telemetry", "tail", "c1", "--count", "1", "--json"])
        .env("ORBMANAGER_SERVER", &server)
        .env("ORBMANAGER_TOKEN", &op)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut n = 0u64;
    let finished = loop {
        n += 1;
        let point = serde_json::json!({"ts": common::now_ms() - 1000 + n, "battery": 33});
        let (s, _) = common::http("POST", &ts.url("/v1/orbs/c1/telemetry"), Some(&op), Some(point)).await;
        assert_eq!(s, 200);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if tail.try_wait().unwrap().is_some() {
            break true;
        }
        if n > 100 {
            break false;
        }
    };
    assert!(finished, "tail printed nothing");
    let out = tail.wait_with_output().unwrap();
    let event: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(
        (event["orb_id"].as_str(), event["kind"].as_str(), event["battery"].as_f64()),
        (Some("c1"), Some("telemetry"), Some(33.0))
    );

    // The event log: the command's status change is there; `tail --after` replays first.
    let o = cli(&ts, &op, &["events", "list", "--types", "orb.command.status"]).await;
    assert!(
        o.ok && o.stdout.contains("orb.command.status") && o.stdout.contains("queued"),
        "{} {}",
        o.stdout,
        o.stderr
    );
    assert!(o.stdout.contains("(next: --after "), "{}", o.stdout);
    let o = cli(&ts, &op, &["events", "tail", "--after", "0", "--count", "1", "--json"]).await;
    let first: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!((first["event_id"].as_str(), first["type"].as_str()), (Some("1"), Some("orb.registered")));
    let o = cli(&ts, &op, &["events", "list", "--types", "orb.bogus"]).await;
    assert!(!o.ok && o.stderr.contains("unknown event type"), "{}", o.stderr);

    // Alerts: a rule fires; the CLI lists, assigns, comments and acknowledges it.
    let rule = serde_json::json!({"name": "low", "condition": "battery < 15", "severity": "major"});
    let (s, _) = common::http("POST", &ts.url("/v1/alerts/rules"), Some(&op), Some(rule)).await;
    assert_eq!(s, 201);
    let point = serde_json::json!({"ts": common::now_ms(), "battery": 5});
    let (s, _) = common::http("POST", &ts.url("/v1/orbs/c1/telemetry"), Some(&op), Some(point)).await;
    assert_eq!(s, 200);
    let mut id = String::new();
    for _ in 0..100 {
        let o = cli(&ts, &op, &["alerts", "list", "--state", "open", "--json"]).await;
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        if let Some(a) = v["alerts"].as_array().and_then(|a| a.first()) {
            id = a["alert_id"].as_str().unwrap().to_string();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!id.is_empty(), "the alert opened");
    let o = cli(&ts, &op, &["alerts", "list"]).await;
    assert!(o.ok && o.stdout.starts_with("ALERT") && o.stdout.contains(&id), "{}", o.stdout);
    let o = cli(&ts, &op, &["alerts", "assign", &id, "ana"]).await;
    assert!(o.ok && o.stdout.contains("ana"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, &op, &["alerts", "comment", &id, "swapping the pack"]).await;
    assert!(o.ok && o.stdout.contains("1 comments"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, &op, &["alerts", "ack", &id]).await;
    assert!(o.ok && o.stdout.contains("acknowledged"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, &op, &["alerts", "ack", &id]).await;
    assert!(!o.ok && o.stderr.contains("only an open alert"), "{}", o.stderr);

    // Bad credentials and another tenant: refused, non-zero exit, the reason on stderr.
    let o = cli(&ts, "oma/acme/0000", &["orbs", "list"]).await;
    assert!(!o.ok && o.stderr.contains("unauthenticated"), "{}", o.stderr);
    let o = cli(&ts, &op, &["orbs", "get", "c1", "--tenant", "globex"]).await;
    assert!(!o.ok && o.stderr.contains("permission_denied"), "{}", o.stderr);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cold_tier_from_the_command_line() {
    let ts = TestServer::start_with(false, |c| {
        c.storage.spill_interval_s = 0;
        c.storage.checkpoint_interval_s = 0;
    })
    .await;
    ts.register("acme", "k1").await;
    let now = common::now_ms();
    // Two minutes inside one hour (spills write one file per hour of device time).
    let hour = (now - 10 * 3_600_000) / 3_600_000 * 3_600_000;
    let pts: Vec<serde_json::Value> =
        (0..120u64).map(|i| serde_json::json!({"ts": hour + 60_000 + i * 1000, "battery": 50})).collect();
    let url = ts.url("/v1/orbs/k1/telemetry?tenant_id=acme");
    assert_eq!(common::http("POST", &url, Some(ADMIN), Some(serde_json::Value::Array(pts))).await.0, 200);

    let o = cli(&ts, ADMIN, &["storage", "spill", "--tenant", "acme", "--hot-window", "1h"]).await;
    assert!(o.ok && o.stdout.contains("spilled 120 points into 1 files"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, ADMIN, &["storage", "checkpoint", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_else(|_| panic!("{} {}", o.stdout, o.stderr));
    assert!(v["path"].as_str().unwrap().starts_with("checkpoints/") && v["entries"].as_u64().unwrap() > 0, "{v}");

    let to = now.to_string();
    let o = cli(
        &ts,
        ADMIN,
        &[
            "exports",
            "create",
            "--tenant",
            "acme",
            "--from",
            "0",
            "--to",
            &to,
            "--format",
            "jsonl",
            "--destination",
            "cli/run1",
            "--json",
        ],
    )
    .await;
    let job: serde_json::Value =
        serde_json::from_str(&o.stdout).unwrap_or_else(|_| panic!("{} {}", o.stdout, o.stderr));
    let id = job["export_id"].as_str().unwrap().to_string();
    let mut done = serde_json::Value::Null;
    for _ in 0..200 {
        let o = cli(&ts, ADMIN, &["exports", "get", &id, "--tenant", "acme", "--json"]).await;
        done = serde_json::from_str(&o.stdout).unwrap();
        if done["status"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!((done["status"].as_str(), done["rows"].as_u64()), (Some("succeeded"), Some(120)), "{done}");
    let o = cli(&ts, ADMIN, &["exports", "list", "--tenant", "acme"]).await;
    assert!(
        o.ok && o.stdout.starts_with("EXPORT") && o.stdout.contains(&id) && o.stdout.contains("succeeded"),
        "{}",
        o.stdout
    );
    let o = cli(&ts, ADMIN, &["exports", "cancel", &id, "--tenant", "acme"]).await;
    assert!(!o.ok && o.stderr.contains("failed_precondition"), "{}", o.stderr);
    let o = cli(
        &ts,
        ADMIN,
        &["exports", "create", "--tenant", "acme", "--from", "0", "--to", "1", "--destination", "../up"],
    )
    .await;
    assert!(!o.ok && o.stderr.contains("destination"), "{}", o.stderr);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_policies_and_certificates_from_the_command_line() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "p1").await;
    let o = cli(
        &ts,
        ADMIN,
        &["tenants", "policy", "--tenant", "acme", "--publish", "fleet/{orb}/#", "--subscribe", "fleet/+/status"],
    )
    .await;
    assert!(o.ok && o.stdout.contains("fleet/{orb}/#"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, ADMIN, &["tenants", "mqtt", "--tenant", "acme", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_else(|_| panic!("{} {}", o.stdout, o.stderr));
    assert_eq!(v["policy"]["subscribe"], serde_json::json!(["fleet/+/status"]), "{v}");
    let o = cli(&ts, ADMIN, &["tenants", "policy", "--tenant", "acme", "--publish", "a/#/b"]).await;
    assert!(!o.ok && o.stderr.contains("a/#/b"), "{}", o.stderr);

    // p1 was registered without a CSR: nothing to revoke; a CSR file gets it a certificate.
    let o = cli(&ts, ADMIN, &["orbs", "revoke-cert", "p1", "--tenant", "acme"]).await;
    assert!(!o.ok && o.stderr.contains("no certificate"), "{}", o.stderr);
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    let path = ts.dir.path().join("p1.csr");
    std::fs::write(&path, csr).unwrap();
    let o = cli(&ts, ADMIN, &["orbs", "renew-cert", "p1", "--tenant", "acme", "--csr", path.to_str().unwrap()]).await;
    assert!(o.ok && o.stdout.starts_with("-----BEGIN CERTIFICATE-----"), "{} {}", o.stdout, o.stderr);
    let o = cli(&ts, ADMIN, &["orbs", "revoke-cert", "p1", "--tenant", "acme", "--json"]).await;
    assert!(o.ok, "{}", o.stderr);
    ts.stop().await;
}

/// The load harness refuses a workload it cannot run, before connecting to anything, with an
/// error naming the flag (and a failing exit code).
#[test]
fn sim_refuses_workloads_it_cannot_run() {
    let cases: &[(&[&str], &str)] = &[
        (&["--orbs", "0"], "--orbs must be at least 1"),
        (&["--qos", "2"], "--qos must be 0 or 1"),
        (&["--protocol", "3"], "--protocol must be 4 (3.1.1) or 5"),
        (&["--commands-per-s", "5"], "--commands-per-s needs --api-grpc"),
        (&["--commands-per-s=-1", "--api-grpc", "127.0.0.1:9"], "--commands-per-s must be >= 0"),
        (&["--commands-per-s", "NaN", "--api-grpc", "127.0.0.1:9"], "--commands-per-s must be >= 0"),
        (&["--gateway-children", "10", "--state-every", "5"], "need direct connections (no --gateway-children)"),
        (&["--warmup-s", "60"], "--warmup-s must be shorter than --duration-s"),
        (
            &["--gateway-children", "10", "--commands-per-s", "1", "--api-grpc", "127.0.0.1:9"],
            "need direct connections (no --gateway-children)",
        ),
    ];
    for (flags, error) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_orbmanager"))
            .args(["sim", "--mqtt", "127.0.0.1:9", "--duration-s", "60"])
            .args(*flags)
            .output()
            .expect("run orbmanager sim");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(error), "{flags:?}: stderr {stderr:?} does not say {error:?}");
        // Refused up front: a run (60 s against nothing) would end with a summary on stdout.
        assert!(o.stdout.is_empty(), "{flags:?}: printed a summary");
    }
}

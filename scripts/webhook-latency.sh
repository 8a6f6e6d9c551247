#!/bin/bash
# Telemetry -> alert -> webhook latency under simulator load (rules/alerts/webhooks issue).
# Starts a dev server and `orbmanager sim` with its built-in webhook receiver (which verifies
# every signature) on this machine, creates one rule and one webhook pointing at the
# receiver, and prints the simulator's summary: telemetry -> webhook latency is the arrival
# time minus the device timestamp of the point that raised the alert.
#   ORBS=10000 DUR=120 WORKLOAD=city COND="metrics.motor_temp_c > 56.0" scripts/webhook-latency.sh
# Workloads: `city` (robots with their own speed; motor_temp_c = 30 + 2 * speed + 0..3 noise,
# so the default condition holds for a few per cent of observations of the fastest robots:
# a steady, desynchronised alert rate) and `synthetic` (values advance with the sequence
# number, the same for every orb: with COND="speed == 5.0 && battery < 75.0 &&
# orb_id.endsWith('7')" a tenth of the fleet fires within the same two seconds: storms).
set -euo pipefail
cd "$(dirname "$0")/.."
# BIN=path runs another build (an A/B against an older commit) and skips the build.
if [ -n "${BIN:-}" ]; then B=$BIN; else cargo build --release --quiet; B=target/release/orbmanager; fi
ORBS=${ORBS:-10000}; DUR=${DUR:-120}; RATE=${RATE:-2000}; WORKLOAD=${WORKLOAD:-city}
COND=${COND:-"metrics.motor_temp_c > 56.0"}
OUT=${OUT:-target/webhook-latency}
SECRET=0123456789abcdef0123
rm -rf "$OUT"; mkdir -p "$OUT/data"
$B serve --dev --data-dir "$OUT/data" --mqtt-addr 127.0.0.1:11883 --http-addr 127.0.0.1:18081 --mqtts-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 \
  > "$OUT/server.log" 2>&1 &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
sleep 2
python3 - "$COND" "$SECRET" <<'PY'
import json, sys, urllib.request
def post(path, body):
    req = urllib.request.Request("http://127.0.0.1:18081" + path, json.dumps(body).encode(), {"content-type": "application/json"})
    print(urllib.request.urlopen(req).read().decode())
post("/v1/alerts/rules", {"name": "bench", "condition": sys.argv[1], "severity": "minor"})
post("/v1/webhooks", {"url": "http://127.0.0.1:18080/hook", "secret": sys.argv[2],
                      "events": ["orb.alert.triggered", "orb.alert.resolved"]})
PY
$B sim --mqtt 127.0.0.1:11883 --orbs "$ORBS" --interval-ms 2000 --payload-bytes 1024 --qos 1 --workload "$WORKLOAD" \
  --duration-s "$DUR" --connect-rate "$RATE" --webhook-listen 127.0.0.1:18080 --webhook-secret "$SECRET" \
  --out "$OUT/sim.json" > "$OUT/sim.txt" 2>&1
curl -s 127.0.0.1:18081/metrics | grep -E "^orbmanager_(alerts|webhook|events)" > "$OUT/metrics.txt"
ps -o rss= -p $SRV | awk '{print "server RSS MiB", $1/1024}' >> "$OUT/metrics.txt"
cat "$OUT/sim.txt" "$OUT/metrics.txt"

#!/bin/bash
# Telemetry -> alert -> webhook latency under simulator load (rules/alerts/webhooks issue).
# Starts a dev server, a webhook receiver (scripts/webhook_receiver.py) and `orbmanager sim`
# on this machine; prints the receiver's latency summary (arrival - the orb's last_seen_ms at
# the server), the server's alert/webhook metrics and the simulator's summary.
#   ORBS=10000 DUR=120 RATE=2000 COND="speed == 5.0 && battery < 75.0 && orb_id.endsWith('7')" \
#     scripts/webhook-latency.sh
# The synthetic workload has speed = (seq % 20) / 2 and battery = 50 + seq % 50, so the default
# condition fires for a tenth of the orbs at seq 10, 50, 70 of every 100 and clears on the next.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
B=target/release/orbmanager
ORBS=${ORBS:-10000}; DUR=${DUR:-120}; RATE=${RATE:-2000}
COND=${COND:-"speed == 5.0 && battery < 75.0 && orb_id.endsWith('7')"}
OUT=${OUT:-target/webhook-latency}
rm -rf "$OUT"; mkdir -p "$OUT/data"
python3 scripts/webhook_receiver.py 18080 > "$OUT/receiver.json" &
RX=$!
$B serve --dev --data-dir "$OUT/data" --mqtt-addr 127.0.0.1:11883 --http-addr 127.0.0.1:18081 --grpc-addr 127.0.0.1:0 \
  > "$OUT/server.log" 2>&1 &
SRV=$!
trap 'kill $RX $SRV 2>/dev/null || true' EXIT
sleep 2
python3 - "$COND" <<'PY'
import json, sys, urllib.request
def post(path, body):
    req = urllib.request.Request("http://127.0.0.1:18081" + path, json.dumps(body).encode(), {"content-type": "application/json"})
    print(urllib.request.urlopen(req).read().decode())
post("/v1/alerts/rules", {"name": "bench", "condition": sys.argv[1], "severity": "minor"})
post("/v1/webhooks", {"url": "http://127.0.0.1:18080/hook", "secret": "0123456789abcdef0123",
                      "events": ["orb.alert.triggered", "orb.alert.resolved"]})
PY
$B sim --mqtt 127.0.0.1:11883 --orbs "$ORBS" --interval-ms 2000 --payload-bytes 1024 --qos 1 \
  --duration-s "$DUR" --connect-rate "$RATE" --out "$OUT/sim.json" > "$OUT/sim.txt" 2>&1
sleep 3
curl -s 127.0.0.1:18081/metrics | grep -E "^orbmanager_(alerts|webhook)" > "$OUT/metrics.txt"
kill $RX; sleep 1
cat "$OUT/receiver.json" "$OUT/metrics.txt" "$OUT/sim.json"

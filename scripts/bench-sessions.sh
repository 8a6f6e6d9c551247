#!/bin/bash
# What broker subscribers cost the ingest path, and the command round trip (MQTT issue /
# bench-harness issue). One release `orbmanager serve --dev`; `orbmanager sim` runs the same
# load (ORBS orbs, 1 KiB QoS 1 every INTERVAL ms, DUR s) four times, one after the other:
#   none        no subscriber
#   clean       a clean-session QoS 1 subscriber to telemetry/# (paho-mqtt, a Python client)
#   persistent  the same with a persistent session (every routed copy fsync'd before the
#               device's PUBACK, deleted on the subscriber's)
#   commands    no subscriber; every 10th message a state report, and CMDS commands a second
#               through the gRPC API, received and acknowledged by the simulated orbs
# A warm-up run first registers the orbs (first contact) so the four runs see the same steady
# state. Server CPU per acknowledged message from /proc utime+stime over each run (connect ramp
# included). Writes $OUT/results.json.
#   scripts/bench-sessions.sh
#   ORBS=2000 INTERVAL=1000 DUR=30 CMDS=100 scripts/bench-sessions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# BIN=path runs another build (an A/B against an older commit) and skips the build; SKIP_BUILD=1
# uses target/release as it is.
if [ -n "${BIN:-}" ]; then B=$BIN; else [ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet; B=target/release/orbmanager; fi
ORBS=${ORBS:-2000}; INTERVAL=${INTERVAL:-1000}; DUR=${DUR:-20}; CMDS=${CMDS:-50}
OUT=${OUT:-target/bench-sessions}
rm -rf "$OUT"; mkdir -p "$OUT/data"
python3 -c "import paho.mqtt" 2>/dev/null || python3 -m pip install --quiet paho-mqtt 2>/dev/null \
  || python3 -m pip install --quiet --break-system-packages paho-mqtt
cat > "$OUT/sub.py" <<'EOF'
# A QoS 1 subscriber to telemetry/# counting what it receives until it is told to stop.
import signal, sys, time, paho.mqtt.client as mqtt
host, port, cid, clean = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "clean"
n, stop = 0, False
def on_msg(c, u, m):
    global n
    n += 1
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311, clean_session=clean)
c.on_message = on_msg
c.max_inflight_messages_set(100)
c.connect(host, port, 60)
c.subscribe("telemetry/#", qos=1)
c.loop_start()
while not stop:
    time.sleep(0.1)
c.loop_stop()
c.disconnect()
print(n)
EOF

"$B" serve --dev --data-dir "$OUT/data" --mqtt-addr 127.0.0.1:0 --mqtts-addr "" --http-addr 127.0.0.1:0 \
  --grpc-addr 127.0.0.1:0 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$OUT/data/endpoints.json" ] && break; sleep 0.1; done
ep() { python3 -c "import json;print(json.load(open('$OUT/data/endpoints.json'))['$1'])"; }
MQTT=$(ep mqtt); GRPC=$(ep grpc)
HOST=${MQTT%:*}; PORT=${MQTT##*:}
ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }
HZ=$(getconf CLK_TCK)

run() { # name, extra sim args...
  local name=$1; shift
  local sub=""
  case $name in
    clean|persistent) python3 "$OUT/sub.py" "$HOST" "$PORT" "sub-$name" "$name" > "$OUT/$name.sub" & sub=$!; sleep 1 ;;
  esac
  local t0; t0=$(ticks)
  "$B" sim --mqtt "$MQTT" --orbs "$ORBS" --interval-ms "$INTERVAL" --payload-bytes 1024 --qos 1 \
    --duration-s "$DUR" --prefix bench- --connect-rate 2000 --out "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1
  local t1; t1=$(ticks)
  if [ -n "$sub" ]; then sleep 2; kill -TERM $sub; wait $sub || true; fi
  echo "$name $((t1 - t0))" >> "$OUT/cpu.txt"
}
# The same orbs every time: the warm-up registers them (first contact) and brings their actors
# in, so each measured run is the steady state.
run warmup
run none
run clean
run persistent
run commands --state-every 10 --commands-per-s "$CMDS" --api-grpc "$GRPC"

python3 - "$OUT" "$HZ" <<'EOF'
import json, os, sys
out, hz = sys.argv[1], int(sys.argv[2])
cpu = dict((l.split()[0], int(l.split()[1])) for l in open(f"{out}/cpu.txt"))
res = {}
for name in ["none", "clean", "persistent", "commands"]:
    s = json.load(open(f"{out}/{name}.json"))
    acked = max(s["acked"], 1)
    r = {
        "acked_rate": round(s["acked_rate"]), "acked": s["acked"], "unacked": s["unacked"], "errors": s["errors"],
        "puback_ms": {k: s["puback_latency_ms"][k] for k in ("p50", "p95", "p99")},
        "server_cpu_us_per_msg": round(cpu[name] / hz * 1e6 / acked, 1),
    }
    sub = f"{out}/{name}.sub"
    if os.path.exists(sub):
        r["subscriber_received"] = int(open(sub).read().strip() or 0)
    if s.get("commands"):
        c = s["commands"]
        r["commands"] = {k: c[k] for k in ("created", "create_failures", "delivered", "acked")}
        r["command_delivery_ms"] = {k: c["delivery_ms"][k] for k in ("p50", "p95", "p99")}
        r["command_round_trip_ms"] = {k: c["round_trip_ms"][k] for k in ("p50", "p95", "p99")}
        r["state_reports"] = s["state_reports"]
    res[name] = r
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
print(json.dumps(res, indent=1))
EOF

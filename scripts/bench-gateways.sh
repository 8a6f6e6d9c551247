#!/bin/bash
# Memory for many active orbs through edge gateways (bench-harness issue): `orbmanager serve
# --dev` (release) and `orbmanager sim --gateway-children`, which connects ORBS orbs through
# ORBS/CHILDREN gateway connections (each child admitted by its own actor, registered on first
# contact under its gateway) and publishes 1 KiB QoS 1 telemetry for each every INTERVAL ms.
# Samples the server's RSS every second; writes $OUT/results.json and prints a summary.
#   scripts/bench-gateways.sh                                   # 500,000 orbs, 50 gateways
#   ORBS=100000 CHILDREN=10000 INTERVAL=20000 DUR=30 scripts/bench-gateways.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# BIN=path runs another build (an A/B against an older commit) and skips the build.
if [ -n "${BIN:-}" ]; then B=$BIN; else cargo build --release --quiet; B=target/release/orbmanager; fi
ORBS=${ORBS:-500000}; CHILDREN=${CHILDREN:-10000}; INTERVAL=${INTERVAL:-60000}; DUR=${DUR:-60}
# Publishing starts ORBS / CONNECT_RATE seconds in (the children's admissions take about that).
CONNECT_RATE=${CONNECT_RATE:-8000}
OUT=${OUT:-target/bench-gateways}
rm -rf "$OUT"; mkdir -p "$OUT/data"
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

"$B" serve --dev --data-dir "$OUT/data" --mqtt-addr 127.0.0.1:0 --mqtts-addr "" --http-addr 127.0.0.1:0 \
  --grpc-addr 127.0.0.1:0 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$OUT/data/endpoints.json" ] && break; sleep 0.1; done
MQTT=$(python3 -c "import json;print(json.load(open('$OUT/data/endpoints.json'))['mqtt'])")
HTTP=$(python3 -c "import json;print(json.load(open('$OUT/data/endpoints.json'))['http'])")
sleep 1
BASE=$(rss_kb $SERVER)

"$B" sim --mqtt "$MQTT" --orbs "$ORBS" --gateway-children "$CHILDREN" --interval-ms "$INTERVAL" \
  --payload-bytes 1024 --qos 1 --duration-s "$DUR" --protocol 5 --connect-rate "$CONNECT_RATE" --out "$OUT/sim.json" > "$OUT/sim.txt" 2>&1 &
SIM=$!
PEAK=0; ONLINE_RSS=0
while kill -0 $SIM 2>/dev/null; do
  R=$(rss_kb $SERVER); [ "$R" -gt "$PEAK" ] && PEAK=$R
  sleep 1
done
wait $SIM || true
LIVE=$(curl -s "http://$HTTP/metrics" | awk '/^orbmanager_live_actors / {print $2}')
python3 - "$OUT" "$ORBS" "$CHILDREN" "$INTERVAL" "$BASE" "$PEAK" "$LIVE" <<'EOF'
import json, sys
out, orbs, children, interval, base, peak, live = sys.argv[1:]
orbs, base, peak = int(orbs), int(base), int(peak)
sim = json.load(open(f"{out}/sim.json"))
r = {
    "orbs": orbs, "gateway_children": int(children), "interval_ms": int(interval),
    "connected": sim["connected"], "connect_failures": sim["connect_failures"],
    "acked_rate": round(sim["acked_rate"]), "puback_ms": sim["puback_latency_ms"],
    "rss_base_mib": round(base / 1024), "rss_peak_mib": round(peak / 1024),
    "rss_per_orb_bytes": round((peak - base) * 1024 / max(orbs, 1)),
    "live_actors_after": live,
}
json.dump(r, open(f"{out}/results.json", "w"), indent=1)
print(json.dumps(r, indent=1))
EOF

#!/bin/bash
# The headline comparison (bench-harness issue): the same open-loop MQTT workload against
# Debian's mosquitto (in-memory, QoS 1) and against `orbmanager serve --dev` (QoS 1 acknowledged
# only after an fsync'd commit), one after the other in the same session on this machine, with
# the load generator (`orbmanager sim`) on the same cores. Writes $OUT/results.json and prints a
# table: acked rate, PUBACK latency, broker CPU per acknowledged message (over the whole run and
# in the steady state after the connection ramp) and RSS; and where OrbManager's steady-state CPU
# goes, per message, by thread group (MQTT workers, group commit, actors, LSM workers), and the
# peak of the telemetry keyspace's write backlog (L0 tables and runs, sealed memtables) and blob
# files during the run, sampled every second, and the data directory's size at the end.
#   scripts/bench-vs-mosquitto.sh                       # both scenarios, 30 s each
#   SCENARIOS=saturation DUR=20 scripts/bench-vs-mosquitto.sh
#   SCENARIOS=saturation DUR=300 scripts/bench-vs-mosquitto.sh   # sustained: compaction catches up
#   SERVER_ENV="TOKIO_WORKER_THREADS=1" SCENARIOS=devices scripts/bench-vs-mosquitto.sh
# SERVER_ENV: NAME=value words set for the OrbManager server only (not the simulator, not
# mosquitto), e.g. ORBMANAGER_* configuration overrides, for an A/B of a setting; it is
# recorded in results.json.
# Scenarios: `saturation` (1,000 connections x 1 KiB every 10 ms: 100K msg/s offered, more than
# either broker takes here) and `devices` (15,000 connections x 1 KiB every 2 s: 7.5K msg/s).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt-get update -qq && apt-get install -y -qq mosquitto
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
SERVER_ENV=${SERVER_ENV:-}
# Checked before anything is built or started.
read -r -a server_env <<< "$SERVER_ENV"
for kv in "${server_env[@]}"; do
  if ! [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*$ ]]; then
    echo "SERVER_ENV: '$kv' is not NAME=value (words are separated by spaces; a value has none)" >&2
    exit 2
  fi
done
# BIN=path runs another build (an A/B against an older commit) and skips the build.
if [ -n "${BIN:-}" ]; then B=$BIN; else cargo build --release --quiet; B=target/release/orbmanager; fi
DUR=${DUR:-30}; BYTES=${BYTES:-1024}; SCENARIOS=${SCENARIOS:-"saturation devices"}
OUT=${OUT:-target/bench-vs-mosquitto}
rm -rf "$OUT"; mkdir -p "$OUT"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, in clock ticks
# thread_ticks PID: utime + stime of each thread group of the process, as JSON (OrbManager's
# threads are named: MQTT workers, the group-commit thread, the actor runtime, the LSM workers).
# A group whose threads ended during the window can shrink; that counts as 0.
thread_ticks() {
  python3 - "$1" <<'PY'
import json, os, sys
pid, groups = sys.argv[1], {}
for t in os.listdir(f"/proc/{pid}/task"):
    try:
        s = open(f"/proc/{pid}/task/{t}/stat").read()
    except OSError:
        continue  # the thread ended
    comm, f = s[s.index("(") + 1:s.rindex(")")], s[s.rindex(")") + 2:].split()
    g = ("mqtt" if "mqtt" in comm else "commit" if comm == "orb-commit" else "actors" if comm == "orb-rt"
         else "lsm" if comm.startswith("fjall") else comm if comm == "mosquitto" else "other")
    groups[g] = groups.get(g, 0) + int(f[11]) + int(f[12])
print(json.dumps(groups))
PY
}
HZ=$(getconf CLK_TCK)
MQ=""; OM=""; SAMPLER=""
# If a step fails (set -e), stop what is still running.
trap 'kill $MQ $OM $SAMPLER 2>/dev/null || true' EXIT

# run_one NAME SCENARIO ADDR PID SIM_FLAGS...: runs the simulator, records the broker's CPU and RSS.
run_one() {
  local name=$1 scenario=$2 addr=$3 pid=$4; shift 4
  local orbs interval
  case $scenario in
    saturation) orbs=1000; interval=10 ;;
    devices) orbs=15000; interval=2000 ;;
  esac
  local ramp=$(( (orbs + 2999) / 3000 ))
  local t0; t0=$(ticks "$pid")
  "$B" sim --mqtt "$addr" --orbs "$orbs" --interval-ms "$interval" --payload-bytes "$BYTES" --qos 1 \
    --duration-s "$DUR" --connect-rate 3000 "$@" --out "$OUT/$scenario-$name.json" > "$OUT/$scenario-$name.txt" 2>&1 &
  local sim=$!
  # Steady state: from 3 s after the connection ramp to the end of the run.
  sleep $(( ramp + 3 ))
  local ts; ts=$(ticks "$pid")
  local gs; gs=$(thread_ticks "$pid")
  wait $sim
  local t1; t1=$(ticks "$pid")
  local g1; g1=$(thread_ticks "$pid")
  local rss; rss=$(ps -o rss= -p "$pid" | tr -d ' ')
  python3 -c "import json; a, b = $gs, $g1; print(json.dumps({'cpu_s': ($t1 - $t0) / $HZ, 'steady_cpu_s': ($t1 - $ts) / $HZ, 'steady_s': $DUR - 3, 'rss_kib': $rss,
    'steady_cpu_s_by_thread': {k: max(v - a.get(k, 0), 0) / $HZ for k, v in b.items()}}))" \
    > "$OUT/$scenario-$name.proc.json"
}

for scenario in $SCENARIOS; do
  cat > "$OUT/mosquitto.conf" <<CONF
listener 21883 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
max_inflight_messages 64
CONF
  "$MOSQUITTO" -c "$OUT/mosquitto.conf" > "$OUT/mosquitto.log" 2>&1 &
  MQ=$!
  sleep 1
  run_one mosquitto "$scenario" 127.0.0.1:21883 "$MQ" --anonymous
  kill "$MQ"; wait "$MQ" 2>/dev/null || true; MQ=""

  rm -rf "$OUT/data"
  env "${server_env[@]}" "$B" serve --dev --data-dir "$OUT/data" --mqtt-addr 127.0.0.1:21884 --http-addr 127.0.0.1:0 --mqtts-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 \
    > "$OUT/orbmanager.log" 2>&1 &
  OM=$!
  sleep 2
  # The telemetry keyspace's write backlog, scraped every second until the server stops: its
  # peaks go into the results (long runs show compaction falling behind). Errors are counted,
  # not fatal; the sampler's own errors go to $OUT/$scenario-backlog.err.
  python3 - "$OUT/data/endpoints.json" "$OM" > "$OUT/$scenario-backlog.json" 2> "$OUT/$scenario-backlog.err" <<'PY' &
import json, os, sys, time, urllib.request
path, pid = sys.argv[1], int(sys.argv[2])
peak, samples, errors = {}, 0, 0
def alive():
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
for _ in range(100):
    if os.path.exists(path) or not alive():
        break
    time.sleep(0.1)
try:
    http = json.load(open(path))["http"]
except (OSError, ValueError, KeyError) as e:
    print(f"no endpoints: {e}", file=sys.stderr)
    http = None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
while http and alive():
    try:
        text = opener.open(f"http://{http}/metrics", timeout=2).read().decode()
        for line in text.splitlines():
            if line.startswith("orbmanager_storage_telemetry_"):
                name, value = line.rsplit(None, 1)
                name = name.removeprefix("orbmanager_storage_telemetry_")
                peak[name] = max(peak.get(name, 0), float(value))
        samples += 1
    except Exception as e:
        errors += 1
        print(f"scrape: {e}", file=sys.stderr)
    time.sleep(1)
print(json.dumps({"samples": samples, "errors": errors, "peak": peak}))
PY
  SAMPLER=$!
  run_one orbmanager "$scenario" 127.0.0.1:21884 "$OM"
  kill -TERM "$OM"; wait "$OM" 2>/dev/null || true; OM=""
  wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
  du -sb "$OUT/data" | cut -f1 > "$OUT/$scenario-data-bytes.txt"
done

python3 - "$OUT" "$SERVER_ENV" $SCENARIOS <<'PY'
import json, sys
out, server_env, scenarios = sys.argv[1], sys.argv[2], sys.argv[3:]
results = {"server_env": server_env.split()}
if results["server_env"]:
    print(f"OrbManager server run with: {server_env}")
print(f"{'scenario':<11} {'broker':<11} {'acked/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'CPU us/msg':>10} {'steady':>7} {'RSS MiB':>8}")
for sc in scenarios:
    results[sc] = {}
    for b in ("mosquitto", "orbmanager"):
        sim = json.load(open(f"{out}/{sc}-{b}.json"))
        proc = json.load(open(f"{out}/{sc}-{b}.proc.json"))
        acked = max(sim["acked"], 1)
        # Messages acknowledged in the steady window (once every connection is up): acked rate x its length.
        steady_msgs = max(sim["acked_rate"] * proc["steady_s"], 1)
        row = {"acked_rate": sim["acked_rate"], "acked": sim["acked"], "sent": sim["sent"], "scheduled": sim["scheduled"],
               "errors": sim["errors"], "unacked": sim["unacked"], "puback_latency_ms": sim["puback_latency_ms"],
               "cpu_s": proc["cpu_s"], "cpu_us_per_msg": proc["cpu_s"] * 1e6 / acked,
               "steady_cpu_us_per_msg": proc["steady_cpu_s"] * 1e6 / steady_msgs,
               "rss_mib": proc["rss_kib"] / 1024}
        row["steady_cpu_us_per_msg_by_thread"] = {k: v * 1e6 / steady_msgs for k, v in proc["steady_cpu_s_by_thread"].items()}
        results[sc][b] = row
        l = row["puback_latency_ms"]
        print(f"{sc:<11} {b:<11} {row['acked_rate']:>9.0f} {l['p50']:>8.2f} {l['p95']:>8.2f} {l['p99']:>8.2f} {row['cpu_us_per_msg']:>10.1f} {row['steady_cpu_us_per_msg']:>7.1f} {row['rss_mib']:>8.0f}")
    m, o = results[sc]["mosquitto"], results[sc]["orbmanager"]
    by = o["steady_cpu_us_per_msg_by_thread"]
    print(f"{sc:<11} orbmanager steady CPU us/msg by thread: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])))
    try:
        bl = json.load(open(f"{out}/{sc}-backlog.json"))
    except (OSError, ValueError):
        bl = {"samples": 0, "errors": 0, "peak": {}}
    o["telemetry_backlog"] = bl
    o["data_dir_bytes"] = int(open(f"{out}/{sc}-data-bytes.txt").read())
    pk = bl["peak"]
    if bl["samples"]:
        print(f"{sc:<11} orbmanager telemetry keyspace peak (sampled every 1 s, {bl['samples']} samples, {bl['errors']} errors): "
              + ", ".join(f"{k.replace('_', ' ')} {pk[k]:.0f}" for k in ("l0_tables", "l0_runs", "sealed_memtables", "blob_files", "blob_stale_bytes") if k in pk)
              + f"; data directory at the end {o['data_dir_bytes'] / 1e9:.2f} GB")
    else:
        print(f"{sc:<11} orbmanager telemetry keyspace peak: n/a (no sample; see {out}/{sc}-backlog.err)")
    results[sc]["ratios"] = {"throughput_orbmanager_over_mosquitto": o["acked_rate"] / max(m["acked_rate"], 1e-9),
                             "cpu_per_msg_orbmanager_over_mosquitto": o["cpu_us_per_msg"] / max(m["cpu_us_per_msg"], 1e-9),
                             "steady_cpu_per_msg_orbmanager_over_mosquitto": o["steady_cpu_us_per_msg"] / max(m["steady_cpu_us_per_msg"], 1e-9)}
    r = results[sc]["ratios"]
    print(f"{sc:<11} ratio orbmanager/mosquitto: throughput {r['throughput_orbmanager_over_mosquitto']:.2f}x, "
          f"CPU per message {r['cpu_per_msg_orbmanager_over_mosquitto']:.2f}x (steady state {r['steady_cpu_per_msg_orbmanager_over_mosquitto']:.2f}x)")
json.dump(results, open(f"{out}/results.json", "w"), indent=2)
print(f"results: {out}/results.json")
PY

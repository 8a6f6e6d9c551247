import json, sys, time, threading, signal
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
lat = []; lock = threading.Lock(); kinds = {}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); body = self.rfile.read(n)
        now = time.time() * 1000
        ev = json.loads(body)
        with lock:
            kinds[ev["type"]] = kinds.get(ev["type"], 0) + 1
            if ev["type"] == "orb.alert.triggered":
                seen = ev["data"]["values"].get("last_seen_ms")
                if seen: lat.append(now - seen)
        self.send_response(204); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
class Srv(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
srv = Srv(("127.0.0.1", int(sys.argv[1])), H)
def report(*_):
    with lock:
        l = sorted(lat)
        q = lambda p: l[min(len(l)-1, int(p*len(l)))] if l else None
        print(json.dumps({"events": kinds, "triggered_latency_ms": {"n": len(l), "p50": q(.5), "p95": q(.95), "p99": q(.99), "max": l[-1] if l else None}}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report); signal.signal(signal.SIGINT, report)
srv.serve_forever()

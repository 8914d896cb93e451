#!/usr/bin/env python3
"""What an open circuit costs: latency of requests whose primary model is down (its
circuit open, so it is skipped and the fallback serves) against healthy requests
served by the same fallback model directly, measured interleaved in one run.

Usage: python3 loadtest/open_circuit_bench.py [--bin target/release/llm-gateway] [-n 1000]
"""
import argparse, hashlib, http.client, json, os, socket, statistics, subprocess, sys, tempfile, time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def post(conn, key, body):
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    r = conn.getresponse()
    data = r.read()
    return time.perf_counter() - t0, r.status, r.getheader("x-gateway-model"), data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=1000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="circuit-bench-")
    mock = subprocess.Popen([a.bin, "mock-provider", "--listen", "127.0.0.1:0", "--tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    mport = int(mock.stdout.readline().strip().rsplit(":", 1)[1])
    dead, gport, aport = free_port(), free_port(), free_port()  # nothing listens on `dead`
    h = lambda k: hashlib.sha256(k.encode()).hexdigest()
    cfg = f"""
node: {{ region: r1 }}
listen: {{ http: 127.0.0.1:{gport} }}
admin: {{ listen: 127.0.0.1:{aport} }}
audit: {{ spool_dir: {tmp}/spool }}
providers:
  down: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{dead}", region: r1 }}
  up: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{mport}", region: r1 }}
models:
  primary: {{ provider: down, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
  backup: {{ provider: up, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
tenants:
  outage:
    api_keys: [ {{ id: k1, sha256: "{h('sk-outage')}" }} ]
    models: [primary, backup]
    fallback: [backup]
  healthy:
    api_keys: [ {{ id: k2, sha256: "{h('sk-healthy')}" }} ]
    models: [backup]
"""
    open(f"{tmp}/gw.yaml", "w").write(cfg)
    env = dict(os.environ, RUST_LOG="error", LLM_GATEWAY_PID_FILE=f"{tmp}/pid", LLM_GATEWAY_UPGRADE_SOCK=f"{tmp}/sock")
    gw = subprocess.Popen([a.bin, "serve", "--config", f"{tmp}/gw.yaml"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", aport, timeout=1); c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit("gateway did not become ready")
            time.sleep(0.05)
        body = json.dumps({"messages": [{"role": "user", "content": "bench"}]})
        conns = {k: http.client.HTTPConnection("127.0.0.1", gport, timeout=10) for k in ("sk-outage", "sk-healthy")}
        for _ in range(10):  # opens the primary's circuit (5 refused connections) and warms up
            for k, c in conns.items():
                post(c, k, body)
        res = {k: [] for k in conns}
        for _ in range(a.n):
            for k, c in conns.items():
                dt, status, model, _ = post(c, k, body)
                assert status == 200 and model == "backup", (k, status, model)
                res[k].append(dt * 1000)
        print(f"{a.n} non-streaming requests per tenant, keep-alive, interleaved; primary refuses connections")
        for k, xs in res.items():
            print(f"  {k:11s} p50 {statistics.median(xs):7.3f} ms  p99 {pct(xs, 0.99):7.3f} ms")
        o, hh = res["sk-outage"], res["sk-healthy"]
        print(f"  open circuit adds: p50 {statistics.median(o)-statistics.median(hh):+.3f} ms, p99 {pct(o,0.99)-pct(hh,0.99):+.3f} ms (ratio p99 {pct(o,0.99)/pct(hh,0.99):.3f})")
        print("  (the circuit re-probes the dead primary every 5-60 s; those probes are in the figures)")
    finally:
        gw.terminate(); mock.terminate()
        try:
            gw.wait(5)
        except subprocess.TimeoutExpired:
            gw.kill()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What an open circuit costs: latency of requests whose primary model is down (its
circuit open, so it is skipped and the fallback serves) against healthy requests
served by the same fallback model directly, measured interleaved in one run.

Usage: python3 loadtest/open_circuit_bench.py [--bin target/release/llm-gateway] [-n 1000]
"""
import argparse, http.client, json, statistics, time

from benchlib import Stack, free_port, pct, sha256


def post(conn, key, body):
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    r = conn.getresponse()
    data = r.read()
    return time.perf_counter() - t0, r.status, r.getheader("x-gateway-model"), data


def config(mock_port):
    dead = free_port()  # nothing listens there
    return f"""providers:
  down: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{dead}", region: r1 }}
  up: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{mock_port}", region: r1 }}
models:
  primary: {{ provider: down, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
  backup: {{ provider: up, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
tenants:
  outage:
    api_keys: [ {{ id: k1, sha256: "{sha256('sk-outage')}" }} ]
    models: [primary, backup]
    fallback: [backup]
  healthy:
    api_keys: [ {{ id: k2, sha256: "{sha256('sk-healthy')}" }} ]
    models: [backup]
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=1000)
    a = ap.parse_args()
    with Stack(a.bin, ["--tokens", "8"], config) as st:
        gport = st.port
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


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Noisy neighbour: tenant B's latency alone, then while tenant A floods the gateway at
20x its rps limit, measured in one run against the same gateway and mock.

Usage: python3 loadtest/noisy_neighbour.py [--bin target/release/llm-gateway]
       [--seconds 10] [--b-rate 20] [--a-rps 20] [--flood-x 20] [--flooders 4] [--redis]

B sends non-streamed requests at a fixed rate (one keep-alive connection, paced, the
latency of each measured). A's limit is `--a-rps` requests a second; its flood is
`--flood-x` times that, spread over `--flooders` processes (separate processes, so the
flooders' interpreter does not slow B's client down), each on keep-alive connections.
Reported: B's p50/p99 in both phases and their ratio, A's attempted and achieved rate,
its refusal rate, and the gateway's CPU time per refused request against its CPU time
per served request (from /proc/PID/stat, baseline = the B-alone phase). With
`--redis` the counters live in a private `redis-server` (started on a free port).
"""
import argparse, http.client, json, multiprocessing, os, socket, statistics, subprocess, tempfile, time

from benchlib import Stack, free_port, pct, sha256

TICK = os.sysconf("SC_CLK_TCK")


def config(a_rps, counters):
    def body(mock_port):
        return f"""providers:
  p1: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{mock_port}", region: r1 }}
models:
  m1: {{ provider: p1, price: {{ input_per_mtok: 1, output_per_mtok: 2 }}, max_output_tokens: 64 }}
tenants:
  tenant-a:
    api_keys: [ {{ id: ka, sha256: "{sha256('sk-a')}" }} ]
    models: [m1]
    rate: {{ rps: {a_rps}, concurrency: 8 }}
  tenant-b:
    api_keys: [ {{ id: kb, sha256: "{sha256('sk-b')}" }} ]
    models: [m1]
    rate: {{ rps: 1000 }}
counters: {counters}
"""
    return body


def start_redis():
    port, d = free_port(), tempfile.mkdtemp(prefix="llmgw-bench-redis-")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:  # readiness: PING answered
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(7) == b"+PONG\r\n":
                    return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise SystemExit("redis-server did not start")


BODY = json.dumps({"model": "m1", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "[[mock: tokens=8]] noisy neighbour bench"}]})


def headers(key):
    return {"content-type": "application/json", "authorization": f"Bearer {key}"}


def post(conn, key):
    conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers(key))
    r = conn.getresponse()
    r.read()
    return r.status, r.getheader("connection", "")


def gateway_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def flooder(port, rate, seconds, out):
    """Sends `rate` requests a second as tenant A for `seconds`; counts statuses."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    counts, sent = {}, 0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        if now >= seconds:
            break
        due = sent / rate
        if now < due:
            time.sleep(due - now)
        try:
            status, connection = post(conn, "sk-a")
        except (OSError, http.client.HTTPException):
            status, connection = "error", "close"
        counts[status] = counts.get(status, 0) + 1
        if connection.lower() == "close" or status == "error":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        sent += 1
    out.put(counts)


def tenant_b(port, rate, seconds):
    """B's latencies (ms) at a fixed rate on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    lat = []
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        due = t0 + n / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        s = time.perf_counter()
        status, _ = post(conn, "sk-b")
        lat.append((time.perf_counter() - s) * 1000)
        assert status == 200, status
        n += 1
    return lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--b-rate", type=float, default=20)
    ap.add_argument("--a-rps", type=int, default=20)
    ap.add_argument("--flood-x", type=float, default=20)
    ap.add_argument("--flooders", type=int, default=4)
    ap.add_argument("--redis", action="store_true", help="counters in a private redis-server")
    a = ap.parse_args()
    redis, counters = None, "{ backend: memory }"
    if a.redis:
        redis, port = start_redis()
        counters = f"{{ backend: redis, url: 'redis://127.0.0.1:{port}/', on_error: fail_closed }}"
    try:
        run(a, counters)
    finally:
        if redis:
            redis.terminate()


def run(a, counters):
    with Stack(a.bin, ["--tokens", "8"], config(a.a_rps, counters)) as st:
        pid = st.gw.pid
        tenant_b(st.port, a.b_rate, 1)  # warm-up
        c0 = gateway_cpu_s(pid)
        alone = tenant_b(st.port, a.b_rate, a.seconds)
        c1 = gateway_cpu_s(pid)

        q = multiprocessing.Queue()
        rate = a.a_rps * a.flood_x
        procs = [multiprocessing.Process(target=flooder, args=(st.port, rate / a.flooders, a.seconds, q))
                 for _ in range(a.flooders)]
        for p in procs:
            p.start()
        c2 = gateway_cpu_s(pid)
        flooded = tenant_b(st.port, a.b_rate, a.seconds)
        counts = {}
        for _ in procs:
            for k, v in q.get().items():
                counts[k] = counts.get(k, 0) + v
        for p in procs:
            p.join()
        c3 = gateway_cpu_s(pid)

    total = sum(counts.values())
    refused = counts.get(429, 0)
    served_a = counts.get(200, 0)
    cpu_per_b = (c1 - c0) / len(alone)
    # Phase 2's CPU beyond what B's and A's served requests cost (at phase 1's rate).
    cpu_refusals = (c3 - c2) - cpu_per_b * (len(flooded) + served_a)
    print(f"counters: {counters}")
    print(f"tenant B: {a.b_rate:g} req/s, {a.seconds:g} s per phase, non-streamed, 8 tokens from the mock")
    print(f"  alone         p50 {statistics.median(alone):7.2f} ms  p99 {pct(alone, 0.99):7.2f} ms  (n={len(alone)})")
    print(f"  A flooding    p50 {statistics.median(flooded):7.2f} ms  p99 {pct(flooded, 0.99):7.2f} ms  (n={len(flooded)})")
    print(f"  ratio flooded/alone: p50 {statistics.median(flooded) / statistics.median(alone):.2f}, "
          f"p99 {pct(flooded, 0.99) / pct(alone, 0.99):.2f}")
    print(f"tenant A: limit {a.a_rps} rps, flood aimed at {rate:g} req/s ({a.flood_x:g}x) from {a.flooders} processes")
    print(f"  sent {total} in {a.seconds:g} s = {total / a.seconds:.0f} req/s ({total / a.seconds / a.a_rps:.1f}x its limit); "
          f"statuses {dict(sorted(counts.items(), key=str))}; refused {refused / max(total, 1):.1%}")
    if refused:
        print(f"  gateway CPU: {cpu_per_b * 1e6:.0f} us per served request (B alone), "
              f"~{max(cpu_refusals, 0) / refused * 1e6:.0f} us per refused request "
              f"(ratio {max(cpu_refusals, 0) / refused / cpu_per_b:.2f})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The audit log's cost and speed, against a private ClickHouse (Debian's 18.16,
started by tests/e2e/chserver.py on free loopback ports in a temp dir):

1. Added request latency: one gateway with audit rows shipped to ClickHouse
   (`flush_ms: 200`, so shipping runs during the measurement) against one writing the
   spool only, requests interleaved on keep-alive connections in one run.
2. Rows shipped per second: a spool of `--rows` rows (as a crash or an outage leaves
   it) shipped by a gateway started on it, from start until ClickHouse acknowledged the
   last row, against a direct bulk load of the same file into the same table shape
   (one HTTP `INSERT ... FORMAT JSONEachRow`), the fastest path ClickHouse offers for it.

Usage: python3 loadtest/audit_bench.py [--bin target/release/llm-gateway] [-n 1000] [--rows 200000]
"""
import argparse, http.client, json, os, re, statistics, sys, tempfile, time
from pathlib import Path

from benchlib import Stack, pct, sha256

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from chserver import ClickHouse  # noqa: E402


def config(mock_port):
    return f"""providers:
  up: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{mock_port}", region: r1 }}
models:
  m: {{ provider: up, price: {{ input_per_mtok: 0.15, output_per_mtok: 0.60 }} }}
tenants:
  bench:
    api_keys: [ {{ id: k1, sha256: "{sha256('sk-bench')}" }} ]
    models: [m]
"""


def clickhouse_section(url, db, batch_rows, flush_ms):
    return (f"  clickhouse: {{ url: \"{url}\", database: {db}, table: llm_audit, "
            f"batch_rows: {batch_rows}, flush_ms: {flush_ms} }}\n")


def post(conn, body):
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"content-type": "application/json", "authorization": "Bearer sk-bench"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    return (time.perf_counter() - t0) * 1000


def metric(admin_port, name):
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def latency(binary, ch, n):
    body = json.dumps({"messages": [{"role": "user", "content": "bench"}]})
    with Stack(binary, ["--tokens", "8"], config) as plain, \
            Stack(binary, ["--tokens", "8"], config,
                  audit_extra=clickhouse_section(ch.url, "bench_latency", 5000, 200)) as shipped:
        conns = {"spool only": http.client.HTTPConnection("127.0.0.1", plain.port, timeout=10),
                 "to ClickHouse": http.client.HTTPConnection("127.0.0.1", shipped.port, timeout=10)}
        for _ in range(50):  # warm-up
            for c in conns.values():
                post(c, body)
        res = {k: [] for k in conns}
        for _ in range(n):
            for k, c in conns.items():
                res[k].append(post(c, body))
        deadline = time.time() + 30
        while metric(shipped.admin_port, "llmgw_audit_rows_shipped_total") < n + 50 and time.time() < deadline:
            time.sleep(0.1)
        shipped_rows = metric(shipped.admin_port, "llmgw_audit_rows_shipped_total")
    print(f"1. added latency: {n} non-streaming requests per gateway, keep-alive, interleaved "
          f"({int(shipped_rows)} rows shipped to ClickHouse meanwhile)")
    base = res["spool only"]
    for k, xs in res.items():
        print(f"   {k:14} p50 {pct(xs, .5):6.2f} ms  p99 {pct(xs, .99):6.2f} ms  mean {statistics.mean(xs):6.2f} ms")
    print(f"   ratio to ClickHouse / spool only: p50 {pct(res['to ClickHouse'], .5) / pct(base, .5):.3f}  "
          f"p99 {pct(res['to ClickHouse'], .99) / pct(base, .99):.3f}")


def spool_file(directory, rows):
    """A spool file of `rows` realistic rows in the current hour."""
    now_ms = int(time.time() * 1000)
    name = time.strftime("audit-%Y%m%d%H.jsonl", time.gmtime(now_ms / 1000))
    path = Path(directory) / name
    with open(path, "w") as f:
        for i in range(rows):
            ts_ms = now_ms - rows + i
            f.write(json.dumps({
                "request_id": f"req_{i:032x}", "ts": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts_ms / 1000)),
                "ts_ms": ts_ms, "tenant": f"tenant-{i % 50}", "api_key_id": f"key-{i % 50}",
                "endpoint": "chat_completions", "model_requested": "gpt-4o-mini", "model": "gpt-4o-mini",
                "provider": "openai", "region": "us-east-1", "stream": i % 2, "status": 200, "error_code": "",
                "tokens_in": 512 + i % 100, "tokens_out": 128 + i % 50, "cached_tokens_in": 0,
                "usage_estimated": 0, "cost_nanousd": 153_600 + i % 1000, "latency_ms": 900, "ttft_ms": 250,
                "cache_hit": 0, "fallback_used": 0, "attempts": 1, "node": "edge-1"}) + "\n")
    return path


def throughput(binary, ch, rows):
    tmp = tempfile.mkdtemp(prefix="llmgw-auditbench-")
    spool = Path(tmp) / "spool"
    spool.mkdir()
    path = spool_file(spool, rows)
    data = path.read_bytes()
    t0 = time.perf_counter()
    with Stack(binary, [], config, audit_extra=clickhouse_section(ch.url, "bench_ship", 5000, 1000),
               spool_dir=str(spool)) as st:
        while metric(st.admin_port, "llmgw_audit_rows_shipped_total") < rows:
            time.sleep(0.02)
        shipper_s = time.perf_counter() - t0
    count = int(ch.query("SELECT count() FROM llm_audit FINAL", database="bench_ship"))
    assert count == rows, (count, rows)

    ch.query("CREATE TABLE bench_ship.direct AS bench_ship.llm_audit", database="bench_ship")
    import httpx
    t0 = time.perf_counter()
    r = httpx.post(f"{ch.url}/", params={"database": "bench_ship", "query": "INSERT INTO direct FORMAT JSONEachRow"},
                   content=data, timeout=600)
    direct_s = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    print(f"2. shipping a spool of {rows} rows ({len(data) / 1e6:.1f} MB JSON lines), batch_rows 5000:")
    print(f"   gateway shipper (start to last ack) {shipper_s:6.2f} s  {rows / shipper_s:9.0f} rows/s")
    print(f"   direct bulk INSERT of the file       {direct_s:6.2f} s  {rows / direct_s:9.0f} rows/s")
    print(f"   ratio shipper / direct: {direct_s / shipper_s:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=200_000)
    a = ap.parse_args()
    ch = ClickHouse(Path(tempfile.mkdtemp(prefix="llmgw-bench-ch-"))).start()
    try:
        latency(a.bin, ch, a.n)
        throughput(a.bin, ch, a.rows)
    finally:
        ch.stop()


if __name__ == "__main__":
    os.environ.setdefault("RUST_LOG", "error")
    main()

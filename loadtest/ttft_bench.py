#!/usr/bin/env python3
"""Time to first token and per-request overhead of the gateway against a baseline
measured in the same run: the mock provider called directly.

Usage: python3 loadtest/ttft_bench.py [--bin target/release/llm-gateway] [-n 300]
(BENCH_TTFT_MS sets the mock's time to first token, default 20.)
Starts its own mock provider and gateway on free loopback ports and stops them.
Reports medians and p95 and the gateway's added latency; absolute figures on a shared
machine are noise, the difference and ratio are the result.
"""
import argparse, http.client, json, os, statistics, time

from benchlib import Stack, one_model_config, pct


def stream_once(port, path, headers, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    r = conn.getresponse()
    first = None
    while True:
        line = r.fp.readline()
        if not line:
            break
        if first is None and line.startswith(b"data:") and b'"content":"' in line and b'"content":""' not in line:
            first = time.perf_counter()
        if line.strip() == b"data: [DONE]":
            break
    end = time.perf_counter()
    conn.close()
    return (first or end) - t0, end - t0


KEY = "sk-bench"


def config(mock_port):
    return one_model_config(mock_port, KEY)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=300)
    a = ap.parse_args()
    mock_args = ["--ttft-ms", os.environ.get("BENCH_TTFT_MS", "20"), "--gap-ms", "1", "--tokens", "16"]
    with Stack(a.bin, mock_args, config) as st:
        mport, gport, key = st.mock_port, st.port, KEY
        body = json.dumps({"model": "m1", "stream": True, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "benchmark prompt"}]})
        targets = {
            "mock direct": (mport, "/v1/chat/completions", {"content-type": "application/json"}),
            "via gateway": (gport, "/v1/chat/completions", {"content-type": "application/json", "authorization": f"Bearer {key}"}),
        }
        for name, (port, path, h) in targets.items():  # warm-up
            for _ in range(20):
                stream_once(port, path, h, body)
        res = {name: [] for name in targets}
        for _ in range(a.n):  # interleaved, so drift hits both sides alike
            for name, (port, path, h) in targets.items():
                res[name].append(stream_once(port, path, h, body))
        print(f"{a.n} streaming requests each, sequential, mock ttft 20 ms, 16 tokens 1 ms apart")
        out = {}
        for name, xs in res.items():
            ttft = [x[0] * 1000 for x in xs]; total = [x[1] * 1000 for x in xs]
            out[name] = (statistics.median(ttft), pct(ttft, 0.95), statistics.median(total), pct(total, 0.95))
            print(f"  {name:12s} ttft median {out[name][0]:7.3f} ms p95 {out[name][1]:7.3f} ms | total median {out[name][2]:7.3f} ms p95 {out[name][3]:7.3f} ms")
        d, g = out["mock direct"], out["via gateway"]
        print(f"  gateway adds: ttft median {g[0]-d[0]:+.3f} ms (ratio {g[0]/d[0]:.3f}), total median {g[2]-d[2]:+.3f} ms (ratio {g[2]/d[2]:.3f})")


if __name__ == "__main__":
    main()

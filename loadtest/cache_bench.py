#!/usr/bin/env python3
"""Cache-hit latency and requests/s against two baselines measured in the same run:
a miss through the gateway (every request a new prompt) and the mock provider
answering directly.

Usage: python3 loadtest/cache_bench.py [--bin target/release/llm-gateway] [-n 500] [-c 8]
(BENCH_TTFT_MS sets the mock's time to first token, default 20.)
Starts its own mock provider and gateway on free loopback ports and stops them.
Latency: sequential non-streaming requests, interleaved (hit, miss, direct), medians and
p95. Throughput: `-c` client threads for a few seconds per target, keep-alive
connections. Absolute figures on a shared machine are noise; the ratios are the result.
"""
import argparse, http.client, json, os, statistics, threading, time, uuid

from benchlib import Stack, one_model_config, pct

KEY = "sk-bench"


def config(mock_port):
    return one_model_config(mock_port, KEY, "    cache: { enabled: true, ttl_s: 3600 }\ncache: { max_bytes: 67108864 }\n")


def body(prompt):
    return json.dumps({"model": "m1", "temperature": 0, "max_tokens": 16,
                       "messages": [{"role": "user", "content": prompt}]})


def once(conn, headers, payload):
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=payload, headers=headers)
    r = conn.getresponse()
    r.read()
    return time.perf_counter() - t0, r.status, r.getheader("x-gateway-cache")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("-c", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    mock_args = ["--ttft-ms", os.environ.get("BENCH_TTFT_MS", "20"), "--gap-ms", "1", "--tokens", "16"]
    with Stack(a.bin, mock_args, config) as st:
        gw_h = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
        mock_h = {"content-type": "application/json"}
        hit_body = body("the cached benchmark prompt")

        def conn(port):
            return http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        g, m = conn(st.port), conn(st.mock_port)
        _, status, cache = once(g, gw_h, hit_body)
        assert status == 200 and cache == "miss", (status, cache)
        _, status, cache = once(g, gw_h, hit_body)
        assert cache == "hit", cache
        for _ in range(20):  # warm-up
            once(g, gw_h, hit_body), once(g, gw_h, body(uuid.uuid4().hex)), once(m, mock_h, hit_body)
        lat = {"hit": [], "miss": [], "mock direct": []}
        for _ in range(a.n):  # interleaved, so drift hits all three alike
            t, _, c = once(g, gw_h, hit_body)
            assert c == "hit"
            lat["hit"].append(t)
            t, _, c = once(g, gw_h, body(uuid.uuid4().hex))
            assert c == "miss"
            lat["miss"].append(t)
            lat["mock direct"].append(once(m, mock_h, hit_body)[0])
        print(f"latency: {a.n} sequential non-streaming requests each, mock ttft "
              f"{os.environ.get('BENCH_TTFT_MS', '20')} ms, 16 tokens")
        med = {}
        for name, xs in lat.items():
            ms = [x * 1000 for x in xs]
            med[name] = statistics.median(ms)
            print(f"  {name:12s} median {med[name]:8.3f} ms  p95 {pct(ms, 0.95):8.3f} ms")
        print(f"  hit/miss median ratio {med['hit'] / med['miss']:.3f}, "
              f"hit/mock-direct ratio {med['hit'] / med['mock direct']:.3f}")

        def rate(port, headers, make_body):
            count = [0] * a.c
            stop = time.perf_counter() + a.seconds

            def worker(i):
                c = conn(port)
                while time.perf_counter() < stop:
                    _, s, _ = once(c, headers, make_body())
                    if s == 200:
                        count[i] += 1

            ts = [threading.Thread(target=worker, args=(i,)) for i in range(a.c)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return sum(count) / (time.perf_counter() - t0)

        rps = {
            "hit": rate(st.port, gw_h, lambda: hit_body),
            "miss": rate(st.port, gw_h, lambda: body(uuid.uuid4().hex)),
            "mock direct": rate(st.mock_port, mock_h, lambda: hit_body),
        }
        print(f"throughput: {a.c} client threads, {a.seconds:.0f} s each")
        for name, v in rps.items():
            print(f"  {name:12s} {v:9.1f} requests/s")
        print(f"  hit/miss ratio {rps['hit'] / rps['miss']:.2f}, "
              f"hit/mock-direct ratio {rps['hit'] / rps['mock direct']:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What a webhook receiver that never answers costs the request path (issue 17): two
gateways on the same build, the same tenant (budget, guard in `alert` mode), one with
no `alerts:` section (the baseline), one whose only webhook is a receiver that accepts
connections, reads the POST and never answers, with thresholds tiny enough that
events are raised during the run (budget thresholds, spend velocity, guard_engaged).
Requests alternate between the two, keep-alive, so both see the same machine noise.
The figure is the ratio of the alerting gateway's p50/p99 to the baseline's.

Usage: python3 loadtest/hung_webhook_bench.py [--bin target/release/llm-gateway] [-n 3000]
"""
import argparse, http.client, json, socket, statistics, threading, time, urllib.request

from benchlib import Stack, one_model_config, pct
from hung_webhook import hold

KEY = "sk-bench-hung"
TENANT_EXTRA = """    budget: { monthly_usd: 10 }
    guard: { velocity_factor: 10, min_hourly_usd: 0.00001, action: alert }
"""


def alerts_section(port):
    return f"""alerts:
  webhooks: [ {{ name: hung, url: "http://127.0.0.1:{port}/hook" }} ]
  budget_thresholds: [0.00001, 0.00002, 0.00005]
  velocity: {{ factor: 5, min_hourly_usd: 0.00001 }}
"""


def hung_receiver():
    """A listening socket whose connections are read and never answered; returns (port,
    a counter of accepted connections)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
    accepted = [0]

    def serve():
        while True:
            conn, _ = srv.accept()
            accepted[0] += 1
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], accepted


def post(conn, body):
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    r.read()
    return time.perf_counter() - t0, r.status


def metric(admin_port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=3000, help="requests per gateway")
    a = ap.parse_args()
    hook_port, accepted = hung_receiver()
    base_cfg = lambda mock: one_model_config(mock, KEY, TENANT_EXTRA)
    hung_cfg = lambda mock: one_model_config(mock, KEY, TENANT_EXTRA + alerts_section(hook_port))
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "bench"}]})
    with Stack(a.bin, ["--tokens", "8"], base_cfg) as base, Stack(a.bin, ["--tokens", "8"], hung_cfg) as hung:
        conns = {"baseline": (base, http.client.HTTPConnection("127.0.0.1", base.port, timeout=30)),
                 "hung webhook": (hung, http.client.HTTPConnection("127.0.0.1", hung.port, timeout=30))}
        for _ in range(50):  # warm-up; raises the first events
            for _, c in conns.values():
                post(c, body)
        res = {k: [] for k in conns}
        for _ in range(a.n):
            for k, (_, c) in conns.items():
                dt, status = post(c, body)
                assert status == 200, (k, status)
                res[k].append(dt * 1000)
        pending = metric(hung.admin_port, "llmgw_alerts_pending")
        failures = metric(hung.admin_port, 'llmgw_alert_delivery_failures_total{webhook="hung"}')
        print(f"{a.n} non-streaming requests per gateway, keep-alive, interleaved")
        for k, xs in res.items():
            print(f"  {k:13s} p50 {statistics.median(xs):7.3f} ms  p99 {pct(xs, 0.99):7.3f} ms  max {max(xs):7.3f} ms")
        b, h = res["baseline"], res["hung webhook"]
        print(f"  ratio hung/baseline: p50 {statistics.median(h) / statistics.median(b):.3f}, "
              f"p99 {pct(h, 0.99) / pct(b, 0.99):.3f}")
        print(f"  during the run: receiver held {accepted[0]} connection(s) open; "
              f"{pending:.0f} event(s) pending, {failures:.0f} delivery timeout(s)")
        assert accepted[0] >= 1 and pending and pending >= 1, "no alert was in delivery: the bench measured nothing"


if __name__ == "__main__":
    main()

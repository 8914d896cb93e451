#!/usr/bin/env python3
"""Soak: mixed load for a long time; the gateway's resident memory and open file
descriptors must stay flat after warm-up.

The mix: non-streaming and streaming chats, repeated temperature-0 requests (cache
hits where the cache is on), requests whose primary model is down (fallback), unknown
keys (401), a tenant over its request rate (429) and one over its budget (402), and a
mid-stream cut. Every `--sample-s` seconds the gateway's RSS (/proc/PID/status) and
open fds (/proc/PID/fd) are recorded; after `--warmup` of the run, the largest sample
may exceed the warm-up level by at most `--rss-slack-mib` and `--fd-slack`. Not run in
CI (it takes 30 minutes by default); figures go to BENCHMARKS.md.

With `--clickhouse` the audit rows are also shipped to a private ClickHouse (Debian's
18.16, started by tests/e2e/chserver.py on a free loopback port), and at the end
every answered request must have exactly one row there (`FINAL`); that needs httpx,
so run it with the test suite's interpreter: `.venv/bin/python loadtest/soak.py
--clickhouse` (after `bash tests/run.sh` made `.venv`).

Usage: python3 loadtest/soak.py [--bin target/release/llm-gateway] [--duration 1800]
                                [--workers 8] [--clickhouse] [--json soak.json]
"""
import argparse, http.client, json, os, random, sys, tempfile, threading, time
from pathlib import Path

from benchlib import Stack, free_port, sha256

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

KEYS = {"main": "sk-soak-main", "tiny": "sk-soak-tiny", "broke": "sk-soak-broke"}


def config(mock_port):
    dead = free_port()  # nothing listens there: the primary of the fallback mix is down
    p = "price: { input_per_mtok: 0.15, output_per_mtok: 0.60 }"
    return f"""providers:
  up: {{ kind: openai, base_url: "http://127.0.0.1:{mock_port}", api_key_env: SOAK_UPSTREAM_KEY, region: r1 }}
  upa: {{ kind: anthropic, base_url: "http://127.0.0.1:{mock_port}", api_key_env: SOAK_UPSTREAM_KEY, region: r1 }}
  down: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{dead}", region: r1 }}
models:
  gpt-4o-mini: {{ provider: up, {p}, max_output_tokens: 256 }}
  claude-haiku: {{ provider: upa, upstream_model: claude-3-5-haiku-20241022, {p}, max_output_tokens: 256 }}
  dead-model: {{ provider: down, {p}, max_output_tokens: 256 }}
tenants:
  main:
    api_keys: [ {{ id: k1, sha256: "{sha256(KEYS['main'])}" }} ]
    models: [gpt-4o-mini, claude-haiku, dead-model]
    fallback: [claude-haiku]
    allow_fallback_override: true
    rate: {{ rps: 100000, concurrency: 1000 }}
    budget: {{ monthly_usd: 1000000 }}
    cache: {{ enabled: true, ttl_s: 60 }}
  tiny:
    api_keys: [ {{ id: k2, sha256: "{sha256(KEYS['tiny'])}" }} ]
    models: [gpt-4o-mini]
    rate: {{ rps: 1 }}
  broke:
    api_keys: [ {{ id: k3, sha256: "{sha256(KEYS['broke'])}" }} ]
    models: [gpt-4o-mini]
    budget: {{ monthly_usd: 0.000001 }}
"""


def mix(rng):
    """(key, body, expected statuses) of one request of the mix."""
    n = rng.random()
    chat = lambda prompt, **kw: {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], **kw}
    if n < 0.30:
        return KEYS["main"], chat(f"soak {rng.random()}"), {200}
    if n < 0.50:
        return KEYS["main"], chat(f"soak stream {rng.random()}", stream=True), {200}
    if n < 0.65:
        return KEYS["main"], chat(f"cached {rng.randrange(20)}", temperature=0), {200}
    if n < 0.75:
        return KEYS["main"], {**chat("fallback please"), "model": "dead-model"}, {200}
    if n < 0.80:
        return KEYS["main"], chat("[[mock: fault=cut; cut_after=3]] cut me", stream=True), {200, 502, 503}
    if n < 0.87:
        return f"sk-unknown-{rng.random()}", chat("who am i"), {401}
    if n < 0.94:
        return KEYS["tiny"], chat("tiny"), {200, 429}
    return KEYS["broke"], chat("broke"), {402}


def worker(port, stop, stats, lock, seed):
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        key, body, ok = mix(rng)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
            r = conn.getresponse()
            text = r.read()
            status = r.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            status = "conn-error"
        with lock:
            stats["requests"] += 1
            if status != "conn-error":
                stats["answered"] += 1
            if status not in ok:
                stats["unexpected"][str(status)] = stats["unexpected"].get(str(status), 0) + 1
                if len(stats["samples"]) < 10:  # what was asked and what came back, for the report
                    answer = text[:400].decode(errors="replace") if status != "conn-error" else ""
                    stats["samples"].append({"status": status, "key": key[:12], "model": body.get("model"),
                                             "stream": body.get("stream", False), "body": answer})


def sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    os.environ.setdefault("SOAK_UPSTREAM_KEY", "sk-soak-upstream")  # the mock accepts any key
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("--duration", type=float, default=1800)
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before the baseline")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--rss-slack-mib", type=float, default=32)
    ap.add_argument("--fd-slack", type=int, default=32)
    ap.add_argument("--clickhouse", action="store_true", help="also ship audit rows to a private ClickHouse")
    ap.add_argument("--json")
    a = ap.parse_args()

    ch, audit_extra = None, ""
    if a.clickhouse:
        from chserver import ClickHouse
        ch = ClickHouse(Path(tempfile.mkdtemp(prefix="llmgw-soak-ch-"))).start()
        audit_extra = (f"  clickhouse: {{ url: \"{ch.url}\", database: default, table: llm_audit, "
                       "batch_rows: 5000, flush_ms: 1000 }\n")
    try:
        result = run(a, audit_extra, ch)
    finally:
        if ch is not None:
            ch.stop()
    ok = result["flat"] and result["gateway_alive"] and not result["unexpected_statuses"] \
        and result.get("clickhouse_rows_match", True)
    raise SystemExit(0 if ok else 1)


def run(a, audit_extra, ch):
    with Stack(a.bin, [], config, audit_extra=audit_extra) as s:
        stop, lock = threading.Event(), threading.Lock()
        stats = {"requests": 0, "answered": 0, "unexpected": {}, "samples": []}
        threads = [threading.Thread(target=worker, args=(s.port, stop, stats, lock, i), daemon=True)
                   for i in range(a.workers)]
        for t in threads:
            t.start()
        samples = []
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < a.duration:
            time.sleep(min(a.sample_s, max(0.0, a.duration - elapsed)))
            rss, fds = sample(s.gw.pid)
            with lock:
                n = stats["requests"]
            samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": round(rss, 1), "fds": fds,
                            "requests": n})
            print(f"{samples[-1]['t_s']:8.1f}s  rss {rss:7.1f} MiB  fds {fds:5d}  requests {n}", flush=True)
        stop.set()
        for t in threads:
            t.join(35)
        alive = s.gw.poll() is None
        ch_rows = None
        if ch is not None:
            # Every answered request has one row; requests cut by a connection error may
            # have one too. Wait for the shipper to catch up (flush_ms 1 s).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = ch.rows("SELECT count() AS n FROM llm_audit FINAL")
                ch_rows = int(got[0]["n"]) if got else 0
                if stats["answered"] <= ch_rows <= stats["requests"]:
                    break
                time.sleep(1)

    warm = [x for x in samples if x["t_s"] <= a.duration * a.warmup] or samples[:1]
    after = [x for x in samples if x["t_s"] > a.duration * a.warmup] or samples[-1:]
    base_rss, base_fds = max(x["rss_mib"] for x in warm), max(x["fds"] for x in warm)
    peak_rss, peak_fds = max(x["rss_mib"] for x in after), max(x["fds"] for x in after)
    result = {
        "duration_s": a.duration, "workers": a.workers, "requests": stats["requests"],
        "rps": round(stats["requests"] / a.duration, 1), "answered": stats["answered"],
        "unexpected_statuses": stats["unexpected"], "unexpected_samples": stats["samples"],
        "rss_mib_warm": base_rss, "rss_mib_peak_after": peak_rss,
        "fds_warm": base_fds, "fds_peak_after": peak_fds, "gateway_alive": alive,
        "flat": peak_rss <= base_rss + a.rss_slack_mib and peak_fds <= base_fds + a.fd_slack,
        "samples": samples,
    }
    if ch is not None:
        result["clickhouse_rows"] = ch_rows
        result["clickhouse_rows_match"] = ch_rows is not None and stats["answered"] <= ch_rows <= stats["requests"]
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

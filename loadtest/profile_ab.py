#!/usr/bin/env python3
"""Which release profile: CPU time per request of builds of the same source made with
different Cargo profiles (LTO, codegen-units), each against the passthrough built
the same way, rounds interleaved.

    CARGO_TARGET_DIR=target-thin CARGO_PROFILE_RELEASE_LTO=thin \\
        cargo build --release --features bench,jemalloc --bin llm-gateway --example passthrough
    python3 loadtest/profile_ab.py base=target/release thin=target-thin/release [--rounds 3]

Each NAME=DIR names a build: DIR/llm-gateway and DIR/examples/passthrough; NAME=DIR@N
runs that build with model m1 served by N deployments (`benchlib.deployments_config`),
so `one=target/release@1 eight=target/release@8` measures what choosing among 8
deployments costs per request; `@N:as_client` also sets `upstream_streaming: as_client`
on its provider (non-streaming requests not sent as streams to assemble). The first
build is the reference. Same load and pinning as loadtest/bench.py's max-rps section
(wrk -t1 -c32 keep-alive, non-streaming; the server alone on CPU 1). Every build's
gateway and passthrough stay up for the whole run and are fed by one mock (the first
build's); each round runs every server once, in a rotating order. Prints, per build,
the median (min, max) over rounds of the CPU time per request of both servers, the
gateway's capacity relative to its passthrough, and its CPU per request relative to
the reference build's in the same round.
"""
import argparse, json, os, statistics, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from benchlib import BENCH_KEY, Stack, deployments_config, policy_config, raise_nofile  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def med(xs):
    return f"{statistics.median(xs):7.2f} ({min(xs):.2f}, {max(xs):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="NAME=DIR, the reference first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    builds, configs = {}, {}
    for b in a.builds:
        name, d = b.split("=", 1)
        d, _, n = d.partition("@")
        builds[name] = d
        n, _, mode = n.partition(":")
        configs[name] = deployments_config(int(n), mode == "as_client") if n else policy_config
    for name, d in builds.items():
        for f in ("llm-gateway", "examples/passthrough"):
            if not os.access(os.path.join(d, f), os.X_OK):
                sys.exit(f"{name}: no {d}/{f}")
    raise_nofile()
    two = len(os.sched_getaffinity(0)) >= 2
    client, server = ("0", "1") if two else (None, None)
    lua = os.path.join(tempfile.mkdtemp(prefix="llmgw-ab-"), "post.lua")
    with open(lua, "w") as f:
        f.write(bench.WRK_LUA.format(body=json.dumps(bench.BODY), key=BENCH_KEY))
    ref = next(iter(builds))
    mock_bin = os.path.join(builds[ref], "llm-gateway")
    stacks, pts = {}, {}
    res = {n: {"gateway": [], "passthrough": []} for n in builds}
    try:
        for name, d in builds.items():
            st = Stack(os.path.join(d, "llm-gateway"), [], configs[name], mock_cpus=client, gw_cpus=server,
                       mock_bin=mock_bin).__enter__()
            stacks[name] = st
            pts[name] = bench.Passthrough(os.path.join(d, "examples/passthrough"), st.mock_port, server)
        targets = [(n, kind) for n in builds for kind in ("passthrough", "gateway")]

        def port_pid(n, kind):
            if kind == "gateway":
                return stacks[n].port, stacks[n].gw.pid
            return pts[n].port, pts[n].proc.pid
        for n, kind in targets:  # warm-up: pools, caches, allocator
            bench.wrk_run(*port_pid(n, kind), a.conns, 2, client, lua)
        for rnd in range(a.rounds):
            k = rnd % len(targets)
            for n, kind in targets[k:] + targets[:k]:
                r = bench.wrk_run(*port_pid(n, kind), a.conns, a.duration, client, lua)
                if r["non_2xx"] or r["socket_errors"]:
                    log(f"  {n} {kind}: {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors")
                res[n][kind].append(r)
                log(f"round {rnd + 1} {n:8s} {kind:11s} {r['cpu_us_per_req']:6.1f} us/request,"
                    f" {r['rps']:8.0f} req/s, core busy {r['server_cpu_util']:.2f}")
    finally:
        for p in pts.values():
            p.stop()
        for st in stacks.values():
            st.__exit__(None, None, None)
    print(f"CPU us per request, median (min, max) over {a.rounds} rounds; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'build':8s} {'gateway':>22s} {'passthrough':>22s} {'capacity gw/pt':>22s} {'gateway / ' + ref:>22s}")
    out = {}
    for n in builds:
        gw = [r["cpu_us_per_req"] for r in res[n]["gateway"]]
        pt = [r["cpu_us_per_req"] for r in res[n]["passthrough"]]
        cap = [p / g for p, g in zip(pt, gw)]
        rel = [g / r["cpu_us_per_req"] for g, r in zip(gw, res[ref]["gateway"])]
        print(f"{n:8s} {med(gw):>22s} {med(pt):>22s} {med(cap):>22s} {med(rel):>22s}")
        out[n] = {"gateway_us": gw, "passthrough_us": pt, "capacity_ratio": cap, "gateway_over_ref": rel,
                  "runs": res[n]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

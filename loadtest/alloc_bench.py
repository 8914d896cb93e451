#!/usr/bin/env python3
"""Which allocator: the gateway's CPU time per request and RSS per slow stream under
glibc malloc and, through LD_PRELOAD, jemalloc and mimalloc (Debian's libjemalloc2 and
libmimalloc2.0), in one run, rounds interleaved.

    apt-get install -y wrk libjemalloc2 libmimalloc2.0
    python3 loadtest/alloc_bench.py [--rounds 3] [--streams 3000]

Same load as loadtest/bench.py (wrk -c32 non-streaming; slow streams held open), same
pinning. Prints median (min, max) per allocator and the ratio to glibc.
"""
import argparse, asyncio, json, os, statistics, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from benchlib import BENCH_KEY, Stack, policy_config, proc_rss_bytes, raise_nofile  # noqa: E402

LIB = "/usr/lib/x86_64-linux-gnu"
ALLOCATORS = {"glibc": None, "jemalloc": f"{LIB}/libjemalloc.so.2", "mimalloc": f"{LIB}/libmimalloc.so.2"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway-bin", default="target/release/llm-gateway")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--streams", type=int, default=3000)
    a = ap.parse_args()
    raise_nofile()
    allocs = {k: v for k, v in ALLOCATORS.items() if v is None or os.path.exists(v)}
    two = len(os.sched_getaffinity(0)) >= 2
    client, server = ("0", "1") if two else (None, None)
    lua = os.path.join(tempfile.mkdtemp(prefix="llmgw-alloc-"), "post.lua")
    with open(lua, "w") as f:
        f.write(bench.WRK_LUA.format(body=json.dumps(bench.BODY), key=BENCH_KEY))
    cpu = {k: [] for k in allocs}
    mem = {k: [] for k in allocs}
    stacks = {}
    try:
        for name, lib in allocs.items():
            env = {"LD_PRELOAD": lib} if lib else {}
            stacks[name] = Stack(a.gateway_bin, [], policy_config, mock_cpus=client, gw_cpus=server, gw_env=env).__enter__()
            bench.wrk_run(stacks[name].port, stacks[name].gw.pid, 32, 2, client, lua)
        for rnd in range(a.rounds):
            for name, st in stacks.items():
                r = bench.wrk_run(st.port, st.gw.pid, 32, a.duration, client, lua)
                cpu[name].append(r["cpu_us_per_req"])
                print(f"round {rnd + 1} {name}: {r['cpu_us_per_req']:.1f} us/request", file=sys.stderr, flush=True)
        for name, st in stacks.items():  # memory last: RSS never shrinks back
            idle = proc_rss_bytes(st.gw.pid)

            async def hold():
                pairs, _ = await bench.hold_streams(st.port, a.streams)
                rss = proc_rss_bytes(st.gw.pid)
                for _, w in pairs:
                    w.close()
                return len(pairs), rss
            held, rss = asyncio.run(hold())
            mem[name].append((rss - idle) / 2**20 * 10000 / max(held, 1))
            time.sleep(1)
    finally:
        for st in stacks.values():
            st.__exit__(None, None, None)
    base_cpu, base_mem = statistics.median(cpu["glibc"]), statistics.median(mem["glibc"])
    print(f"allocator   CPU us/request median (min, max)   ratio | RSS MiB per 10k streams   ratio")
    for name in allocs:
        c, m = statistics.median(cpu[name]), statistics.median(mem[name])
        print(f"{name:10s} {c:7.1f} ({min(cpu[name]):.1f}, {max(cpu[name]):.1f})  {c / base_cpu:6.3f} | "
              f"{m:8.1f}  {m / base_mem:6.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The tenant and key store at scale: load time, memory, and admission cost.

    cargo build --release --features jemalloc --bin llm-gateway     (or any build: --bin)
    python3 loadtest/store_bench.py [--tenants 100000] [--keys-per-tenant 3] [--rounds 3]

1. A SQLite store of N tenants with K keys each is written (schema by the binary's
   own migrations, through `import-tenants` on an empty file; rows in one
   transaction). A gateway starts on it: time from spawn to `/readyz` 200 (the store
   is loaded before the listeners are ready) and resident memory once ready, each
   against the same gateway started without the store in the same run.
2. CPU per request (wrk, keep-alive, non-streaming; /proc/<pid>/stat): the same
   tenant policy (benchlib.policy_config's t1) served as a file tenant by a gateway
   without a store, and as one of the N store tenants by the gateway above, rounds
   interleaved; reported as the ratio store / file.
"""
import argparse, json, os, sqlite3, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BENCH_KEY, PROVIDER_ENV, free_port, gateway_yaml, pinned, policy_config,  # noqa: E402
                      proc_cpu_s, proc_rss_bytes, sha256, wait_http_ok)
import bench  # noqa: E402

STORE_KEY = "sk-store-bench"


def build_db(binary, path, tenants, keys_per):
    tmp = os.path.dirname(path)
    cfg = f"{tmp}/migrate.yaml"
    with open(cfg, "w") as f:
        f.write(f"node: {{ region: r1 }}\nlisten: {{ http: 127.0.0.1:{free_port()} }}\n"
                f"providers:\n  p: {{ kind: openai_compatible, base_url: 'http://127.0.0.1:9', region: r1 }}\n"
                f"models:\n  m: {{ provider: p, price: {{ input_per_mtok: 1, output_per_mtok: 1 }} }}\n"
                f"tenants: {{}}\nstore: {{ backend: sqlite, path: {path} }}\n")
    subprocess.run([binary, "import-tenants", "--config", cfg], check=True, capture_output=True)
    db = sqlite3.connect(path)
    spec = json.dumps({"models": ["m1", "m2", "m3"], "fallback": ["m2", "m3"], "allow_fallback_override": True,
                       "rate": {"rps": 1000000000, "tpm": 1000000000000, "concurrency": 1000000},
                       "budget": {"monthly_usd": 1000000000, "hourly_usd": 100000000},
                       "cache": {"enabled": True, "ttl_s": 60}})
    now = int(time.time() * 1000)
    with db:
        db.executemany("INSERT INTO gw_tenants (id, spec, disabled, created_ms, updated_ms, version) VALUES (?, ?, 0, ?, ?, 1)",
                       ((f"tenant-{i:06d}", spec, now, now) for i in range(tenants)))
        def keys():
            for i in range(tenants):
                for k in range(keys_per):
                    secret = STORE_KEY if (i, k) == (tenants // 2, 0) else f"sk-bench-{i}-{k}"
                    yield (f"tenant-{i:06d}", f"k{k}", json.dumps({"id": f"k{k}", "sha256": sha256(secret), "name": f"key {k}"}), now, now)
        db.executemany("INSERT INTO gw_keys (tenant, id, spec, created_ms, updated_ms, revoked_ms, version) VALUES (?, ?, ?, ?, ?, NULL, 1)", keys())
        db.execute("UPDATE gw_meta SET version = 1")
    db.close()


def start(binary, tmp, name, mock_port, store_path, cpus):
    port, admin = free_port(), free_port()
    extra = f"store: {{ backend: sqlite, path: {store_path} }}\n" if store_path else ""
    body = lambda mp: policy_config(mp) + extra  # noqa: E731
    cfg = f"{tmp}/{name}.yaml"
    with open(cfg, "w") as f:
        f.write(gateway_yaml(body, mock_port, port, admin, f"{tmp}/spool-{name}"))
    env = dict(os.environ, RUST_LOG="error", LLM_GATEWAY_GRACE_PERIOD_S="1", LLM_GATEWAY_PID_FILE=f"{tmp}/{name}.pid",
               LLM_GATEWAY_UPGRADE_SOCK=f"{tmp}/{name}.sock", **PROVIDER_ENV)
    t0 = time.perf_counter()
    p = subprocess.Popen(pinned([binary, "serve", "--config", cfg], cpus), env=env, stderr=subprocess.DEVNULL)
    if not wait_http_ok(admin, "/readyz", deadline_s=120, proc=p):
        p.kill()
        sys.exit(f"{name} did not become ready")
    ready_s = time.perf_counter() - t0
    time.sleep(0.5)  # let start-up garbage settle before reading RSS (not synchronisation)
    return p, port, ready_s, proc_rss_bytes(p.pid)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--keys-per-tenant", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    two = (os.cpu_count() or 1) >= 2
    gw_cpus, client_cpus = ("1", "0") if two else (None, None)
    tmp = tempfile.mkdtemp(prefix="llmgw-store-bench-")
    db = f"{tmp}/tenants.db"
    t0 = time.perf_counter()
    build_db(binary, db, a.tenants, a.keys_per_tenant)
    print(f"wrote {a.tenants} tenants / {a.tenants * a.keys_per_tenant} keys in {time.perf_counter() - t0:.1f} s "
          f"({os.path.getsize(db) / 2**20:.0f} MiB)", flush=True)
    mock = subprocess.Popen(pinned([binary, "mock-provider", "--listen", "127.0.0.1:0"], client_cpus),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    mock_port = int(mock.stdout.readline().strip().rsplit(":", 1)[1])
    procs = []
    try:
        file_gw, file_port, file_ready, file_rss = start(binary, tmp, "file", mock_port, None, gw_cpus)
        procs.append(file_gw)
        store_gw, store_port, store_ready, store_rss = start(binary, tmp, "store", mock_port, db, gw_cpus)
        procs.append(store_gw)
        print(f"ready: file tenants only {file_ready:.2f} s, with the store {store_ready:.2f} s "
              f"(load ~{store_ready - file_ready:.2f} s); RSS {file_rss / 2**20:.1f} MiB vs {store_rss / 2**20:.1f} MiB "
              f"(+{(store_rss - file_rss) / 2**20:.1f} MiB)", flush=True)
        lua_file, lua_store = f"{tmp}/file.lua", f"{tmp}/store.lua"
        for path, key in ((lua_file, BENCH_KEY), (lua_store, STORE_KEY)):
            with open(path, "w") as f:
                f.write(bench.WRK_LUA.format(body=json.dumps(bench.BODY), key=key))
        bench.wrk_run(file_port, file_gw.pid, 32, 1, client_cpus, lua_file)  # warm-up
        bench.wrk_run(store_port, store_gw.pid, 32, 1, client_cpus, lua_store)
        ratios, rounds = [], []
        for i in range(a.rounds):
            f = bench.wrk_run(file_port, file_gw.pid, 32, a.seconds, client_cpus, lua_file)
            s = bench.wrk_run(store_port, store_gw.pid, 32, a.seconds, client_cpus, lua_store)
            assert f["non_2xx"] == 0 and s["non_2xx"] == 0, (f, s)
            ratios.append(s["cpu_us_per_req"] / f["cpu_us_per_req"])
            rounds.append({"file": f, "store": s})
            print(f"round {i + 1}: CPU/request file {f['cpu_us_per_req']:.1f} us, store {s['cpu_us_per_req']:.1f} us, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        print(f"CPU per request, store tenant / file tenant: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
        if a.json:
            with open(a.json, "w") as out:
                json.dump({"tenants": a.tenants, "keys": a.tenants * a.keys_per_tenant, "ready_s": [file_ready, store_ready],
                           "rss_bytes": [file_rss, store_rss], "rounds": rounds, "ratios": ratios}, out, indent=1)
    finally:
        for p in procs + [mock]:
            p.terminate()
        for p in procs + [mock]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()

"""Shared plumbing of the bench scripts: a private mock provider and gateway on free
loopback ports, started and stopped by the script itself, the bench configs, and
latency statistics.

As a command it runs another command against a private stack (used by run_k6.sh):
    python3 loadtest/benchlib.py [--bin B] [--config policy|tenants] -- CMD ARGS...
CMD sees GATEWAY (base URL), ADMIN (admin base URL), ADMIN_TOKEN, MOCK (mock base
URL) and SPOOL (the audit spool dir) in its environment; the exit status is CMD's.
"""
import hashlib, http.client, os, resource, shutil, socket, subprocess, sys, tempfile, time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def sha256(key):
    return hashlib.sha256(key.encode()).hexdigest()


def one_model_config(mock_port, key, extra=""):
    """Providers/models/tenants of a one-model bench: tenant `t1` (API key `key`) on
    model `m1` served by the mock; `extra` is appended to the tenant (indented) and may
    add top-level sections after a line without indentation."""
    return f"""providers:
  p1: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{mock_port}", region: r1 }}
models:
  m1: {{ provider: p1, price: {{ input_per_mtok: 1, output_per_mtok: 2 }}, max_output_tokens: 64 }}
tenants:
  t1:
    api_keys: [ {{ id: k1, sha256: "{sha256(key)}" }} ]
    models: [m1]
""" + extra


def raise_nofile(want=65536):
    """Lifts this process's open-file limit to `want` (root may raise the hard limit too),
    else to the hard limit; children inherit it. 10,000 streams through a proxy take
    20,000 descriptors in the proxy, more than the usual hard limit of 20,000 allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pinned(cmd, cpus):
    """`cmd` run under `taskset -c cpus` when cpus is given (and taskset exists)."""
    if cpus is None or not shutil.which("taskset"):
        return cmd
    return ["taskset", "-c", str(cpus), *cmd]


def proc_cpu_s(pid):
    """User + system CPU seconds of a process so far (/proc/<pid>/stat, all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_http_ok(port, path, deadline_s=30, proc=None):
    """Polls GET path on 127.0.0.1:port until it answers 200 (the readiness signal)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


# --- configs ------------------------------------------------------------------------

BENCH_KEY = "sk-bench"
ADMIN_TOKEN = "bench-admin-token"
PROVIDER_ENV = {"BENCH_OPENAI_KEY": "sk-upstream-openai", "BENCH_ANTHROPIC_KEY": "sk-upstream-anthropic",
                "BENCH_ADMIN_TOKEN": ADMIN_TOKEN}
# Timeouts long enough for the 10,000 slow streams (one token every 60 s).
TIMEOUTS = "timeouts: { connect_ms: 2000, first_token_ms: 60000, idle_ms: 120000, total_ms: 600000 }"


def _providers(mock_port):
    return f"""providers:
  p-openai: {{ kind: openai, base_url: "http://127.0.0.1:{mock_port}", api_key_env: BENCH_OPENAI_KEY, region: r1, {TIMEOUTS} }}
  p-anthropic: {{ kind: anthropic, base_url: "http://127.0.0.1:{mock_port}", api_key_env: BENCH_ANTHROPIC_KEY, region: r1, {TIMEOUTS} }}
  p-inhouse: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{mock_port}/inhouse", region: r1, {TIMEOUTS} }}
models:
  m1: {{ provider: p-openai, upstream_model: gpt-4o-mini, price: {{ input_per_mtok: 0.15, output_per_mtok: 0.60 }}, max_output_tokens: 64 }}
  m2: {{ provider: p-anthropic, upstream_model: claude-3-5-haiku-20241022, price: {{ input_per_mtok: 0.80, output_per_mtok: 4.00 }}, max_output_tokens: 64 }}
  m3: {{ provider: p-inhouse, upstream_model: llama-70b, price: {{ input_per_mtok: 0.10, output_per_mtok: 0.10 }}, max_output_tokens: 64 }}
"""


def policy_config(mock_port):
    """Every policy on and none rejecting: auth, a routing chain with fallbacks, rate
    limits and budgets far above what a bench can spend (checked and settled on every
    request), audit rows to the spool (added by Stack)."""
    return _providers(mock_port) + f"""tenants:
  t1:
    api_keys: [ {{ id: k1, sha256: "{sha256(BENCH_KEY)}" }} ]
    models: [m1, m2, m3]
    fallback: [m2, m3]
    allow_fallback_override: true
    rate: {{ rps: 1000000000, tpm: 1000000000000, concurrency: 1000000 }}
    budget: {{ monthly_usd: 1000000000, hourly_usd: 100000000 }}
    cache: {{ enabled: true, ttl_s: 60 }}
counters: {{ backend: memory }}
"""


def deployments_config(n, as_client=False):
    """`policy_config` with model m1 served by `n` deployments (one provider, `n` upstream
    names, the default `least_busy` balance), to measure what choosing among them costs;
    `as_client`: its provider says `upstream_streaming: as_client` (non-streaming requests
    go upstream as such, not as streams to assemble)."""
    deps = "\n".join(f"      - {{ provider: p-openai, upstream_model: gpt-4o-mini-{i} }}" for i in range(n))
    m1 = ("  m1: { provider: p-openai, upstream_model: gpt-4o-mini, price: { input_per_mtok: 0.15, "
          "output_per_mtok: 0.60 }, max_output_tokens: 64 }\n")

    def body(mock_port):
        cfg = policy_config(mock_port)
        assert m1 in cfg
        if as_client:
            cfg = cfg.replace(f"api_key_env: BENCH_OPENAI_KEY, region: r1, {TIMEOUTS} }}",
                              f"api_key_env: BENCH_OPENAI_KEY, region: r1, {TIMEOUTS}, "
                              "upstream_streaming: as_client }", 1)
            assert "as_client" in cfg
        return cfg.replace(m1, f"  m1:\n    deployments:\n{deps}\n    price: {{ input_per_mtok: 0.15, "
                               f"output_per_mtok: 0.60 }}\n    max_output_tokens: 64\n")
    return body


# Tenants of the k6 scenarios: name -> (key, yaml body after api_keys).
TENANTS = {
    "alpha": ("sk-alpha", "models: [m1, m2, m3]\n    fallback: [m2, m3]\n    cache: { enabled: true, ttl_s: 60 }\n    rate: { rps: 100000, concurrency: 10000 }"),
    "beta": ("sk-beta", "models: [m2, m1]\n    fallback: [m1]\n    cache: { enabled: true, ttl_s: 60 }\n    budget: { monthly_usd: 100000 }"),
    "gamma": ("sk-gamma", "models: [m3, m1]\n    fallback: [m1]\n    allow_fallback_override: true"),
    # noisy_neighbour.js: `noisy` floods far above its rps; `quiet` must not notice.
    "noisy": ("sk-noisy", "models: [m1]\n    rate: { rps: 50, concurrency: 20 }"),
    "quiet": ("sk-quiet", "models: [m1]\n    rate: { rps: 1000, concurrency: 200 }"),
    # budget_exhaustion.js: a budget a few hundred requests spend (~3.9 µUSD each).
    "broke": ("sk-broke", "models: [m1]\n    budget: { monthly_usd: 0.001 }"),
}


def tenants_config(mock_port):
    out = _providers(mock_port) + "tenants:\n"
    for name, (key, body) in TENANTS.items():
        out += f"  {name}:\n    api_keys: [ {{ id: {name}-key, sha256: \"{sha256(key)}\" }} ]\n    {body}\n"
    return out + "counters: { backend: memory }\n"


CONFIGS = {"policy": policy_config, "tenants": tenants_config}


def gateway_yaml(config_body, mock_port, port, admin_port, spool, audit_extra="", https=None):
    """A whole gateway config: listeners, admin token, audit spool, then `config_body`.
    `audit_extra`: more YAML lines under `audit:` (e.g. a `clickhouse:` section);
    `https=(port, cert_path, key_path)` adds a `listen.https` listener."""
    listen = f"http: 127.0.0.1:{port}"
    if https:
        listen += f", https: {{ addr: 127.0.0.1:{https[0]}, cert: {https[1]}, key: {https[2]} }}"
    return (f"node: {{ region: r1 }}\nlisten: {{ {listen} }}\n"
            f"admin: {{ listen: 127.0.0.1:{admin_port}, token_env: BENCH_ADMIN_TOKEN }}\n"
            f"audit:\n  spool_dir: {spool}\n" + audit_extra + config_body(mock_port))


class Stack:
    """`with Stack(bin, mock_args, config_body) as s:` — `config_body(mock_port)` returns
    the providers/models/tenants part of the YAML; listen/admin/audit are added here.
    `audit_extra`: more YAML lines under `audit:`, e.g. a `clickhouse:` section;
    `spool_dir`: an existing spool to start on instead of a fresh one;
    `https=(cert_path, key_path)` adds a `listen.https` listener (`self.https_port`);
    `mock_cpus`/`gw_cpus` pin the processes with taskset; `gw_env` adds to the gateway's
    environment (e.g. LD_PRELOAD of another allocator); `gw_wrap` is a command prefix for
    the gateway only (e.g. `["heaptrack", "-o", FILE]`: `self.gw` is then the wrapper);
    `mock_bin` runs the mock from another build than the gateway's."""

    def __init__(self, binary, mock_args, config_body, audit_extra="", spool_dir=None, https=None,
                 mock_cpus=None, gw_cpus=None, gw_env=None, gw_wrap=None, mock_bin=None):
        self.binary, self.mock_args, self.config_body = binary, mock_args, config_body
        self.audit_extra, self.spool_dir, self.https = audit_extra, spool_dir, https
        self.mock_cpus, self.gw_cpus, self.gw_env = mock_cpus, gw_cpus, gw_env or {}
        self.gw_wrap = gw_wrap or []
        self.mock_bin = mock_bin or binary

    def __enter__(self):
        self.tmp = tmp = tempfile.mkdtemp(prefix="llmgw-bench-")
        self.spool = self.spool_dir = self.spool_dir or f"{tmp}/spool"
        self.gw = None
        self.mock = subprocess.Popen(pinned([self.mock_bin, "mock-provider", "--listen", "127.0.0.1:0", *self.mock_args], self.mock_cpus),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.mock_port = int(self.mock.stdout.readline().strip().rsplit(":", 1)[1])
        self.port, self.admin_port = free_port(), free_port()
        https = None
        if self.https:
            self.https_port = free_port()
            https = (self.https_port, *self.https)
        cfg = gateway_yaml(self.config_body, self.mock_port, self.port, self.admin_port, self.spool,
                           self.audit_extra, https)
        with open(f"{tmp}/gw.yaml", "w") as f:
            f.write(cfg)
        env = dict(os.environ, RUST_LOG="error", LLM_GATEWAY_GRACE_PERIOD_S="1",
                   LLM_GATEWAY_PID_FILE=f"{tmp}/pid", LLM_GATEWAY_UPGRADE_SOCK=f"{tmp}/sock", **PROVIDER_ENV, **self.gw_env)
        self.gw = subprocess.Popen(pinned([*self.gw_wrap, self.binary, "serve", "--config", f"{tmp}/gw.yaml"], self.gw_cpus), env=env,
                                   stderr=subprocess.DEVNULL)
        if not wait_http_ok(self.admin_port, "/readyz", proc=self.gw):  # readiness: the admin listener
            self.__exit__(None, None, None)
            sys.exit("gateway did not become ready")
        return self

    def __exit__(self, *exc):
        for p in (self.gw, self.mock):
            if p is not None:
                p.terminate()
        for p in (self.gw, self.mock):
            if p is None:
                continue
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="run CMD against a private mock + gateway")
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tenants")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given")
    raise_nofile()
    with Stack(a.bin, [], CONFIGS[a.config]) as st:
        env = dict(os.environ, GATEWAY=f"http://127.0.0.1:{st.port}", ADMIN=f"http://127.0.0.1:{st.admin_port}",
                   MOCK=f"http://127.0.0.1:{st.mock_port}", SPOOL=st.spool, ADMIN_TOKEN=ADMIN_TOKEN)
        return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

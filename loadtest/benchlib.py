"""Shared plumbing of the bench scripts: a private mock provider and gateway on free
loopback ports, started and stopped by the script itself."""
import hashlib, http.client, os, socket, subprocess, sys, tempfile, time


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


class Stack:
    """`with Stack(bin, mock_args, config_body) as s:` — `config_body(mock_port)` returns
    the providers/models/tenants part of the YAML; listen/admin/audit are added here
    (`audit_extra`: more YAML lines under `audit:`, e.g. a `clickhouse:` section;
    `spool_dir`: an existing spool to start on instead of a fresh one)."""

    def __init__(self, binary, mock_args, config_body, audit_extra="", spool_dir=None, https=None):
        """`https=(cert_path, key_path)` adds a `listen.https` listener (`self.https_port`)."""
        self.binary, self.mock_args, self.config_body = binary, mock_args, config_body
        self.audit_extra, self.spool_dir = audit_extra, spool_dir
        self.https = https

    def __enter__(self):
        tmp = tempfile.mkdtemp(prefix="llmgw-bench-")
        self.spool_dir = self.spool_dir or f"{tmp}/spool"
        self.mock = subprocess.Popen([self.binary, "mock-provider", "--listen", "127.0.0.1:0", *self.mock_args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.mock_port = int(self.mock.stdout.readline().strip().rsplit(":", 1)[1])
        self.port, self.admin_port = free_port(), free_port()
        listen = f"http: 127.0.0.1:{self.port}"
        if self.https:
            self.https_port = free_port()
            listen += (f", https: {{ addr: 127.0.0.1:{self.https_port}, cert: {self.https[0]}, "
                       f"key: {self.https[1]} }}")
        cfg = (f"node: {{ region: r1 }}\nlisten: {{ {listen} }}\n"
               f"admin: {{ listen: 127.0.0.1:{self.admin_port} }}\naudit:\n  spool_dir: {self.spool_dir}\n"
               + self.audit_extra + self.config_body(self.mock_port))
        with open(f"{tmp}/gw.yaml", "w") as f:
            f.write(cfg)
        env = dict(os.environ, RUST_LOG="error", LLM_GATEWAY_GRACE_PERIOD_S="1",
                   LLM_GATEWAY_PID_FILE=f"{tmp}/pid", LLM_GATEWAY_UPGRADE_SOCK=f"{tmp}/sock")
        self.gw = subprocess.Popen([self.binary, "serve", "--config", f"{tmp}/gw.yaml"], env=env,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:  # readiness: the admin listener's /readyz
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return self
            except OSError:
                pass
            if time.time() > deadline or self.gw.poll() is not None:
                self.__exit__(None, None, None)
                sys.exit("gateway did not become ready")
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.gw.terminate()
        self.mock.terminate()
        try:
            self.gw.wait(5)
        except subprocess.TimeoutExpired:
            self.gw.kill()

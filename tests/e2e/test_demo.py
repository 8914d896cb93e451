"""`llm-gateway demo` works as printed: the curl commands it prints, pasted into a
shell, get answers from the gateway on the embedded defaults."""
import re
import subprocess
import time

import httpx

from conftest import free_ports


def _wait(url: str, proc: subprocess.Popen, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "demo exited early"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # polling a readiness endpoint, with a deadline
    raise AssertionError(f"{url} never became ready")


def test_demo_prints_commands_that_work(gateway_bin, tmp_path):
    http_port, admin_port = free_ports(2)
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [str(gateway_bin), "demo", "--listen", f"127.0.0.1:{http_port}", "--admin", f"127.0.0.1:{admin_port}"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(f"http://127.0.0.1:{admin_port}/readyz", proc)
        text = out_path.read_text()
        # Each printed command: lines from `curl` to the first line not ending in a backslash.
        commands, cur = [], []
        for line in text.splitlines():
            if line.strip().startswith("curl ") or cur:
                cur.append(line.rstrip())
                if not line.rstrip().endswith("\\"):
                    commands.append("\n".join(cur))
                    cur = []
        assert len(commands) >= 4, text
        results = {}
        for cmd in commands:
            r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=20)
            assert r.returncode == 0, (cmd, r.stderr)
            results[cmd] = r.stdout
        joined = "\n".join(results.values())
        assert '"object":"list"' in joined, joined  # /v1/models
        assert '"chat.completion"' in joined, joined  # non-streamed
        assert "data: [DONE]" in joined, joined  # streamed
        assert '"providers"' in joined, joined  # admin API with the printed token
        # the store commands: a tenant created, a key issued and used, keys listed
        assert '"source":"store"' in joined, joined
        assert joined.count('"chat.completion"') >= 2, joined  # the new key was answered
        assert '"name":"backend"' in joined and "sk-gw-" not in results[commands[-1]], joined
        # the demo writes its audit rows to the local spool
        spool = tmp_path / "data" / "spool"
        rows: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(rows) < 3:
            time.sleep(0.05)
            rows = [l for f in spool.glob("audit-*.jsonl") for l in f.read_text().splitlines()]
        assert len(rows) >= 3, rows
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

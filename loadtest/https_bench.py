#!/usr/bin/env python3
"""Cost of `listen.https` against plain HTTP on the same gateway, measured in the same
run: non-streamed requests over a kept-alive connection (TLS record cost) and over a
new connection each (TLS handshake cost), HTTP/1.1; plus HTTP/2 against HTTP/1.1 over
TLS with the same client library (httpx) when the `h2` package is importable (run it
with .venv/bin/python).

Usage: python3 loadtest/https_bench.py [--bin target/release/llm-gateway] [-n 300]
Needs the `openssl` CLI (a throwaway CA and certificate are made in a temp dir).
Reports medians and p95 and ratios against plain HTTP with the same connection pattern.
"""
import argparse, http.client, json, ssl, statistics, subprocess, tempfile, time

from benchlib import Stack, one_model_config, pct

KEY = "sk-bench"


def config(mock_port):
    return one_model_config(mock_port, KEY)


def make_cert(d):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign")
    with open(f"{d}/leaf.ext", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "leaf.key",
        "-out", "leaf.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2",
        "-out", "leaf.pem", "-days", "1", "-extfile", "leaf.ext")
    return f"{d}/ca.pem", f"{d}/leaf.pem", f"{d}/leaf.key"


class H1:
    """http.client over plain TCP or TLS, kept alive or a new connection per request."""

    def __init__(self, port, ctx, keepalive):
        self.port, self.ctx, self.keepalive, self.conn = port, ctx, keepalive, None

    def _new(self):
        if self.ctx:
            return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=10)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def post(self, body, headers):
        if self.conn is None or not self.keepalive:
            if self.conn:
                self.conn.close()
            self.conn = self._new()
        self.conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        r = self.conn.getresponse()
        r.read()
        assert r.status == 200, r.status


class Httpx:
    """httpx over TLS, kept alive: HTTP/2, or HTTP/1.1 as its baseline (same client code,
    since the Python h2 stack is slower than http.client on its own)."""

    def __init__(self, port, ca, http2):
        import httpx
        self.url = f"https://127.0.0.1:{port}/v1/chat/completions"
        self.want = "HTTP/2" if http2 else "HTTP/1.1"
        self.c = httpx.Client(http2=http2, verify=ssl.create_default_context(cafile=ca), timeout=10)

    def post(self, body, headers):
        r = self.c.post(self.url, content=body, headers=headers)
        assert r.status_code == 200 and r.http_version == self.want, (r.status_code, r.http_version)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/llm-gateway")
    ap.add_argument("-n", type=int, default=300)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="llmgw-https-bench-")
    ca, cert, key = make_cert(d)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])  # httpx sets h2 on the context it gets: keep them apart
    with Stack(a.bin, ["--tokens", "8"], config, https=(cert, key)) as st:
        clients = {
            "http keep-alive": H1(st.port, None, True),
            "https keep-alive": H1(st.https_port, ctx, True),
            "http new conn": H1(st.port, None, False),
            "https new conn": H1(st.https_port, ctx, False),
        }
        try:
            clients["httpx h1 over TLS"] = Httpx(st.https_port, ca, http2=False)
            clients["httpx h2 over TLS"] = Httpx(st.https_port, ca, http2=True)
        except ImportError:
            print("(h2 not importable: HTTP/2 skipped; run with .venv/bin/python)")
        body = json.dumps({"model": "m1", "max_tokens": 8, "messages": [{"role": "user", "content": "bench"}]})
        headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
        for c in clients.values():  # warm-up
            for _ in range(20):
                c.post(body, headers)
        res = {name: [] for name in clients}
        for _ in range(a.n):  # interleaved, so drift hits every client alike
            for name, c in clients.items():
                t0 = time.perf_counter()
                c.post(body, headers)
                res[name].append((time.perf_counter() - t0) * 1000)
        print(f"{a.n} non-streamed requests per client, sequential, interleaved (mock: 8 tokens, no delay)")
        med = {}
        for name, xs in res.items():
            med[name] = statistics.median(xs)
            print(f"  {name:17s} median {med[name]:7.3f} ms  p95 {pct(xs, 0.95):7.3f} ms")
        print(f"  https/http keep-alive: ratio {med['https keep-alive'] / med['http keep-alive']:.3f}")
        print(f"  https/http new connection (handshake): ratio {med['https new conn'] / med['http new conn']:.3f}")
        if "httpx h2 over TLS" in med:
            print(f"  h2/h1 over TLS (httpx both): ratio {med['httpx h2 over TLS'] / med['httpx h1 over TLS']:.3f}")


if __name__ == "__main__":
    main()

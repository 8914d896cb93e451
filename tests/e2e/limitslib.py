"""What the limits e2e tests share: the test model's prices, worst-case arithmetic,
tenants with their own keys, and one request read to its end with its timings.

Reserve then settle: before anything goes upstream the gateway reserves the request's
worst case -- tokens = ceil(body bytes / 2) + output bound, cost = that many prompt
tokens at the input price plus the output bound at the output price (the output bound
is the client's `max_tokens`, else the model's `max_output_tokens`) -- so every figure
here is computed from the exact bytes a request sends.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx

from conftest import ADMIN_TOKEN, sha256_hex
from helpers import assert_openai_error, audit_rows, cost_nanousd, new_request_id

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}  # 1000 / 2000 nano-USD per token
LIM_MAX_OUT = 256          # max_output_tokens of `lim`
BIG_MAX_OUT = 100_000      # max_output_tokens of `lim-big`

TIMEOUT = httpx.Timeout(15.0, connect=3.0)


def new_client() -> httpx.Client:
    # Plain http: skipping the TLS context (about 40 ms to build) keeps bursts tight.
    return httpx.Client(timeout=TIMEOUT, verify=False)


def key_of(tenant: str) -> str:
    return f"sk-lim-{tenant}"


# --------------------------------------------------------------------------- bodies and worst cases


def raw(body: dict) -> bytes:
    """The exact bytes sent for `body` (the reservation depends on them)."""
    return json.dumps(body).encode()


def worst(body: dict | bytes) -> tuple[int, int]:
    """(tokens, cost_nanousd) the gateway must reserve for `body` on model `lim`/`lim-big`:
    prompt bound ceil(bytes/2), output bound the client's max_tokens (else the model's)."""
    data = body if isinstance(body, bytes) else raw(body)
    parsed = json.loads(data)
    out = parsed.get("max_completion_tokens") or parsed.get("max_tokens")
    if out is None:
        out = BIG_MAX_OUT if parsed.get("model") == "lim-big" else LIM_MAX_OUT
    prompt = math.ceil(len(data) / 2)
    return prompt + out, cost_nanousd(PRICE, prompt, out)

def usd(nanousd: int) -> float:
    """A budget in the config file (USD); exact as long as the float's shortest repr is."""
    v = nanousd / 1_000_000_000
    assert v >= 1e-4 and Decimal(repr(v)) * 1_000_000_000 == nanousd, nanousd
    return v


def _tenant(name: str, models: list[str] | None = None, **extra) -> dict:
    return {"api_keys": [{"id": f"{name}-key", "sha256": sha256_hex(key_of(name))}],
            "models": models or ["lim"], **extra}



# --------------------------------------------------------------------------- requests


class Call:
    """One finished request: status, headers, body bytes, when its headers and its end came."""

    def __init__(self, r: httpx.Response, body: bytes, t_head: float, t_end: float, rid: str):
        self.r, self.status, self.headers, self.body = r, r.status_code, r.headers, body
        self.t_head, self.t_end, self.rid = t_head, t_end, rid

    def header_int(self, name: str) -> int | None:
        v = self.headers.get(name)
        return None if v is None else int(v)

    def __repr__(self) -> str:
        return f"<{self.rid} {self.status} {self.body[:200]!r}>"


def call(gw, tenant: str, body: dict, path: str = "/v1/chat/completions", rid: str | None = None,
         barrier: threading.Barrier | None = None, on_head: threading.Event | None = None,
         key: str | None = None, warm: bool = False) -> Call:
    """Sends `body` (streamed or not, as it says) and reads the whole answer. With `warm`,
    the client's connection is opened first (by `GET /v1/models`, which no limit counts),
    so that a burst released by `barrier` is not spread out by connection set-up."""
    rid = rid or new_request_id("lim")
    h = {"content-type": "application/json", "authorization": f"Bearer {key or key_of(tenant)}",
         "x-request-id": rid}
    if path == "/v1/messages":
        h["anthropic-version"] = "2023-06-01"
    with new_client() as c:
        if warm:
            r = c.get(f"{gw.base_url}/v1/models", headers={"authorization": h["authorization"]})
            assert r.status_code == 200, r.text
        if barrier is not None:
            barrier.wait(timeout=10)
        with c.stream("POST", f"{gw.base_url}{path}", headers=h, content=raw(body)) as r:
            t_head = time.monotonic()
            if on_head is not None:
                on_head.set()
            data = r.read()
            t_end = time.monotonic()
    return Call(r, data, t_head, t_end, rid)


def burst(gw, tenant: str, body: dict, n: int, prefix: str) -> list[Call]:
    """`n` identical requests released together."""
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(call, gw, tenant, body, rid=new_request_id(prefix), barrier=barrier) for _ in range(n)]
        return [f.result() for f in futs]


def admin_get(gw, path: str, token: str | None = ADMIN_TOKEN) -> httpx.Response:
    h = {"authorization": f"Bearer {token}"} if token else {}
    with new_client() as c:
        return c.get(f"{gw.admin_url}{path}", headers=h)


def usage(gw, tenant: str) -> dict:
    r = admin_get(gw, f"/admin/v1/tenants/{tenant}/usage")
    assert r.status_code == 200, f"usage of {tenant}: {r.status_code} {r.text[:300]}"
    return r.json()


def row_of(gw, c: Call) -> dict:
    rows = audit_rows(gw, c.rid)
    assert len(rows) == 1, rows
    return rows[0]


def tenant_rows(gw, tenant: str) -> list[dict]:
    return [r for r in audit_rows(gw) if r.get("tenant") == tenant]


def wait_rows(gw, calls: list[Call]) -> list[dict]:
    """The audit row of every call (each written after the call settled its reservation)."""
    return [row_of(gw, c) for c in calls]


def is_stream_ok(c: Call) -> bool:
    return c.status == 200 and c.body.rstrip().endswith(b"data: [DONE]")


def assert_refused_row(row: dict, status: int, code: str) -> None:
    assert row["status"] == status and row["error_code"] == code, row
    assert row["cost_nanousd"] == 0 and row["tokens_in"] == 0 and row["tokens_out"] == 0, row
    assert row["provider"] == "" and row["attempts"] == 0, row


def start_of_fresh_second() -> None:
    """Sleeps until just after the next whole second (rps windows are UTC seconds)."""
    now = time.time()
    time.sleep(math.floor(now) + 1 - now + 0.01)


def retry_after(c: Call) -> int:
    v = c.headers.get("retry-after")
    assert v is not None and v.isdigit(), f"retry-after missing or not whole seconds: {v!r} ({c})"
    return int(v)


def spend_until_refused(gws: list, tenant: str, body: dict, spent_now, budget: int, tries: int = 50) -> int:
    """Sends `body` one request at a time, in turn to each of `gws`, while `spent_now()`
    plus its worst case fits `budget`: each of those must be served; the first that does
    not fit must get 402 with a refused audit row. Returns how many were served."""
    w = worst(body)[1]
    for i in range(tries):
        gw = gws[i % len(gws)]
        spent = spent_now()
        c = call(gw, tenant, body)
        if spent + w > budget:
            assert_openai_error(c.r, 402, "budget_exceeded")
            assert_refused_row(row_of(gw, c), 402, "budget_exceeded")
            return i
        assert c.status == 200, f"spent {spent} + worst case {w} <= {budget}: {c}"
        row_of(gw, c)
    raise AssertionError(f"the budget of {budget} was never reached in {tries} requests")

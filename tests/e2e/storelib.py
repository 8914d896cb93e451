"""Helpers for the tenant and key store tests: the admin API as a small client."""

from __future__ import annotations

import time
from typing import Any

import httpx

from conftest import ADMIN_TOKEN

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def admin(gw, method: str, path: str, body: Any = None, actor: str | None = None,
          timeout: float = 10.0) -> httpx.Response:
    headers = dict(ADMIN)
    if actor:
        headers["x-admin-actor"] = actor
    with httpx.Client(timeout=timeout) as c:
        return c.request(method, f"{gw.admin_url}{path}", headers=headers,
                         json=body if body is not None else None)


def create_tenant(gw, tid: str, actor: str | None = None, **fields) -> dict:
    body = {"id": tid, "models": ["gpt-4o-mini", "llama-70b"], **fields}
    r = admin(gw, "POST", "/admin/v1/tenants", body, actor=actor)
    assert r.status_code == 201, r.text
    return r.json()


def issue_key(gw, tid: str, **fields) -> dict:
    r = admin(gw, "POST", f"/admin/v1/tenants/{tid}/keys", fields)
    assert r.status_code == 201, r.text
    return r.json()


def models_status(gw, key: str) -> int:
    with httpx.Client(timeout=5.0) as c:
        return c.get(f"{gw.base_url}/v1/models", headers={"authorization": f"Bearer {key}"}).status_code


def wait_status(gw, key: str, status: int, deadline_s: float = 10.0) -> float:
    """Seconds until `GET /v1/models` with `key` answers `status` (polled, with a deadline)."""
    # One kept-alive connection, made before the clock starts (an httpx client loads
    # its CA bundle when created: ~40 ms), so the delay measured is the gateway's.
    with httpx.Client(timeout=5.0) as c:
        t0 = time.monotonic()
        while True:
            r = c.get(f"{gw.base_url}/v1/models", headers={"authorization": f"Bearer {key}"})
            if r.status_code == status:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < deadline_s, f"{key[:10]}... never answered {status}"


def percentiles(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    p = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return p(0.5), p(0.99), s[-1]

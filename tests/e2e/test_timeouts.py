"""Stream timeouts after the first byte: the idle gap and the total bound end the
stream with an `upstream_timeout` error event, never a silent clean end, on time."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers import ACME, chat_body


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway({
        "providers": {
            "inhouse": {"timeouts": {"connect_ms": 1000, "first_token_ms": 2000, "idle_ms": 500, "total_ms": 2500}},
        },
    })


def stream(gw, prompt):
    t0 = time.monotonic()
    with httpx.Client(timeout=10) as c:
        r = c.post(gw.base_url + "/v1/chat/completions",
                   headers={"authorization": f"Bearer {ACME}"},
                   json=chat_body(prompt, model="llama-70b", stream=True))
    return r, time.monotonic() - t0


def last_event(r):
    data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
    assert data and "[DONE]" not in data, r.text[-400:]
    return json.loads(data[-1])


def test_idle_gap_ends_the_stream_with_a_timeout_event(gw, mock):
    r, elapsed = stream(gw, "[[mock: ttft_ms=0; tokens=4; gap_ms=1500]]")
    assert r.status_code == 200
    assert 0.45 <= elapsed < 1.4, elapsed  # idle_ms 500, not the 1.5 s gap nor total_ms
    ev = last_event(r)
    assert ev["error"]["code"] == "upstream_timeout", ev


def test_total_bound_ends_a_long_stream(gw, mock):
    r, elapsed = stream(gw, "[[mock: ttft_ms=0; tokens=100; gap_ms=100]]")
    assert r.status_code == 200
    assert 2.4 <= elapsed < 3.5, elapsed  # total_ms 2500, although every gap is short
    ev = last_event(r)
    assert ev["error"]["code"] == "upstream_timeout", ev
    content = [ln for ln in r.text.splitlines() if '"content":"' in ln]
    assert len(content) >= 10, "tokens before the bound reached the client"

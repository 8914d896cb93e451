"""No tenant key, provider credential, admin token or prompt text leaks into logs,
metrics, audit rows or error bodies.

A gateway of its own runs at `RUST_LOG=debug` (more than operators run) and is fed a
mix of traffic that carries unique marker strings: good and bad keys, prompts, streams,
upstream errors, rejected and malformed requests. Afterwards every place an operator
or a tenant can read is searched for the markers.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from conftest import ADMIN_TOKEN, UPSTREAM_ENV, sha256_hex
from helpers import audit_rows, chat_body, new_request_id, post_chat, read_audit, spool_dir

MARK = uuid.uuid4().hex[:12]
TENANT_KEY = f"sk-tenant-secret-{MARK}"
WRONG_KEY = f"sk-wrong-secret-{MARK}"
PROMPT = f"confidential-prompt-{MARK}"


@pytest.fixture(scope="module")
def gw(gateway):
    leaky = {
        "api_keys": [{"id": "leaky-key", "sha256": sha256_hex(TENANT_KEY)}],
        "models": ["gpt-4o-mini", "claude-haiku"],
        "fallback": ["claude-haiku"],
        "rate": {"rps": 1000, "concurrency": 50},
        "budget": {"monthly_usd": 1000},
    }
    return gateway({"tenants": {"leaky": leaky}}, env={"RUST_LOG": "debug"})


def traffic(gw) -> list[bytes]:
    """Sends the mix; returns every response body the clients saw."""
    bodies: list[bytes] = []
    chat = f"{gw.base_url}/v1/chat/completions"
    msgs = f"{gw.base_url}/v1/messages"
    good = {"authorization": f"Bearer {TENANT_KEY}"}
    with httpx.Client(timeout=10) as c:
        def send(url, headers, body):
            r = c.post(url, headers=headers, content=body if isinstance(body, bytes) else json.dumps(body))
            bodies.append(r.content)
            return r

        base = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
        assert send(chat, good, base).status_code == 200
        assert send(chat, good, {**base, "stream": True}).status_code == 200
        assert send(msgs, {"x-api-key": TENANT_KEY}, {"model": "claude-haiku", "max_tokens": 20,
                                                     "messages": [{"role": "user", "content": PROMPT}]}).status_code == 200
        # Unknown keys, in both places a key can be sent.
        assert send(chat, {"authorization": f"Bearer {WRONG_KEY}"}, base).status_code == 401
        assert send(msgs, {"x-api-key": WRONG_KEY}, base).status_code == 401
        # Upstream errors (the first fails over, the second fails everywhere).
        failing = {"model": "gpt-4o-mini",
                   "messages": [{"role": "user", "content": f"[[mock: status=500]] {PROMPT}"}]}
        send(chat, good, failing)
        send(chat, {**good, "x-gateway-fallback": "gpt-4o-mini"}, failing)
        # Malformed and refused requests that carry the prompt.
        assert send(chat, good, f'{{"model": "gpt-4o-mini", "messages": "{PROMPT}"'.encode()).status_code == 400
        assert send(chat, good, {**base, "model": "model-that-does-not-exist"}).status_code in (400, 403)
        # Admin calls with a wrong token and the right one.
        r = c.get(f"{gw.admin_url}/admin/v1/tenants/leaky/usage", headers={"authorization": f"Bearer {WRONG_KEY}"})
        assert r.status_code == 401
        bodies.append(r.content)
        r = c.get(f"{gw.admin_url}/admin/v1/tenants/leaky/audit",
                  headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200
        bodies.append(r.content)
    return bodies


def test_no_secret_or_prompt_anywhere(gw):
    bodies = traffic(gw)
    with httpx.Client(timeout=10) as c:
        metrics = c.get(f"{gw.admin_url}/metrics").text
    # Rows leave the queue in order: once a last request's row is in the spool, every
    # earlier one is too.
    last = new_request_id("secrets-last")
    assert post_chat(gw, chat_body("last"), key=TENANT_KEY, headers={"x-request-id": last}).status_code == 200
    audit_rows(gw, last)
    rows = read_audit(gw)
    assert any(r["tenant"] == "leaky" for r in rows), "the traffic left no audit rows"
    audit_text = "\n".join(json.dumps(r) for r in rows)
    spool_raw = "".join(p.read_text() for p in spool_dir(gw).glob("**/*") if p.is_file())
    log = gw.log_path.read_text(errors="replace")
    assert log.strip(), "the debug log is empty: the test would see nothing"

    secrets = {
        "tenant key": TENANT_KEY,
        "wrong key": WRONG_KEY,
        "upstream OpenAI key": UPSTREAM_ENV["MOCK_OPENAI_KEY"],
        "upstream Anthropic key": UPSTREAM_ENV["MOCK_ANTHROPIC_KEY"],
        "admin token": ADMIN_TOKEN,
    }
    places = {"log": log, "metrics": metrics, "audit rows": audit_text, "spool files": spool_raw,
              "response bodies": b"\n".join(bodies).decode(errors="replace")}
    for place, text in places.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {place}"
    # Prompts may come back in answers (the mock echoes), but never go to the
    # operator's side.
    for place in ("log", "metrics", "audit rows", "spool files"):
        assert MARK not in places[place] or all(
            TENANT_KEY not in line and WRONG_KEY not in line for line in places[place].splitlines()
        ), place
        assert PROMPT not in places[place], f"prompt text found in {place}"

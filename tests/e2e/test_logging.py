"""Structured logs: with `LLM_GATEWAY_LOG_FORMAT=json` every line the process writes is
one JSON object (ts, level, target, msg), each request has a line with its id, tenant,
model and status, and nothing logged carries an API key, the provider key, the admin
token or prompt text -- even at `RUST_LOG=debug`."""

from __future__ import annotations

import json

import httpx

from conftest import ADMIN_TOKEN, UPSTREAM_ENV
from helpers import ACME, audit_rows, chat_body, messages_body, new_request_id, post_chat, post_messages

MARKER = "PROMPT-TEXT-7f3a9c"
WRONG_KEY = "sk-wrong-key-5e1d"
JSON_DEBUG = {"LLM_GATEWAY_LOG_FORMAT": "json", "RUST_LOG": "debug"}


def log_lines(gw) -> list[str]:
    return gw.log_path.read_text(errors="replace").splitlines()


def traffic(gw) -> dict[str, str]:
    """A mix of outcomes, every one carrying the marker in its prompt; returns request ids."""
    ids = {k: new_request_id(f"log-{k}") for k in ("ok", "stream", "messages", "badkey", "badjson", "upstream")}
    h = lambda k: {"x-request-id": ids[k]}  # noqa: E731
    assert post_chat(gw, chat_body(f"{MARKER} [[mock: tokens=2]]"), headers=h("ok")).status_code == 200
    assert post_chat(gw, chat_body(f"{MARKER} [[mock: tokens=2]]", stream=True),
                     headers=h("stream")).status_code == 200
    assert post_messages(gw, messages_body(f"{MARKER} [[mock: tokens=2]]"), headers=h("messages")).status_code == 200
    assert post_chat(gw, chat_body(MARKER), key=WRONG_KEY, headers=h("badkey")).status_code == 401
    assert post_chat(gw, f'{{"messages": [{{"role": "user", "content": "{MARKER}"'.encode(),
                     headers=h("badjson")).status_code == 400
    r = post_chat(gw, chat_body(f"{MARKER} [[mock: status=500]]"), headers=h("upstream"))
    assert r.status_code >= 500, r.text
    assert httpx.get(gw.admin_url + "/admin/v1/providers",
                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    for rid in ids.values():
        audit_rows(gw, rid)  # the request has ended (its log line precedes its audit row)
    return ids


def test_json_lines_with_request_fields_and_no_secrets(gateway, mock):
    gw = gateway({"node": {"region": "log-json"}}, env=JSON_DEBUG)
    ids = traffic(gw)
    lines = log_lines(gw)
    assert lines
    objs = []
    for ln in lines:
        obj = json.loads(ln)  # every line is JSON
        assert isinstance(obj, dict) and {"ts", "level", "target", "msg"} <= set(obj), ln
        assert obj["level"] in {"ERROR", "WARN", "INFO", "DEBUG", "TRACE"}, ln
        objs.append(obj)
    requests = {o["request_id"]: o for o in objs if o["msg"] == "request" and "request_id" in o}
    ok = requests[ids["ok"]]
    assert (ok["tenant"], ok["model"], ok["status"], ok["endpoint"]) == ("acme", "gpt-4o-mini", 200,
                                                                        "chat_completions"), ok
    assert requests[ids["stream"]]["status"] == 200
    assert requests[ids["messages"]]["endpoint"] == "messages"
    assert (requests[ids["badkey"]]["status"], requests[ids["badkey"]]["tenant"]) == (401, "")
    assert requests[ids["badjson"]]["status"] == 400
    upstream = requests[ids["upstream"]]
    assert upstream["status"] >= 500 and upstream["level"] == "WARN", upstream

    text = "\n".join(lines)
    for secret in (MARKER, ACME, WRONG_KEY, ADMIN_TOKEN, *UPSTREAM_ENV.values()):
        assert secret not in text, f"{secret!r} appears in the logs"


def test_dependency_debug_is_only_on_when_asked_for(gateway, mock):
    """The secrets guard is what keeps Pingora's debug records (upstream headers with the
    provider key, body chunks) out: with the explicit opt-in they do appear."""
    quiet = gateway({"node": {"region": "log-quiet"}}, env=JSON_DEBUG)
    loud = gateway({"node": {"region": "log-loud"}},
                   env={**JSON_DEBUG, "LLM_GATEWAY_LOG_DEPENDENCY_DEBUG": "1"})
    for gw in (quiet, loud):
        rid = new_request_id("log-dep")
        assert post_chat(gw, chat_body("x [[mock: tokens=1]]"), headers={"x-request-id": rid}).status_code == 200
        audit_rows(gw, rid)

    def dependency_debug(gw) -> int:
        return sum(1 for ln in log_lines(gw)
                   if (o := json.loads(ln))["level"] in ("DEBUG", "TRACE") and not o["target"].startswith("llm_gateway"))

    assert dependency_debug(quiet) == 0
    assert dependency_debug(loud) > 0


def test_json_by_default_under_the_systemd_journal_text_when_asked(gateway, mock):
    journal = gateway({"node": {"region": "log-journal"}}, env={"JOURNAL_STREAM": "9:12345"})
    assert all(json.loads(ln)["msg"] is not None for ln in log_lines(journal))
    text = gateway({"node": {"region": "log-text"}}, env={"LLM_GATEWAY_LOG_FORMAT": "text"})
    lines = log_lines(text)
    assert lines and not any(ln.lstrip().startswith("{") for ln in lines), lines[:2]

"""Providers of kind `azure_openai` (issue 16, the Azure part), through the binary, the
official `openai` SDK and the mock provider's Azure route.

The Azure provider sits on the session mock under the path prefix `/az`, so its requests
are told apart from the other providers' in the mock's log; requests go to
`/az/openai/deployments/{upstream_model}/chat/completions?api-version=...` with the key in
`api-key`. The mock refuses that route without `api-version` (404) or `api-key` (401), so
a gateway that got either wrong fails every test here.
"""

from __future__ import annotations

import uuid

import pytest
from anthropic import Anthropic
from openai import OpenAI

from conftest import sha256_hex
from helpers import audit_rows, chat_body, new_request_id, post_chat

AZURE_KEY = "sk-upstream-azure"
TENANT = "sk-azure-tenant-test"
API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt4o-prod"
AZURE_PATH = f"/az/openai/deployments/{DEPLOYMENT}/chat/completions"
INHOUSE_PATH = "/inhouse/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Tell me something deterministic."}]


@pytest.fixture(scope="module")
def gw(gateway, mock_provider):
    overrides = {
        "providers": {
            "azure": {
                "kind": "azure_openai",
                "base_url": f"{mock_provider.url}/az",
                "api_version": API_VERSION,
                "api_key_env": "MOCK_AZURE_KEY",
                "region": "us-east-1",
            },
        },
        "models": {
            "azure-gpt": {
                "provider": "azure",
                "upstream_model": DEPLOYMENT,
                "price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
                "max_output_tokens": 4096,
            },
        },
        "tenants": {
            "azt": {
                "api_keys": [{"id": "azt-key", "sha256": sha256_hex(TENANT)}],
                "models": ["azure-gpt", "llama-70b"],
                "fallback": ["llama-70b"],
            },
        },
    }
    return gateway(overrides, env={"MOCK_AZURE_KEY": AZURE_KEY})


def sdk(gw, rid: str) -> OpenAI:
    return OpenAI(base_url=gw.base_url + "/v1", api_key=TENANT, max_retries=0, timeout=15,
                  default_headers={"x-request-id": rid})


def azure_request(mock) -> dict:
    """The one request the mock got on the Azure route, checked for Azure's wire shape."""
    rec = mock.only_request(AZURE_PATH)
    assert rec["query"] == f"api-version={API_VERSION}"
    assert rec["headers"].get("api-key") == AZURE_KEY
    assert "authorization" not in rec["headers"], "Azure takes api-key, not a bearer token"
    return rec


def one_row(gw, rid: str) -> dict:
    rows = audit_rows(gw, rid)
    assert len(rows) == 1, rows
    return rows[0]


def test_non_streaming_chat_goes_to_the_deployment_path(gw, mock):
    rid = new_request_id("az")
    resp = sdk(gw, rid).chat.completions.create(model="azure-gpt", messages=PROMPT)
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    rec = azure_request(mock)
    assert rec["model"] == DEPLOYMENT
    row = one_row(gw, rid)
    assert (row["provider"], row["model"], row["status"]) == ("azure", "azure-gpt", 200)
    assert (row["tokens_in"], row["tokens_out"]) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert row["usage_estimated"] in (0, False)
    assert row["cost_nanousd"] > 0


def test_streaming_chat_asks_azure_for_usage_and_counts_it(gw, mock):
    rid = new_request_id("az")
    chunks = list(sdk(gw, rid).chat.completions.create(model="azure-gpt", messages=PROMPT, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.usage is None for c in chunks), "the client did not ask for the usage chunk"
    rec = azure_request(mock)
    assert rec["stream"] is True and rec["include_usage"] is True
    row = one_row(gw, rid)
    assert row["provider"] == "azure" and row["stream"] in (1, True)
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0
    assert row["usage_estimated"] in (0, False)


def test_anthropic_messages_are_served_by_an_azure_model(gw, mock):
    c = Anthropic(base_url=gw.base_url, api_key=TENANT, max_retries=0, timeout=15)
    msg = c.messages.create(model="azure-gpt", max_tokens=64, messages=PROMPT)
    assert msg.content and msg.content[0].text
    assert msg.usage.output_tokens > 0
    azure_request(mock)


@pytest.mark.parametrize("status", [429, 503])
def test_an_azure_failure_fails_over_to_the_next_model(gw, mock, status):
    rid = new_request_id("az")
    # retry_after=0: a refusal that asks for no pause, so the deployment is not parked
    # (cooldowns are tests/e2e/test_deployments.py's) and the next case starts clean.
    x_mock = f"fail_first=1;key={uuid.uuid4().hex};status={status};retry_after=0"
    r = post_chat(gw, chat_body(model="azure-gpt"), key=TENANT,
                  headers={"x-request-id": rid, "x-mock": x_mock})
    assert r.status_code == 200, r.text[:300]
    assert (r.headers.get("x-gateway-model"), r.headers.get("x-gateway-provider")) == ("llama-70b", "inhouse")
    assert r.headers.get("x-gateway-attempts") == "2"
    paths = [q["path"] for q in mock.requests()]
    assert paths == [AZURE_PATH, INHOUSE_PATH], paths
    row = one_row(gw, rid)
    assert (row["model_requested"], row["model"], row["attempts"]) == ("azure-gpt", "llama-70b", 2)
    assert row["fallback_used"] in (1, True)

"""The tenant and key store on SQLite, driven through the admin API of the real binary.

Checked: tenant CRUD with field-named validation and the contract's 409s; keys issued
(secret once, `sk-gw-` + 32+ base62), listed without secrets, narrowed to a subset of
models, disabled, rotated with a grace period, revoked; the change log; a deleted
tenant's keys refused while its usage stays readable; a reload that adds an id the
store holds refused; `import-tenants` idempotent and its keys served from the store;
no secret or hash in logs, metrics, audit rows or admin answers.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
import yaml

from conftest import ADMIN_TOKEN, sha256_hex
from helpers import assert_openai_error, audit_rows, chat_body, new_request_id, post_chat, read_audit
from storelib import admin, create_tenant, issue_key, models_status, wait_status

SQLITE = {"store": {"backend": "sqlite", "path": "./tenants.db", "snapshot": "./store.snapshot.json"}}


@pytest.fixture
def gw(gateway):
    return gateway(SQLITE)


def test_tenant_crud_validation_and_conflicts(gw):
    t = create_tenant(gw, "crud-co", rate={"rps": 20}, budget={"monthly_usd": 12.5})
    assert t["source"] == "store" and t["disabled"] is False and t["budget"] == {"monthly_usd": 12.5}

    r = admin(gw, "POST", "/admin/v1/tenants", {"id": "crud-co", "models": ["gpt-4o-mini"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_exists", r.text
    r = admin(gw, "POST", "/admin/v1/tenants", {"id": "acme", "models": ["gpt-4o-mini"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_in_config_file", r.text
    r = admin(gw, "PATCH", "/admin/v1/tenants/acme", {"rate": {"rps": 1}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_in_config_file", r.text

    cases = [
        ({"id": "v1", "models": ["gpt-4o-mini", "no-such-model"]}, "models[1]"),
        ({"id": "v2", "models": ["gpt-4o-mini"], "rate": {"rpz": 1}}, "rate.rpz"),
        ({"id": "v3", "models": ["gpt-4o-mini"], "colour": "red"}, "colour"),
        ({"id": "v4", "models": ["gpt-4o-mini"], "budget": {"monthly_usd": -3}}, "budget.monthly_usd"),
        ({"id": "bad/id", "models": ["gpt-4o-mini"]}, "id"),
        ({"models": ["gpt-4o-mini"]}, "id"),
        ({"id": "v5", "models": ["gpt-4o-mini"], "api_keys": []}, "api_keys"),
    ]
    for body, field in cases:
        r = admin(gw, "POST", "/admin/v1/tenants", body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and field in [f["field"] for f in err["fields"]], (body, err)
    r = httpx.post(f"{gw.admin_url}/admin/v1/tenants", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                   content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.admin_url}/admin/v1/tenants", json={"id": "x", "models": ["gpt-4o-mini"]})
    assert r.status_code == 401

    # PATCH is a JSON merge patch; GET reads it back; the list has file tenants too.
    r = admin(gw, "PATCH", "/admin/v1/tenants/crud-co", {"rate": {"tpm": 5000}, "budget": None})
    assert r.status_code == 200, r.text
    got = admin(gw, "GET", "/admin/v1/tenants/crud-co").json()
    assert got["rate"] == {"rps": 20, "tpm": 5000} and "budget" not in got, got
    listing = admin(gw, "GET", "/admin/v1/tenants").json()["tenants"]
    sources = {t["id"]: t["source"] for t in listing}
    assert sources["acme"] == "file" and sources["crud-co"] == "store", sources
    assert admin(gw, "GET", "/admin/v1/tenants/nope").status_code == 404
    page = admin(gw, "GET", "/admin/v1/tenants?limit=1").json()
    assert len(page["tenants"]) == 1 and page["next_after"] == page["tenants"][0]["id"]

    # A tenant's policy applies to new requests at once.
    k = issue_key(gw, "crud-co")
    r = post_chat(gw, chat_body(model="gpt-4o-mini"), key=k["key"])
    assert r.status_code == 200, r.text
    admin(gw, "PATCH", "/admin/v1/tenants/crud-co", {"models": ["llama-70b"]})
    r = post_chat(gw, chat_body(model="gpt-4o-mini"), key=k["key"])
    assert_openai_error(r, 403, "model_not_allowed")

    # DELETE disables: the keys answer 401, the usage stays readable.
    r = admin(gw, "DELETE", "/admin/v1/tenants/crud-co")
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert models_status(gw, k["key"]) == 401
    u = admin(gw, "GET", "/admin/v1/tenants/crud-co/usage")
    assert u.status_code == 200 and u.json()["requests"] >= 1, u.text
    r = admin(gw, "POST", "/admin/v1/tenants/crud-co/keys", {})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_disabled"
    # ... and PATCH {"disabled": false} brings it back.
    assert admin(gw, "PATCH", "/admin/v1/tenants/crud-co", {"disabled": False}).status_code == 200
    assert models_status(gw, k["key"]) == 200


def test_key_lifecycle_with_the_openai_sdk(gw):
    create_tenant(gw, "keys-co")
    k = issue_key(gw, "keys-co", name="backend", models=["llama-70b"], rate={"rps": 50},
                  budget={"monthly_usd": 3})
    secret = k["key"]
    assert re.fullmatch(r"sk-gw-[0-9A-Za-z]{32,}", secret), secret
    assert k["name"] == "backend" and k["models"] == ["llama-70b"]

    listed = admin(gw, "GET", "/admin/v1/tenants/keys-co/keys").json()["keys"]
    text = json.dumps(listed)
    assert [x["id"] for x in listed] == [k["id"]]
    assert secret not in text and sha256_hex(secret) not in text and "sha256" not in text, text

    c = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=secret, max_retries=0)
    out = c.chat.completions.create(model="llama-70b", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_allowed"
    # No model named: the first of the tenant's models this key may use.
    r = post_chat(gw, chat_body(model=None), key=secret)
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "llama-70b", r.text
    # The key's id is what the audit row records.
    rid = new_request_id("store")
    post_chat(gw, chat_body(model="llama-70b"), key=secret, headers={"x-request-id": rid})
    row = audit_rows(gw, rid)[0]
    assert (row["tenant"], row["api_key_id"]) == ("keys-co", k["id"]), row

    # A key may only narrow its tenant's models; unknown fields are refused.
    r = admin(gw, "POST", "/admin/v1/tenants/keys-co/keys", {"models": ["claude-haiku"]})
    assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "models[0]", r.text
    r = admin(gw, "POST", "/admin/v1/tenants/keys-co/keys", {"sha256": "ab" * 32})
    assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "sha256", r.text
    r = admin(gw, "POST", "/admin/v1/tenants/keys-co/keys", {"id": k["id"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_exists"

    # Disabled, then enabled again.
    assert admin(gw, "PATCH", f"/admin/v1/tenants/keys-co/keys/{k['id']}", {"disabled": True}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="llama-70b", messages=[{"role": "user", "content": "hi"}])
    assert admin(gw, "PATCH", f"/admin/v1/tenants/keys-co/keys/{k['id']}", {"disabled": False}).status_code == 200
    assert models_status(gw, secret) == 200

    # Rotation: the new secret at once, the old one for the grace period only.
    r = admin(gw, "POST", f"/admin/v1/tenants/keys-co/keys/{k['id']}/rotate", {"grace_s": 2})
    assert r.status_code == 201, r.text
    new = r.json()["key"]
    assert new != secret and r.json()["previous_secret_valid_until"]
    assert models_status(gw, new) == 200 and models_status(gw, secret) == 200
    waited = wait_status(gw, secret, 401, deadline_s=5)
    assert 0.5 < waited < 3.5, waited
    assert models_status(gw, new) == 200
    r = admin(gw, "POST", f"/admin/v1/tenants/keys-co/keys/{k['id']}/rotate", {"grace": 1})
    assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "grace"

    # Expired keys are refused.
    past = issue_key(gw, "keys-co", expires_at="2021-01-01T00:00:00Z")
    r = post_chat(gw, chat_body(model="llama-70b"), key=past["key"])
    assert_openai_error(r, 401, "invalid_api_key")

    # Revoked: 401, still listed as revoked, not patchable.
    r = admin(gw, "DELETE", f"/admin/v1/tenants/keys-co/keys/{k['id']}")
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert models_status(gw, new) == 401
    r = admin(gw, "PATCH", f"/admin/v1/tenants/keys-co/keys/{k['id']}", {"name": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_revoked"


def test_change_log_and_no_secret_anywhere(gw):
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    create_tenant(gw, "log-co", actor="alice@ops")
    k = issue_key(gw, "log-co", name="svc")
    rot = admin(gw, "POST", f"/admin/v1/tenants/log-co/keys/{k['id']}/rotate", {"grace_s": 0}).json()
    admin(gw, "PATCH", f"/admin/v1/tenants/log-co/keys/{k['id']}", {"rate": {"rps": 3}})
    admin(gw, "DELETE", f"/admin/v1/tenants/log-co/keys/{k['id']}")
    r = admin(gw, "GET", f"/admin/v1/changes?since={since}")
    assert r.status_code == 200, r.text
    mine = [c for c in r.json()["changes"] if c["tenant"] == "log-co"]
    assert [c["action"] for c in mine] == ["tenant.create", "key.create", "key.rotate", "key.update", "key.revoke"]
    assert mine[0]["actor"] == "alice@ops" and mine[0]["fields"]["models"] == ["gpt-4o-mini", "llama-70b"]
    assert mine[3]["fields"] == {"rate": {"rps": 3}} and mine[3]["key_id"] == k["id"]
    assert admin(gw, "GET", "/admin/v1/changes?since=yesterday").status_code == 400

    secrets = [k["key"], rot["key"]]
    hashes = [sha256_hex(s) for s in secrets]
    post_chat(gw, chat_body(model="llama-70b"), key=secrets[1])
    haystacks = {
        "log": gw.log_path.read_text(errors="replace"),
        "metrics": httpx.get(f"{gw.admin_url}/metrics").text,
        "audit": json.dumps(read_audit(gw)),
        "changes": r.text,
        "tenants": admin(gw, "GET", "/admin/v1/tenants").text,
        "keys": admin(gw, "GET", "/admin/v1/tenants/log-co/keys").text,
        "tenant": admin(gw, "GET", "/admin/v1/tenants/log-co").text,
    }
    for where, text in haystacks.items():
        for s in secrets + hashes:
            assert s not in text, f"{s[:12]}... found in {where}"


def test_reload_refuses_a_file_tenant_the_store_holds(gateway, tmp_path):
    gw = gateway({**SQLITE, "node": {"region": "us-east-1", }, "max_body_bytes": 4194305})
    create_tenant(gw, "clash-co")
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["tenants"]["clash-co"] = {"api_keys": [{"id": "f", "sha256": sha256_hex("sk-file-clash")}],
                                  "models": ["gpt-4o-mini"]}
    original = gw.config_path.read_text()
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        r = admin(gw, "POST", "/admin/v1/reload")
        assert r.status_code == 400 and "clash-co" in r.json()["error"], r.text
        assert models_status(gw, "sk-file-clash") == 401
    finally:
        gw.config_path.write_text(original)
    assert admin(gw, "POST", "/admin/v1/reload").status_code == 200
    # The store tenant survived the reload and still serves.
    k = issue_key(gw, "clash-co")
    assert models_status(gw, k["key"]) == 200


def test_import_tenants_is_idempotent_and_the_store_serves_them(gateway, run_cli, tmp_path):
    import_cfg = dict(yaml.safe_load(gateway(SQLITE).config_path.read_text()))
    db = tmp_path / "import.db"
    import_cfg["store"] = {"backend": "sqlite", "path": str(db)}
    import_cfg["tenants"] = {
        "imp-a": {"api_keys": [{"id": "a1", "sha256": sha256_hex("sk-imp-a"), "rate": {"rps": 5}}],
                  "models": ["gpt-4o-mini"], "budget": {"monthly_usd": 7}},
        "imp-b": {"api_keys": [{"id": "b1", "sha256": sha256_hex("sk-imp-b")}], "models": ["llama-70b"]},
    }
    path = tmp_path / "import.yaml"
    path.write_text(yaml.safe_dump(import_cfg, sort_keys=False))
    first = run_cli("import-tenants", "--config", path)
    assert first.returncode == 0, first.stderr
    assert "2 created" in first.stdout and "2 added" in first.stdout, first.stdout
    again = run_cli("import-tenants", "--config", path)
    assert again.returncode == 0 and "2 unchanged" in again.stdout and "0 added" in again.stdout, again.stdout
    no_store = dict(import_cfg)
    no_store.pop("store")
    path.write_text(yaml.safe_dump(no_store, sort_keys=False))
    r = run_cli("import-tenants", "--config", path)
    assert r.returncode != 0 and "store" in r.stderr

    # A gateway on that database without those tenants in its file serves them.
    gw = gateway({"store": {"backend": "sqlite", "path": str(db)}})
    for key, model in (("sk-imp-a", "gpt-4o-mini"), ("sk-imp-b", "llama-70b")):
        r = post_chat(gw, chat_body(model=model), key=key)
        assert r.status_code == 200, r.text
    t = admin(gw, "GET", "/admin/v1/tenants/imp-a").json()
    assert t["source"] == "store" and t["budget"] == {"monthly_usd": 7}
    keys = admin(gw, "GET", "/admin/v1/tenants/imp-a/keys").json()["keys"]
    assert keys[0]["rate"] == {"rps": 5} and "sha256" not in json.dumps(keys)


def test_file_keys_take_their_own_fields(gateway):
    gw = gateway({"tenants": {"keyed": {
        "api_keys": [
            {"id": "old", "sha256": sha256_hex("sk-keyed-old"), "expires_at": "2020-01-01T00:00:00Z"},
            {"id": "off", "sha256": sha256_hex("sk-keyed-off"), "disabled": True},
            {"id": "narrow", "sha256": sha256_hex("sk-keyed-narrow"), "models": ["llama-70b"]},
        ],
        "models": ["gpt-4o-mini", "llama-70b"],
    }}})
    assert_openai_error(post_chat(gw, chat_body(), key="sk-keyed-old"), 401, "invalid_api_key")
    assert_openai_error(post_chat(gw, chat_body(), key="sk-keyed-off"), 401, "invalid_api_key")
    assert_openai_error(post_chat(gw, chat_body(model="gpt-4o-mini"), key="sk-keyed-narrow"), 403,
                        "model_not_allowed")
    assert post_chat(gw, chat_body(model="llama-70b"), key="sk-keyed-narrow").status_code == 200
    # Read-only through the API, listed with their fields.
    keys = admin(gw, "GET", "/admin/v1/tenants/keyed/keys").json()["keys"]
    assert [k["source"] for k in keys] == ["file"] * 3 and keys[2]["models"] == ["llama-70b"]
    r = admin(gw, "POST", "/admin/v1/tenants/keyed/keys", {})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_in_config_file"

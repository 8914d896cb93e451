"""`check-config` and `hash-key`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from conftest import base_config, deep_merge


def write_config(tmp_path: Path, overrides: dict | None = None) -> Path:
    cfg = deep_merge(base_config("http://127.0.0.1:9", 18080, 19090, tmp_path), overrides)
    p = tmp_path / "gateway.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def output(res) -> str:
    return res.stdout + res.stderr


def test_check_config_accepts_a_good_file(run_cli, tmp_path):
    res = run_cli("check-config", "--config", write_config(tmp_path))
    assert res.returncode == 0, output(res)


def test_check_config_reports_every_problem_with_its_path(run_cli, tmp_path):
    path = write_config(tmp_path, {
        "models": {"llama-70b": {"provider": "no-such-provider"}},
        "tenants": {"solo": {"models": ["no-such-model"]}},
    })
    res = run_cli("check-config", "--config", path)
    out = output(res)
    assert res.returncode != 0, out
    assert "models.llama-70b.provider" in out, out
    assert "tenants.solo.models" in out, out


def test_check_config_names_the_path_of_an_unknown_key(run_cli, tmp_path):
    path = write_config(tmp_path, {"tenants": {"acme": {"rate": {"rps": 10, "rpz": 5}}}})
    res = run_cli("check-config", "--config", path)
    out = output(res)
    assert res.returncode != 0, out
    assert "tenants.acme.rate" in out and "rpz" in out, out


def test_check_config_missing_file(run_cli, tmp_path):
    res = run_cli("check-config", "--config", tmp_path / "nope.yaml")
    assert res.returncode != 0
    assert "nope.yaml" in output(res)


def test_hash_key_prints_sha256(run_cli):
    res = run_cli("hash-key", "sk-x")
    assert res.returncode == 0, output(res)
    assert res.stdout.strip() == hashlib.sha256(b"sk-x").hexdigest()


def test_serve_refuses_an_invalid_config(run_cli, tmp_path):
    path = write_config(tmp_path, {"tenants": {"solo": {"models": ["no-such-model"]}}})
    res = run_cli("serve", "--config", path, timeout=20)
    assert res.returncode != 0
    assert "tenants.solo.models" in output(res)

"""The load-test tooling stays usable as the gateway evolves (cheap checks for CI; the
bench itself needs a release build, wrk and k6 and is run by hand, see BENCHMARKS.md).

* The bench and k6 configs (loadtest/benchlib.py) pass `check-config`.
* A private stack (benchlib.Stack) starts, and every tenant key the k6 scenarios use
  is accepted with the behaviour its scenario expects.
* The slow-stream client of the memory bench really holds streams open through the
  gateway after their first token.
"""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "loadtest"))
import bench  # noqa: E402
import benchlib  # noqa: E402


@pytest.mark.parametrize("name", sorted(benchlib.CONFIGS))
def test_bench_configs_are_valid(run_cli, tmp_path, name):
    path = tmp_path / "gw.yaml"
    path.write_text(benchlib.gateway_yaml(benchlib.CONFIGS[name], 9, 18080, 19090, tmp_path / "spool"))
    res = run_cli("check-config", "--config", path, env=benchlib.PROVIDER_ENV)
    assert res.returncode == 0, res.stdout + res.stderr


def test_k6_tenants_answer_as_their_scenarios_expect(gateway_bin):
    with benchlib.Stack(str(gateway_bin), [], benchlib.tenants_config) as st:
        url = f"http://127.0.0.1:{st.port}/v1/chat/completions"
        with httpx.Client(timeout=10) as c:
            for tenant, (key, _) in benchlib.TENANTS.items():
                r = c.post(url, headers={"authorization": f"Bearer {key}"},
                           json={"model": "m1", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, (tenant, r.text)
            # The budget scenario's tenant runs dry after a bounded number of requests.
            statuses = []
            for i in range(400):
                r = c.post(url, headers={"authorization": "Bearer sk-broke"},
                           json={"model": "m1", "max_tokens": 16, "messages": [{"role": "user", "content": f"x{i}"}]})
                statuses.append(r.status_code)
                if r.status_code == 402:
                    break
            assert statuses[-1] == 402 and set(statuses[:-1]) == {200}, statuses
            assert r.json()["error"]["code"] == "budget_exceeded"


def test_memory_bench_client_holds_slow_streams(gateway_bin):
    with benchlib.Stack(str(gateway_bin), [], benchlib.policy_config) as st:

        async def run():
            pairs, failed = await bench.hold_streams(st.port, 40, batch=20)

            async def still_open(reader):
                # Nothing more comes (the mock's next token is 100 s away) and the
                # gateway did not close the stream: the read times out.
                try:
                    await asyncio.wait_for(reader.read(1), 0.3)
                    return False
                except asyncio.TimeoutError:
                    return True
            open_ = sum(await asyncio.gather(*(still_open(r) for r, _ in pairs)))
            for _, w in pairs:
                w.close()
            return len(pairs), failed, open_

        held, failed, open_ = asyncio.run(run())
        assert (held, failed, open_) == (40, 0, 40)

"""`kill -9` of the gateway under load, then a restart on the same spool.

What is guaranteed (SECURITY.md): every row of a request answered before the audit
writer's last flush is in the spool exactly once, a line torn by the kill does not
stop the restarted gateway (its shipper repairs or skips it), and the restarted
gateway keeps appending. Rows still in the in-memory queue at the kill (at most the
writer's 100 ms flush interval of traffic) may be lost: that window is measured and
bounded here, not hidden.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import _stop
from helpers import ACME, audit_rows, chat_body, new_request_id, post_chat
from test_audit_clickhouse import PrivateGateway, spool_rows

# Rows of requests answered this long before the kill must all be there: five flush
# intervals of the writer (100 ms), so a busy machine's scheduling does not matter.
SETTLED_S = 0.5


@pytest.fixture
def crashing(gateway_bin, mock_provider, tmp_path):
    pg = PrivateGateway(gateway_bin, mock_provider.url, tmp_path / "crash", {"audit": {"spool_dir": "spool"}})
    yield pg
    if pg.gw is not None:
        _stop([pg.gw.proc])


def test_kill_9_under_load_keeps_every_settled_row_once(crashing):
    gw = crashing.start()
    answered: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                n += 1
                rid = f"crash-{worker}-{n}"
                try:
                    r = c.post(f"{gw.base_url}/v1/chat/completions",
                               headers={"authorization": f"Bearer {ACME}", "x-request-id": rid},
                               json=chat_body("[[mock: tokens=3]] crash", stream=n % 2 == 0))
                except httpx.HTTPError:
                    continue  # the kill
                if r.status_code == 200:
                    with lock:
                        answered.append((rid, time.monotonic()))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    began = time.monotonic()
    deadline = began + 30
    while (len(answered) < 300 or time.monotonic() < began + 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(answered) >= 300, f"only {len(answered)} answers in 30 s"
    t_kill = time.monotonic()
    gw.proc.kill()
    gw.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)

    gw = crashing.start()
    rid = new_request_id("after-crash")
    assert post_chat(gw, chat_body("after the crash"), headers={"x-request-id": rid}).status_code == 200
    audit_rows(gw, rid)

    counts = Counter(r.get("request_id") for r in spool_rows(crashing.spool))
    twice = {k: v for k, v in counts.items() if v > 1}
    assert not twice, f"rows written more than once: {twice}"
    settled = [r for r, t in answered if t < t_kill - SETTLED_S]
    missing = [r for r in settled if r not in counts]
    assert settled and not missing, f"{len(missing)} of {len(settled)} settled rows lost: {missing[:5]}"
    lost = [r for r, t in answered if r not in counts]
    # Whatever was lost was answered in the last moments before the kill.
    print(f"answered {len(answered)}, settled {len(settled)}, lost {len(lost)}")
    assert len(lost) <= len(answered) - len(settled), lost

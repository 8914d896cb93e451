"""SSE passes through the gateway chunk by chunk as the upstream produces it, not all
at the end."""

from __future__ import annotations

import json

import pytest

from helpers import chat_body, chunks_of, content_of_chunks, stream_chat

TTFT_MS, GAP_MS, TOKENS = 50, 100, 8
DIRECTIVE = f"[[mock: ttft_ms={TTFT_MS}; gap_ms={GAP_MS}; tokens={TOKENS}]]"


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway()


def content_times(events: list[tuple[float, str]]) -> list[float]:
    out = []
    for t, data in events:
        if data == "[DONE]":
            continue
        c = json.loads(data)
        if any((ch.get("delta") or {}).get("content") for ch in c.get("choices") or []):
            out.append(t)
    return out


@pytest.mark.parametrize(
    "model,include_usage",
    [("gpt-4o-mini", False), ("gpt-4o-mini", True), ("llama-70b", False)],
    ids=["openai-usage-stripped", "openai-include-usage", "openai-compatible"],
)
def test_chunks_arrive_spread_over_time(gw, mock, model, include_usage):
    body = chat_body(f"Stream slowly please. {DIRECTIVE}", model=model, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r, events, t0 = stream_chat(gw, body)
    assert r.status_code == 200, r.text
    chunks = chunks_of(events)
    assert content_of_chunks(chunks)
    times = content_times(events)
    assert len(times) >= TOKENS // 2, f"expected about {TOKENS} content chunks, got {len(times)}"
    first, last = times[0] - t0, times[-1] - t0
    expected_span = (TOKENS - 1) * GAP_MS / 1000  # 0.7 s
    # Buffered-until-the-end would put every chunk at about the same instant.
    assert last - first >= 0.5, f"content chunks arrived within {last - first:.3f}s: buffered?"
    assert first < last - 0.4, f"first content at {first:.3f}s, last at {last:.3f}s"
    # Time to first token is the upstream's (50 ms) plus little: far from the end.
    assert first < 0.5, f"first content chunk only after {first:.3f}s"
    # Chunks are spread out, not in a couple of bursts.
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(1 for g in gaps if g >= GAP_MS / 2000) >= len(gaps) // 2, gaps
    assert last >= expected_span * 0.7
    rec = mock.only_request()
    assert rec["stream"] is True

"""Load test: 200 concurrent streaming requests over the native and OpenAI endpoints, a third
of them abandoned by their client at random moments; then a clean shutdown."""

from __future__ import annotations

import asyncio
import json
import random
import signal

import httpx
import psutil
import pytest
from server_utils import ServerProcess, shared_server, stop_shared_server, wait_pool_whole

N_REQUESTS = 200


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


def _request(i: int, model: str) -> tuple[str, dict]:
    greedy = i % 2 == 0
    if i % 3 == 0:
        return "/generate", {"text": f"Question {i}: what is {i} plus {i}?", "stream": True,
                             "sampling_params": {"max_new_tokens": 4, "temperature": 0.0 if greedy else 0.8,
                                                 "ignore_eos": True}}
    if i % 3 == 1:
        return "/v1/completions", {"model": model, "prompt": f"Item {i} of the list is", "max_tokens": 4,
                                   "stream": True, "temperature": 0.0 if greedy else 0.8, "ignore_eos": True}
    return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": f"Spell {i}."}],
                                    "max_tokens": 4, "stream": True, "temperature": 0.0 if greedy else 0.8}


async def _one(client: httpx.AsyncClient, i: int, model: str, mode: str) -> list[str] | None:
    """The request's SSE payloads, or None if this client walked away on purpose."""
    path, body = _request(i, model)
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, (i, r.status_code, await r.aread())
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if mode == "after_first":
                    return None
        return events


async def _run(server: ServerProcess, model: str) -> tuple[int, int]:
    rng = random.Random(1234)
    modes = ["complete"] * N_REQUESTS
    for i in rng.sample(range(N_REQUESTS), N_REQUESTS // 3):
        modes[i] = rng.choice(["after_first", "timeout"])
    limits = httpx.Limits(max_connections=N_REQUESTS + 10, max_keepalive_connections=N_REQUESTS + 10)
    async with server.async_client(limits=limits) as client:

        async def task(i: int) -> list[str] | None:
            if modes[i] == "timeout":
                try:
                    return await asyncio.wait_for(_one(client, i, model, "complete"), rng.uniform(0.05, 3.0))
                except asyncio.TimeoutError:
                    return None
            return await _one(client, i, model, modes[i])

        results = await asyncio.gather(*(task(i) for i in range(N_REQUESTS)))
    completed = 0
    for i, (mode, events) in enumerate(zip(modes, results)):
        if events is None:
            assert mode != "complete", f"request {i} did not complete"
            continue
        completed += 1
        assert events[-1] == "[DONE]", (i, events[-3:])
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), (i, chunks)
        if i % 3 == 0:
            assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
            assert chunks[-1]["meta_info"]["completion_tokens"] == 4
        else:
            finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert finishes[-1] in ("stop", "length"), (i, finishes)
    return completed, sum(m == "complete" for m in modes)


def test_concurrent_streams_with_random_aborts(server):
    with server.client() as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    completed, must_complete = asyncio.run(_run(server, model))
    assert completed >= must_complete
    assert server.alive()
    with server.client() as c:
        assert c.get("/health").status_code == 200
        info = wait_pool_whole(c, timeout=120)
        assert info["in_flight_requests"] == 0
        r = c.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2


def test_clean_shutdown_leaves_no_processes(server):
    procs = server.descendants()
    assert len(procs) >= 2, procs  # scheduler and detokenizer (and multiprocessing's resource tracker)
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, f"left behind: {alive}"
    assert "radixflow server ready on" in server.stdout_lines[0] and len(server.stdout_lines) == 1
    stop_shared_server()

"""End-to-end tests of the native HTTP API on a real `radixflow serve` subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from server_utils import API_KEY, POOL_SIZE, ServerProcess, assert_error, shared_server, wait_pool_whole

PROMPT = "The capital of France is"


def greedy(n: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, **kw}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def sse_events(resp: httpx.Response) -> tuple[list[str], list[float]]:
    events, times = [], []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
            times.append(time.monotonic())
    return events, times


def test_info_endpoints(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"] and info["tokenizer_path"]
    si = client.get("/get_server_info").json()
    for key in ("pool_size", "free_slots", "evictable_slots", "protected_slots", "num_running", "num_waiting"):
        assert isinstance(si[key], int), key
    assert si["pool_size"] == POOL_SIZE
    assert "hit_rate" in si["cache"]
    assert si["server_args"]["api_key"] != API_KEY  # never echoed
    assert client.get("/health_generate").status_code == 200


def test_chat_template_endpoint_renders_like_the_tokenizer(client, tokenizer):
    info = client.get("/get_chat_template").json()
    assert info["chat_template"] == tokenizer.chat_template
    assert "<|im_end|>" in info["stop_strings"] and info["eos_token"] == "<|im_end|>"
    from radixflow.frontend.chat_template import ChatTemplate

    tpl = ChatTemplate.from_source(info["chat_template"], {"eos_token": info["eos_token"]},
                                   tuple(info["stop_strings"]), name="server")
    assert tpl is not None


def test_stream_matches_non_stream(client):
    full = client.post("/generate", json={"text": PROMPT, "sampling_params": greedy(8)}).json()
    meta = full["meta_info"]
    assert meta["completion_tokens"] == 8 == len(full["output_ids"])
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] > 0 and meta["e2e_latency"] > 0
    with client.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": greedy(8), "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, times = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 4, "chunks must arrive token by token"
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"]), "text is cumulative"
    assert times[-2] - times[0] > 0.01, "chunks arrived incrementally, not all at once"
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_batch_and_n(client):
    single = client.post("/generate", json={"text": PROMPT, "sampling_params": greedy(4)}).json()
    batch = client.post("/generate", json={"text": [PROMPT, "One, two, three,"],
                                           "sampling_params": [greedy(4), greedy(3)]}).json()
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["output_ids"] == single["output_ids"]
    assert [b["meta_info"]["completion_tokens"] for b in batch] == [4, 3]
    ids = client.post("/generate", json={"input_ids": [[504, 3575, 282], [1, 2, 3, 4]],
                                         "sampling_params": greedy(2)}).json()
    assert [r["meta_info"]["prompt_tokens"] for r in ids] == [3, 4]
    sampled = {"max_new_tokens": 4, "temperature": 1.0, "n": 2, "seed": 7}
    n2 = client.post("/generate", json={"text": PROMPT, "sampling_params": sampled, "rid": "n-test"}).json()
    assert [r["meta_info"]["id"] for r in n2] == ["n-test-0", "n-test-1"]
    again = client.post("/generate", json={"text": PROMPT, "sampling_params": sampled}).json()
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in n2], "seeded sampling is reproducible"


def test_logprobs(client):
    body = {"text": PROMPT, "sampling_params": greedy(5), "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 3, "return_text_in_logprobs": True}
    r = client.post("/generate", json=body).json()
    m = r["meta_info"]
    inp, out = m["input_token_logprobs"], m["output_token_logprobs"]
    assert len(inp) == m["prompt_tokens"] and inp[0][0] is None
    assert all(lp <= 0 for lp, _, _ in inp[1:])
    assert [e[1] for e in out] == r["output_ids"] and all(isinstance(e[2], str) for e in out)
    tops = m["output_top_logprobs"]
    assert len(tops) == 5 and all(len(t) == 3 for t in tops)
    for e, top in zip(out, tops):
        assert [x[0] for x in top] == sorted((x[0] for x in top), reverse=True)
        assert top[0][1] == e[1] and abs(top[0][0] - e[0]) < 1e-5, "greedy picks the top token"
    assert m["input_top_logprobs"][0] is None and all(len(t) == 3 for t in m["input_top_logprobs"][1:])
    # The same tokens scored as input (prefill) must get the logprobs they got while decoding.
    prompt_ids = [e[1] for e in inp]
    r2 = client.post("/generate", json={"input_ids": prompt_ids + r["output_ids"], "sampling_params": greedy(1),
                                        "return_logprob": True, "logprob_start_len": len(prompt_ids)}).json()
    rescored = r2["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in rescored] == r["output_ids"]
    for (a, _, _), (b, _, _) in zip(out, rescored):
        assert abs(a - b) < 2e-3, (a, b)


def test_abort_on_disconnect(client, server):
    """Streaming and non-streaming clients that go away free their slots long before the
    200 requested tokens could have been generated."""
    with client.stream("POST", "/generate", json={"text": "Tell me a story.", "stream": True,
                                                  "sampling_params": greedy(200, ignore_eos=True)}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    t0 = time.monotonic()
    info = wait_pool_whole(client, timeout=30)
    assert info["num_running"] == 0
    with server.client(timeout=1.0) as impatient, pytest.raises(httpx.TimeoutException):
        impatient.post("/generate", json={"text": "Another story.", "sampling_params": greedy(200, ignore_eos=True)})
    wait_pool_whole(client, timeout=30)
    assert time.monotonic() - t0 < 45


def test_abort_request_endpoint(client, server):
    body = {"text": "Count to one hundred:", "stream": True, "rid": "to-abort",
            "sampling_params": greedy(200, ignore_eos=True)}
    with client.stream("POST", "/generate", json=body) as r:
        last = None
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            last = json.loads(line[6:])
            if last["meta_info"]["completion_tokens"] == 1:
                assert_error(client.post("/flush_cache"), 400, "busy")  # refused while requests run
                assert client.post("/abort_request", json={"rid": "to-abort"}).json() == {"success": True}
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 200
    assert client.post("/abort_request", json={"rid": "no-such-request"}).json() == {"success": False}
    wait_pool_whole(client)


def test_flush_cache_and_metrics(client, server):
    wait_pool_whole(client)
    r = client.post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"] is True
    info = client.get("/get_server_info").json()
    assert info["free_slots"] == info["pool_size"] and info["evictable_slots"] == 0
    with client.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": greedy(3), "stream": True}) as r:
        sse_events(r)
    text = client.get("/metrics").text
    for name in ("radixflow_time_to_first_token_seconds_count", "radixflow_inter_token_latency_seconds_count",
                 "radixflow_e2e_request_latency_seconds_count", "radixflow_prompt_tokens_total",
                 "radixflow_generation_tokens_total", "radixflow_num_running_reqs", "radixflow_num_waiting_reqs",
                 "radixflow_kv_pool_usage_ratio", "radixflow_cache_hit_rate"):
        assert name in text, name
    ttft = [line for line in text.splitlines() if line.startswith("radixflow_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


def test_api_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for method, path in (("POST", "/generate"), ("GET", "/get_server_info"), ("GET", "/metrics"),
                         ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/get_model_info"),
                         ("POST", "/flush_cache"), ("GET", "/no/such/route")):
        assert_error(httpx.request(method, server.url + path, json={}), 401, "invalid_api_key")
        assert_error(httpx.request(method, server.url + path, json={}, headers={"Authorization": "Bearer nope"}),
                     401)


def _huge_chunks():
    for _ in range(30):
        yield b"x" * 10_000


BAD_REQUESTS = [
    # (description, path, raw body or JSON, status, code)
    ("malformed JSON", "/generate", b'{"text": "hi",', 400, None),
    ("not an object", "/generate", [1, 2], 400, None),
    ("no prompt", "/generate", {"sampling_params": {}}, 400, None),
    ("text and input_ids", "/generate", {"text": "a", "input_ids": [1]}, 400, None),
    ("empty text", "/generate", {"text": ""}, 400, None),
    ("empty input_ids", "/generate", {"input_ids": []}, 400, None),
    ("text of wrong type", "/generate", {"text": 5}, 400, None),
    ("token id out of range", "/generate", {"input_ids": [10**7]}, 400, None),
    ("token id of wrong type", "/generate", {"input_ids": ["a"]}, 400, None),
    ("max_new_tokens wrong type", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": "5"}}, 400, None),
    ("negative max_new_tokens", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, 400, None),
    ("huge max_new_tokens", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": 10**9}}, 400, None),
    ("n=0", "/generate", {"text": "a", "sampling_params": {"n": 0}}, 400, None),
    ("n too large", "/generate", {"text": "a", "sampling_params": {"n": 100}}, 400, None),
    ("unknown sampling param", "/generate", {"text": "a", "sampling_params": {"temprature": 0}}, 400, None),
    ("unknown field", "/generate", {"text": "a", "bogus": 1}, 400, None),
    ("sampling_params wrong type", "/generate", {"text": "a", "sampling_params": "greedy"}, 400, None),
    ("top_p out of range", "/generate", {"text": "a", "sampling_params": {"top_p": 0}}, 400, None),
    ("stream not bool", "/generate", {"text": "a", "stream": "yes"}, 400, None),
    ("too many top logprobs", "/generate", {"text": "a", "return_logprob": True, "top_logprobs_num": 1000}, 400, None),
    ("batch sampling_params length", "/generate", {"text": ["a", "b"], "sampling_params": [{}]}, 400, None),
    ("prompt too long", "/generate", {"input_ids": [1] * POOL_SIZE}, 400, "context_length_exceeded"),
    ("prompt + max_new_tokens too long", "/generate",
     {"input_ids": [1] * (POOL_SIZE - 10), "sampling_params": {"max_new_tokens": 100}}, 400, "context_length_exceeded"),
    ("body too large", "/generate", {"text": "a" * 300_000}, 413, None),
    ("chunked body too large", "/generate", _huge_chunks, 413, None),
    ("unknown route", "/nope", {}, 404, "not_found"),
    ("abort without rid", "/abort_request", {}, 400, None),
]


@pytest.mark.parametrize("desc,path,body,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(client, desc, path, body, status, code):
    if callable(body):
        r = client.post(path, content=body())
    elif isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert_error(r, status, code)


def test_normal_request_after_bad_ones(client):
    assert_error(client.get("/generate"), 405)
    r = client.post("/generate", json={"text": PROMPT, "sampling_params": greedy(2)})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
    wait_pool_whole(client)


# ---- a second, tiny server: back-pressure and the watchdog -------------------------------------


@pytest.fixture(scope="module")
def tiny_server():
    srv = ServerProcess(["--max-total-tokens", "512", "--max-running-requests", "1", "--max-waiting-requests", "0",
                         "--log-level", "warning"])
    yield srv
    srv.kill()


def test_overload_then_dead_child(tiny_server):
    srv = tiny_server
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"text": "Tell me a story.", "stream": True, "sampling_params": greedy(100, ignore_eos=True)}
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            next(line for line in lines if line.startswith("data: "))
            assert_error(c.post("/generate", json={"text": "hi"}), 503, "server_overloaded")
        wait_pool_whole(c)
        assert c.post("/generate", json={"text": "hi", "sampling_params": greedy(1)}).status_code == 200
        sched_pid = c.get("/get_server_info").json()["scheduler_pid"]
    procs = srv.descendants()
    assert sched_pid in [p.pid for p in procs]
    psutil.Process(sched_pid).send_signal(signal.SIGKILL)
    saw_unhealthy = False
    deadline = time.monotonic() + 30
    while srv.alive() and time.monotonic() < deadline:
        try:
            r = httpx.get(srv.url + "/health", timeout=2)
            if r.status_code == 503:
                assert_error(r, 503)
                saw_unhealthy = True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    assert saw_unhealthy, "/health must report 503 once a child died"
    assert srv.proc.wait(30) != 0, "the server exits non-zero after a child died"
    psutil.wait_procs(procs, timeout=10)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "no orphans"


def test_children_die_with_killed_parent():
    srv = ServerProcess(["--max-total-tokens", "256", "--log-level", "warning"])
    procs = srv.descendants()
    assert len(procs) >= 2
    srv.proc.kill()
    srv.proc.wait(10)
    gone, alive = psutil.wait_procs(procs, timeout=15)
    srv.cleanup()
    assert not alive, f"orphans left: {alive}"


def test_cli_generate():
    cmd = [sys.executable, "-m", "radixflow.runtime.server.cli", "generate", "What is 2+2? Answer with a number only.",
           "--max-new-tokens", "8", "--max-total-tokens", "256"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4" in out.stdout and "<|im_end|>" not in out.stdout
    bad = subprocess.run(cmd[:4] + ["hi", "--temperature", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "temperature" in bad.stderr

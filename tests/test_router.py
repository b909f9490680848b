"""The cache-aware router (runtime/router/): its tree, policy and routing keys on their own, then
end to end over three real `radixflow serve` workers with small pools (one router + workers
shared by the module), and `radixflow serve --dp-size 2`."""

from __future__ import annotations

import concurrent.futures
import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import httpx
import psutil
import pytest
from server_utils import API_KEY, AUTH, ServerProcess, assert_error

import radixflow as rf
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.router.args import RouterArgs
from radixflow.runtime.router.data_parallel import worker_argv
from radixflow.runtime.router.keys import routing_text
from radixflow.runtime.router.policy import CacheAwarePolicy
from radixflow.runtime.router.tree import ApproxTree
from radixflow.runtime.router.workers import Worker
from radixflow.runtime.server.args import ServerArgs

WORKER_ARGS = ["--max-total-tokens", "2048", "--max-running-requests", "16", "--api-key", API_KEY,
               "--max-new-tokens-limit", "128", "--log-interval", "0", "--log-level", "warning"]
GREEDY = {"temperature": 0.0}

# ---- the parts on their own ---------------------------------------------------------------------


def test_tree_matches_the_longest_recorded_prefix_like_brute_force():
    rng = random.Random(0)
    tree = ApproxTree(max_chars=10**9)
    seen: list[str] = []
    for _ in range(400):
        base = rng.choice(seen) if seen and rng.random() < 0.6 else ""
        text = base[: rng.randint(0, len(base))] + "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
        probe = text[: rng.randint(0, len(text))] + rng.choice(["", "a", "zz"])
        expected = max((len(_common(s, probe)) for s in seen), default=0)
        assert tree.match(probe) == expected, (probe, seen)
        tree.insert(text)
        seen.append(text)
        tree.check_integrity()


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_tree_evicts_least_recently_used_text_to_stay_within_its_size():
    tree = ApproxTree(max_chars=100)
    tree.insert("A" * 40)
    tree.insert("B" * 40)
    tree.insert("A" * 40)  # sent again: A is now more recent than B
    tree.match("B" * 40)  # a match alone changes nothing
    tree.insert("C" * 40)  # 120 chars > 100: B goes
    tree.check_integrity()
    assert tree.size == 80 and tree.match("A" * 40) == 40 and tree.match("C" * 40) == 40
    assert tree.match("B" * 40) == 0
    with pytest.raises(ValueError, match="max_chars"):
        ApproxTree(0)


def _worker(name: str, in_flight: int = 0) -> Worker:
    return Worker(f"http://127.0.0.1:{name}", ApproxTree(10**6), in_flight=in_flight)


def test_cache_aware_policy_prefers_the_longest_match_above_the_threshold():
    args = RouterArgs(cache_threshold=0.5, balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy = CacheAwarePolicy(args)
    a, b, c = _worker("1"), _worker("2", in_flight=1), _worker("3", in_flight=2)
    prefix = "You are a helpful assistant. " * 4
    policy.record(prefix + "question one", b)
    choice = policy.choose(prefix + "question two", [a, b, c])
    assert choice.worker is b and choice.affinity
    # A short shared part (under half the text) does not count: the least-loaded worker wins.
    choice = policy.choose(prefix[:10] + "x" * 200, [a, b, c])
    assert choice.worker is a and not choice.affinity
    # Imbalance (max - min > 4 and max > 1.5 x min) overrides affinity.
    b.in_flight = 9
    choice = policy.choose(prefix + "question three", [a, b, c])
    assert choice.worker is a and not choice.affinity


def test_routing_text_of_each_api():
    body = lambda **kw: json.dumps(kw).encode()
    assert routing_text("/generate", body(text="hello")) == "hello"
    assert routing_text("/generate", body(text=["first", "second"])) == "first"
    ids = routing_text("/generate", body(input_ids=[1, 2, 3]))
    assert ids.endswith("\x01\x02\x03") and ids != routing_text("/generate", body(input_ids=[1, 2, 4]))
    assert routing_text("/v1/completions", body(prompt="p")) == "p"
    chat = routing_text("/v1/chat/completions", body(messages=[{"role": "system", "content": "S"},
                                                               {"role": "user", "content": [{"type": "text",
                                                                                             "text": "U"}]}]))
    assert chat == "<system>S\n<user>U\n"
    assert routing_text("/generate", b"{not json") == "" and routing_text("/generate", b"[1]") == ""


def test_router_args_refuse_bad_values():
    with pytest.raises(ValueError, match="bad worker URL"):
        RouterArgs(worker_urls=("localhost:3000",))
    with pytest.raises(ValueError, match="repeat"):
        RouterArgs(worker_urls=("http://a:1", "http://a:1/"))
    with pytest.raises(ValueError, match="policy"):
        RouterArgs(policy="fastest")
    with pytest.raises(ValueError, match="cache_threshold"):
        RouterArgs(cache_threshold=1.5)


def test_worker_argv_passes_the_options_that_differ_from_the_defaults():
    args = ServerArgs(engine=EngineConfig(max_total_tokens=2048, disable_radix_cache=True), port=9,
                      api_key="secret", max_n=4, allowed_hosts=("a", "b"))
    argv = worker_argv(args)
    assert argv[:5] == ["serve", "--host", "127.0.0.1", "--port", "0"]
    assert "secret" not in argv and "9" not in argv
    flat = " ".join(argv)
    assert "--max-n 4" in flat and "--allowed-hosts a,b" in flat and "--max-total-tokens 2048" in flat
    assert "--disable-radix-cache" in argv and "--max-waiting-requests" not in flat


# ---- a router over three real workers ----------------------------------------------------------


class RouterProcess:
    """`radixflow router --port 0 --worker-urls URLS ARGS` in a subprocess; `url` once ready."""

    def __init__(self, urls: list[str], args: list[str], timeout: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "radixflow.runtime.server.cli", "router", "--port", "0",
               "--api-key", API_KEY, "--log-level", "warning", *args, "--worker-urls", *urls]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = _read_line(self.proc, timeout)
        assert line.startswith("radixflow router ready on "), line
        self.url = line.split(" on ", 1)[1]

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=kw.pop("timeout", 120.0), **kw)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0].strip() if out else ""


@pytest.fixture(scope="module")
def fleet():
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        workers = list(pool.map(lambda _: ServerProcess(WORKER_ARGS), range(3)))
    router = RouterProcess([w.url for w in workers], ["--health-interval", "0.5", "--health-failures", "2"])
    yield router, workers
    assert router.stop() == 0
    for w in workers:
        w.stop()


def _gen(client: httpx.Client, text: str, n: int = 6, **kw: Any) -> httpx.Response:
    return client.post("/generate", json={"text": text, "sampling_params": {**GREEDY, "max_new_tokens": n}, **kw})


def _sse(resp: httpx.Response) -> list[Any]:
    events = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_native_api_passes_through_with_cache_affinity(fleet):
    router, workers = fleet
    prefix = f"Session {uuid.uuid4().hex}. " + "A long shared system prompt about ships and the sea. " * 6
    with router.client() as c, workers[0].client() as direct:
        first = _gen(c, prefix + "Tell me about anchors.")
        assert first.status_code == 200, first.text
        served = first.headers["x-radixflow-worker"]
        assert served in [w.url for w in workers]
        assert first.json()["text"] == _gen(direct, prefix + "Tell me about anchors.").json()["text"]
        for topic in ("sails", "ropes", "decks"):
            r = _gen(c, prefix + f"Tell me about {topic}.")
            assert r.status_code == 200 and r.headers["x-radixflow-worker"] == served
            assert r.json()["meta_info"]["cached_tokens"] >= 60  # a real radix-cache hit on that worker
        listed = {w["url"]: w for w in c.get("/list_workers").json()["workers"]}
        assert listed[served]["affinity_hits"] >= 3 and all(w["healthy"] for w in listed.values())


def test_streaming_passes_through_event_by_event(fleet):
    router, _ = fleet
    text = f"Note {uuid.uuid4().hex}: the weather today is"
    with router.client() as c:
        whole = _gen(c, text, 8).json()["text"]
        with c.stream("POST", "/generate", json={"text": text, "stream": True,
                                                   "sampling_params": {**GREEDY, "max_new_tokens": 8}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r)
        assert events[-1] == "[DONE]" and len(events) >= 3 and events[-2]["text"] == whole
        body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0}
        ref = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = _sse(r)
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == ref


def test_a_client_that_leaves_mid_stream_frees_the_worker(fleet):
    router, workers = fleet
    body = {"text": f"Story {uuid.uuid4().hex}:", "stream": True,
            "sampling_params": {**GREEDY, "max_new_tokens": 128, "ignore_eos": True}}
    with router.client() as c:
        with c.stream("POST", "/generate", json=body) as r:
            served = r.headers["x-radixflow-worker"]
            next(r.iter_lines())  # one event, then hang up
        worker = next(w for w in workers if w.url == served)
        with worker.client() as direct:
            for _ in range(300):
                info = direct.get("/get_server_info").json()
                listed = c.get("/list_workers").json()["workers"]
                if info["num_running"] == 0 and all(w["in_flight"] == 0 for w in listed):
                    break
                time.sleep(0.1)
        assert info["num_running"] == 0 and all(w["in_flight"] == 0 for w in listed), (info, listed)


def test_openai_and_info_endpoints_pass_through(fleet):
    router, workers = fleet
    with router.client() as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"]
        assert c.get("/get_model_info").json()["context_length"] > 0
        comp = c.post("/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0}).json()
        assert comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] == 4
        info = c.get("/get_server_info").json()
        assert info["pool_size"] == 3 * 2048 and set(info["worker_info"]) == {w.url for w in workers}
        assert c.get("/health").json()["healthy_workers"] == 3
        metrics = c.get("/metrics").text
        for w in workers:
            assert f'radixflow_router_requests_total{{worker="{w.url}"}}' in metrics
        assert c.post("/flush_cache").json()["success"] is True
        assert all(w["tree_chars"] == 0 for w in c.get("/list_workers").json()["workers"])


def test_bad_requests_get_precise_errors(fleet):
    router, workers = fleet
    with router.client() as c:
        assert_error(c.post("/generate", content=b"{nope", headers={"content-type": "application/json"}), 400)
        assert_error(_gen(c, "x", n=10**6), 400)
        assert_error(httpx.post(router.url + "/generate", json={"text": "x"}), 401, "invalid_api_key")
        assert_error(c.post("/add_worker"), 400, "missing_url")
        assert_error(c.post("/add_worker", params={"url": "ftp://x"}), 400, "bad_url")
        assert_error(c.post("/add_worker", params={"url": workers[0].url}), 400, "worker_exists")
        assert_error(c.post("/remove_worker", params={"url": "http://127.0.0.1:1"}), 404, "worker_not_found")
        assert_error(c.get("/no_such_path"), 404, "not_found")


def test_workers_are_removed_and_added_at_run_time(fleet):
    router, workers = fleet
    url = workers[2].url
    with router.client() as c:
        assert c.post("/remove_worker", params={"url": url}).json() == {"success": True, "url": url}
        served = {_gen(c, f"Item {i} {uuid.uuid4().hex}", 1).headers["x-radixflow-worker"] for i in range(6)}
        assert url not in served and len(served) == 2
        added = c.post("/add_worker", params={"url": url + "/"}).json()
        assert added == {"success": True, "url": url, "healthy": True}
        served = {_gen(c, f"Item {i} {uuid.uuid4().hex}", 1).headers["x-radixflow-worker"] for i in range(6)}
        assert url in served


def test_dsl_program_forks_reach_the_worker_that_holds_the_prefix(fleet, tokenizer):
    router, _ = fleet
    backend = rf.RuntimeEndpoint(router.url, api_key=API_KEY)
    prefix = f"Session {uuid.uuid4().hex}. Brainstorm short names for a small bakery in a quiet seaside town."

    @rf.function
    def prog(s):
        s += prefix
        forks = s.fork(3)
        forks += lambda i: f"\nIdea {i + 1}:" + rf.gen("idea", max_tokens=4, temperature=0)
        forks.join()
        return [f.get_meta_info("idea") for f in forks]

    prompt_tokens = lambda info: {u: i["prompt_tokens"] for u, i in info["worker_info"].items()}
    before_info = backend.get_server_info()
    st = prog.run(backend=backend)
    after_info = backend.get_server_info()
    backend.shutdown()
    before, after = prompt_tokens(before_info), prompt_tokens(after_info)
    n_prefix = len(tokenizer.encode(prefix))
    assert len(st["idea"]) == 3 and all(isinstance(x, str) for x in st["idea"])
    assert len([u for u in after if after[u] > before[u]]) == 1  # the commit and every branch: one worker
    assert all(m["cached_tokens"] >= n_prefix - 1 for m in st.ret_value)
    assert after_info["computed_prompt_tokens"] - before_info["computed_prompt_tokens"] < n_prefix + 3 * 8


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_no_request_that_had_not_streamed(fleet):
    """Runs last in the module: kills a worker, checks it is taken out of rotation, starts a
    worker again on its port and checks the router takes it back."""
    router, workers = fleet
    victim = workers[1]
    results: dict[int, dict[str, Any]] = {}

    def one(i: int) -> None:
        stream = i % 2 == 0
        body = {"text": f"Request {i} {uuid.uuid4().hex}: write about the sea.", "stream": stream,
                "sampling_params": {**GREEDY, "max_new_tokens": 32, "ignore_eos": True}}
        out: dict[str, Any] = {"stream": stream, "events": [], "status": None}
        try:
            with router.client(timeout=300.0) as c:
                if stream:
                    with c.stream("POST", "/generate", json=body) as r:
                        out["status"] = r.status_code
                        out["events"] = _sse(r) if r.status_code == 200 else [r.read()]
                else:
                    r = c.post("/generate", json=body)
                    out["status"], out["events"] = r.status_code, [r.json()]
        except httpx.HTTPError as e:
            out["exception"] = repr(e)
        results[i] = out

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    with router.client() as c:
        for _ in range(600):  # until the victim has requests in flight (or all are done)
            busy = {w["url"]: w["in_flight"] for w in c.get("/list_workers").json()["workers"]}
            if busy[victim.url] >= 2 or not any(t.is_alive() for t in threads):
                break
            time.sleep(0.05)
        assert busy[victim.url] >= 1
        port = victim.url.rsplit(":", 1)[1]
        victim.kill()
        for t in threads:
            t.join(300)
        listed = {w["url"]: w for w in c.get("/list_workers").json()["workers"]}
        assert not listed[victim.url]["healthy"] and listed[victim.url]["failures"] >= 1
        for i, out in sorted(results.items()):
            assert "exception" not in out and out["status"] == 200, (i, out)
            events = out["events"]
            if not out["stream"]:
                assert events[0]["meta_info"]["completion_tokens"] == 32, (i, events)
            elif any(isinstance(e, dict) and "error" in e for e in events):
                assert isinstance(events[0], dict) and events[0]["text"], (i, events)  # it had streamed
            else:
                assert events[-1] == "[DONE]" and events[-2]["meta_info"]["completion_tokens"] == 32, (i, events)
        workers[1] = ServerProcess([*WORKER_ARGS, "--port", port])
        for _ in range(600):
            if {w["url"]: w for w in c.get("/list_workers").json()["workers"]}[victim.url]["healthy"]:
                break
            time.sleep(0.1)
        assert _gen(c, "Back again?", 2).status_code == 200
        listed = {w["url"]: w for w in c.get("/list_workers").json()["workers"]}
        assert listed[victim.url]["healthy"]


# ---- radixflow serve --dp-size ------------------------------------------------------------------


@pytest.mark.slow
def test_serve_dp_size_starts_workers_behind_a_router_and_they_all_die_together():
    server = ServerProcess(["--dp-size", "2", *WORKER_ARGS])
    try:
        with server.client() as c:
            assert c.get("/health").json()["healthy_workers"] == 2
            r = _gen(c, "The capital of France is", 4)
            assert r.status_code == 200 and r.headers["x-radixflow-worker"] != server.url
        family = [server.pid, *(p.pid for p in server.descendants())]
        assert len(family) >= 1 + 2 * 3  # the router, and each worker with its two children
        server.proc.kill()  # SIGKILL: the router cannot stop anyone; the workers must die anyway
        server.proc.wait(30)
        for _ in range(600):
            alive = [pid for pid in family[1:] if _alive(pid)]
            if not alive:
                break
            time.sleep(0.1)
        assert not alive, alive
    finally:
        server.kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

"""End-to-end tests of the server's liveness checks and HTTP hygiene (issue "Hardening"): one
test per finding, on real `radixflow serve` subprocesses.

Two extra servers besides the shared one: `live` (small watchdog / request / header / body
timeouts, API key from $RADIXFLOW_API_KEY) and `keyfile` (API key from --api-key-file; the last
test kills it with SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import httpx
import psutil
import pytest
import uvicorn
from fastapi import FastAPI
from server_utils import API_KEY, AUTH, ServerProcess, assert_error, shared_server, wait_pool_whole

from radixflow.runtime.server import cli
from radixflow.runtime.server.args import ServerArgs
from radixflow.runtime.server.guard import RequestGuard
from radixflow.runtime.server.serve import header_timeout_protocol

ENV_KEY = "env-secret-4f1c"
FILE_KEY = "file-secret-9a2e"
WATCHDOG_S, REQUEST_TIMEOUT_S, HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.5, 6.0, 2.0, 2.0
TINY = {"max_new_tokens": 2, "temperature": 0.0}


@pytest.fixture(scope="module")
def live():
    srv = ServerProcess(["--max-total-tokens", "512", "--max-running-requests", "4", "--log-level", "warning",
                         "--watchdog-timeout", str(WATCHDOG_S), "--request-timeout", str(REQUEST_TIMEOUT_S),
                         "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)],
                        env={"RADIXFLOW_API_KEY": ENV_KEY})
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "api-key"
    path.write_text(f"  {FILE_KEY}\n")
    srv = ServerProcess(["--max-total-tokens", "256", "--log-level", "warning", "--api-key-file", str(path)],
                        env={"RADIXFLOW_API_KEY": ENV_KEY})
    yield srv
    srv.kill()


def live_client(srv: ServerProcess, **kw) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ENV_KEY}"}, timeout=60, **kw)


def scheduler_proc(client: httpx.Client) -> psutil.Process:
    return psutil.Process(client.get("/get_server_info").json()["scheduler_pid"])


def host_port(srv: ServerProcess) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# ---- liveness ----------------------------------------------------------------------------------


def test_stopped_scheduler_turns_health_503(live):
    with live_client(live) as c:
        assert c.get("/health").status_code == 200
        sched = scheduler_proc(c)
        result: dict = {}
        sched.send_signal(signal.SIGSTOP)
        try:
            worker = threading.Thread(target=lambda: result.update(r=c.post(
                "/generate", json={"text": "Hi", "sampling_params": {**TINY, "max_new_tokens": 3}})))
            worker.start()
            deadline = time.monotonic() + WATCHDOG_S + 5
            while (r := httpx.get(live.url + "/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "no progress" in assert_error(r, 503, "service_unavailable")["message"]
        finally:
            sched.send_signal(signal.SIGCONT)
        worker.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["meta_info"]["completion_tokens"] == 3
        deadline = time.monotonic() + 5
        while httpx.get(live.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(live.url + "/health").status_code == 200
        wait_pool_whole(c)


def test_request_timeout_gives_504_and_frees_the_pool(live):
    results: dict = {}
    with live_client(live) as c:
        sched = scheduler_proc(c)

        def plain() -> None:
            results["plain"] = c.post("/generate", json={"text": "Hi", "sampling_params": TINY})

        streaming = threading.Event()

        def streamed() -> None:
            body = {"text": "Hello", "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}, "stream": True}
            with c.stream("POST", "/generate", json=body) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        streaming.set()
                results["stream"] = (r.status_code, lines)
            streaming.set()

        workers = [threading.Thread(target=streamed)]
        workers[0].start()
        assert streaming.wait(30)
        sched.send_signal(signal.SIGSTOP)  # the stream has begun: its timeout comes as an event
        try:
            workers.append(threading.Thread(target=plain))
            workers[1].start()
            for w in workers:
                w.join(REQUEST_TIMEOUT_S + 15)
        finally:
            sched.send_signal(signal.SIGCONT)
        r = results["plain"]
        assert_error(r, 504, "request_timeout")
        assert r.headers["connection"] == "close"
        status, lines = results["stream"]
        assert status == 200, lines
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
        assert lines[-1] == "data: [DONE]"
        # The same client goes on working after the 5xx (its connection was closed cleanly).
        assert c.post("/generate", json={"text": "Hi", "sampling_params": TINY}).status_code == 200
        wait_pool_whole(c)


# ---- HTTP hygiene ------------------------------------------------------------------------------


def test_slow_headers_are_cut_off(live):
    host, port = host_port(live)
    socks = []
    for _ in range(50):
        s = socket.create_connection((host, port), timeout=HEADER_TIMEOUT_S + 10)
        s.sendall(b"GET /health HTT")
        socks.append(s)
    start = time.monotonic()
    try:
        with live_client(live) as c:  # the server keeps serving meanwhile
            r = c.post("/generate", json={"text": "Hi", "sampling_params": TINY})
            assert r.status_code == 200
        for s in socks:
            try:
                assert recv_all(s) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 8
    finally:
        for s in socks:
            s.close()
    # A slow sender on a kept-alive connection is cut off as well.
    with socket.create_connection((host, port), timeout=HEADER_TIMEOUT_S + 10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        assert recv_all(s) == b""
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 8


def test_stalled_body_gets_408(live):
    host, port = host_port(live)
    with socket.create_connection((host, port), timeout=BODY_TIMEOUT_S + 10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + ENV_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"text\": ")
        start = time.monotonic()
        data = recv_all(s)  # the server answers and closes
    assert time.monotonic() - start < BODY_TIMEOUT_S + 8
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_connection_stays_usable_after_4xx():
    srv = shared_server()
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        for r, status in ((c.post("/generate", content=b"{", headers={"content-type": "application/json"}), 400),
                          (c.get("/no/such/route"), 404),
                          (c.post("/generate", json={"text": "a" * 300_000}), 413)):
            assert_error(r, status)
            assert "close" not in r.headers.get("connection", "")
            r = c.get("/get_model_info")
            assert r.status_code == 200
        assert len(c._transport._pool.connections) == 1, "one kept-alive connection served every request"


def test_unhandled_error_gives_500_and_closes_the_connection():
    app = FastAPI()
    app.add_middleware(RequestGuard, args=ServerArgs(api_key=None))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/ok")
    async def ok() -> dict:
        return {"ok": True}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", http=header_timeout_protocol(5.0)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            r = c.get("/boom")
            assert_error(r, 500, "internal_error")
            assert r.headers["connection"] == "close"
            assert c.get("/ok").json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_cross_origin_requests_refused():
    srv = shared_server()
    evil = {**AUTH, "Origin": "http://evil.example"}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for r in (c.post("/flush_cache", headers=evil), c.get("/flush_cache", headers=evil),
                  c.post("/abort_request", json={"rid": "x"}, headers=evil),
                  c.post("/generate", json={"text": "Hi", "sampling_params": TINY}, headers=evil),
                  c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=evil),
                  c.post("/abort_request", json={"rid": "x"}, headers={**AUTH, "Origin": "null"})):
            assert_error(r, 403, "origin_not_allowed")
        same = {**AUTH, "Origin": srv.url}
        assert c.post("/abort_request", json={"rid": "x"}, headers=same).json() == {"success": False}
        assert c.post("/abort_request", json={"rid": "x"}, headers=AUTH).json() == {"success": False}
        assert c.post("/generate", json={"text": "Hi", "sampling_params": TINY}, headers=same).status_code == 200
        assert c.get("/get_model_info", headers=evil).status_code == 200  # reads: the browser's CORS rules


def test_unknown_host_refused():
    srv = shared_server()
    _, port = host_port(srv)
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        for r in (c.get("/get_model_info", headers={"Host": "evil.example"}),
                  c.post("/generate", json={"text": "Hi"}, headers={"Host": f"evil.example:{port}"}),
                  c.post("/flush_cache", headers={"Host": "127.0.0.1.evil.example"})):
            assert_error(r, 403, "host_not_allowed")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
            assert c.get("/get_model_info", headers={"Host": host}).status_code == 200, host
        assert httpx.get(srv.url + "/health", headers={"Host": "evil.example"}).status_code == 200


def test_non_json_bodies_refused():
    import openai

    import radixflow as rf

    srv = shared_server()
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        assert_error(c.post("/flush_cache", content=b"x", headers={"content-type": "text/plain"}), 415,
                     "unsupported_media_type")
        assert_error(c.post("/abort_request", content=b'{"rid": "x"}', headers={"content-type": "text/plain"}), 415)
        assert_error(c.post("/generate", data={"text": "Hi"}), 415)  # a form
        assert_error(c.post("/generate", content=b'{"text": "Hi"}'), 415)  # no content type
        chunked = (b for b in [b'{"rid": ', b'"x"}'])
        assert_error(c.post("/abort_request", content=chunked, headers={"content-type": "text/plain"}), 415)
        assert c.post("/flush_cache").status_code == 200  # no body: fine
        utf8 = {"content-type": "application/json; charset=utf-8"}
        r = c.post("/abort_request", content=b'{"rid": "x"}', headers=utf8)
        assert r.json() == {"success": False}
    backend = rf.RuntimeEndpoint(srv.url, api_key=API_KEY)
    assert backend.generate("Hi", TINY)["meta_info"]["completion_tokens"] == 2
    assert backend.flush_cache()
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    assert oai.completions.create(model=model, prompt="Hi", max_tokens=1, temperature=0).usage.completion_tokens == 1


# ---- the API key -------------------------------------------------------------------------------


def server_cmdlines(srv: ServerProcess) -> str:
    procs = [psutil.Process(srv.pid), *srv.descendants()]
    return " ".join(" ".join(p.cmdline()) for p in procs)


def test_api_key_from_env(live):
    assert_error(httpx.get(live.url + "/get_model_info"), 401, "invalid_api_key")
    with live_client(live) as c:
        assert c.get("/get_model_info").status_code == 200
        assert c.get("/get_server_info").json()["server_args"]["api_key"] == "<set>"
    assert ENV_KEY not in server_cmdlines(live)
    assert ENV_KEY not in live.log_text()


def test_api_key_from_file(keyfile):
    assert_error(httpx.get(keyfile.url + "/get_model_info"), 401)
    env_auth = {"Authorization": f"Bearer {ENV_KEY}"}
    assert_error(httpx.get(keyfile.url + "/get_model_info", headers=env_auth), 401)  # the file wins
    r = httpx.get(keyfile.url + "/get_model_info", headers={"Authorization": f"Bearer {FILE_KEY}"})
    assert r.status_code == 200
    assert FILE_KEY not in server_cmdlines(keyfile) and ENV_KEY not in server_cmdlines(keyfile)


def test_api_key_options_conflict(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("k")
    assert cli.main(["serve", "--api-key", "a", "--api-key-file", str(key)]) == 2
    assert "not both" in capsys.readouterr().err
    key.write_text(" \n")
    assert cli.main(["serve", "--api-key-file", str(key)]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli.main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2


# ---- the ipc sockets (keep last: kills `keyfile`) ------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract ipc endpoints are Linux-only")
def test_no_ipc_files_left_after_sigkill(keyfile):
    children = keyfile.descendants()
    assert len(children) >= 2
    keyfile.proc.kill()
    keyfile.proc.wait(10)
    for p in children:  # PR_SET_PDEATHSIG kills them anyway
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)
    left = [os.path.join(root, name) for root, dirs, files in os.walk(keyfile.tmpdir) for name in dirs + files
            if name.startswith("radixflow-ipc-") or name.endswith(".ipc")]
    assert not left, left
    with open("/proc/net/unix") as f:
        assert f"@radixflow-{keyfile.pid}-" not in f.read()

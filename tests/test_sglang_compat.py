"""SGLang's own frontend as the client: programs in the style of SGLang's documentation, written
with `import sglang as sgl` and `sgl.RuntimeEndpoint`, run against a real `radixflow serve`.

The programs live in tests/sglang_programs.py and run in a subprocess (importing sglang changes
environment variables and patches transformers). sglang is installed without its dependencies
(README: the test command); where it is not installed these tests skip and say so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_utils import API_KEY, AUTH, ServerProcess, shared_server, wait_pool_whole

PROGRAMS = ["multi_turn_chat", "select", "regex", "gen_int", "json_regex", "json_schema", "fork_join",
            "streaming", "run_batch", "min_tokens", "stop_regex", "cache_prefix", "server_info"]
SCRIPT = Path(__file__).with_name("sglang_programs.py")


def _sglang_missing() -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import sglang; from sglang import RuntimeEndpoint"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
    return (f"SGLang's frontend is not importable ({last}); install it with "
            "`pip install -e '.[compat]' && pip install --no-deps 'sglang>=0.5,<0.6'`")


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    missing = _sglang_missing()
    if missing:
        pytest.skip(missing)
    return shared_server()


@pytest.fixture(scope="module")
def results(server: ServerProcess) -> dict[str, dict]:
    run = subprocess.run([sys.executable, str(SCRIPT), server.url, API_KEY, *PROGRAMS],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        wait_pool_whole(client)  # every program's requests ended and gave back their slots
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", PROGRAMS)
def test_sglang_program(results: dict[str, dict], name: str) -> None:
    res = results[name]
    assert res["ok"], f"{name}: {res['detail']}\n{res.get('traceback', '')}"

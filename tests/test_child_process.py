"""Children die with their parent (runtime/child_process.py), however the parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# The middle process starts a grandchild that sleeps, prints its pid, and waits to be killed.
_IN_CHILD = """
import os, subprocess, sys
code = ("import os, time; from radixflow.runtime.child_process import die_with_parent; "
        "die_with_parent(int(os.environ['PARENT'])); print(os.getpid(), flush=True); time.sleep(120)")
child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PARENT": str(os.getpid())},
                         stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
child.wait()
"""
_PREEXEC = """
import os, subprocess, sys
from radixflow.runtime.router.data_parallel import _die_with_parent
child = subprocess.Popen(["sleep", "120"], preexec_fn=_die_with_parent(os.getpid()))
print(child.pid, flush=True)
child.wait()
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie (an orphan waits for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    code = "from radixflow.runtime.child_process import die_with_parent; die_with_parent(-1); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "alive" not in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("script", [_IN_CHILD, _PREEXEC], ids=["in_child", "preexec_fn"])
def test_a_child_dies_when_its_parent_is_killed(script):
    """SIGKILL leaves the parent no chance to stop its children: the kernel's signal does it."""
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(middle.stdout.readline())
        assert not _gone(child)
    finally:
        middle.kill()
        middle.wait(10)
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")

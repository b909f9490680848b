"""Child processes die with their parent: the one place that asks the kernel for it.

Every process radixflow starts (the server's scheduler and detokenizer, tensor-parallel ranks,
`serve --dp-size` workers) calls `die_with_parent` first. On Linux, PR_SET_PDEATHSIG has the
kernel signal the child when its parent dies, however it dies (SIGKILL included), so no child
outlives a killed server. Elsewhere there is no such call; the children's loops also check
`os.getppid()`, which covers those platforms and a parent gone before the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _libc() -> Any | None:
    """This process's libc (the symbols already loaded: glibc or musl alike), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have `sig` sent to this process when its parent dies (Linux; elsewhere a no-op), then exit
    at once (code 1) if the parent is no longer `parent_pid`: it died before the call, and no
    signal will come. Linux signals when the parent *thread* that started the child ends.

    Safe in a `subprocess.Popen(preexec_fn=...)` when `preload()` ran in the parent first (the
    setting survives exec)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def preload() -> None:
    """Load libc now, in the parent: a `preexec_fn` runs between fork and exec, where loading a
    library in a process with threads can deadlock on the loader's lock."""
    _libc()

"""radixflow: a serving engine for agent programs.

`import radixflow as rf` gives the DSL (`rf.function`, `rf.gen`, `rf.select`, roles, ...) and its
backends: `rf.Engine` (in-process: `frontend.backend_engine.EngineBackend`, which wraps
`radixflow.runtime.engine.Engine`, loaded on construction) and `rf.RuntimeEndpoint` (HTTP).
"""

import os as _os
import sys as _sys

# Torch's OpenMP threads spin after each op; on small machines they starve every other thread
# (the BLAS pool the CPU matmuls run on, the detokenizer, the server's other processes). The
# setting only takes effect if torch has not been loaded yet; runtime.cpu_gemm checks for that.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from radixflow.frontend import *  # noqa: E402, F403
from radixflow.frontend import __all__ as _frontend_all  # noqa: E402

__all__ = list(_frontend_all)

"""radixflow: a serving engine for agent programs.

`import radixflow as rf` gives the DSL (`rf.function`, `rf.gen`, `rf.select`, roles, ...) and its
backends: `rf.Engine` (in-process; the runtime engine is loaded on construction) and
`rf.RuntimeEndpoint` (HTTP).
"""

from radixflow.frontend import *  # noqa: F403
from radixflow.frontend import __all__ as _frontend_all

__all__ = list(_frontend_all)

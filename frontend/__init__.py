"""radixflow.frontend — the DSL: IR, interpreter, tracer, chat templates, backends."""

from radixflow.frontend.api import (
    assistant,
    assistant_begin,
    assistant_end,
    function,
    gen,
    gen_int,
    gen_string,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixflow.frontend.backend import (
    Backend,
    BackendError,
    InvalidRequestError,
    get_default_backend,
    set_default_backend,
)
from radixflow.frontend.backend_engine import EngineBackend
from radixflow.frontend.backend_http import RuntimeEndpoint
from radixflow.frontend.chat_template import ChatTemplate
from radixflow.frontend.choices import (
    ChoicesMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixflow.frontend.function import Function
from radixflow.frontend.state import ProgramState, ProgramStateGroup

# `rf.Engine` is the DSL's documented name for its in-process backend (not the runtime's
# `radixflow.runtime.engine.Engine`, which it wraps).
Engine = EngineBackend

__all__ = [
    "Backend", "BackendError", "ChatTemplate", "ChoicesMethod", "Engine", "EngineBackend", "Function",
    "InvalidRequestError", "ProgramState", "ProgramStateGroup", "RuntimeEndpoint", "assistant", "assistant_begin",
    "assistant_end", "function", "gen", "gen_int", "gen_string", "get_default_backend", "greedy_token_selection",
    "select", "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end",
]

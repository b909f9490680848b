"""`Function`: what `@rf.function` makes of a program — `run`, `run_batch`, `bind`."""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from radixflow.frontend.backend import Backend, resolve_backend
from radixflow.frontend.interpreter import StreamExecutor
from radixflow.frontend.ir import SamplingArgs
from radixflow.frontend.state import ProgramState
from radixflow.frontend.tracer import TracerState, trace_prefix

_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingArgs))


class Function:
    """A program: `func(s, *args)` appends expressions to the state `s`.

    Keyword arguments of run / run_batch that name a sampling setting (max_new_tokens, temperature,
    stop, top_p, ..., return_logprob) and are not parameters of `func` become defaults for every
    gen of the run; a gen's own settings win."""

    def __init__(self, func: Callable[..., Any], bound: dict[str, Any] | None = None) -> None:
        params = list(inspect.signature(func).parameters)
        if not params:
            raise TypeError(f"a program takes the state as its first argument: {func.__name__}(s, ...)")
        self.func = func
        self.bound = dict(bound or {})
        self._arg_names = set(params[1:])
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> Function:
        """A copy with some arguments fixed."""
        unknown = set(kwargs) - self._arg_names
        if unknown and not self._takes_var_kwargs():
            raise TypeError(f"{self.__name__} has no parameter(s) {sorted(unknown)}")
        return Function(self.func, {**self.bound, **kwargs})

    def _takes_var_kwargs(self) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(self.func).parameters.values())

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], SamplingArgs]:
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_NAMES and k not in self._arg_names}
        return {**self.bound, **kwargs}, SamplingArgs(**sampling)

    def run(self, *args: Any, backend: Backend | None = None, stream: bool = False, **kwargs: Any) -> ProgramState:
        """Run the program once; returns its state. Without stream, returns after every expression
        ran and raises the program's first error. With stream=True, returns at once: the body runs
        on its own thread; read the output with `state.text_iter()` (errors are raised there)."""
        return self._run(args, kwargs, resolve_backend(backend), stream)

    def _run(self, args: tuple, kwargs: dict[str, Any], backend: Backend, stream: bool,
             after: Future | None = None, inline: bool = False) -> ProgramState:
        """run(); `after`: a prefix commit the program's first request waits for; `inline`: the
        state's expressions run on this thread as they are added (see StreamExecutor)."""
        call_kwargs, defaults = self._split(kwargs)
        state = ProgramState(StreamExecutor(backend, defaults, stream=stream, after=after, inline=inline))
        if stream:
            threading.Thread(target=self._body, args=(state, args, call_kwargs, True), daemon=True,
                             name=f"radixflow-{self.__name__}").start()
            return state
        self._body(state, args, call_kwargs, False)
        state.sync()
        return state

    def _body(self, state: ProgramState, args: tuple, kwargs: dict[str, Any], streamed: bool) -> None:
        state.executor.body_thread = threading.get_ident()
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except BaseException as e:
            if not streamed:
                raise
            state.executor.fail(e)
        finally:
            state.executor.end()

    def run_batch(self, batch_kwargs: list[dict[str, Any]], *, backend: Backend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False, cache_prefix: bool = True,
                  **sampling: Any) -> list[ProgramState]:
        """Run the program once per argument dict, concurrently; states in input order. The program's
        constant prefix (found by tracing) is prefilled into the cache once, and every program's
        first request waits for that commit (an in-process engine holds them itself, so the programs
        start while it computes). Each program runs on its pool thread, its expressions in order as
        they are added (forks still run their branches concurrently). Raises the first program error
        after all programs finished."""
        backend = resolve_backend(backend)
        batch = [dict(kw) for kw in batch_kwargs]
        if not batch:
            return []
        n = min(len(batch), 128) if num_threads == "auto" else int(num_threads)
        if n < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        commit, prefix = None, ""
        if cache_prefix and len(batch) > 1:
            prefix = self.trace_prefix(backend)
        if len(batch) > 1:  # the commit and the first request of each program that starts now
            backend.expect_requests(min(n, len(batch)) + bool(prefix))
        if prefix:
            commit = backend.cache_prefix_async(prefix)
        with ThreadPoolExecutor(n, thread_name_prefix=f"radixflow-{self.__name__}") as pool:
            futures = [pool.submit(self._run, (), {**sampling, **kw}, backend, False, commit, True)
                       for kw in batch]
            if progress_bar:
                from concurrent.futures import as_completed

                from tqdm import tqdm

                for _ in tqdm(as_completed(futures), total=len(futures), desc=self.__name__):
                    pass
            states = [f.result() for f in futures]
        return states

    def trace_prefix(self, backend: Backend | None = None) -> str:
        """The constant text every run of this program starts with ("" if none)."""
        return trace_prefix(self.func, self.bound, resolve_backend(backend).chat_template())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside a program, `other(s, ...)` runs `other`'s body on the same state; elsewhere it is `run`."""
        if args and isinstance(args[0], (ProgramState, TracerState)):
            return self.func(args[0], *args[1:], **{**self.bound, **kwargs})
        return self.run(*args, **kwargs)

    def __repr__(self) -> str:
        return f"rf.function({self.__name__})"

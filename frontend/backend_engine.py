"""`EngineBackend` (exported as `rf.Engine`): the DSL's in-process backend, wrapping
`radixflow.runtime.engine.Engine`.

The runtime is imported on construction, so `import radixflow` stays light for HTTP-only users.
Everything the runtime engine offers (tokenizer, get_server_info, check_invariant, ...) is
reachable on the wrapper too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

from radixflow.frontend.backend import Backend, BackendError, InvalidRequestError, raise_if_aborted
from radixflow.frontend.chat_template import ChatTemplate


def _translate(e: Exception) -> BackendError:
    """The runtime's exception as the DSL's: ValueError -> InvalidRequestError, else BackendError."""
    if isinstance(e, ValueError):
        return InvalidRequestError(str(e), 400)
    return BackendError(str(e))


class EngineBackend(Backend):
    """In-process engine. `EngineBackend(model=None, **opts)`, i.e. `rf.Engine(...)`: opts are
    EngineConfig fields (max_total_tokens, max_running_requests, disable_radix_cache, ...); model
    None = default model."""

    def __init__(self, model: str | None = None, **opts: Any) -> None:
        from radixflow.runtime.engine import Engine as RuntimeEngine
        from radixflow.runtime.engine import GenerationError

        self._errors = (ValueError, GenerationError)
        self.engine = RuntimeEngine(model, **opts)
        self._template: ChatTemplate | None = None

    @classmethod
    def from_runtime(cls, engine: Any) -> EngineBackend:
        """Wrap an already running `radixflow.runtime.engine.Engine` (no second model load). The
        wrapper's shutdown() shuts that engine down too."""
        from radixflow.runtime.engine import GenerationError

        self = cls.__new__(cls)
        self._errors = (ValueError, GenerationError)
        self.engine = engine
        self._template = None
        return self

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, *,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 return_text_in_logprobs: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        """The runtime engine's generate; errors become BackendError / InvalidRequestError."""
        try:
            return self.engine.generate(prompt, sampling_params, input_ids=input_ids, return_logprob=return_logprob,
                                        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
                                        return_text_in_logprobs=return_text_in_logprobs)
        except self._errors as e:
            raise _translate(e) from e

    def generate_stream(self, prompt: str, sampling_params: dict[str, Any] | None = None,
                        **options: Any) -> Iterator[dict[str, Any]]:
        """Cumulative results of one streamed request (the request is aborted if the iterator is dropped)."""
        try:
            it = self.engine.generate(prompt, sampling_params, stream=True, **options)
            for item in it:
                yield raise_if_aborted(item)
        except self._errors as e:
            raise _translate(e) from e

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                             **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """Awaitable generate (no streaming)."""
        try:
            return await self.engine.async_generate(prompt, sampling_params, **kwargs)
        except self._errors as e:
            raise _translate(e) from e

    async def async_stream(self, prompt: str, sampling_params: dict[str, Any] | None = None,
                           **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """Async iterator of cumulative results for one prompt."""
        try:
            async for item in self.engine.async_stream(prompt, sampling_params, **kwargs):
                yield item
        except self._errors as e:
            raise _translate(e) from e

    def cache_prefix_async(self, text: str) -> Future:
        """Queue the commit and return a completed future: the engine schedules requests in the
        order they were submitted, and holds a later request that shares the commit's uncached
        prefix until the commit has computed it, so nobody needs to wait for the commit itself.
        A refused commit is not reported here: the branch's own request gets the same error."""
        done: Future = Future()
        try:
            self.engine.submit(text, {"max_new_tokens": 0})
        except self._errors as e:
            done.set_exception(_translate(e))
            return done
        done.set_result(None)
        return done

    def chat_template(self) -> ChatTemplate:
        """The model's own template, rendered by the runtime tokenizer."""
        if self._template is None:
            tok = self.engine.tokenizer

            def render(messages: Any, add_generation_prompt: bool) -> str:
                return tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)

            self._template = ChatTemplate(render, tuple(tok.chat_stop_strings), name=tok.path)
        return self._template

    def expect_requests(self, n: int) -> None:
        """The runtime engine's expect_requests, 10 ms per request and half a second at most."""
        self.engine.expect_requests(n, min(0.5, 0.01 * n))

    def flush_cache(self) -> bool:
        ok, _ = self.engine.flush_cache()
        return bool(ok)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> EngineBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: forward to the runtime engine.
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __repr__(self) -> str:
        return f"rf.Engine(model_path={self.engine.model_path!r})"

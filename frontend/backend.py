"""The one seam between the DSL and a runtime: the `Backend` interface, its errors, and the
documented process-wide default backend (`set_default_backend`).

Results are native /generate dicts (DESIGN §6): {"text", "output_ids", "meta_info": {...}}.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from radixflow.frontend.chat_template import ChatTemplate


class BackendError(RuntimeError):
    """A request failed in the backend. `str(e)` is the engine's / server's message; `status` is
    the HTTP status (None for failures without one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidRequestError(BackendError, ValueError):
    """The backend refused a request as invalid (bad parameters, prompt too long: HTTP 4xx)."""


def raise_if_aborted(result: dict[str, Any]) -> dict[str, Any]:
    """Return `result`; raise BackendError when its finish_reason says it was aborted."""
    fr = (result.get("meta_info") or {}).get("finish_reason") or {}
    if fr.get("type") == "abort":
        raise BackendError(fr.get("message") or "request aborted")
    return result


class Backend(ABC):
    """What the interpreter needs from a runtime. Implementations must be thread-safe: a program's
    branches and run_batch's programs call them from many threads at once."""

    @abstractmethod
    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, *,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 return_text_in_logprobs: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        """One result dict for one prompt, a list (in order) for a list. Raises BackendError
        (InvalidRequestError for bad input) with the runtime's message."""

    @abstractmethod
    def generate_stream(self, prompt: str, sampling_params: dict[str, Any] | None = None,
                        **options: Any) -> Iterator[dict[str, Any]]:
        """Cumulative results for one prompt (each has the whole text so far); the last one is final.
        `options` are generate's logprob keywords. Raises BackendError like generate."""

    @abstractmethod
    def chat_template(self) -> ChatTemplate:
        """The served model's chat template."""

    def cache_prefix(self, text: str) -> dict[str, Any]:
        """Prefill `text` into the prefix cache (a max_new_tokens=0 request); returns its result."""
        result = self.generate(text, {"max_new_tokens": 0})
        assert isinstance(result, dict)
        return result

    def cache_prefix_async(self, text: str) -> Future:
        """Start `cache_prefix(text)` without waiting. The future completes once a request sent
        after that will reuse the cached prefix; here, when the commit request has finished (an
        in-process engine, which schedules requests in order, completes it at once)."""
        fut: Future = Future()

        def commit() -> None:
            try:
                fut.set_result(self.cache_prefix(text))
            except BaseException as e:  # noqa: BLE001 — handed to whoever waits on the future
                fut.set_exception(e)

        threading.Thread(target=commit, name="radixflow-commit", daemon=True).start()
        return fut

    def flush_cache(self) -> bool:
        """Drop the prefix cache; False when the runtime refuses (requests running)."""
        return False

    def expect_requests(self, n: int) -> None:
        """Hint that about `n` requests are about to be sent from many threads (run_batch), so an
        idle runtime can start them as one batch. A no-op where the backend cannot use it."""

    def shutdown(self) -> None:
        """Release the backend's resources."""


_default_lock = threading.Lock()
_default_backend: Backend | None = None


def set_default_backend(backend: Backend | None) -> None:
    """Set the backend that `run` / `run_batch` use when called without `backend=` (None clears it).
    This is the DSL's only process-wide setting."""
    global _default_backend
    if backend is not None and not isinstance(backend, Backend):
        raise TypeError(f"expected an rf backend (rf.Engine, rf.RuntimeEndpoint), got {type(backend).__name__}")
    with _default_lock:
        _default_backend = backend


def get_default_backend() -> Backend | None:
    """The backend set by set_default_backend, or None."""
    return _default_backend


def resolve_backend(backend: Backend | None) -> Backend:
    """`backend`, else the default; a clear error when there is neither."""
    b = backend if backend is not None else _default_backend
    if b is None:
        raise RuntimeError("no backend: pass backend=... or call rf.set_default_backend(rf.Engine())")
    return b

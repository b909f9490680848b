"""The grammar backend contract: compile specs once (cached, off the hot path), match per request.

A *spec* is a pair ``(kind, spec)`` with ``kind`` in :data:`GRAMMAR_KINDS`:

- ``"json"``: a JSON schema (a JSON object as text). ``{}`` and ``{"type": "object"}`` mean
  "any JSON object" (OpenAI ``json_object`` mode).
- ``"regex"``: a regex the whole output must match.
- ``"ebnf"``: a GBNF-style grammar with a ``root`` rule.
- ``"choices"``: a JSON list of strings; the output is exactly one of them.
- ``"structural_tag"``: a JSON object, SGLang's ``{"type": "structural_tag", "structures":
  [{"begin", "schema", "end"}, ...], "triggers": [...]}`` (free text until a trigger, then the
  tag whose ``begin`` it starts, its JSON constrained by ``schema``), or xgrammar's
  ``{"type": "structural_tag", "format": {...}}``.

Bitmask format (shared by every backend): int32 tensor ``(batch, ceil(vocab_size / 32))``; bit
``j % 32`` of word ``j // 32`` in row ``r`` is 1 iff token ``j`` is allowed for row ``r``.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import threading
import time
from typing import Any

import torch

from radixflow.grammars.errors import GrammarCompileTimeout

GRAMMAR_KINDS = ("json", "regex", "ebnf", "choices", "structural_tag")


class GrammarMatcher(abc.ABC):
    """The grammar state of one request: which tokens may come next, given those accepted so far.

    Not thread-safe; one owner (the scheduler) drives it.
    """

    @abc.abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance over ``token_id``; return False (state unchanged) if the grammar rejects it."""

    @abc.abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]`` (every bit of the row is written).

        Returns whether the row must be applied: False only if every token is allowed (applying
        it would change nothing); a backend may return True for such a row too. A dead end (no
        token allowed) either raises or returns True with an all-zero row, which leaves no finite
        logit, so the sampler fails the request: it is never sampled unconstrained.
        """

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar is complete *and* a stop token was accepted."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accept steps (an ``accept_string`` counts as one step)."""

    @abc.abstractmethod
    def find_jump_forward_string(self) -> str:
        """The longest string every grammar-conforming continuation starts with ("" if none).

        Does not change the state.
        """

    @abc.abstractmethod
    def accept_string(self, text: str) -> bool:
        """Advance over ``text`` (one rollback step); return False (state unchanged) if rejected."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Return to the initial state."""


class GrammarBackend(abc.ABC):
    """Compiles grammar specs into a bounded LRU cache with a thread pool, and makes matchers.

    Subclasses implement :meth:`validate`, :meth:`_compile` and :meth:`create_matcher`.

    Args:
        tokenizer_json_path: path of a Hugging Face ``tokenizer.json``.
        vocab_size: logits width of the model (may exceed the tokenizer's vocabulary; the
            extra ids are never allowed).
        stop_token_ids: tokens that end a complete grammar (EOS); a matcher terminates only
            by accepting one of them.
        max_workers: compile threads.
        compile_timeout: seconds a caller waits for a compile before
            :class:`GrammarCompileTimeout` (the compile itself runs on to completion).
        cache_size: compiled grammars kept (least recently used dropped first).
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        vocab_size: int,
        stop_token_ids: list[int],
        max_workers: int = 2,
        compile_timeout: float = 30.0,
        cache_size: int = 512,
    ) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token")
        if max_workers < 1 or compile_timeout <= 0 or cache_size < 1:
            raise ValueError("max_workers, compile_timeout and cache_size must be positive")
        self.tokenizer_json_path = tokenizer_json_path
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.compile_timeout = compile_timeout
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="grammar-compile"
        )

    # ---- to implement -------------------------------------------------------------------------

    @abc.abstractmethod
    def validate(self, kind: str, spec: str) -> None:
        """Check ``(kind, spec)`` quickly, without compiling; raise :class:`GrammarError` if bad."""

    @abc.abstractmethod
    def _compile(self, kind: str, spec: str) -> Any:
        """Compile ``(kind, spec)`` (runs in a pool thread); raise :class:`GrammarError` if bad."""

    @abc.abstractmethod
    def create_matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher, in its initial state, for a compiled grammar."""

    # ---- shared machinery ---------------------------------------------------------------------

    name = "base"  # the backend's name in reports ("xgrammar", "llguidance")

    def fill_bitmasks(self, items: list[tuple[GrammarMatcher, int]], bitmask: torch.Tensor
                      ) -> tuple[list[int], dict[int, Exception]]:
        """Fill ``bitmask[row]`` for each ``(matcher, row)`` of this backend's matchers.

        Returns the rows that need masking and ``{row: exception}`` for the matchers that raised
        (their rows are left as they were). Backends may fill the rows in parallel.
        """
        used, failed = [], {}
        for matcher, row in items:
            try:
                if matcher.fill_bitmask(bitmask, row):
                    used.append(row)
            except Exception as e:
                failed[row] = e
        return used, failed

    def compile_async(self, kind: str, spec: str) -> concurrent.futures.Future:
        """The future of the compiled grammar for ``(kind, spec)``.

        The same ``(kind, spec)`` gets the same future while it is cached. A compile that fails
        is dropped from the cache (its future raises :class:`GrammarError`), so a later call
        compiles again. Never blocks on compiling.
        """
        key = (kind, spec)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not _failed(fut):
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, kind, spec)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f: self._forget_failure(key, f))
        return fut

    def _forget_failure(self, key: tuple[str, str], fut: concurrent.futures.Future) -> None:
        if _failed(fut):
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]

    def get_compiled(self, future: concurrent.futures.Future, timeout: float | None = None) -> Any:
        """Block until ``future`` is done, up to ``timeout`` seconds (default ``compile_timeout``).

        Returns the compiled grammar; raises :class:`GrammarCompileTimeout` when time runs out
        and :class:`GrammarError` when the spec is bad.
        """
        timeout = self.compile_timeout if timeout is None else timeout
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise GrammarCompileTimeout(f"grammar compilation took longer than {timeout:g}s") from None

    def poll(self, future: concurrent.futures.Future, deadline: float) -> Any | None:
        """Non-blocking check for the scheduler's grammar queue.

        ``deadline`` is a ``time.monotonic()`` instant (typically when the request started
        waiting plus ``compile_timeout``). Returns the compiled grammar when ready, None while
        compiling before the deadline; raises :class:`GrammarCompileTimeout` after it and
        :class:`GrammarError` when the spec is bad.
        """
        if future.done():
            return future.result()
        if time.monotonic() > deadline:
            raise GrammarCompileTimeout(f"grammar compilation took longer than {self.compile_timeout:g}s")
        return None

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """A CPU int32 bitmask ``(batch_size, ceil(vocab_size / 32))`` with every token allowed."""
        return torch.full((batch_size, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    @staticmethod
    def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | list[int] | None = None
                      ) -> None:
        """Set ``logits[r, j] = -inf`` wherever bit ``j`` of ``bitmask[r]`` is 0, in place.

        ``rows`` (int indices into both tensors) limits the rows touched; None means all rows.
        ``bitmask`` must be on the device of ``logits``. Pure-PyTorch implementation.
        """
        apply_bitmask_torch(logits, bitmask, rows)

    def shutdown(self) -> None:
        """Stop the compile threads; compiles not yet started are cancelled."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _failed(fut: concurrent.futures.Future) -> bool:
    return fut.done() and (fut.cancelled() or fut.exception() is not None)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool tensor ``(*bitmask.shape[:-1], vocab_size)``: True where the token is allowed."""
    assert bitmask.dtype == torch.int32, bitmask.dtype
    assert bitmask.shape[-1] * 32 >= vocab_size, (bitmask.shape, vocab_size)
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (..., words, 32)
    return bits.flatten(-2)[..., :vocab_size].bool()


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | list[int] | None = None
                        ) -> None:
    """Reference/fallback for :meth:`GrammarBackend.apply_bitmask` (any device, any float dtype)."""
    assert logits.dim() == 2 and bitmask.dim() == 2, (logits.shape, bitmask.shape)
    assert bitmask.device == logits.device, (bitmask.device, logits.device)
    vocab = logits.shape[1]
    if rows is None:
        assert bitmask.shape[0] == logits.shape[0], (bitmask.shape, logits.shape)
        allowed = unpack_bitmask(bitmask, vocab)  # (B, V)
        logits.masked_fill_(~allowed, float("-inf"))
        return
    rows = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
    allowed = unpack_bitmask(bitmask[rows], vocab)  # (R, V)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

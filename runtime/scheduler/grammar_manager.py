"""Constrained decoding inside the scheduler: the grammar queue, batch bitmasks, jump-forward."""

from __future__ import annotations

import concurrent.futures
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from radixflow.grammars import GrammarCompileTimeout, GrammarError
from radixflow.grammars.base import GrammarBackend, GrammarMatcher
from radixflow.grammars.jump_forward import jump_forward_tokens
from radixflow.grammars.selection import choose_backend
from radixflow.grammars.xgrammar_backend import XGrammarBackend
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.req import Req, ReqStatus
from radixflow.runtime.request_faults import internal_abort
from radixflow.runtime.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class GrammarManager:
    """Owns the grammar backends and the requests waiting for their grammar to compile.

    A constrained request enters via `submit` (backend choice and fast validation; compile
    starts in that backend's thread pool), leaves via `poll` once its matcher exists (or with an
    abort finish_reason when compilation failed or timed out). Backends are created on first use;
    `config.grammar_backend` picks one, or `auto` chooses per request (grammars/selection.py).

    `wake` (optional) is called, from another thread, whenever a waiting request may have become
    ready: its backend choice or compile finished, or its deadline passed. A loop with nothing else
    to do (`only_compiling`) sleeps until then instead of polling."""

    def __init__(self, config: EngineConfig, model_path: str, vocab_size: int, stop_ids: list[int],
                 tokenizer: Tokenizer, wake: Callable[[], None] | None = None) -> None:
        self._tokenizer_json = os.path.join(config.tokenizer or model_path, "tokenizer.json")
        self.mode = config.grammar_backend
        self.compile_timeout = config.grammar_compile_timeout
        self.stop_ids = stop_ids
        self.backends: dict[str, GrammarBackend] = {}
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.waiting: list[tuple[Req, GrammarBackend | None, float]] = []
        # choosing a backend analyses the schema (seconds for a 2 MB one): not on the scheduler's loop
        self._choices = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-choice")
        self.jump_forward_tokens = 0  # tokens appended without a decode step
        self._mask = torch.empty((0, (vocab_size + 31) // 32), dtype=torch.int32)
        self.wake = wake
        self._alarm = _Alarm(self._wake)

    def backend(self, name: str) -> GrammarBackend:
        """The backend called `name` ("xgrammar" or "llguidance"), created on first use."""
        if name not in self.backends:
            if name == "xgrammar":
                from radixflow.grammars.xgrammar_backend import XGrammarBackend as cls
            else:
                from radixflow.grammars.llguidance_backend import LLGuidanceBackend as cls
            self.backends[name] = cls(self._tokenizer_json, self.vocab_size, self.stop_ids,
                                      compile_timeout=self.compile_timeout)
        return self.backends[name]

    def submit(self, req: Req) -> str | None:
        """Start choosing req's backend (then compiling) off the scheduler's loop: analysing a
        large schema takes seconds. Never refuses here (returns None): an invalid spec, or a
        strict json_schema that no allowed backend enforces exactly, comes out of `poll` aborted."""
        kind, spec = req.params.grammar_spec
        req.grammar_future = self._choices.submit(choose_backend, kind, spec, self.mode,
                                                  req.params.json_schema_strict)
        deadline = time.monotonic() + self.compile_timeout
        self.waiting.append((req, None, deadline))
        req.grammar_future.add_done_callback(self._wake)
        if self.wake is not None:
            self._alarm.add(deadline)
        return None

    def pending(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        """Stop this manager's threads: the deadline alarm (joined), the backend-choice pool and
        each backend's compile pool (queued work cancelled, running compiles left to finish on
        their own). Idempotent; the manager takes no requests after it."""
        self._alarm.close()
        self._choices.shutdown(wait=False, cancel_futures=True)
        for backend in self.backends.values():
            backend.shutdown()

    def only_compiling(self) -> bool:
        """True when every waiting request is still being chosen or compiled before its deadline:
        `poll` would return nothing until `wake` is called."""
        now = time.monotonic()
        return all(not req.grammar_future.done() and now <= deadline for req, _, deadline in self.waiting)

    def _wake(self, *_: object) -> None:
        if self.wake is not None:
            self.wake()

    def poll(self) -> list[Req]:
        """Requests whose grammar is ready (matcher attached) or failed (finish_reason set: the
        spec's error or refusal, or an internal error when choosing, compiling or creating the
        matcher raised)."""
        ready, still = [], []
        for req, backend, deadline in self.waiting:
            try:
                done, backend = self._advance(req, backend, deadline)
                if not done:
                    still.append((req, backend, deadline))
                    continue
            except GrammarError as e:
                req.finish_reason = {"type": "abort", "message": str(e)}
            except Exception as e:
                logger.exception("grammar compile of %s failed", req.rid)
                req.finish_reason = internal_abort("grammar compile", e)
            ready.append(req)
        self.waiting = still
        return ready

    def _advance(self, req: Req, backend: GrammarBackend | None,
                 deadline: float) -> tuple[bool, GrammarBackend | None]:
        """One non-blocking step for a waiting request: (matcher attached, the backend it is on).
        `backend` None: the backend is still being chosen (req.grammar_future is the choice)."""
        if backend is None:
            if not req.grammar_future.done():
                if time.monotonic() > deadline:
                    raise GrammarCompileTimeout(f"grammar compilation took longer than {self.compile_timeout:g}s")
                return False, None
            choice = req.grammar_future.result()
            backend = self.backend(choice.backend)
            kind, spec = req.params.grammar_spec
            req.grammar_info = choice.info(kind, spec)
            req.grammar_future = backend.compile_async(kind, spec)
            req.grammar_future.add_done_callback(self._wake)
        compiled = backend.poll(req.grammar_future, deadline)
        if compiled is None:
            return False, backend
        req.grammar = backend.create_matcher(compiled)
        return True, backend

    def discard(self, req: Req) -> None:
        self.waiting = [w for w in self.waiting if w[0] is not req]

    def mask_fn(self, reqs: list[Req]) -> Callable[[torch.Tensor], dict[int, Exception]] | None:
        """A hook masking the constrained rows of a (B, V) logits tensor, or None if none are.
        Every backend fills its rows of one shared bitmask; one kernel applies it. The hook
        returns {row: exception} for the rows whose matcher raised (left unmasked)."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return None

        def apply(logits: torch.Tensor) -> dict[int, Exception]:
            assert logits.shape[0] == len(reqs), (logits.shape, len(reqs))
            mask = self._bitmask(len(reqs))  # (B, words): row i is batch row i, so logits are masked in place
            by_backend: dict[str, list[tuple[GrammarMatcher, int]]] = {}
            for i in rows:
                by_backend.setdefault(reqs[i].grammar_info["backend"], []).append((reqs[i].grammar, i))
            used, failed = [], {}
            for name, items in by_backend.items():
                u, f = self.backends[name].fill_bitmasks(items, mask)
                used += u
                failed.update(f)
            if used:
                # no gather/scatter of logit rows: a copy of a (rows, V) slice costs more than the masks
                only = None if len(used) == len(reqs) else sorted(used)
                XGrammarBackend.apply_bitmask(logits, mask.to(logits.device), only)
            return failed
        return apply

    def _bitmask(self, batch: int) -> torch.Tensor:
        """A (batch, words) int32 CPU bitmask, reused across steps. Its rows hold stale masks: only
        rows a backend has just filled (every bit written) are applied."""
        if self._mask.shape[0] < batch:
            self._mask = torch.full((batch, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        return self._mask[:batch]

    def accept(self, req: Req, token: int) -> None:
        if not req.grammar.accept_token(token):
            req.finish_reason = {"type": "abort", "message": f"grammar rejected token {token}"}

    def jump_forward(self, reqs: list[Req], requeue: Callable[[Req], None]) -> list[tuple[Req, Exception]]:
        """For each running constrained request whose grammar forces text, append it at once.

        `requeue(req)` must hand the request's KV to the radix cache and put it back in the
        waiting queue; it re-enters with the retokenized output, and re-admission hits the cache
        for all but the changed tail. Returns
        the requests for which this raised, with the exception (the caller fails them)."""
        failed = []
        for req in reqs:
            if req.grammar is None or req.finished or req.status is not ReqStatus.RUNNING:
                continue
            if req.return_logprob:
                continue  # forced tokens have no sampled distribution to report
            try:
                self._jump_forward_one(req, requeue)
            except Exception as e:
                failed.append((req, e))
        return failed

    def _jump_forward_one(self, req: Req, requeue: Callable[[Req], None]) -> None:
        forced = req.grammar.find_jump_forward_string()
        if not forced:
            return
        # Tokens already streamed to the client must stay: retokenize the boundary only
        # for requests whose output is not streamed.
        k, new_ids = jump_forward_tokens(
            req.output_ids[req.sent_len:], forced,
            lambda s: self.tokenizer.encode(s, add_special_tokens=False),
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        # After the re-prefill the request samples one more token, so the forced tokens
        # must leave room for it within max_new_tokens; otherwise decode normally.
        budget = req.params.max_new_tokens - (len(req.output_ids) - k)
        if not new_ids or len(new_ids) >= budget:
            return
        if not req.grammar.accept_string(forced):
            return
        requeue(req)
        del req.output_ids[len(req.output_ids) - k:]
        req.output_ids.extend(new_ids)
        self.jump_forward_tokens += len(new_ids)


class _Alarm:
    """Calls `fire()` at each time `add`ed (time.monotonic()), from one daemon thread started on
    the first `add`: deadlines of requests that may have left since only cause a spare wake.
    `close()` ends the thread (it is the scheduler's: a server or engine that stops must not
    leave it waiting, and an engine made per test would add one each)."""

    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._times: list[float] = []  # a heap
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, when: float) -> None:
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._times, when)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grammar-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (at most `timeout` s); later `add`s are ignored."""
        with self._cond:
            self._closed = True
            self._times.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._times or self._times[0] > time.monotonic()):
                    self._cond.wait(self._times[0] - time.monotonic() if self._times else None)
                if self._closed:
                    return
                heapq.heappop(self._times)
            self._fire()

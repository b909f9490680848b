"""Constrained decoding inside the scheduler: the grammar queue, batch bitmasks, jump-forward."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from radixflow.grammars import GrammarError
from radixflow.grammars.jump_forward import jump_forward_tokens
from radixflow.grammars.xgrammar_backend import XGrammarBackend, validate_grammar
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.req import Req, ReqStatus
from radixflow.runtime.request_faults import internal_abort
from radixflow.runtime.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class GrammarManager:
    """Owns the grammar backend and the requests waiting for their grammar to compile.

    A constrained request enters via `submit` (fast validation; compile starts in the
    backend's thread pool), leaves via `poll` once its matcher exists (or with an abort
    finish_reason when compilation failed or timed out)."""

    def __init__(self, config: EngineConfig, model_path: str, vocab_size: int, stop_ids: list[int],
                 tokenizer: Tokenizer) -> None:
        tok_dir = config.tokenizer or model_path
        self.backend = XGrammarBackend(os.path.join(tok_dir, "tokenizer.json"), vocab_size, stop_ids,
                                       compile_timeout=config.grammar_compile_timeout)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.waiting: list[tuple[Req, float]] = []
        self.jump_forward_tokens = 0  # tokens appended without a decode step

    def submit(self, req: Req) -> str | None:
        """Start compiling req's grammar; returns an error message for an invalid spec."""
        kind, spec = req.params.grammar_spec
        try:
            validate_grammar(kind, spec)
        except GrammarError as e:
            return str(e)
        req.grammar_future = self.backend.compile_async(kind, spec)
        self.waiting.append((req, time.monotonic() + self.backend.compile_timeout))
        return None

    def pending(self) -> int:
        return len(self.waiting)

    def poll(self) -> list[Req]:
        """Requests whose grammar is ready (matcher attached) or failed (finish_reason set: the
        spec's error, or an internal error when compiling or creating the matcher raised)."""
        ready, still = [], []
        for req, deadline in self.waiting:
            try:
                compiled = self.backend.poll(req.grammar_future, deadline)
                if compiled is None:
                    still.append((req, deadline))
                    continue
                req.grammar = self.backend.create_matcher(compiled)
            except GrammarError as e:
                req.finish_reason = {"type": "abort", "message": str(e)}
            except Exception as e:
                logger.exception("grammar compile of %s failed", req.rid)
                req.finish_reason = internal_abort("grammar compile", e)
            ready.append(req)
        self.waiting = still
        return ready

    def discard(self, req: Req) -> None:
        self.waiting = [(r, d) for r, d in self.waiting if r is not req]

    def mask_fn(self, reqs: list[Req]) -> Callable[[torch.Tensor], dict[int, Exception]] | None:
        """A hook masking the constrained rows of a (B, V) logits tensor, or None if none are.
        The hook returns {row: exception} for the rows whose matcher raised (left unmasked)."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return None

        def apply(logits: torch.Tensor) -> dict[int, Exception]:
            mask = self.backend.allocate_bitmask(len(rows))
            used, failed = [], {}
            for j, i in enumerate(rows):
                try:
                    if reqs[i].grammar.fill_bitmask(mask, j):
                        used.append(j)
                except Exception as e:
                    failed[i] = e
            if not used:
                return failed
            sub = logits[rows]
            mask = mask.to(logits.device)
            self.backend.apply_bitmask(sub, mask, torch.tensor(used, device=logits.device))
            logits[rows] = sub
            return failed
        return apply

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

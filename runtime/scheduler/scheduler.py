"""Continuous batching at iteration level over a radix-cached KV pool: the step loop.

Its parts live beside it, one job each: admission (prefill.py), the new-token ratio
(token_ratio.py), batch building (batch.py), retraction (retract.py), output collection
(output.py), KV bookkeeping (kv_cache.py), grammars (grammar_manager.py). I/O is a seam:
`add_request` / `abort_request` / `step()` / `drain_outputs()` are plain calls, used directly by
the offline Engine and fed from ZeroMQ by the server's scheduler process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.intake import check_prompt
from radixflow.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixflow.runtime.model.logprobs import input_logprobs
from radixflow.runtime.model.model_runner import ModelRunner
from radixflow.runtime.model.sampler import Sampler
from radixflow.runtime.req import Req, ReqStatus
from radixflow.runtime.request_faults import internal_error
from radixflow.runtime.scheduler import retract
from radixflow.runtime.scheduler.batch import decode_batch, extend_batch
from radixflow.runtime.scheduler.kv_cache import KVCacheManager
from radixflow.runtime.scheduler.output import OutputCollector
from radixflow.runtime.scheduler.prefill import PrefillAdder
from radixflow.runtime.scheduler.runner_contract import Runner
from radixflow.runtime.scheduler.schedule_policy import SchedulePolicy
from radixflow.runtime.scheduler.token_ratio import NewTokenRatio
from radixflow.runtime.text.stop_checker import check_finished
from radixflow.runtime.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the KV bookkeeping, the prefix cache and every request's state; runs one batch of
    its model runner per step."""

    def __init__(self, config: EngineConfig, runner: Runner, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer or Tokenizer.from_pretrained(config.tokenizer or runner.model_path)
        self.context_length = runner.context_length
        self.cache = KVCacheManager(runner.allocator, runner.req_to_token_pool, config.disable_radix_cache)
        self.policy = SchedulePolicy(config.schedule_policy, self.cache)
        self.ratio = NewTokenRatio()
        self.adder = PrefillAdder(config, self.cache, self.policy, self.ratio)
        self.sampler = Sampler()
        self.outputs = OutputCollector()
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(runner.model_config.eos_token_ids)
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # admitted, prefill done, decoding
        self.chunked: Req | None = None  # admitted, prefill not finished
        self.reqs: dict[str, Req] = {}
        self.last_was_extend = False
        self.grammar = None  # GrammarManager, created on first constrained request
        self._grammar_wakeup = None  # see set_grammar_wakeup
        self.stats = {"retractions": 0, "steps": 0, "extend_steps": 0, "decode_steps": 0, "mixed_steps": 0,
                      "prompt_tokens": 0, "computed_prompt_tokens": 0, "cached_tokens": 0,
                      "generated_tokens": 0}

    @classmethod
    def from_model_path(cls, config: EngineConfig, model_path: str, tokenizer: Tokenizer | None = None) -> Scheduler:
        """A scheduler on a freshly loaded `ModelRunner(config, model_path)`."""
        return cls(config, ModelRunner(config, model_path), tokenizer)

    # ---- I/O seam -------------------------------------------------------------------------

    def validate(self, input_ids: list[int], max_new_tokens: int) -> None:
        """Raise RequestError (runtime/intake.py) if a request could never be served."""
        check_prompt(input_ids, max_new_tokens, vocab_size=self.runner.vocab_size,
                     context_length=self.context_length, pool_size=self.cache.pool_size)

    def add_request(self, r: TokenizedGenerateReq) -> None:
        """Queue a request; an invalid one is answered at once with an abort output."""
        if r.rid in self.reqs:
            self._emit_error(r.rid, len(r.input_ids), f"duplicate request id {r.rid!r}")
            return
        try:
            self.validate(r.input_ids, r.sampling_params.max_new_tokens)
            r.sampling_params.validate(self.runner.vocab_size)
        except ValueError as e:
            self._emit_error(r.rid, len(r.input_ids), str(e))
            return
        req = Req(r.rid, r.input_ids, r.sampling_params, input_text=r.input_text,
                  return_logprob=r.return_logprob, logprob_start_len=r.logprob_start_len,
                  top_logprobs_num=r.top_logprobs_num, stream=r.stream, eos_token_ids=self.eos_ids,
                  seed=r.sampling_params.seed)
        self.reqs[req.rid] = req
        if r.sampling_params.grammar_spec is not None:
            err = self._grammars().submit(req)
            if err is not None:
                del self.reqs[req.rid]
                self._emit_error(r.rid, len(r.input_ids), err)
                return
            req.status = ReqStatus.GRAMMAR_WAIT
            return
        self.waiting.append(req)

    def abort_request(self, rid: str, message: str = "aborted by the client") -> None:
        req = self.reqs.get(rid)
        if req is not None:
            self._abort(req, message)

    def refuse(self, rid: str, prompt_tokens: int, message: str) -> None:
        """Answer a request that `add_request` raised on with an abort carrying `message`,
        undoing whatever it had queued; exactly one abort output for rid is produced."""
        if rid in self.reqs:
            try:
                self.abort_request(rid, message)
            except Exception:
                logger.exception("could not abort %s", rid)
                self.reqs.pop(rid, None)
            if self.outputs.has_output_for(rid):
                return
        self.outputs.emit_error(rid, prompt_tokens, message)

    def has_request(self, rid: str) -> bool:
        """Whether rid is queued, running, or waiting for its grammar."""
        return rid in self.reqs

    def request_ids(self) -> list[str]:
        """The ids of every request not finished yet."""
        return list(self.reqs)

    def drain_outputs(self) -> list[ReqOutput]:
        """Outputs produced outside `step()` (refusals, aborts) since the last step or drain."""
        return self.outputs.drain()

    def _fail(self, req: Req, what: str, exc: BaseException) -> None:
        """End one request after `exc` while handling it (stage `what`): its KV is freed and it is
        answered with an internal-error abort; the rest of the batch is not touched."""
        logger.error("request %s failed in %s", req.rid, what, exc_info=exc)
        self._abort(req, internal_error(what, exc))

    def _abort(self, req: Req, message: str) -> None:
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked:
            self.chunked = None
        if self.grammar is not None:
            self.grammar.discard(req)
        self.cache.release(req)
        req.status = ReqStatus.ABORTED
        req.finish_reason = {"type": "abort", "message": message}
        self._emit(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or
                    (self.grammar is not None and self.grammar.pending()))

    def set_grammar_wakeup(self, wake: Callable[[], None]) -> None:
        """Have `wake()` called, from other threads, whenever a request waiting for its grammar
        may have become ready (compiled, failed, or past its deadline)."""
        self._grammar_wakeup = wake
        if self.grammar is not None:
            self.grammar.wake = wake

    def close(self) -> None:
        """Release what outlives a stopped loop: the grammar threads and the runner's resources
        (a tensor-parallel runner stops its other ranks). Call once the loop no longer steps."""
        if self.grammar is not None:
            self.grammar.close()
        close = getattr(self.runner, "close", None)  # optional in the runner contract
        if close is not None:
            close()

    def only_compiling(self) -> bool:
        """True when the only work is grammars still compiling and a wakeup is set: a step would
        only poll them, so the loop may sleep until its wakeup (or a message) instead of spinning."""
        g = self.grammar
        return (not (self.waiting or self.running or self.chunked) and g is not None and g.wake is not None
                and g.pending() > 0 and g.only_compiling())

    def step(self) -> list[ReqOutput]:
        """Run one iteration (one EXTEND or one DECODE forward) and return what it produced."""
        if self.grammar is not None:
            for req in self.grammar.poll():
                self._grammar_ready(req)
        # Alternate with decode when both have work, so long prefills do not stall decoding
        # (a mixed batch decodes the running requests along with the prefill).
        batch = None
        if not (self.last_was_extend and self.running):
            batch = self._prefill_batch()
        if batch is not None:
            # A decode step is owed only to requests that were running and were not decoded along
            # (mixed batch off, or no room). Ones that just finished their prefill wait for the
            # next step like the others: a prefill that continues the queue decodes them along.
            undecoded = bool(self.running)
            self.last_was_extend = not self._run_extend(batch) and undecoded
        elif self.running:
            self._run_decode()
            self.last_was_extend = False
        return self.outputs.drain()

    def flush_cache(self) -> tuple[bool, str]:
        if self.has_work():
            return False, "cannot flush the cache while requests are running or waiting"
        self.cache.tree.reset()
        self.cache.allocator.clear()
        return True, "cache flushed"

    def get_info(self) -> dict:
        tree = self.cache.tree
        return {
            "pool_size": self.cache.pool_size,
            "free_slots": self.cache.allocator.available(),
            "evictable_slots": tree.evictable_size(),
            "protected_slots": tree.protected_size(),
            "held_by_requests": self.cache.held_by_requests(self._active()),
            "num_running": len(self.running) + (self.chunked is not None),
            "num_waiting": len(self.waiting) + (self.grammar.pending() if self.grammar else 0),
            "context_length": self.context_length,
            "max_running_requests": self.config.max_running_requests,
            "evicted_tokens": self.cache.evicted_tokens,
            "cache": tree.stats(),
            **self.stats,
        }

    def check_invariant(self) -> None:
        self.cache.check_invariant(self._active())

    # ---- admission, forward, results --------------------------------------------------------

    def _active(self) -> list[Req]:
        return self.running + ([self.chunked] if self.chunked else [])

    def _prefill_batch(self) -> list[tuple[Req, int]] | None:
        """(request, tokens to compute this step) pairs, chunked continuation first."""
        prefill = self.adder.build(self.waiting, self.running, self.chunked)
        if prefill is None:
            return None
        self.chunked = prefill.chunked
        for req in prefill.admitted:
            self.waiting.remove(req)
        self.stats["cached_tokens"] += prefill.cached_tokens
        self.stats["prompt_tokens"] += prefill.prompt_tokens
        return prefill.items

    def _run_extend(self, batch: list[tuple[Req, int]]) -> bool:
        """Prefill `batch` (and decode the running requests along, unless disabled or out of
        room). Returns whether the running requests were decoded."""
        fb, decoding = extend_batch(batch, self.running, self.cache, self.runner.device,
                                    mixed=not self.config.disable_mixed_batch)
        last_logits, hidden = self.runner.forward(fb)
        self.stats["extend_steps"] += 1
        self.stats["steps"] += 1
        self.stats["computed_prompt_tokens"] += sum(n for _, n in batch)
        if decoding:
            self.stats["mixed_steps"] += 1
            for r in decoding:
                r.kv_len += 1
            self.ratio.decay()
            self._sample_and_append(last_logits[len(batch):], decoding)
        self._finish_prefill(batch, last_logits, hidden)
        return bool(decoding)

    def _finish_prefill(self, batch: list[tuple[Req, int]], last_logits: torch.Tensor,
                        hidden: torch.Tensor | None) -> None:
        """After the forward of `batch`: input logprobs, cache the computed prefixes, and sample
        the first token of each request whose prompt is now complete."""
        done: list[int] = []
        offset = 0
        for i, (req, n) in enumerate(batch):
            start = req.kv_len
            req.kv_len += n
            offset += n
            if not req.input_logprobs_done:
                try:
                    self._input_logprobs(req, hidden[offset - n:offset], start)
                except Exception as e:
                    self._fail(req, "input logprobs", e)
                    continue
            # Share what is computed right away (other requests with this prefix hit it while
            # this one is still running), both between chunks and once the prompt is done.
            self.cache.cache_prefix(req)
            if req.kv_len < req.seq_len:
                continue
            if req is self.chunked:
                self.chunked = None
            req.input_logprobs_done = True
            done.append(i)
        if not done:
            return
        reqs = [batch[i][0] for i in done]
        finish_now = [r for r in reqs if r.params.max_new_tokens == 0 and not r.output_ids]
        for r in finish_now:
            r.finish_reason = {"type": "length", "length": 0}
            self._finish(r)
        keep = [j for j, r in zip(done, reqs) if r not in finish_now]
        if keep:
            sample_reqs = [batch[j][0] for j in keep]
            self.running.extend(sample_reqs)  # _sample_and_append takes finished ones out again
            self._sample_and_append(last_logits[keep], sample_reqs)

    def _run_decode(self) -> None:
        self._ensure_decode_room()
        reqs = list(self.running)
        if not reqs:
            return
        logits, _ = self.runner.forward(decode_batch(reqs, self.cache, self.runner.device))
        for r in reqs:
            r.kv_len += 1
        self.stats["decode_steps"] += 1
        self.stats["steps"] += 1
        self.ratio.decay()
        self._sample_and_append(logits, reqs)

    def _ensure_decode_room(self) -> None:
        """Evict, then retract the least-advanced requests until every running one gets a slot."""
        self.chunked, retracted = retract.ensure_decode_room(self.running, self.waiting, self.chunked,
                                                             self.cache, self.ratio)
        self.stats["retractions"] += retracted

    def requeue(self, req: Req) -> None:
        """Take a running request back to the front of the waiting queue; its KV goes to the
        prefix cache, so re-admission recomputes little (retraction, jump-forward)."""
        retract.requeue(req, self.running, self.waiting, self.cache)

    def _sample_and_append(self, logits: torch.Tensor, reqs: list[Req]) -> None:
        mask_fn = self.grammar.mask_fn(reqs) if self.grammar is not None else None
        out = self.sampler.sample(logits, reqs, mask_fn)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        for i, (req, tok) in enumerate(zip(reqs, out.next_ids)):
            if tok is None:
                self._fail(req, *out.faults[i])
                continue
            req.output_ids.append(tok)
            self.stats["generated_tokens"] += 1
            if req.return_logprob:
                req.pending_output_logprobs.append((out.logprobs[i], tok))
                req.pending_output_top.append(out.top_logprobs[i] or [])
            stage = "grammar accept_token"  # a fault here fails this request alone
            try:
                if req.grammar is not None:
                    self.grammar.accept(req, tok)
                stage = "stop check"
                check_finished(req, self.context_length, decode)
            except Exception as e:
                self._fail(req, stage, e)
                continue
            if req.finish_reason is not None:
                if req in self.running:
                    self.running.remove(req)
                self._finish(req)
            elif req.stream and (len(req.output_ids) - req.sent_len) >= self.config.stream_interval:
                self._emit(req)
        if self.grammar is not None and not self.config.disable_jump_forward:
            for req, e in self.grammar.jump_forward([r for r in reqs if not r.finished], self.requeue):
                self._fail(req, "jump-forward", e)

    def _finish(self, req: Req) -> None:
        self.cache.release(req)
        req.status = ReqStatus.FINISHED
        if self.grammar is not None:
            self.grammar.discard(req)
        self._emit(req)

    def _input_logprobs(self, req: Req, hidden: torch.Tensor, start: int) -> None:
        """Logprobs of input tokens predicted by this chunk's rows (positions start..start+n-1)."""
        input_logprobs(req, hidden, start, self.runner.compute_logits)

    # ---- outputs ----------------------------------------------------------------------------

    def _emit(self, req: Req) -> None:
        self.outputs.emit(req)
        if req.finished:
            self.reqs.pop(req.rid, None)

    def _emit_error(self, rid: str, prompt_tokens: int, message: str) -> None:
        self.outputs.emit_error(rid, prompt_tokens, message)

    # ---- grammars (wired in by radixflow.runtime.scheduler.grammar_manager) ----------------------------

    def _grammars(self):
        if self.grammar is None:
            from radixflow.runtime.scheduler.grammar_manager import GrammarManager
            self.grammar = GrammarManager(self.config, self.runner.model_path, self.runner.vocab_size,
                                          sorted(self.eos_ids), self.tokenizer, self._grammar_wakeup)
        return self.grammar

    def _grammar_ready(self, req: Req) -> None:
        if req.finish_reason is not None:  # failed to compile
            req.status = ReqStatus.ABORTED
            self._emit(req)
            return
        req.status = ReqStatus.WAITING
        self.waiting.append(req)


"""Continuous batching at iteration level over a radix-cached KV pool.

I/O is a seam: `add_request` / `abort_request` / `step()` are plain calls, used directly by the
offline Engine and fed from ZeroMQ by the server's scheduler process.
"""

from __future__ import annotations

import logging

import torch

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.model_runner import ModelRunner
from radixflow.runtime.model.sampler import Sampler, top_logprobs_rows
from radixflow.runtime.req import Req, ReqStatus
from radixflow.runtime.request_faults import internal_error
from radixflow.runtime.scheduler.kv_cache import KVCacheManager
from radixflow.runtime.scheduler.schedule_policy import InBatchPrefixTracker, SchedulePolicy
from radixflow.runtime.text.stop_checker import check_finished
from radixflow.runtime.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Share of a running request's remaining max_new_tokens reserved when admitting others; it
# decays while decoding goes well and jumps after a retraction (SGLang's new_token_ratio).
_RATIO_INIT, _RATIO_MIN, _RATIO_DECAY, _RATIO_BUMP = 0.5, 0.05, 0.002, 0.2
_RESERVE_CLIP = 4096


class RequestError(ValueError):
    """A request the engine can never serve (too long, bad ids, bad parameters)."""


class Scheduler:
    """Owns the model runner, KV memory, prefix cache and every request's state."""

    def __init__(self, config: EngineConfig, model_path: str, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.runner = ModelRunner(config, model_path)
        self.tokenizer = tokenizer or Tokenizer.from_pretrained(config.tokenizer or model_path)
        self.context_length = self.runner.context_length
        self.cache = KVCacheManager(self.runner.allocator, self.runner.req_to_token_pool,
                                    config.disable_radix_cache)
        self.policy = SchedulePolicy(config.schedule_policy, self.cache)
        self.sampler = Sampler()
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.runner.model_config.eos_token_ids)
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # admitted, prefill done, decoding
        self.chunked: Req | None = None  # admitted, prefill not finished
        self.reqs: dict[str, Req] = {}
        self.outbox: list[ReqOutput] = []
        self.new_token_ratio = _RATIO_INIT
        self.last_was_extend = False
        self.grammar = None  # GrammarManager, created on first constrained request
        self.stats = {"retractions": 0, "steps": 0, "extend_steps": 0, "decode_steps": 0, "mixed_steps": 0,
                      "prompt_tokens": 0, "computed_prompt_tokens": 0, "cached_tokens": 0,
                      "generated_tokens": 0}

    # ---- I/O seam -------------------------------------------------------------------------

    def validate(self, input_ids: list[int], max_new_tokens: int) -> None:
        """Raise RequestError if a request could never be served."""
        if not input_ids:
            raise RequestError("the prompt is empty: at least one input token is required")
        V = self.runner.vocab_size
        bad = [t for t in input_ids if not 0 <= t < V]
        if bad:
            raise RequestError(f"input token id {bad[0]} is out of range [0, {V})")
        n = len(input_ids)
        if n >= self.context_length:
            raise RequestError(f"the prompt has {n} tokens; this model's context length is "
                               f"{self.context_length} (context_length_exceeded)")
        if n + max_new_tokens > self.context_length:
            raise RequestError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                               f"context length {self.context_length} (context_length_exceeded)")
        if n + 1 > self.cache.pool_size:
            raise RequestError(f"the prompt ({n} tokens) does not fit the KV pool ({self.cache.pool_size})")

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
        out, self.outbox = self.outbox, []
        return out

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

    # ---- admission ------------------------------------------------------------------------

    def _active(self) -> list[Req]:
        return self.running + ([self.chunked] if self.chunked else [])

    def _reserved(self) -> int:
        """KV tokens kept back for running requests' future decode steps."""
        return int(sum(min(r.remaining_new_tokens, _RESERVE_CLIP) for r in self.running) * self.new_token_ratio)

    def _prefill_batch(self) -> list[tuple[Req, int]] | None:
        """(request, tokens to compute this step) pairs, chunked continuation first."""
        if not self.waiting and self.chunked is None:
            return None
        chunk = self.config.chunked_prefill_size if self.config.chunked_prefill_size > 0 else 1 << 30
        budget = min(self.config.max_prefill_tokens, chunk)
        avail = self.cache.available_tokens() - self._reserved()
        batch: list[tuple[Req, int]] = []
        if self.chunked is not None:
            req = self.chunked
            n = min(req.seq_len - req.kv_len, budget)
            if self.cache.extend(req, n) is None:
                return None
            batch.append((req, n))
            budget -= n
            avail -= n
        slots_left = self.config.max_running_requests - len(self.running) - len(batch)
        if not self.waiting or budget <= 0 or slots_left <= 0:
            return batch or None
        tracker = InBatchPrefixTracker(self.waiting)
        if self.chunked is not None:  # its uncached remainder is being computed: others wait for it
            tracker.add(self.chunked.fill_ids)
        admitted: list[Req] = []
        for req, match in self.policy.order(self.waiting):
            if slots_left <= 0 or budget <= 0:
                break
            fill = req.fill_ids
            need = len(fill) - match.length
            if not self.config.disable_radix_cache and tracker.shares_uncached_prefix(fill, match.length):
                continue  # another request in this batch computes the shared part first
            n = min(need, budget)
            chunked = n < need
            if chunked and self.chunked is not None:
                break  # one chunked prefill at a time
            # Room for future decode tokens; an idle engine always admits one request (retraction
            # covers it if it grows beyond the pool later), so nothing can wait forever.
            idle = not self.running and not batch
            future = 0 if chunked or idle else min(req.remaining_new_tokens, _RESERVE_CLIP) * self.new_token_ratio
            if n + future > avail:
                break
            if not self.cache.admit(req, match):
                break
            if self.cache.extend(req, n) is None:
                self.cache.release(req)
                break
            if not req.admitted_once:
                req.admitted_once = True
                req.cached_tokens = match.length
                self.cache.tree.record_hit(match.length, len(fill))
                self.stats["cached_tokens"] += match.length
                self.stats["prompt_tokens"] += req.prompt_len
            req.status = ReqStatus.RUNNING
            tracker.add(fill)
            batch.append((req, n))
            admitted.append(req)
            budget -= n
            avail -= n + future
            slots_left -= 1
            if chunked:
                self.chunked = req
        for req in admitted:
            self.waiting.remove(req)
        return batch or None

    # ---- forward + results ----------------------------------------------------------------

    def _run_extend(self, batch: list[tuple[Req, int]]) -> bool:
        """Prefill `batch` (and decode the running requests along, unless disabled or out of
        room). Returns whether the running requests were decoded."""
        ids, rows, prefix, ext, locs = [], [], [], [], []
        for req, n in batch:
            fill = req.fill_ids
            ids.extend(fill[req.kv_len:req.kv_len + n])
            rows.append(req.row)
            prefix.append(req.kv_len)
            ext.append(n)
            locs.append(self.cache.req_to_token.read(req.row, req.kv_len, req.kv_len + n))
        n_prompt = len(ids)
        # Mixed batch: running requests decode their next token in the same forward (a few more
        # rows of a large matmul cost little), when the pool has a slot for each of them.
        decoding = list(self.running) if not self.config.disable_mixed_batch else []
        dec_locs = self.cache.alloc(len(decoding)) if decoding else None
        if dec_locs is None:
            decoding = []
        for r, loc in zip(decoding, dec_locs if decoding else []):
            self.cache.req_to_token.write(r.row, r.kv_len, loc.view(1))
            ids.append(r.output_ids[-1])
            rows.append(r.row)
            prefix.append(r.kv_len)
            ext.append(1)
        if decoding:
            locs.append(dec_locs)
        want_input_lp = any(not r.input_logprobs_done for r, _ in batch)
        fb = ForwardBatch.build(ForwardMode.EXTEND, ids, rows, prefix, ext, torch.cat(locs),
                                self.runner.device, return_all_logits=want_input_lp, num_decode=len(decoding))
        last_logits, hidden = self.runner.forward(fb)
        self.stats["extend_steps"] += 1
        self.stats["steps"] += 1
        self.stats["computed_prompt_tokens"] += n_prompt
        if decoding:
            self.stats["mixed_steps"] += 1
            for r in decoding:
                r.kv_len += 1
            self.new_token_ratio = max(_RATIO_MIN, self.new_token_ratio - _RATIO_DECAY)
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
        locs = self.cache.alloc(len(reqs))
        assert locs is not None, "decode room was ensured"
        for r, loc in zip(reqs, locs):
            self.cache.req_to_token.write(r.row, r.kv_len, loc.view(1))
        fb = ForwardBatch.build(ForwardMode.DECODE, [r.output_ids[-1] for r in reqs], [r.row for r in reqs],
                                [r.kv_len for r in reqs], [1] * len(reqs), locs, self.runner.device)
        logits, _ = self.runner.forward(fb)
        for r in reqs:
            r.kv_len += 1
        self.stats["decode_steps"] += 1
        self.stats["steps"] += 1
        self.new_token_ratio = max(_RATIO_MIN, self.new_token_ratio - _RATIO_DECAY)
        self._sample_and_append(logits, reqs)

    def _ensure_decode_room(self) -> None:
        """Evict, then retract the least-advanced requests until every running one gets a slot."""
        while self.running and self.cache.available_tokens() < len(self.running):
            if len(self.running) == 1 and self.chunked is None:
                break
            victim = min(self.running, key=lambda r: (len(r.output_ids), -r.prompt_len))
            self.requeue(victim)
            victim.retractions += 1
            self.stats["retractions"] += 1
            self.new_token_ratio = min(1.0, self.new_token_ratio + _RATIO_BUMP)
            logger.info("retracted %s to free KV (%d running left)", victim.rid, len(self.running))
        if self.running and self.cache.available_tokens() < len(self.running) and self.chunked is not None:
            # Last resort: pause the chunked prefill; its computed part stays in the cache.
            req, self.chunked = self.chunked, None
            self.cache.release(req)
            if not req.input_logprobs_done:  # they will be recomputed from the start
                req.pending_input_logprobs, req.pending_input_top = [], []
            req.status = ReqStatus.WAITING
            self.waiting.insert(0, req)
            self.stats["retractions"] += 1

    def requeue(self, req: Req) -> None:
        """Take a running request back to the front of the waiting queue; its KV goes to the
        prefix cache, so re-admission recomputes little (retraction, jump-forward)."""
        if req in self.running:
            self.running.remove(req)
        self.cache.release(req)
        req.status = ReqStatus.WAITING
        self.waiting.insert(0, req)

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
            for req, e in self.grammar.jump_forward([r for r in reqs if not r.finished], self):
                self._fail(req, "jump-forward", e)

    def _finish(self, req: Req) -> None:
        self.cache.release(req)
        req.status = ReqStatus.FINISHED
        if self.grammar is not None:
            self.grammar.discard(req)
        self._emit(req)

    def _input_logprobs(self, req: Req, hidden: torch.Tensor, start: int) -> None:
        """Logprobs of input tokens predicted by this chunk's rows (positions start..start+n-1)."""
        fill, P = req.fill_ids, req.prompt_len
        first = req.logprob_start_len
        if start == 0 and first == 0:
            req.pending_input_logprobs.append((None, fill[0]))
            req.pending_input_top.append(None)
        q_lo, q_hi = max(start + 1, first, 1), min(start + hidden.shape[0] + 1, P)
        if q_lo >= q_hi:
            return
        rows = hidden[q_lo - 1 - start:q_hi - 1 - start]
        lp = self.runner.model.compute_logits(rows).log_softmax(dim=-1)
        targets = torch.tensor(fill[q_lo:q_hi], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        tops = top_logprobs_rows(lp, req.top_logprobs_num)
        req.pending_input_logprobs.extend(zip(chosen, fill[q_lo:q_hi]))
        req.pending_input_top.extend(tops)

    # ---- outputs ----------------------------------------------------------------------------

    def _emit(self, req: Req) -> None:
        new = req.output_ids[req.sent_len:]
        req.sent_len = len(req.output_ids)
        out = ReqOutput(
            rid=req.rid, new_token_ids=new, finish_reason=req.finish_reason,
            prompt_tokens=req.prompt_len, completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens, matched_stop_str=req.matched_stop_str)
        if req.return_logprob:
            if req.pending_input_logprobs or req.pending_input_top:
                out.input_token_logprobs = req.pending_input_logprobs
                out.input_top_logprobs = req.pending_input_top
                req.pending_input_logprobs, req.pending_input_top = [], []
            out.output_token_logprobs, req.pending_output_logprobs = req.pending_output_logprobs, []
            out.output_top_logprobs, req.pending_output_top = req.pending_output_top, []
        self.outbox.append(out)
        if req.finished:
            self.reqs.pop(req.rid, None)

    def _emit_error(self, rid: str, prompt_tokens: int, message: str) -> None:
        self.outbox.append(ReqOutput(rid=rid, new_token_ids=[], prompt_tokens=prompt_tokens,
                                     completion_tokens=0, cached_tokens=0,
                                     finish_reason={"type": "abort", "message": message}))

    # ---- grammars (wired in by radixflow.runtime.scheduler.grammar_manager) ----------------------------

    def _grammars(self):
        if self.grammar is None:
            from radixflow.runtime.scheduler.grammar_manager import GrammarManager
            self.grammar = GrammarManager(self.config, self.runner.model_path, self.runner.vocab_size,
                                          sorted(self.eos_ids), self.tokenizer)
        return self.grammar

    def _grammar_ready(self, req: Req) -> None:
        if req.finish_reason is not None:  # failed to compile
            req.status = ReqStatus.ABORTED
            self._emit(req)
            return
        req.status = ReqStatus.WAITING
        self.waiting.append(req)


"""The offline Engine: the scheduler on a background thread, driven by direct calls.

`generate` may be called from many threads at once (the DSL's run_batch does): their
requests are batched together by the scheduler, iteration by iteration."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixflow.runtime.sampling_params import SamplingParams, copy_seed
from radixflow.runtime.scheduler.scheduler import Scheduler
from radixflow.runtime.text.detokenizer import Detokenizer
from radixflow.runtime.text.tokenizer import Tokenizer
from radixflow.runtime.validation import check_strings, check_text

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A request was refused or failed inside the engine; the message says why."""


_DONE = object()


class Engine:
    """In-process engine. `Engine(model=None, **opts)`: opts are EngineConfig fields."""

    def __init__(self, model: str | None = None, **opts: Any) -> None:
        from radixflow.runtime.loading.default_model import resolve_model_path

        self.config = EngineConfig.from_kwargs(model=model, **opts)
        self.model_path = resolve_model_path(model)
        self.tokenizer = Tokenizer.from_pretrained(self.config.tokenizer or self.model_path)
        self.scheduler = Scheduler(self.config, self.model_path, self.tokenizer)
        self.detokenizer = Detokenizer(self.tokenizer)
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable[[dict | object], None]] = {}
        self._counter = itertools.count()
        self._closed = False
        self._failure = "the engine has been shut down"
        self.arrival_gap_ms = self.config.arrival_gap_ms  # see EngineConfig; may be changed at any time
        self._expected = [0, 0.0]  # (requests still expected, deadline): see expect_requests
        self._thread = threading.Thread(target=self._loop, name="radixflow-scheduler", daemon=True)
        self._thread.start()

    # ---- public API ---------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.scheduler.context_length

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, *,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 return_text_in_logprobs: bool = False, stream: bool = False,
                 rid: str | list[str] | None = None) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (-> dict) or a list (-> list of dicts, n per prompt in order).

        Result: {"text", "output_ids", "meta_info": {id, prompt_tokens, completion_tokens,
        cached_tokens, e2e_latency, finish_reason, [logprobs]}}. With stream=True (one prompt,
        n=1) returns an iterator of cumulative results. Raises ValueError for bad input and
        GenerationError when the engine refuses or aborts a request."""
        reqs, single = self._make_reqs(prompt, sampling_params, input_ids, return_logprob,
                                       logprob_start_len, top_logprobs_num, return_text_in_logprobs,
                                       stream, rid)
        if stream:
            if len(reqs) != 1:
                raise ValueError("stream=True takes a single prompt with n=1")
            return self._stream(reqs[0])
        return self._collect(reqs, single).result()

    def submit(self, prompt: str | list[str] | None = None,
               sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, **kwargs: Any) -> Future:
        """Queue a request and return at once; the future holds what generate() would return (or
        raises what it would raise). Requests are scheduled in the order they were submitted."""
        if kwargs.pop("stream", False):
            raise ValueError("submit and async_generate do not stream: use generate(stream=True) or async_stream")
        reqs, single = self._make_reqs(prompt, sampling_params, kwargs.pop("input_ids", None),
                                       kwargs.pop("return_logprob", False), kwargs.pop("logprob_start_len", -1),
                                       kwargs.pop("top_logprobs_num", 0),
                                       kwargs.pop("return_text_in_logprobs", False), False,
                                       kwargs.pop("rid", None))
        if kwargs:
            raise TypeError(f"unexpected argument(s): {sorted(kwargs)}")
        return self._collect(reqs, single)

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                             **kwargs: Any) -> dict | list[dict]:
        """Awaitable form of generate (stream=False)."""
        return await asyncio.wrap_future(self.submit(prompt, sampling_params, **kwargs))

    async def async_stream(self, prompt: str | None = None, sampling_params: dict[str, Any] | None = None,
                           **kwargs: Any) -> AsyncIterator[dict]:
        """Async iterator of cumulative results for one prompt."""
        reqs, _ = self._make_reqs(prompt, sampling_params, kwargs.pop("input_ids", None),
                                  kwargs.pop("return_logprob", False), kwargs.pop("logprob_start_len", -1),
                                  kwargs.pop("top_logprobs_num", 0), kwargs.pop("return_text_in_logprobs", False),
                                  True, kwargs.pop("rid", None))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._submit(reqs[0], lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        try:
            while True:
                item = await q.get()
                if item is _DONE:
                    return
                _raise_if_error(item)
                yield item
        finally:
            self.abort(reqs[0][0].rid)

    def expect_requests(self, n: int, within_s: float = 0.5) -> None:
        """Hint that about `n` requests are coming within `within_s` seconds (a DSL run_batch
        starting its programs). If the engine is idle when they start arriving, its first step
        waits until n have arrived or the time is up, instead of only while they come
        arrival_gap_ms apart: a stall of one sender (a busy CPU, a GIL hand-off) then no longer
        splits the batch. Never delays a step while requests are running; 0 turns it off."""
        if n < 0 or within_s < 0:
            raise ValueError(f"expect_requests needs n >= 0 and within_s >= 0, got {n}, {within_s}")
        self._inbox.put(("expect", n, time.monotonic() + within_s))

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def flush_cache(self) -> tuple[bool, str]:
        """Drop the prefix cache; refused (False, reason) while requests run."""
        return self._call(self.scheduler.flush_cache)

    def get_server_info(self) -> dict[str, Any]:
        return self._call(self.scheduler.get_info)

    def check_invariant(self) -> None:
        """Assert the KV pool accounting (runs on the scheduler thread, between steps)."""
        self._call(self.scheduler.check_invariant)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- request building -----------------------------------------------------------------

    def _make_reqs(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                   top_logprobs_num, return_text_in_logprobs, stream, rid):
        if self._closed:
            raise RuntimeError(self._failure)
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt (text) and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if single else list(prompt)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            for t in texts:
                check_text(t, "prompt")
            ids_list = [self.tokenizer.encode_prompt(t) for t in texts]
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int) or input_ids == []
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]
            texts = [None] * len(ids_list)
        if not ids_list:
            raise ValueError("no prompts given")
        sp = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(sp) != len(ids_list):
            raise ValueError(f"{len(sp)} sampling_params for {len(ids_list)} prompts")
        rids = rid if isinstance(rid, list) else [rid] * len(ids_list)
        out = []
        for text, ids, spd, r in zip(texts, ids_list, sp, rids):
            check_strings(spd, "sampling_params")
            params = SamplingParams.from_dict(spd)
            params.validate(self.scheduler.runner.vocab_size)
            self.scheduler.validate(ids, params.max_new_tokens)
            base = r or uuid.uuid4().hex
            for i in range(params.n):
                p = params.replace(n=1, seed=copy_seed(params.seed, i))
                req = TokenizedGenerateReq(rid=base if params.n == 1 else f"{base}-{i}", input_text=text,
                                           input_ids=ids, sampling_params=p, return_logprob=return_logprob,
                                           logprob_start_len=logprob_start_len,
                                           top_logprobs_num=top_logprobs_num, stream=stream)
                out.append((req, return_text_in_logprobs))
        return out, single

    def _submit(self, item: tuple[TokenizedGenerateReq, bool], sink: Callable[[dict | object], None]) -> None:
        req, text_in_lp = item
        if self._closed:
            raise RuntimeError(self._failure)
        self._inbox.put(("add", req, text_in_lp, sink, time.perf_counter()))

    def _submit_collect(self, item) -> Future:
        fut: Future = Future()
        last: list[dict] = []

        def sink(x):
            if x is _DONE:
                fut.set_result(last[-1])
            else:
                last.append(x)
        self._submit(item, sink)
        return fut

    def _collect(self, reqs: list, single: bool) -> Future:
        """Submit `reqs`; one future for all their final results (a dict for a single prompt with
        n=1, else the list in order), or the GenerationError of the first one that was aborted."""
        futures = [self._submit_collect(r) for r in reqs]
        out: Future = Future()
        pending = [len(futures)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                pending[0] -= 1
                if pending[0]:
                    return
            results = [f.result() for f in futures]
            try:
                for res in results:
                    _raise_if_error(res)
            except GenerationError as e:
                out.set_exception(e)
                return
            out.set_result(results[0] if single and len(results) == 1 else results)

        for f in futures:
            f.add_done_callback(one_done)
        return out

    def _stream(self, item) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        self._submit(item, q.put)
        try:
            while True:
                x = q.get()
                if x is _DONE:
                    return
                _raise_if_error(x)
                yield x
        finally:
            self.abort(item[0].rid)

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise RuntimeError(self._failure)
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        return fut.result()

    # ---- the scheduler thread -------------------------------------------------------------

    def _next_message(self, block: bool, burst_end: float | None, gap: float) -> tuple | None:
        """The next inbox message, or None when it is time to step. `block`: wait for one. During
        a burst (burst_end set) waits up to `gap` seconds for each next one, until burst_end; while
        expected requests are still to come (expect_requests), until their deadline."""
        try:
            if block:
                return self._inbox.get()
            if burst_end is not None and self._expected[0] > 0:
                gap = self._expected[1] - time.monotonic()
                burst_end = max(burst_end, self._expected[1])
            wait = 0.0 if burst_end is None else min(gap, burst_end - time.monotonic())
            return self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        # Requests that reach an idle engine a few ms apart (the threads of a DSL run_batch, a
        # fork's branches) would otherwise start with whichever came first, and the rest would
        # wait a whole step behind them. So once requests start arriving at an idle engine, it
        # waits for each next one while they keep coming less than `gap` apart: arrival_gap_ms,
        # but at most a tenth of a step (so the wait stays small next to the step a straggler
        # would lose), and 50 gaps in all.
        sched = self.scheduler
        step_s = 0.05  # running mean of a step's duration
        while True:
            block, burst_end = not sched.has_work(), None
            gap = min(self.arrival_gap_ms / 1000, 0.1 * step_s)
            try:
                while (msg := self._next_message(block, burst_end, gap)) is not None:
                    if msg[0] == "expect":  # before `block` is cleared: the burst is still to come
                        self._expected = [msg[1], msg[2]]
                        continue
                    if block and msg[0] == "add" and gap > 0:
                        burst_end = time.monotonic() + 50 * gap
                    block = False
                    if msg[0] == "add" and self._expected[0] > 0:
                        self._expected[0] -= 1
                    if msg[0] == "stop":
                        for rid in list(self._sinks):
                            sched.abort_request(rid, "engine shut down")
                        outputs, sched.outbox = sched.outbox, []
                        self._route(outputs)
                        return
                    self._handle(msg)
                if sched.has_work():
                    self._expected = [0, 0.0]  # a hint only holds the first step of a burst
                    t = time.perf_counter()
                    outputs = sched.step()
                    step_s = 0.8 * step_s + 0.2 * (time.perf_counter() - t)
                else:
                    outputs, sched.outbox = sched.outbox, []
                self._route(outputs)
            except Exception as e:  # a bug must not hang every caller: fail them all loudly
                logger.exception("scheduler step failed")
                self._closed = True
                self._failure = f"the engine's scheduler failed: {type(e).__name__}: {e}"
                self._fail_all()
                raise

    def _fail_all(self) -> None:
        """Answer every waiting caller (and any request still queued) with the failure."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                self._sinks[msg[1].rid] = msg[3]
            elif msg[0] == "call":
                msg[2].set_exception(RuntimeError(self._failure))
        for rid, sink in list(self._sinks.items()):
            sink({"text": "", "output_ids": [], "meta_info": {
                "id": rid, "finish_reason": {"type": "abort", "message": self._failure}}})
            sink(_DONE)
        self._sinks.clear()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, req, text_in_lp, sink, created = msg
            sp = req.sampling_params
            self._sinks[req.rid] = sink
            self.detokenizer.register(req.rid, stop=sp.stop, no_stop_trim=sp.no_stop_trim,
                                      skip_special_tokens=sp.skip_special_tokens,
                                      spaces_between_special_tokens=sp.spaces_between_special_tokens,
                                      return_text_in_logprobs=text_in_lp, created=created)
            self.scheduler.add_request(req)
        elif kind == "abort":
            self.scheduler.abort_request(msg[1])
        elif kind == "call":
            _, fn, fut = msg
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _route(self, outputs: list[ReqOutput]) -> None:
        """Hand each output to its caller. One that fails to detokenize ends its request alone:
        the caller gets the internal-error abort and the scheduler drops the request."""
        for out in outputs:
            sink = self._sinks.get(out.rid)
            res = self.detokenizer.process_or_abort(out)
            if sink is None or res is None:
                continue
            sink(res)
            reason = res["meta_info"]["finish_reason"]
            if reason is not None:
                sink(_DONE)
                del self._sinks[out.rid]
                if not out.finished:
                    self.scheduler.abort_request(out.rid, reason["message"])


def _raise_if_error(res: dict) -> None:
    fr = res.get("meta_info", {}).get("finish_reason") or {}
    if fr.get("type") == "abort":
        raise GenerationError(fr.get("message", "request aborted"))

"""The offline Engine: the scheduler on a background thread, driven by direct calls.

`generate` may be called from many threads at once (the DSL's run_batch does): their
requests are batched together by the scheduler, iteration by iteration. Callers talk to the
scheduler thread through its inbox (the messages of runtime/burst.py), whose `BurstCollector`
decides when the thread stops reading and steps."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from radixflow.runtime.burst import Abort, AddRequest, BurstCollector, Call, Expect, Sink, Stop
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.intake import GenerateOptions, abort_result, check_prompt, fan_out
from radixflow.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixflow.runtime.sampling_params import SamplingParams
from radixflow.runtime.scheduler.scheduler import Scheduler
from radixflow.runtime.text.detokenizer import Detokenizer
from radixflow.runtime.text.tokenizer import Tokenizer
from radixflow.runtime.validation import check_strings, check_text, check_token_ids

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A request was refused or failed inside the engine; the message says why."""


_DONE = object()  # a Sink's last item

class Engine:
    """In-process engine. `Engine(model=None, **opts)`: opts are EngineConfig fields."""

    def __init__(self, model: str | None = None, **opts: Any) -> None:
        from radixflow.runtime.loading.default_model import resolve_model_path

        self.config = EngineConfig.from_kwargs(model=model, **opts)
        self.model_path = resolve_model_path(model)
        self.tokenizer = Tokenizer.from_pretrained(self.config.tokenizer or self.model_path)
        self.scheduler = Scheduler.from_model_path(self.config, self.model_path, self.tokenizer)
        self.detokenizer = Detokenizer(self.tokenizer)
        info = self.scheduler.get_info()  # before the scheduler thread starts
        self._limits = {"vocab_size": self.scheduler.runner.vocab_size,
                        "context_length": info["context_length"], "pool_size": info["pool_size"]}
        self._inbox: queue.Queue = queue.Queue()
        self._burst = BurstCollector(self._inbox, self.config.arrival_gap_ms)
        self._sinks: dict[str, Sink] = {}
        self._closed = False  # no new calls: shut down, or the scheduler failed
        self._shut_down = False
        self._failure = "the engine has been shut down"
        self._thread = threading.Thread(target=self._loop, name="radixflow-scheduler", daemon=True)
        self._thread.start()

    # ---- public API ---------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.scheduler.context_length

    @property
    def arrival_gap_ms(self) -> float:
        """See EngineConfig.arrival_gap_ms; may be changed at any time (read as a burst begins)."""
        return self._burst.arrival_gap_ms

    @arrival_gap_ms.setter
    def arrival_gap_ms(self, value: float) -> None:
        self._burst.arrival_gap_ms = value

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
        options = GenerateOptions(return_logprob, logprob_start_len, top_logprobs_num,
                                  return_text_in_logprobs, stream)
        reqs, single = self._make_reqs(prompt, input_ids, sampling_params, options, rid)
        if stream:
            if len(reqs) != 1:
                raise ValueError("stream=True takes a single prompt with n=1")
            return self._stream(reqs[0], return_text_in_logprobs)
        return self._collect(reqs, single, return_text_in_logprobs).result()

    def submit(self, prompt: str | list[str] | None = None,
               sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, **kwargs: Any) -> Future:
        """Queue a request and return at once; the future holds what generate() would return (or
        raises what it would raise). Requests are scheduled in the order they were submitted."""
        if kwargs.pop("stream", False):
            raise ValueError("submit and async_generate do not stream: use generate(stream=True) or async_stream")
        input_ids, rid, options = _pop_request_args(kwargs, stream=False)
        reqs, single = self._make_reqs(prompt, input_ids, sampling_params, options, rid)
        return self._collect(reqs, single, options.return_text_in_logprobs)

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                             **kwargs: Any) -> dict | list[dict]:
        """Awaitable form of generate (stream=False)."""
        return await asyncio.wrap_future(self.submit(prompt, sampling_params, **kwargs))

    async def async_stream(self, prompt: str | None = None, sampling_params: dict[str, Any] | None = None,
                           **kwargs: Any) -> AsyncIterator[dict]:
        """Async iterator of cumulative results for one prompt."""
        kwargs.pop("stream", None)
        input_ids, rid, options = _pop_request_args(kwargs, stream=True)
        reqs, _ = self._make_reqs(prompt, input_ids, sampling_params, options, rid)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        sink = lambda item: loop.call_soon_threadsafe(q.put_nowait, item)
        self._submit(reqs[0], options.return_text_in_logprobs, sink)
        try:
            while True:
                item = await q.get()
                if item is _DONE:
                    return
                _raise_if_error(item)
                yield item
        finally:
            self.abort(reqs[0].rid)

    def expect_requests(self, n: int, within_s: float = 0.5) -> None:
        """Hint that about `n` requests are coming within `within_s` seconds (a DSL run_batch
        starting its programs). If the engine is idle when they start arriving, its first step
        waits until n have arrived or the time is up, instead of only while they come
        arrival_gap_ms apart: a stall of one sender (a busy CPU, a GIL hand-off) then no longer
        splits the batch. Never delays a step while requests are running; 0 turns it off."""
        if n < 0 or within_s < 0:
            raise ValueError(f"expect_requests needs n >= 0 and within_s >= 0, got {n}, {within_s}")
        self._inbox.put(Expect(n, time.monotonic() + within_s))

    def abort(self, rid: str) -> None:
        self._inbox.put(Abort(rid))

    def flush_cache(self) -> tuple[bool, str]:
        """Drop the prefix cache; refused (False, reason) while requests run."""
        return self._call(self.scheduler.flush_cache)

    def get_server_info(self) -> dict[str, Any]:
        return self._call(self.scheduler.get_info)

    def check_invariant(self) -> None:
        """Assert the KV pool accounting (runs on the scheduler thread, between steps)."""
        self._call(self.scheduler.check_invariant)

    def shutdown(self) -> None:
        """Stop the scheduler thread (aborting what runs) and release the scheduler's threads and
        ranks; idempotent, and also after the scheduler failed."""
        if self._shut_down:
            return
        self._shut_down = self._closed = True
        self._inbox.put(Stop())
        self._thread.join(timeout=30)
        self.scheduler.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- request building -----------------------------------------------------------------

    def _make_reqs(self, prompt: str | list[str] | None, input_ids: list[int] | list[list[int]] | None,
                   sampling_params: dict[str, Any] | list[dict[str, Any]] | None, options: GenerateOptions,
                   rid: str | list[str] | None) -> tuple[list[TokenizedGenerateReq], bool]:
        """The requests of one call (n per prompt, in order), all checked, and whether it named a
        single prompt. Raises ValueError naming the field on bad input."""
        if self._closed:
            raise RuntimeError(self._failure)
        texts, ids_list, single = self._prompt_ids(prompt, input_ids)
        options.validate(self._limits["vocab_size"])
        sp = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(sp) != len(ids_list):
            raise ValueError(f"{len(sp)} sampling_params for {len(ids_list)} prompts")
        rids = rid if isinstance(rid, list) else [rid] * len(ids_list)
        out: list[TokenizedGenerateReq] = []
        for text, ids, spd, r in zip(texts, ids_list, sp, rids):
            check_strings(spd, "sampling_params")
            params = SamplingParams.from_dict(spd)
            params.validate(self._limits["vocab_size"])
            check_prompt(ids, params.max_new_tokens, **self._limits)
            out += fan_out(r, params, ids, input_text=text, options=options)
        return out, single

    def _prompt_ids(self, prompt: str | list[str] | None, input_ids: list[int] | list[list[int]] | None,
                    ) -> tuple[list[str | None], list[list[int]], bool]:
        """(texts, token ids, single) of the prompt(s): exactly one of text and ids is given."""
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
            if not isinstance(input_ids, (list, tuple)):
                raise ValueError("input_ids must be a list of token ids or a list of such lists")
            single = not input_ids or not isinstance(input_ids[0], (list, tuple))
            for ids in [input_ids] if single else input_ids:
                check_token_ids(ids, "input_ids")
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]
            texts = [None] * len(ids_list)
        if not ids_list:
            raise ValueError("no prompts given")
        return texts, ids_list, single

    def _submit(self, req: TokenizedGenerateReq, text_in_lp: bool, sink: Sink) -> None:
        if self._closed:
            raise RuntimeError(self._failure)
        self._inbox.put(AddRequest(req, text_in_lp, sink, time.perf_counter()))

    def _submit_collect(self, req: TokenizedGenerateReq, text_in_lp: bool) -> Future:
        fut: Future = Future()
        last: list[dict] = []

        def sink(x):
            if x is _DONE:
                fut.set_result(last[-1])
            else:
                last.append(x)
        self._submit(req, text_in_lp, sink)
        return fut

    def _collect(self, reqs: list[TokenizedGenerateReq], single: bool, text_in_lp: bool) -> Future:
        """Submit `reqs`; one future for all their final results (a dict for a single prompt with
        n=1, else the list in order), or the GenerationError of the first one that was aborted."""
        futures = [self._submit_collect(r, text_in_lp) for r in reqs]
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

    def _stream(self, req: TokenizedGenerateReq, text_in_lp: bool) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        self._submit(req, text_in_lp, q.put)
        try:
            while True:
                x = q.get()
                if x is _DONE:
                    return
                _raise_if_error(x)
                yield x
        finally:
            self.abort(req.rid)

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise RuntimeError(self._failure)
        fut: Future = Future()
        self._inbox.put(Call(fn, fut))
        return fut.result()

    # ---- the scheduler thread -------------------------------------------------------------

    def _loop(self) -> None:
        sched, burst = self.scheduler, self._burst
        # While only grammars compile, wait for a message instead of spinning: a compile that
        # finishes (or times out) sends a no-op Call.
        sched.set_grammar_wakeup(lambda: self._inbox.put(Call(lambda: None, Future())))
        while True:
            burst.begin(idle=not sched.has_work() or sched.only_compiling())
            try:
                while (msg := burst.next()) is not None:
                    if isinstance(msg, Stop):
                        for rid in list(self._sinks):
                            sched.abort_request(rid, "engine shut down")
                        self._route(sched.drain_outputs())
                        return
                    self._handle(msg)
                if sched.has_work():
                    self._route(burst.run_step(sched.step, lambda: sched.stats["steps"]))
                else:
                    self._route(sched.drain_outputs())
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
            if isinstance(msg, AddRequest):
                self._sinks[msg.req.rid] = msg.sink
            elif isinstance(msg, Call):
                msg.future.set_exception(RuntimeError(self._failure))
        for rid, sink in list(self._sinks.items()):
            sink(abort_result(rid, self._failure))
            sink(_DONE)
        self._sinks.clear()

    def _handle(self, msg: AddRequest | Abort | Call) -> None:
        if isinstance(msg, AddRequest):
            sp = msg.req.sampling_params
            self._sinks[msg.req.rid] = msg.sink
            self.detokenizer.register(msg.req.rid, stop=sp.stop, stop_regex=sp.stop_regex,
                                      no_stop_trim=sp.no_stop_trim,
                                      skip_special_tokens=sp.skip_special_tokens,
                                      spaces_between_special_tokens=sp.spaces_between_special_tokens,
                                      return_text_in_logprobs=msg.return_text_in_logprobs, created=msg.created)
            self.scheduler.add_request(msg.req)
        elif isinstance(msg, Abort):
            self.scheduler.abort_request(msg.rid)
        elif isinstance(msg, Call):
            try:
                msg.future.set_result(msg.fn())
            except Exception as e:
                msg.future.set_exception(e)

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


def _pop_request_args(kwargs: dict[str, Any], stream: bool,
                      ) -> tuple[list[int] | list[list[int]] | None, str | list[str] | None, GenerateOptions]:
    """(input_ids, rid, options) taken out of submit's / async_stream's keyword arguments;
    raises TypeError for any other."""
    input_ids, rid = kwargs.pop("input_ids", None), kwargs.pop("rid", None)
    names = [k for k in GenerateOptions.field_names() if k != "stream" and k in kwargs]
    options = GenerateOptions(stream=stream, **{k: kwargs.pop(k) for k in names})
    if kwargs:
        raise TypeError(f"unexpected argument(s): {sorted(kwargs)}")
    return input_ids, rid, options


def _raise_if_error(res: dict) -> None:
    fr = res.get("meta_info", {}).get("finish_reason") or {}
    if fr.get("type") == "abort":
        raise GenerationError(fr.get("message", "request aborted"))

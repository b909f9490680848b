"""The HTTP process's side of the pipeline: validate and tokenize requests, send them to the
scheduler process, and route the detokenizer's results back to per-request asyncio state.

Lifecycle of one HTTP call: `prepare(...)` (raises APIError on bad input, touches nothing) ->
`submit(prepared)` (raises APIError 503 when over capacity; sends) -> `results()` / `wait()` ->
`close()` in a `finally` (aborts whatever has not finished: the client went away or failed).

Liveness: `health()` reports a dead process, shutdown, or a stalled pipeline (liveness.py). A
monitor task aborts requests older than `args.request_timeout` (their callers get 504). The
per-request state and the API error live in request_state.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import pickle
import time
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from radixflow.runtime.intake import GenerateOptions, RequestError, abort_result, check_prompt, fan_out
from radixflow.runtime.io_struct import (
    AbortReq,
    FlushCacheOut,
    FlushCacheReq,
    GetInfoReq,
    Heartbeat,
    InfoOut,
    RegisterReq,
    TokenizedGenerateReq,
)
from radixflow.runtime.sampling_params import SamplingParams
from radixflow.runtime.server.launch import bind_pull, connect_push
from radixflow.runtime.server.liveness import StallWatch
from radixflow.runtime.server.metrics import ServerMetrics
from radixflow.runtime.server.request_state import APIError, Prepared, ReqState, Submission, bad_request
from radixflow.runtime.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from radixflow.runtime.server.args import ServerArgs
    from radixflow.runtime.server.launch import IpcAddresses

logger = logging.getLogger(__name__)

_THREADED_TOKENIZE_CHARS = 16384  # tokenize longer prompts off the event loop
_MONITOR_S = 1.0  # how often in-flight requests are checked against the request timeout


class TokenizerManager:
    """Owns the tokenizer, the sockets to the scheduler / from the detokenizer, and the state of
    every in-flight request. Create and use it inside the server's event loop."""

    def __init__(self, args: ServerArgs, model_path: str, tokenizer: Tokenizer, addrs: IpcAddresses,
                 scheduler_info: dict[str, Any]) -> None:
        self.args = args
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.context_length: int = scheduler_info["context_length"]
        self.pool_size: int = scheduler_info["pool_size"]
        self.vocab_size: int = scheduler_info["vocab_size"]
        self.max_new_tokens_limit = min(args.max_new_tokens_limit or self.context_length, self.context_length)
        self.capacity = args.engine.max_running_requests + args.max_waiting_requests
        self.metrics = ServerMetrics()
        self.metrics.kv_pool_size.set(self.pool_size)
        self._send = connect_push(zmq.Context.instance(), addrs.scheduler)
        self._actx = zmq.asyncio.Context()
        self._recv = bind_pull(self._actx, addrs.tokenizer)
        self.states: dict[str, ReqState] = {}
        self.groups: dict[str, list[str]] = {}
        self._info_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._flush_waiters: collections.deque[asyncio.Future] = collections.deque()
        self.unhealthy: str | None = None
        self.receiver: asyncio.Task | None = None
        self._monitor: asyncio.Task | None = None
        self._watch = StallWatch(args.watchdog_timeout)

    def start(self) -> None:
        """Start the receive loop and the request monitor (call from the running event loop)."""
        loop = asyncio.get_running_loop()
        self.receiver = loop.create_task(self._recv_loop(), name="radixflow-recv")
        self._monitor = loop.create_task(self._monitor_loop(), name="radixflow-monitor")

    async def shutdown(self) -> None:
        """Stop the receive loop and the monitor and close the sockets."""
        for task in (self.receiver, self._monitor):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._send.close(0)
        self._recv.close(0)

    # ---- building requests ------------------------------------------------------------------

    async def prepare(self, prompts: list[str | list[int]], sampling: list[dict[str, Any] | None], *,
                      rids: list[str | None] | None = None, return_logprob: bool = False,
                      logprob_start_len: int = -1, top_logprobs_num: int = 0,
                      return_text_in_logprobs: bool = False, stream: bool = False,
                      add_special_tokens: bool = True) -> Prepared:
        """Validate and tokenize; each prompt becomes n requests. Raises APIError (400) with a
        precise message on the first bad input; nothing is sent."""
        if not prompts:
            raise bad_request("no prompt given")
        if len(sampling) != len(prompts):
            raise bad_request(f"{len(sampling)} sampling_params for {len(prompts)} prompts")
        rids = rids if rids is not None else [None] * len(prompts)
        if len(rids) != len(prompts):
            raise bad_request(f"{len(rids)} rids for {len(prompts)} prompts")
        try:
            options = GenerateOptions(return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs,
                                      stream).validate(self.args.max_top_logprobs)
        except ValueError as e:
            raise bad_request(str(e)) from None
        params = [self._sampling_params(sp) for sp in sampling]
        ids_list = await self._tokenize(prompts, add_special_tokens)
        out = Prepared([], [], [], {})
        for i, (ids, p, rid) in enumerate(zip(ids_list, params, rids)):
            try:
                check_prompt(ids, p.max_new_tokens, vocab_size=self.vocab_size, context_length=self.context_length,
                             pool_size=self.pool_size)
            except RequestError as e:
                raise bad_request(str(e), code=e.code, param=e.param) from None
            if rid is not None and (not isinstance(rid, str) or not rid):
                raise bad_request("rid must be a non-empty string")
            text = prompts[i] if isinstance(prompts[i], str) else None
            self._add_copies(out, i, rid, fan_out(rid, p, ids, input_text=text, options=options), options)
        return out

    def _add_copies(self, out: Prepared, i: int, rid: str | None, reqs: list[TokenizedGenerateReq],
                    options: GenerateOptions) -> None:
        """Add the n copies `reqs` of prompt i (asked for as `rid`) to `out`, refusing rids in use."""
        if len(reqs) > 1 and rid is not None:
            if rid in out.groups:
                raise bad_request(f"request id {rid!r} is used twice", param="rid")
            out.groups[rid] = [r.rid for r in reqs]
        seen = {r.rid for r in out.reqs}
        for r in reqs:
            if r.rid in seen or r.rid in self.states or r.rid in self.groups:
                raise bad_request(f"request id {r.rid!r} is already in use", param="rid")
            seen.add(r.rid)
            sp = r.sampling_params
            out.reqs.append(r)
            out.registers.append(RegisterReq(r.rid, list(sp.stop), sp.no_stop_trim, sp.skip_special_tokens,
                                             sp.spaces_between_special_tokens, options.return_text_in_logprobs,
                                             list(sp.stop_regex)))
            out.prompt_index.append(i)

    def _sampling_params(self, d: dict[str, Any] | None) -> SamplingParams:
        if d is not None and not isinstance(d, dict):
            raise bad_request("sampling_params must be an object", param="sampling_params")
        d = dict(d or {})
        for key in ("json_schema", "regex", "ebnf"):
            v = d.get(key)
            if v is not None and not isinstance(v, str) and not (key == "json_schema" and isinstance(v, dict)):
                raise bad_request(f"{key} must be a string", param=key)
        try:
            p = SamplingParams.from_dict(d)
            p.validate(self.vocab_size)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), param="sampling_params") from None
        if p.max_new_tokens > self.max_new_tokens_limit:
            raise bad_request(f"max_new_tokens ({p.max_new_tokens}) exceeds this server's limit "
                              f"({self.max_new_tokens_limit})", param="max_new_tokens")
        if p.n > self.args.max_n:
            raise bad_request(f"n ({p.n}) exceeds this server's limit ({self.args.max_n})", param="n")
        return p

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; long texts are tokenized off the event loop."""
        # A whole prompt keeps a BOS its chat template wrote, without adding a second one.
        fn = self.tokenizer.encode_prompt if add_special_tokens else (
            lambda t: self.tokenizer.encode(t, add_special_tokens=False))
        if len(text) > _THREADED_TOKENIZE_CHARS:
            return await asyncio.to_thread(fn, text)
        return fn(text)

    async def _tokenize(self, prompts: list[str | list[int]], add_special_tokens: bool) -> list[list[int]]:
        out: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise bad_request("the prompt is empty", param="prompt")
                out.append(await self.encode(p, add_special_tokens))
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                out.append(list(p))
            else:
                raise bad_request("a prompt must be a string or a list of token ids", param="prompt")
        return out

    # ---- submitting and waiting ---------------------------------------------------------------

    def submit(self, prepared: Prepared, *, bypass_capacity: bool = False) -> Submission:
        """Send the requests to the scheduler. Raises APIError 503 when the server is unhealthy
        or more than `capacity` requests would be in flight."""
        if self.unhealthy:
            raise APIError(503, f"the server is unhealthy: {self.unhealthy}", "server_error", "service_unavailable")
        if not bypass_capacity and len(self.states) + len(prepared.reqs) > self.capacity:
            self.metrics.rejected.labels("503").inc()
            raise APIError(503, f"the server is overloaded ({len(self.states)} requests in flight); retry later",
                           "server_error", "server_overloaded")
        for r in prepared.reqs:
            if r.rid in self.states:  # a race between two calls that chose the same rid
                raise bad_request(f"request id {r.rid!r} is already in use", param="rid")
        for g in prepared.groups:
            if g in self.groups or g in self.states:
                raise bad_request(f"request id {g!r} is already in use", param="rid")
        if not self.states:
            self._watch.heard()  # the watchdog counts from when work began
        sub = Submission([], prepared.prompt_index, prepared.groups)
        now = time.perf_counter()
        for r in prepared.reqs:
            st = ReqState(r.rid, r.stream, sub.event, now)
            self.states[r.rid] = st
            sub.states.append(st)
        self.groups.update(prepared.groups)
        msg: list[Any] = []
        for reg, r in zip(prepared.registers, prepared.reqs):
            msg += [reg, r]
        self._send.send_pyobj(msg)
        self.metrics.in_flight.set(len(self.states))
        return sub

    async def results(self, sub: Submission) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Yield (request index, latest cumulative result) as results arrive, until all finish.
        Intermediate results may be coalesced; the final one of each request is always yielded."""
        seen = [0] * len(sub.states)
        while True:
            await sub.event.wait()
            sub.event.clear()
            for i, st in enumerate(sub.states):
                if st.seq != seen[i]:
                    seen[i] = st.seq
                    yield i, st.result
            if all(st.finished for st in sub.states):
                return

    async def wait(self, sub: Submission) -> list[dict[str, Any]]:
        """The final result of every request of the submission, in order."""
        while not all(st.finished for st in sub.states):
            await sub.event.wait()
            sub.event.clear()
        return [st.result for st in sub.states]

    def close(self, sub: Submission) -> None:
        """Abort what has not finished (the client went away) and forget the submission."""
        for st in sub.states:
            if not st.finished:
                self._drop(st)
                self._send.send_pyobj(AbortReq(st.rid))
        for g, subs in sub.groups.items():
            if self.groups.get(g) is subs:
                del self.groups[g]
        self.metrics.in_flight.set(len(self.states))

    def abort(self, rid: str) -> bool:
        """/abort_request: abort `rid` (or every request of an n > 1 group named `rid`); its
        caller gets a normal result with finish_reason abort. False when nothing matched."""
        rids = [r for r in self.groups.get(rid, [rid]) if r in self.states]
        for r in rids:
            self.states[r].aborted_by_user = True
            self._send.send_pyobj(AbortReq(r))
        return bool(rids)

    def _drop(self, st: ReqState) -> None:
        st.finished = True
        if self.states.get(st.rid) is st:
            del self.states[st.rid]

    # ---- control requests ---------------------------------------------------------------------

    async def get_info(self, timeout: float = 30.0) -> dict[str, Any]:
        """The scheduler's get_info() dict (answered between two scheduler steps)."""
        return await self._control(GetInfoReq(), self._info_waiters, timeout)

    async def flush_cache(self, timeout: float = 30.0) -> tuple[bool, str]:
        out: FlushCacheOut = await self._control(FlushCacheReq(), self._flush_waiters, timeout)
        return out.success, out.message

    async def _control(self, msg: Any, waiters: collections.deque, timeout: float) -> Any:
        if self.unhealthy:
            raise APIError(503, f"the server is unhealthy: {self.unhealthy}", "server_error", "service_unavailable")
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        self._send.send_pyobj(msg)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()
            raise APIError(503, f"the scheduler did not answer in {timeout:.0f}s", "server_error",
                           "service_unavailable") from None

    # ---- receiving ----------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            items = pickle.loads(await self._recv.recv())
            self._watch.heard()
            for item in items:
                if isinstance(item, Heartbeat):
                    continue
                if isinstance(item, dict):
                    self._on_result(item)
                elif isinstance(item, InfoOut):
                    self.metrics.update_scheduler(item.info)
                    _resolve(self._info_waiters, item.info)
                elif isinstance(item, FlushCacheOut):
                    _resolve(self._flush_waiters, item)
                else:
                    logger.error("ignoring unknown message %r", type(item).__name__)

    def _on_result(self, res: dict[str, Any]) -> None:
        meta = res["meta_info"]
        st = self.states.get(meta["id"])
        if st is None:
            return  # dropped: the client went away
        now = time.perf_counter()
        n = meta.get("completion_tokens", 0)
        if st.stream and n > st.tokens_seen:
            if st.tokens_seen == 0:
                self.metrics.ttft.observe(now - st.created)
            else:
                self.metrics.itl.observe((now - st.last_at) / (n - st.tokens_seen))
            st.tokens_seen, st.last_at = n, now
        meta["e2e_latency"] = now - st.created
        st.result = res
        st.seq += 1
        fr = meta.get("finish_reason")
        if fr is not None:
            if fr.get("type") == "abort" and str(fr.get("message", "")).startswith("internal error: detokeniz"):
                # The detokenizer failed this request; the scheduler may still be generating it.
                self._send.send_pyobj(AbortReq(st.rid))
            self._drop(st)
            self.metrics.observe_finished(meta, now - st.created)
            self.metrics.in_flight.set(len(self.states))
        st.event.set()

    # ---- liveness -----------------------------------------------------------------------------

    def health(self) -> str | None:
        """Why the server is unhealthy (a dead process, shutdown, a stalled scheduler), or None."""
        return self.unhealthy or self._watch.problem(len(self.states))

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(_MONITOR_S)
            self._watch.log_changes(0 if self.unhealthy else len(self.states))  # a known death: no stall
            limit = self.args.request_timeout
            if limit is None:
                continue
            now = time.perf_counter()
            for st in [st for st in self.states.values() if now - st.created > limit]:
                logger.warning("request %s timed out after %.0fs: aborting it", st.rid, now - st.created)
                st.timed_out = True
                self._fail(st, f"the request timed out after {limit:g}s (--request-timeout)")
                self._send.send_pyobj(AbortReq(st.rid))
            self.metrics.in_flight.set(len(self.states))

    def _fail(self, st: ReqState, message: str) -> None:
        """Finish `st` with an abort result carrying `message` and wake its caller."""
        st.result = abort_result(st.rid, message, e2e_latency=time.perf_counter() - st.created)
        st.seq += 1
        self._drop(st)
        st.event.set()

    def fail_all(self, message: str) -> None:
        """Finish every in-flight request and control call with an error (a process died or the
        server is shutting down)."""
        for st in list(self.states.values()):
            st.failed = True
            self._fail(st, message)
        for waiters in (self._info_waiters, self._flush_waiters):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_exception(APIError(503, message, "server_error", "service_unavailable"))
        self.metrics.in_flight.set(0)


def _resolve(waiters: collections.deque, value: Any) -> None:
    """Every control message gets exactly one reply, in order: pop the oldest waiter (it may
    have given up waiting already)."""
    if waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(value)

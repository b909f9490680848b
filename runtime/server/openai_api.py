"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Requests become native requests (TokenizerManager.prepare); results are rendered in OpenAI's
shapes, streamed as `chat.completion.chunk` / `text_completion` SSE events ending in
`data: [DONE]`. Extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos, regex,
ebnf, json_schema, min_tokens, stop_token_ids, ...) pass through to SamplingParams.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixflow.runtime.server.openai_protocol import (
    CHAT_KEYS,
    COMPLETION_KEYS,
    bool_field,
    chat_messages,
    completion_prompts,
    finish_reason,
    int_field,
    parse_object,
    sampling_fields,
    with_grammar,
)
from radixflow.runtime.server.openai_tools import ToolSession
from radixflow.runtime.server.sse import SSE_DONE, abort_on_disconnect, finite, read_json, sse, stream_preflight
from radixflow.runtime.server.tokenizer_manager import APIError, Submission, TokenizerManager, bad_request

if TYPE_CHECKING:
    from radixflow.runtime.server.args import ServerArgs


def openai_router(tm: TokenizerManager, args: ServerArgs, model_name: str) -> APIRouter:
    """Routes bound to one TokenizerManager; `model_name` is what /v1/models lists."""
    router = APIRouter()
    created = int(time.time())
    accepted = {model_name, tm.model_path, "default"} | ({args.engine.model} if args.engine.model else set())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "radixflow",
            "root": tm.model_path, "max_model_len": tm.context_length}

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad_request("model must be a string", param="model")
        if model is not None and model not in accepted:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", "model_not_found", "model")

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model({"model": model})
        return card

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_object(await read_json(request, args.max_request_bytes), COMPLETION_KEYS)
        check_model(body)
        call = _Completion(tm, body, model_name)
        await call.prepare()
        return await call.respond(request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_object(await read_json(request, args.max_request_bytes), CHAT_KEYS)
        check_model(body)
        call = _Chat(tm, body, model_name)
        await call.prepare()
        return await call.respond(request)

    return router


class _Call:
    """One OpenAI request: shared parsing of sampling fields, streaming and usage."""

    kind = ""
    prefix = ""

    def __init__(self, tm: TokenizerManager, body: dict[str, Any], model_name: str) -> None:
        self.tm, self.body, self.model_name = tm, body, model_name
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.stream = bool_field(body, "stream", False)
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or not self.stream):
            raise bad_request("stream_options must be an object and needs stream=true", param="stream_options")
        self.include_usage = bool_field(opts or {}, "include_usage", False)
        self.sub: Submission | None = None
        self.n_prompts = 0

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        return sampling_fields(self.body, max_tokens)

    async def respond(self, request: Request) -> Response:
        sub = self.sub = self.tm.submit(self.prepared)
        if self.stream:
            refused = await stream_preflight(request, self.tm, sub)
            if refused is not None:
                return refused
            return StreamingResponse(self._stream(request), media_type="text/event-stream")
        try:
            async with abort_on_disconnect(request, self.tm, sub):
                results = await self.tm.wait(sub)
        finally:
            self.tm.close(sub)
        if sub.disconnected:
            return Response(status_code=499)
        err = sub.error()
        if err is not None:
            raise err
        choices = [with_grammar(self.choice(i, r), r) for i, r in enumerate(results)]
        return JSONResponse(finite({"id": self.id, "object": self.kind, "created": self.created,
                                    "model": self.model_name, "choices": choices, "usage": self.usage(results)}))

    def usage(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Prompt tokens once per prompt (not per copy); cached: the best copy of each prompt."""
        prompt = [0] * self.n_prompts
        cached = [0] * self.n_prompts
        completion = 0
        for p, r in zip(self.sub.prompt_index, results):
            meta = r["meta_info"]
            prompt[p] = meta.get("prompt_tokens", 0)
            cached[p] = max(cached[p], meta.get("cached_tokens", 0))
            completion += meta.get("completion_tokens", 0)
        return {"prompt_tokens": sum(prompt), "completion_tokens": completion,
                "total_tokens": sum(prompt) + completion,
                "prompt_tokens_details": {"cached_tokens": sum(cached)}}

    async def _stream(self, request: Request) -> AsyncIterator[str]:
        sub = self.sub
        sent_text = [""] * len(sub.states)
        sent_lp = [0] * len(sub.states)
        finals: list[dict[str, Any] | None] = [None] * len(sub.states)
        try:
            async with abort_on_disconnect(request, self.tm, sub):
                for i in range(len(sub.states)):
                    first = self.first_delta(i)
                    if first is not None:
                        yield sse(self.chunk(i, first, None, None))
                async for i, res in self.tm.results(sub):
                    if sub.disconnected:
                        return
                    fr = res["meta_info"].get("finish_reason")
                    if fr is not None and fr.get("type") == "abort" and not sub.states[i].aborted_by_user:
                        err = sub.error()
                        yield sse(err.body() if err else {"error": {"message": fr.get("message")}})
                        yield SSE_DONE
                        return
                    text = res["text"]
                    delta = text[len(sent_text[i]):] if len(text) > len(sent_text[i]) else ""
                    sent_text[i] = max(text, sent_text[i], key=len)
                    lp = self.logprobs(res, sent_lp[i])
                    new_lp = lp.pop("_count") if lp is not None else 0
                    sent_lp[i] += new_lp
                    pieces = self.stream_deltas(i, sent_text[i], delta, fr is not None)
                    if not pieces and new_lp:
                        pieces = [self.text_delta("")]
                    for k, piece in enumerate(pieces):
                        yield sse(finite(self.chunk(i, piece, lp if k == 0 else None, None)))
                    if fr is not None:
                        finals[i] = res
                        final = self.chunk(i, self.final_delta(), None, self.finish_reason(i, fr))
                        final["choices"][0] = with_grammar(final["choices"][0], res)
                        yield sse(final)
                if self.include_usage:
                    usage = self.usage([r for r in finals if r is not None]) if all(finals) else None
                    yield sse({"id": self.id, "object": self.chunk_kind, "created": self.created,
                               "model": self.model_name, "choices": [], "usage": usage})
                yield SSE_DONE
        finally:
            self.tm.close(sub)

    def chunk(self, i: int, delta: Any, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": i, **delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": self.chunk_kind, "created": self.created, "model": self.model_name,
                "choices": [choice]}

    # Overridden per kind.
    chunk_kind = ""

    def first_delta(self, i: int) -> dict[str, Any] | None:
        return None

    def stream_deltas(self, i: int, text: str, delta: str, final: bool) -> list[dict[str, Any]]:
        """The chunk deltas of choice `i` now that its cumulative text is `text` (`delta` new)."""
        return [self.text_delta(delta)] if delta else []

    def finish_reason(self, i: int, fr: dict[str, Any] | None) -> str | None:
        return finish_reason(fr)

    def text_delta(self, delta: str) -> dict[str, Any]:
        raise NotImplementedError

    def final_delta(self) -> dict[str, Any]:
        raise NotImplementedError

    def choice(self, i: int, res: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs(self, res: dict[str, Any], skip: int) -> dict[str, Any] | None:
        raise NotImplementedError


class _Completion(_Call):
    kind = "text_completion"
    chunk_kind = "text_completion"
    prefix = "cmpl"

    async def prepare(self) -> None:
        b = self.body
        prompts = completion_prompts(b.get("prompt"))
        if b.get("suffix") not in (None, ""):
            raise bad_request("suffix is not supported", param="suffix")
        n = int_field(b, "n", 1, 1)
        if b.get("best_of") is not None and b["best_of"] != n:
            raise bad_request("best_of is not supported (it must equal n)", param="best_of")
        self.echo = bool_field(b, "echo", False)
        self.top_n = int_field(b, "logprobs", None, 0, self.tm.args.max_top_logprobs)
        max_tokens = int_field(b, "max_tokens", 16, 0)
        self.n_prompts = len(prompts)
        rids = [self.id] if len(prompts) == 1 else [f"{self.id}-p{i}" for i in range(len(prompts))]
        self.prepared = await self.tm.prepare(
            prompts, [self.sampling(max_tokens)] * len(prompts), rids=rids, return_logprob=self.top_n is not None,
            logprob_start_len=0 if self.echo and self.top_n is not None else -1, top_logprobs_num=self.top_n or 0,
            return_text_in_logprobs=True, stream=self.stream)
        # Token-id prompts are decoded only now that prepare() has checked their ids.
        self.echo_text = [p if isinstance(p, str) else self.tm.tokenizer.decode(p) for p in prompts]

    def first_delta(self, i: int) -> dict[str, Any] | None:
        if not self.echo:
            return None
        return {"text": self.echo_text[self.prepared.prompt_index[i]]}

    def text_delta(self, delta: str) -> dict[str, Any]:
        return {"text": delta}

    def final_delta(self) -> dict[str, Any]:
        return {"text": ""}

    def choice(self, i: int, res: dict[str, Any]) -> dict[str, Any]:
        echo = self.echo_text[self.prepared.prompt_index[i]] if self.echo else ""
        lp = self.logprobs(res, 0)
        if lp is not None:
            lp.pop("_count")
        return {"index": i, "text": echo + res["text"], "logprobs": lp,
                "finish_reason": finish_reason(res["meta_info"].get("finish_reason"))}

    def logprobs(self, res: dict[str, Any], skip: int) -> dict[str, Any] | None:
        """OpenAI legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset), from entry
        `skip` on; `_count` says how many entries it holds."""
        if self.top_n is None:
            return None
        meta = res["meta_info"]
        entries = list(meta.get("output_token_logprobs") or [])
        tops = list(meta.get("output_top_logprobs") or [])
        if self.echo:
            entries = list(meta.get("input_token_logprobs") or []) + entries
            tops = list(meta.get("input_top_logprobs") or []) + tops
        offsets, pos = [], 0
        for e in entries:
            offsets.append(pos)
            pos += len(e[2] or "")
        entries, tops, offsets = entries[skip:], tops[skip:], offsets[skip:]
        return {"tokens": [e[2] for e in entries], "token_logprobs": [e[0] for e in entries],
                "top_logprobs": [None if t is None else {x[2]: x[0] for x in t} for t in tops],
                "text_offset": offsets, "_count": len(entries)}


class _Chat(_Call):
    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"
    prefix = "chatcmpl"

    async def prepare(self) -> None:
        b, tok = self.body, self.tm.tokenizer
        messages = chat_messages(b.get("messages"))
        self.tools = ToolSession.from_body(b, messages, tok.template_for)
        kwargs = b.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise bad_request("chat_template_kwargs must be an object", param="chat_template_kwargs")
        if self.tools is not None:
            messages = self.tools.messages(messages)
            if self.tools.knows_tools:
                kwargs = {**kwargs, "tools": self.tools.tools}
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
        ids = await self.tm.encode(text, add_special_tokens=False)  # the template wrote the special tokens
        self.want_lp = bool_field(b, "logprobs", False)
        self.top_n = int_field(b, "top_logprobs", None, 0, self.tm.args.max_top_logprobs)
        if self.top_n is not None and not self.want_lp:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = int_field(b, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = int_field(b, "max_tokens", None, 1)
        if max_tokens is None:
            max_tokens = max(0, min(self.tm.max_new_tokens_limit, self.tm.context_length - len(ids)))
        sp = self.sampling(max_tokens)
        if self.tools is not None:
            self.tools.constrain(sp)
        if not sp.get("ignore_eos"):  # end the turn at the template's end-of-turn marker
            for s in tok.chat_stop_strings:
                tid = tok.token_to_id(s)
                if tid is not None:
                    sp["stop_token_ids"] = [*(sp.get("stop_token_ids") or []), tid]
                elif isinstance(sp.get("stop", []), list):
                    sp["stop"] = [*sp.get("stop", []), s]
                else:
                    sp["stop"] = [sp["stop"], s]
        self.n_prompts = 1
        self.prepared = await self.tm.prepare(
            [ids], [sp], rids=[self.id], return_logprob=self.want_lp, top_logprobs_num=self.top_n or 0,
            return_text_in_logprobs=True, stream=self.stream)

    def first_delta(self, i: int) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}

    def text_delta(self, delta: str) -> dict[str, Any]:
        return {"delta": {"content": delta}}

    def final_delta(self) -> dict[str, Any]:
        return {"delta": {}}

    def stream_deltas(self, i: int, text: str, delta: str, final: bool) -> list[dict[str, Any]]:
        if self.tools is None:
            return super().stream_deltas(i, text, delta, final)
        return self.tools.stream_deltas(i, text, final)

    def finish_reason(self, i: int, fr: dict[str, Any] | None) -> str | None:
        reason = finish_reason(fr)
        return reason if self.tools is None else self.tools.finish_reason(i, reason)

    def choice(self, i: int, res: dict[str, Any]) -> dict[str, Any]:
        lp = self.logprobs(res, 0)
        if lp is not None:
            lp.pop("_count")
        text = res["text"]
        message = {"role": "assistant", "content": text} if self.tools is None else self.tools.message(i, text)
        return {"index": i, "message": message, "logprobs": lp,
                "finish_reason": self.finish_reason(i, res["meta_info"].get("finish_reason"))}

    def logprobs(self, res: dict[str, Any], skip: int) -> dict[str, Any] | None:
        if not self.want_lp:
            return None
        meta = res["meta_info"]
        entries = (meta.get("output_token_logprobs") or [])[skip:]
        tops = (meta.get("output_top_logprobs") or [])[skip:]
        tops = tops + [[]] * (len(entries) - len(tops))

        def item(e: list) -> dict[str, Any]:
            t = e[2] or ""
            return {"token": t, "logprob": e[0], "bytes": list(t.encode("utf-8"))}

        return {"content": [{**item(e), "top_logprobs": [item(x) for x in top]} for e, top in zip(entries, tops)],
                "_count": len(entries)}



"""The SGLang-compatible native endpoints: /generate, /health, /health_generate, model and server
info, /flush_cache, /abort_request, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixflow.runtime.server.sse import (
    SSE_DONE,
    abort_on_disconnect,
    error_response,
    finite,
    read_json,
    sse,
    stream_preflight,
)
from radixflow.runtime.server.tokenizer_manager import APIError, Submission, TokenizerManager, bad_request

if TYPE_CHECKING:
    from radixflow.runtime.server.args import ServerArgs

_GENERATE_KEYS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "return_text_in_logprobs", "stream"}
# Fields of SGLang's /generate that its clients send with a null or default value (its frontend
# sends image_data; its Runtime lora_path and session_id). Accepted at that value; any other value
# is a 400 that says this server does not support the feature.
_SGLANG_DEFAULTS = {"image_data": None, "video_data": None, "audio_data": None, "input_embeds": None,
                    "lora_path": None, "lora_id": None, "session_id": None, "session_params": None,
                    "custom_logit_processor": None, "token_ids_logprob": None, "return_hidden_states": False,
                    "modalities": None, "data_parallel_rank": None, "priority": None, "extra_key": None,
                    "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None}
_SGLANG_IGNORED = {"log_metrics", "no_logs", "custom_labels"}  # bookkeeping hints with no effect on output


def native_router(tm: TokenizerManager, args: ServerArgs, model_name: str) -> APIRouter:
    """The native routes bound to one TokenizerManager."""
    router = APIRouter()
    _health_routes(router, tm, args)
    _info_routes(router, tm, args, model_name)
    _control_routes(router, tm, args)
    _generate_route(router, tm, args)
    return router


def _health_routes(router: APIRouter, tm: TokenizerManager, args: ServerArgs) -> None:
    @router.get("/health")
    async def health() -> Response:
        problem = tm.health()
        if problem:
            return error_response(APIError(503, f"unhealthy: {problem}", "server_error", "service_unavailable"))
        return JSONResponse({"status": "ok"})

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """Healthy only if one token makes it through scheduler and detokenizer in time."""
        token = tm.tokenizer.bos_token_id if tm.tokenizer.bos_token_id is not None else 0
        prepared = await tm.prepare([[token]], [{"max_new_tokens": 1, "temperature": 0.0}])
        sub = tm.submit(prepared, bypass_capacity=True)
        try:
            await asyncio.wait_for(tm.wait(sub), args.health_generate_timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"no token generated within {args.health_generate_timeout:.0f}s", "server_error",
                           "service_unavailable") from None
        finally:
            tm.close(sub)
        err = sub.error()
        if err is not None:
            raise APIError(503, err.message, "server_error", "service_unavailable")
        return JSONResponse({"status": "ok"})


def _info_routes(router: APIRouter, tm: TokenizerManager, args: ServerArgs, model_name: str) -> None:
    @router.get("/get_model_info")
    @router.get("/model_info")  # SGLang's newer name
    async def get_model_info() -> dict[str, Any]:
        return {"model_path": tm.model_path, "tokenizer_path": tm.tokenizer.path, "is_generation": True,
                "served_model_name": model_name, "context_length": tm.context_length,
                "vocab_size": tm.vocab_size}

    @router.get("/get_chat_template")
    async def get_chat_template() -> dict[str, Any]:
        """The model's chat template and its end-of-turn stop strings (for the DSL's roles)."""
        tok = tm.tokenizer
        return {"chat_template": tok.chat_template, "stop_strings": list(tok.chat_stop_strings),
                **tok.special_tokens}

    @router.get("/get_server_info")
    @router.get("/server_info")  # SGLang's newer name (its frontend's get_server_info reads it)
    async def get_server_info() -> dict[str, Any]:
        info = await tm.get_info()
        sargs = dataclasses.asdict(args)
        sargs["api_key"] = "<set>" if args.api_key else None
        return {**info, "in_flight_requests": len(tm.states), "model_path": tm.model_path,
                "served_model_name": model_name, "server_args": sargs}

    @router.get("/metrics")
    async def metrics() -> Response:
        with contextlib.suppress(APIError):
            await tm.get_info(timeout=5.0)  # refreshes the scheduler gauges
        return Response(tm.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _control_routes(router: APIRouter, tm: TokenizerManager, args: ServerArgs) -> None:
    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ok, message = await tm.flush_cache()
        if not ok:
            raise bad_request(f"cache not flushed: {message}", code="busy")
        return JSONResponse({"success": True, "message": message})

    @router.post("/abort_request")
    async def abort_request(request: Request) -> dict[str, Any]:
        body = await read_json(request, args.max_request_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("rid"), str):
            raise bad_request('expected {"rid": "<request id>"}', param="rid")
        return {"success": tm.abort(body["rid"])}


def _generate_route(router: APIRouter, tm: TokenizerManager, args: ServerArgs) -> None:
    @router.post("/generate")
    async def generate(request: Request) -> Response:
        body = await read_json(request, args.max_request_bytes)
        prompts, single, kwargs = _parse_generate(body)
        stream = kwargs.pop("stream")
        prepared = await tm.prepare(prompts, stream=stream, **kwargs)
        sub = tm.submit(prepared)
        many = not single or len(prepared.reqs) > 1
        if stream:
            refused = await stream_preflight(request, tm, sub)
            if refused is not None:
                return refused
            return StreamingResponse(_native_stream(request, tm, sub, many), media_type="text/event-stream")
        try:
            async with abort_on_disconnect(request, tm, sub):
                results = await tm.wait(sub)
        finally:
            tm.close(sub)
        if sub.disconnected:
            return Response(status_code=499)
        err = sub.error()
        if err is not None:
            raise err
        results = [finite(r) for r in results]
        return JSONResponse(results if many else results[0])


def _parse_generate(body: Any) -> tuple[list, bool, dict[str, Any]]:
    """(prompts, single, keyword arguments for TokenizerManager.prepare) of a /generate body."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - _GENERATE_KEYS - set(_SGLANG_DEFAULTS) - _SGLANG_IGNORED)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    unsupported = sorted(k for k, d in _SGLANG_DEFAULTS.items() if k in body and not _is_default(body[k], d))
    if unsupported:
        raise bad_request(f"{unsupported[0]} is not supported by this server (text-only, one model, no LoRA)",
                          param=unsupported[0])
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise bad_request("give exactly one of text and input_ids")
    if text is not None:
        single = isinstance(text, str)
        prompts = [text] if single else text
        if not isinstance(prompts, list) or not all(isinstance(t, str) for t in prompts):
            raise bad_request("text must be a string or a list of strings", param="text")
    else:
        if not isinstance(ids, list):
            raise bad_request("input_ids must be a list of token ids or a list of such lists", param="input_ids")
        single = not ids or not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        if not all(isinstance(p, list) for p in prompts):
            raise bad_request("input_ids must be a list of token ids or a list of such lists", param="input_ids")
    if not prompts:
        raise bad_request("no prompt given")
    sp = body.get("sampling_params")
    sampling = sp if isinstance(sp, list) else [sp] * len(prompts)
    rid = body.get("rid")
    rids = rid if isinstance(rid, list) else [rid] * len(prompts) if len(prompts) == 1 or rid is None else None
    if rids is None:
        raise bad_request("a batch needs a list of rids, one per prompt", param="rid")
    stream = body.get("stream", False)
    flags = {k: body.get(k, d) for k, d in (("return_logprob", False), ("return_text_in_logprobs", False))}
    for k, v in {**flags, "stream": stream}.items():
        if not isinstance(v, bool):
            raise bad_request(f"{k} must be a boolean", param=k)
    kwargs = dict(sampling=sampling, rids=rids, logprob_start_len=body.get("logprob_start_len", -1),
                  top_logprobs_num=body.get("top_logprobs_num", 0), stream=stream, **flags)
    return prompts, single, kwargs


def _is_default(value: Any, default: Any) -> bool:
    """`value` is `default`, or a per-prompt list of it (a batch)."""
    return value == default or (isinstance(value, list) and all(v == default for v in value))


async def _native_stream(request: Request, tm: TokenizerManager, sub: Submission, many: bool) -> AsyncIterator[str]:
    try:
        async with abort_on_disconnect(request, tm, sub):
            async for i, res in tm.results(sub):
                if sub.disconnected:
                    return
                fr = res["meta_info"].get("finish_reason") or {}
                if fr.get("type") == "abort" and not sub.states[i].aborted_by_user:
                    err = sub.error()
                    yield sse(err.body() if err else {"error": {"message": fr.get("message")}})
                    break
                yield sse(finite({**res, "index": i}) if many else finite(res))
            yield SSE_DONE
    finally:
        tm.close(sub)

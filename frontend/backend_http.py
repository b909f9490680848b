"""`rf.RuntimeEndpoint`: the HTTP backend, speaking the native `/generate` API (DESIGN §6) with httpx.

Errors: a 4xx answer raises InvalidRequestError, any other failure BackendError, each with the
server's message. Streaming reads SSE `data: {json}` lines (cumulative text) up to `data: [DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from radixflow.frontend.backend import Backend, BackendError, InvalidRequestError, raise_if_aborted
from radixflow.frontend.chat_template import ChatTemplate, guess_builtin


def _error_message(resp: httpx.Response) -> str:
    """The server's message from a JSON error body ({"error": {"message"}}, {"message"}, {"detail"})."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or body)
        return str(err)
    return str(body)


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    message = _error_message(resp)
    cls = InvalidRequestError if 400 <= resp.status_code < 500 and resp.status_code != 429 else BackendError
    raise cls(f"{message} (HTTP {resp.status_code})", resp.status_code)


class RuntimeEndpoint(Backend):
    """A running `radixflow serve` (or any SGLang-compatible native API) at `base_url`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                    limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        self._template: ChatTemplate | None = None
        self._model_info: dict[str, Any] | None = None

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise BackendError(f"{method} {self.base_url}{path} failed: {e}") from e
        _raise_for(resp)
        return resp

    @staticmethod
    def _body(prompt: Any, sampling_params: Any, input_ids: Any, **options: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"sampling_params": sampling_params or {}}
        if input_ids is not None:
            body["input_ids"] = input_ids
        else:
            body["text"] = prompt
        body.update(options)
        return body

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, *,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 return_text_in_logprobs: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        """POST /generate; one dict for one prompt, a list for a list."""
        body = self._body(prompt, sampling_params, input_ids, return_logprob=return_logprob,
                          logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
                          return_text_in_logprobs=return_text_in_logprobs)
        out = self._request("POST", "/generate", json=body).json()
        for r in out if isinstance(out, list) else [out]:
            raise_if_aborted(r)
        return out

    def generate_stream(self, prompt: str, sampling_params: dict[str, Any] | None = None,
                        **options: Any) -> Iterator[dict[str, Any]]:
        """POST /generate with stream=True; yields each SSE chunk (cumulative text)."""
        body = self._body(prompt, sampling_params, options.pop("input_ids", None), stream=True, **options)
        try:
            with self._client.stream("POST", "/generate", json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise BackendError(str(err.get("message", err) if isinstance(err, dict) else err))
                    yield raise_if_aborted(chunk)
        except httpx.HTTPError as e:
            raise BackendError(f"streaming from {self.base_url}/generate failed: {e}") from e

    def get_model_info(self) -> dict[str, Any]:
        """GET /get_model_info (cached)."""
        if self._model_info is None:
            self._model_info = self._request("GET", "/get_model_info").json()
        return self._model_info

    def get_server_info(self) -> dict[str, Any]:
        return self._request("GET", "/get_server_info").json()

    def chat_template(self) -> ChatTemplate:
        """The server's template from GET /get_chat_template ({"chat_template", "stop_strings",
        special tokens}); where the server has no such endpoint, a built-in template chosen by the
        model path's name (ChatML-style for the default model)."""
        if self._template is None:
            try:
                resp = self._client.get("/get_chat_template")
            except httpx.HTTPError as e:
                raise BackendError(f"GET {self.base_url}/get_chat_template failed: {e}") from e
            if resp.status_code == 200 and resp.json().get("chat_template"):
                info = resp.json()
                tokens = {k: info[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if info.get(k)}
                self._template = ChatTemplate.from_source(info["chat_template"], tokens,
                                                          tuple(info.get("stop_strings") or ()), name="server")
            elif resp.status_code in (404, 405) or resp.status_code == 200:
                path = str(self.get_model_info().get("model_path", ""))
                self._template = ChatTemplate.builtin(guess_builtin(path))
            else:
                _raise_for(resp)
        assert self._template is not None
        return self._template

    def flush_cache(self) -> bool:
        try:
            self._request("POST", "/flush_cache")
        except BackendError:
            return False
        return True

    def shutdown(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"rf.RuntimeEndpoint({self.base_url!r})"

"""SGLang native API parity on a real server: stop_regex, structural_tag, sampling_seed, the
fields SGLang's clients send at their defaults, and the /model_info and /server_info names."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from server_utils import AUTH, ServerProcess, assert_error, shared_server, wait_pool_whole

PROMPT = "Count to ten: 1, 2, 3,"


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    server: ServerProcess = shared_server()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c
        wait_pool_whole(c)


def generate(client: httpx.Client, sampling: dict, **extra) -> httpx.Response:
    return client.post("/generate", json={"text": PROMPT, "sampling_params": sampling, **extra})


def test_stop_regex_stops_and_trims(client: httpx.Client) -> None:
    full = generate(client, {"max_new_tokens": 24, "temperature": 0}).json()["text"]
    m = re.search(r"[5-9],", full)
    assert m is not None, f"the model's greedy text has no match to stop at: {full!r}"
    res = generate(client, {"max_new_tokens": 24, "temperature": 0, "stop_regex": r"[5-9],"}).json()
    assert res["text"] == full[:m.start()]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": m.group(0)}
    kept = generate(client, {"max_new_tokens": 24, "temperature": 0, "stop_regex": [r"[5-9],", "zzz"],
                             "no_stop_trim": True}).json()
    assert kept["text"].startswith(full[:m.end()]) and re.search(r"[5-9],", kept["text"])


def test_streamed_stop_regex_match_is_never_sent(client: httpx.Client) -> None:
    """A match that spans tokens is held back while it may still be one: every streamed text is a
    prefix of the final, trimmed text."""
    full = generate(client, {"max_new_tokens": 24, "temperature": 0}).json()["text"]
    m = re.search(r"5, 6,", full)
    assert m is not None, f"the model's greedy text has no match to stop at: {full!r}"
    texts = []
    with client.stream("POST", "/generate", json={"text": PROMPT, "stream": True, "sampling_params": {
            "max_new_tokens": 24, "temperature": 0, "stop_regex": r"5, 6,"}}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts.append(json.loads(line[len("data: "):])["text"])
    assert texts[-1] == full[:m.start()]
    assert all(texts[-1].startswith(t) for t in texts), texts


def test_partial_regex_start_finds_matches_in_progress() -> None:
    from radixflow.runtime.text.detokenizer import partial_regex_start

    assert partial_regex_start("1, 2, 3, 4, 5", [r"5, 6,"]) == len("1, 2, 3, 4, ")
    assert partial_regex_start("1, 2, 3, 4, 5, 6", [r"zzz", r"[5-9], [5-9],"]) == len("1, 2, 3, 4, ")
    assert partial_regex_start("1, 2, 3", [r"5, 6,"]) == len("1, 2, 3")
    assert partial_regex_start("ab", [r"(unbalanced"]) == 2  # not compilable: nothing held back


@pytest.mark.parametrize(("pattern", "message"), [("(", "not a valid regular expression"),
                                                  ("a*", "matches the empty string"),
                                                  (["ok", 3], "stop_regex must be")])
def test_bad_stop_regex_is_a_400(client: httpx.Client, pattern, message: str) -> None:
    err = assert_error(generate(client, {"max_new_tokens": 2, "stop_regex": pattern}), 400)
    assert "stop_regex" in err["message"] and message in err["message"]


def test_sampling_seed_is_the_seed(client: httpx.Client) -> None:
    a = generate(client, {"max_new_tokens": 8, "temperature": 1.0, "seed": 7}).json()["text"]
    b = generate(client, {"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 7}).json()["text"]
    assert a == b
    assert_error(generate(client, {"max_new_tokens": 2, "seed": 1, "sampling_seed": 2}), 400)


def test_sglang_fields_at_their_defaults_are_accepted(client: httpx.Client) -> None:
    res = generate(client, {"max_new_tokens": 2, "stream_interval": 1, "custom_params": None},
                   image_data=None, lora_path=None, session_id=None, return_hidden_states=False, log_metrics=True)
    assert res.status_code == 200, res.text


@pytest.mark.parametrize(("field", "value"), [("image_data", "data:image/png;base64,AAAA"),
                                              ("lora_path", "adapter"), ("return_hidden_states", True)])
def test_sglang_features_we_lack_are_named(client: httpx.Client, field: str, value) -> None:
    err = assert_error(generate(client, {"max_new_tokens": 2}, **{field: value}), 400)
    assert err["param"] == field and "not supported" in err["message"]


def test_unknown_fields_stay_a_400(client: httpx.Client) -> None:
    err = assert_error(generate(client, {"max_new_tokens": 2}, colour="blue"), 400)
    assert "colour" in err["message"]
    err = assert_error(generate(client, {"max_new_tokens": 2, "colour": "blue"}), 400)
    assert "colour" in err["message"]


def test_model_info_and_server_info_names(client: httpx.Client) -> None:
    assert client.get("/model_info").json() == client.get("/get_model_info").json()
    info = client.get("/server_info").json()
    assert info["model_path"] == client.get("/get_model_info").json()["model_path"]


def test_structural_tag_native(client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<answer>", "content": {"type": "json_schema", "json_schema": schema},
        "end": "</answer>"}}
    res = client.post("/generate", json={"text": "The capital of France, as JSON: ",
                                         "sampling_params": {"max_new_tokens": 32, "temperature": 0,
                                                             "structural_tag": json.dumps(tag)}}).json()
    text = res["text"]
    assert text.startswith("<answer>") and text.endswith("</answer>"), text
    assert set(json.loads(text[len("<answer>"):-len("</answer>")])) == {"city"}
    bad = assert_error(client.post("/generate", json={"text": "x", "sampling_params": {
        "structural_tag": json.dumps({"type": "structural_tag", "format": {"type": "nope"}})}}), 400)
    assert "structural_tag" in bad["message"]

"""The DSL end to end on the default model, on both backends: the in-process rf.Engine (wrapping the
session's engine) and rf.RuntimeEndpoint against the session's `radixflow serve` subprocess."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest

import radixflow as rf
from radixflow.grammars.regex_utils import INT_REGEX


@pytest.fixture(scope="session")
def rf_engine(engine):
    """rf.Engine over the session's runtime engine (one model load for the whole suite)."""
    return rf.Engine.from_runtime(engine)


@pytest.fixture(scope="module")
def http_backend():
    """rf.RuntimeEndpoint on the session's shared `radixflow serve` subprocess (tests/server_utils.py)."""
    from server_utils import API_KEY, shared_server

    backend = rf.RuntimeEndpoint(shared_server().url, api_key=API_KEY)
    yield backend
    backend.shutdown()


@pytest.fixture(params=["engine", "http"])
def backend(request):
    return request.getfixturevalue("rf_engine" if request.param == "engine" else "http_backend")


def computed_prompt_tokens(backend) -> int:
    return int(backend.get_server_info()["computed_prompt_tokens"])


@rf.function
def chat(s, question, max_tokens=10):
    s += rf.system("You are a concise assistant.")
    s += rf.user(question)
    s += rf.assistant(rf.gen("answer", max_tokens=max_tokens))


def test_chat_gen_equals_a_direct_request_on_the_templated_prompt(backend, rf_engine, tokenizer):
    st = chat.run(question="What is the capital of France?", backend=backend, temperature=0)
    msgs = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    direct = rf_engine.generate(prompt, {"max_new_tokens": 10, "temperature": 0, "stop": ["<|im_end|>"]})
    assert st["answer"] == direct["text"] and st["answer"]
    assert st.text() == prompt + direct["text"] + "<|im_end|>\n"
    assert st.messages() == [*msgs, {"role": "assistant", "content": direct["text"]}]
    meta = st.get_meta_info("answer")
    assert meta["prompt_tokens"] == len(tokenizer.encode(prompt)) and meta["completion_tokens"] <= 10


def test_select_scores_are_the_engines_logprobs_with_token_healing(backend, rf_engine, tokenizer):
    prompt = "Question: Is fire hot or cold?\nAnswer: "
    choices = ["hot", "cold", "lukewarm water"]

    @rf.function
    def prog(s):
        s += prompt + rf.select("pick", choices)

    st = prog.run(backend=backend)
    meta = st.get_meta_info("pick")
    expected = []
    for c in choices:  # independent: full-prompt logprobs, choice tokens found by decoding prefixes
        ids = tokenizer.encode(prompt + c)
        res = rf_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                                 logprob_start_len=0)
        lps = [e[0] for e in res["meta_info"]["input_token_logprobs"]]
        mine = [lps[i] for i in range(1, len(ids)) if len(tokenizer.decode(ids[: i + 1])) > len(prompt)]
        expected.append(sum(mine) / len(mine))
    assert meta["normalized_prompt_logprobs"] == pytest.approx(expected, abs=2e-3)
    assert st["pick"] == choices[max(range(3), key=expected.__getitem__)]
    assert st.text() == prompt + st["pick"]
    # healing: the prompt's trailing space is scored as part of each choice's first token
    assert [t[0][2] for t in meta["input_token_logprobs"]] == [" hot", " cold", " luke"]


@pytest.mark.parametrize("method", ["greedy_token_selection", "unconditional_likelihood_normalized"])
def test_select_methods(backend, method):
    @rf.function
    def prog(s):
        s += rf.user("Pick a color.") + rf.assistant(
            rf.gen("color", choices=["red", "green", "blue"], choices_method=getattr(rf, method)))

    st = prog.run(backend=backend)
    meta = st.get_meta_info("color")
    assert st["color"] in ("red", "green", "blue")
    assert st.messages()[-1] == {"role": "assistant", "content": st["color"]}
    key = "greedy_logprob_matrix" if method.startswith("greedy") else "normalized_unconditional_prompt_logprobs"
    assert len(meta[key]) == 3


def test_gen_logprobs_reach_meta_info(backend):
    @rf.function
    def prog(s):
        s += "The sky is" + rf.gen("w", max_tokens=3, return_logprob=True, top_logprobs_num=2, ignore_eos=True)

    meta = prog.run(backend=backend, temperature=0).get_meta_info("w")
    lps = meta["output_token_logprobs"]
    assert len(lps) == meta["completion_tokens"] == 3
    # greedy: each chosen token is the most likely one
    assert all(top[0][1] == tok[1] and top[0][0] == pytest.approx(tok[0], abs=1e-4)
               for tok, top in zip(lps, meta["output_top_logprobs"]))


def test_constrained_gens(backend):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}

    @rf.function
    def prog(s):
        s += "Alice is 31 years old. Her code is " + rf.gen("code", regex=r"[A-Z]{2}-[0-9]{3}", max_tokens=10)
        s += ".\nHer age: " + rf.gen_int("age", max_tokens=6)
        s += "\nAs JSON: " + rf.gen("json", json_schema=schema, max_tokens=40)

    st = prog.run(backend=backend, temperature=0)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", st["code"])
    assert re.fullmatch(INT_REGEX, st["age"]) and isinstance(int(st["age"]), int)
    import jsonschema

    jsonschema.validate(json.loads(st["json"]), schema)


def test_fork_computes_the_shared_prefix_once(backend, tokenizer):
    prefix = f"Session {uuid.uuid4().hex}. Brainstorm short names for a small bakery in a quiet seaside town."

    @rf.function
    def prog(s):
        s += prefix
        forks = s.fork(3)
        forks += lambda i: f"\nIdea {i + 1}:" + rf.gen("idea", max_tokens=4, temperature=0)
        forks.join()
        return [f.get_meta_info("idea") for f in forks]

    before = computed_prompt_tokens(backend)
    st = prog.run(backend=backend)
    n_prefix = len(tokenizer.encode(prefix))
    assert len(st["idea"]) == 3 and all(isinstance(x, str) for x in st["idea"])
    assert all(m["cached_tokens"] >= n_prefix - 1 for m in st.ret_value)
    assert computed_prompt_tokens(backend) - before < n_prefix + 3 * 8  # not 3 * n_prefix


def test_streaming_matches_non_streaming(backend):
    ref = chat.run(question="Name a fruit.", backend=backend, temperature=0)
    st = chat.run(question="Name a fruit.", backend=backend, temperature=0, stream=True)
    pieces = list(st.text_iter())
    assert len(pieces) > 3 and "".join(pieces) == ref.text()
    st = chat.run(question="Name a fruit.", backend=backend, temperature=0, stream=True)
    assert "".join(st.text_iter("answer")) == ref["answer"]

    async def consume():
        st = chat.run(question="Name a fruit.", backend=backend, temperature=0, stream=True)
        return "".join([p async for p in st.text_async_iter()])

    assert asyncio.run(consume()) == ref.text()


def test_run_batch_caches_the_prefix_and_matches_single_runs(backend, tokenizer):
    shots = "".join(f"Q: What is {i} + {i}?\nA: {2 * i}\n" for i in range(1, 6))
    marker = uuid.uuid4().hex

    @rf.function
    def few_shot(s, q):
        s += f"Quiz {marker}. Answer with a number.\n" + shots
        s += "Q: " + q + "\nA:" + rf.gen("a", max_tokens=3, stop="\n")

    qs = [f"What is {i} + {i}?" for i in (7, 8, 9, 11)]
    prefix = few_shot.trace_prefix(backend)
    assert prefix == f"Quiz {marker}. Answer with a number.\n" + shots + "Q: "
    before = computed_prompt_tokens(backend)
    states = few_shot.run_batch([{"q": q} for q in qs], backend=backend, temperature=0)
    n_prefix = len(tokenizer.encode(prefix))
    assert computed_prompt_tokens(backend) - before < n_prefix + len(qs) * 16
    for q, st in zip(qs, states):
        assert st["a"] == few_shot.run(q=q, backend=backend, temperature=0)["a"]


def test_multi_turn_chat_reuses_the_previous_turns(backend):
    @rf.function
    def two_turns(s):
        s += rf.user("Say hello.")
        s += rf.assistant(rf.gen("t1", max_tokens=6, temperature=0))
        s += rf.user("Now say goodbye.")
        s += rf.assistant(rf.gen("t2", max_tokens=6, temperature=0))

    st = two_turns.run(backend=backend)
    first, second = st.get_meta_info("t1"), st.get_meta_info("t2")
    assert second["cached_tokens"] >= first["prompt_tokens"]
    assert [m["role"] for m in st.messages()] == ["user", "assistant", "user", "assistant"]


def test_errors_raise_with_the_runtimes_message(backend):
    with pytest.raises(rf.InvalidRequestError, match="temperature"):
        chat.run(question="hi", backend=backend, temperature=-1.0)
    with pytest.raises(rf.InvalidRequestError, match="max_new_tokens|context"):
        chat.run(question="hi", backend=backend, max_tokens=10**7)
    st = chat.run(question="hi", backend=backend, temperature=-1.0, stream=True)
    with pytest.raises(rf.InvalidRequestError, match="temperature"):
        list(st.text_iter())


def test_same_program_same_greedy_result_on_both_backends(rf_engine, http_backend):
    @rf.function
    def prog(s):
        s += rf.user("Is water wet? Answer yes or no, then explain briefly.")
        s += rf.assistant(rf.select("yn", ["Yes", "No"]) + "," + rf.gen("why", max_tokens=8))

    a = prog.run(backend=rf_engine, temperature=0)
    b = prog.run(backend=http_backend, temperature=0)
    assert a.text() == b.text()
    assert a.get_meta_info("yn")["normalized_prompt_logprobs"] == pytest.approx(
        b.get_meta_info("yn")["normalized_prompt_logprobs"], abs=2e-3)


def test_gen_stop_regex_on_both_backends(backend):
    @rf.function
    def count(s):
        s += "Count to ten: 1, 2, 3," + rf.gen("rest", max_tokens=24, stop_regex=r"[5-9],", temperature=0)

    st = count.run(backend=backend)
    assert st.get_meta_info("rest")["finish_reason"]["type"] == "stop"
    assert re.search(r"[5-9],", st["rest"]) is None and "4," in st["rest"]

"""Every sampling parameter changes what it should, on the default model."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from server_utils import assert_engine_pool_whole

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.engine import GenerationError

PROMPT = "Write a short story about a cat who learns to fly."
GREEDY = {"temperature": 0, "max_new_tokens": 16}


def gen(engine, prompt=PROMPT, **params):
    return engine.generate(prompt, {"max_new_tokens": 16, **params})


@pytest.fixture(scope="module")
def chat_prompt(engine):
    return engine.apply_chat_template([{"role": "user", "content": "Say hello."}])


@pytest.fixture(scope="module")
def greedy(engine):
    return gen(engine, temperature=0)


def test_same_seed_same_output_different_seed_differs(engine):
    a = gen(engine, temperature=1.0, seed=1234)
    b = gen(engine, temperature=1.0, seed=1234)
    c = gen(engine, temperature=1.0, seed=99)
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_seeded_sampling_independent_of_batch_neighbours(engine):
    alone = gen(engine, temperature=0.9, seed=7)
    batch = engine.generate([PROMPT, "Tell me a joke.", PROMPT],
                            [{"max_new_tokens": 16, "temperature": 0.9, "seed": 7},
                             {"max_new_tokens": 16, "temperature": 1.0},
                             {"max_new_tokens": 16, "temperature": 0.9, "seed": 7}])
    assert batch[0]["output_ids"] == alone["output_ids"] == batch[2]["output_ids"]


@pytest.mark.parametrize("params", [{"top_k": 1, "temperature": 1.0}, {"top_p": 1e-6, "temperature": 1.0},
                                    {"min_p": 1.0, "temperature": 1.5}])
def test_truncation_to_one_token_equals_greedy(engine, greedy, params):
    assert gen(engine, seed=3, **params)["output_ids"] == greedy["output_ids"]


def test_top_k_limits_choices(engine):
    """With top_k=2 every sampled token is one of the two most likely (by output top logprobs)."""
    r = engine.generate(PROMPT, {"max_new_tokens": 12, "temperature": 5.0, "top_k": 2, "seed": 0},
                        return_logprob=True, top_logprobs_num=2)
    for (_, tok, _), top in zip(r["meta_info"]["output_token_logprobs"], r["meta_info"]["output_top_logprobs"]):
        assert tok in [t[1] for t in top]


def test_high_temperature_changes_output(engine, greedy):
    outs = {tuple(gen(engine, temperature=2.0, seed=s)["output_ids"]) for s in range(3)}
    assert tuple(greedy["output_ids"]) not in outs or len(outs) > 1


def _max_repeat(ids: list[int]) -> int:
    return Counter(ids).most_common(1)[0][1]


def test_frequency_penalty_reduces_repetition(engine):
    prompt = "1 1 1 1 1 1 1 1 1 1 1 1"
    base = gen(engine, prompt, temperature=0, max_new_tokens=24)
    freq = gen(engine, prompt, temperature=0, max_new_tokens=24, frequency_penalty=2.0)
    assert _max_repeat(base["output_ids"]) >= 10  # the model just repeats " 1" (two tokens)
    assert _max_repeat(freq["output_ids"]) < _max_repeat(base["output_ids"]) / 2


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_presence_penalty_reduces_reuse_of_tokens(engine):
    base = gen(engine, temperature=0, max_new_tokens=40)
    pres = gen(engine, temperature=0, max_new_tokens=40, presence_penalty=2.0)
    neg = gen(engine, temperature=0, max_new_tokens=40, presence_penalty=-2.0)
    assert _repeats(pres["output_ids"]) < _repeats(base["output_ids"]) < _repeats(neg["output_ids"])


def test_repetition_penalty_penalizes_prompt_tokens(engine, tokenizer):
    prompt = "1 1 1 1 1 1 1 1 1 1 1 1"
    a_id = tokenizer.encode(" 1")[-1]
    base = gen(engine, prompt, temperature=0, max_new_tokens=16)
    rep = gen(engine, prompt, temperature=0, max_new_tokens=16, repetition_penalty=1.8)
    assert base["output_ids"].count(a_id) >= 6
    assert rep["output_ids"].count(a_id) < 3


def test_logit_bias_forces_token(engine, tokenizer):
    tok = tokenizer.encode(" banana")[0]
    r = gen(engine, temperature=0, max_new_tokens=5, logit_bias={str(tok): 100.0})
    assert r["output_ids"] == [tok] * 5


def test_max_new_tokens_and_ignore_eos(engine, chat_prompt):
    short = engine.generate(chat_prompt, {"temperature": 0, "max_new_tokens": 64})
    assert short["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    n = short["meta_info"]["completion_tokens"]
    assert n < 64 and short["output_ids"][-1] == 2
    forced = engine.generate(chat_prompt, {"temperature": 0, "max_new_tokens": n + 6, "ignore_eos": True})
    assert forced["meta_info"]["completion_tokens"] == n + 6
    assert forced["meta_info"]["finish_reason"] == {"type": "length", "length": n + 6}
    assert forced["output_ids"][:n - 1] == short["output_ids"][:n - 1]


def test_min_new_tokens_masks_eos(engine, chat_prompt):
    short = engine.generate(chat_prompt, {"temperature": 0, "max_new_tokens": 64})
    n = short["meta_info"]["completion_tokens"]
    r = engine.generate(chat_prompt, {"temperature": 0, "max_new_tokens": 64, "min_new_tokens": n + 4})
    assert r["meta_info"]["completion_tokens"] >= n + 4
    assert 2 not in r["output_ids"][:n + 3]


def test_stop_string_spanning_tokens_stops_and_trims(engine, greedy, tokenizer):
    ids = greedy["output_ids"]
    # A stop string made of the end of token 4 and the start of token 5.
    t4, t5 = tokenizer.decode(ids[4:5]), tokenizer.decode(ids[5:6])
    assert len(t4) >= 2 and len(t5) >= 2, (t4, t5)
    stop = t4[-2:] + t5[:2]
    full = greedy["text"]
    assert stop in full
    r = gen(engine, temperature=0, stop=[stop, "zzzz-not-there"])
    assert r["text"] == full[:full.index(stop)]
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert r["meta_info"]["completion_tokens"] == 6
    kept = gen(engine, temperature=0, stop=stop, no_stop_trim=True)
    assert kept["text"] == full[:full.index(stop) + len(stop)] or kept["text"].endswith(stop) or (
        stop in kept["text"])


def test_stop_token_ids(engine, greedy):
    target = greedy["output_ids"][3]
    r = gen(engine, temperature=0, stop_token_ids=[target])
    first = greedy["output_ids"].index(target)
    assert r["output_ids"] == greedy["output_ids"][:first + 1]
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}


def test_n_returns_independent_samples(engine):
    res = engine.generate(PROMPT, {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 5})
    assert isinstance(res, list) and len(res) == 3
    assert len({tuple(r["output_ids"]) for r in res}) > 1
    again = engine.generate(PROMPT, {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 5})
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in res]


def test_output_logprobs_greedy_is_top1(engine):
    r = engine.generate(PROMPT, GREEDY, return_logprob=True, top_logprobs_num=3, return_text_in_logprobs=True)
    lps = r["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in lps] == r["output_ids"]
    for (lp, tok, text), top in zip(lps, r["meta_info"]["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == tok and abs(top[0][0] - lp) < 1e-6 and lp <= 0
        assert isinstance(text, str)


def test_streaming_equals_non_streaming(engine, greedy):
    chunks = list(engine.generate(PROMPT, GREEDY, stream=True))
    assert len(chunks) > 3
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert texts[-1] == greedy["text"]
    assert chunks[-1]["output_ids"] == greedy["output_ids"]


def test_submit_returns_at_once_and_schedules_in_order(engine, greedy):
    prefix = "Submit order check. " * 12
    before = engine.get_server_info()["computed_prompt_tokens"]
    commit = engine.submit(prefix, {"max_new_tokens": 0})
    branches = engine.submit([prefix + f"Branch {i}:" for i in range(3)], {"max_new_tokens": 2, "temperature": 0})
    one = engine.submit(PROMPT, GREEDY)
    assert commit.result()["meta_info"]["completion_tokens"] == 0
    outs = branches.result()
    assert isinstance(outs, list) and len(outs) == 3
    # Sent after the commit, every branch found the prefix cached (or was held until it was).
    n_prefix = commit.result()["meta_info"]["prompt_tokens"]
    assert all(o["meta_info"]["cached_tokens"] >= n_prefix - 1 for o in outs)
    assert engine.get_server_info()["computed_prompt_tokens"] - before < n_prefix + 3 * 8 + 64
    assert one.result()["output_ids"] == greedy["output_ids"]
    with pytest.raises(ValueError, match="stream"):
        engine.submit("hi", {}, stream=True)
    with pytest.raises(ValueError, match="temperature"):
        engine.submit("hi", {"temperature": -1})
    with pytest.raises(GenerationError, match="regex"):
        engine.submit("hi", {"regex": "(unclosed"}).result()


def test_a_burst_at_an_idle_engine_starts_as_one_batch(engine):
    """Requests sent a few ms apart (threads of a run_batch) to an idle engine are prefilled in
    one step: it waits up to arrival_gap_ms for each next one. Without the wait (the control),
    the first request starts alone."""
    saved = engine.arrival_gap_ms

    def prefill_steps(gap_ms: float, spacing: float) -> int:
        engine.arrival_gap_ms = gap_ms  # read each time the scheduler thread wakes
        # The engine is shared by the whole session: start from idle, with a mean step long enough
        # that its cap on the gap (a tenth of a step) does not decide the outcome.
        deadline = time.monotonic() + 30
        while (info := engine.get_server_info())["num_running"] + info["num_waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        engine._burst.step_s = max(engine._burst.step_s, 1.0)
        before = engine.get_server_info()
        futs = []
        for i in range(4):
            futs.append(engine.submit(f"Burst {gap_ms} request {i}:", {"max_new_tokens": 2, "temperature": 0}))
            time.sleep(spacing)
        assert all(len(f.result()["output_ids"]) == 2 for f in futs)
        after = engine.get_server_info()
        return sum(after[k] - before[k] for k in ("extend_steps", "mixed_steps"))

    try:
        assert prefill_steps(50, 0.001) == 1
        assert prefill_steps(0, 0.3) >= 2
    finally:
        engine.arrival_gap_ms = saved
    with pytest.raises(ValueError, match="arrival_gap_ms must be >= 0"):
        EngineConfig(arrival_gap_ms=-1)


def test_expected_requests_start_as_one_batch_despite_a_stall(engine):
    """With expect_requests(n), an idle engine waits for all n before its first step, even when
    one sender stalls far longer than arrival_gap_ms (the control, without the hint, splits)."""

    def prefill_steps(hint: bool) -> int:
        before = engine.get_server_info()["extend_steps"]
        if hint:
            engine.expect_requests(4, 5.0)
        futs = []
        for i in range(4):
            futs.append(engine.submit(f"Expected {hint} request {i}:", {"max_new_tokens": 2, "temperature": 0}))
            time.sleep(0.3 if i == 1 else 0.001)  # one stall of 300 ms
        assert all(len(f.result()["output_ids"]) == 2 for f in futs)
        return engine.get_server_info()["extend_steps"] - before

    assert prefill_steps(True) == 1
    assert prefill_steps(False) >= 2
    with pytest.raises(ValueError, match="n >= 0"):
        engine.expect_requests(-1)


def test_async_generate_matches_generate(engine, greedy):
    async def both():
        return await asyncio.gather(engine.async_generate(PROMPT, GREEDY), engine.async_generate([PROMPT], GREEDY))

    one, many = asyncio.run(both())
    assert one["output_ids"] == greedy["output_ids"] and many[0]["output_ids"] == greedy["output_ids"]


@pytest.mark.parametrize("params,msg", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"n": 0}, "n must be"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
    ({"bogus": 1}, "unknown sampling parameter"),
    ({"max_new_tokens": "ten"}, "max_new_tokens must be int"),
    ({"stop_token_ids": [10 ** 9]}, "out of range"),
    ({"regex": "a", "json_schema": "{}"}, "at most one"),
])
def test_bad_sampling_params_raise_clear_errors(engine, params, msg):
    with pytest.raises(ValueError, match=msg):
        engine.generate("hi", params)


def test_bad_prompts_raise(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate(input_ids=[], sampling_params={})
    with pytest.raises(ValueError, match="out of range"):
        engine.generate(input_ids=[1, 2, 10 ** 7], sampling_params={})
    with pytest.raises(ValueError, match="context_length_exceeded"):
        engine.generate(input_ids=[5] * (engine.context_length + 1), sampling_params={})


def test_invalid_grammar_is_refused_and_engine_continues(engine):
    with pytest.raises(GenerationError, match="regex"):
        engine.generate("hi", {"regex": "(?=a)b", "max_new_tokens": 4})
    assert gen(engine, temperature=0, max_new_tokens=2)["meta_info"]["completion_tokens"] == 2


def test_abort_mid_stream_frees_slots(engine):
    it = engine.generate(PROMPT, {"max_new_tokens": 100, "temperature": 0, "ignore_eos": True}, stream=True)
    for _ in range(3):
        next(it)
    it.close()  # the client goes away: the engine aborts the request
    assert_engine_pool_whole(engine)



def test_no_slot_leaks_after_everything(engine):
    assert_engine_pool_whole(engine)

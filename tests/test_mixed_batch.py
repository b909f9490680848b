"""Mixed steps (running requests decode inside a prefill's forward) change nothing but speed."""

from __future__ import annotations

import pytest

from radixflow.runtime.engine import Engine

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind and the long grey waves that roll in from far away.",
    "def add(a, b):",
    "List three colors:",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who " * 3,
    "Q: What is 12 times 7?\nA:",
    "Hello",
    "The three primary colors are red, blue and",
]
LENGTHS = [3, 9, 17, 5, 12, 20, 7, 14]


@pytest.fixture(scope="module")
def runs(default_model_path):
    """Greedy outputs and input logprobs with mixed steps on and off (3 running at a time, so
    prompts are admitted while others decode)."""
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in LENGTHS]
    out = {}
    for mixed in (True, False):
        # fp32 weights and KV: the quantized matmul picks its path by row count (integer for
        # decode-sized batches, fp32 for prefill-sized ones), so there riding along with a prefill
        # changes a decode row's logprobs by ~1e-3; this test is about the scheduler.
        with Engine(default_model_path, max_running_requests=3, max_total_tokens=4096,
                    disable_mixed_batch=not mixed, quantization="none", kv_cache_dtype="float32") as eng:
            res = eng.generate(PROMPTS, params, return_logprob=True, logprob_start_len=0)
            stats = dict(eng.scheduler.stats)
            eng.check_invariant()
            info = eng.get_server_info()
        out[mixed] = (res, stats, info)
    return out


def test_mixed_steps_happen_only_when_enabled(runs):
    assert runs[True][1]["mixed_steps"] > 0
    assert runs[False][1]["mixed_steps"] == 0
    # Fewer forwards in all: the decode steps that rode along with prefills are saved.
    assert runs[True][1]["steps"] < runs[False][1]["steps"]


def test_mixed_steps_give_the_same_tokens_and_logprobs(runs):
    for a, b, n in zip(runs[True][0], runs[False][0], LENGTHS):
        assert a["output_ids"] == b["output_ids"]
        assert len(a["output_ids"]) == n
        for key in ("input_token_logprobs", "output_token_logprobs"):
            la, lb = a["meta_info"][key], b["meta_info"][key]
            assert [t for _, t, *_ in la] == [t for _, t, *_ in lb]
            diffs = [abs(x[0] - y[0]) for x, y in zip(la, lb) if x[0] is not None]
            assert all(d < 1e-3 for d in diffs) and len(diffs) >= len(la) - 1


def test_pool_is_whole_after_mixed_steps(runs):
    info = runs[True][2]
    assert info["free_slots"] + info["evictable_slots"] == info["pool_size"]
    assert info["protected_slots"] == 0

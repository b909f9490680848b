"""Request intake (runtime/intake.py), the one place every entry point takes requests in: each
check and its message, the n fan-out's rids and seeds, and the shapes of an abort; and the
Engine's burst policy (runtime/burst.py) on a bare queue. No model: milliseconds per test."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from radixflow.runtime.burst import Abort, AddRequest, BurstCollector, Expect, Stop
from radixflow.runtime.intake import (
    GenerateOptions,
    RequestError,
    abort_output,
    abort_result,
    check_prompt,
    fan_out,
)
from radixflow.runtime.io_struct import TokenizedGenerateReq
from radixflow.runtime.sampling_params import SamplingParams, copy_seed

LIMITS = {"vocab_size": 100, "context_length": 32, "pool_size": 20}

# ---- generate options ---------------------------------------------------------------------


def test_generate_options_defaults_pass_and_are_frozen():
    opts = GenerateOptions()
    assert opts.validate(5) is opts
    assert (opts.return_logprob, opts.logprob_start_len, opts.top_logprobs_num, opts.stream) == (False, -1, 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.stream = True  # type: ignore[misc]
    assert GenerateOptions.field_names() == ("return_logprob", "logprob_start_len", "top_logprobs_num",
                                             "return_text_in_logprobs", "stream")


@pytest.mark.parametrize("changes,message", [
    ({"return_logprob": 1}, "return_logprob must be a boolean"),
    ({"return_text_in_logprobs": "yes"}, "return_text_in_logprobs must be a boolean"),
    ({"stream": None}, "stream must be a boolean"),
    ({"logprob_start_len": -2}, r"logprob_start_len must be an integer >= -1"),
    ({"logprob_start_len": 1.0}, r"logprob_start_len must be an integer >= -1"),
    ({"logprob_start_len": True}, r"logprob_start_len must be an integer >= -1"),
    ({"top_logprobs_num": 6}, r"top_logprobs_num must be an integer in \[0, 5\]"),
    ({"top_logprobs_num": -1}, r"top_logprobs_num must be an integer in \[0, 5\]"),
    ({"top_logprobs_num": "2"}, r"top_logprobs_num must be an integer in \[0, 5\]"),
])
def test_generate_options_refusals_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        GenerateOptions(**changes).validate(5)


def test_generate_options_edge_values_pass():
    GenerateOptions(True, 0, 5, True, True).validate(5)
    GenerateOptions(logprob_start_len=10**6).validate(0)

# ---- prompts ------------------------------------------------------------------------------


def test_a_prompt_that_fits_passes():
    check_prompt([0, 99, 5], 10, **LIMITS)
    check_prompt([1] * 19, 13, **LIMITS)  # 19 + 13 == context length 32; 19 + 1 == pool 20


@pytest.mark.parametrize("ids,max_new,message,param,code", [
    ([], 1, "the prompt is empty: at least one input token is required", "prompt", None),
    ([1, 100, 2], 1, r"input token id 100 is out of range \[0, 100\)", "input_ids", None),
    ([1, -1], 1, r"input token id -1 is out of range \[0, 100\)", "input_ids", None),
    ([1] * 32, 0, r"the prompt has 32 tokens; this model's context length is 32 \(context_length_exceeded\)",
     "prompt", "context_length_exceeded"),
    ([1] * 10, 23, r"prompt \(10 tokens\) \+ max_new_tokens \(23\) exceeds the context length 32 "
     r"\(context_length_exceeded\)", "prompt", "context_length_exceeded"),
    ([1] * 20, 1, r"the prompt \(20 tokens\) does not fit the KV pool \(20 tokens\) \(context_length_exceeded\)",
     "prompt", "context_length_exceeded"),
])
def test_prompt_refusals(ids, max_new, message, param, code):
    with pytest.raises(RequestError, match=f"^{message}$") as e:
        check_prompt(ids, max_new, **LIMITS)
    assert isinstance(e.value, ValueError)  # the server answers it with a 400, the Engine raises it
    assert (e.value.param, e.value.code) == (param, code)
    assert (code is not None) == ("context_length_exceeded" in str(e.value))


def test_the_scheduler_validates_through_check_prompt():
    """Scheduler.validate is check_prompt with the scheduler's limits (no model needed)."""
    from radixflow.runtime.scheduler.scheduler import Scheduler

    sched = SimpleNamespace(runner=SimpleNamespace(vocab_size=100), context_length=32,
                            cache=SimpleNamespace(pool_size=20))
    Scheduler.validate(sched, [1, 2], 3)
    with pytest.raises(RequestError, match="context_length_exceeded"):
        Scheduler.validate(sched, [1] * 20, 1)

# ---- the n fan-out ------------------------------------------------------------------------


def test_one_copy_keeps_the_rid_and_the_seed():
    opts = GenerateOptions(return_logprob=True, logprob_start_len=0, top_logprobs_num=2, stream=True)
    [req] = fan_out("abc", SamplingParams(seed=7, max_new_tokens=3), [1, 2], input_text="hi", options=opts)
    assert isinstance(req, TokenizedGenerateReq)
    assert (req.rid, req.input_text, req.input_ids) == ("abc", "hi", [1, 2])
    assert (req.sampling_params.n, req.sampling_params.seed, req.sampling_params.max_new_tokens) == (1, 7, 3)
    assert (req.return_logprob, req.logprob_start_len, req.top_logprobs_num, req.stream) == (True, 0, 2, True)


def test_n_copies_get_numbered_rids_and_their_own_seeds():
    reqs = fan_out("abc", SamplingParams(n=3, seed=2**63 - 2), [5])
    assert [r.rid for r in reqs] == ["abc-0", "abc-1", "abc-2"]
    assert [r.sampling_params.seed for r in reqs] == [copy_seed(2**63 - 2, i) for i in range(3)]
    assert [r.sampling_params.seed for r in reqs] == [2**63 - 2, 2**63 - 1, -(2**63)]  # wraps within 64 bits
    assert all(r.sampling_params.n == 1 for r in reqs)
    assert all(not r.return_logprob and not r.stream and r.input_text is None for r in reqs)


def test_without_a_rid_copies_share_a_fresh_base():
    one, two = fan_out(None, SamplingParams(n=2), [5]), fan_out(None, SamplingParams(n=2), [5])
    base = one[0].rid.rsplit("-", 1)[0]
    assert [r.rid for r in one] == [f"{base}-0", f"{base}-1"] and len(base) == 32
    assert one[0].rid != two[0].rid
    assert [r.sampling_params.seed for r in one] == [None, None]
    [solo] = fan_out(None, SamplingParams(), [5])
    assert "-" not in solo.rid

# ---- aborts -------------------------------------------------------------------------------


def test_abort_output_shape():
    out = abort_output("r1", 7, "too long")
    assert out.finished and out.finish_reason == {"type": "abort", "message": "too long"}
    assert (out.rid, out.new_token_ids, out.prompt_tokens, out.completion_tokens, out.cached_tokens) == (
        "r1", [], 7, 0, 0)


def test_abort_result_shape():
    assert abort_result("r1", "the server is shutting down") == {"text": "", "output_ids": [], "meta_info": {
        "id": "r1", "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
        "finish_reason": {"type": "abort", "message": "the server is shutting down"}}}
    res = abort_result("r2", "timed out", prompt_tokens=4, e2e_latency=1.5)
    assert res["meta_info"]["e2e_latency"] == 1.5 and res["meta_info"]["prompt_tokens"] == 4

# ---- the Engine's burst policy ------------------------------------------------------------


def _add(rid: str) -> AddRequest:
    return AddRequest(TokenizedGenerateReq(rid, None, [1], SamplingParams()), False, lambda _: None, 0.0)


def _read(burst: BurstCollector) -> list:
    out = []
    while (msg := burst.next()) is not None:
        out.append(msg)
    return out


def test_a_busy_engine_steps_at_once_with_what_is_queued():
    inbox: queue.Queue = queue.Queue()
    burst = BurstCollector(inbox, arrival_gap_ms=50)
    inbox.put(Abort("x"))
    burst.begin(idle=False)
    t = time.monotonic()
    assert _read(burst) == [Abort("x")]
    assert time.monotonic() - t < 0.05


def test_an_idle_engine_collects_a_burst_arriving_gap_apart():
    inbox: queue.Queue = queue.Queue()
    burst = BurstCollector(inbox, arrival_gap_ms=1000)
    burst.step_s = 1.0  # a gap is at most a tenth of a step: 100 ms here
    inbox.put(_add("a"))
    burst.begin(idle=True)
    assert burst.next().req.rid == "a"
    inbox.put(_add("b"))
    assert burst.next().req.rid == "b"
    t = time.monotonic()
    assert burst.next() is None  # nothing within a gap: step
    assert 0.05 < time.monotonic() - t < 1.0


def test_with_no_gap_the_first_request_steps_alone():
    inbox: queue.Queue = queue.Queue()
    burst = BurstCollector(inbox, arrival_gap_ms=0)
    inbox.put(_add("a"))
    burst.begin(idle=True)
    assert burst.next().req.rid == "a"
    assert burst.next() is None


def test_an_expect_hint_waits_for_every_expected_request_then_ends_at_the_step():
    inbox: queue.Queue = queue.Queue()
    burst = BurstCollector(inbox, arrival_gap_ms=1)
    inbox.put(Expect(2, time.monotonic() + 5.0))
    inbox.put(_add("a"))
    burst.begin(idle=True)
    assert burst.next().req.rid == "a"  # the hint is taken, never returned
    t = time.monotonic()
    inbox_later = [_add("b"), Stop()]
    threading.Timer(0.2, lambda: [inbox.put(m) for m in inbox_later]).start()
    assert burst.next().req.rid == "b"  # a stall of 200 ms, far past the 1 ms gap
    assert time.monotonic() - t >= 0.15
    assert isinstance(burst.next(), Stop)
    assert burst.run_step(lambda: "stepped") == "stepped"
    burst.begin(idle=False)  # the hint held for the first step only
    t = time.monotonic()
    assert burst.next() is None and time.monotonic() - t < 0.05

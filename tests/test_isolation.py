"""A fault while handling one request fails that request alone: its caller gets an internal
error naming the stage, its KV slots are freed, and the rest of its batch finishes as if it
had not been there. Faults are injected with monkeypatch into the real code path."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import Future

import pytest
import torch
from server_utils import assert_engine_pool_whole

import radixflow.runtime.model.sampler as sampler_mod
import radixflow.runtime.scheduler.scheduler as scheduler_mod
from radixflow.runtime.engine import GenerationError
from radixflow.runtime.io_struct import BatchOutput, InfoOut, RegisterReq, ReqOutput
from radixflow.runtime.model.sampler import Sampler
from radixflow.runtime.req import Req
from radixflow.runtime.sampling_params import SamplingParams
from radixflow.runtime.scheduler.grammar_manager import GrammarManager
from radixflow.runtime.server.detokenizer_process import _handle
from radixflow.runtime.text.detokenizer import Detokenizer

PROMPTS = ["The capital of France is", "Once upon a time, there", "1, 2, 3, 4,", "The best way to learn is"]
BAD = 2
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
REGEX = {"temperature": 0, "max_new_tokens": 8, "regex": r"(yes|no), because [a-z ]{1,20}\."}
TIMEOUT = 300


def _rids(tag: str) -> list[str]:
    u = uuid.uuid4().hex[:8]
    return [f"{tag}-{u}-{i}" for i in range(len(PROMPTS))]


def _submit(engine, rids: list[str], params: dict, **kw) -> list[Future]:
    engine.expect_requests(len(rids))  # one batch
    return [engine.submit(p, params, rid=r, **kw) for p, r in zip(PROMPTS, rids)]



def _check_isolated(engine, monkeypatch, install, stage: str, params: dict = GREEDY,
                    error: str = "RuntimeError: injected", **kw) -> None:
    """Run PROMPTS without a fault, then with `install(bad_rid)`'s fault: only BAD fails."""
    want = [f.result(timeout=TIMEOUT) for f in _submit(engine, _rids("ref"), params, **kw)]
    rids = _rids("fault")
    install(rids[BAD])
    futs = _submit(engine, rids, params, **kw)
    with pytest.raises(GenerationError, match=f"^internal error: {re.escape(stage)}: {re.escape(error)}"):
        futs[BAD].result(timeout=TIMEOUT)
    for i, f in enumerate(futs):
        if i != BAD:
            res = f.result(timeout=TIMEOUT)
            assert res["output_ids"] == want[i]["output_ids"], (i, res["text"], want[i]["text"])
            assert res["meta_info"]["finish_reason"] == want[i]["meta_info"]["finish_reason"]
    monkeypatch.undo()
    assert_engine_pool_whole(engine)
    again = engine.generate(PROMPTS[BAD], params, **kw)
    assert again["output_ids"] == want[BAD]["output_ids"]
    assert_engine_pool_whole(engine)


def _boom(*_args, **_kwargs):
    raise RuntimeError("injected")


def _has(reqs, rid: str) -> bool:
    return any(r.rid == rid for r in reqs)


def test_sampling_row_fault(engine, monkeypatch):
    real = sampler_mod.sample_rows

    def install(bad):
        monkeypatch.setattr(sampler_mod, "sample_rows", lambda lg, reqs: _boom() if _has(reqs, bad) else real(lg, reqs))
    _check_isolated(engine, monkeypatch, install, "sampling")


def test_nan_logits_row(engine, monkeypatch):
    real = sampler_mod.apply_penalties

    def poisoned(logits, reqs):
        real(logits, reqs)
        for i, r in enumerate(reqs):
            if r.rid == poisoned.bad:
                logits[i, 7] = float("nan")

    def install(bad):
        poisoned.bad = bad
        monkeypatch.setattr(sampler_mod, "_needs_adjusting", lambda r: True)  # plain requests skip the stage
        monkeypatch.setattr(sampler_mod, "apply_penalties", poisoned)
    _check_isolated(engine, monkeypatch, install, "sampling", error="ValueError: no finite logit")


def test_logit_penalty_fault(engine, monkeypatch):
    real = sampler_mod.mask_stops_before_min

    def install(bad):
        monkeypatch.setattr(sampler_mod, "_needs_adjusting", lambda r: True)  # plain requests skip the stage
        monkeypatch.setattr(sampler_mod, "mask_stops_before_min",
                            lambda lg, reqs: _boom() if _has(reqs, bad) else real(lg, reqs))
    _check_isolated(engine, monkeypatch, install, "logit penalties")


def test_stop_check_fault(engine, monkeypatch):
    real = scheduler_mod.check_finished

    def install(bad):
        monkeypatch.setattr(scheduler_mod, "check_finished",
                            lambda req, *a: _boom() if req.rid == bad else real(req, *a))
    _check_isolated(engine, monkeypatch, install, "stop check")


def test_input_logprobs_fault(engine, monkeypatch):
    real = scheduler_mod.Scheduler._input_logprobs

    def install(bad):
        monkeypatch.setattr(scheduler_mod.Scheduler, "_input_logprobs",
                            lambda self, req, *a: _boom() if req.rid == bad else real(self, req, *a))
    _check_isolated(engine, monkeypatch, install, "input logprobs", return_logprob=True, logprob_start_len=0)


def test_output_logprobs_fault(engine, monkeypatch):
    real = sampler_mod.output_logprobs

    def install(bad):
        monkeypatch.setattr(sampler_mod, "output_logprobs",
                            lambda lp, ids, reqs: _boom() if _has(reqs, bad) else real(lp, ids, reqs))
    _check_isolated(engine, monkeypatch, install, "output logprobs", return_logprob=True, top_logprobs_num=2)


def _break_matcher(monkeypatch, method: str):
    """An installer: the bad request's grammar matcher raises in `method`."""
    real = GrammarManager.poll

    def install(bad):
        def poll(self):
            ready = real(self)
            for req in ready:
                if req.rid == bad and req.grammar is not None:
                    setattr(req.grammar, method, _boom)
            return ready
        monkeypatch.setattr(GrammarManager, "poll", poll)
    return install


@pytest.mark.parametrize("method,stage", [("fill_bitmask", "grammar mask"),
                                          ("accept_token", "grammar accept_token"),
                                          ("find_jump_forward_string", "jump-forward")])
def test_grammar_matcher_fault(engine, monkeypatch, method, stage):
    _check_isolated(engine, monkeypatch, _break_matcher(monkeypatch, method), stage, params=REGEX)


def test_grammar_compile_fault(engine, monkeypatch):
    real = GrammarManager.submit

    def install(bad):
        def submit(self, req):
            err = real(self, req)
            if req.rid == bad:
                req.grammar_future = Future()
                req.grammar_future.set_exception(RuntimeError("injected"))
            return err
        monkeypatch.setattr(GrammarManager, "submit", submit)
    _check_isolated(engine, monkeypatch, install, "grammar compile", params=REGEX)


def test_detokenizer_fault(engine, monkeypatch):
    real = Detokenizer.process

    def install(bad):
        monkeypatch.setattr(Detokenizer, "process", lambda self, out: _boom() if out.rid == bad else real(self, out))
    _check_isolated(engine, monkeypatch, install, "detokenizing")


def test_detokenizer_fault_mid_stream_stops_the_request(engine, monkeypatch):
    """A stream whose first chunk fails to detokenize ends at once, and the engine itself (not
    the client's abort) takes the request out of the scheduler."""
    bad = f"stream-{uuid.uuid4().hex[:8]}"
    real = Detokenizer.process
    monkeypatch.setattr(Detokenizer, "process", lambda self, out: _boom() if out.rid == bad else real(self, out))
    monkeypatch.setattr(engine, "abort", lambda rid: None)  # only the engine's own abort may act
    it = engine.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True},
                         stream=True, rid=bad)
    with pytest.raises(GenerationError, match="^internal error: detokenizing: RuntimeError: injected"):
        next(it)
    info = engine.get_server_info()  # answered after the step that failed it: no waiting
    assert info["num_running"] == 0 and info["num_waiting"] == 0, info
    assert_engine_pool_whole(engine)
    monkeypatch.undo()


def test_sampler_fails_only_rows_without_a_finite_logit():
    V = 16
    reqs = [Req(f"r{i}", [1, 2], SamplingParams(temperature=1.0, max_new_tokens=4), seed=i) for i in range(4)]
    logits = torch.randn(4, V)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")  # every token masked
    logits[3, 5] = float("inf")
    out = Sampler().sample(logits, reqs)
    assert out.next_ids[0] is not None and 0 <= out.next_ids[0] < V
    assert out.next_ids[1:] == [None, None, None]
    assert {i: (stage, type(e)) for i, (stage, e) in out.faults.items()} == {
        i: ("sampling", ValueError) for i in (1, 2, 3)}


def test_detokenizer_process_handle_isolates_one_output(tokenizer, monkeypatch):
    detok = Detokenizer(tokenizer)
    ids = tokenizer.encode(" hello world", add_special_tokens=False)
    real = Detokenizer.process
    monkeypatch.setattr(Detokenizer, "process", lambda self, out: _boom() if out.rid == "b" else real(self, out))
    outs = [ReqOutput(rid=r, new_token_ids=ids, finish_reason={"type": "length", "length": len(ids)},
                      prompt_tokens=3, completion_tokens=len(ids), cached_tokens=0) for r in "abc"]
    info = InfoOut({"x": 1})
    got = _handle(detok, [RegisterReq(r, stop=[]) for r in "abc"] + [BatchOutput(outs), info])
    assert [g["meta_info"]["id"] for g in got[:3]] == ["a", "b", "c"] and got[3] is info
    for g in (got[0], got[2]):
        assert g["text"] == " hello world" and g["meta_info"]["finish_reason"]["type"] == "length"
    fr = got[1]["meta_info"]["finish_reason"]
    assert fr == {"type": "abort", "message": "internal error: detokenizing: RuntimeError: injected"}
    assert got[1]["meta_info"]["prompt_tokens"] == 3
    assert "b" not in detok.states

"""The scheduler's parts wired together, on a fake model runner (no model, a few ms per test).

The fake keeps ModelRunner's contract as the scheduler uses it, with real KV bookkeeping
(`TokenAllocator`, `ReqToTokenPool`): each forward stores every new token id in the KV slot the
batch gives it, and predicts the next token from the whole context read back through the
request's row. So a wrong slot, a prefix served from the wrong cache entry, a lost token after a
retraction or a misplaced batch row changes the output, and each test compares it with the
sequence computed directly from the prompt."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.memory_pool import ReqToTokenPool, TokenAllocator
from radixflow.runtime.sampling_params import SamplingParams
from radixflow.runtime.scheduler.scheduler import Scheduler

V = 61  # vocabulary size


def next_token(ctx: list[int]) -> int:
    """The fake model's greedy next token after `ctx`: depends on every token and its position."""
    return (sum((p + 1) * t for p, t in enumerate(ctx)) * 7 + len(ctx)) % V


def reference(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


class FakeModel:
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, 1) holds each row's predicted token; logits (N, V) peak there."""
        ids = hidden[:, 0].long()
        logits = torch.full((hidden.shape[0], V), -8.0)
        logits[torch.arange(ids.numel()), ids] = 8.0
        return logits


class FakeRunner:
    """ModelRunner's contract (forward, model.compute_logits, pools, sizes) on a token-id KV."""

    def __init__(self, num_slots: int, max_running: int, context_length: int = 256) -> None:
        self.model = FakeModel()
        self.model_config = SimpleNamespace(eos_token_ids=[])
        self.model_path = "fake"
        self.device = torch.device("cpu")
        self.context_length = context_length
        self.vocab_size = V
        self.allocator = TokenAllocator(num_slots)
        self.req_to_token_pool = ReqToTokenPool(max_running + 1, context_length)
        self.kv = torch.full((num_slots + 1,), -1, dtype=torch.int64)  # the token id in each slot
        self.batches: list[tuple[ForwardMode, list[int], int]] = []  # mode, extend lens, num_decode

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def forward(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.batches.append((fb.mode, list(fb.extend_lens_cpu), fb.num_decode))
        assert (fb.out_cache_loc >= 1).all(), "slot 0 is the padding slot"
        self.kv[fb.out_cache_loc] = fb.input_ids
        hidden = torch.empty(fb.num_tokens, 1)
        t = 0
        for i in range(fb.batch_size):
            prefix, n = fb.prefix_lens_cpu[i], fb.extend_lens_cpu[i]
            ctx = self.kv[self.req_to_token_pool.read(int(fb.req_pool_indices[i]), 0, prefix + n)].tolist()
            assert -1 not in ctx, "attends to a slot never written"
            for j in range(n):
                hidden[t + j, 0] = next_token(ctx[:prefix + j + 1])
            t += n
        last = self.model.compute_logits(hidden[fb.extend_start_loc + fb.extend_lens - 1])
        return last, (hidden if fb.return_all_logits else None)


def make(num_slots: int = 1024, max_running: int = 8, **opts) -> tuple[Scheduler, FakeRunner]:
    config = EngineConfig(max_running_requests=max_running, **opts)
    runner = FakeRunner(num_slots, max_running)
    tokenizer = SimpleNamespace(eos_token_ids=[], decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))
    return Scheduler(config, runner, tokenizer), runner


def req(rid: str, prompt: list[int], n: int, **kw) -> TokenizedGenerateReq:
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    return TokenizedGenerateReq(rid=rid, input_text=None, input_ids=prompt, sampling_params=params, **kw)


def run(sched: Scheduler, outs: dict[str, list[ReqOutput]] | None = None,
        max_steps: int = 5000) -> dict[str, list[ReqOutput]]:
    """Step until idle, checking the KV pool invariant after every step."""
    outs = defaultdict(list) if outs is None else outs
    for o in sched.drain_outputs():
        outs[o.rid].append(o)
    for _ in range(max_steps):
        if not sched.has_work():
            return outs
        for o in sched.step():
            outs[o.rid].append(o)
        sched.check_invariant()
    raise AssertionError("the scheduler did not go idle")


def tokens(outs: list[ReqOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_pool_whole(sched: Scheduler) -> None:
    sched.check_invariant()
    info = sched.get_info()
    assert info["num_running"] == 0 and info["num_waiting"] == 0
    assert info["protected_slots"] == 0 and info["held_by_requests"] == 0
    assert info["free_slots"] + info["evictable_slots"] == info["pool_size"]
    assert sched.request_ids() == []


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 13 + i * 5 + 1) % V for i in range(n)]


def test_batched_requests_follow_the_model():
    sched, runner = make()
    prompts = {f"r{i}": prompt(i, 5 + 3 * i) for i in range(6)}
    for rid, p in prompts.items():
        sched.add_request(req(rid, p, 12))
    outs = run(sched)
    for rid, p in prompts.items():
        assert tokens(outs[rid]) == reference(p, 12), rid
        assert outs[rid][-1].finish_reason == {"type": "length", "length": 12}
    assert runner.batches[0][0] is ForwardMode.EXTEND and len(runner.batches[0][1]) == 6  # one prefill
    assert_pool_whole(sched)


def test_mixed_batch_decodes_running_requests_with_a_prefill():
    sched, runner = make()
    sched.add_request(req("a", prompt(1, 8), 10))
    sched.step()
    sched.add_request(req("b", prompt(2, 9), 10))
    outs = run(sched)
    assert tokens(outs["a"]) == reference(prompt(1, 8), 10)
    assert tokens(outs["b"]) == reference(prompt(2, 9), 10)
    assert runner.batches[1] == (ForwardMode.EXTEND, [9, 1], 1)
    assert sched.stats["mixed_steps"] == 1
    assert_pool_whole(sched)


def test_small_pool_retracts_and_every_request_finishes():
    sched, _ = make(num_slots=80, max_running=8)
    prompts = {f"r{i}": prompt(i, 12) for i in range(6)}  # 6 x (12 + 40) tokens >> 80 slots
    for rid, p in prompts.items():
        sched.add_request(req(rid, p, 40))
    outs = run(sched)
    assert sched.stats["retractions"] > 0
    for rid, p in prompts.items():
        assert tokens(outs[rid]) == reference(p, 40), rid
        assert outs[rid][-1].finish_reason["type"] == "length"
    assert_pool_whole(sched)


@pytest.mark.parametrize("chunk", [8, 0])
def test_chunked_prefill_and_input_logprobs(chunk):
    sched, runner = make(chunked_prefill_size=chunk, max_prefill_tokens=16)
    p = prompt(3, 29)
    p[10:14] = reference(p[:10], 4)  # tokens the model predicts: high logprobs
    sched.add_request(req("a", p, 6, return_logprob=True, logprob_start_len=0, top_logprobs_num=1))
    outs = run(sched)
    assert tokens(outs["a"]) == reference(p, 6)
    prefills = [lens for mode, lens, _ in runner.batches if mode is ForwardMode.EXTEND]
    assert prefills == ([[8], [8], [8], [5]] if chunk else [[16], [13]])
    lps = [x for o in outs["a"] for x in (o.input_token_logprobs or [])]
    assert [t for _, t in lps] == p and lps[0][0] is None
    for q in range(1, len(p)):
        hit = next_token(p[:q]) == p[q]
        assert (lps[q][0] > -1e-3) == hit, q
    assert sum(lp > -1e-3 for lp, _ in lps[1:]) >= 4
    assert_pool_whole(sched)


def test_abort_waiting_and_running_requests():
    sched, _ = make(max_running=2)
    prompts = {f"r{i}": prompt(i, 10) for i in range(4)}
    for rid, p in prompts.items():
        sched.add_request(req(rid, p, 20))
    outs: dict[str, list[ReqOutput]] = defaultdict(list)
    for _ in range(3):
        for o in sched.step():
            outs[o.rid].append(o)
    running, waiting = sched.running[0].rid, sched.waiting[-1].rid
    sched.abort_request(running, "stop it")
    sched.abort_request(waiting)
    assert not sched.has_request(running) and not sched.has_request(waiting)
    sched.check_invariant()
    run(sched, outs)
    assert outs[running][-1].finish_reason == {"type": "abort", "message": "stop it"}
    assert outs[waiting][-1].finish_reason == {"type": "abort", "message": "aborted by the client"}
    assert tokens(outs[waiting]) == []
    for rid in set(prompts) - {running, waiting}:
        assert tokens(outs[rid]) == reference(prompts[rid], 20), rid
    assert_pool_whole(sched)


@pytest.mark.parametrize("radix", [True, False])
def test_shared_prefix_hits_the_radix_cache(radix):
    sched, _ = make(disable_radix_cache=not radix)
    shared = prompt(7, 40)
    sched.add_request(req("a", shared + [1, 2, 3], 5))
    run(sched)
    before = sched.stats["computed_prompt_tokens"]
    sched.add_request(req("b", shared + [4, 5], 5))
    outs = run(sched)
    assert tokens(outs["b"]) == reference(shared + [4, 5], 5)
    assert outs["b"][-1].cached_tokens == (40 if radix else 0)
    assert sched.stats["computed_prompt_tokens"] - before == (2 if radix else 42)
    assert_pool_whole(sched)


def test_requests_sharing_an_uncached_prefix_compute_it_once():
    sched, runner = make()
    shared = prompt(9, 40)
    sched.add_request(req("a", shared + [1, 2], 4))
    sched.add_request(req("b", shared + [3, 4, 5], 4))
    outs = run(sched)
    assert tokens(outs["a"]) == reference(shared + [1, 2], 4)
    assert tokens(outs["b"]) == reference(shared + [3, 4, 5], 4)
    assert runner.batches[0] == (ForwardMode.EXTEND, [42], 0)  # b waits for a's prefix
    assert outs["b"][-1].cached_tokens == 40 and outs["a"][-1].cached_tokens == 0
    assert_pool_whole(sched)


def test_refusals_come_out_of_drain_outputs():
    sched, _ = make()
    sched.add_request(req("a", prompt(1, 5), 3))
    sched.add_request(req("a", prompt(1, 5), 3))  # duplicate id
    sched.add_request(req("e", [], 3))
    sched.add_request(req("big", [V + 1], 3))
    sched.refuse("a", 5, "could not queue")
    sched.refuse("never", 2, "could not queue")
    got = {(o.rid, o.finish_reason["message"]) for o in sched.drain_outputs()}
    assert ("a", "duplicate request id 'a'") in got
    assert ("a", "could not queue") in got and ("never", "could not queue") in got
    assert {rid for rid, _ in got} == {"a", "e", "big", "never"}
    assert sched.drain_outputs() == [] and not sched.has_work()
    assert_pool_whole(sched)

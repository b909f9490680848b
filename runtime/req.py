"""A request inside the scheduler: explicit counters and a status only the scheduler changes."""

from __future__ import annotations

import enum
from typing import Any

import torch

from radixflow.runtime.sampling_params import SamplingParams


class ReqStatus(enum.Enum):
    GRAMMAR_WAIT = "grammar_wait"  # waiting for its grammar to compile
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class Req:
    """Counters (all in tokens), with 0 <= prefix_len <= kv_len <= len(fill_ids):

    - `prefix_len`: tokens whose KV came from the radix cache at admission (or the last chunk)
    - `kv_len`: tokens whose KV is in the pool for this request (cached + computed)
    - `fill_ids`: prompt + outputs; all but the last sampled token end up with KV
    `row` is the ReqToTokenPool row while the request holds KV, `last_node` the locked tree node.
    """

    def __init__(self, rid: str, input_ids: list[int], params: SamplingParams, *,
                 input_text: str | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, stream: bool = False,
                 eos_token_ids: set[int] | None = None, seed: int | None = None) -> None:
        assert input_ids, "a request needs at least one input token"
        self.rid = rid
        self.input_text = input_text
        self.origin_input_ids = list(input_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = ReqStatus.WAITING
        self.finish_reason: dict[str, Any] | None = None
        self.matched_stop_str: str | None = None
        self.stream = stream
        self.eos_token_ids = eos_token_ids or set()

        self.row: int | None = None
        self.last_node: Any = None
        self.prefix_len = 0
        self.kv_len = 0
        self.cached_tokens = 0  # reported to the user: prompt tokens served from cache, first admission
        self.admitted_once = False
        self.retractions = 0

        self.return_logprob = return_logprob
        self.logprob_start_len = logprob_start_len
        self.top_logprobs_num = top_logprobs_num
        self.input_logprobs_done = not (return_logprob and logprob_start_len >= 0)
        self.pending_input_logprobs: list[tuple[float | None, int]] = []
        self.pending_input_top: list[list[tuple[float, int]] | None] = []
        self.pending_output_logprobs: list[tuple[float, int]] = []
        self.pending_output_top: list[list[tuple[float, int]]] = []
        self.sent_len = 0  # output tokens already reported

        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))

        self.grammar: Any = None  # GrammarMatcher when constrained
        self.grammar_future: Any = None
        # the grammar backend's report (grammars/selection.BackendChoice.info), sent with the final output
        self.grammar_info: dict[str, Any] | None = None
        self.stop_checker: Any = None  # StopChecker when stop strings are set

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def prompt_len(self) -> int:
        return len(self.origin_input_ids)

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status in (ReqStatus.FINISHED, ReqStatus.ABORTED)

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.params.max_new_tokens - len(self.output_ids))

    def check_counters(self) -> None:
        assert 0 <= self.prefix_len <= self.kv_len <= self.seq_len, (
            self.rid, self.prefix_len, self.kv_len, self.seq_len)

    def __repr__(self) -> str:
        return (f"Req({self.rid!r}, {self.status.value}, prompt={self.prompt_len}, out={len(self.output_ids)}, "
                f"prefix={self.prefix_len}, kv={self.kv_len})")

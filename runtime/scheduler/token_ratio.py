"""The new-token ratio: how much of running requests' future decode tokens admission keeps back.

SGLang's new_token_ratio: a share of each running request's remaining max_new_tokens is reserved
when admitting others; it decays while decoding goes well and jumps after a retraction.
"""

from __future__ import annotations

from radixflow.runtime.req import Req

RATIO_INIT, RATIO_MIN, RATIO_DECAY, RATIO_BUMP = 0.5, 0.05, 0.002, 0.2
RESERVE_CLIP = 4096  # a request's remaining tokens count at most this much


class NewTokenRatio:
    """The current ratio, in [RATIO_MIN, 1.0] once moved (it starts at RATIO_INIT)."""

    def __init__(self) -> None:
        self.value = RATIO_INIT

    def decay(self) -> None:
        """After a step that decoded the running requests."""
        self.value = max(RATIO_MIN, self.value - RATIO_DECAY)

    def bump(self) -> None:
        """After a retraction: reserve more from now on."""
        self.value = min(1.0, self.value + RATIO_BUMP)

    def future(self, req: Req) -> float:
        """KV tokens to keep back for req's future decode steps."""
        return min(req.remaining_new_tokens, RESERVE_CLIP) * self.value

    def reserved(self, running: list[Req]) -> int:
        """KV tokens kept back for all running requests' future decode steps."""
        return int(sum(min(r.remaining_new_tokens, RESERVE_CLIP) for r in running) * self.value)

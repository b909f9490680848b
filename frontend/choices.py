"""`select`: score each choice by the logprobs of its tokens after the prompt, pick one.

Scoring (`score_choices`) uses only the backend interface:
1. commit the prompt (a max_new_tokens=0 request): caches it and tells its token count N;
2. send prompt + choice for every choice in one batch, max_new_tokens=0, with input logprobs from
   position N-2 on (positions before that come from the cache);
3. token healing: the last prompt token may merge with the choice (prompt "Answer: " + "yes"
   tokenizes as "Answer", ":", " yes"). A token belongs to the choice iff it covers at least one
   character of the choice, so the healed " yes" is scored and no prompt-only token is;
4. a `ChoicesMethod` turns the per-token logprobs into a decision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from radixflow.frontend.backend import Backend

LogprobEntry = list  # [logprob, token_id, text or None], as on the wire


@dataclass(frozen=True)
class ChoicesDecision:
    """The chosen string and what it was chosen from (exposed as `s.get_meta_info(name)`)."""

    decision: str
    meta_info: dict[str, Any]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("-inf")


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)  # first best on ties


class ChoicesMethod(ABC):
    """Turns scored choices into a decision."""

    requires_unconditional_logprobs = False

    @abstractmethod
    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[LogprobEntry]],
                 unconditional_token_logprobs: list[list[LogprobEntry]] | None = None) -> ChoicesDecision:
        """Pick one of `choices`; `input_token_logprobs[i]` are the tokens of choice i after the prompt."""


class TokenLengthNormalized(ChoicesMethod):
    """The highest mean token logprob (the default)."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        return ChoicesDecision(choices[_argmax(normalized_prompt_logprobs)], {})


class GreedyTokenSelection(ChoicesMethod):
    """Token by token: keep the choices whose j-th token logprob is best, until one is left. A shorter
    choice is padded with its own mean logprob."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        width = max(len(t) for t in input_token_logprobs)
        matrix = []
        for toks, mean in zip(input_token_logprobs, normalized_prompt_logprobs):
            row = [e[0] for e in toks]
            matrix.append(row + [mean] * (width - len(row)))
        alive = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in alive)
            alive = [i for i in alive if matrix[i][j] == best]
            if len(alive) == 1:
                break
        return ChoicesDecision(choices[alive[0]], {"greedy_logprob_matrix": matrix})


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The highest mean of (conditional - unconditional) token logprob: discounts choices that are
    likely whatever the prompt. The unconditional logprob of a choice's first token is taken as 0."""

    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional token logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            if len(cond) != len(uncond):
                raise ValueError("conditional and unconditional logprobs differ in length")
            scores.append(_mean([c[0] - (u[0] or 0.0) for c, u in zip(cond, uncond)]))
        return ChoicesDecision(choices[_argmax(scores)], {"normalized_unconditional_prompt_logprobs": scores})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()


def choice_tokens(prompt: str, choice: str, entries: list[LogprobEntry], boundary: int) -> list[LogprobEntry]:
    """The entries (input logprobs of prompt + choice) that cover at least one character of
    `choice`; `boundary` is the index in `entries` of the prompt's last token. Token texts must be
    present (return_text_in_logprobs). When they do not concatenate to a suffix of prompt + choice
    (decoders that drop the space of a lone token), the entries from the boundary on are kept,
    minus the boundary token when its text is a suffix of the prompt (no healing happened)."""
    texts = [e[2] or "" for e in entries]
    if (prompt + choice).endswith("".join(texts)):
        covered, keep_from = 0, len(entries)
        for i in range(len(entries) - 1, -1, -1):
            if covered >= len(choice):
                break
            covered += len(texts[i])
            keep_from = i
    else:
        keep_from = max(boundary, 0)
        if keep_from < len(entries) - 1 and texts[keep_from] and prompt.endswith(texts[keep_from]):
            keep_from += 1
    return [e for e in entries[keep_from:] if e[0] is not None]


def score_choices(backend: Backend, prompt: str, choices: list[str], method: ChoicesMethod) -> ChoicesDecision:
    """Score every choice as a continuation of `prompt` and let `method` decide. The decision's
    meta_info holds per-choice `normalized_prompt_logprobs` (mean logprob of the choice's tokens),
    `input_token_logprobs` (those tokens' entries), `output_token_logprobs` (empty), `prompt_tokens`,
    and the method's own extras (`unconditional_token_logprobs`, ...)."""
    n_prompt = 0
    if prompt:
        commit = backend.cache_prefix(prompt)
        n_prompt = int(commit["meta_info"]["prompt_tokens"])
    start = max(n_prompt - 2, 0)
    results = backend.generate([prompt + c for c in choices], [{"max_new_tokens": 0}] * len(choices),
                               return_logprob=True, logprob_start_len=start, return_text_in_logprobs=True)
    assert isinstance(results, list) and len(results) == len(choices)
    tokens = [choice_tokens(prompt, c, r["meta_info"]["input_token_logprobs"], n_prompt - 1 - start)
              for c, r in zip(choices, results)]
    normalized = [_mean([e[0] for e in t]) for t in tokens]
    unconditional = None
    if method.requires_unconditional_logprobs:
        scored = [i for i, t in enumerate(tokens) if t]
        ids = [[e[1] for e in tokens[i]] for i in scored]
        outs = backend.generate(None, [{"max_new_tokens": 0}] * len(ids), input_ids=ids, return_logprob=True,
                                logprob_start_len=0, return_text_in_logprobs=True) if ids else []
        unconditional = [[] for _ in tokens]
        for i, o in zip(scored, outs):
            unconditional[i] = o["meta_info"]["input_token_logprobs"]
    decision = method(choices=list(choices), normalized_prompt_logprobs=normalized, input_token_logprobs=tokens,
                      unconditional_token_logprobs=unconditional)
    meta = {"normalized_prompt_logprobs": normalized, "input_token_logprobs": tokens,
            "output_token_logprobs": [[] for _ in choices], "prompt_tokens": n_prompt}
    if unconditional is not None:
        meta["unconditional_token_logprobs"] = unconditional
    meta.update(decision.meta_info)
    return ChoicesDecision(decision.decision, meta)

"""Jump-forward decoding: append the grammar's forced text at once, retokenized at the boundary.

How the scheduler uses it, for a request with matcher ``m`` and output tokens ``out``:

1. After a token is accepted, ``forced = m.find_jump_forward_string()``; skip if empty.
2. ``m.accept_string(forced)`` (the matcher now stands at the end of the forced text).
3. ``k, new = jump_forward_tokens(out, forced, encode, decode)``; drop the last ``k`` output
   tokens (and their KV cache entries), append ``new``, and compute their KV in the next
   EXTEND step. The matcher is *not* fed ``new``: the text is unchanged, only its tokens differ.

The boundary is retokenized because the forced text often merges with the last tokens (e.g.
``"`` + ``name`` -> ``"name``); appending ``encode(forced)`` alone would give a token
sequence the model rarely saw in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def jump_forward_tokens(
    output_ids: Sequence[int],
    forced: str,
    encode: Callable[[str], list[int]],
    decode: Callable[[Sequence[int]], str],
    lookback: int = 4,
) -> tuple[int, list[int]]:
    """Retokenize the last ``<= lookback`` output tokens followed by ``forced``.

    ``encode`` must not add special tokens (no BOS); ``decode`` must keep special tokens and
    spaces exactly (no clean-up). Returns ``(k, new_ids)`` such that
    ``decode(output_ids[:len(output_ids) - k] + new_ids) == decode(output_ids) + forced``
    whenever the tokenizer round-trips the text; ``new_ids`` shares no leading token with the
    dropped tail. Tails that decode to partial UTF-8 characters (U+FFFD) are shortened first.
    """
    if not forced:
        return 0, []
    for n in range(min(lookback, len(output_ids)), -1, -1):
        tail = list(output_ids[len(output_ids) - n :])
        text = decode(tail) if n else ""
        if "\ufffd" in text:
            continue
        new = encode(text + forced)
        if n and decode(new) != text + forced:
            continue
        p = 0
        while p < min(n, len(new)) and tail[p] == new[p]:
            p += 1
        return n - p, new[p:]
    raise AssertionError("unreachable: n == 0 always returns")

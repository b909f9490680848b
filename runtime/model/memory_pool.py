"""KV memory: the request-to-token map, the per-layer KV pool, and the slot allocator.

Slot 0 of the KV pool is reserved: padded writes (e.g. CUDA-graph padding) go there, so a
real slot index is always in [1, num_slots].
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """int32 (size, max_context_len): row r, position p -> KV slot holding that token."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str = "cpu") -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=device)
        self._free = list(range(size - 1, -1, -1))

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free row, or None when every row is in use."""
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        assert 0 <= row < self.size and row not in self._free, f"double free of row {row}"
        self._free.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record that positions start .. start+len(slots)-1 of `row` live in `slots`."""
        n = slots.numel()
        assert start + n <= self.max_context_len, "sequence longer than max_context_len"
        self.req_to_token[row, start:start + n] = slots.to(self.req_to_token.device, torch.int32)

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots (int64) of positions start .. end-1 of `row`."""
        return self.req_to_token[row, start:end].to(torch.int64)


class TokenAllocator:
    """Free list of KV slots 1..num_slots (slot 0 is reserved for padding writes)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.num_slots + 1, dtype=torch.int64)
        self._pending: list[torch.Tensor] = []

    def available(self) -> int:
        return self._free.numel() + sum(t.numel() for t in self._pending)

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots (int64, CPU), or None if fewer than n are free; never partial."""
        if n > self._free.numel() and self._pending:
            self._free = torch.cat([self._free, *self._pending])
            self._pending = []
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            # Batched: concatenating once per alloc is cheaper than per free.
            self._pending.append(slots.to("cpu", torch.int64).flatten())


class KVPool:
    """Per-layer K and V buffers of shape (num_slots + 1, kv_heads, head_dim)."""

    def __init__(self, num_slots: int, num_layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_slots + 1, kv_heads, head_dim)
        self.k_buffer = [self._alloc(shape, dtype, device) for _ in range(num_layers)]
        self.v_buffer = [self._alloc(shape, dtype, device) for _ in range(num_layers)]

    @staticmethod
    def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Zeros on a GPU. On the CPU only slot 0 (the padding slot, which padded reads may touch) is
        zeroed: a slot is read only after a token's K/V are written there (the pool invariant), so the
        rest stays untouched and takes no resident memory until it is first used."""
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        buf = torch.empty(shape, dtype=dtype)
        buf[0].zero_()
        return buf

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (tokens, kv_heads, head_dim) into slots `loc` (tokens,)."""
        assert k.shape == v.shape and k.shape[0] == loc.shape[0], (k.shape, loc.shape)
        # index_copy_, not `buf[loc] = k`: index_put_ wakes the whole thread pool for a few rows,
        # which costs ~20x the copy itself when the pool sleeps between ops (OMP_WAIT_POLICY=PASSIVE).
        loc = loc.to(torch.int64)
        for buf, x in ((self.k_buffer[layer_id], k), (self.v_buffer[layer_id], v)):
            x = x.to(self.dtype)
            if buf.element_size() == 1:  # fp8: torch has no index_copy_ for it; the bytes are the same
                buf, x = buf.view(torch.uint8), x.view(torch.uint8)
            buf.index_copy_(0, loc, x)

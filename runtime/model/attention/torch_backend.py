"""Portable attention on PyTorch, reading K/V from the token-level pool.

Decode is cascade attention when requests share long prefixes (the radix cache gives them the
same KV slots): each shared prefix is read once (in place when its slots are consecutive) and
attended by all of its requests in one matmul, each request's own suffix is attended
separately, and the partial results are merged by their log-sum-exp. Exact up to float
rounding. Otherwise decode is padded SDPA over buckets of similar lengths. The plan is made
once per step, in init_forward_metadata, and shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixflow.runtime.model.attention.base import AttentionBackend
from radixflow.runtime.model.attention.decode_plan import CALL_COST_ROWS, pad_buckets, shared_prefix_segments
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode

# Extends up to this many tokens (radix-cache hits, agent branches) go to the CPU kernel, one query
# per token; longer prompts to SDPA, whose per-call cost is then small next to the work.
_KERNEL_MAX_EXTEND = 128


@dataclass
class _ExtendMeta:
    # Per extend request attended by SDPA: (first token in the batch, extend length, int64
    # (seq_len,) pool slots, bool (extend, seq_len) mask or None for plain causal).
    sdpa: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]
    # The CPU kernel's queries, one per token of the other extend requests: (positions in the
    # batch, or None for the first n tokens in order; int64 (n,) pool rows; int64 (n,) key counts).
    kernel: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
    decode: _DecodeMeta | None = None  # mixed batch: the plan of its decode tail


@dataclass
class _Bucket:
    """Requests whose own keys (from their suffix start to seq_len) are attended together,
    padded to the longest of them."""

    rows: torch.Tensor | None  # int64 (b,) batch positions; None (plain path): the whole batch, in order
    kv_indices: torch.Tensor  # int64 (b * length,) pool slots, row-major (b, length)
    length: int
    mask: torch.Tensor | None  # plain path: bool (b, 1, 1, length); None when nothing is padded
    bias: torch.Tensor | None  # cascade path: fp32 (Hkv * b, 1, length), 0 or -inf; None likewise
    head_rows: torch.Tensor | None  # cascade path: int64 (Hkv * b * length,), see _head_rows


@dataclass
class _Segment:
    """Keys shared by several requests: the same slots at the same positions of their rows."""

    rows: torch.Tensor  # int64 (M,) batch positions, M >= 2
    kv_indices: torch.Tensor  # int64 (P,) pool slots
    head_rows: torch.Tensor | None  # int64 (Hkv * P,) to gather (see _head_rows), or None and
    in_place: slice | None  # the slots are consecutive, this range of the pool: read in place


@dataclass
class _DecodeMeta:
    rows: torch.Tensor  # int64 (B,) ReqToTokenPool rows of the decoding requests
    seq_lens: torch.Tensor  # int64 (B,) their key counts, the new token included
    buckets: list[_Bucket]  # every request in exactly one
    segments: list[_Segment]  # empty: plain path (SDPA per bucket, suffixes start at 0)
    in_place: bool = False  # the compiled CPU kernel reads K/V in place; buckets are empty


class TorchAttnBackend(AttentionBackend):
    """Per-request SDPA for extend (causal over new tokens, full over the prefix); for decode,
    padded SDPA over buckets of similar lengths, or cascade attention over shared prefixes.

    K/V are gathered from the pool into persistent workspaces (fresh allocations of tens of MB
    per layer cost more in page faults than the copy itself), and decode attends with the
    query heads grouped per KV head, so GQA never materializes repeated K/V."""

    def __init__(self, kv_pool, req_to_token_pool, min_shared_prefix: int = 64,
                 use_cpu_kernel: bool | None = None, kernel_threads: int | None = None) -> None:
        super().__init__(kv_pool, req_to_token_pool)
        self.min_shared_prefix = min_shared_prefix
        self._ws: dict[str, torch.Tensor] = {}
        if use_cpu_kernel is None:  # an fp32 / fp16 / bf16 / fp8 pool on CPU and a C compiler at hand
            use_cpu_kernel = (kv_pool.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                                torch.float8_e5m2)
                              and kv_pool.k_buffer[0].device.type == "cpu")
            if use_cpu_kernel:
                from radixflow.kernels import cpu_ext
                use_cpu_kernel = cpu_ext.available()
        # Decode on the compiled kernel: K/V read in place, no gathered copy (kernels/cpu_ext.py).
        self.use_cpu_kernel = use_cpu_kernel
        self.kernel_threads = kernel_threads  # None: torch.get_num_threads()
        # DECODE batches of fewer rows are planned on their first attention call, not in
        # init_forward_metadata: set by runtime/model/fused_decode.py, whose fused step reads no plan
        # (a cascade plan of a few rows sharing a prefix costs ~0.5 ms a step).
        self.lazy_decode_rows = 0

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """A contiguous view of `shape` into a persistent buffer, grown by doubling."""
        n = 1
        for d in shape:
            n *= d
        buf = self._ws.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            cap = max(n, 2 * (0 if buf is None else buf.numel()), 1 << 20)
            buf = self._ws[name] = torch.empty(cap, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def _gather(self, layer_id: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows of the slots `idx` (n,), as views of the workspaces: (n, Hkv, D)."""
        kb, vb = self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id]
        shape = (idx.numel(), *kb.shape[1:])
        k = self._workspace("k", shape, kb.dtype, kb.device)
        v = self._workspace("v", shape, kb.dtype, kb.device)
        torch.index_select(kb, 0, idx, out=k)
        torch.index_select(vb, 0, idx, out=v)
        return k, v

    def _head_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of the pool viewed as (slots * Hkv, D) holding `slots` (n,), head-major (Hkv * n,)."""
        hkv = self.kv_pool.kv_heads
        return (slots[None, :] * hkv + torch.arange(hkv, device=slots.device)[:, None]).view(-1)

    def _gather_heads(self, layer_id: int, head_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `head_rows` (from _head_rows of n slots), fp32, head-major (Hkv, n, D): one
        gather, laid out so that batched matmuls need no copy."""
        kb, vb = self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id]
        hkv, d = kb.shape[1:]
        shape = (hkv, head_rows.numel() // hkv, d)
        out = []
        for name, buf in (("kh", kb), ("vh", vb)):
            ws = self._workspace(name, shape, torch.float32, kb.device)
            if buf.dtype == torch.float32:
                torch.index_select(buf.view(-1, d), 0, head_rows, out=ws.view(-1, d))
            else:
                ws.copy_(buf.view(-1, d).index_select(0, head_rows).view(shape))
            out.append(ws)
        return out[0], out[1]

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        r2t = self.req_to_token_pool.req_to_token
        rows = batch.req_pool_indices
        if batch.mode is ForwardMode.DECODE:
            lazy = batch.batch_size < self.lazy_decode_rows
            batch.attn_metadata = None if lazy else self._plan_decode(rows, batch.seq_lens, batch.seq_lens_cpu)
            return
        n_ext = batch.batch_size - batch.num_decode
        sdpa, k_pos, k_rows, k_lens, start = [], [], [], [], 0
        rows_cpu = rows[:n_ext].tolist()
        for i, (p, e) in enumerate(zip(batch.prefix_lens_cpu[:n_ext], batch.extend_lens_cpu[:n_ext])):
            if self.use_cpu_kernel and e <= _KERNEL_MAX_EXTEND:
                k_pos.extend(range(start, start + e))
                k_rows.extend([rows_cpu[i]] * e)
                k_lens.extend(range(p + 1, p + e + 1))
            elif p == 0:
                sdpa.append((start, e, r2t[rows[i], :e].to(torch.int64), None))
            else:
                q_pos = torch.arange(p, p + e, device=r2t.device)
                k_idx = torch.arange(p + e, device=r2t.device)
                sdpa.append((start, e, r2t[rows[i], :p + e].to(torch.int64), k_idx[None, :] <= q_pos[:, None]))
            start += e
        kernel = None
        if k_pos:
            dev = r2t.device
            pos = None if k_pos[-1] == len(k_pos) - 1 else torch.tensor(k_pos, dtype=torch.int64, device=dev)
            kernel = (pos, torch.tensor(k_rows, dtype=torch.int64, device=dev),
                      torch.tensor(k_lens, dtype=torch.int64, device=dev))
        decode = None
        if batch.num_decode:
            decode = self._plan_decode(rows[n_ext:], batch.seq_lens[n_ext:], batch.seq_lens_cpu[n_ext:])
        batch.attn_metadata = _ExtendMeta(sdpa, kernel, decode)

    def _plan_decode(self, rows: torch.Tensor, seq_lens: torch.Tensor, lens: list[int]) -> _DecodeMeta:
        """Cascade when shared prefixes save more gathered rows than the extra calls cost; else
        the in-place kernel when there is one, else padded buckets."""
        r2t = self.req_to_token_pool.req_to_token
        # A shared prefix starts at position 0: requests whose first slots all differ share none
        # (a batch of unrelated prompts skips the search below, every step).
        firsts = r2t[rows, 0].tolist()
        if self.use_cpu_kernel and len(set(firsts)) == len(firsts):
            return _DecodeMeta(rows, seq_lens, [], [], in_place=True)
        idx = r2t[rows, :max(lens)].to(torch.int64)
        plain, plain_cost = pad_buckets(lens)
        if len(lens) > 1:
            segs, starts = shared_prefix_segments(idx, lens, self.min_shared_prefix)
            if segs:
                suffix, suffix_cost = pad_buckets([n - s for n, s in zip(lens, starts)])
                cost = suffix_cost + sum(end - start + CALL_COST_ROWS for _, start, end in segs)
                if cost < plain_cost:
                    segments = [seg for r, start, end in segs
                                for seg in self._segments(self._index(r, idx.device), idx[r[0], start:end])]
                    return _DecodeMeta(rows, seq_lens, self._buckets(idx, lens, starts, suffix, True), segments)
        if self.use_cpu_kernel:
            return _DecodeMeta(rows, seq_lens, [], [], in_place=True)
        return _DecodeMeta(rows, seq_lens, self._buckets(idx, lens, [0] * len(lens), plain, False), [])

    def _segments(self, rows: torch.Tensor, slots: torch.Tensor) -> list[_Segment]:
        """One gathered segment, or (fp32 pool) one per run of consecutive slots when every run
        is worth an attention call of its own: the radix cache stores a prefill's tokens in
        consecutive slots, and reading them in place skips the copy."""
        if self.kv_pool.dtype == torch.float32:
            cuts = [0, *((slots[1:] - slots[:-1] != 1).nonzero().view(-1) + 1).tolist(), slots.numel()]
            if len(cuts) == 2 or min(b - a for a, b in zip(cuts, cuts[1:])) >= CALL_COST_ROWS:
                first = slots[cuts[:-1]].tolist()
                return [_Segment(rows, slots[a:b], None, slice(f, f + b - a))
                        for f, a, b in zip(first, cuts, cuts[1:])]
        return [_Segment(rows, slots, self._head_rows(slots), None)]

    @staticmethod
    def _index(rows: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def _buckets(self, idx: torch.Tensor, lens: list[int], starts: list[int],
                 groups: list[list[int]], cascade: bool) -> list[_Bucket]:
        dev, hkv = idx.device, self.kv_pool.kv_heads
        out = []
        for g in map(sorted, groups):
            rows = self._index(g, dev)
            start = self._index([starts[i] for i in g], dev)
            n = self._index([lens[i] - starts[i] for i in g], dev)
            length = max(lens[i] - starts[i] for i in g)
            pos = torch.arange(length, device=dev)
            valid = pos[None, :] < n[:, None]  # (b, length)
            cols = (start[:, None] + pos[None, :]).clamp_(max=idx.shape[1] - 1)
            kv = torch.where(valid, idx[rows[:, None], cols], 0).view(-1)
            mask = bias = head_rows = None
            if cascade:
                head_rows = self._head_rows(kv)
            if not bool(valid.all()):
                if cascade:
                    bias = torch.zeros(valid.shape, device=dev).masked_fill_(~valid, float("-inf"))
                    bias = bias[None].expand(hkv, -1, -1).reshape(-1, 1, length)
                else:
                    mask = valid.view(len(g), 1, 1, length)
            whole = not cascade and g == list(range(len(lens)))
            out.append(_Bucket(None if whole else rows, kv, length, mask, bias, head_rows))
        return out

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
        meta: _ExtendMeta = batch.attn_metadata
        T, H, D = q.shape
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        if meta.decode is not None:  # mixed batch: the last num_decode tokens are decode queries
            n = batch.num_decode
            out[T - n:] = self._decode(q[T - n:], layer_id, meta.decode, scale).view(n, H, D)
        if meta.kernel is not None:
            from radixflow.kernels import cpu_ext

            pos, rows, lens = meta.kernel
            qk = q[:rows.numel()] if pos is None else q.index_select(0, pos)
            o = cpu_ext.decode_attention(qk, self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id],
                                         self.req_to_token_pool.req_to_token, rows, lens, scale,
                                         self.kernel_threads)
            if pos is None:
                out[:rows.numel()] = o
            else:
                out.index_copy_(0, pos, o)
        for start, e, kv_indices, mask in meta.sdpa:
            qi = q[start:start + e].transpose(0, 1)  # (H, e, D)
            k, v = self._gather(layer_id, kv_indices)
            ki = k.transpose(0, 1).to(q.dtype)  # (Hkv, L, D)
            vi = v.transpose(0, 1).to(q.dtype)
            oi = F.scaled_dot_product_attention(
                qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=ki.shape[0] != H)
            out[start:start + e] = oi[0].transpose(0, 1)
        return out.view(T, H * D)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
        if batch.attn_metadata is None:  # deferred (lazy_decode_rows): planned on the first layer
            batch.attn_metadata = self._plan_decode(batch.req_pool_indices, batch.seq_lens, batch.seq_lens_cpu)
        return self._decode(q, layer_id, batch.attn_metadata, scale)

    def _decode(self, q: torch.Tensor, layer_id: int, meta: _DecodeMeta, scale: float) -> torch.Tensor:
        """q (B, H, D), one query per request of `meta` -> (B, H * D)."""
        if meta.in_place:
            from radixflow.kernels import cpu_ext

            out = cpu_ext.decode_attention(q, self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id],
                                           self.req_to_token_pool.req_to_token, meta.rows, meta.seq_lens, scale,
                                           self.kernel_threads)
            return out.view(q.shape[0], -1).to(q.dtype)
        if meta.segments:
            return self._cascade_decode(q, layer_id, meta, scale)
        B, H, D = q.shape
        Hkv = self.kv_pool.kv_heads
        qg = q.view(B, Hkv, H // Hkv, D)  # q head h reads kv head h // (H // Hkv)
        out = None if meta.buckets[0].rows is None else torch.empty_like(qg)
        for bk in meta.buckets:
            b = B if bk.rows is None else bk.rows.numel()
            k, v = self._gather(layer_id, bk.kv_indices)
            k = k.view(b, bk.length, Hkv, D).transpose(1, 2).to(q.dtype)  # (b, Hkv, L, D)
            v = v.view(b, bk.length, Hkv, D).transpose(1, 2).to(q.dtype)
            qb = qg if bk.rows is None else qg.index_select(0, bk.rows)
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=bk.mask, scale=scale)
            if out is None:
                return o.reshape(B, H * D)
            out.index_copy_(0, bk.rows, o)
        return out.view(B, H * D)

    def _cascade_decode(self, q: torch.Tensor, layer_id: int, meta: _DecodeMeta,
                        scale: float) -> torch.Tensor:
        B, H, D = q.shape  # (B, H, D)
        Hkv = self.kv_pool.kv_heads
        G = H // Hkv
        assert G * Hkv == H and D == self.kv_pool.head_dim, (q.shape, Hkv)
        # Scaled fp32 queries, head-major: (Hkv, B, G, D).
        qh = (q.to(torch.float32) * scale).view(B, Hkv, G, D).transpose(0, 1).contiguous()
        # Suffixes: every request has one (its last key at least); they start the running
        # (out, lse) of each request, to which each shared segment is merged.
        acc_o = torch.empty_like(qh)
        acc_lse = torch.empty((Hkv, B, G, 1), dtype=torch.float32, device=q.device)
        for bk in meta.buckets:
            b = bk.rows.numel()
            k, v = self._gather_heads(layer_id, bk.head_rows)  # (Hkv, b * L, D)
            o, lse = _attend(qh.index_select(1, bk.rows).view(Hkv * b, G, D),
                             k.view(Hkv * b, bk.length, D), v.view(Hkv * b, bk.length, D), bk.bias)
            acc_o.index_copy_(1, bk.rows, o.view(Hkv, b, G, D))
            acc_lse.index_copy_(1, bk.rows, lse.view(Hkv, b, G, 1))
        # Shared segments: all their requests' queries against the keys gathered once.
        for seg in meta.segments:
            m = seg.rows.numel()
            if seg.in_place is not None:  # views of the pool, (Hkv, P, D)
                k = self.kv_pool.k_buffer[layer_id][seg.in_place].transpose(0, 1)
                v = self.kv_pool.v_buffer[layer_id][seg.in_place].transpose(0, 1)
            else:
                k, v = self._gather_heads(layer_id, seg.head_rows)  # (Hkv, P, D)
            o, lse = _attend(qh.index_select(1, seg.rows).view(Hkv, m * G, D), k, v, None)
            o1, lse1 = acc_o.index_select(1, seg.rows), acc_lse.index_select(1, seg.rows)
            o2, lse2 = o.view(Hkv, m, G, D), lse.view(Hkv, m, G, 1)
            mx = torch.maximum(lse1, lse2)
            w1, w2 = (lse1 - mx).exp_(), (lse2 - mx).exp_()
            z = w1 + w2
            acc_o.index_copy_(1, seg.rows, (o1 * w1).add_(o2 * w2).div_(z))
            acc_lse.index_copy_(1, seg.rows, z.log_().add_(mx))
        return acc_o.transpose(0, 1).reshape(B, H * D).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, fp32: q (N, R, D) pre-scaled, k/v (N, L, D),
    bias broadcastable to (N, R, L) (0 or -inf; every row keeps a key) -> out (N, R, D),
    lse (N, R, 1)."""
    kt = k.transpose(1, 2)
    s = torch.bmm(q, kt) if bias is None else torch.baddbmm(bias, q, kt)  # (N, R, L)
    mx = s.amax(-1, keepdim=True)
    p = torch.softmax(s, -1)  # one fused pass; its largest entry is exp(mx - lse), in [1/L, 1]
    lse = p.amax(-1, keepdim=True).log_().neg_().add_(mx)
    return torch.bmm(p, v), lse

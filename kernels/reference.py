"""Pure-PyTorch references for every Triton kernel in this package.

Each function here states the exact semantics its kernel must match; the tests compare the
two. They need no Triton, so CPU code may call them directly. All math runs in float32 and
results are cast to the input dtype once at the end (the kernels do the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _request_keys(buf: torch.Tensor, req_to_token: torch.Tensor, row: int, seq_len: int,
                  group: int) -> torch.Tensor:
    """(seq_len, Hq, D) float32 keys (or values) of one request, kv heads repeated `group` times."""
    slots = req_to_token[row, :seq_len].long()
    return buf[slots].float().repeat_interleave(group, dim=1)


def extend_attention_ref(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                         extend_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each request's new tokens over its prefix and themselves.

    q (T, Hq, D); k_buffer/v_buffer (num_slots + 1, Hkv, D); req_to_token int32 (rows, max_ctx).
    Request i's keys are pool rows req_to_token[req_pool_indices[i], :prefix_i + extend_i];
    its new token j (row extend_start_loc[i] + j of q) attends to keys 0 .. prefix_i + j.
    Query head h reads kv head h // (Hq // Hkv). Returns (T, Hq, D) in q's dtype.
    """
    T, Hq, D = q.shape
    group = Hq // k_buffer.shape[1]
    out = torch.zeros_like(q)
    for row, prefix, ext, start in zip(req_pool_indices.tolist(), prefix_lens.tolist(),
                                       extend_lens.tolist(), extend_start_loc.tolist(), strict=True):
        seq = prefix + ext
        k = _request_keys(k_buffer, req_to_token, row, seq, group)  # (S, Hq, D)
        v = _request_keys(v_buffer, req_to_token, row, seq, group)
        qi = q[start:start + ext].float()  # (E, Hq, D)
        scores = torch.einsum("ehd,shd->hes", qi, k) * scale  # (Hq, E, S)
        allowed = torch.arange(seq)[None, :] <= prefix + torch.arange(ext)[:, None]  # (E, S)
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out[start:start + ext] = torch.einsum("hes,shd->ehd", scores.softmax(-1), v).to(q.dtype)
    return out


def decode_attention_ref(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per request over all its keys.

    q (B, Hq, D); request i's keys are pool rows req_to_token[req_pool_indices[i], :seq_lens[i]]
    (seq_lens[i] >= 1). Query head h reads kv head h // (Hq // Hkv). Returns (B, Hq, D), q's dtype.
    """
    group = q.shape[1] // k_buffer.shape[1]
    out = torch.empty_like(q)
    for i, (row, seq) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist(), strict=True)):
        k = _request_keys(k_buffer, req_to_token, row, seq, group)  # (S, Hq, D)
        v = _request_keys(v_buffer, req_to_token, row, seq, group)
        p = (torch.einsum("hd,shd->hs", q[i].float(), k) * scale).softmax(-1)  # (Hq, S)
        out[i] = torch.einsum("hs,shd->hd", p, v).to(q.dtype)
    return out


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                 loc: torch.Tensor) -> None:
    """k_buffer[loc[t]] = k[t] and v_buffer[loc[t]] = v[t] (cast to the buffer dtype), in place."""
    k_buffer[loc.long()] = k.to(k_buffer.dtype)
    v_buffer[loc.long()] = v.to(v_buffer.dtype)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm of each row of x (T, H): weight * (x / sqrt(mean(x^2) + eps)).

    As in Hugging Face: normalized in float32, cast to x's dtype, then multiplied by weight
    (the product rounded once to x's dtype).
    """
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual (rounded to x's dtype); returns (rmsnorm_ref(r), r)."""
    r = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_ref(r, weight, eps), r


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama (rotate-half, non-interleaved) rotary embedding of q (T, Hq, D) and k (T, Hkv, D).

    With c = cos[positions], s = sin[positions] (each (T, D/2)), x1 = x[..., :D/2],
    x2 = x[..., D/2:]: out = cat(x1 * c - x2 * s, x2 * c + x1 * s), computed in float32 and
    cast to x's dtype. Returns new tensors.
    """
    c = cos[positions.long()].float()[:, None, :]  # (T, 1, D/2)
    s = sin[positions.long()].float()[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rot(q), rot(k)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x (T, 2I) -> silu(x[:, :I]) * x[:, I:] (T, I), in float32, cast to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32, K % 32 == 0 -> (q (M, K) int16-valued fp64, dx (M, K / 32) fp32): per block
    of 32, dx = amax / 32639 and q = round-half-even(x * (1 / dx)), 0 where amax == 0 (cpu_qmm.c)."""
    M, K = x.shape
    g = x.float().view(M, K // 32, 32)
    dx = g.abs().amax(-1) / 32639
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    return torch.round(g * inv[..., None]).clamp_(-32639, 32639).view(M, K).double(), dx


def qlinear_ref(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The integer path of cpu_quant.linear: W = d * q + m per group of gs = 32 or 16 weights
    ((N, K) quants, (N, K / gs) scales and mins), x quantized by quantize_rows_ref per block of
    32; y[i, n] = sum_g d[n, g] dx[i, g] (q_w . q_x)_g + sum_g m[n, g] dx[i, g] sum(q_x)_g, in
    fp64. Returns fp32 (M, N)."""
    M, K = x.shape
    N, S = d.shape
    gs = K // S
    qx, dx = quantize_rows_ref(x)
    dx = dx.double().repeat_interleave(32 // gs, dim=1)  # (M, S)
    dots = torch.einsum("mbk,nbk->mnb", qx.view(M, S, gs), q.double().view(N, S, gs))
    y = (dots * d.double()[None] * dx[:, None]).sum(-1)
    if m is not None:
        y += (qx.view(M, S, gs).sum(-1) * dx) @ m.double().T
    return y.float()

"""Quantized CPU matmuls and embeddings on weights kept in 4-, 6- or 8-bit blocks of 32 (C kernels).

  QuantWeight                     an (N, K) weight as packed quants + per-block fp16 scales d, mins m
  pack(kind, q, d, m)             build one from per-element quants (GGUF blocks, see loading/gguf_quant.py)
  quantize(w, "int8" | "int4")    weight-only quantization of an fp32/bf16/fp16 weight, per group of 32
  dequantize(qw) -> (N, K) fp32   the exact values the kernels multiply by (PyTorch)
  linear(x, qw, bias) -> x @ W^T  the quantized matmul (cpu_qmm.c): integer block dot products on
                                  16-bit-quantized activations (M < INT_MAX_M rows: by default
                                  always on AVX-512 VNNI, below 128 on AVX2), else an fp32 tile on
                                  panels of W dequantized on the fly (no fp32 copy kept)
  embedding(qw, ids) -> rows      rows of W dequantized on lookup

Value of element (n, k), block b = k // 32: d[n, b] * q[n, k] + m[n, b] with fp16 d and m; kind 4
holds q in [0, 15], kind 8 int8 q in [-127, 127], kind 6 q in [-32, 31] (GGUF Q6_K, 6 bits kept in
7 per weight) with a scale and min per half block, b = k // 16. Rows are kept in groups of 16,
interleaved four weights at a time, so one SIMD instruction works on 16 rows (layout: cpu_qmm.c).

The library is built without -march=native: cpu_qmm.c is compiled once per instruction set
(portable, AVX2 + FMA, AVX-512 + VNNI) and cpu_quant.c picks one at run time from the CPU's
flags, so a build cached on one x86-64 machine runs on any other sharing the cache folder.
`set_level` forces a lower level (tests run every level the CPU has). It runs on cpu_ext's
thread pool. Without a C compiler or with RADIXFLOW_DISABLE_CPU_EXT=1, `available()` is False.
References: reference.qlinear_ref (exact integer semantics of the small-M path).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from radixflow.kernels import cpu_ext
from radixflow.paths import cache_dir

logger = logging.getLogger(__name__)

QK = 32  # weights per block
# Rows below this use the integer path, from this many on the fp32 panel path; -1: the level's
# own crossover (cpu_quant.c): always the integer path on AVX-512 VNNI (single-threaded it costs
# 1.2-3.4x less CPU time than the panel path at every M from 1 to 1,024), from 128 rows on the
# panel path on AVX2 and portable C (2 threads on an AMD AVX2 VM, M = 256: 68-72 GMAC/s on panels,
# 52-61 on integers; pmaddubsw multiplies 16-bit activations in two halves). int_max_m=0 keeps
# exact fp32 arithmetic on W's values at every M.
INT_MAX_M = -1
LEVELS = ("portable", "avx2", "avx512")
_DIR = Path(__file__).parent
_QMM, _DISPATCH, _HEADER = _DIR / "cpu_qmm.c", _DIR / "cpu_quant.c", _DIR / "cpu_qtile.h"
_BASE = ["-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd", "-std=gnu11"]
_ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"],
              "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                         "-mavx512vnni"]}
_VERSION = b"6"  # bump when the flags or the build steps change
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _compile(cc: str, args: list[str], out: Path) -> bool:
    res = subprocess.run([cc, *args, "-o", str(out)], capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        logger.info("%s %s failed: %s", cc, " ".join(args), res.stderr.strip()[:300])
    return res.returncode == 0


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, defines = [], []
        for isa in ("portable", *(_ISA_FLAGS if x86 else ())):
            obj = Path(tmp) / f"qmm_{isa}.o"
            if _compile(cc, [*_BASE, *_ISA_FLAGS.get(isa, []), f"-DQM_SUFFIX={isa}", "-c", str(_QMM)], obj):
                objs.append(str(obj))
                defines.append(f"-DQM_HAVE_{isa.upper()}")
            elif isa == "portable":
                raise RuntimeError(f"{cc} could not compile {_QMM.name}")
        tmp_so = Path(tmp) / out.name
        if not _compile(cc, [*_BASE, *defines, "-shared", str(_DISPATCH), *objs, "-lm"], tmp_so):
            raise RuntimeError(f"{cc} could not link the quantized kernels")
        os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("RADIXFLOW_DISABLE_CPU_EXT") == "1":
            return None
        # No CPU flags in the key: the library is the same for every CPU of an architecture.
        src = _QMM.read_bytes() + _DISPATCH.read_bytes() + _HEADER.read_bytes() + platform.machine().encode() + _VERSION
        path = cache_dir() / "ext" / f"cpu_quant-{hashlib.sha256(src).hexdigest()[:16]}.so"
        try:
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            logger.warning("quantized CPU kernels unavailable: %s", e)
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.qm_linear.argtypes = [i32, p, i64, i64, p, p, p, p, i64, i64, p, i64, i32, i32]
        lib.qm_linear.restype = i32
        lib.qm_dequant_rows.argtypes = [i32, p, p, p, i64, p, i64, p]
        lib.qm_dequant_rows.restype = None
        lib.qm_set_level.argtypes = [i32]
        lib.qm_set_level.restype = i32
        lib.qm_supported.restype = i32
        lib.qm_set_pool.argtypes = [p]
        lib.qm_set_pool.restype = None
        lib.qm_set_pool(cpu_ext.parallel_fn_address())  # None (one thread) without cpu_ext
        want = os.environ.get("RADIXFLOW_QUANT_ISA")
        lib.qm_set_level(LEVELS.index(want) if want in LEVELS else -1)
        _lib = lib
        return lib


def _need() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError("the quantized CPU kernels are not available")
    return lib


def available() -> bool:
    """Whether the quantized kernels can be used (builds them on the first call)."""
    return _load() is not None


def linear_fn_address() -> int | None:
    """The address of cpu_quant.c's qm_linear (C callers such as cpu_decode_step.c call the
    quantized matmul through it), or None when the kernels are not available."""
    lib = _load()
    return None if lib is None else ctypes.cast(lib.qm_linear, ctypes.c_void_p).value


def supported_level() -> str:
    """The best instruction-set level of this CPU and build: 'portable', 'avx2' or 'avx512'."""
    return LEVELS[_need().qm_supported()]


def set_level(name: str | None) -> str:
    """Use level `name` (capped at the supported one; None: the best). Returns the level in use."""
    return LEVELS[_need().qm_set_level(-1 if name is None else LEVELS.index(name))]


@dataclass(frozen=True)
class QuantWeight:
    """An (N, K) weight in cpu_qmm.c's layout: rows in groups of 16 (G = ceil(N / 16), padding rows
    zero), one tile per (group, block of 32): qs uint8 (G, K / 32, 256 | 384 | 512) for kind 4 | 6 |
    8; d and m fp16 (G, K / 32, 16), kind 6 (G, K / 32, 2 * 16) (halves, then rows), m None meaning
    zero mins. Everything contiguous on the CPU."""

    kind: int
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


NR = 16  # rows per group
_RANGES = {4: (0, 15), 6: (-32, 31), 8: (-127, 127)}  # kind 8: -128 would overflow the AVX2 sign trick
# kind 6: where the high 2 bits of weights 4j .. 4j + 3 sit in high vector j & 1 (cpu_qmm.c)
_HI_SHIFTS = (0, 0, 4, 4, 2, 2, 6, 6)


def scale_group(kind: int) -> int:
    """Weights per scale (and min) along K: 16 for kind 6 (Q6_K's sub-blocks), else 32."""
    return 16 if kind == 6 else QK


def _to_tiles(kind: int, q: torch.Tensor) -> torch.Tensor:
    """(G * 16, K) quants -> (G, nb, tile bytes): byte 4n + e of vector v holds weight 4v + e of
    the block for row n (kinds 4, 6: vectors v and v + 4 share bytes, low and high nibbles; kind
    6 then holds the high 2 bits of q + 32 in 2 more vectors)."""
    GN, K = q.shape
    G, nb = GN // NR, K // QK
    t = q.view(G, NR, nb, 8, 4).permute(0, 2, 3, 1, 4)  # (G, nb, j, n, e)
    if kind == 8:
        return t.to(torch.int8).contiguous().view(torch.uint8).view(G, nb, 512)
    t = (t + 32 if kind == 6 else t).to(torch.uint8)
    lo = t & 0x0F
    tiles = (lo[:, :, :4] | (lo[:, :, 4:] << 4)).reshape(G, nb, 256)
    if kind == 4:
        return tiles.contiguous()
    hi = [(t[:, :, j] >> 4) << _HI_SHIFTS[j] for j in range(8)]
    high = torch.stack([hi[u] | hi[u + 2] | hi[u + 4] | hi[u + 6] for u in (0, 1)], dim=2)
    return torch.cat([tiles, high.reshape(G, nb, 128)], dim=-1).contiguous()


def _group_rows(t: torch.Tensor, G: int, nb: int) -> torch.Tensor:
    """(N, nb * h) per-scale values (h = 2 halves for kind 6, else 1) -> (G, nb, h * 16) fp16,
    padding rows zero."""
    N, S = t.shape
    out = torch.zeros(G * NR, S, dtype=torch.float16)
    out[:N] = t
    return out.view(G, NR, nb, S // nb).permute(0, 2, 3, 1).reshape(G, nb, S // nb * NR).contiguous()


def pack(kind: int, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> QuantWeight:
    """q (N, K) integer quants ([0, 15] for kind 4, [-32, 31] for kind 6, [-127, 127] for kind 8),
    d and m (N, K / scale_group(kind)) scales and mins (m None: zero), rounded to fp16 ->
    QuantWeight. Raises ValueError on bad shapes or ranges."""
    if kind not in _RANGES or q.dim() != 2 or q.shape[1] % QK:
        raise ValueError(f"kind must be 4, 6 or 8 and q (N, K) with K % 32 == 0, got {kind}, {tuple(q.shape)}")
    N, K = q.shape
    ns = K // scale_group(kind)
    for name, t in (("d", d), ("m", m)):
        if t is not None and tuple(t.shape) != (N, ns):
            raise ValueError(f"{name} must be ({N}, {ns}), got {tuple(t.shape)}")
    lo, hi = _RANGES[kind]
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"kind {kind} quants must lie in [{lo}, {hi}]")
    G, nb = (N + NR - 1) // NR, K // QK
    qp = torch.zeros(G * NR, K, dtype=torch.int16)
    qp[:N] = q
    return QuantWeight(kind, _to_tiles(kind, qp), _group_rows(d, G, nb),
                       None if m is None else _group_rows(m, G, nb), (N, K))


def quantize(w: torch.Tensor, scheme: str) -> QuantWeight:
    """Weight-only quantization of w (N, K), K % 32 == 0, per group of 32: 'int8' symmetric
    (d = amax / 127), 'int4' asymmetric (d = (max - min) / 15, m = min), rounding to nearest
    against the fp16-rounded d and m the kernels read."""
    w = w.detach().float().cpu()
    N, K = w.shape
    g = w.view(N, K // QK, QK)
    if scheme == "int8":
        d = (g.abs().amax(-1) / 127).half().float()
        q = torch.round(g / torch.where(d > 0, d, 1)[..., None]).clamp_(-127, 127)
        return pack(8, q.view(N, K).to(torch.int8), d, None)
    if scheme == "int4":  # min rounded down and step up in fp16, so [m, m + 15 d] covers the group
        lo = _half_toward(g.amin(-1), -1)
        d = _half_toward((g.amax(-1) - lo) / 15, 1)
        q = torch.round((g - lo[..., None]) / torch.where(d > 0, d, 1)[..., None]).clamp_(0, 15)
        return pack(4, q.view(N, K).to(torch.uint8), d, lo)
    raise ValueError(f"quantization scheme must be 'int8' or 'int4', got {scheme!r}")


def _half_toward(t: torch.Tensor, direction: int) -> torch.Tensor:
    """t (fp32) rounded to fp16, then moved one fp16 step toward +inf (direction 1) or -inf (-1)
    where rounding went the other way; returned as fp32."""
    h = t.half()
    off = h.float() < t if direction > 0 else h.float() > t
    h = torch.where(off, torch.nextafter(h, torch.full_like(h, direction * float("inf"))), h)
    return h.float()


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """(G, nb, h * 16) per-scale values -> (N, nb * h) fp32."""
    G, nb, S = t.shape
    return t.view(G, nb, S // NR, NR).permute(0, 3, 1, 2).reshape(G * NR, nb * S // NR)[:N].float()


def unpack(qw: QuantWeight) -> torch.Tensor:
    """The integer quants (N, K) (int8) of a QuantWeight."""
    N, K = qw.shape
    G, nb = qw.qs.shape[:2]
    if qw.kind == 8:
        t = qw.qs.view(torch.int8).view(G, nb, 8, NR, 4)
    else:
        v = qw.qs[..., :256].reshape(G, nb, 4, NR, 4)
        t = torch.cat([v & 0x0F, v >> 4], dim=2)
        if qw.kind == 6:
            h = qw.qs[..., 256:].reshape(G, nb, 2, NR, 4)
            hi = torch.stack([(h[:, :, j & 1] >> _HI_SHIFTS[j]) & 3 for j in range(8)], dim=2)
            t = (t | (hi << 4)).to(torch.int16) - 32
        t = t.to(torch.int8)
    return t.permute(0, 3, 1, 2, 4).reshape(G * NR, K)[:N].contiguous()


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The fp32 (N, K) values of a QuantWeight (PyTorch; for references and the none path)."""
    N, K = qw.shape
    gs = scale_group(qw.kind)
    out = unpack(qw).view(N, K // gs, gs).float() * _rows(qw.d, N)[..., None]
    if qw.m is not None:
        out += _rows(qw.m, N)[..., None]
    return out.view(N, K)


def linear(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None,
           int_max_m: int | None = None) -> torch.Tensor:
    """x (..., K) fp32 CPU @ W^T (+ bias (N,)) -> a new (..., N) fp32 tensor: with int16-quantized
    activations (the integer path) when x has fewer than `int_max_m` rows (default INT_MAX_M, read
    at each call; -1: the instruction set's crossover), else exact fp32 on W's values. Rows of x
    may be strided if each is contiguous. Raises ValueError on mismatched shapes or dtypes."""
    lib = _need()
    int_max_m = INT_MAX_M if int_max_m is None else int_max_m
    N, K = qw.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != K:
        raise ValueError(f"x must be an fp32 CPU tensor (..., {K}), got {x.dtype} {tuple(x.shape)} on {x.device}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (N,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous fp32 ({N},) tensor")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < K):
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N)
    if M and lib.qm_linear(qw.kind, x2.data_ptr(), x2.stride(0) if M > 1 else K, M, qw.qs.data_ptr(),
                           qw.d.data_ptr(), None if qw.m is None else qw.m.data_ptr(),
                           None if bias is None else bias.data_ptr(), N, K, out.data_ptr(), N, int_max_m,
                           torch.get_num_threads()):
        raise MemoryError("quantized matmul: scratch allocation failed")
    return out.view(*x.shape[:-1], N)


def embedding(qw: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape, int) of W dequantized: (*ids.shape, K) fp32. IndexError if out of range."""
    lib = _need()
    N, K = qw.shape
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= N):
        raise IndexError(f"embedding ids must lie in [0, {N})")
    out = torch.empty(flat.numel(), K)
    lib.qm_dequant_rows(qw.kind, qw.qs.data_ptr(), qw.d.data_ptr(), None if qw.m is None else qw.m.data_ptr(),
                        K, flat.data_ptr(), flat.numel(), out.data_ptr())
    return out.view(*ids.shape, K)


@dataclass(frozen=True)
class QuantBlocks:
    """A weight before packing: q (N, K) int8 quants, d and m (N, K / scale_group(kind)) fp32 (m
    None: zero), kind 4 (q in [0, 15]), 6 (q in [-32, 31], a scale per 16) or 8 (q in [-127, 127]).
    Loaders produce it; `concat` fuses shards."""

    kind: int
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def pack(self) -> QuantWeight:
        return pack(self.kind, self.q, self.d, self.m)


def concat(parts: list[QuantBlocks]) -> QuantBlocks:
    """Stack weights along N (fused q/k/v, gate/up) in the smallest kind that holds every part
    unchanged in value: kind 4 < 6 < 8, a part's scales repeated per half when it joins kind 6.
    Only a kind-6 part joining 8-bit quants beyond [-32, 31] is changed: requantized to int8."""
    kinds = {p.kind for p in parts}
    kind = max(kinds)
    if kinds >= {6, 8}:
        lo, hi = _RANGES[6]
        if all(p.kind != 8 or (int(p.q.min()) >= lo and int(p.q.max()) <= hi) for p in parts):
            kind = 6
        else:
            parts = [blocks_of(quantize(dequantize(p.pack()), "int8")) if p.kind == 6 else p for p in parts]
    if kind == 6:
        parts = [p if p.kind == 6 else QuantBlocks(p.kind, p.q, p.d.repeat_interleave(2, 1),
                                                   None if p.m is None else p.m.repeat_interleave(2, 1))
                 for p in parts]
    ms = [p.m if p.m is not None else torch.zeros_like(p.d) for p in parts]
    m = None if all(p.m is None for p in parts) else torch.cat(ms)
    return QuantBlocks(kind, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m)


def blocks_of(qw: QuantWeight) -> QuantBlocks:
    """The QuantBlocks a QuantWeight was packed from (scales and mins as the fp16 values kept)."""
    N = qw.shape[0]
    return QuantBlocks(qw.kind, unpack(qw), _rows(qw.d, N), None if qw.m is None else _rows(qw.m, N))

"""CPU kernels in C, compiled on first use with the system's C compiler and loaded with ctypes.

  decode_attention(q, k_buffer, v_buffer, req_to_token, rows, seq_lens, scale) -> out
      paged decode attention, fp32 math on an fp32, fp16 or bf16 pool: K/V read in place through
      req_to_token (no gathered copy),
      grouped-query heads sharing each row read (source: cpu_decode_attention.c).
  rms_norm(x, weight, eps, residual=None) -> out | (out, x + residual)
      RMSNorm with the residual add fused in, one pass per row (source: cpu_rmsnorm.c).
  pack_weight(weight) -> packed;  linear_packed(x, packed, out_features, bias=None) -> x @ W^T (+ b)
      fp32 linear on a weight packed once into 16-column panels (source: cpu_gemm.c): about 1.8x
      OpenBLAS at the 1-64 rows of decoding, on par at prefill sizes.
  rope_(x, positions, cos_cache, sin_cache) -> x;  silu_mul(x) -> silu(x[:, :I]) * x[:, I:]
      the decoder layer's elementwise steps, one pass each (source: cpu_elementwise.c).
  decode_step_f32: every decoder layer of a quantized decode step in one call (cpu_decode_step.c;
      its wrapper is kernels/cpu_decode_step.py).

The library is built once per version of the sources and instruction set (-O3, with -mavx2 -mfma
-mf16c on x86-64 CPUs that have them, never -march=native: a build is shared by every CPU with the
same flags; about a second) into the radixflow cache folder. The kernels split their work on their
own thread pool (cpu_pool.c: workers that spin between the calls of a forward pass instead of
OpenMP's sleep and wake-up), with torch.get_num_threads() threads. Without a compiler, or with
RADIXFLOW_DISABLE_CPU_EXT=1, `available()` is False and callers keep their PyTorch path.
Reference: reference.decode_attention_ref.
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
from pathlib import Path

import torch

from radixflow.paths import cache_dir

logger = logging.getLogger(__name__)

_SRCS = [Path(__file__).with_name(n) for n in ("cpu_decode_attention.c", "cpu_rmsnorm.c", "cpu_gemm.c",
                                                "cpu_elementwise.c", "cpu_pool.c", "cpu_decode_step.c")]
# Included by the sources; part of the build's hash.
_HEADERS = [Path(__file__).with_name(n) for n in ("cpu_math.h", "cpu_attn_body.h")]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_FLAGS_VERSION = b"4"  # bump when the compiler flags change


_AVX2 = ("avx2", "fma", "f16c")  # what the kernels' vector paths use (#if __AVX2__ && __FMA__, __F16C__)


def _isa_flags() -> list[str]:
    """Instruction-set flags for this CPU: -mavx2 -mfma -mf16c on an x86-64 that has all three,
    none elsewhere. Never -march=native: the kernels need nothing beyond AVX2, and a native build
    on an AVX-512 machine emits AVX-512 code (for the auto-vectorized loops) that fails on AVX2
    CPUs and that valgrind cannot run."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
            flags = set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [f"-m{f}" for f in _AVX2] if x86 and flags.issuperset(_AVX2) else []


def _cpu_key() -> str:
    """The build's key: the architecture and the ISA flags (every AVX2 machine shares one build)."""
    return f"{platform.machine()}|{' '.join(_isa_flags())}"


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        # Reassociation lets the dot products vectorize; no -ffast-math (the kernel relies on -inf).
        cmd = [cc, "-O3", *_isa_flags(), "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
               "-fno-trapping-math", "-shared", "-fPIC", *map(str, _SRCS), "-o", str(tmp_so), "-lm", "-pthread"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[:500]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("RADIXFLOW_DISABLE_CPU_EXT") == "1":
            return None
        sources = b"".join(src.read_bytes() for src in (*_SRCS, *_HEADERS))
        digest = hashlib.sha256(sources + _cpu_key().encode() + _FLAGS_VERSION).hexdigest()[:16]
        path = cache_dir() / "ext" / f"cpu_kernels-{digest}.so"
        try:
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            logger.warning("CPU kernels unavailable, using the PyTorch path: %s", e)
            return None
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.decode_attention_f32.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, f32, p, i32, i32]
        lib.decode_attention_f32.restype = i32
        lib.rmsnorm_f32.argtypes = [p, p, p, i64, i64, f32, p, p]
        lib.rmsnorm_f32.restype = None
        lib.gemm_pack_f32.argtypes = [p, i64, i64, p, i32]
        lib.gemm_pack_f32.restype = None
        lib.gemm_packed_f32.argtypes = [p, i64, p, p, i64, i64, i64, p, i64, i32]
        lib.gemm_packed_f32.restype = None
        lib.rope_f32.argtypes = [p, i64, i64, i64, i64, p, p, p, i64, i64, i32]
        lib.rope_f32.restype = i32
        lib.silu_mul_f32.argtypes = [p, i64, i64, i64, p, i32]
        lib.silu_mul_f32.restype = None
        # (model, x, residual, M, pos, out_loc, r2t, r2t_stride, r2t_rows, rows, seq_lens, int_max_m,
        #  threads, attn_threads, timers): kernels/cpu_decode_step.py
        lib.decode_step_f32.argtypes = [p, p, p, i64, p, p, p, i64, i64, p, p, i32, i32, i32, p]
        lib.decode_step_f32.restype = i32
        _lib = lib
        return lib


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on the first call)."""
    return _load() is not None


def library() -> ctypes.CDLL | None:
    """The loaded library (building it on the first call), or None when it is not available:
    for wrappers of its functions in other modules (kernels/cpu_decode_step.py)."""
    return _load()


def parallel_fn_address() -> int | None:
    """The address of cpu_pool.c's rf_parallel (other C libraries run their tasks on this one
    pool), or None when the kernels are not available."""
    lib = _load()
    return None if lib is None else ctypes.cast(lib.rf_parallel, ctypes.c_void_p).value


def decode_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     req_to_token: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, threads: int | None = None) -> torch.Tensor:
    """q (B, Hq, D) fp32 -> (B, Hq, D) fp32: request b attends to pool rows
    req_to_token[rows[b], :seq_lens[b]] (seq_lens >= 1); query head h reads kv head h // (Hq // Hkv).
    k/v_buffer (slots, Hkv, D) contiguous CPU, both fp32, fp16, bf16, float8_e4m3fn or float8_e5m2
    (read in place, math in fp32); req_to_token int32 contiguous; rows, seq_lens int64. `threads`: default
    torch.get_num_threads(). Raises ValueError on anything else."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    B, H, D = q.shape
    Hkv = k_buffer.shape[1]
    kv_dtype = KV_DTYPE_CODES.get(k_buffer.dtype)
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if (kv_dtype is None or t.dtype != k_buffer.dtype or t.device.type != "cpu" or not t.is_contiguous()
                or t.shape[1:] != (Hkv, D)):
            raise ValueError(f"{name} must be a contiguous fp32, fp16, bf16 or fp8 CPU tensor (slots, {Hkv}, {D}) "
                             f"like k_buffer, got {t.dtype} {tuple(t.shape)}")
    if req_to_token.dtype != torch.int32 or not req_to_token.is_contiguous():
        raise ValueError("req_to_token must be a contiguous int32 tensor")
    if rows.shape != (B,) or seq_lens.shape != (B,):
        raise ValueError(f"rows and seq_lens must have shape ({B},)")
    q = q.to(torch.float32).contiguous()
    rows = rows.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.decode_attention_f32(q.data_ptr(), k_buffer.data_ptr(), v_buffer.data_ptr(),
                                  req_to_token.data_ptr(), req_to_token.stride(0), rows.data_ptr(),
                                  seq_lens.data_ptr(), B, H, Hkv, D, float(scale), out.data_ptr(),
                                  threads or torch.get_num_threads(), kv_dtype)
    if rc != 0:
        raise ValueError(f"shape not supported by the CPU kernel: {H} q heads, {Hkv} kv heads, head_dim {D}")
    return out


KV_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3,
                  torch.float8_e5m2: 4}  # the C kernels' kv_dtype codes


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a contiguous fp32 CPU tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (strided)'}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * s / sqrt(mean(s^2) + eps) over the last dim, s = x (+ residual); all fp32
    contiguous CPU, x (..., D), weight (D,). Without residual returns the normed tensor; with it,
    (normed, s) where s is a new tensor holding x + residual. Raises ValueError on anything else."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    D = x.shape[-1]
    _check_rows("x", x, tuple(x.shape))
    _check_rows("weight", weight, (D,))
    out = torch.empty_like(x)
    M = x.numel() // D if D else 0
    if residual is None:
        lib.rmsnorm_f32(x.data_ptr(), None, weight.data_ptr(), M, D, float(eps), out.data_ptr(), None)
        return out
    _check_rows("residual", residual, tuple(x.shape))
    total = torch.empty_like(x)
    lib.rmsnorm_f32(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), M, D, float(eps), out.data_ptr(),
                    total.data_ptr())
    return out, total


_NR = 16  # output columns per packed panel (cpu_gemm.c)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Pack an (out, in) fp32 contiguous CPU weight for `linear_packed`: a new 1-D tensor of
    ceil(out / 16) * in * 16 floats (panels of 16 output columns, zero-padded). Raises ValueError
    on anything else."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    _check_rows("weight", weight, tuple(weight.shape))
    N, K = weight.shape
    packed = torch.empty((N + _NR - 1) // _NR * K * _NR)
    lib.gemm_pack_f32(weight.data_ptr(), N, K, packed.data_ptr(), torch.get_num_threads())
    return packed


def linear_packed(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) fp32 CPU @ W^T (+ bias (out_features,)), W given as `pack_weight(W)`.
    Returns a new (..., out_features) tensor. Raises ValueError on mismatched shapes or dtypes."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    K = x.shape[-1]
    if K == 0 or packed.numel() != (out_features + _NR - 1) // _NR * K * _NR:
        raise ValueError(f"packed weight of {packed.numel()} floats does not fit in_features {K}, "
                         f"out_features {out_features}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be an fp32 CPU tensor, got {x.dtype} on {x.device}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < K):
        x2 = x2.contiguous()
    _check_rows("packed", packed, (packed.numel(),))
    if bias is not None:
        _check_rows("bias", bias, (out_features,))
    M = x2.shape[0]
    out = torch.empty(M, out_features)
    if M:
        lib.gemm_packed_f32(x2.data_ptr(), x2.stride(0) if M > 1 else K, packed.data_ptr(),
                            None if bias is None else bias.data_ptr(), M, out_features, K, out.data_ptr(),
                            out_features, torch.get_num_threads())
    return out.view(*x.shape[:-1], out_features)


def _rows_view(name: str, x: torch.Tensor) -> None:
    """x (T, ..., D) fp32 CPU whose rows (dim 0) may be strided but are contiguous within."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{name} must be an fp32 CPU tensor, got {x.dtype} on {x.device}")
    if x.numel() and not x[0].is_contiguous():
        raise ValueError(f"{name}'s rows must be contiguous (strides {tuple(x.stride())})")


def rope_(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, D) in place, rotate-half style: x * cos + rotate_half(x) * sin with
    cos/sin = cache[positions[t]] ((max_pos, D) fp32, both halves stored, as Hugging Face's). The
    rows of x may be strided (a view into a fused q/k/v projection). Returns x. Raises ValueError
    on anything else (positions out of the cache included)."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be (T, heads, D) with D even, got shape {tuple(x.shape)}")
    _rows_view("x", x)
    T, heads, D = x.shape
    for name, c in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if c.dim() != 2 or c.shape[1] != D:
            raise ValueError(f"{name} must be (max_pos, {D}), got shape {tuple(c.shape)}")
        _rows_view(name, c)
    if cos_cache.stride(0) != sin_cache.stride(0):
        raise ValueError("cos_cache and sin_cache must have the same row stride")
    if positions.shape != (T,):
        raise ValueError(f"positions must have shape ({T},), got {tuple(positions.shape)}")
    positions = positions.to(torch.int64).contiguous()
    max_pos = min(cos_cache.shape[0], sin_cache.shape[0])
    if T and lib.rope_f32(x.data_ptr(), T, heads, D, x.stride(0), positions.data_ptr(), cos_cache.data_ptr(),
                          sin_cache.data_ptr(), cos_cache.stride(0), max_pos, torch.get_num_threads()):
        raise ValueError(f"positions must lie in [0, {max_pos})")
    return x


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x (M, 2I) fp32 CPU (rows may be strided) -> a new (M, I) tensor silu(x[:, :I]) * x[:, I:].
    Raises ValueError on anything else."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be (M, 2 * I), got shape {tuple(x.shape)}")
    _rows_view("x", x)
    M, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(M, inter)
    if M and inter:
        lib.silu_mul_f32(x.data_ptr(), M, inter, x.stride(0), out.data_ptr(), torch.get_num_threads())
    return out

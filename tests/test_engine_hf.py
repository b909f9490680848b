"""Greedy outputs and prefill logits equal Hugging Face transformers on the same checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "Translate to French: I would like a cup of coffee, please.",
    "Q: What is 12 times 7?\nA:",
    "The three primary colors are",
    "In machine learning, overfitting happens when a model learns the training data too well, "
    "including its noise. To prevent it, practitioners often use techniques such as",
    "Hi",
    "List of fruits:\n- apple\n- banana\n-",
]
NEW_TOKENS = 32


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax loop over HF's own KV cache (no EOS handling: the engine uses ignore_eos)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, toks = out.past_key_values, []
    for _ in range(n):
        t = int(out.logits[0, -1].argmax())
        toks.append(t)
        out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return toks


@pytest.fixture(scope="module")
def hf_model(fp32_model_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(fp32_model_path, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_outputs(hf_model, prompt_ids):
    with torch.no_grad():
        return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def test_default_model_greedy_batch_matches_hf(engine, prompt_ids, hf_outputs):
    engine.flush_cache()
    res = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
    for r, ref, ids in zip(res, hf_outputs, prompt_ids):
        assert r["output_ids"] == ref, f"prompt of {len(ids)} tokens diverged"


def test_default_model_greedy_one_by_one_matches_hf(engine, prompt_ids, hf_outputs):
    engine.flush_cache()
    for ids, ref in zip(prompt_ids, hf_outputs):
        assert engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] == ref


def test_prefill_logits_match_hf(engine, hf_model, prompt_ids):
    """Input logprobs of our prefill vs HF's log_softmax(logits): max abs diff < 1e-3."""
    for ids in prompt_ids[:6]:
        r = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                            logprob_start_len=0, top_logprobs_num=5)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        ours = [e[0] for e in r["meta_info"]["input_token_logprobs"]]
        assert ours[0] is None and len(ours) == len(ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(ours[1:]), want, atol=1e-3, rtol=0)
        tops = r["meta_info"]["input_top_logprobs"]
        for pos in range(1, len(ids)):
            vals, tids = ref[pos - 1].topk(5)
            assert [t[1] for t in tops[pos]] == tids.tolist()
            assert max(abs(a[0] - b) for a, b in zip(tops[pos], vals.tolist())) < 1e-3


@pytest.mark.parametrize("gemm", ["torch", "openblas", "packed"])
def test_each_cpu_gemm_backend_matches_hf(default_model_path, hf_model, prompt_ids, hf_outputs, gemm):
    """Every CPU matmul path (runtime/cpu_gemm.py) gives HF's greedy tokens and prefill logits."""
    from radixflow.runtime.engine import Engine

    with Engine(default_model_path, max_total_tokens=2048, max_running_requests=4, cpu_gemm=gemm,
                quantization="none", kv_cache_dtype="float32") as eng:
        assert eng.scheduler.runner.gemm_backend == gemm
        # OpenBLAS's spinning threads would starve the attention kernel's pool worker.
        assert eng.scheduler.runner.attn_backend.kernel_threads == (1 if gemm == "openblas" else None)
        res = eng.generate(input_ids=prompt_ids[:3], sampling_params=GREEDY)
        assert [r["output_ids"] for r in res] == hf_outputs[:3]
        ids = prompt_ids[4]
        r = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                         logprob_start_len=0)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours = torch.tensor([e[0] for e in r["meta_info"]["input_token_logprobs"][1:]])
    assert (ours - want).abs().max() < 1e-3


# ---- small random checkpoints of other Llama-family architectures (no downloads) ------------

def _make_checkpoint(tmp_path, kind: str, tokenizer_dir: str) -> str:
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, tie_word_embeddings=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif kind == "llama31":
        cfg = transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0})
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    elif kind == "mistral_window":
        cfg = transformers.MistralConfig(**common, sliding_window=64)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if kind == "qwen2":  # make the QKV bias matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    out = tmp_path / kind
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer_dir}/{f}", out / f)
    return str(out), model


@pytest.mark.parametrize("kind", ["llama", "llama31", "qwen2", "mistral"])
def test_small_random_checkpoints_match_hf(tmp_path, default_model_path, kind):
    from radixflow.runtime.engine import Engine

    path, hf = _make_checkpoint(tmp_path, kind, default_model_path)
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=rng).tolist() for n in (5, 40, 17, 90)]
    with torch.no_grad():
        refs = [hf_greedy(hf, p, 12) for p in prompts]
        ref_logits = [hf(torch.tensor([p])).logits[0].log_softmax(-1) for p in prompts]
    with Engine(path, max_total_tokens=2048, max_running_requests=8, kv_cache_dtype="float32") as eng:
        res = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 12,
                                                               "ignore_eos": True})
        assert [r["output_ids"] for r in res] == refs
        for p, ref in zip(prompts, ref_logits):
            r = eng.generate(input_ids=p, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                             logprob_start_len=0)
            ours = torch.tensor([e[0] for e in r["meta_info"]["input_token_logprobs"][1:]])
            want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
            assert (ours - want).abs().max().item() < 1e-3
        eng.check_invariant()


def test_a_sliding_window_model_is_limited_to_its_window(tmp_path, default_model_path):
    """Full attention equals sliding-window attention up to the window, so the engine caps the
    context there: outputs match HF, longer prompts are refused, a larger explicit context too."""
    from radixflow.runtime.engine import Engine

    path, hf = _make_checkpoint(tmp_path, "mistral_window", default_model_path)
    prompt = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf_greedy(hf, prompt, 12)
    with Engine(path, max_total_tokens=1024, max_running_requests=4, kv_cache_dtype="float32") as eng:
        assert eng.context_length == 64
        r = eng.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 12,
                                                            "ignore_eos": True})
        assert r["output_ids"] == ref
        with pytest.raises(ValueError, match="context length is 64"):
            eng.generate(input_ids=prompt + prompt, sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="sliding attention window"):
        Engine(path, max_total_tokens=1024, context_length=128)

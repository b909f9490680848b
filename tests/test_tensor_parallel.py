"""Tensor parallelism on the CPU (gloo, real worker processes): TP=2 gives TP=1's greedy ids on the
default model and on small checkpoints with other head layouts; the radix cache, grammars, sampling
parameters, input logprobs and the HTTP server work at TP=2; bad sizes are refused before any
process starts; workers never outlive their parent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import save_file
from server_utils import AUTH, ServerProcess

from radixflow.runtime.engine import Engine, GenerationError
from radixflow.runtime.model.model_config import ModelConfig
from radixflow.runtime.model.parallel.sharding import plan_shards, shard_weight

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "1, 2, 3, 4, 5,"]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
TP_OPTS = dict(max_total_tokens=4096, max_running_requests=8, quantization="none", kv_cache_dtype="float32")


def _cfg(heads: int, kv_heads: int, vocab: int = 49152, inter: int = 1536) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab, 64 * heads, inter, 2, heads, kv_heads, 64, 1e-5, 1e4, 512,
                       True, False)


# ---- the split itself (no processes) -------------------------------------------------------------

def test_heads_split_by_whole_groups_and_replicate_kv_heads_beyond_them():
    mc = _cfg(9, 3)  # the default model's layout
    spans = [(p.q_start, p.q_end, p.kv_start, p.kv_end) for p in (plan_shards(mc, 2, r) for r in range(2))]
    assert spans == [(0, 6, 0, 2), (6, 9, 2, 3)]  # q heads follow their KV head
    spans = [(p.q_start, p.q_end, p.kv_start, p.kv_end) for p in (plan_shards(mc, 4, r) for r in range(4))]
    assert spans == [(0, 2, 0, 1), (2, 3, 0, 1), (3, 6, 1, 2), (6, 9, 2, 3)]  # KV head 0 on two ranks
    plans = [plan_shards(mc, 3, r) for r in range(3)]
    assert [(p.inter_start, p.inter_end) for p in plans] == [(0, 512), (512, 1024), (1024, 1536)]
    assert [(p.vocab_start, p.vocab_end) for p in plans] == [(0, 16384), (16384, 32768), (32768, 49152)]
    odd = [plan_shards(_cfg(4, 2, vocab=1001, inter=96), 3, r) for r in range(3)]
    assert [(p.vocab_start, p.vocab_end, p.vocab_chunk) for p in odd] == [(0, 334, 334), (334, 668, 334),
                                                                           (668, 1001, 334)]
    assert [(p.inter_start, p.inter_end) for p in odd] == [(0, 32), (32, 64), (64, 96)]


def test_impossible_splits_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="tp_size 10 exceeds the model's 9 attention heads"):
        plan_shards(_cfg(9, 3), 10, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        plan_shards(_cfg(9, 2), 2, 0)
    with pytest.raises(ValueError, match="intermediate"):
        plan_shards(_cfg(4, 2, inter=1), 2, 0)


def test_shards_of_each_weight_put_back_together_are_the_weight():
    from radixflow.kernels import cpu_quant

    mc = _cfg(4, 2, vocab=1001, inter=96)
    plans = [plan_shards(mc, 3, r) for r in range(3)]
    w = torch.randn(mc.hidden_size, 4 * 64)
    for name, dim in (("model.layers.0.self_attn.q_proj.weight", 0), ("model.layers.0.self_attn.k_proj.weight", 0),
                      ("model.layers.0.self_attn.o_proj.weight", 1), ("model.layers.0.mlp.down_proj.weight", 1),
                      ("model.embed_tokens.weight", 0), ("lm_head.weight", 0)):
        full = {"o_proj": w, "q_proj": w.T, "k_proj": w.T[:128], "down_proj": w[:, :96],
                "embed_tokens": torch.randn(1001, 8), "lm_head": torch.randn(1001, 8)}[name.split(".")[-2]]
        parts = [shard_weight(name, full, p) for p in plans]
        if name.endswith("k_proj.weight"):  # 2 KV heads over 3 ranks: ranks 0 and 1 share KV head 0
            assert torch.equal(parts[0], parts[1]) and torch.equal(torch.cat([parts[0], parts[2]], 0), full)
        else:
            assert torch.equal(torch.cat(parts, dim), full), name
    # Quantized: rows for column-parallel, K cut at block boundaries for row-parallel.
    qb = cpu_quant.blocks_of(cpu_quant.quantize(torch.randn(64, 256), "int4"))
    name = "model.layers.0.self_attn.o_proj.weight"
    parts = [shard_weight(name, qb, p) for p in (plan_shards(_cfg(4, 2), 2, r) for r in range(2))]
    assert torch.equal(torch.cat([p.q for p in parts], 1), qb.q)
    assert torch.equal(torch.cat([p.m for p in parts], 1), qb.m)


# ---- the default model at TP=2 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2(default_model_path):
    # Small prefill chunks: a long prompt is computed in pieces, its rows rewritten between them
    # (the radix cache takes each piece), and the workers must see the same rows.
    with Engine(default_model_path, tp_size=2, chunked_prefill_size=48, **TP_OPTS) as eng:
        yield eng


def test_tp2_greedy_ids_and_input_logprobs_equal_tp1(engine, tp2):
    engine.flush_cache()
    ref = engine.generate(PROMPTS, GREEDY)
    out = tp2.generate(PROMPTS, GREEDY)
    assert [r["output_ids"] for r in out] == [r["output_ids"] for r in ref]
    assert [r["text"] for r in out] == [r["text"] for r in ref]
    one = {"max_new_tokens": 1}
    a = engine.generate(PROMPTS[2], one, return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    b = tp2.generate(PROMPTS[2], one, return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    la = [e[0] for e in a["meta_info"]["input_token_logprobs"][1:]]
    lb = [e[0] for e in b["meta_info"]["input_token_logprobs"][1:]]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    assert [[t[1] for t in row] for row in a["meta_info"]["input_top_logprobs"][1:]] == \
        [[t[1] for t in row] for row in b["meta_info"]["input_top_logprobs"][1:]]
    tp2.check_invariant()


def test_tp2_radix_cache_hits_and_chunked_prefill_give_tp1_tokens(engine, tp2):
    tp2.flush_cache()
    shared = ("You are a helpful assistant. Answer briefly and precisely, in one short sentence, and never "
              "repeat the question. If you do not know, say so. Keep a friendly tone. ") * 2 + "Question: "
    prompts = [shared + "what is 2+2?", shared + "name a color."]
    first = tp2.generate(prompts[0], GREEDY)  # > 48 tokens: chunked
    assert first["meta_info"]["prompt_tokens"] > 48
    again = tp2.generate(prompts, GREEDY)
    assert all(r["meta_info"]["cached_tokens"] > 48 for r in again)
    ref = engine.generate(prompts, GREEDY)
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in ref]
    assert first["output_ids"] == ref[0]["output_ids"]
    ok, _ = tp2.flush_cache()
    assert ok
    tp2.check_invariant()


def test_tp2_grammar_and_sampling_parameters_match_tp1(engine, tp2):
    reqs = [({"max_new_tokens": 10, "temperature": 0, "regex": r"(yes|no)\. [a-z ]{3,8}\."}, PROMPTS[0]),
            ({"max_new_tokens": 24, "temperature": 0, "json_schema": json.dumps({"type": "object", "properties": {
                "n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False})}, "A number: "),
            ({"max_new_tokens": 8, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
              "frequency_penalty": 0.5, "presence_penalty": 0.3, "repetition_penalty": 1.1}, PROMPTS[1]),
            ({"max_new_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2, "stop": ["\n"]}, PROMPTS[3])]
    for sp, prompt in reqs:
        a, b = engine.generate(prompt, dict(sp)), tp2.generate(prompt, dict(sp))
        strip = (lambda r: [x["output_ids"] for x in r]) if isinstance(a, list) else (lambda r: r["output_ids"])
        assert strip(b) == strip(a), sp
    assert json.loads(tp2.generate("A number: ", dict(reqs[1][0]))["text"])["n"] is not None
    streamed = list(tp2.generate(PROMPTS[0], GREEDY, stream=True))
    assert streamed[-1]["output_ids"] == tp2.generate(PROMPTS[0], GREEDY)["output_ids"]


# ---- small checkpoints with other head layouts ----------------------------------------------------

def _checkpoint(folder, tokenizer_dir: str, arch: str, heads: int, kv_heads: int, vocab: int, inter: int) -> str:
    """A random Llama-family checkpoint (untied LM head; q/k/v biases for Qwen2) written as HF does."""
    D, hidden, layers = 16, 16 * heads, 2
    gen = torch.Generator().manual_seed(heads * 31 + kv_heads)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.3

    t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": 1 + r(hidden),
         "lm_head.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": r(heads * D, hidden),
              p + "self_attn.k_proj.weight": r(kv_heads * D, hidden),
              p + "self_attn.v_proj.weight": r(kv_heads * D, hidden),
              p + "self_attn.o_proj.weight": r(hidden, heads * D),
              p + "mlp.gate_proj.weight": r(inter, hidden), p + "mlp.up_proj.weight": r(inter, hidden),
              p + "mlp.down_proj.weight": r(hidden, inter), p + "input_layernorm.weight": 1 + r(hidden),
              p + "post_attention_layernorm.weight": 1 + r(hidden)}
        if arch == "Qwen2ForCausalLM":
            t |= {p + "self_attn.q_proj.bias": r(heads * D), p + "self_attn.k_proj.bias": r(kv_heads * D),
                  p + "self_attn.v_proj.bias": r(kv_heads * D)}
    out = folder / f"{arch}-{heads}-{kv_heads}"
    out.mkdir()
    save_file(t, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": [arch], "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": D,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, f), out / f)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch,heads,kv_heads,vocab,inter,tp,quant", [
    ("Qwen2ForCausalLM", 4, 1, 2000, 64, 2, "none"),  # one KV head replicated, q heads split; biases
    ("LlamaForCausalLM", 6, 3, 1001, 96, 3, "none"),  # three ranks, a vocabulary that does not divide
    # Quantized blocks (with mins) split too: rows for column-parallel layers, K at block boundaries
    # for row-parallel ones (o_proj and down_proj cut at column 32).
    ("LlamaForCausalLM", 4, 2, 2000, 64, 2, "int4"),
])
def test_small_checkpoints_at_tp_equal_tp1(tmp_path, default_model_path, arch, heads, kv_heads, vocab, inter, tp,
                                           quant):
    from radixflow.kernels import cpu_quant

    if quant != "none" and not cpu_quant.available():
        pytest.skip("the quantized CPU kernels could not be built here")
    path = _checkpoint(tmp_path, default_model_path, arch, heads, kv_heads, vocab, inter)
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=rng).tolist() for n in (5, 40, 17)]
    opts = dict(max_total_tokens=1024, max_running_requests=4, kv_cache_dtype="float32", arrival_gap_ms=0,
                quantization=quant)
    results = []
    for size in (1, tp):
        with Engine(path, tp_size=size, **opts) as eng:
            ids = [r["output_ids"] for r in eng.generate(input_ids=prompts, sampling_params=GREEDY)]
            lp = eng.generate(input_ids=prompts[1], sampling_params={"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=0)["meta_info"]["input_token_logprobs"][1:]
            results.append((ids, torch.tensor([e[0] for e in lp])))
            eng.check_invariant()
    assert results[1][0] == results[0][0]
    # fp32 sums in another order; the quantized kernels also cut their tiles differently
    assert (results[1][1] - results[0][1]).abs().max() < (1e-4 if quant == "none" else 1e-3)


# ---- refusals, processes -------------------------------------------------------------------------

def _workers() -> list[psutil.Process]:
    """This process's tensor-parallel worker children."""
    return [p for p in psutil.Process().children(recursive=True)
            if "radixflow.runtime.model.parallel.worker" in " ".join(p.cmdline())]


@pytest.mark.parametrize("opts,message", [
    ({"tp_size": 0}, "tp_size must be >= 1"),
    ({"tp_size": 10}, "tp_size 10 exceeds the model's 9 attention heads"),
    ({"tp_size": 2, "nnodes": 2}, "needs dist_init_addr"),
    ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "127.0.0.1:1"}, "divide tp_size"),
    ({"tp_size": 2, "dist_init_addr": "nohost"}, "HOST:PORT"),
])
def test_bad_sizes_are_refused_before_any_worker_starts(default_model_path, opts, message):
    before = set(_workers())
    with pytest.raises(ValueError, match=message):
        Engine(default_model_path, **opts)
    assert set(_workers()) == before


def test_cli_refuses_a_model_it_cannot_split_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "radixflow.runtime.server.cli", "serve", "--port", "0",
                           "--tp-size", "10"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tp_size 10 exceeds the model's 9 attention heads" in proc.stderr, proc.stderr[-2000:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_that_dies_at_start_up_fails_the_engine_at_once(default_model_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # the worker "interpreter" exits 1
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 1 during start-up"):
        Engine(default_model_path, tp_size=2, max_total_tokens=512, quantization="none")
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_a_lost_worker_fails_requests_instead_of_hanging(default_model_path):
    before = set(_workers())
    with Engine(default_model_path, tp_size=2, max_total_tokens=512, max_running_requests=2,
                quantization="none", arrival_gap_ms=0) as eng:
        worker = eng.scheduler.runner.tp.procs[0]
        worker.kill()
        worker.wait(10)
        t0 = time.monotonic()
        with pytest.raises((GenerationError, RuntimeError)):
            eng.generate(PROMPTS[0], GREEDY)
        assert time.monotonic() - t0 < 30
    assert set(_workers()) == before


@pytest.mark.slow
def test_two_nodes_on_one_machine(default_model_path, engine):
    """--nnodes 2: node 1 runs only its rank (`radixflow serve --node-rank 1`, no HTTP), node 0's
    engine reaches it at --dist-init-addr."""
    from radixflow.runtime.model.parallel.group import free_local_addr

    addr = free_local_addr()
    node1 = subprocess.Popen([sys.executable, "-m", "radixflow.runtime.server.cli", "serve", "--tp-size", "2",
                              "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr,
                              "--quantization", "none", "--kv-cache-dtype", "float32"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Engine(default_model_path, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr, **TP_OPTS) as eng:
            assert eng.scheduler.runner.tp.procs == []  # its one rank is on "node 1"
            out = eng.generate(PROMPTS[:2], GREEDY)
        assert node1.wait(30) == 0, node1.stderr.read()[-2000:]
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait(10)
    ref = engine.generate(PROMPTS[:2], GREEDY)
    assert [r["output_ids"] for r in out] == [r["output_ids"] for r in ref]
    assert node1.stdout.read() == ""  # no HTTP server, no ready line


# ---- the HTTP server ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_with_tp_size_2_over_http_and_no_worker_outlives_its_parent(engine):
    """`radixflow serve --tp-size 2`: rank 0 in the scheduler process, rank 1 its child. Killing the
    scheduler process (SIGKILL: no chance to say goodbye) takes the worker with it."""
    server = ServerProcess(["--tp-size", "2", "--max-total-tokens", "2048", "--max-running-requests", "8",
                            "--api-key", AUTH["Authorization"].split()[1], "--log-level", "warning",
                            "--quantization", "none", "--kv-cache-dtype", "float32"])
    try:
        workers = [p for p in server.descendants() if "parallel.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in server.descendants()]
        with server.client() as c:
            r = c.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY})
            assert r.status_code == 200, r.text
            ref = engine.generate(PROMPTS, GREEDY)
            assert [x["output_ids"] for x in r.json()] == [x["output_ids"] for x in ref]
            name = c.get("/v1/models").json()["data"][0]["id"]
            r = c.post("/v1/chat/completions", json={"model": name, "max_tokens": 8, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Say hi."}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
            r = c.post("/generate", json={"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 8,
                                                                                  "regex": "[0-9]{3}"}})
            assert r.status_code == 200 and r.json()["text"].isdigit(), r.text
        parent = workers[0].parent()
        assert parent.pid != server.pid and parent.parent().pid == server.pid  # the scheduler process
        parent.kill()
        deadline = time.monotonic() + 15
        while _alive(workers[0].pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers[0].pid), "the tensor-parallel worker outlived the scheduler process"
        assert server.proc.wait(30) == 1  # a child died: the server exits unhealthy
    finally:
        server.kill()

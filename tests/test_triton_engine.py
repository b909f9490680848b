"""The engine with --attention-backend triton gives the torch backend's greedy outputs.

Runs in a subprocess under TRITON_INTERPRET=1 (the interpreter is chosen when the kernel
modules are first imported), on a tiny random Llama so the interpreted kernels stay fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

SCRIPT = r"""
import json, sys
from radixflow.runtime.engine import Engine
path, = sys.argv[1:]
prompts = [[5, 17, 300, 42, 9], list(range(100, 140)), [7] * 12]
out = {}
for backend in ("torch", "triton"):
    with Engine(path, attention_backend=backend, device="cpu", max_total_tokens=512,
                max_running_requests=4, chunked_prefill_size=16) as eng:
        res = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 6,
                                                                "ignore_eos": True})
        lp = eng.generate(input_ids=prompts[1], sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
        out[backend] = {"ids": [r["output_ids"] for r in res],
                        "lp": [e[0] for e in lp["meta_info"]["input_token_logprobs"][1:]]}
        eng.check_invariant()
print(json.dumps(out))
"""


def test_triton_backend_engine_matches_torch_backend(tmp_path, default_model_path):
    import shutil

    import torch

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.3)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_model_path, f), tmp_path / f)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["triton"]["ids"] == out["torch"]["ids"]
    assert max(abs(a - b) for a, b in zip(out["triton"]["lp"], out["torch"]["lp"])) < 1e-3

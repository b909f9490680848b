"""The `radixflow` console script.

    radixflow serve [--model PATH] [--host 127.0.0.1] [--port 30000] [--api-key-file PATH] [options]
    radixflow generate "prompt" [--raw] [--max-new-tokens N] [--temperature T] [--model PATH]

Engine options (`--max-total-tokens`, `--schedule-policy`, ...) are the EngineConfig fields and
server options the ServerArgs fields, spelled with dashes. The API key is best given as the
environment variable RADIXFLOW_API_KEY or with --api-key-file (a command line is visible to `ps`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import sys
import typing
from typing import Any

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.loading.default_model import DEFAULT_ALIASES, check_model_path
from radixflow.runtime.router.cli import add_router_parser, run_router_command
from radixflow.runtime.router.data_parallel import run_data_parallel
from radixflow.runtime.server.args import ServerArgs

_HELP = {
    # EngineConfig
    "tokenizer": "tokenizer folder (default: the model's own)",
    "device": "auto | cpu | cuda | cuda:N (auto = cuda when torch sees a GPU, else cpu)",
    "dtype": "weights and activations: auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16",
    "context_length": "longest prompt + output in tokens (default: the model's, capped at its sliding window)",
    "max_prefill_tokens": "prompt tokens one prefill step may compute",
    "chunked_prefill_size": "split longer prompts into chunks of this many tokens (<= 0: no chunking)",
    "disable_radix_cache": "do not share KV cache between requests with a common prefix",
    "attention_backend": "auto | torch | triton (triton needs a CUDA GPU)",
    "disable_cuda_graph": "run CUDA decode steps without CUDA graphs",
    "grammar_compile_timeout": "seconds a request waits for its grammar to compile before a 400",
    "disable_jump_forward": "sample every token of a grammar's forced text instead of appending it at once",
    "disable_mixed_batch": "never run prefill and decode rows in one forward pass",
    "num_threads": "CPU threads for torch and the C kernels (default: torch's choice)",
    "cpu_gemm": "fp32 CPU matmuls: auto | torch | openblas | packed",
    "random_seed": "seed of requests that give none",
    "stream_interval": "stream a result every this many tokens",
    "arrival_gap_ms": "in-process Engine: how long an idle engine waits for the rest of a burst (0 = off)",
    # ServerArgs
    "host": "address to listen on (a non-loopback address needs --api-key)",
    "served_model_name": "the model name /v1/models lists (default: the model folder's name)",
    "max_new_tokens_limit": "largest max_new_tokens / max_tokens a request may ask for",
    "max_top_logprobs": "largest top_logprobs / top_logprobs_num",
    "log_level": "debug | info | warning | error",
    "health_generate_timeout": "seconds /health_generate waits for its one-token request",
    "startup_timeout": "seconds to wait for the model to load before giving up",
    "max_total_tokens": "KV pool size in tokens (default: a share of free memory)",
    "mem_fraction": "share of free memory for the KV pool when --max-total-tokens is not set",
    "max_running_requests": "largest decode batch",
    "schedule_policy": "lpm | dfs-weight | fcfs",
    "grammar_backend": "xgrammar | llguidance | auto (per request, the backend that enforces the spec exactly, "
                       "xgrammar first)",
    "api_key": "require `Authorization: Bearer KEY` on every endpoint but /health; visible to `ps`: "
               "prefer --api-key-file or the RADIXFLOW_API_KEY environment variable",
    "max_waiting_requests": "requests in flight beyond --max-running-requests before 503",
    "max_request_bytes": "largest accepted request body (413 beyond)",
    "max_n": "largest n (choices per prompt)",
    "log_interval": "scheduler steps between progress log lines (0 = off)",
    "port": "TCP port (0 = any free port; the ready line names it)",
    "watchdog_timeout": "seconds the scheduler may show no progress while requests are in flight "
                        "before /health answers 503",
    "request_timeout": "abort a request still running after this many seconds with 504 (None = never)",
    "header_timeout": "close a connection that has not sent complete request headers within this many seconds",
    "body_timeout": "answer 408 and close when a request body stalls this many seconds between chunks",
    "allowed_origins": "comma-separated browser origins (scheme://host:port) allowed to POST besides the "
                       "server's own; * = any",
    "allowed_hosts": "comma-separated Host names accepted besides localhost, 127.0.0.1, [::1] and --host "
                     "(on a loopback --host; elsewhere, if set, only these); * = any",
    "quantization": "CPU weights: auto (a model converted from a GGUF runs on its own 4/8-bit blocks, others "
                    "fp32) | none (fp32) | gguf | int8 | int4 (weight-only, per group of 32, quantized at load)",
    "tp_size": "tensor parallel: split the model over this many ranks, one process (and GPU) each",
    "nnodes": "tensor parallel over this many machines (tp-size ranks in all, the same number on each)",
    "node_rank": "this machine's place among --nnodes (0 serves HTTP; the others run only their ranks)",
    "dist_init_addr": "HOST:PORT where the ranks meet, on node 0 (needed with --nnodes > 1; default: a free "
                      "local port)",
    "dist_timeout": "seconds a rank may wait for another before it fails",
    "kv_cache_dtype": "KV cache element type: auto (float16 on CPU, the model dtype on CUDA) | float32 | float16 "
                      "| bfloat16 | fp8_e4m3 | fp8_e5m2 (a quarter of float32, no scales: e4m3 saturates at 448, "
                      "e5m2 overflows past 57344)",
}
_API_KEY_ENV = "RADIXFLOW_API_KEY"


def _field_type(cls: type, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is tuple:
        return _comma_list
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    """One --option per dataclass field (defaults suppressed: unset options keep the class default)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{_HELP.get(f.name, '')} (default: {default})".strip()
        typ = _field_type(cls, f.name)
        if typ is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=typ, default=argparse.SUPPRESS, help=help_text)


def _collect(ns: argparse.Namespace, cls: type, skip: set[str]) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.name not in skip and hasattr(ns, f.name)}


def _version() -> str:
    try:
        return importlib.metadata.version("radixflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point at --help (instead of the usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"radixflow: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `radixflow` argument parser (subcommands `serve`, `router` and `generate`). Options
    must be spelled out: abbreviations (`--temp` for `--temperature`) are refused."""
    parser = _Parser(prog="radixflow", description="radixflow: a serving engine for agent programs", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"radixflow {_version()}")
    subs = parser.add_subparsers(dest="command", required=True)

    serve = subs.add_parser("serve", help="run the HTTP server (native + OpenAI-compatible API)", allow_abbrev=False)
    serve.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--api-key-file", default=None, metavar="PATH",
                       help=f"read the API key from this file (stripped); else --api-key, else ${_API_KEY_ENV} "
                            "(default: None)")
    serve.add_argument("--dp-size", type=int, default=1,
                       help="data parallel: N workers behind a cache-aware router (default: 1)")
    _add_fields(serve, ServerArgs, {"engine"})
    _add_fields(serve, EngineConfig, {"model"})
    add_router_parser(subs)

    gen = subs.add_parser("generate", help="generate an answer in-process and print it", allow_abbrev=False)
    gen.add_argument("prompt", help="the user message (or the raw prompt with --raw)")
    gen.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--system", default=None, help="a system message (chat mode; default: none)")
    _add_fields(gen, EngineConfig, {"model"})
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `radixflow` script; returns the exit code."""
    ns = build_parser().parse_args(argv)
    if ns.command == "router":
        return run_router_command(ns)
    try:
        engine = EngineConfig.from_kwargs(model=ns.model, **_collect(ns, EngineConfig, {"model"}))
        _preflight(engine)
        if ns.command == "serve":
            if ns.dp_size > 1 and engine.dist_init_addr is not None:  # every replica would meet at one address
                raise ValueError("--dp-size > 1 runs each replica's tensor-parallel ranks on this machine: "
                                 "drop --dist-init-addr (and --nnodes)")
            server_kwargs = _collect(ns, ServerArgs, {"engine", "api_key"})
            args = ServerArgs(engine=engine, api_key=_api_key(ns), **server_kwargs)
    except (TypeError, ValueError, OSError) as e:
        print(f"radixflow: error: {e}", file=sys.stderr)
        return 2
    if ns.command == "serve":
        if engine.node_rank > 0:  # a further node of a multi-node tensor-parallel group: its ranks only
            return _run_node(engine)
        return launch(args) if ns.dp_size == 1 else run_data_parallel(args, ns.dp_size)
    return _generate(ns, engine)


def _preflight(config: EngineConfig) -> None:
    """Raise ValueError, saying what to do, when this machine cannot run `config` (checked
    before any process starts, so the user reads one line instead of a child's traceback)."""
    import torch

    if config.model is not None and config.model not in DEFAULT_ALIASES:
        check_model_path(config.model)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(f"--device {config.device}: this torch ({torch.__version__}) {why}; "
                         "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if config.tp_size > 1:  # a model the ranks cannot split: one line now, not a worker's traceback later
        from radixflow.runtime.loading.default_model import resolve_model_path
        from radixflow.runtime.model.model_config import ModelConfig
        from radixflow.runtime.model.parallel.sharding import plan_shards

        plan_shards(ModelConfig.from_folder(resolve_model_path(config.model)), config.tp_size, 0)
    if config.attention_backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--attention-backend triton: triton is not installed (pip install triton); "
                             "or use --attention-backend torch")
        if config.resolved_device().type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--attention-backend triton needs a CUDA GPU; use --attention-backend torch on CPU "
                             "(or set TRITON_INTERPRET=1 to run the kernels in triton's slow interpreter)")


def _api_key(ns: argparse.Namespace) -> str | None:
    """--api-key, else the contents of --api-key-file, else $RADIXFLOW_API_KEY, else None.
    Raises ValueError when both options are given or the key is empty."""
    flag, path = getattr(ns, "api_key", None), ns.api_key_file
    if flag is not None and path is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if flag is not None:
        return flag
    if path is not None:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"--api-key-file {path} is empty")
        return key
    env = os.environ.get(_API_KEY_ENV)
    if env is not None and not env.strip():
        raise ValueError(f"${_API_KEY_ENV} is set but empty")
    return env.strip() if env is not None else None


def launch(args: ServerArgs) -> int:
    """Run the server until it is stopped; returns its exit code."""
    from radixflow.runtime.server.serve import launch_server

    return launch_server(args)


def _run_node(config: EngineConfig) -> int:
    from radixflow.runtime.loading.default_model import resolve_model_path
    from radixflow.runtime.model.parallel.group import run_node

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    return run_node(config, resolve_model_path(config.model))


def _generate(ns: argparse.Namespace, config: EngineConfig) -> int:
    from radixflow.runtime.engine import Engine, GenerationError
    from radixflow.runtime.sampling_params import SamplingParams

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    params: dict[str, Any] = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
    try:
        SamplingParams.from_dict(params)  # fail before loading the model
    except ValueError as e:
        print(f"radixflow: error: {e}", file=sys.stderr)
        return 2
    opts = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    with Engine(ns.model, **opts) as engine:
        tok = engine.tokenizer
        if ns.raw:
            ids = tok.encode(ns.prompt)
        else:
            messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [
                {"role": "user", "content": ns.prompt}]
            ids = tok.encode(engine.apply_chat_template(messages), add_special_tokens=False)
            stops = [s for s in tok.chat_stop_strings if tok.token_to_id(s) is None]
            stop_ids = [t for s in tok.chat_stop_strings if (t := tok.token_to_id(s)) is not None]
            params.update(stop=stops, stop_token_ids=stop_ids)
        printed = ""
        try:
            for res in engine.generate(input_ids=ids, sampling_params=params, stream=True):
                text = res["text"]
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = max(printed, text, key=len)
        except (ValueError, GenerationError) as e:
            print(f"\nradixflow: error: {e}", file=sys.stderr)
            return 1
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

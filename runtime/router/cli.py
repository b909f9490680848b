"""The `radixflow router` subcommand: `add_router_parser(subs)` adds it to the `radixflow`
parser, `run_router_command(ns)` runs it.

    radixflow router --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002 [--port 30000]
                     [--policy cache_aware|round_robin|random] [options]

The API key (required of clients when set) is best given as $RADIXFLOW_API_KEY; the client's
Authorization header is passed on to the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from radixflow.runtime.router.args import POLICIES, RouterArgs

_HELP = {
    "port": "TCP port (0 = any free port; the ready line names it)",
    "policy": " | ".join(POLICIES),
    "cache_threshold": "share of a request's text a worker's tree must match to win by cache affinity",
    "balance_abs_threshold": "in-flight difference (max - min) beyond which loads count as imbalanced",
    "balance_rel_threshold": "and max > this x min: then the least-loaded worker wins regardless",
    "max_tree_chars": "characters each worker's approximate prefix tree keeps (LRU eviction beyond)",
    "health_interval": "seconds between health checks of each worker",
    "health_failures": "failed health checks in a row that take a worker out of rotation",
    "max_attempts": "workers tried for a request that fails before its answer began",
    "allowed_origins": "comma-separated browser origins allowed to POST (as for serve)",
    "allowed_hosts": "comma-separated Host names accepted (as for serve)",
    "host": "address to listen on (a non-loopback address needs --api-key)",
    "health_timeout": "seconds a worker's /health may take before the check counts as failed",
    "request_timeout": "seconds to wait for a worker's answer before trying another (or 504)",
    "max_request_bytes": "largest accepted request body (413 beyond)",
    "header_timeout": "close a connection that has not sent complete request headers within this many seconds",
    "body_timeout": "answer 408 and close when a request body stalls this many seconds between chunks",
    "log_level": "debug | info | warning | error",
}
_API_KEY_ENV = "RADIXFLOW_API_KEY"


def add_router_parser(subs: Any) -> argparse.ArgumentParser:
    """Adds the `router` subcommand to `subs` (an argparse subparsers object); returns it."""
    p = subs.add_parser("router", help="route requests over `radixflow serve` workers by cache affinity",
                        allow_abbrev=False)
    p.add_argument("--worker-urls", nargs="*", default=[], metavar="URL",
                   help="the workers (http://HOST:PORT); more can be added at run time (default: none)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY`; visible to `ps`: prefer ${_API_KEY_ENV} (default: None)")
    for f in dataclasses.fields(RouterArgs):
        if f.name in ("worker_urls", "api_key"):
            continue
        typ = type(f.default)
        help_text = f"{_HELP.get(f.name, '')} (default: {f.default})".strip()
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS, help=help_text,
                       type=_comma_list if typ is tuple else typ)
    return p


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def router_args(ns: argparse.Namespace) -> RouterArgs:
    """RouterArgs from parsed options; ValueError if they are invalid."""
    opts = {f.name: getattr(ns, f.name) for f in dataclasses.fields(RouterArgs) if hasattr(ns, f.name)}
    opts["worker_urls"] = tuple(ns.worker_urls)
    env = os.environ.get(_API_KEY_ENV)
    opts["api_key"] = ns.api_key if ns.api_key is not None else (env.strip() if env and env.strip() else None)
    return RouterArgs(**opts)


def run_router_command(ns: argparse.Namespace) -> int:
    """Runs `radixflow router`; returns the exit code (2 for bad options)."""
    from radixflow.runtime.router.serve import run_router

    try:
        args = router_args(ns)
    except ValueError as e:
        print(f"radixflow: error: {e}", file=sys.stderr)
        return 2
    return run_router(args)

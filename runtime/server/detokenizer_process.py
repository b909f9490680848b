"""The server's detokenizer process: token ids -> text, between the scheduler and the HTTP process.

Inbound (PULL, from the scheduler process): lists of `RegisterReq`, `BatchOutput`, `InfoOut`,
`FlushCacheOut`. Outbound (PUSH, to the tokenizer manager): one list per inbound message of
native result dicts (`Detokenizer.process_or_abort`, one per request output, the request id in
`meta_info.id`; an output that fails to detokenize ends its request with an internal-error
abort) and the `InfoOut` / `FlushCacheOut` replies, in arrival order.
"""

from __future__ import annotations

import logging
import traceback
from multiprocessing.connection import Connection
from typing import Any

import zmq

from radixflow.runtime.io_struct import BatchOutput, RegisterReq
from radixflow.runtime.server.launch import bind_pull, connect_push, parent_alive, prepare_child

logger = logging.getLogger("radixflow.detokenizer")


def run_detokenizer_process(tokenizer_path: str, in_addr: str, out_addr: str, log_level: str,
                            ready: Connection, parent_pid: int) -> None:
    """Process entry point: serve until the parent dies or SIGTERM."""
    prepare_child(parent_pid, log_level)
    try:
        from radixflow.runtime.text.detokenizer import Detokenizer
        from radixflow.runtime.text.tokenizer import Tokenizer

        detok = Detokenizer(Tokenizer.from_pretrained(tokenizer_path))
        ctx = zmq.Context()
        pull = bind_pull(ctx, in_addr)
        push = connect_push(ctx, out_addr)
    except BaseException:
        ready.send(("error", traceback.format_exc()))
        raise
    ready.send(("ready", {}))
    ready.close()
    while True:
        if not pull.poll(1000):
            if not parent_alive(parent_pid):
                return
            continue
        out = _handle(detok, pull.recv_pyobj())
        if out:
            push.send_pyobj(out)


def _handle(detok: Any, items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, RegisterReq):
            detok.register(item.rid, stop=item.stop, stop_regex=item.stop_regex, no_stop_trim=item.no_stop_trim,
                           skip_special_tokens=item.skip_special_tokens,
                           spaces_between_special_tokens=item.spaces_between_special_tokens,
                           return_text_in_logprobs=item.return_text_in_logprobs)
        elif isinstance(item, BatchOutput):
            for o in item.outputs:
                res = detok.process_or_abort(o)
                if res is not None:
                    out.append(res)
        else:
            out.append(item)
    return out

"""A tensor-parallel worker: ranks 1..N-1 run `python -m radixflow.runtime.model.parallel.worker`
with a pickled `WorkerArgs` on stdin. Each loads its shard (a ModelRunner of its rank), then runs
rank 0's commands (protocol.py) until SHUTDOWN, the loss of rank 0 or of its parent."""

from __future__ import annotations

import logging
import os
import pickle
import sys

from radixflow.runtime.child_process import die_with_parent
from radixflow.runtime.model.parallel import protocol
from radixflow.runtime.model.parallel.group import WorkerArgs, init_group

logger = logging.getLogger("radixflow.tp_worker")


def serve_commands(runner, parent_pid: int) -> None:
    """Run rank 0's commands on `runner` (a ModelRunner of rank > 0) until SHUTDOWN. Raises
    RuntimeError when the parent is gone, and whatever a collective raises (rank 0 lost, timeout)."""
    tp = runner.tp
    while True:
        cmd = protocol.receive(tp)
        if cmd.kind == protocol.FORWARD:
            runner.forward(protocol.unpack_forward(cmd, runner.req_to_token_pool, tp.device))
        elif cmd.kind == protocol.LOGITS:
            runner.compute_logits(protocol.unpack_logits(cmd, tp.device))
        elif cmd.kind == protocol.NOOP:
            if parent_pid and os.getppid() != parent_pid:
                raise RuntimeError("the process that started this worker is gone")
        elif cmd.kind == protocol.SHUTDOWN:
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {cmd.header}")


def run_worker(args: WorkerArgs) -> int:
    """Join the group, load this rank's shard, serve; returns the exit code."""
    from radixflow.runtime.model.model_runner import ModelRunner

    tp = init_group(args.config, args.rank, args.init_addr)
    try:
        runner = ModelRunner(args.config, args.model_path, tp=tp)
        serve_commands(runner, args.parent_pid)
        return 0
    except Exception:
        logger.exception("tensor-parallel rank %d failed", args.rank)
        return 1
    finally:
        tp.destroy()


def main() -> int:
    args: WorkerArgs = pickle.load(sys.stdin.buffer)
    die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s tp-rank-{args.rank} %(levelname)s %(message)s")
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())

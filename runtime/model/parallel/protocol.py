"""What rank 0 sends the other tensor-parallel ranks, over the control (gloo, CPU) group.

Every command is a broadcast of a fixed header, int64 (HEADER_LEN,):
    [command, a, b, c, d, e, payload_len, 0]
followed, when payload_len > 0, by one broadcast of the payload:
  FORWARD  a = mode (0 extend, 1 decode), b = T tokens, c = B requests, d = return_all_logits,
           e = num_decode; payload int64: input_ids (T) | positions (T) | out_cache_loc (T) |
           req_pool_indices (B) | prefix_lens (B) | extend_lens (B) | the cached slots of each
           request, req_to_token[row, :prefix_len], concatenated. Each rank writes those and the new
           tokens' slots into its own ReqToTokenPool: rank 0's scheduler decides every slot.
  LOGITS   a = N rows, b = hidden size, c = dtype code; payload: the hidden rows (N, hidden) whose
           logits rank 0 wants (input logprobs), sent as they are.
  NOOP     nothing; rank 0 sends one when it has sent nothing for HEARTBEAT_S, so an idle worker's
           wait never runs into the group timeout and a dead rank is noticed while idle.
  SHUTDOWN the workers leave their loop.
Two small broadcasts per step instead of a pickled object: at batch 1 the header is 64 bytes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.memory_pool import ReqToTokenPool
from radixflow.runtime.model.parallel.group import TPGroup

FORWARD, LOGITS, NOOP, SHUTDOWN = 1, 2, 3, 4
HEADER_LEN = 8
HEARTBEAT_S = 2.0
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Command:
    """One received command: its header and payload (None when it has none)."""

    header: list[int]
    payload: torch.Tensor | None

    @property
    def kind(self) -> int:
        return self.header[0]


def pack_forward(batch: ForwardBatch, pool: ReqToTokenPool) -> tuple[list[int], torch.Tensor]:
    """The FORWARD header and payload of `batch` (see the module docstring)."""
    rows, prefix = batch.req_pool_indices, batch.prefix_lens
    parts = [batch.input_ids, batch.positions, batch.out_cache_loc, rows, prefix, batch.extend_lens]
    longest = max(batch.prefix_lens_cpu, default=0)
    if longest:
        table = pool.req_to_token[rows, :longest]  # (B, longest)
        mask = torch.arange(longest, device=table.device) < prefix[:, None]
        parts.append(table[mask].to(torch.int64))
    payload = torch.cat([p.to(torch.int64) for p in parts]).cpu()
    mode = 1 if batch.mode is ForwardMode.DECODE else 0
    header = [FORWARD, mode, batch.num_tokens, batch.batch_size, int(batch.return_all_logits), batch.num_decode,
              payload.numel(), 0]
    return header, payload


def unpack_forward(cmd: Command, pool: ReqToTokenPool, device: torch.device) -> ForwardBatch:
    """The ForwardBatch of a FORWARD command, its slots written into `pool` (rows as on rank 0)."""
    _, mode, T, B, all_logits, num_decode, n, _ = cmd.header
    assert cmd.payload is not None and cmd.payload.numel() == n
    ids, pos, loc, rows, prefix, ext, cached = cmd.payload.to(device).split([T, T, T, B, B, B, n - 3 * T - 3 * B])
    table = pool.req_to_token.view(-1)
    width = pool.max_context_len
    table[rows.repeat_interleave(ext) * width + pos] = loc.to(torch.int32)
    if cached.numel():
        firsts = torch.cumsum(prefix, 0) - prefix  # where each request's cached slots start in `cached`
        col = torch.arange(cached.numel(), device=device) - firsts.repeat_interleave(prefix)
        table[rows.repeat_interleave(prefix) * width + col] = cached.to(torch.int32)
    seq = prefix + ext
    prefix_cpu, ext_cpu = prefix.tolist(), ext.tolist()
    return ForwardBatch(mode=ForwardMode.DECODE if mode else ForwardMode.EXTEND, input_ids=ids, positions=pos,
                        out_cache_loc=loc, req_pool_indices=rows, seq_lens=seq, prefix_lens=prefix, extend_lens=ext,
                        extend_start_loc=torch.cumsum(ext, 0) - ext, seq_lens_cpu=seq.tolist(),
                        prefix_lens_cpu=prefix_cpu, extend_lens_cpu=ext_cpu, return_all_logits=bool(all_logits),
                        num_decode=num_decode)


def pack_logits(hidden: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The LOGITS header and payload for hidden rows (N, hidden)."""
    rows = hidden.detach().contiguous().cpu()
    return [LOGITS, rows.shape[0], rows.shape[1], _DTYPES.index(rows.dtype), 0, 0, rows.numel(), 0], rows


def unpack_logits(cmd: Command, device: torch.device) -> torch.Tensor:
    """The hidden rows of a LOGITS command, on `device`."""
    assert cmd.payload is not None
    return cmd.payload.view(cmd.header[1], cmd.header[2]).to(device)


class Sender:
    """Rank 0's end: broadcasts commands, one at a time (`lock` is held by whoever is in a
    command and its collectives), with a heartbeat thread that sends NOOP while idle. A failed
    heartbeat is kept and raised by the next `send`."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self.lock = threading.RLock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._heartbeat, name="radixflow-tp-heartbeat", daemon=True)
        self._thread.start()

    def send(self, header: list[int], payload: torch.Tensor | None = None) -> None:
        """Broadcast one command; the caller holds `lock` through the collectives that follow it."""
        if self.failure is not None:
            raise RuntimeError(f"a tensor-parallel rank is gone: {self.failure}") from self.failure
        self.tp.broadcast_cpu(torch.tensor(header, dtype=torch.int64))
        if payload is not None and payload.numel():
            self.tp.broadcast_cpu(payload)
        self._last = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self._last < HEARTBEAT_S or not self.lock.acquire(blocking=False):
                continue
            try:
                if not self._stop.is_set() and self.failure is None:
                    self.send([NOOP] + [0] * (HEADER_LEN - 1))
            except Exception as e:  # a dead or hung rank: the next step reports it
                self.failure = e
            finally:
                self.lock.release()

    def stop(self) -> None:
        """Stop the heartbeat (before the last command and the group's end)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S * 2)


def receive(tp: TPGroup) -> Command:
    """A worker's end: wait for rank 0's next command (bounded by the group's timeout; rank 0's
    heartbeat keeps an idle wait short)."""
    header = tp.broadcast_cpu(torch.empty(HEADER_LEN, dtype=torch.int64)).tolist()
    n = header[6]
    if not n:
        return Command(header, None)
    dtype = _DTYPES[header[3]] if header[0] == LOGITS else torch.int64
    return Command(header, tp.broadcast_cpu(torch.empty(n, dtype=dtype)))

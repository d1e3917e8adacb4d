"""A run's checkpoint writes: within the step, or in the background while training goes on (train.async_save, as
`RunDecisions.async_save` resolves it); a checkpoint is COMPLETE only once every rank's write ended.

The background path is Megatron-Core's async save, as Megatron-LM's `--async-save` drives it: the request
`cglab.train.checkpoint.request` builds (`dist_checkpointing.save(..., async_sharded_save=True)`) is scheduled on an
`AsyncCallsQueue`, and `finalize` is its `maybe_finalize_async_calls` (Megatron-LM's `maybe_finalize_async_save`).
Each write is one forked process (Megatron's TemporalAsyncCaller) whose tensors are in host memory before the fork
(Megatron's preload copies GPU tensors; on the CPU the fork's copy-on-write pages are the snapshot), so the next steps
may change the weights. `finalize` is collective: one all-reduce says whether every rank's write ended, and only then
do the request's finalize functions run on every rank, the last of them writing the manifest and COMPLETE
(`checkpoint._seal`). Megatron's persistent worker (PersistentAsyncCaller) is not used: a spawned process taking the
tensors through a queue, which sets a CUDA device a CPU process has none of.

One write is in flight at a time (a new checkpoint first waits for the previous one): the host memory of one
checkpoint, as Megatron's default.
"""

from __future__ import annotations

import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import NamedTuple


class Write(NamedTuple):
    directory: Path  # this rank's staging directory of the checkpoint
    step: int  # the step it holds


def _held(gate: Path, write, *args, **kwargs) -> None:
    """The write, once `gate` exists (the test hook `Writes.hold`; runs in the writer process)."""
    while not gate.exists():
        time.sleep(0.01)
    write(*args, **kwargs)


class Writes:
    """Checkpoints being written, and those sealed (COMPLETE) since the caller last took them."""

    def __init__(self, background: bool):
        # Megatron: kept off the paths that only read checkpoints
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.background = background
        self.queue = AsyncCallsQueue(persistent=False)
        self.writing: deque[Write] = deque()  # started in the background, not sealed yet; oldest first
        self.sealed: list[Write] = []  # sealed since the last `take`, oldest first
        # Test hook: a background write waits until this file exists (tests/train/test_checkpoint_async.py looks at a
        # checkpoint between its start and the end of its write, and kills a write in the middle).
        self.hold: Path | None = None

    @property
    def in_flight(self) -> bool:
        return bool(self.writing)

    def start(self, request, write: Write) -> None:
        """Collective: write `request` (checkpoint.request of `write`). Within the step, it is sealed when this
        returns; in the background, the previous write is first waited for and sealed, then this one starts."""
        if not self.background:
            request.execute_sync()
            self.sealed.append(write)
            return
        self.finalize(blocking=True)
        if self.hold is not None and request.async_fn is not None:
            request = request._replace(async_fn=partial(_held, self.hold, request.async_fn))
        self.queue.schedule_async_request(request)
        self.writing.append(write)

    def finalize(self, blocking: bool) -> None:
        """Collective: seal the writes that ended on every rank (blocking: wait for all of them to end). Every rank
        has started the same writes, so all of them call this alike; it costs one all-reduce while one is in
        flight, nothing otherwise."""
        if not self.writing:
            return
        for _ in self.queue.maybe_finalize_async_calls(blocking=blocking):
            self.sealed.append(self.writing.popleft())

    def take(self) -> list[Write]:
        """The checkpoints sealed since the last call, oldest first."""
        out, self.sealed = self.sealed, []
        return out

    def abort(self) -> list[Write]:
        """Not collective (a peer may be gone): kill the writes in flight, whose checkpoints then never get
        COMPLETE; returns them. Megatron's `AsyncCallsQueue.close(abort=True)` kills only its
        persistent worker, so each forked writer is killed here."""
        for call in self.queue.async_calls:
            process = getattr(call.async_caller, "process", None)
            call.async_caller.close(abort=True)  # kills it
            if process is not None:
                process.join()  # reaped: no zombie left behind
        self.queue.async_calls.clear()
        out = list(self.writing)
        self.writing.clear()
        return out

"""Preemption: a SIGTERM (spot reclaim, Kubernetes eviction, a scheduler's time limit) to the driver or to any
training worker stops the run at the next step boundary, with a complete checkpoint of that step; the same command
resumes from it (train/loop.py `_resume`).

- Worker: Ray runs the training function in a thread, and only a process's main thread may set a signal handler,
  so `PreemptibleTorchConfig`'s backend installs it on each worker actor's main thread before training starts
  (replacing Ray's, which exits the worker at once). The handler only sets a flag; the `Preemption` callback
  (train/callbacks.py) all-reduces it at every step boundary, so TP, PP and DP peers stop at the same step.
- Driver: `on_sigterm` sets a `StopFlag` actor that rank 0 reads at every step boundary. An actor rather than a
  file: the run directory is not shared between nodes on every cluster; Ray is.

- The stop checkpoint: with train.async_save a checkpoint may still be written in the background when the flag is
  seen; the Checkpointer waits for that write and then for the stop checkpoint's own before the loop ends
  (train/callbacks.py, train/checkpoint_writes.py), so the run resumes from the step it stopped at, never from a
  checkpoint whose write the exit cut off.

Both arm a hard exit after `train.preempt_grace_s`: a step (and the writes it waits for) longer than the grace must
not outlive the scheduler's SIGKILL by pretending to stop cleanly (the run then resumes from the previous complete
checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the run is not broken, it was
# asked to stop and can resume (a Kubernetes podFailurePolicy can match it to restart without counting a failure).
EXIT_PREEMPTED = 75
EXIT_GRACE_EXPIRED = 128 + signal.SIGTERM  # what a plain SIGTERM death would have returned

_signalled = threading.Event()  # this worker process got SIGTERM
_over = threading.Event()  # training ended here: SIGTERM has Ray's meaning again (the worker exits)
_timer: threading.Timer | None = None


def _arm_hard_exit(grace_s: float, who: str) -> None:
    global _timer
    if _timer is None:

        def expire() -> None:
            log.error("%s: no checkpoint within train.preempt_grace_s=%gs of SIGTERM; exiting", who, grace_s)
            os._exit(EXIT_GRACE_EXPIRED)

        _timer = threading.Timer(grace_s, expire)
        _timer.daemon = True
        _timer.start()


def disarm() -> None:
    """The run stopped (or finished) in time: no hard exit, and a later SIGTERM (Ray ending the worker) is Ray's."""
    global _timer
    _over.set()
    if _timer is not None:
        _timer.cancel()
        _timer = None


# ---------------------------------------------------------------------------------------------- worker side
def worker_signalled() -> bool:
    return _signalled.is_set()


def _install_worker_handler(grace_s: float) -> None:
    """Runs on a worker actor's main thread (Backend.on_training_start)."""
    previous = signal.getsignal(signal.SIGTERM)
    _over.clear()

    def handler(signum, frame) -> None:
        if _over.is_set() and callable(previous):
            previous(signum, frame)
        elif not _signalled.is_set():
            log.warning("SIGTERM: checkpointing at the next step boundary, then stopping (grace %gs)", grace_s)
            _signalled.set()
            _arm_hard_exit(grace_s, "worker")

    signal.signal(signal.SIGTERM, handler)


class _PreemptibleBackend(_TorchBackend):
    def on_training_start(self, worker_group, backend_config: PreemptibleTorchConfig) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(_install_worker_handler, backend_config.grace_s)


@dataclass
class PreemptibleTorchConfig(TorchConfig):
    """TorchConfig whose workers turn SIGTERM into a flag for the Preemption callback."""

    grace_s: float = 120.0

    @property
    def backend_cls(self):
        return _PreemptibleBackend


# ---------------------------------------------------------------------------------------------- driver side
@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver's SIGTERM handler, read by rank 0 at every step boundary."""

    def __init__(self) -> None:
        self.stop = False

    def set(self) -> None:
        self.stop = True

    def is_set(self) -> bool:
        return self.stop


def stop_flag():
    """A StopFlag pinned to the driver's own node. Unpinned, Ray may place it on any node, a worker node included;
    losing that node then kills the flag with it, and rank 0's read at the next step fails the run that Ray Train
    was about to restart on the node left. Pinned, it goes only with the driver that sets it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return StopFlag.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


@contextlib.contextmanager
def on_sigterm(flag, grace_s: float) -> Iterator[None]:
    """While training runs on the driver's main thread: SIGTERM sets `flag` and arms the hard exit. Elsewhere (a
    Tune trial's function runs in a thread) no handler can be set, and SIGTERM keeps Ray's meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        log.warning("SIGTERM: the workers checkpoint at the next step boundary and stop (grace %gs)", grace_s)
        flag.set.remote()
        _arm_hard_exit(grace_s, "driver")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        disarm()

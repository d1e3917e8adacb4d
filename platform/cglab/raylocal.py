"""A private local Ray for one process (tests, `cglab demo`, `cglab data inspect`), and a shutdown that waits for
the driver's Ray Data threads first.

Why the wait: `ray.shutdown()` destroys the driver's core worker while the background threads of a Ray Data
iteration that was just abandoned or finished (`iter_threaded`, `StreamingExecutor-*`) may still be calling into
it. A call that lands after the teardown ends the whole process with `_Exit(1)` and no message on the console
("The core worker has already been shutdown ... The process will exit" goes to the Ray logs only). Under pytest
that is a run which stops mid-way with exit status 1 and no summary.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import threading
import time
from typing import Iterator

# Ray is imported where used: this module is imported by commands (`cglab --help`) that never start Ray.
log = logging.getLogger(__name__)

# Threads a driver-side Ray Data iteration starts and that call Ray while they run. The parked `Prefetcher` of a
# finished iterator only calls Ray when handed blocks, so it is not waited for.
ACTIVE_DATA_THREADS = ("iter_threaded", "StreamingExecutor", "map_tp_")


def active_data_threads() -> list[threading.Thread]:
    """Live Ray Data threads of this process that may still call into Ray."""
    me = threading.current_thread()
    return [t for t in threading.enumerate() if t is not me and t.name.startswith(ACTIVE_DATA_THREADS)]


def quiesce(timeout: float = 30.0) -> list[str]:
    """Finalize abandoned Ray Data iterators (gc) and wait up to `timeout` s for their threads to end; returns
    the names of threads still running at the deadline (empty when all ended)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()  # an unreachable iterator's generators close here, which stops their executor
        alive = active_data_threads()
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return [t.name for t in alive]
        alive[0].join(min(0.5, left))


def shutdown(timeout: float = 30.0) -> None:
    """`ray.shutdown()` once the driver's Ray Data threads have ended (or `timeout` s passed, with a warning)."""
    import ray  # Ray: kept off `cglab --help`'s path (see above)

    if not ray.is_initialized():
        return
    stuck = quiesce(timeout)
    if stuck:
        log.warning("shutting Ray down with Ray Data threads still running after %.0f s: %s", timeout, ", ".join(stuck))
    ray.shutdown()


@functools.cache
def quiesce_at_exit() -> None:
    """Make interpreter exit wait for the Ray Data threads before Ray's own atexit shutdown runs (atexit hooks run
    last-registered first, and Ray registers its hook when imported, before this)."""
    import ray  # noqa: F401  (Ray's hook must be registered before ours)

    atexit.register(quiesce, 10.0)  # bounded: an exit must not hang on a stuck pipeline


def start_local(num_cpus: int, temp_dir: str | None = None, **init_kwargs) -> None:
    """The one place cglab starts a private local Ray: `num_cpus` logical CPUs, no dashboard, worker logs not
    forwarded (unless `init_kwargs` say otherwise), and the exit hook that waits for Ray Data threads."""
    import ray  # Ray: kept off `cglab --help`'s path (see above)

    quiesce_at_exit()
    kw = dict(include_dashboard=False, log_to_driver=False)
    kw.update(init_kwargs)
    if temp_dir is not None:
        kw["_temp_dir"] = str(temp_dir)
    ray.init(address="local", num_cpus=num_cpus, **kw)


@contextlib.contextmanager
def local_ray(num_cpus: int, temp_dir: str | None = None, **init_kwargs) -> Iterator[None]:
    """A private local Ray (no dashboard, worker logs not forwarded, Ray Data progress bars off) for the block."""
    from ray.data import DataContext  # Ray: kept off `cglab --help`'s path (see above)

    start_local(num_cpus, temp_dir, **{"configure_logging": False, **init_kwargs})
    try:
        DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        shutdown()

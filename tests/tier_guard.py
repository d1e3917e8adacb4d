"""Keeps the fast tier honest: a test not marked `slow` (or `gpu`) fails if it starts Ray, an MLflow server or
worker processes, so `make test-fast` (-m "not slow and not gpu") cannot silently grow them. And keeps `make test`'s
two pytest runs apart: a `no_ray` test (run beside the Ray tests: the Makefile's RAY_TESTS) fails if it starts Ray,
here or in any process it starts (its descendants are watched for Ray's GCS and raylet while it runs).

What it sees, from this pytest process: Ray initialised in-process (`ray.init`, `local_ray`), any process started
through subprocess whose command is Ray's (`ray start`, its GCS or raylet) or `mlflow server`, and processes
started by torch's launcher (multi-process torch.distributed, which bypasses subprocess). It does not see what a child
process starts in turn (e.g. `python -m cglab.cli ablate` in a subprocess): such a test is marked by hand.
Setup and call phases count (a module-scoped fixture starts its server in the first test that uses it).
"""

from __future__ import annotations

import multiprocessing.process
import os
import sys
import threading

import pytest

_seen: list[str] = []  # what the current test started, in order
_RAY_BEFORE = pytest.StashKey[bool]()


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return ray is not None and ray.is_initialized()


def _heavy_command(argv) -> str | None:
    words = [argv] if isinstance(argv, (str, bytes)) else list(argv)
    names = [os.path.basename(os.fsdecode(w)) for w in words]
    if not names:
        return None
    if names[0] in ("raylet", "gcs_server"):
        return f"Ray's {names[0]}"
    if names[0] == "ray" and "start" in names:
        return "a Ray node (ray start)"
    if "mlflow" in names and "server" in names:
        return "an MLflow server"
    return None


def _audit(event: str, args) -> None:
    # An audit hook stays for the life of the interpreter; it only appends to a list the hooks below read.
    if event == "subprocess.Popen":
        what = _heavy_command(args[1])
        if what:
            _seen.append(what)


sys.addaudithook(_audit)

_start = multiprocessing.process.BaseProcess.start


def _start_and_record(self):
    # Only torch's process launcher (`torch.multiprocessing.start_processes`, behind cglab.distributed.spawn): the
    # helper processes of one checkpoint save (Megatron's async writer and its Manager) are part of a unit test.
    if getattr(self._target, "__module__", "").startswith("torch.multiprocessing"):
        _seen.append("torch.distributed worker processes (torch.multiprocessing)")
    return _start(self)


multiprocessing.process.BaseProcess.start = _start_and_record


def _watched(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is None and item.get_closest_marker("gpu") is None


class _DescendantRay(threading.Thread):
    """Polls this process's descendants for Ray's GCS or raylet: what a child (e.g. `python -m cglab.cli ...`)
    starts is not seen by the audit hook above."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.found = threading.Event(), []
        self.before = self._ray()  # a Ray an earlier module's fixture left up (a serial run) is not this test's

    @staticmethod
    def _ray() -> dict[int, str]:
        import psutil

        out = {}
        for p in psutil.Process().children(recursive=True):
            try:
                if p.name() in ("gcs_server", "raylet"):
                    out[p.pid] = p.name()
            except psutil.Error:
                continue
        return out

    def _note(self):
        for pid, name in self._ray().items():
            if pid not in self.before and name not in self.found:
                self.found.append(name)

    def run(self):
        while not self.stop.wait(0.2):
            self._note()

    def finish(self) -> list[str]:
        """Stop polling; what this test's descendants started, counting those still running now."""
        self.stop.set()
        self.join()
        self._note()
        return self.found


_RAY_WATCH = pytest.StashKey[_DescendantRay]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    _seen.clear()
    # Ray already up (an earlier slow test's module or package fixture, e.g. tests/data's ray_local, in a full run)
    # cannot be pinned on this test.
    item.stash[_RAY_BEFORE] = _ray_initialized()
    if item.get_closest_marker("no_ray"):
        item.stash[_RAY_WATCH] = watch = _DescendantRay()
        watch.start()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield
    started = list(dict.fromkeys(_seen))
    if not item.stash[_RAY_BEFORE] and _ray_initialized():
        started.insert(0, "Ray (ray.init)")
    if started and _watched(item):
        pytest.fail(
            f"{item.nodeid} is not marked slow but started {', '.join(started)}: mark it "
            "@pytest.mark.slow (or the module: pytestmark = pytest.mark.slow) so `make test-fast` stays fast",
            pytrace=False,
        )
    watch = item.stash.get(_RAY_WATCH, None)
    if watch is not None:
        ray = [w for w in started if "Ray" in w] + [f"Ray's {n} (in a child process)" for n in watch.finish()]
        if ray:
            pytest.fail(
                f"{item.nodeid} is marked no_ray but started {', '.join(ray)}: remove no_ray, so that `make test` "
                "runs it with the other Ray tests, one at a time",
                pytrace=False,
            )
    return result


def pytest_runtest_teardown(item: pytest.Item):
    watch = item.stash.get(_RAY_WATCH, None)
    if watch is not None:
        watch.stop.set()  # a setup that failed never reached the call's check

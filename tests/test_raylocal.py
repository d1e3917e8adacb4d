"""The private local Ray: shutdown waits for the driver's Ray Data threads, including those of an iterator that was
abandoned mid-stream, and the process survives the shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from cglab import raylocal

pytestmark = pytest.mark.slow


def test_quiesce_waits_for_an_active_data_thread_and_reports_a_stuck_one():
    done = threading.Event()
    t = threading.Thread(target=lambda: (time.sleep(1.0), done.set()), name="iter_threaded", daemon=True)
    t.start()
    assert raylocal.quiesce(timeout=10) == []
    assert done.is_set() and not t.is_alive()

    stop = threading.Event()
    stuck = threading.Thread(target=stop.wait, name="StreamingExecutor-test", daemon=True)
    stuck.start()
    try:
        assert raylocal.quiesce(timeout=0.5) == ["StreamingExecutor-test"]
    finally:
        stop.set()
        stuck.join()


# An iterator abandoned after two batches of a slow pipeline, then shutdown at once: the pattern of a test that
# compares a few batches and tears its Ray down. The child prints its threads and must reach the end.
CHILD = """
import threading, time, ray
from cglab import raylocal

def slow(b):
    time.sleep(0.02)
    return {"id": b["id"] * 2}

with raylocal.local_ray(2, temp_dir=TEMP):
    ds = ray.data.range(20000, override_num_blocks=100).map_batches(slow)
    it = iter(ds.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2))
    next(it), next(it)
    del it
    print("active before:", [t.name for t in raylocal.active_data_threads()], flush=True)
    assert raylocal.quiesce(timeout=60) == []
    print("active after:", [t.name for t in raylocal.active_data_threads()], flush=True)
assert not ray.is_initialized()
print("survived", flush=True)
"""


def test_local_ray_shutdown_after_an_abandoned_iterator(tmp_path_factory):
    # A short temp dir: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    code = f"TEMP = {str(tmp_path_factory.mktemp('ray'))!r}\n" + CHILD
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "active after: []" in p.stdout and "survived" in p.stdout, p.stdout


def test_interpreter_exit_waits_for_data_threads(tmp_path):
    # A daemon thread that is still working when the script ends: without the exit hook it dies with the
    # interpreter and never writes its file.
    flag = tmp_path / "finished"
    code = (
        f"import threading, time\nfrom cglab import raylocal\nraylocal.quiesce_at_exit()\n"
        f"def work():\n    time.sleep(1.0)\n    open({str(flag)!r}, 'w').write('ok')\n"
        f"threading.Thread(target=work, name='iter_threaded', daemon=True).start()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert flag.read_text() == "ok"

"""The sandbox really contains hostile programs on this machine, and the host is left unchanged."""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from cglab.eval import sandbox
from cglab.eval.sandbox import Limits, run_program, run_programs

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)
NAMESPACED = sandbox.isolation_mode() != "rlimits-only"
needs_ns = pytest.mark.skipif(not NAMESPACED, reason="kernel allows no namespaces here: rlimits-only mode")


def _sandbox_uid_procs() -> list[int]:
    """Pids on the host owned by a sandbox uid of this process (its 64 pool slots: cglab.eval.sandbox gives each host
    process a block of its own, and an evaluation of another test running meanwhile has another)."""
    lo = sandbox._uid_for_slot(0)
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uid = d.stat().st_uid
            except OSError:
                continue
            if lo <= uid < lo + 64:
                pids.append(int(d.name))
    return pids


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def canary():
    """A world-writable file in a directory outside the sandbox (and outside /tmp, which the jail hides)."""
    d = Path(__file__).parent / f".canary-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    f = d / "canary.txt"
    f.write_text("untouched")
    os.chmod(f, 0o666)
    yield f
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def test_exit_status_and_output():
    ok, bad = run_programs(["print('hello')", "raise SystemExit(3)"], Limits(timeout_s=20))
    assert ok.status == "passed" and ok.stdout.strip() == "hello"
    assert bad.status == "failed" and bad.returncode == 3


def test_isolation_mode_reported():
    res = run_program("pass", Limits(timeout_s=20))
    assert res.isolation == sandbox.isolation_mode()
    if os.geteuid() == 0:
        assert res.isolation == "root-namespaces"  # root: the full jail must be available, else say why


def test_env_is_scrubbed_and_cwd_private():
    os.environ["CGLAB_SECRET_TEST"] = "leak"
    try:
        res = run_program(
            "import os, sys; print(sorted(os.environ)); print(os.getcwd()); print(os.getuid())", Limits(timeout_s=20)
        )
    finally:
        del os.environ["CGLAB_SECRET_TEST"]
    assert res.passed, res.stderr
    assert "CGLAB_SECRET_TEST" not in res.stdout
    if NAMESPACED and os.geteuid() == 0:
        assert int(res.stdout.split()[-1]) != 0  # not root inside


FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(600)   # a detached grandchild that outlives its parent
    os._exit(0)
"""


def _hostile(canary: Path, port: int) -> dict[str, str]:
    return {
        "fork_bomb": FORK_BOMB,
        "infinite_loop": "while True:\n    pass\n",
        "sleep_forever": "import time\ntime.sleep(10**6)\n",
        "allocate": "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n",
        "delete_outside": f"import os\nos.remove({str(canary)!r})\n",
        "rmtree_outside": f"import shutil\nshutil.rmtree({str(canary.parent)!r})\n",
        "overwrite_outside": f"open({str(canary)!r}, 'w').write('pwned')\n",
        "create_outside": f"open({str(canary.parent / 'new.txt')!r}, 'w').write('pwned')\n",
        "fill_disk": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)\n",
        "connect_host": textwrap.dedent(f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=3)
            s.sendall(b'escaped')
            """),
        "connect_internet": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\n",
    }


@needs_ns
def test_hostile_programs_are_contained_and_host_unchanged(canary, tmp_path, monkeypatch):
    # The sandbox's host-side staging dirs (tempfile.mkdtemp, under /tmp, which the jail hides) go to a directory of
    # this test's: other processes' sandboxes, running meanwhile, stage theirs in /tmp.
    host_tmp = tmp_path / "host-tmp"
    host_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    # A listener on the host: a connection from the sandbox would show up here.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100) or b"connected")
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    children_before = _children()
    programs = _hostile(canary, server.getsockname()[1])
    programs["daemon"] = DAEMON
    programs["benign"] = "assert sum(range(10)) == 45\n"
    try:
        results = dict(
            zip(programs, run_programs(list(programs.values()), Limits(timeout_s=4, memory_bytes=512 << 20), workers=2))
        )
    finally:
        stop.set()
        t.join()
        server.close()

    for name, res in results.items():
        if name in ("benign", "daemon"):
            assert res.passed, (name, res.stderr)
        else:
            assert not res.passed, (name, res.status, res.stdout, res.stderr)
            assert res.status in ("failed", "timed out"), (name, res.status, res.stderr)
    assert results["infinite_loop"].status == "timed out"
    assert received == []
    assert canary.read_text() == "untouched"
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary.txt"]
    # Nothing left running: no process of any sandbox uid, no stray children of ours.
    assert _sandbox_uid_procs() == []
    assert _children() <= children_before
    # The private /tmp was a tmpfs: nothing the programs wrote landed in the host's, and the staging dirs are gone.
    assert sorted(p.name for p in host_tmp.iterdir()) == []


@needs_ns
def test_user_namespace_mode_contains_writes_and_network(canary):
    limits = Limits(timeout_s=10)
    if not sandbox._probe("user-namespaces"):
        pytest.skip("unprivileged user namespaces not available")
    uid = sandbox._uid_for_slot(0)
    write = sandbox._run_one(f"open({str(canary)!r}, 'w').write('pwned')", limits, "user-namespaces", uid)
    net = sandbox._run_one(
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\n", limits, "user-namespaces", uid
    )
    remount = sandbox._run_one(
        "import subprocess, sys\nsys.exit(subprocess.call(['mount', '-o', 'remount,rw', '/']))\n",
        limits,
        "user-namespaces",
        uid,
    )
    assert not write.passed and not net.passed and not remount.passed
    assert canary.read_text() == "untouched"

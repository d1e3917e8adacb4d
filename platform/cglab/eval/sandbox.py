"""Run untrusted Python programs (model completions + tests), one process tree each, many in parallel.

Isolation, strongest first; `isolation_mode()` probes the kernel once per process and picks:

- "root-namespaces" (we are root): new pid, network, mount, IPC and UTS namespaces; every mount re-bound
  read-only; a private size-capped tmpfs at /tmp holds the work dir; the program runs as a dedicated
  unprivileged uid (one per pool slot, so RLIMIT_NPROC really caps *its* processes: the per-uid count is
  meaningless for root); rlimits on address space, CPU seconds, file size, open files and processes.
- "user-namespaces" (not root, unprivileged user namespaces allowed): the same namespaces from inside a user
  ns; the program runs one nested user ns further down without capabilities.
- "rlimits-only" (neither): a fresh `python -I` in its own process group with rlimits, a private temp dir and a
  scrubbed env. NO network isolation and no filesystem protection beyond the caller's own permissions; a
  program that calls setsid() can outlive the timeout. Reported in every result and by `isolation_mode()`.

In the namespace modes the program is a descendant of pid 1 of its pid namespace; when that init exits (the
program finished) or is killed (timeout: the host SIGKILLs the launcher's process group), the kernel kills
everything left in the namespace. The network namespace has only a downed loopback, so sockets open but
connect nowhere. Stdout/stderr go to files capped by RLIMIT_FSIZE; we keep their tails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

_JAIL = Path(__file__).with_name("_jail.py")
JAIL_SETUP_FAILED = 97  # keep in sync with _jail.py
_TAIL = 2000


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock for the whole program
    memory_bytes: int = 2 << 30  # RLIMIT_AS
    cpu_seconds: int | None = None  # RLIMIT_CPU; default ceil(timeout_s) + 1
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: any single file written, stdout/stderr included
    open_files: int = 256
    processes: int = 32  # RLIMIT_NPROC for the sandbox uid
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp


@dataclasses.dataclass
class Result:
    status: str  # "passed" | "failed" | "timed out" | "sandbox error"
    returncode: int | None
    stdout: str
    stderr: str
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


STATUSES = ("passed", "failed", "timed out", "sandbox error")


def status_counts(results: Iterable[Result]) -> dict[str, int]:
    """Programs per status, every status present (zero included), keyed passed / failed / timed_out /
    sandbox_error (usable as metric names). Reported beside every pass@k: a sandbox error scores as not passing,
    and only this count tells a broken jail from a wrong program."""
    counts = dict.fromkeys((s.replace(" ", "_") for s in STATUSES), 0)
    for r in results:
        counts[r.status.replace(" ", "_")] += 1
    return counts


_mode_lock = threading.Lock()
_mode: str | None = None


def _probe(mode: str) -> bool:
    res = _run_one("import sys; sys.exit(0)", Limits(timeout_s=20), mode, uid=_uid_for_slot(0))
    return res.passed


def isolation_mode() -> str:
    """The strongest isolation this kernel lets us build (probed by really running a program)."""
    global _mode
    with _mode_lock:
        if _mode is None:
            forced = os.environ.get("CGLAB_SANDBOX_MODE")
            if forced:
                _mode = forced
            else:
                candidates = (["root-namespaces"] if os.geteuid() == 0 else []) + ["user-namespaces"]
                _mode = next((m for m in candidates if _probe(m)), "rlimits-only")
        return _mode


def _uid_for_slot(slot: int) -> int:
    # A high uid nobody else uses, distinct per pool slot and per host process, so concurrent sandboxes
    # do not share an RLIMIT_NPROC budget.
    return 1_800_000_000 + (os.getpid() % 100_000) * 64 + slot


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - _TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _run_one(program: str, limits: Limits, mode: str, uid: int) -> Result:
    host_dir = Path(tempfile.mkdtemp(prefix="cglab-sbx-"))  # 0700, ours; the jail never sees it (tmpfs /tmp)
    try:
        prog_file = host_dir / "prog.py"
        prog_file.write_text(program)
        workdir = host_dir / "work"
        workdir.mkdir()
        (workdir / "prog.py").write_text(program)
        namespaces = mode != "rlimits-only"
        spec = {
            "program_file": str(prog_file),
            "namespaces": namespaces,
            "userns": mode == "user-namespaces",
            "uid": uid if mode == "root-namespaces" else None,
            "python_prefix": sys.base_prefix,
            "python_rel": _python_rel(),
            "python": os.path.realpath(sys.executable),
            "workdir": str(workdir),
            "tmpfs_bytes": limits.tmpfs_bytes,
            "limits": {
                "memory_bytes": limits.memory_bytes,
                "cpu_seconds": limits.cpu_seconds or math.ceil(limits.timeout_s) + 1,
                "file_bytes": limits.file_bytes,
                "open_files": limits.open_files,
                "processes": limits.processes,
            },
        }
        out_path, err_path = host_dir / "stdout", host_dir / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [os.path.realpath(sys.executable), "-I", "-S", str(_JAIL), json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=str(workdir),
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,
                close_fds=True,
            )
            try:
                rc = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also sweeps a degraded-mode program's leftover children
                rc = proc.wait()
        if timed_out:
            status = "timed out"
        elif rc == JAIL_SETUP_FAILED:
            status = "sandbox error"
        else:
            status = "passed" if rc == 0 else "failed"
        return Result(status, None if timed_out else rc, _tail(out_path), _tail(err_path), mode)
    finally:
        if mode == "rlimits-only":
            _chmod_tree_writable(host_dir)  # a hostile program may have chmod'ed its own files
        shutil.rmtree(host_dir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _chmod_tree_writable(root: Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o700)
            except OSError:
                pass


def _python_rel() -> str:
    exe = os.path.realpath(sys.executable)
    rel = os.path.relpath(exe, sys.base_prefix)
    if rel.startswith(".."):  # a venv whose interpreter lives elsewhere: use the base one by name
        rel = f"bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return rel


def run_program(program: str, limits: Limits | None = None) -> Result:
    """Run one program in the sandbox; passed iff it exits 0 within the limits."""
    return run_programs([program], limits, workers=1)[0]


def run_programs(
    programs: Sequence[str] | Iterable[str], limits: Limits | None = None, workers: int | None = None
) -> list[Result]:
    """Run programs in parallel (one sandbox each, `workers` at a time); results in input order."""
    programs = list(programs)
    limits = limits or Limits()
    mode = isolation_mode()
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
    slots: queue.Queue[int] = queue.Queue()
    for s in range(workers):
        slots.put(s)

    def task(program: str) -> Result:
        slot = slots.get()
        try:
            return _run_one(program, limits, mode, _uid_for_slot(slot))
        finally:
            slots.put(slot)

    # Threads only wait on child processes; the work runs in the sandboxes, in parallel across cores.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(task, programs))


def end_marker() -> str:
    """A fresh token for `program_end(marker)` / `require_end(...)`: a program's own code cannot know it in advance."""
    return f"cglab-end-{secrets.token_hex(8)}"


def program_end(marker: str) -> str:
    """The last line to append to a scored program: it prints `marker` once everything before it has run."""
    return f"\nimport sys as _cglab_sys\n_cglab_sys.stdout.write({marker!r} + '\\n')\n_cglab_sys.stdout.flush()\n"


def require_end(results: Sequence[Result], marker: str) -> list[Result]:
    """Exit status 0 is not enough: a completion that calls `sys.exit(0)` or `os._exit(0)` before the tests
    would pass them unread. A program passes only if it also printed `marker` (its last line, `program_end`);
    otherwise its status becomes "failed"."""
    return [
        dataclasses.replace(r, status="failed", stderr=r.stderr + "\n(exited 0 before the end of the tests)")
        if r.passed and marker not in r.stdout
        else r
        for r in results
    ]

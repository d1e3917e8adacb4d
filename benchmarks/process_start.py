"""What starting a process costs that every trial, worker and test pays, side by side with the stock behaviour.

    PYTHONPATH=platform python benchmarks/process_start.py [--repeat 3] [--out FILE] [--note TEXT]

Two rows of pairs, each measured `--repeat` times in fresh processes (medians shown):
- `mlflow server` on a SQLite store as MLflow 3.x starts it (job execution on: its huey consumers) and as cglab
  starts it (cglab.track.server.SERVER_ENV): seconds until /health answers, then the server's processes, their
  resident memory and their CPU seconds 5 s after that.
- a fresh interpreter importing what a Ray Train worker imports (cglab.train.loop, cglab.model.codegen) with
  Megatron-Core's import-time torch.compile (cglab's deferral hook removed from sys.meta_path first) and with it
  deferred (cglab/__init__.py): wall and CPU seconds, and whether Inductor was loaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

IMPORT = """
import sys, time
t0, c0 = time.perf_counter(), time.process_time()
import cglab
if {stock}:
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_DeferMegatronCompile"]
import cglab.train.loop, cglab.model.codegen
print(time.perf_counter() - t0, time.process_time() - c0, "torch._inductor.compile_fx" in sys.modules)
"""


def server(stock: bool) -> dict:
    """`stock`: MLflow's default, job execution on (a user's setting wins over SERVER_ENV); else cglab's."""
    from cglab.track.server import SERVER_ENV, make_server

    saved = {k: os.environ.pop(k) for k in SERVER_ENV if k in os.environ}
    if stock:
        os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true"
    try:
        with tempfile.TemporaryDirectory() as d:
            s = make_server(d)
            t = time.perf_counter()
            s.start(None)
            up = time.perf_counter() - t
            time.sleep(5)
            root = psutil.Process(s.proc.pid)
            procs = [root, *root.children(recursive=True)]
            cpu = sum(sum(p.cpu_times()[:2]) for p in procs)
            rss = sum(p.memory_info().rss for p in procs) / 2**20
            s.stop()
        return dict(healthy_s=up, processes=len(procs), rss_mib=rss, cpu_s=cpu)
    finally:
        os.environ.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)
        os.environ.update(saved)


def imports(stock: bool) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(
        [sys.executable, "-c", IMPORT.format(stock=stock)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "platform"), "PYTHONWARNINGS": "ignore"},
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, _cpu, inductor = p.stdout.split()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # the whole process, startup too
    return dict(wall_s=float(wall), cpu_s=cpu, inductor=inductor == "True")


def median(rows: list[dict]) -> dict:
    return {
        k: (statistics.median(r[k] for r in rows) if not isinstance(rows[0][k], bool) else rows[0][k]) for k in rows[0]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    load0 = os.getloadavg()
    res = {}
    for name, fn in (("server", server), ("imports", imports)):
        for stock in (True, False):
            res[name, stock] = median([fn(stock) for _ in range(a.repeat)])
    load1 = os.getloadavg()
    import torch

    lines = [
        f"benchmarks/process_start.py --repeat {a.repeat}: medians of fresh processes",
        f"at commit {commit.strip()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in load0)}; at end: {' '.join(f'{x:.2f}' for x in load1)}",
        *([f"note: {a.note}"] if a.note else []),
        "",
        f"{'mlflow server (SQLite store)':44}{'MLflow default':>16}{'cglab':>16}",
    ]
    s0, s1 = res["server", True], res["server", False]
    lines += [
        f"{'seconds until /health answers':44}{s0['healthy_s']:16.1f}{s1['healthy_s']:16.1f}",
        f"{'processes':44}{s0['processes']:16.0f}{s1['processes']:16.0f}",
        f"{'resident memory, MiB':44}{s0['rss_mib']:16.0f}{s1['rss_mib']:16.0f}",
        f"{'CPU seconds, up to 5 s after healthy':44}{s0['cpu_s']:16.1f}{s1['cpu_s']:16.1f}",
        "",
        f"{'a Train worker imports cglab + Megatron':44}{'compile at import':>16}{'deferred':>16}",
    ]
    i0, i1 = res["imports", True], res["imports", False]
    lines += [
        f"{'wall seconds (imports)':44}{i0['wall_s']:16.2f}{i1['wall_s']:16.2f}",
        f"{'CPU seconds (the whole process)':44}{i0['cpu_s']:16.2f}{i1['cpu_s']:16.2f}",
        f"{'Inductor loaded':44}{str(i0['inductor']):>16}{str(i1['inductor']):>16}",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

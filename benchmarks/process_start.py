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
    ]

    def table(title: str, heads: tuple[str, str], key: str, rows: tuple[tuple[str, str, str], ...]) -> list[str]:
        """A header and one line per (label, field, format) of the stock run beside cglab's."""
        stock, ours = res[key, True], res[key, False]
        out = [f"{title:44}{heads[0]:>16}{heads[1]:>16}"]
        return out + [f"{label:44}{format(stock[f], fmt):>16}{format(ours[f], fmt):>16}" for label, f, fmt in rows]

    lines += table(
        "mlflow server (SQLite store)",
        ("MLflow default", "cglab"),
        "server",
        (
            ("seconds until /health answers", "healthy_s", ".1f"),
            ("processes", "processes", ".0f"),
            ("resident memory, MiB", "rss_mib", ".0f"),
            ("CPU seconds, up to 5 s after healthy", "cpu_s", ".1f"),
        ),
    )
    lines += [""] + table(
        "a Train worker imports cglab + Megatron",
        ("compile at import", "deferred"),
        "imports",
        (
            ("wall seconds (imports)", "wall_s", ".2f"),
            ("CPU seconds (the whole process)", "cpu_s", ".2f"),
            ("Inductor loaded", "inductor", ""),
        ),
    )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

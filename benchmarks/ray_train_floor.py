"""What one Ray Train run costs before and after its training function, with nothing of cglab's in it: the floor
under benchmarks/trial_overhead.py's per-trial overhead (issue 25 asks for <= 10 s a trial).

    python benchmarks/ray_train_floor.py [--runs 4] [--out FILE] [--note TEXT]

A private local Ray (4 logical CPUs), then `--runs` back-to-back `TorchTrainer.fit` calls, one worker each, whose
training function only records when its process was created and when it ran. Per run: seconds from `fit` to the
worker's process start, to the function running, and to `fit` returning; and the Train controller's process start
(before `fit`: an idle process Ray had started, which the controller actor took) and whether it had loaded torch.
The same with Ray's `preload_python_modules` (torch, ray.train.torch imported by every new worker process before it
takes work), the knob Ray offers for import cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = r"""
import json, os, sys, tempfile, time
import psutil, ray
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as cglab.train.trainer sets it
preload = sys.argv[2] == "preload"
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
         _system_config={"preload_python_modules": ["torch", "ray.train.torch"]} if preload else None)
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
store = tempfile.mkdtemp()

def fn(config):
    import psutil
    ctl = [p for p in psutil.process_iter(["name", "cmdline"])
           if "TrainController" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or ())]
    rec = {"worker_created": psutil.Process().create_time(), "fn_ran": time.time(),
           "controller_created": [p.create_time() for p in ctl],
           "controller_torch": [any("libtorch_cpu" in m.path for m in p.memory_maps()) for p in ctl]}
    with open(os.path.join(config["out"], "rec.json"), "w") as f:
        json.dump(rec, f)

time.sleep(5)  # the prestarted workers up before the first run, as in a sweep's later trials
rows = []
for i in range(int(sys.argv[1])):
    t0 = time.time()
    TorchTrainer(fn, train_loop_config={"out": store}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=store, name=f"r{i}")).fit()
    t1 = time.time()
    rec = json.load(open(os.path.join(store, "rec.json")))
    rows.append({"worker process start": rec["worker_created"] - t0, "function running": rec["fn_ran"] - t0,
                 "fit returned": t1 - t0,
                 "controller process start": min(rec["controller_created"], default=float("nan")) - t0,
                 "controller had torch": all(rec["controller_torch"])})
print("ROWS " + json.dumps(rows))
"""

PHASES = ("controller process start", "worker process start", "function running", "fit returned")


def measure(runs: int, mode: str) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(RUN)
    try:
        out = subprocess.run([sys.executable, f.name, str(runs), mode], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    line = next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))
    return json.loads(line[5:])


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        f"{'seconds from fit() (median of runs 2..N; run 1 in brackets)':62}" + "".join(f"{m:>22}" for m in results)
    ]
    for phase in PHASES:
        cells = []
        for rows in results.values():
            later = [r[phase] for r in rows[1:]] or [rows[0][phase]]
            cells.append(f"{statistics.median(later):+8.2f} [{rows[0][phase]:+6.2f}]")
        lines.append(f"{phase:62}" + "".join(f"{c:>22}" for c in cells))
    had = ["yes" if all(r["controller had torch"] for r in rows) else "no" for rows in results.values()]
    lines.append(f"{'controller process had torch loaded':62}" + "".join(f"{h:>22}" for h in had))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    results = {"Ray's default": measure(args.runs, "default"), "preload torch": measure(args.runs, "preload")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = "\n".join(
        [
            f"benchmarks/ray_train_floor.py --runs {args.runs}: "
            "one-worker TorchTrainer.fit, a function that does nothing",
            f"at commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU; load average at end: {os.getloadavg()}",
            f"note: {args.note}" if args.note else "",
            "",
            table(results),
            "",
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What evaluating while training costs the training: the same small CPU run with eval.code_every=0 and with
eval.code_every=K (pass@1 on the fixed HumanEval / HumanEval-Infill subset, in the sandbox, in a Ray task of its
own: cglab.eval.periodic), in one run of this script, on one local Ray.

    PYTHONPATH=platform python benchmarks/code_eval_overhead.py [--steps 200] [--every 50] [--limit 4]
        [--out benchmarks/results/code_eval_cpu.txt]

Per run: mean / median step time and mean data wait (from the run's metrics.jsonl), wall time of `fit`, evaluations
done and skipped, and the evaluation tasks' CPU seconds (their process and the sandbox's children). The goal
(issue 17): training must not slow by more than the CPU the evaluation takes from it, i.e.
    training time lost = [sum(step_time) + snapshot pauses] with - the same without  <=  CPU s of the eval tasks;
the last column is that ratio (<= 1 meets it): the snapshot each evaluation starts from pauses the loop, so it is
training time lost too. `--abba` runs without, with, with, without and compares the means of each pair, so that a
load that drifts over the measurement weighs on both alike. The header records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cglab.eval.periodic import PeriodicEval, read_evals
from cglab.raylocal import local_ray
from cglab.train.trainer import fit, history
from cglab.tune.presets import base_config, micro_corpus_sources


def _cfg(sources, steps: int, every: int, limit: int, task_cpus: float):
    return base_config(
        "laptop",
        overrides=[
            f"data.sources={json.dumps(sources)}",
            # wider than the laptop's tiny model, so a step is long enough to see contention
            "model.num_layers=4",
            "model.hidden_size=256",
            "model.num_attention_heads=4",
            "model.rotary_dim=16",
            f"train.train_steps={steps}",
            "train.checkpoint_every=0",
            "eval.every=0",
            f"eval.code_every={every}",
            f"eval.code_limit={limit}",
            f"eval.task_cpus={task_cpus}",
            "track.system_metrics=false",
        ],
    )


def run_case(cfg, storage: str, name: str, callbacks) -> dict:
    t0 = time.perf_counter()
    out = fit(cfg, storage_path=storage, name=name, callbacks=callbacks)
    wall = time.perf_counter() - t0
    steps = [r for _, r in sorted(history(out["run_dir"]).items())]
    evals = read_evals(out["run_dir"])
    step_t = [r["step_time_s"] for r in steps]
    return dict(
        name=name,
        steps=len(steps),
        mean_step_s=statistics.fmean(step_t),
        median_step_s=statistics.median(step_t),
        sum_step_s=sum(step_t),
        mean_data_wait_s=statistics.fmean(r["data_wait_s"] for r in steps),
        snapshot_s=sum(r.get("eval_task/snapshot_s", 0.0) for r in steps),
        wall_s=wall,
        evals_done=sum(1 for r in evals.values() if "metrics" in r),
        evals_failed=sum(1 for r in evals.values() if "error" in r),
        evals_skipped=int(max([r.get("eval/skipped", 0.0) for r in steps] or [0])),
        eval_cpu_s=sum(r["metrics"]["eval_task/cpu_s"] for r in evals.values() if "metrics" in r),
        eval_wall_s=sum(r["metrics"]["eval_task/seconds"] for r in evals.values() if "metrics" in r),
        pass_at_1={
            s: r["metrics"].get("code_eval/humaneval_pass_at_1") for s, r in sorted(evals.items()) if "metrics" in r
        },
    )


def table(rows: list[dict]) -> str:
    head = (
        f"{'run':<18}{'steps':>6}{'mean step s':>13}{'median s':>10}{'data wait s':>13}{'snapshot s':>12}"
        f"{'wall s':>9}{'evals':>7}{'skipped':>9}{'eval CPU s':>12}{'lost/CPU':>10}"
    )
    lines = [head]
    base = statistics.fmean(r["sum_step_s"] + r["snapshot_s"] for r in rows if not r["eval_cpu_s"])
    for r in rows:
        lost = r["sum_step_s"] + r["snapshot_s"] - base
        ratio = f"{lost / r['eval_cpu_s']:.2f}" if r["eval_cpu_s"] else "-"
        lines.append(
            f"{r['name']:<18}{r['steps']:>6}{r['mean_step_s']:>13.4f}{r['median_step_s']:>10.4f}"
            f"{r['mean_data_wait_s']:>13.5f}{r['snapshot_s']:>12.2f}{r['wall_s']:>9.1f}{r['evals_done']:>7}"
            f"{r['evals_skipped']:>9}{r['eval_cpu_s']:>12.1f}{ratio:>10}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--task-cpus", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results/code_eval_cpu.txt")
    ap.add_argument("--abba", action="store_true", help="without, with, with, without (cancels a drifting load)")
    args = ap.parse_args()
    sources = micro_corpus_sources()
    load0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cglab-bench-eval-") as storage:
        off = _cfg(sources, args.steps, 0, args.limit, args.task_cpus)
        on = _cfg(sources, args.steps, args.every, args.limit, args.task_cpus)
        # a private Ray (never a cluster `ray start` left on this machine): the Train worker, its data tasks and
        # the evaluation task
        with local_ray(2 + math.ceil(args.task_cpus), f"{storage}/ray", log_to_driver=False):
            order = ["off", "on", "on", "off"] if args.abba else ["off", "on"]
            rows = [
                run_case(off, storage, f"code_every=0-r{i}", ())
                if which == "off"
                else run_case(on, storage, f"code_every={args.every}-r{i}", (PeriodicEval(),))
                for i, which in enumerate(order)
            ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    import torch

    header = [
        f"# benchmarks/code_eval_overhead.py, commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"# PYTHONPATH=platform python benchmarks/code_eval_overhead.py --steps {args.steps} --every {args.every} "
        f"--limit {args.limit} --task-cpus {args.task_cpus}{' --abba' if args.abba else ''}",
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU",
        f"# uptime at the start: {load0}",
        f"# uptime at the end:   {load}",
        f"# model d256 L4, seq 128, global batch 8, 1 CPU Train worker; the eval task: {args.task_cpus} CPU, "
        f"first {args.limit} HumanEval + {args.limit} single-line HumanEval-Infill, n=1 greedy, sandboxed",
        "# lost/CPU: (steps + snapshot pauses of this run - the mean of the runs without) / this run's evaluation CPU "
        "seconds; <= 1 meets the goal",
        f"# script wall time {time.time() - t0:.0f} s",
    ]
    text = "\n".join(header) + "\n" + table(rows) + "\n"
    text += "# pass@1 per evaluated step: " + json.dumps(rows[1]["pass_at_1"]) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(text + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

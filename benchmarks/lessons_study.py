"""The five CodeGen2 lessons at the `study` preset (cglab.tune.presets) on this machine, written up as
benchmarks/results/lessons_study.md: per lesson the variants x metrics table with 95% intervals over seeds, the
verdict per metric, the decision stability, the curves and the wall time; beside it lessons_study.json, every
trial's final metrics per lesson, variant and seed: the pilot `cglab plan --lesson N --pilot` sizes seeds from.

    PYTHONPATH=platform python benchmarks/lessons_study.py [--lessons 1 2 3 4 5] [--seeds 1 2 3]
        [--workdir .cglab/study] [--out benchmarks/results/lessons_study.md]

Each lesson is `cglab ablate N --preset study` (the same `run_lesson`, on one local Ray and one MLflow server on a
SQLite store under WORKDIR/mlflow), then `cglab report` of that sweep. A lesson whose sweep already finished under
WORKDIR is resumed (nothing re-runs) and keeps its first wall time (WORKDIR/walls.json). The plots go next to OUT
(OUT's stem as folder). What is written by hand after a run (N=0: how to read the study; N: a paragraph on lesson N)
sits between `<!-- reading N -->` and `<!-- /reading N -->` and survives regeneration; it names the commit it was
written for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from cglab.config import ConfigError
from cglab.data.corpus import SUMMARY
from cglab.raylocal import shutdown
from cglab.report import stability_lines, text_table, verdict_lines, write_report
from cglab.track.server import make_server, sqlite_uri
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config, get_preset, package_corpus_sources
from cglab.tune.sweep import run_lesson

READING = re.compile(r"<!-- reading (\d) -->\n(.*?)<!-- /reading \1 -->", re.S)


def corpus(root: Path) -> tuple[list[dict], dict]:
    """The study corpus's sources (the preset's own corpus, built under root if missing) and its build summary."""
    sources = package_corpus_sources(root)
    return sources, json.loads((root / SUMMARY).read_text())


def machine() -> str:
    import torch

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {model}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU"


def commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return sha + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def corpus_lines(summary: dict) -> list[str]:
    rows = ["| source | split | documents | bytes | pre-tokens |", "|---|---|---:|---:|---:|"]
    for src in ("stack", "pile"):
        for split in ("train", "heldout"):
            s = summary[src][split]
            rows.append(f"| {src} | {split} | {s['documents']:,} | {s['bytes']:,} | {s['pretokens']:,} |")
    held = ", ".join(summary["packages"]["heldout"])
    return rows + [
        "",
        f"{len(summary['packages']['train'])} packages for training, {len(summary['packages']['heldout'])} held "
        f"out ({held}); dropped by the CodeGen filters and dedup: {summary['dropped']}.",
    ]


def lesson_section(n: int, report_md: dict, reading: str) -> list[str]:
    les = get_lesson(n)
    r = report_md
    out = [
        f"## Lesson {n}: {les.question}",
        "",
        f"Paper: {les.finding}",
        "",
        f"Variants: {', '.join(v.name for v in les.variants)}; seeds {r['seeds']}; "
        f"wall time **{r['wall_s'] / 60:.1f} min** for {r['trials']} trials, run at commit {r['commit']}"
        + (" (resumed: the wall time of the run that did the work)" if r.get("resumed") else "")
        + ".",
        "",
        "```",
        r["table"],
        "```",
        "",
        "Verdicts on the contrasts the lesson declared (a - b with its 90% interval, paired by seed; margin; "
        "p raw and Holm-adjusted over the lesson's contrasts):",
        "",
        *[f"- {line}" for line in r["verdicts"]],
        "",
        "Decision stability (from which evaluation on the ranking and verdict held; whether a 4x shorter run "
        "would have said the same):",
        "",
        "```",
        *r["stability"],
        "```",
        "",
        *[f"![{Path(p).stem}]({p})" for p in r["plots"]],
        "",
        *reading_block(n, reading),
        "",
    ]
    return out


def reading_block(n: int, reading: str) -> list[str]:
    """What is written by hand (0: the whole study's caveats; N: lesson N), kept when the file is regenerated."""
    return [f"<!-- reading {n} -->", reading.strip() or "_Reading: not written yet._", f"<!-- /reading {n} -->"]


def pilot_data(samples: dict[int, dict], **meta) -> dict:
    """What OUT's .json holds: meta, then per lesson variant -> metric -> seed -> value (LessonRuns.samples), the
    shape cglab.tune.power.pilot_samples reads."""
    return {**meta, "lessons": {str(n): s for n, s in samples.items()}}


def run(n: int, name: str, pre, base, seeds, work: Path, uri: str, sha: str, walls: dict) -> None:
    """Lesson n's sweep (resumed if it exists); its wall time and commit into walls unless it only resumed."""
    t0 = time.monotonic()
    res = run_lesson(
        n, preset=pre, base=base, seeds=seeds, storage_path=str(work / "tune"), name=name, tracking_uri=uri, verbose=0
    )
    if res.errors:
        raise RuntimeError(f"lesson {n}: {len(res.errors)} trials failed: {res.errors}")
    if name not in walls or not res.restored:
        walls[name] = dict(wall_s=time.monotonic() - t0, resumed=res.restored, commit=sha)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lessons", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the study preset's")
    p.add_argument("--workdir", default=".cglab/study")
    p.add_argument("--out", default="benchmarks/results/lessons_study.md")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite OUT from the sweeps already finished under WORKDIR (their store read in place), running nothing",
    )
    args = p.parse_args()

    sha = commit()  # before any edit: the code the trials run
    at = f"commit {sha}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    plots_dir = out.with_suffix("")  # benchmarks/results/lessons_study/
    plots_dir.mkdir(parents=True, exist_ok=True)
    readings = {int(m.group(1)): m.group(2) for m in READING.finditer(out.read_text())} if out.is_file() else {}
    walls_path = work / "walls.json"
    walls = json.loads(walls_path.read_text()) if walls_path.is_file() else {}

    pre = get_preset("study")
    seeds = tuple(args.seeds or pre.seeds)
    sources, summary = corpus(work / "pkgcorpus")
    base = base_config(pre, None, [f"data.sources={json.dumps(sources)}"])
    server = None if args.report_only else make_server(work / "mlflow").start()
    uri = server.uri if server else sqlite_uri(work / "mlflow" / "mlflow.db")
    sections: dict[int, dict] = {}
    try:
        for n in args.lessons:
            name = f"study-lesson-{n}-seeds-{'-'.join(map(str, seeds))}"
            if args.report_only:
                if name not in walls:
                    raise ConfigError(f"lesson {n}: no finished sweep {name} under {work}; run without --report-only")
            else:
                run(n, name, pre, base, seeds, work, uri, sha, walls)
                walls_path.write_text(json.dumps(walls, indent=1))
            html, runs = write_report(n, uri, work / "reports" / f"lesson-{n}.html", name, record=server is not None)
            plots = []
            for png in sorted(html.parent.glob(f"lesson-{n}*.png")):
                shutil.copy(png, plots_dir / png.name)
                plots.append(f"{plots_dir.name}/{png.name}")
            sections[n] = dict(
                seeds=", ".join(map(str, seeds)),
                trials=len(runs.run_ids),
                wall_s=walls[name]["wall_s"],
                resumed=walls[name]["resumed"],
                commit=walls[name].get("commit", "?"),
                table=text_table(runs),
                verdicts=verdict_lines(runs),
                stability=stability_lines(runs.stability()),
                plots=plots,
                outcomes=[(o.contrast.name, o.verdict) for o in runs.outcomes()],
                samples=runs.samples,
            )
            print(f"lesson {n}: {walls[name]['wall_s'] / 60:.1f} min", flush=True)
    finally:
        if server is not None:
            server.stop()
            shutdown()

    cmd = "PYTHONPATH=platform python benchmarks/lessons_study.py " + " ".join(
        ["--lessons", *map(str, args.lessons), "--seeds", *map(str, seeds)]
    )
    lines = [
        "# The five CodeGen2 lessons at CPU study scale",
        "",
        f"Generated by `{cmd}` (benchmarks/lessons_study.py); written at {at}, on {machine()}.",
        "",
        f"Preset `study`: {pre.description}. Every trial: {', '.join(pre.overrides)}.",
        "",
        "Corpus: the installed packages' Python code (Stack layout) and documentation (Pile layout), "
        "`cglab corpus build --source packages` with the study budgets; held out by package:",
        "",
        *corpus_lines(summary),
        "",
        "| lesson | contrast | verdict | wall time |",
        "|---|---|---|---:|",
    ]
    for n, s in sections.items():
        for i, (contrast, verdict) in enumerate(s["outcomes"]):
            lines.append(
                f"| {n} | {contrast} | {verdict} | {s['wall_s'] / 60:.1f} min |"
                if i == 0
                else f"| | {contrast} | {verdict} | |"
            )
    lines += ["", "### How to read it", "", *reading_block(0, readings.get(0, "")), ""]
    for n, s in sections.items():
        lines += lesson_section(n, s, readings.get(n, ""))
    out.write_text("\n".join(lines))
    data = pilot_data({n: s["samples"] for n, s in sections.items()}, generated_by=cmd, at=at, preset=pre.name)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, sort_keys=True))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as err:
        raise SystemExit(f"lessons_study: {err}") from None

"""`cglab demo`: the whole platform on one laptop in minutes. Builds the micro corpus, starts a local Ray
and an MLflow server on a SQLite store, runs one CodeGen2 lesson grid at laptop scale, prints the comparison
table and verdict, writes the HTML report, and says how to open the MLflow UI on those runs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cglab import raylocal
from cglab.data.corpus import build_corpus, corpus_sources
from cglab.report import DEFAULT_UI, collect, link_lines, text_table, verdict_lines, write_report
from cglab.track.server import make_server
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="one CodeGen2 lesson end to end on this machine (minutes)")
    p.add_argument("--lesson", type=int, default=2, help="which lesson grid to run (default 2: clm vs infill)")
    p.add_argument("--workdir", default=".cglab/demo", help="corpus, MLflow store, Tune storage, report")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial (default: laptop preset)")
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs for the local Ray (default: all cores, at least what one trial needs)",
    )
    p.set_defaults(func=run_demo)


def _step(msg: str, t0: float) -> None:
    print(f"[demo {time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    # the sweep (Ray, torch) and the report (mlflow, matplotlib): seconds to import, kept off `cglab --help`
    # torch and pyarrow (the sweep): kept off `cglab --help`'s path
    from cglab.tune.sweep import run_lesson

    t0 = time.monotonic()
    lesson = get_lesson(args.lesson)
    work = Path(args.workdir).resolve()
    corpus = work / "corpus"
    if not (corpus / "stack").is_dir() or not any((corpus / "stack").iterdir()):
        _step(f"building the micro corpus in {corpus}", t0)
        summary = build_corpus(corpus)
        _step(f"corpus: {summary['pile']['documents']} NL documents, {summary['stack']['documents']} code files", t0)
    overrides = [f"data.sources={_yaml_list(corpus_sources(corpus))}"]
    if args.steps:
        overrides.append(f"train.train_steps={args.steps}")
    base = base_config("laptop", overrides=overrides)

    server = make_server(work / "mlflow")
    _step(f"starting MLflow at {server.uri} (store {server.backend_store_uri})", t0)
    server.start()
    try:
        if args.num_cpus:
            raylocal.start_local(args.num_cpus)
        try:
            name = f"demo-lesson{lesson.number}-{time.strftime('%Y%m%d-%H%M%S')}"
            _step(
                f"lesson {lesson.number} ({lesson.question}): {len(lesson.variants)} variants, "
                f"{base.train.train_steps} steps each",
                t0,
            )
            # Trials train with cglab.train.trainer.fit, then evaluate on the held-out split.
            res = run_lesson(
                lesson,
                preset="laptop",
                base=base,
                storage_path=str(work / "tune"),
                name=name,
                tracking_uri=server.uri,
                resume=False,
                verbose=0,
            )
        finally:
            raylocal.shutdown()
        for r in res.errors:
            print(f"trial {r['variant']} failed: {r['error']}")
        runs = collect(lesson, server.uri, res.name)
        out, _ = write_report(lesson, server.uri, work / f"lesson-{lesson.number}.html", res.name)
        _step("done", t0)
        print()
        print(text_table(runs))
        print()
        print("\n".join(verdict_lines(runs)))
        print(f"\nPaper: {lesson.finding}")
        print(f"\nReport: {out}")
        print("\n".join(link_lines(runs, DEFAULT_UI, work / "mlflow")))
    finally:
        server.stop()
    return 1 if res.errors else 0


def _yaml_list(items: list[dict]) -> str:
    return json.dumps(items)  # JSON is YAML: one override carries the whole list

"""`cglab ablate LESSON [--preset laptop|1gpu|cluster] [key=value ...]`: run (or resume) a lesson's grid."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from cglab.config import CGLabConfig, ConfigError
from cglab.report import DEFAULT_UI, collect, link_lines, text_table, verdict_lines, write_report
from cglab.track.server import DEFAULT_ROOT, make_server
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config, get_preset, preset_corpus_sources


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lesson", type=int, help="1-5 (see cglab.tune.lessons)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every variant, e.g. train.lr=1e-3")
    p.add_argument("--preset", default="laptop", help="laptop | study | 1gpu | cluster (default laptop)")
    p.add_argument("--config", default=None, help="base YAML (data sources, tokenizer, ...)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one trial per variant and seed")
    p.add_argument("--variants", nargs="+", default=None, help="subset of the lesson's variants")
    p.add_argument("--storage-path", default=".cglab/tune", help="Tune/Train storage (local dir or s3://...)")
    p.add_argument("--name", default=None, help="sweep name; the same name resumes an interrupted sweep")
    p.add_argument("--no-resume", action="store_true", help="start over even if the sweep exists")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow server (default $MLFLOW_TRACKING_URI, else a local one under .cglab/mlflow)",
    )
    p.add_argument("--max-concurrent-trials", type=int, default=None, help="default: what resources allow")
    p.add_argument("--report", default=None, metavar="HTML", help="write the lesson report here afterwards")


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="run a CodeGen2 lesson's variants as a Ray Tune grid")
    add_arguments(p)
    p.set_defaults(func=ablate)


def base_of(args: argparse.Namespace) -> CGLabConfig:
    """The sweep's base config from the command line: the lesson and preset checked, the config and overrides
    applied, the preset's own corpus when the config names no data; a ConfigError naming what to pass when there
    is no data at all. Before Ray starts."""
    get_lesson(args.lesson)
    preset = get_preset(args.preset)
    base = base_config(preset, args.config, args.overrides)
    if not base.data.sources and preset.corpus:
        sources = preset_corpus_sources(preset)
        print(f"data: the {preset.corpus} corpus ({sources[0]['paths'][0]}, {sources[1]['paths'][0]})")
        base = base_config(preset, args.config, [f"data.sources={json.dumps(sources)}", *args.overrides])
    if not base.data.sources:
        raise ConfigError(
            f"data.sources: no sources configured for --preset {preset.name}; pass --config with data.sources "
            "(on a cluster: --config jobs/configs/cluster_data.yaml, its bucket filled in); only the laptop and "
            "study presets fall back to a corpus of their own"
        )
    return base


def ablate(args: argparse.Namespace) -> int:
    # the sweep (Ray, torch) and the report (mlflow, matplotlib): seconds to import, kept off `cglab --help`
    # torch and pyarrow (the sweep): kept off `cglab --help`'s path
    from cglab.tune.sweep import run_lesson

    t0 = time.monotonic()
    preset = get_preset(args.preset)
    base = base_of(args)  # config errors surface before Ray starts
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    with contextlib.ExitStack() as stack:
        if not uri:
            server = make_server().start()
            stack.callback(server.stop)
            uri = server.uri
            print(f"MLflow: started {uri} (store {server.backend_store_uri}); reopen later with `cglab mlflow up`")
        res = run_lesson(
            args.lesson,
            preset=preset,
            base=base,
            seeds=tuple(args.seeds or ()) or None,
            variants=tuple(args.variants) if args.variants else None,
            storage_path=args.storage_path,
            name=args.name,
            tracking_uri=uri,
            max_concurrent_trials=args.max_concurrent_trials,
            resume=not args.no_resume,
        )
        for r in res.errors:
            print(f"trial {r['variant']} seed {r['seed']} failed: {r['error']}")
        runs = collect(res.lesson, uri, res.name)
        print(text_table(runs))
        print("\n".join(verdict_lines(runs)))
        if args.report:
            out, _ = write_report(res.lesson, uri, args.report, res.name)
            print(f"wrote {out}")
        print(f"sweep {res.name}: {res.path}; resume with the same --name ({time.monotonic() - t0:.0f} s)")
        if not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):  # its own server stops with it
            print("\n".join(link_lines(runs, DEFAULT_UI, DEFAULT_ROOT)))
            print(
                f"report later: `cglab report --lesson {res.lesson.number}` (from this directory, it reads "
                f"the same store)"
            )
        elif uri.startswith(("http://", "https://")):
            print("\n".join(link_lines(runs, uri)))
    return 1 if res.errors else 0


def parse(argv: list[str]) -> argparse.Namespace:
    """`jobs/ablate.py`'s command line: `cglab ablate`'s, with `--lesson N` accepted for the positional lesson."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--lesson", default=None)
    known, rest = pre.parse_known_args(argv)
    p = argparse.ArgumentParser(prog="ablate", description=__doc__)
    add_arguments(p)
    return p.parse_args(([known.lesson] if known.lesson else []) + rest)


def main(argv: list[str] | None = None) -> int:
    try:
        return ablate(parse(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"ablate: {err}", file=sys.stderr)
        return 2

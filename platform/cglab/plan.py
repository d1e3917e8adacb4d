"""`cglab plan`: a run's plan (cglab.train.plan.plan_run), or every trial's of a lesson, printed before anything
is spent.

    plan = plan_config("run.yaml", [])         # one run, from a YAML file and dotted overrides
    plan = plan_lesson(3, "1gpu")              # a lesson: the same for every trial, under "trials"
    plan = plan_lesson(3, "study", pilot="benchmarks/results/lessons_study.json")  # + the seeds each contrast needs
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from cglab.config import CGLabConfig, ConfigError, from_dict, load_config

# The run plan itself is train's (fit and every sweep's preflight run it); re-exported for `cglab.plan` users.
from cglab.train.plan import plan_run, refuse, scan_sources, text, write_json  # noqa: F401
from cglab.tune.lessons import Lesson, get_lesson
from cglab.tune.power import PILOT_FLAG, pilot_samples, plan_seeds
from cglab.tune.presets import Preset, base_config, get_preset, micro_corpus_sources, preset_corpus_sources


def with_default_corpus(cfg: CGLabConfig, warnings: list[str], preset: Preset | None = None) -> CGLabConfig:
    """cfg reading the preset's own corpus (`Preset.corpus`; the embedded micro corpus for a plain config or a
    preset without one) when it has no data sources, built under .cglab first if missing."""
    if cfg.data.sources:
        return cfg
    corpus = preset.corpus if preset is not None and preset.corpus else "micro"
    sources = preset_corpus_sources(preset) if corpus != "micro" else micro_corpus_sources()
    warnings.append(
        f"data: no data.sources configured; measured on the {'embedded micro' if corpus == 'micro' else corpus} corpus "
        f"({sources[0]['paths'][0]}, {sources[1]['paths'][0]}), not on the data a real run reads"
    )
    return from_dict(cfg.model_dump(mode="json"), [f"data.sources={json.dumps(sources)}"], cross_field=False)


def plan_config(path: str | None, overrides: list[str], te: str = "auto") -> dict:
    cfg = load_config(path, overrides, cross_field=False)
    warnings: list[str] = []
    cfg = with_default_corpus(cfg, warnings)
    out = plan_run(cfg, te=te)
    out["warnings"] = warnings + out["warnings"]
    return out


def plan_lesson(
    lesson: int,
    preset: str,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    te: str = "auto",
    seeds: tuple[int, ...] | None = None,
    pilot: str | None = None,
    sweep: str | None = None,
) -> dict:
    """One plan per trial (variant x seed) of a lesson at a preset; the data is scanned once for all of them.
    `seeds_needed`: per declared contrast, the seeds its verdict needs by the pilot's variance (`load_pilot`:
    a results JSON, or a tracking URI and the sweep to read); unknown without a pilot."""
    les, pre = get_lesson(lesson), get_preset(preset)
    warnings: list[str] = []
    base = with_default_corpus(base_config(pre, config_path, overrides or [], cross_field=False), warnings, pre)
    seeds = tuple(seeds or pre.seeds)
    trials, scans = [], {}
    for v in les.variants:
        for seed in seeds:
            cfg = les.config_for(v.name, base, seed, cross_field=False)
            key = json.dumps([cfg.data.model_dump(mode="json", exclude={"seed"})], sort_keys=True)
            if key not in scans:
                scans[key] = scan_sources(cfg)
            p = plan_run(
                cfg,
                te=te,
                scan=scans[key],
                driver_cpus=pre.driver_cpus,
                data_cpus=pre.data_cpus,
                n_trials=len(les.variants) * len(seeds),
            )
            trials.append({"variant": v.name, "seed": seed, **p})
    errors = sorted({f"{t['variant']}: {e}" for t in trials for e in t["errors"]})
    power = plan_seeds(les, None if pilot is None else load_pilot(pilot, les, sweep), planned=len(seeds))
    if pilot is not None:
        power = {"pilot": pilot + (f" (sweep {sweep})" if sweep else ""), **power}
    if isinstance(power["most"], int) and power["most"] > len(seeds):
        warnings.append(
            f"seeds: {len(seeds)} planned, the pilot's variance asks for {power['most']} (seeds_needed); "
            f"pass --seeds or set the preset's"
        )
    return {
        "lesson": les.number,
        "experiment": les.experiment,
        "preset": pre.name,
        "trials": trials,
        "seeds_needed": power,
        "warnings": warnings + sorted({w for t in trials for w in t["warnings"]}),
        "errors": errors,
    }


def load_pilot(source: str, lesson: Lesson, sweep: str | None = None) -> dict:
    """A finished sweep's per-seed samples of the lesson (variant -> metric -> seed -> value): from a results
    JSON file (`cglab.tune.power.pilot_samples`), or from MLflow, a tracking URI with the sweep's name (default:
    the lesson's latest sweep), read as `cglab report` reads it."""
    if Path(source).is_file():
        try:
            data = json.loads(Path(source).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{PILOT_FLAG} {source}: not JSON ({err})") from None
        return pilot_samples(data, lesson.number, f"{PILOT_FLAG} {source}")
    if "://" not in source and not source.startswith("sqlite:"):
        raise ConfigError(f"{PILOT_FLAG} {source!r}: neither a results JSON file nor an MLflow tracking URI")
    from cglab.tune.results import collect  # MLflow's import costs seconds: only for a tracked pilot

    return collect(lesson, source, sweep).samples


def seeds_text(power: dict) -> str:
    """The seeds section as a table."""
    head = ["contrast", "test", "pilot seeds", "SD of a-b", "margin", "seeds needed"]
    rows = [
        [
            r["contrast"],
            r["test"],
            str(r["pilot_seeds"]),
            "-" if r["sd"] is None else f"{r['sd']:.4g}",
            f"{r['margin']:g}",
        ]
        + [str(r["seeds_needed"]) + (f" ({r['note']})" if r.get("note") else "")]
        for r in power["contrasts"]
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    src = f"pilot {power['pilot']}" if "pilot" in power else f"no pilot ({PILOT_FLAG} SOURCE names one)"
    level = f"{power['level']:.4g} two-sided: Holm's first step over the lesson's {power['family']} contrasts"
    lines = [f"seeds needed ({src}; {power['target']}, at {level}):"]
    lines += [fmt(head)] + [fmt(r) for r in rows]
    lines.append(f"  most: {power['most']}, planned: {power.get('planned', '?')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command
def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="what a run (or a lesson's trials) will really do, before it starts")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit with --lesson)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=2048")
    p.add_argument("--lesson", type=int, default=None, help="plan every trial of lesson N (1-5)")
    p.add_argument("--preset", default="laptop", help="with --lesson: laptop | 1gpu | cluster")
    p.add_argument("--config", dest="config_file", default=None, help="with --lesson: base YAML (data sources...)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="with --lesson: the seeds to plan")
    p.add_argument(
        PILOT_FLAG,
        default=None,
        metavar="SOURCE",
        help="with --lesson: a finished sweep's results (a results JSON such as benchmarks/results/"
        "lessons_study.json, or an MLflow tracking URI) whose paired differences size the seeds",
    )
    p.add_argument("--sweep", default=None, help="with --pilot URI: the sweep to read (default: the latest)")
    p.add_argument(
        "--te",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Transformer Engine on the target (auto: this machine's, or the GPU image's for a GPU "
        "run planned without CUDA)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    # Megatron-Core warns at import that TE/Apex are missing; the plan itself says which Adam and kernels run.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*")
    if args.lesson is not None:
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        if any("=" not in o for o in overrides):
            raise ConfigError("cglab plan --lesson: give the base YAML with --config, overrides as key=value")
        seeds = tuple(args.seeds) if args.seeds else None
        plan = plan_lesson(
            args.lesson, args.preset, args.config_file, overrides, args.te, seeds, args.pilot, args.sweep
        )
    else:
        if args.config is None:
            raise ConfigError("cglab plan: give a CONFIG, or --lesson N --preset P")
        if args.pilot is not None:
            raise ConfigError(f"cglab plan {PILOT_FLAG}: sizes a lesson's seeds; give --lesson N")
        plan = plan_config(args.config, list(args.overrides), args.te)
    if args.json:
        print(json.dumps(plan, indent=1, default=str))
    else:
        print(text(plan))
        if "seeds_needed" in plan:  # last: the trials' plans above are long, this is what sizes the sweep
            print("\n" + seeds_text(plan["seeds_needed"]))
    return 0

"""Run a lesson's variants (x seeds) as a Ray Tune grid; every trial is one Ray Train job.

Ray Train V2 inside Tune (the Ray 2.43+ pattern): the Tune trial is a plain function that builds the config,
opens its MLflow child run and calls `train_fn(cfg, storage_path=..., name=..., mlflow=...)`, which runs a
TorchTrainer and returns final metrics. The trial function holds only `driver_cpus`; `fit` and the evaluation
run as zero-CPU tasks outside the trial's placement group, the Train workers are scheduled by Train itself, and
`max_concurrent_trials` is derived from what one trial's workers (plus `data_cpus` of headroom for their Ray
Data tasks) need, which keeps waiting Train runs from piling up. A Train job releases its workers' placement group
before `fit` returns, so a finished trial's GPUs are free before the next trial's Train job asks for them.

With eval.every / eval.code_every set, the trial also evaluates while it trains (`cglab.eval.periodic`, a Ray
task of its own whose eval.task_cpus `trial_resources` counts) and the train function gets `callbacks=`.

The last step of every trial evaluates the checkpoint that training returned (`cglab.tune.evaluate`) on
documents held out from the training stream (`cglab.data.heldout`: sampled across the prepared corpus), logs the
metrics to the trial's child run and reports them to Tune. The tokenizer is trained once per sweep, on the
driver, so every variant is scored with the same tokens. A kind (NL, code) with no held-out documents is a
ConfigError before any trial starts, unless `eval.allow_builtin_texts` lets it fall back to the built-in texts;
the parent run and every trial run are tagged `eval.texts` / `eval.heldout` with what was used.

Resume: the Tune experiment lives at `storage_path/name`. Calling `run_lesson` again with the same name
restores it (`Tuner.restore`): finished trials are kept, errored and unfinished ones run again. A re-run trial
keeps its Tune trial id, hence its Train run name (Train resumes from the trial's last checkpoint) and its
MLflow run (found by tag).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cglab import raylocal, storage
from cglab.config import CGLabConfig, ConfigError, dump_config, flatten, from_dict
from cglab.data import artifacts, readers
from cglab.track import timeline
from cglab.track.mlflow_logger import MlflowContext, SweepTracker
from cglab.train.plan import plan_run, scan_sources
from cglab.tune.evaluate import evaluate_checkpoint, text_sources, text_tags
from cglab.tune.lessons import Lesson, get_lesson
from cglab.tune.presets import Preset, base_config, get_preset, max_concurrent, trial_resources
from cglab.tune.results import collect, record_stability, record_verdict

log = logging.getLogger(__name__)

TrainFn = Callable[..., dict]  # (cfg, *, storage_path, name, mlflow[, callbacks][, run_plan]) -> final metrics


def default_train_fn() -> TrainFn:
    from cglab.train.trainer import fit  # Ray Train and Megatron: imported in the trial that trains

    return fit


@dataclass
class TrialSpec:
    """What every trial function needs; pickled once into the trainable."""

    lesson: Lesson
    base: CGLabConfig
    sweep: str
    train_storage: str
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    train_fn: TrainFn
    preset: str
    system_metrics_interval_s: float = 10.0
    # jsonl of held-out documents (cglab.data.heldout); None: built-in texts (only with eval.allow_builtin_texts)
    heldout_nl: str | None = None
    heldout_code: str | None = None
    # the preflight's plan of each trial ("variant/seed" -> `cglab plan`): `fit` checks it instead of planning again
    plans: dict[str, dict] | None = None


def _outside_trial(fn: Callable, *args, num_gpus: float = 0, **kwargs):
    """fn(*args, **kwargs) as a zero-CPU Ray task outside the trial's placement group, waited for.

    Tune captures a trial's child tasks into the trial's bundle (`driver_cpus`, e.g. 0.5 CPU): the Ray Data
    tasks that `fit` starts on its driver (dedup scan, shuffle) each ask for a whole CPU and could never be
    scheduled there, and evaluation wants the GPU the Train workers have just released."""
    import ray  # Ray: kept off the sweep's config-only paths (validation, preflight, tests of them)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(
        num_cpus=0,
        num_gpus=num_gpus,
        max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )(fn)
    return ray.get(task.remote(*args, **kwargs))


def _run_trial(config: dict[str, Any], spec: TrialSpec) -> dict:
    timeline.begin("trial", "trial start")
    from ray import tune  # Ray: kept off the sweep's config-only paths (validation, preflight, tests of them)

    from cglab.eval.periodic import PeriodicEval  # imports the training callbacks (torch, Ray): same reason

    timeline.mark("trial imports done")
    variant, seed = config["variant"], config["seed"]
    cfg = spec.lesson.config_for(variant, spec.base, seed)
    timeline.mark("config built")
    trial_id = tune.get_context().get_trial_id()
    ctx: MlflowContext | None = None
    tracker = None
    if spec.tracking_uri:
        tracker = SweepTracker(
            spec.tracking_uri, spec.lesson.experiment, spec.sweep, system_metrics=cfg.track.system_metrics
        )
        tracker.experiment_id = spec.experiment_id
        run_id, _ = tracker.trial_run(
            spec.parent_run_id,
            trial_id,
            run_name=f"{variant}-seed{seed}",
            tags={
                "lesson": str(spec.lesson.number),
                "variant": variant,
                "seed": str(seed),
                "preset": spec.preset,
                **cfg.track.tags,
            },
            params=flatten(cfg),
            config_yaml=dump_config(cfg),
        )
        ctx = tracker.context(run_id, system_metrics_interval_s=spec.system_metrics_interval_s)
        timeline.mark("mlflow run created")
    try:
        # evaluation while training (eval.every, eval.code_every): on the same held-out documents; the final
        # evaluation below is the text curves' point at train.train_steps
        extra: dict[str, Any] = (
            {"callbacks": (PeriodicEval(spec.heldout_nl, spec.heldout_code, final_text_eval=True),)}
            if cfg.eval.periodic
            else {}
        )
        if spec.plans:  # planned by the sweep's preflight on the same inputs: not scanned again per trial
            extra["run_plan"] = spec.plans[f"{variant}/{seed}"]
        metrics = _outside_trial(
            spec.train_fn, cfg, storage_path=spec.train_storage, name=f"{spec.sweep}-{trial_id}", mlflow=ctx, **extra
        )
        timeline.mark("fit task returned")
        ev = _outside_trial(
            evaluate_checkpoint,
            metrics.get("checkpoint"),
            cfg,
            spec.heldout_nl,
            spec.heldout_code,
            num_gpus=1 if cfg.parallel.use_gpu else 0,
        )
        timeline.mark("eval task returned")
        metrics.update(ev.metrics)
        if cfg.eval.every:  # the final evaluation is the last point of the eval.every curves: tokens_seen with it
            metrics["eval/tokens_seen"] = float(
                cfg.train.global_batch_size * cfg.data.seq_length * cfg.train.train_steps
            )
    except BaseException:
        if tracker is not None:
            try:
                tracker.finish_run(ctx.run_id, status="FAILED")
            except Exception as err:  # the training error matters more than the bookkeeping one
                log.warning("could not mark MLflow run %s failed: %s", ctx.run_id, err)
        raise
    if tracker is not None:
        tracker.finish_run(ctx.run_id, metrics, step=cfg.train.train_steps, tags=ev.tags)
        timeline.mark("mlflow final writes done")
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    out.update(ev.tags)  # the conditions travel with the numbers into the Tune result too
    out.update(variant=variant, seed=seed, mlflow_run_id=ctx.run_id if ctx else "")
    timeline.mark("trial end")
    out["timeline"] = timeline.hand_back(metrics.get("timeline"), ev.timeline)  # the events of all its processes
    return out


def make_trainable(spec: TrialSpec, driver_cpus: float):
    from ray import tune  # Ray: kept off the sweep's config-only paths (validation, preflight, tests of them)

    def trainable(config: dict[str, Any]) -> None:
        tune.report(_run_trial(config, spec))

    trainable.__name__ = f"lesson{spec.lesson.number}"
    return tune.with_resources(trainable, {"cpu": driver_cpus})


@dataclass
class SweepResult:
    lesson: Lesson
    name: str
    path: str
    experiment_id: str | None
    parent_run_id: str | None
    results: list[dict]  # one per trial: variant, seed, metrics, error
    restored: bool

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.results if r.get("error")]


def prepare_base(
    base: CGLabConfig, workdir: str | Path, holdout: bool = True
) -> tuple[CGLabConfig, str | None, str | None]:
    """The sweep's shared inputs, settled once on the driver: the tokenizer trained and saved under `workdir` (a
    local directory or a storage URI, which the trials read on whatever node they run; unless data.tokenizer.path or
    model.init_from brings one) and, when `holdout`, the prepared corpus and its held-out split (cglab.data.heldout:
    sampled with eval.heldout_seed, kept beside the corpus in data.cache_path, skipped by every trial's stream;
    eval.holdout is set for the trials). Returns (base config pointing at them, held-out NL jsonl, held-out code
    jsonl). Deterministic, so a restored sweep gets the same split and the same tokenizer. A kind without held-out
    documents (a None path) is a ConfigError naming eval.allow_builtin_texts unless that is set."""
    if not base.data.sources:
        raise ConfigError(
            "data.sources: no sources configured (pass --config, or use the laptop preset's micro corpus)"
        )
    work = storage.location(workdir)
    kinds = {s.kind for s in base.data.sources}
    why = "holdout=False" if not holdout else f"no {' or '.join(sorted({'pile', 'stack'} - kinds))} source"
    # what each kind can hold out is known from the sources' kinds: a refusal comes before anything is built
    can = {name: name if holdout and kind in kinds else None for kind, name in (("pile", "nl"), ("stack", "code"))}
    text_sources(can["nl"], can["code"], base.eval.allow_builtin_texts, why)
    overrides: list[str] = []
    if not base.data.tokenizer.path and not base.model.init_from:  # init_from's weights bring their tokenizer
        # the corpus's tokenizer: trained once per (files, settings), reused by every sweep over them
        tok, _ = artifacts.trained_tokenizer(
            base.data, readers.resolve_files(base.data.sources), artifacts.cache_root(base.data)
        )
        saved = str(tok.save(storage.join(work, "tokenizer")))
        overrides.append(f"data.tokenizer.path={json.dumps(saved)}")
    nl = code = None
    if holdout:
        from cglab.data.pipeline import prepare_data  # pyarrow and Ray Data: kept off the config-only paths

        overrides.append("eval.holdout=true")
        cfg = from_dict(base.model_dump(mode="json"), overrides)
        held = prepare_data(cfg).artifacts["heldout"]  # the trials reuse the prepared corpus and the split
        nl, code = held["texts"]["nl"], held["texts"]["code"]
        why = f"documents held out per kind: nl {held['nl']['documents']}, code {held['code']['documents']}"
        log.info("held out for evaluation: %s", {k: held[k] for k in ("nl", "code", "duplicates")})
    used = text_sources(nl, code, base.eval.allow_builtin_texts, why)
    fell_back = [k for k, v in used.items() if v == "builtin"]
    if fell_back:
        log.warning(
            "eval.allow_builtin_texts: scoring %s on cglab.eval.nl.builtin_texts, not held out (%s); "
            "runs are tagged %s",
            " and ".join(fell_back),
            why,
            text_tags(used),
        )
    return from_dict(base.model_dump(mode="json"), overrides), nl, code


def preflight(lesson: Lesson, base: CGLabConfig, trials: list[tuple[str, int]], preset: Preset) -> list[dict]:
    """`cglab plan` for every (variant, seed) on the sweep's settled inputs (one data scan for all of them);
    ConfigError listing what any trial would refuse. Each trial's `fit` gets its plan (refused there too if it has
    errors) instead of scanning the sources again."""
    cfgs = {k: lesson.config_for(k[0], base, k[1]) for k in trials}
    scan = scan_sources(next(iter(cfgs.values())))  # variants differ in weights, never in which files exist
    plans = [
        plan_run(c, scan=scan, driver_cpus=preset.driver_cpus, data_cpus=preset.data_cpus, n_trials=len(cfgs))
        for c in cfgs.values()
    ]
    errors = [f"{v} seed {s}: {e}" for (v, s), p in zip(cfgs, plans) for e in p["errors"]]
    if errors:
        raise ConfigError(
            f"lesson {lesson.number}: trials would be refused (`cglab plan --lesson "
            f"{lesson.number} --preset {preset.name}` shows the plans):\n  " + "\n  ".join(errors)
        )
    return plans


def ensure_local_ray(per_trial: dict[str, float]) -> None:
    """Connect to RAY_ADDRESS if set, else start a private local Ray with at least one trial's logical CPUs
    (more logical CPUs than cores is fine: the Tune driver function mostly waits)."""
    import ray  # Ray: kept off the sweep's config-only paths (validation, preflight, tests of them)

    raylocal.quiesce_at_exit()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    need = math.ceil(per_trial.get("CPU", 1.0))
    raylocal.start_local(max(os.cpu_count() or 1, need), num_gpus=per_trial.get("GPU"))


@dataclass(frozen=True)
class SweepPlaces:
    """Where a sweep keeps things, for a local or URI storage (`cglab.storage`): the Tune experiment, the trials'
    training runs (Ray Train storage, passed to `fit`), and the shared inputs the driver settles (held-out split,
    tokenizer) beside them, in the same storage: trials on other nodes read them there."""

    storage: str  # a URI unchanged, a local path absolute
    experiment: str
    trials: str
    inputs: str

    @classmethod
    def of(cls, storage_path: str, name: str) -> SweepPlaces:
        where = storage.location(storage_path)
        exp = storage.join(where, name)
        return cls(where, exp, storage.join(where, f"{name}-train"), exp + "-inputs")


def run_lesson(
    lesson: int | Lesson,
    *,
    preset: str | Preset = "laptop",
    base: CGLabConfig | None = None,
    seeds: tuple[int, ...] | None = None,
    variants: tuple[str, ...] | None = None,
    storage_path: str = ".cglab/tune",
    name: str | None = None,
    tracking_uri: str | None = None,
    train_fn: TrainFn | None = None,
    max_concurrent_trials: int | None = None,
    trial_max_failures: int | None = None,
    resume: bool = True,
    holdout: bool = True,
    system_metrics_interval_s: float = 10.0,
    verbose: int = 1,
) -> SweepResult:
    """Run (or resume) a lesson's grid on the connected Ray cluster (a private local one if none): split the
    held-out documents, train the tokenizer once, then one trial per (variant, seed) = train + evaluate.
    Validates every variant's config before starting anything."""
    import ray  # Ray: kept off the sweep's config-only paths (validation, preflight, tests of them)
    from ray import tune

    les = lesson if isinstance(lesson, Lesson) else get_lesson(lesson)
    pre = get_preset(preset) if isinstance(preset, str) else preset
    base = base or base_config(pre)
    seeds = tuple(seeds or pre.seeds)
    names = tuple(variants or (v.name for v in les.variants))
    for v in names:
        les.variant(v)  # unknown names fail here, with the valid ones listed
    configs = {k: c for k, c in les.configs(base, seeds).items() if k[0] in names}
    name = name or f"lesson-{les.number}-{les.slug}-{pre.name}"
    places = SweepPlaces.of(storage_path, name)
    storage_path, exp_path = places.storage, places.experiment
    base = artifacts.shared_cache(base, storage_path)  # the corpus's artifacts where every trial's node reads them
    # The biggest variant sets the pace (variants of a lesson normally share their parallel layout).
    needs = [trial_resources(c, pre.driver_cpus, pre.data_cpus) for c in configs.values()]
    per_trial = {k: max(n.get(k, 0.0) for n in needs) for k in set().union(*needs)}
    ensure_local_ray(per_trial)
    concurrency = max_concurrent_trials or max_concurrent(per_trial, ray.cluster_resources(), len(configs))
    base, heldout_nl, heldout_code = prepare_base(base, places.inputs, holdout)
    plans = preflight(les, base, list(configs), pre)  # every trial's plan, before any trial starts

    experiment_id = parent = None
    if tracking_uri:
        tracker = SweepTracker(tracking_uri, les.experiment, name)
        experiment_id = tracker.ensure_experiment()  # on the driver, before any trial can race for it
        eval_tags = text_tags(text_sources(heldout_nl, heldout_code, base.eval.allow_builtin_texts))
        parent = tracker.parent_run(
            tags={
                "lesson": str(les.number),
                "preset": pre.name,
                "variants": ",".join(names),
                "seeds": ",".join(map(str, seeds)),
                **eval_tags,
            }
        )
    spec = TrialSpec(
        les,
        base,
        name,
        places.trials,
        tracking_uri,
        experiment_id,
        parent,
        train_fn or default_train_fn(),
        pre.name,
        system_metrics_interval_s,
        heldout_nl,
        heldout_code,
        {f"{v}/{s}": p for (v, s), p in zip(configs, plans)},
    )
    trainable = make_trainable(spec, pre.driver_cpus)

    restored = resume and tune.Tuner.can_restore(exp_path)
    if restored:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search(list(names)), "seed": tune.grid_search(list(seeds))},
            # a finished trial's actor runs the next trial: its process, imports and MLflow client are warm
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                verbose=verbose,
                failure_config=tune.FailureConfig(
                    max_failures=pre.trial_max_failures if trial_max_failures is None else trial_max_failures
                ),
            ),
        )
    timeline.mark("tuner.fit called")
    grid = tuner.fit()
    timeline.mark("tuner.fit returned")
    results = []
    for r in grid:
        row = {
            "variant": r.config.get("variant"),
            "seed": r.config.get("seed"),
            "path": r.path,
            "error": repr(r.error) if r.error else None,
        }
        row.update(
            {
                k: v
                for k, v in (r.metrics or {}).items()
                if k.startswith(("eval/", "eval.", "loss", "mlflow_run_id")) or k in ("step", "timeline")
            }
        )
        results.append(row)
    if tracking_uri:
        # The verdict per metric lives on the parent run (tags `verdict/<metric>`, and `stability/<metric>/...`
        # from the metric's curves), from the same numbers the report reads back; a bookkeeping failure here
        # must not lose the sweep's result.
        try:
            runs = collect(les, tracking_uri, name)
            record_verdict(runs, tracking_uri)
            record_stability(runs, tracking_uri)
        except Exception as err:
            log.warning("could not record the verdict on the parent run %s: %s", parent, err)
        status = "FAILED" if any(r["error"] for r in results) else "FINISHED"
        tracker.finish_run(parent, status=status)
    return SweepResult(les, name, exp_path, experiment_id, parent, results, restored)

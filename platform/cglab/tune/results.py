"""A lesson's sweep read back from MLflow: its finished trials grouped by variant (metrics per seed, the loss
curve), and the verdict per declared contrast recorded on the sweep's parent run. The sweep records the verdict when it
ends; `cglab report` renders the same numbers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from cglab.track.mlflow_logger import TAG_ROLE, TAG_SWEEP
from cglab.track.server import check_server
from cglab.tune.curves import Stability, stability
from cglab.tune.lessons import LOSS, Lesson, get_lesson
from cglab.tune.stats import Interval, mean_ci
from cglab.tune.verdicts import ContrastOutcome, verdict

TOKENS_SEEN = "eval/tokens_seen"  # logged with every held-out evaluation: global tokens trained at that step
# eval/ keys that are bookkeeping of the evaluation while training (cglab.eval.periodic), not results
NOT_RESULTS = (TOKENS_SEEN, "eval/skipped")


@dataclass
class LessonRuns:
    lesson: Lesson
    sweep: str
    experiment_id: str
    parent_run_id: str
    metrics: dict[str, dict[str, float]]  # variant -> metric -> mean over seeds (finished runs; ppl: exp mean log)
    seeds: dict[str, list[str]]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # variant -> (tokens, loss)
    status: dict[str, list[str]] = field(default_factory=dict)
    samples: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # variant -> metric -> seed -> x
    run_ids: list[str] = field(default_factory=list)  # finished child runs, in variant order
    # held-out metric -> variant -> seed -> [(tokens seen, value)], one point per evaluation, the final last
    histories: dict[str, dict[str, dict[str, list[tuple[float, float]]]]] = field(default_factory=dict)

    @property
    def metric_keys(self) -> list[str]:
        keys = {k for m in self.metrics.values() for k in m}
        decide = [m.key for m in self.lesson.metrics if m.key in keys]
        rest = sorted(
            k for k in keys if k not in decide and k not in NOT_RESULTS and (k.startswith("eval/") or k == "loss")
        )
        return decide + rest

    def interval(self, variant: str, key: str) -> Interval | None:
        """Mean and 95% interval over seeds; a perplexity's over its log (mean NLL per token), shown back as a
        perplexity: a mean of perplexities would be dominated by the worst seed."""
        xs = list(self.samples.get(variant, {}).get(key, {}).values())
        if not xs:
            return None
        if not is_perplexity(key):
            return mean_ci(xs)
        iv = mean_ci([math.log(x) for x in xs])
        back = lambda x: None if x is None else math.exp(x)  # noqa: E731
        return Interval(math.exp(iv.mean), back(iv.lo), back(iv.hi), iv.n)

    def outcomes(self) -> list[ContrastOutcome]:
        return verdict(self.lesson, self.samples)

    def stability(self) -> list[Stability]:
        """Per lesson metric: from which evaluation on the ranking and verdicts held (cglab.tune.curves)."""
        les, h = self.lesson, self.histories
        return [stability(les, m, h.get(m.key, {}), h) for m in les.metrics]


def collect(lesson: Lesson | int, tracking_uri: str, sweep: str | None = None) -> LessonRuns:
    """The latest sweep of the lesson (or the named one), its trials grouped by variant."""
    from mlflow import MlflowClient  # seconds to import: kept off `cglab --help`, which imports cglab.report

    les = lesson if isinstance(lesson, Lesson) else get_lesson(lesson)
    check_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(les.experiment)
    if exp is None:
        raise LookupError(
            f"no MLflow experiment {les.experiment!r} at {tracking_uri}; run `cglab ablate {les.number}` first"
        )
    flt = f"tags.`{TAG_ROLE}` = 'sweep'" + (f" and tags.`{TAG_SWEEP}` = '{sweep}'" if sweep else "")
    parents = client.search_runs(
        [exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        raise LookupError(f"no sweep {'named ' + repr(sweep) + ' ' if sweep else ''}in {les.experiment!r}")
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000
    )
    samples: dict[str, dict[str, dict[str, float]]] = {}
    seeds: dict[str, list[str]] = {}
    status: dict[str, list[str]] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    finished: dict[str, list[str]] = {}
    histories: dict[str, dict[str, dict[str, list[tuple[float, float]]]]] = {}
    for run in children:
        v = run.data.tags.get("variant", run.info.run_name)
        status.setdefault(v, []).append(run.info.status)
        if run.info.status != "FINISHED":
            continue
        seed = run.data.tags.get("seed") or run.info.run_id  # no seed tag: never paired with another run
        seeds.setdefault(v, []).append(seed)
        finished.setdefault(v, []).append(run.info.run_id)
        for k, x in run.data.metrics.items():
            samples.setdefault(v, {}).setdefault(k, {})[seed] = x
        if v not in curves:  # the first seed's curve stands for the variant
            curves[v] = _curve(client, run)
        for k, pts in _histories(client, run, les).items():
            histories.setdefault(k, {}).setdefault(v, {})[seed] = pts
    means = {v: {k: _mean(k, xs.values()) for k, xs in ms.items()} for v, ms in samples.items()}
    order = [x.name for x in les.variants if x.name in means or x.name in status]
    return LessonRuns(
        les,
        parent.data.tags.get("cglab.sweep", parent.info.run_name),
        exp.experiment_id,
        parent.info.run_id,
        {v: means.get(v, {}) for v in order},
        seeds,
        curves,
        status,
        {v: samples.get(v, {}) for v in order},
        [r for v in order for r in finished.get(v, [])],
        histories,
    )


def verdict_key(o: ContrastOutcome) -> str:
    """`verdict/<metric>/<a>_vs_<b>`: where a contrast's verdict lives on the parent run."""
    return f"verdict/{o.metric}/{o.contrast.a}_vs_{o.contrast.b}"


def record_verdict(runs: LessonRuns, tracking_uri: str) -> dict[str, str]:
    """Put each declared contrast's verdict on the sweep's parent run: tag `verdict/<metric>/<a>_vs_<b>` (agrees,
    disagrees, equivalent, inconclusive, not measured) with `.../test` (test and margin) and `.../note`, and
    metrics `.../diff`, `.../diff_lo`, `.../diff_hi` (a - b, its 90% interval), `.../margin`, `.../p`,
    `.../p_holm`. Returns the tags."""
    from mlflow import MlflowClient  # seconds to import: kept off `cglab --help`, which imports cglab.report
    from mlflow.entities import Metric, RunTag

    tags: dict[str, str] = {}
    points = []
    ts = int(time.time() * 1000)
    for o in runs.outcomes():
        key, c = verdict_key(o), o.contrast
        tags[key] = o.verdict
        tags[f"{key}/test"] = f"{c.test}, margin {c.margin:g}"
        if o.note:
            tags[f"{key}/note"] = o.note
        iv = o.interval
        values = {"margin": c.margin, "p": o.p, "p_holm": o.p_holm}
        if iv is not None:
            values.update(diff=iv.mean, diff_lo=iv.lo, diff_hi=iv.hi)
        for name, x in values.items():
            if x is not None and math.isfinite(x):
                points.append(Metric(f"{key}/{name}", x, ts, 0))
    MlflowClient(tracking_uri).log_batch(
        runs.parent_run_id, metrics=points, tags=[RunTag(k, v) for k, v in tags.items()]
    )
    return tags


def record_stability(runs: LessonRuns, tracking_uri: str, stab: list[Stability] | None = None) -> dict[str, str]:
    """Put each lesson metric's decision stability on the sweep's parent run: tags
    `stability/<metric>/stable_from_tokens`, `.../stable_from_fraction` (of the run), `.../quarter_run` (same,
    different, not measured: the verdict a run 4x shorter gave against the final one) and `.../note`. Returns
    the tags."""
    from mlflow import MlflowClient  # seconds to import: kept off `cglab --help`, which imports cglab.report
    from mlflow.entities import RunTag

    tags: dict[str, str] = {}
    for s in runs.stability() if stab is None else stab:
        pre = f"stability/{s.metric}"
        tags[f"{pre}/quarter_run"] = s.quarter
        if s.stable_from is not None:
            tags[f"{pre}/stable_from_tokens"] = f"{s.stable_from_tokens:.0f}"
            tags[f"{pre}/stable_from_fraction"] = f"{s.stable_from_fraction:.4g}"
        if s.note:
            tags[f"{pre}/note"] = s.note
    MlflowClient(tracking_uri).log_batch(runs.parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return tags


def is_perplexity(key: str) -> bool:
    return key.endswith("_ppl")


def _mean(key: str, xs) -> float:
    xs = list(xs)
    if is_perplexity(key):  # exp of the mean NLL (see LessonRuns.interval)
        return math.exp(sum(math.log(x) for x in xs) / len(xs))
    return sum(xs) / len(xs)


def _histories(client, run, les: Lesson) -> dict[str, list[tuple[float, float]]]:
    """The held-out metrics' histories of one trial, against tokens seen: the lesson's metrics and every other
    `eval/` metric it logged. x: `eval/tokens_seen` logged at the same step, else step x global batch x
    sequence length from the run's params (the final evaluation may log only its step), else the step."""
    keys = [m.key for m in les.metrics if m.key in run.data.metrics]
    keys += sorted(k for k in run.data.metrics if k.startswith("eval/") and k not in keys and k not in NOT_RESULTS)
    if not keys:
        return {}
    p = run.data.params
    try:
        per_step = int(p["train.global_batch_size"]) * int(p["data.seq_length"])
    except (KeyError, ValueError):
        per_step = 1
    seen = {m.step: m.value for m in client.get_metric_history(run.info.run_id, TOKENS_SEEN)}
    out = {}
    for k in keys:
        pts = {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}  # a step logged twice: last
        out[k] = sorted((seen.get(step, step * per_step), x) for step, x in pts.items())
    return out


def _curve(client, run) -> list[tuple[float, float]]:
    p = run.data.params
    try:
        tokens_per_step = int(p["train.global_batch_size"]) * int(p["data.seq_length"])
    except (KeyError, ValueError):
        tokens_per_step = 1  # unknown batch shape: x axis falls back to steps
    hist = client.get_metric_history(run.info.run_id, LOSS)
    if len(hist) > 1:
        return sorted((m.step * tokens_per_step, m.value) for m in hist)
    return []

"""Live training and data-pipeline metrics, exported to Prometheus through Ray's metrics API.

MLflow keeps the record of a run; these are for a person watching a run *now* (Grafana: dashboards/grafana/cglab.json).
Every metric is named `cglab_*` here. Ray's exporter adds the `ray_` prefix and Prometheus' type suffixes, so
`cglab_loss` is scraped as `ray_cglab_loss` and the counter `cglab_samples_skipped` as `ray_cglab_samples_skipped_total`
(checked against Ray 2.60 by tests/track/test_metrics.py). `all_exported_names()` lists exactly what the dashboard
may query.

Usage, from inside a Ray worker (a Train worker, a Data task or actor):

    m = TrainMetrics(experiment="codegen2/lesson-3-objective", trial="t0", rank=0)
    m.report({"step": 10, "loss": 2.3, "tokens_per_s": 5.1e4, "mfu": 0.41, "step_time_s": 0.8, "data_wait_s": 0.01})
    DataMetrics(experiment=..., source="stack").skipped("max_line_length", 3)

Outside a Ray worker or driver (no `ray.init`), recording is a silent no-op in Ray, so library code can call these
freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

# Ray's exporter prefixes every application metric with its namespace.
EXPORT_PREFIX = "ray_"

TRAIN_TAG_KEYS = ("experiment", "trial", "rank")
DATA_TAG_KEYS = ("experiment", "source")

# Step time spans a tiny CPU model (ms) to a 16B model on a node (tens of seconds).
STEP_TIME_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # gauge | counter | histogram
    description: str
    tag_keys: tuple[str, ...]


# report() key -> the gauge it sets. Gauges hold the last value: exact, and what a person wants to read off a panel.
TRAIN_GAUGES: dict[str, MetricSpec] = {
    "step": MetricSpec("cglab_step", "gauge", "Last completed optimizer step.", TRAIN_TAG_KEYS),
    "loss": MetricSpec("cglab_loss", "gauge", "Training loss of the last step.", TRAIN_TAG_KEYS),
    # Throughput and token counts are the whole job's (global batch), so every rank reports the same value and
    # panels take max over ranks, never sum.
    "tokens_per_s": MetricSpec(
        "cglab_tokens_per_second",
        "gauge",
        "Training throughput of the last step, tokens/s of the whole job.",
        TRAIN_TAG_KEYS,
    ),
    "mfu": MetricSpec(
        "cglab_mfu",
        "gauge",
        "Model FLOPs utilization of the last step against the GPU's datasheet "
        "dense bf16 peak (cglab.train.flops.mfu), 0..1.",
        TRAIN_TAG_KEYS,
    ),
    "step_time_s": MetricSpec("cglab_step_time_seconds", "gauge", "Wall time of the last step.", TRAIN_TAG_KEYS),
    "data_wait_s": MetricSpec(
        "cglab_data_wait_seconds", "gauge", "Time the last step waited for its batch.", TRAIN_TAG_KEYS
    ),
    "checkpoint_s": MetricSpec(
        "cglab_checkpoint_seconds", "gauge", "Wall time of the last checkpoint save.", TRAIN_TAG_KEYS
    ),
    "lr": MetricSpec("cglab_learning_rate", "gauge", "Learning rate of the last step.", TRAIN_TAG_KEYS),
    "grad_norm": MetricSpec("cglab_grad_norm", "gauge", "Gradient norm before clipping.", TRAIN_TAG_KEYS),
}
# Ray's OpenTelemetry histogram approximates `_sum` by bucket midpoints, so use it for quantiles only; the gauges
# above carry exact values.
STEP_DURATION = MetricSpec(
    "cglab_step_duration_seconds", "histogram", "Distribution of step wall time.", TRAIN_TAG_KEYS
)
TOKENS = MetricSpec(
    "cglab_tokens", "counter", "Tokens the whole job trained on (rate() gives throughput).", TRAIN_TAG_KEYS
)
SKIPPED = MetricSpec(
    "cglab_samples_skipped",
    "counter",
    "Documents dropped by the data pipeline, by reason.",
    DATA_TAG_KEYS + ("reason",),
)
KEPT = MetricSpec("cglab_samples_kept", "counter", "Documents that passed every filter.", DATA_TAG_KEYS)

ALL_SPECS: tuple[MetricSpec, ...] = (*TRAIN_GAUGES.values(), STEP_DURATION, TOKENS, SKIPPED, KEPT)
REPORTED_KEYS = frozenset(TRAIN_GAUGES) | {"tokens"}


def exported_names(spec: MetricSpec) -> list[str]:
    """The series names Prometheus scrapes for one metric (Ray 2.60 naming)."""
    base = EXPORT_PREFIX + spec.name
    if spec.kind == "counter":
        return [base + "_total"]
    if spec.kind == "histogram":
        return [base + "_bucket", base + "_sum", base + "_count"]
    return [base]


def all_exported_names() -> set[str]:
    return {n for s in ALL_SPECS for n in exported_names(s)}


# One Ray metric object per name per process: Ray keys metrics by name, and creating them is not free.
_REGISTRY: dict[str, object] = {}


def _metric(spec: MetricSpec):
    m = _REGISTRY.get(spec.name)
    if m is None:
        from ray.util import metrics as rm  # lazy: importing cglab.track must not import Ray

        if spec.kind == "gauge":
            m = rm.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "counter":
            m = rm.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
        else:
            m = rm.Histogram(spec.name, spec.description, boundaries=STEP_TIME_BUCKETS_S, tag_keys=spec.tag_keys)
        _REGISTRY[spec.name] = m
    return m


def _finite(key: str, value) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r}: expected a number, got {value!r}") from None
    return x if math.isfinite(x) else None  # a NaN loss is for MLflow and alerts, not a gauge that breaks panels


class TrainMetrics:
    """Per-worker training metrics; tags identify the run so panels can split by trial and rank."""

    def __init__(self, experiment: str = "", trial: str = "", rank: int | str = 0):
        self.tags = {"experiment": str(experiment), "trial": str(trial), "rank": str(rank)}

    def report(self, step_metrics: Mapping[str, object]) -> None:
        """Export one step's metrics. Known keys: REPORTED_KEYS (others are ignored, so the training loop can pass
        the same dict it logs to MLflow). `tokens` (the global batch's tokens in this step) feeds the cglab_tokens
        counter; `tokens_per_s` is global too."""
        for key, spec in TRAIN_GAUGES.items():
            x = _finite(key, step_metrics.get(key))
            if x is not None:
                _metric(spec).set(x, tags=self.tags)
        t = _finite("step_time_s", step_metrics.get("step_time_s"))
        if t is not None and t >= 0:
            _metric(STEP_DURATION).observe(t, tags=self.tags)
        n = _finite("tokens", step_metrics.get("tokens"))
        if n is not None and n > 0:
            _metric(TOKENS).inc(n, tags=self.tags)

    def checkpoint(self, seconds: float) -> None:
        self.report({"checkpoint_s": seconds})


class DataMetrics:
    """Counts of documents the data pipeline kept and skipped; call from the filter stage (a Ray Data task)."""

    def __init__(self, experiment: str = "", source: str = ""):
        self.tags = {"experiment": str(experiment), "source": str(source)}

    def skipped(self, reason: str, n: int = 1) -> None:
        if not reason:
            raise ValueError("DataMetrics.skipped: reason must be a non-empty string")
        if n > 0:
            _metric(SKIPPED).inc(n, tags={**self.tags, "reason": str(reason)})

    def skipped_counts(self, counts: Mapping[str, int]) -> None:
        """Export a {reason: n} dict, as `cglab data inspect` and the filters produce."""
        for reason, n in counts.items():
            self.skipped(reason, int(n))

    def kept(self, n: int = 1) -> None:
        if n > 0:
            _metric(KEPT).inc(n, tags=self.tags)

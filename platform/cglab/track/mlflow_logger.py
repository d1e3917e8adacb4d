"""MLflow for sweeps: one experiment per lesson, a parent run per sweep, a child run per trial, and a
rank-zero metrics logger that never stops training when the server goes away.

Who does what:
- the sweep driver (`SweepTracker`, on the Tune driver) creates the experiment and the parent run;
- each trial's driver function creates (or, when resumed, finds) its child run, logs params, tags and the
  resolved config, and after training the final metrics and status;
- inside the Ray Train job only rank 0 logs, through `RankZeroLogger.from_context(ctx)`.

Runs are found again by tags (`cglab.sweep`, `cglab.trial_id`), so a restored sweep reuses both its parent
run and every trial's run id without any state file beside the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

# mlflow (seconds to import) and ray/torch are imported where used: this module's small types (MlflowContext,
# SweepTracker) are imported by commands and drivers that may never send a metric.
log = logging.getLogger(__name__)

TAG_SWEEP = "cglab.sweep"
TAG_TRIAL = "cglab.trial_id"
TAG_RUN = "cglab.run"  # a single run's name (`cglab train`), to find it again
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own key: the UI nests children under it
TAG_ROLE = "cglab.role"  # `sweep` (a sweep's parent run) or `trial`
TAG_UNLOGGED = "cglab.unlogged"
# What an experiment is for, in MLflow 3.x's own tag: lessons train models. MLflow 3.17.2's UI does not open an
# experiment by it (its workflow type decides: cglab.track.links), its kind selector shows it.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_PARAM_LEN = 6000
BATCH = 1000  # MLflow's log_batch limit on metrics per call


@dataclass(frozen=True)
class MlflowContext:
    """Everything a training worker needs to log into an existing run. Small and picklable."""

    tracking_uri: str
    run_id: str
    experiment_id: str | None = None
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    max_backlog: int = 100_000  # metric points held while the server is away; older ones are dropped
    retry_s: float = 5.0  # after a failed send, wait this long before trying the server again
    request_timeout_s: float = 10.0


def _client(uri: str):
    # mlflow: kept off `cglab --help`'s path
    from mlflow import MlflowClient

    # MLflow prints "View experiment at: <ui>/#/experiments/N" for every run it ends, a link that opens the GenAI
    # traces overview in MLflow 3.17's UI; cglab prints links that land on the runs (cglab.track.links).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


class _Sender:
    """POST /runs/log-batch with no retries and a short timeout. The logger has its own backlog and retry;
    MlflowClient would retry 7 times with exponential backoff (minutes per call), and changing that means
    process-wide environment variables."""

    ENDPOINT = "/api/2.0/mlflow/runs/log-batch"

    def __init__(self, uri: str, timeout_s: float):
        # mlflow: kept off `cglab --help`'s path
        from mlflow.utils.credentials import get_default_host_creds

        self.creds = get_default_host_creds(uri)
        self.timeout_s = timeout_s

    def log_batch(self, run_id: str, metrics=(), tags: Mapping[str, str] | None = None) -> None:
        # mlflow: kept off `cglab --help`'s path
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        body = {
            "run_id": run_id,
            "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics],
            "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
        }
        resp = http_request(
            self.creds, self.ENDPOINT, "POST", max_retries=0, backoff_factor=0, timeout=self.timeout_s, json=body
        )
        verify_rest_response(resp, self.ENDPOINT)


def _step_ranges(steps: list[int]) -> str:
    """[1,2,3,7,9,10] -> '1-3,7,9-10'."""
    out: list[str] = []
    for s in sorted(set(steps)):
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


# ------------------------------------------------------------------------------------------ rank zero
def _world_rank() -> int:
    try:
        # Ray and torch: kept off `cglab --help`'s path
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:
        # Not inside Ray Train: torch.distributed if initialised, else a single process.
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return dist.get_rank()
        except Exception:
            pass
        return int(os.environ.get("RANK", "0"))


class RankZeroLogger:
    """Per-step metrics into one MLflow run, from one rank, without ever blocking or failing training.

    `log_metrics` only enqueues; a background thread sends batches. When a send fails the points stay in a
    bounded backlog and are sent once the server answers again; points that fall off the backlog, or are
    still unsent at `close()`, are counted with their steps and recorded on the run (tag `cglab.unlogged`,
    metric `mlflow/unlogged_points`) as soon as the server is reachable. On every rank but 0 all methods
    are no-ops, so the training loop calls them unconditionally.
    """

    def __init__(self, ctx: MlflowContext | None, *, rank: int | None = None, flush_every_s: float = 2.0):
        self.ctx = ctx
        self.enabled = ctx is not None and (rank if rank is not None else _world_rank()) == 0
        self._flush_every_s = flush_every_s
        self._cv = threading.Condition()
        self._queue: list = []  # mlflow Metric entities, not yet attempted
        self._backlog: list = []  # attempted and failed, to resend
        self._lost_steps: list[int] = []
        self._lost_points = 0
        self._late_points = 0  # sent after at least one failure: late but not lost
        self._failures = 0
        self._offline_until = 0.0
        self._flush_req = 0  # flush() asks for attempt number N; the sender reports the last one done
        self._flush_done = 0
        self._stop = False
        self._summary_logged = False
        self._monitor = None
        self.sent_points = 0
        if not self.enabled:
            return
        self._sender = _Sender(ctx.tracking_uri, ctx.request_timeout_s)
        self._start_system_metrics()
        self._thread = threading.Thread(target=self._run, name="cglab-mlflow-logger", daemon=True)
        self._thread.start()

    @classmethod
    def from_context(cls, ctx: MlflowContext | None, **kwargs) -> RankZeroLogger:
        return cls(ctx, **kwargs)

    # ---------------------------------------------------------------------------------- public API
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        # mlflow: kept off `cglab --help`'s path
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        points = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
        with self._cv:
            self._queue.extend(points)
            if len(self._queue) >= BATCH:
                self._cv.notify()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Try to send everything now (ignoring the retry pause). True when nothing is left unsent."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._flush_req += 1
            req = self._flush_req
            self._cv.notify_all()
            while self._flush_done < req and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            return not self._queue and not self._backlog

    def close(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Flush, stop the sender and the system-metrics monitor, record what never reached the server."""
        if not self.enabled:
            return {}
        self.flush(timeout_s)
        with self._cv:
            self._stop = True
            for m in self._queue + self._backlog:
                self._lose(m)
            self._queue, self._backlog = [], []
            self._cv.notify()
        self._thread.join(timeout_s)
        if self._monitor is not None:
            self._stop_monitor(timeout_s)
        self._record_summary()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "sent_points": self.sent_points,
            "late_points": self._late_points,
            "unlogged_points": self._lost_points,
            "unlogged_steps": _step_ranges(self._lost_steps),
            "failed_sends": self._failures,
        }

    def __enter__(self) -> RankZeroLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- internals
    def _lose(self, metric) -> None:
        self._lost_points += 1
        self._lost_steps.append(metric.step)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(
                    lambda: self._stop or self._flush_req > self._flush_done or len(self._queue) >= BATCH,
                    timeout=self._flush_every_s,
                )
                if self._stop:
                    return
                req = self._flush_req
                forced = req > self._flush_done
                if not forced and time.monotonic() < self._offline_until:
                    self._trim()
                    continue
                held_back = len(self._backlog)
                batch, self._queue, self._backlog = self._backlog + self._queue, [], []
            ok, unsent = self._send(batch) if batch else (True, [])
            with self._cv:
                if ok:
                    self._late_points += held_back
                    self._offline_until = 0.0
                else:
                    self._failures += 1
                    self._offline_until = time.monotonic() + self.ctx.retry_s
                    self._backlog = unsent + self._backlog
                    self._trim()
                self._flush_done = max(self._flush_done, req) if forced else self._flush_done
                self._cv.notify_all()
            if ok and batch:
                self._on_reachable()

    def _trim(self) -> None:
        # Keep the newest points: the end of a curve matters more than its middle.
        pending = self._backlog + self._queue
        over = len(pending) - self.ctx.max_backlog
        if over > 0:
            for m in pending[:over]:
                self._lose(m)
            pending = pending[over:]
            self._backlog, self._queue = pending, []

    def _send(self, batch: list) -> tuple[bool, list]:
        for i in range(0, len(batch), BATCH):
            try:
                self._sender.log_batch(self.ctx.run_id, metrics=batch[i : i + BATCH])
            except Exception as err:
                log.warning("MLflow unreachable (%s); %d metric points held back", type(err).__name__, len(batch) - i)
                return False, batch[i:]
            self.sent_points += len(batch[i : i + BATCH])
        return True, []

    def _on_reachable(self) -> None:
        # The server is back: restart system metrics if their thread gave up while it was away, and
        # record the losses so far (again at close, with final numbers).
        if self.ctx.system_metrics and self._monitor is not None and not self._monitor_alive():
            self._start_system_metrics()
        if self._lost_points and not self._stop:
            self._record_summary()

    def _stop_monitor(self, timeout_s: float) -> None:
        # Not SystemMetricsMonitor.finish(): it joins without a timeout, and its MLflow calls retry for
        # minutes when the server is away. Stop it, wait a bounded time, flush only if the server answers.
        mon = self._monitor
        try:
            if self._monitor_alive() and mon._logging_step == self._monitor_first_step:
                # A run shorter than one sampling interval still gets one sample.
                mon.collect_metrics()
                mon.publish_metrics(mon.aggregate_metrics())
            mon._shutdown_event.set()
            if mon._process is not None:
                mon._process.join(timeout_s)
            if not self._monitor_alive() and self._offline_until == 0.0:
                mon.mlflow_logger.flush()
        except Exception as err:  # a dead server must not fail the end of training
            log.warning("system metrics monitor did not stop cleanly: %s", err)

    def _monitor_alive(self) -> bool:
        proc = getattr(self._monitor, "_process", None)
        return proc is not None and proc.is_alive()

    def _start_system_metrics(self) -> None:
        if not self.ctx.system_metrics:
            return
        try:
            # mlflow: kept off `cglab --help`'s path
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.ctx.run_id,
                sampling_interval=self.ctx.system_metrics_interval_s,
                resume_logging=True,
                tracking_uri=self.ctx.tracking_uri,
            )
            self._monitor_first_step = self._monitor._logging_step
            self._monitor.start()
        except Exception as err:
            log.warning("system metrics disabled: %s", err)

    def _record_summary(self) -> None:
        s = self.summary()
        try:
            # mlflow: kept off `cglab --help`'s path
            from mlflow.entities import Metric

            tag = json.dumps(
                {
                    "points": s["unlogged_points"],
                    "steps": s["unlogged_steps"],
                    "late_points": s["late_points"],
                    "failed_sends": s["failed_sends"],
                }
            )
            point = Metric("mlflow/unlogged_points", s["unlogged_points"], int(time.time() * 1000), 0)
            self._sender.log_batch(self.ctx.run_id, metrics=[point], tags={TAG_UNLOGGED: tag})
            self._summary_logged = True
        except Exception as err:
            log.warning(
                "could not record the MLflow outage summary on run %s: %s (%s)", self.ctx.run_id, err, json.dumps(s)
            )


# ------------------------------------------------------------------------------------------ driver side
@dataclass
class SweepTracker:
    """Experiment, parent run and child runs of one sweep, created from the driver side (never a worker)."""

    tracking_uri: str
    experiment: str
    sweep: str
    system_metrics: bool = True
    experiment_id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.client = _client(self.tracking_uri)

    def ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            # mlflow: kept off `cglab --help`'s path
            from mlflow.exceptions import MlflowException

            try:
                self.experiment_id = self.client.create_experiment(
                    self.experiment, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
                )
            except MlflowException:  # created meanwhile by another driver
                self.experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
            if TAG_EXPERIMENT_KIND not in exp.tags:  # made before cglab set it; a kind someone chose stays
                self.client.set_experiment_tag(self.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return self.experiment_id

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=2)
        return runs[0].info.run_id if runs else None

    def parent_run(self, tags: Mapping[str, str] | None = None) -> str:
        """The sweep's run: created once, found again by its `cglab.sweep` tag on restore."""
        if not self.experiment_id:
            self.ensure_experiment()
        rid = self._find(f"tags.`{TAG_SWEEP}` = '{self.sweep}' and tags.`{TAG_ROLE}` = 'sweep'")
        if rid:
            self.client.update_run(rid, status="RUNNING")
            return rid
        return self._create_run(self.sweep, {TAG_SWEEP: self.sweep, TAG_ROLE: "sweep", **(tags or {})})

    def trial_run(
        self,
        parent_run_id: str,
        trial_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        config_yaml: str,
    ) -> tuple[str, bool]:
        """(run id, resumed). A trial that ran before (same sweep, same Tune trial id) gets its old run."""
        rid = self._find(f"tags.`{TAG_SWEEP}` = '{self.sweep}' and tags.`{TAG_TRIAL}` = '{trial_id}'")
        if rid:
            self.client.update_run(rid, status="RUNNING")
            return rid, True
        all_tags = {
            TAG_PARENT: parent_run_id,
            TAG_SWEEP: self.sweep,
            TAG_TRIAL: trial_id,
            TAG_ROLE: "trial",
            **{k: str(v) for k, v in tags.items()},
        }
        return self._create_run(run_name, all_tags, params, config_yaml), False

    def named_run(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any], config_yaml: str) -> str:
        """A run outside any sweep (`cglab train`): created once, found again by its `cglab.run` tag."""
        if not self.experiment_id:
            self.ensure_experiment()
        rid = self._find(f"tags.`{TAG_RUN}` = '{name}'")
        return rid or self._create_run(name, {TAG_RUN: name, **tags}, params, config_yaml)

    def _create_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        config_yaml: str | None = None,
    ) -> str:
        """The one place cglab creates an MLflow run: tags at creation, then the params and the resolved config."""
        # mlflow: kept off `cglab --help`'s path
        from mlflow.entities import Param

        rid = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        items = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
        for i in range(0, len(items), 100):  # log_batch accepts 100 params per call
            self.client.log_batch(rid, params=items[i : i + 100])
        if config_yaml is not None:
            self.client.log_text(rid, config_yaml, "config.yaml")
        return rid

    def context(self, run_id: str, **kwargs) -> MlflowContext:
        return MlflowContext(
            tracking_uri=self.tracking_uri,
            run_id=run_id,
            experiment_id=self.experiment_id,
            system_metrics=self.system_metrics,
            **kwargs,
        )

    def finish_run(
        self,
        run_id: str,
        metrics: Mapping[str, Any] | None = None,
        step: int = 0,
        status: str = "FINISHED",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        # mlflow: kept off `cglab --help`'s path
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        points = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items() if _is_number(v)]
        for i in range(0, len(points), BATCH):
            self.client.log_batch(run_id, metrics=points[i : i + BATCH])
        if tags:  # conditions of the metrics (e.g. which texts, which sandbox): strings, so tags
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=status)


def _param_value(v: Any) -> str:
    s = "None" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

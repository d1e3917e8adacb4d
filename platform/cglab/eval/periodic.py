"""Evaluation while training: every `eval.every` / `eval.code_every` steps, a snapshot of the model is evaluated
in a Ray task of its own, so training does not wait for it.

On a due step every rank writes its part of a MODEL-ONLY snapshot (`cglab.train.checkpoint.save_model`: no
optimizer state, the checkpoint's TP x PP sharded format) to a local scratch directory and uploads it to the run's
storage, `<storage>/<run>/evals/step_XXXXXX` (a local path or an object-store URI: the nodes of a cluster share no
file system); after a barrier rank 0 writes the manifest and COMPLETE there, submits the task and goes back to
training. The task, wherever Ray places it, downloads the snapshot, converts it to HF, evaluates what is due, logs
it into the run's MLflow run at `step=` the step it belongs to, writes its record to
`<storage>/<run>/eval_records/step_XXXXXX.json` and deletes the snapshot. Whether a run evaluates is decided by its
config alone, so every rank takes the same branch at every step (a rank that decided by what its own disk can see
would skip the collectives the others enter, and hang them).

Metrics (MLflow keys, at the snapshot's step):

    eval/nl_ppl, eval/nl_bpb, eval/code_ppl,   every eval.every steps: the held-out text metrics, under the SAME
    eval/code_bpb, eval/infill_{ppl,bpb}       keys and from the same held-out documents and code
                                               (`cglab.eval.checkpoint_eval.text_metrics`) as a trial's final
                                               evaluation, so a metric's MLflow history is its curve; in a Tune
                                               trial the final evaluation is the point at train.train_steps
                                               (the periodic one skips the texts there)
    eval/tokens_seen                           global_batch_size x seq_length x step, at every evaluated step
    code_eval/humaneval_pass_at_1,             every eval.code_every steps: pass@1 on a FIXED SUBSET (the first
    code_eval/humaneval_infill_pass_at_1       eval.code_limit HumanEval problems and single-line HumanEval-Infill
                                               tasks), n=1, greedy: its own keys, never the final evaluation's
    code_eval/<suite>_{passed,failed,          programs per sandbox status (<suite>: humaneval, humaneval_infill)
      timed_out,sandbox_error}                 and the tag code_eval/<suite>_isolation (the sandbox's isolation)
    code_eval/seconds, code_eval/cpu_s         wall and CPU seconds of the pass@1 part (generation + sandbox)
    eval_task/seconds, eval_task/cpu_s         wall and CPU seconds of the whole task (its process and the
                                               sandbox's children): the CPU it took from the machine
    eval_task/snapshot_s                       (from the training loop) seconds training stopped to write the
                                               snapshot: all the evaluation costs the training loop itself
    eval/skipped                               (from the training loop) due snapshots skipped so far, because the
                                               previous task was still running: at most one task is in flight per
                                               run, never a queue

The task's own bookkeeping is under eval_task/, not eval/: a lesson report lists the eval/ metrics as results.

Never blocking training: the task requests eval.task_cpus CPUs (and uses as many torch threads) and no GPU (the
GPUs are the Train workers'), outside any placement group. In a Tune trial those CPUs are part of the trial's
resources (`cglab.train.plan.trial_resources`), so the trials `max_concurrent` runs side by side leave room for
each one's task; and nothing waits on the task without a bound anyway: while it is pending or running, due steps
are skipped, and `on_end` waits for it (so the last point is logged before the run finishes) at most the plan's
bound, `periodic_eval.end_wait_s` in `cglab plan` (cglab.train.eval_cost: a few estimated evaluations, or
eval.end_wait_s), which `fit` hands every worker as WorkerInputs.eval_end_wait_s, and then cancels it; a run
that stopped early (preempted, or a failed step Ray Train restarts from a checkpoint) cancels it without waiting.
A failing task is logged (a warning, and its error in its record) and never fails the training run. The plan
(`periodic_eval`) also says what one evaluation is estimated to cost and whether due evaluations will be skipped.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cglab import storage
from cglab.config import CGLabConfig
from cglab.train.callbacks import Callback, StepEnd
from cglab.train.eval_cost import task_resources

log = logging.getLogger(__name__)

CODE_SUITES = ("humaneval", "infill")
RECORDS = "eval_records"  # <storage>/<run>/eval_records/step_XXXXXX.json: one record per evaluation


@dataclass(frozen=True)
class EvalJob:
    """What one evaluation task gets (pickled into it)."""

    snapshot: str  # model-only snapshot in the run's storage (a local path or a URI), deleted by the task
    step: int
    text: bool  # held-out text metrics due
    code: bool  # pass@1 on the fixed subset due
    cfg: CGLabConfig
    nl_path: str | None
    code_path: str | None
    mlflow: Any = None  # cglab.track.mlflow_logger.MlflowContext
    record: str | None = None  # where the task writes its record (<storage>/<run>/eval_records/step_XXXXXX.json)


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def evaluate_snapshot(job: EvalJob) -> dict:
    """The task's body: evaluate, log to MLflow at job.step, write its record, delete the snapshot. Returns
    the record ({"step", "metrics", "tags"} or {"step", "error"}); never raises for an evaluation error."""
    import torch  # heavy: in the task only

    from cglab.eval.checkpoint_eval import hf_generator, pass_at_1, text_metrics, text_sources, text_tags

    t0, c0 = time.perf_counter(), _cpu_s()
    cfg = job.cfg
    torch.set_num_threads(max(1, int(cfg.eval.task_cpus)))  # the CPUs it asked Ray for, not the machine's
    rec: dict[str, Any] = {"step": job.step, "snapshot": job.snapshot}
    hf_dir = Path(tempfile.mkdtemp(prefix="cglab-periodic-hf-"))
    try:
        with storage.local_copy(job.snapshot) as snap:  # a URI's snapshot fetched to this node's disk
            gen = hf_generator(snap, hf_dir, cfg.data.seq_length)
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        if job.text:
            used = text_sources(job.nl_path, job.code_path, cfg.eval.allow_builtin_texts)
            metrics.update(text_metrics(gen, cfg, job.nl_path, job.code_path, used))
            tags.update(text_tags(used))
        if job.code:
            p0, pc0 = time.perf_counter(), _cpu_s()
            # n=1 and greedy: a deterministic point per step, so the curve moves only with the model
            codes = pass_at_1(
                gen, cfg, CODE_SUITES, limit=cfg.eval.code_limit, n=1, temperature=0.0, prefix="code_eval"
            )
            metrics.update(codes.metrics)
            tags.update(codes.tags)
            metrics["code_eval/seconds"] = time.perf_counter() - p0
            metrics["code_eval/cpu_s"] = _cpu_s() - pc0
        t = cfg.train
        metrics["eval/tokens_seen"] = float(t.global_batch_size * cfg.data.seq_length * job.step)
        metrics["eval_task/seconds"] = time.perf_counter() - t0
        metrics["eval_task/cpu_s"] = _cpu_s() - c0
        rec.update(metrics=metrics, tags=tags)
        if job.mlflow is not None:
            _log_mlflow(job.mlflow, job.step, metrics, tags)
    except Exception as err:  # an evaluation that fails is a record, never a failed training run
        log.warning("evaluation of step %d failed: %r", job.step, err)
        rec["error"] = repr(err)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
        storage.delete_dir(job.snapshot)
    if job.record:
        storage.write_bytes(job.record, json.dumps(rec).encode())
    return rec


def _log_mlflow(ctx, step: int, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow import MlflowClient  # heavy: in the task only
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    MlflowClient(ctx.tracking_uri).log_batch(
        ctx.run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


def read_evals(run: str | Path) -> dict[int, dict]:
    """The records of a run's evaluations (<run>/eval_records/step_XXXXXX.json, a local path or a URI) by step."""
    records = (json.loads(storage.read_bytes(f)) for f in storage.list_files(storage.join(run, RECORDS)))
    return {int(r["step"]): r for r in records}


@dataclass(frozen=True)
class PeriodicEval:
    """The callback factory `cglab.train.trainer.fit(callbacks=...)` takes (picklable; called on every worker).
    `final_text_eval`: a final evaluation follows training (a Tune trial), so the held-out texts are not scored
    again at train.train_steps."""

    nl_path: str | None = None
    code_path: str | None = None
    final_text_eval: bool = False

    def __call__(self, inp, state, feed) -> Callback:
        return PeriodicEvalCallback(self, inp, state)


def end_wait(inp) -> float:
    """How long `on_end` waits for the task in flight: the plan's bound, which `fit` put in the worker's inputs."""
    wait = getattr(inp, "eval_end_wait_s", None)
    if wait is None:
        raise ValueError(
            "WorkerInputs.eval_end_wait_s: not set; cglab.train.trainer.fit sets it from the plan's periodic_eval"
        )
    return float(wait)


class PeriodicEvalCallback(Callback):
    """Snapshot on due steps (every rank), submit and reap the evaluation task (rank 0); see the module doc."""

    def __init__(self, spec: PeriodicEval, inp, state):
        import torch.distributed as dist

        self.spec, self.cfg, self.state, self.mlflow = spec, inp.cfg, state, inp.mlflow
        self.tokenizer_json = inp.plan.tokenizer_json
        self.rank = dist.get_rank()
        # the run's storage (fit's WorkerInputs.storage; a URI or a local path): what every rank writes to and the
        # task reads from. Decided by the inputs alone, never by what this node's disk shows: the same on every rank.
        self.where = getattr(inp, "storage", "") or inp.run_dir or ""
        self.enabled = bool(self.cfg.eval.periodic and self.where)
        self.end_wait_s = end_wait(inp) if self.enabled else 0.0
        self.inflight = None  # (ObjectRef, EvalJob)
        self.skipped = 0
        self.step, self.stopped = 0, False  # how far this attempt got; stopped early (preemption)
        self.complete = False  # the run's last step was reached (train.train_steps or train.token_budget)

    def _due(self, step: int) -> tuple[bool, bool]:
        ev = self.cfg.eval
        text = bool(ev.every) and step % ev.every == 0 and not (self.spec.final_text_eval and self.complete)
        code = bool(ev.code_every) and step % ev.code_every == 0
        return text, code

    def on_step_end(self, s: StepEnd) -> None:
        self.step, self.stopped = s.step, self.stopped or s.stop
        self.complete = s.last or s.step >= self.cfg.train.train_steps
        if not self.enabled:
            return
        if self.rank == 0:
            self._reap(wait_s=0, cancel=False)
        text, code = self._due(s.step)
        if not (text or code) or s.stop:  # a preempted run exits within its grace period: no new snapshot
            return
        if self._busy_everywhere():
            self.skipped += 1
            s.metrics["eval/skipped"] = float(self.skipped)
            log.info("evaluation of step %d skipped: the previous one is still running", s.step)
            return
        import torch.distributed as dist

        from cglab.train import checkpoint

        t0 = time.perf_counter()
        name = f"step_{s.step:06d}"
        snap = storage.join(self.where, "evals", name)
        if self.rank == 0:  # left by an attempt that died mid-write
            storage.delete_dir(snap)
        dist.barrier()
        local = Path(tempfile.mkdtemp(prefix=f"cglab-snapshot-{name}-"))
        try:
            checkpoint.save_model(
                local,
                self.state,
                s.step,
                extra={"config": self.cfg.model_dump(mode="json")},
                files={"tokenizer/tokenizer.json": self.tokenizer_json},
            )  # each rank's files in its own scratch; rank 0 also holds the manifest of all of them
            seal = (checkpoint.MANIFEST, checkpoint.MARKER)  # rank 0 writes them once every rank's files are there
            storage.upload_dir(local, snap, skip=frozenset(seal))
            dist.barrier()  # every rank's files are in storage: the snapshot can be sealed
            if self.rank == 0:
                for f in seal:  # COMPLETE last
                    storage.write_bytes(storage.join(snap, f), (local / f).read_bytes())
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if self.rank == 0:
            job = EvalJob(
                snap,
                s.step,
                text,
                code,
                self.cfg,
                self.spec.nl_path,
                self.spec.code_path,
                self.mlflow,
                storage.join(self.where, RECORDS, f"{name}.json"),
            )
            self.inflight = (_submit(job), job)
        s.metrics["eval_task/snapshot_s"] = time.perf_counter() - t0

    def _busy_everywhere(self) -> bool:
        """Rank 0's answer (only it holds the task), the same on every rank: they all snapshot, or none."""
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([float(self.rank == 0 and self.inflight is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _reap(self, wait_s: float, cancel: bool) -> None:
        """Forget the task once it is done (logging its failure); wait up to wait_s for it, then, with `cancel`,
        cancel it and delete its snapshot."""
        import ray

        if self.inflight is None:
            return
        ref, job = self.inflight
        done, _ = ray.wait([ref], timeout=wait_s)
        if not done:
            if not cancel:
                return
            log.warning("evaluation of step %d still running after %.0f s: cancelled", job.step, wait_s)
            ray.cancel(ref, force=True)
            storage.delete_dir(job.snapshot)
            self.inflight = None
            return
        self.inflight = None
        try:
            rec = ray.get(ref)
        except Exception as err:  # the task's process died: the training run goes on
            log.warning("evaluation task of step %d failed: %r", job.step, err)
            storage.delete_dir(job.snapshot)
            return
        if rec.get("error"):
            log.warning("evaluation of step %d failed: %s", job.step, rec["error"])

    def on_end(self) -> None:
        """Training completed: wait up to the plan's end_wait_s for the last task, so its point is logged before the run
        ends. Stopped early (a preemption, or a step that raised and Ray Train restarts the workers): cancel it
        at once, a restart or an exit within the grace period must not wait for an evaluation."""
        if self.rank == 0 and self.enabled:
            complete = self.complete and not self.stopped
            self._reap(wait_s=self.end_wait_s if complete else 0, cancel=True)


def _submit(job: EvalJob):
    """The task, with its own eval.task_cpus, outside any placement group (the Train workers' would capture it)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(
        **task_resources(job.cfg),  # what the plan's periodic_eval.placement says
        max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )(evaluate_snapshot)
    return task.remote(job)

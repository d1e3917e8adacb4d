"""The training loop's fixed shape and its callbacks, without Ray workers: hook order, teardown on failure, the
fault hook, throughput/MFU, and the Ray Train report that hands over (and deletes) each staged checkpoint."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from cglab.config import CGLabConfig
from cglab.train import callbacks as cb
from cglab.train import loop
from cglab.train.checkpoint import DataPosition
from cglab.train.flops import flops_per_token, mfu


class Recorder(cb.Callback):
    def __init__(self, name: str, events: list, checkpoint_at: int | None = None, fail_on_end: bool = False):
        self.name, self.events, self.checkpoint_at, self.fail_on_end = name, events, checkpoint_at, fail_on_end

    def on_start(self, step, resumed_from):
        self.events.append((self.name, "start", step, resumed_from))

    def on_step_end(self, s):
        self.events.append((self.name, "step_end", s.step))
        if s.step == self.checkpoint_at:
            s.checkpoint = "staged"

    def on_checkpoint(self, s):
        self.events.append((self.name, "checkpoint", s.step))

    def on_log(self, s):
        self.events.append((self.name, "log", s.step, dict(s.metrics)))

    def on_end(self):
        self.events.append((self.name, "end"))
        if self.fail_on_end:
            raise RuntimeError(f"{self.name} failed to close")


def test_each_hook_runs_on_every_callback_in_order_and_checkpoints_come_before_logging():
    events = []
    calls = cb.Callbacks([Recorder("a", events, checkpoint_at=2), Recorder("b", events)])
    calls.step_end(cb.StepEnd(1, {"loss": 1.0}, 0.0, 1.0))
    calls.step_end(cb.StepEnd(2, {"loss": 0.5}, 0.0, 1.0))
    assert [e[:3] for e in events] == [
        ("a", "step_end", 1),
        ("b", "step_end", 1),
        ("a", "log", 1),
        ("b", "log", 1),
        ("a", "step_end", 2),
        ("b", "step_end", 2),
        ("a", "checkpoint", 2),
        ("b", "checkpoint", 2),
        ("a", "log", 2),
        ("b", "log", 2),
    ]


def test_every_on_end_runs_even_when_one_fails():
    events = []
    calls = cb.Callbacks([Recorder("a", events, fail_on_end=True), Recorder("b", events)])
    with pytest.raises(RuntimeError, match="a failed to close"):
        calls.end()
    assert events == [("a", "end"), ("b", "end")]


class _Feed:
    def __init__(self, cfg, plan, pos):
        self.pos, self.step_stats = pos, {"mask_fraction/span": 0.15}
        self.steps, self.progress = cfg.train.train_steps, 1.0

    def done(self, step):
        return step >= self.steps

    def next_step(self):
        return []


@pytest.fixture
def fake_worker(monkeypatch):
    """worker_loop with the model, the feed and the resume replaced: what is left is the loop itself."""
    events: list = []
    losses = iter([3.0, 2.0, RuntimeError("step 3 failed"), 1.0])

    def step(state, cfg, micro, lr_progress):
        out = next(losses)
        if isinstance(out, Exception):
            raise out
        return {"loss": out}

    monkeypatch.setattr(loop, "init_parallel", lambda *a, **k: None)
    monkeypatch.setattr(loop, "build_train_state", lambda *a, **k: object())
    monkeypatch.setattr(loop, "_resume", lambda state, run_dir: (1, DataPosition(epoch=0, index=4), "ckpt-1"))
    monkeypatch.setattr(loop, "DataFeed", _Feed)
    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "_callbacks", lambda inp, state, feed: cb.Callbacks([Recorder("r", events)]))
    return events


def test_the_loop_resumes_steps_and_tears_down_even_when_a_step_fails(fake_worker):
    cfg = CGLabConfig.model_validate({"train": {"train_steps": 5}})
    with pytest.raises(RuntimeError, match="step 3 failed"):
        loop.worker_loop(loop.WorkerInputs(cfg=cfg, plan=None))
    events = fake_worker
    assert events[0] == ("r", "start", 1, "ckpt-1")  # the loop starts where the checkpoint left off
    logged = [e[3] for e in events if e[1] == "log"]
    assert [m["step"] for m in logged] == [2, 3] and [m["loss"] for m in logged] == [3.0, 2.0]
    assert all(m["started_at_step"] == 1 and m["epoch"] == 0 and m["mask_fraction/span"] == 0.15 for m in logged)
    assert events[-1] == ("r", "end")  # teardown ran although the step raised


def test_fault_injection_fails_once_at_its_step_and_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    marker = tmp_path / "marker"
    hook = cb.FaultInjection(cb.Fault(step=3, marker=str(marker), rank=1, mode="raise"))
    hook.on_step_end(cb.StepEnd(2, {}, 0.0, 1.0))
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        hook.on_step_end(cb.StepEnd(3, {}, 0.0, 1.0))
    assert marker.read_text() == "3"
    hook.on_step_end(cb.StepEnd(3, {}, 0.0, 1.0))  # the restarted worker trains on
    cb.FaultInjection(cb.Fault(step=4, marker=str(tmp_path / "other"), rank=0, mode="raise")).on_step_end(
        cb.StepEnd(4, {}, 0.0, 1.0)
    )  # another rank's fault


def test_throughput_and_mfu_per_device(monkeypatch):
    cfg = CGLabConfig.model_validate({"train": {"global_batch_size": 8}, "data": {"seq_length": 64}})
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(cb, "device_peak_tflops", lambda: 100.0)
    s = cb.StepEnd(3, {}, data_wait_s=0.5, step_time_s=2.0)
    cb.Throughput(cfg).on_step_end(s)
    m = s.metrics
    assert m["tokens_seen"] == 3 * 8 * 64 and m["data_wait_s"] == 0.5 and m["step_time_s"] == 2.0
    assert m["tokens_per_s"] == 8 * 64 / 2.0
    assert m["tflops"] == pytest.approx(m["tokens_per_s"] * flops_per_token(cfg.model, 64) / 1e12 / 2)
    assert m["mfu"] == pytest.approx(mfu(m["tokens_per_s"], cfg.model, 64, 2, 100.0))
    monkeypatch.setattr(cb, "device_peak_tflops", lambda: None)
    s = cb.StepEnd(3, {}, data_wait_s=0.5, step_time_s=2.0)
    cb.Throughput(cfg).on_step_end(s)
    assert "mfu" not in s.metrics and "tflops" not in s.metrics  # no known peak: no MFU to claim


def test_ray_report_hands_over_each_checkpoint_then_deletes_the_staged_copy(tmp_path, monkeypatch):
    reports = []
    monkeypatch.setattr(
        cb.ray.train,
        "report",
        lambda metrics, checkpoint=None: reports.append(
            (metrics["step"], checkpoint is not None and (tmp_path / "staged" / "f").exists())
        ),
    )
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "f").write_text("x")
    hook = cb.RayReport(log_every=2)
    for step in (1, 2, 3):
        hook.on_log(cb.StepEnd(step, {"step": step}, 0.0, 1.0, checkpoint=staged if step == 3 else None))
    assert reports == [(2, False), (3, True)]  # every log_every steps, and with the checkpoint while it exists
    assert not staged.exists()


def test_the_workers_callbacks_and_their_order(tmp_path, monkeypatch):
    """Fault injection first, then throughput, the checkpoint, the sinks, and the Ray Train report last; the
    metrics history only on rank 0 with a run directory it can see. The checkpointer's staging goes at the end."""

    class Plan:
        tokenizer_json = "{}"

    cfg = CGLabConfig()
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    inp = loop.WorkerInputs(cfg=cfg, plan=Plan(), run_dir=str(tmp_path), fault=cb.Fault(step=1, marker="m"))
    for rank, history in ((0, True), (1, False)):
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        calls = loop._callbacks(inp, state=None, feed=None)
        kinds = [type(c) for c in calls.items]
        assert kinds == [
            cb.FaultInjection,
            cb.Throughput,
            cb.Checkpointer,
            cb.MlflowMetrics,
            *([cb.History] if history else []),
            cb.Prometheus,
            cb.RayReport,
        ]
        staging = next(c for c in calls.items if isinstance(c, cb.Checkpointer)).staging
        assert staging.is_dir()
        calls.end()
        assert not staging.exists()
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    no_fault = loop._callbacks(loop.WorkerInputs(cfg=cfg, plan=Plan()), state=None, feed=None)
    assert [type(c) for c in no_fault.items][:1] == [cb.Throughput]
    no_fault.end()


def test_history_appends_one_json_line_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    hook = cb.History(path)
    hook.on_log(cb.StepEnd(1, {"step": 1, "loss": 2.5}, 0.0, 1.0))
    hook.on_log(cb.StepEnd(2, {"step": 2, "loss": 2.0}, 0.0, 1.0))
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.0},
    ]


def test_extra_callbacks_from_above_run_after_the_checkpoint_and_before_the_sinks(tmp_path, monkeypatch):
    """`fit(callbacks=...)`: each factory is called with the worker's inputs, state and feed; what it adds to a
    step's metrics is logged with the step."""

    class Plan:
        tokenizer_json = "{}"

    class Extra(cb.Callback):
        def __init__(self, inp, state, feed):
            self.got = (inp.name, state, feed)

    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    inp = loop.WorkerInputs(cfg=CGLabConfig(), plan=Plan(), name="n", extra_callbacks=(Extra,))
    calls = loop._callbacks(inp, state="s", feed="f")
    kinds = [type(c) for c in calls.items]
    assert kinds[kinds.index(cb.Checkpointer) + 1 : kinds.index(cb.MlflowMetrics)] == [Extra]
    assert next(c for c in calls.items if isinstance(c, Extra)).got == ("n", "s", "f")
    calls.end()

"""Evaluation while training (cglab.eval.periodic), its callback driven by hand on a real one-rank model and a real
local Ray: a due step while a task is in flight is skipped and counted (never queued), the end of training waits
a bounded time and then cancels, and a failing evaluation is a record, never a failed run. The full path (Ray
Train, the sandbox, MLflow) runs in tests/tune/test_sweep.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cglab.config import ConfigError, from_dict
from cglab.train.callbacks import StepEnd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rig(tmp_path_factory, micro_tokenizer):
    """A one-rank tiny model (its train state) and a private 2-CPU Ray."""
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.raylocal import local_ray
    from cglab.train.step import build_train_state

    init_parallel(1, 1, seed=3)
    cfg = _cfg()
    state = build_train_state(cfg)
    tok_json = (micro_tokenizer.path / "tokenizer.json").read_text()
    with local_ray(2, str(tmp_path_factory.mktemp("ray"))):
        yield state, tok_json
    destroy_parallel()


def _cfg(*overrides):
    return from_dict(
        {},
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "data.seq_length=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.train_steps=10",
            *overrides,
        ],
    )


def _callback(rig, run_dir, cfg, storage="", end_wait_s=600.0, **spec):
    """The callback as a worker gets it; `end_wait_s`: the plan's bound, which fit hands over in the inputs."""
    from cglab.eval.periodic import PeriodicEval

    state, tok_json = rig
    inp = SimpleNamespace(
        cfg=cfg,
        plan=SimpleNamespace(tokenizer_json=tok_json),
        run_dir=str(run_dir),
        mlflow=None,
        storage=storage,
        eval_end_wait_s=end_wait_s,
    )
    return PeriodicEval(**spec)(inp, state, None)


def _step(callback, step):
    s = StepEnd(step, {}, 0.0, 1.0)
    callback.on_step_end(s)
    return s.metrics


def test_due_steps_while_one_is_in_flight_are_skipped_and_counted_then_the_end_cancels_it(rig, tmp_path):
    # eval.task_cpus=3 on a 2-CPU cluster: the first task can never start, so it stays in flight for the test
    cb = _callback(rig, tmp_path, _cfg("eval.code_every=2", "eval.task_cpus=3", "train.train_steps=6"), end_wait_s=1)
    assert _step(cb, 1) == {}  # not due
    first = _step(cb, 2)
    snap = tmp_path / "evals" / "step_000002"
    assert "eval_task/snapshot_s" in first and (snap / "COMPLETE").is_file()
    assert json.loads((snap / "manifest.json").read_text())["world_size"] == 1
    assert not any("optimizer" in p.name for p in snap.rglob("*"))  # model only
    assert _step(cb, 4) == {"eval/skipped": 1.0}
    assert _step(cb, 6) == {"eval/skipped": 2.0}  # counted, and nothing was queued behind the first
    assert not (tmp_path / "evals" / "step_000004").exists()
    cb.on_end()  # training complete: waits end_wait_s for the last point, then cancels the task
    assert cb.inflight is None and not snap.exists()


def test_a_run_stopped_early_cancels_its_task_without_waiting(rig, tmp_path):
    # as above, but the run stops at step 3 of 10 (preempted): its exit must not wait the hour for the evaluation
    cb = _callback(rig, tmp_path, _cfg("eval.code_every=2", "eval.task_cpus=3"), end_wait_s=3600)
    _step(cb, 2)
    s = StepEnd(3, {}, 0.0, 1.0, stop=True)
    cb.on_step_end(s)
    waits, reap = [], cb._reap
    cb._reap = lambda wait_s, cancel: (waits.append(wait_s), reap(wait_s, cancel))  # what on_end asks for
    cb.on_end()
    assert waits == [0]  # no wait at all
    assert cb.inflight is None and not (tmp_path / "evals" / "step_000002").exists()


def test_a_failing_evaluation_is_recorded_and_never_fails_training(rig, tmp_path):
    from cglab.eval.periodic import read_evals

    # held-out files that are not there: the task converts the snapshot, then fails reading the texts
    missing = str(tmp_path / "missing.jsonl")
    cfg = _cfg("eval.every=3", "train.train_steps=3", "train.warmup_steps=1")
    cb = _callback(rig, tmp_path, cfg, nl_path=missing, code_path=missing)
    assert "eval_task/snapshot_s" in _step(cb, 3)
    cb.on_end()  # waits for the task: it failed, and on_end does not raise
    rec = read_evals(tmp_path)[3]
    assert "FileNotFoundError" in rec["error"] and "metrics" not in rec
    assert not (tmp_path / "evals" / "step_000003").exists()  # a failed evaluation deletes its snapshot too


def test_a_worker_that_cannot_see_the_drivers_run_directory_still_evaluates_through_storage(rig, tmp_path):
    """On a cluster no worker sees the driver's run directory: the snapshot and the record go through the run's
    storage, and whether a step is evaluated is the config's decision, the same on every rank (a rank deciding by
    its own disk skipped the collectives the others entered: a hang, or evaluation silently off)."""
    from cglab.eval.periodic import read_evals

    store = tmp_path / "storage" / "run"
    texts = tmp_path / "texts.jsonl"
    body = "".join(f"    y = y * {k} + x  # step {k}\n" for k in range(8))
    docs = [f"def f{i}(x):\n    y = {i}\n{body}    return y\n" for i in range(4)]
    texts.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = _cfg("eval.every=2", "train.train_steps=2", "train.warmup_steps=1")
    cb = _callback(
        rig, tmp_path / "driver-only" / "run", cfg, storage=str(store), nl_path=str(texts), code_path=str(texts)
    )
    assert "eval_task/snapshot_s" in _step(cb, 2)
    cb.on_end()
    rec = read_evals(store)[2]
    assert "error" not in rec and rec["metrics"]["eval/code_bpb"] > 0
    assert not (tmp_path / "driver-only").exists()  # nothing was written where only the driver looks
    assert not (store / "evals" / "step_000002").exists()  # the snapshot was deleted after its evaluation


@pytest.mark.parametrize(
    "override, field",
    [
        ("eval.every=-1", "eval.every"),
        ("eval.code_every=-5", "eval.code_every"),
        ("eval.code_limit=0", "eval.code_limit"),
        ("eval.task_cpus=0", "eval.task_cpus"),
        ("eval.end_wait_s=0", "eval.end_wait_s"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(override)

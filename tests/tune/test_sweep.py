"""A lesson grid through Ray Tune -> Ray Train (real tiny torch jobs) -> a real MLflow server."""
import json
from pathlib import Path

import pytest

from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config

pytestmark = pytest.mark.slow


def _base():
    return base_config("laptop", overrides=["train.train_steps=8", "train.warmup_steps=2"])


def _recording_fit(calls: Path, fail_once: str | None = None):
    """tiny_fit that notes each call (variant, MLflow run id) and can fail one variant's first call."""

    def fit(cfg, *, storage_path, name, mlflow=None):
        from cglab.tune.tiny_fit import tiny_fit

        variant = cfg.objective.kind
        log = calls / f"{variant}.jsonl"
        first = not log.exists()
        with log.open("a") as f:
            f.write(json.dumps({"run_id": mlflow.run_id if mlflow else None, "name": name}) + "\n")
        if fail_once == variant and first:
            raise RuntimeError("injected failure: first attempt of " + variant)
        return tiny_fit(cfg, storage_path=storage_path, name=name, mlflow=mlflow)

    return fit


def _calls(calls: Path, variant: str) -> list[dict]:
    p = calls / f"{variant}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def test_two_variant_grid_logs_parent_and_children(tmp_path, mlflow_server, ray_local):
    from mlflow import MlflowClient

    from cglab.tune.sweep import run_lesson

    calls = tmp_path / "calls"
    calls.mkdir()
    res = run_lesson(2, preset="laptop", base=_base(), storage_path=str(tmp_path / "tune"),
                     tracking_uri=mlflow_server.uri, train_fn=_recording_fit(calls),
                     system_metrics_interval_s=1, verbose=0)
    assert not res.errors, res.errors
    lesson = get_lesson(2)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("codegen2/lesson-2-infill")
    assert exp is not None and exp.experiment_id == res.experiment_id
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == res.parent_run_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted(c.data.tags["variant"] for c in children) == sorted(v.name for v in lesson.variants)
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED"
        assert tags["lesson"] == "2" and tags["seed"] == "1234" and tags["preset"] == "laptop"
        expected = lesson.config_for(tags["variant"], _base(), 1234)
        assert params["objective.kind"] == expected.objective.kind
        assert params["train.train_steps"] == "8" and params["model.hidden_size"] == "64"
        assert "eval/code_ppl" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 9))  # one point per step, from rank 0 only
        assert any(k.startswith("system/") for k in child.data.metrics)
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["config.yaml"]
        # the Tune result points at the same run the training job logged into
        assert _calls(calls, expected.objective.kind)[0]["run_id"] == child.info.run_id


def test_interrupted_sweep_restores_without_rerunning_finished_trials(tmp_path, mlflow_server, ray_local):
    from mlflow import MlflowClient

    from cglab.tune.sweep import run_lesson

    calls = tmp_path / "calls"
    calls.mkdir()
    kw = dict(preset="laptop", base=_base(), storage_path=str(tmp_path / "tune"), name="resume-me",
              tracking_uri=mlflow_server.uri, train_fn=_recording_fit(calls, fail_once="infill"),
              trial_max_failures=0, verbose=0)
    first = run_lesson(2, **kw)
    assert not first.restored
    assert [r["variant"] for r in first.errors] == ["infill-r0.5"]
    assert len(_calls(calls, "clm")) == 1 and len(_calls(calls, "infill")) == 1

    second = run_lesson(2, **kw)
    assert second.restored and not second.errors
    assert len(_calls(calls, "clm")) == 1  # finished trial not re-run
    infill = _calls(calls, "infill")
    assert len(infill) == 2
    assert infill[0]["run_id"] == infill[1]["run_id"]  # the retried trial kept its MLflow run
    assert infill[0]["name"] == infill[1]["name"]  # ... and its Train run name (so its checkpoints)
    assert second.parent_run_id == first.parent_run_id
    run = MlflowClient(mlflow_server.uri).get_run(infill[1]["run_id"])
    assert run.info.status == "FINISHED" and "eval/code_ppl" in run.data.metrics

"""Every MLflow run cglab makes (sweep parent, trial, single `cglab train` run) comes from SweepTracker, created
once and found again by its tags."""

import pytest

from cglab.track.mlflow_logger import TAG_RUN, TAG_SWEEP, SweepTracker

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)


def test_runs_are_created_once_with_params_and_config(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    single = SweepTracker(mlflow_server.uri, "test/runs", sweep="one-run")
    rid = single.named_run(
        "one-run",
        tags={"owner": "me"},
        params={"train.lr": 0.001, "data.sources": [1, 2]},
        config_yaml="train:\n  lr: 0.001\n",
    )
    again = SweepTracker(mlflow_server.uri, "test/runs", sweep="one-run")
    assert again.named_run("one-run", tags={}, params={}, config_yaml="") == rid  # found, not made twice
    run = client.get_run(rid)
    assert run.info.run_name == "one-run" and run.data.tags[TAG_RUN] == "one-run" and run.data.tags["owner"] == "me"
    assert run.data.params == {"train.lr": "0.001", "data.sources": "[1, 2]"}
    local = client.download_artifacts(rid, "config.yaml", str(tmp_path))
    assert open(local).read() == "train:\n  lr: 0.001\n"
    assert again.context(rid).experiment_id == single.experiment_id

    sweep = SweepTracker(mlflow_server.uri, "test/runs", sweep="grid")
    parent = sweep.parent_run(tags={"lesson": "2"})
    assert client.get_run(parent).data.params == {} and client.get_run(parent).data.tags[TAG_SWEEP] == "grid"
    child, resumed = sweep.trial_run(parent, "t1", "v-seed1", {"seed": 1}, {"model.hidden_size": 64}, "x: 1\n")
    assert not resumed and client.get_run(child).data.params == {"model.hidden_size": "64"}
    assert sweep.trial_run(parent, "t1", "v-seed1", {}, {}, "") == (child, True)
    sweep.finish_run(child, {"eval/code_bpb": 3.0})
    sweep.finish_run(parent)
    assert client.get_run(child).info.status == "FINISHED"
    # MLflow's own "View experiment at <ui>/#/experiments/N" per ended run opens the GenAI traces overview: off
    assert "#/experiments/" not in capsys.readouterr().out

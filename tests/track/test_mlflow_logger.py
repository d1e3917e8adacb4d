"""The rank-zero logger against a real MLflow server that goes away in the middle of training."""

import json

import pytest

from cglab.track.mlflow_logger import MlflowContext, RankZeroLogger, _step_ranges

pytestmark = pytest.mark.slow


def test_step_ranges():
    assert _step_ranges([7, 1, 2, 3, 9, 10, 3]) == "1-3,7,9-10"
    assert _step_ranges([]) == ""


def test_only_rank_zero_logs():
    ctx = MlflowContext(tracking_uri="http://127.0.0.1:9", run_id="x")  # never contacted
    logger = RankZeroLogger.from_context(ctx, rank=1)
    logger.log_metrics(1, {"train/loss": 1.0})
    assert not logger.enabled and logger.flush() and logger.close() == {}


def test_training_continues_through_a_server_outage(mlflow_server):
    import torch
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("codegen2/test-outage")
    run_id = client.create_run(exp).info.run_id
    ctx = MlflowContext(
        mlflow_server.uri,
        run_id,
        system_metrics=True,
        system_metrics_interval_s=1,
        max_backlog=3,
        retry_s=0.2,
        request_timeout_s=2,
    )
    logger = RankZeroLogger.from_context(ctx, rank=0)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    done = []

    def train(steps):
        for step in steps:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            logger.log_metrics(step, {"train/loss": loss.item(), "train/lr": 0.1})
            done.append(step)

    train(range(1, 6))
    assert logger.flush(timeout_s=30)
    mlflow_server.stop()
    train(range(6, 13))  # 7 steps x 2 metrics while the server is away
    assert not logger.flush(timeout_s=30)  # the attempt failed; 3 newest points kept, 11 dropped
    mlflow_server.start()
    train(range(13, 16))
    summary = logger.close()

    assert done == list(range(1, 16))
    assert summary["unlogged_points"] == 11 and summary["unlogged_steps"] == "6-11"
    assert summary["late_points"] == 3 and summary["failed_sends"] >= 1
    run = client.get_run(run_id)
    recorded = json.loads(run.data.tags["cglab.unlogged"])
    assert recorded["points"] == 11 and recorded["steps"] == "6-11"
    assert run.data.metrics["mlflow/unlogged_points"] == 11
    loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert loss_steps == [1, 2, 3, 4, 5, 12, 13, 14, 15]

"""The rank-zero logger against a real MLflow server that goes away in the middle of training."""

import json

import pytest

from cglab.track.mlflow_logger import MlflowContext, RankZeroLogger, _step_ranges

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)


def test_step_ranges():
    assert _step_ranges([7, 1, 2, 3, 9, 10, 3]) == "1-3,7,9-10"
    assert _step_ranges([]) == ""


def test_only_rank_zero_logs():
    ctx = MlflowContext(tracking_uri="http://127.0.0.1:9", run_id="x")  # never contacted
    logger = RankZeroLogger.from_context(ctx, rank=1)
    logger.log_metrics(1, {"train/loss": 1.0})
    assert not logger.enabled and logger.flush() and logger.close() == {}


def test_training_continues_through_a_server_outage(mlflow_server):
    """Asserted on what the logger recorded at two sync points (flushes), not on how long anything took: under
    load the sender's timer may try and fail any number of times while the server is away; each failure keeps
    the newest `max_backlog` points, so what is lost depends only on what was logged during the outage."""
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
        # A refused connection fails at once whatever this is; a slow answer from a loaded machine must not
        # count as an outage (that was the failure under load: sends after the restart timing out).
        request_timeout_s=120,
    )
    logger = RankZeroLogger.from_context(ctx, rank=0)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    done, logged = [], []

    def train(steps):
        for step in steps:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            logger.log_metrics(step, {"train/loss": loss.item(), "train/lr": 0.1})
            logged.extend((step, key) for key in ("train/loss", "train/lr"))
            done.append(step)

    train(range(1, 6))
    assert logger.flush(timeout_s=300)
    assert logger.summary()["failed_sends"] == 0
    mlflow_server.stop()
    before_outage = len(logged)
    train(range(6, 13))  # 7 steps x 2 metrics while the server is away
    assert not logger.flush(timeout_s=300)  # at least this attempt failed: nothing can reach a stopped server
    during = logged[before_outage:]
    kept, dropped = during[-ctx.max_backlog :], during[: -ctx.max_backlog]
    mlflow_server.start(timeout_s=None)  # back when it answers (a loaded machine may take minutes)
    # Sync point: this forced send begins after any attempt that started while the server was down has ended,
    # so the outage's record is complete here.
    assert logger.flush(timeout_s=300)
    outage = logger.summary()
    assert outage["unlogged_points"] == len(dropped)  # 11: steps 6-10 and step 11's loss
    assert outage["unlogged_steps"] == _step_ranges([s for s, _ in dropped])
    assert outage["late_points"] == len(kept) and outage["failed_sends"] >= 1
    train(range(13, 16))
    summary = logger.close()

    assert done == list(range(1, 16))  # training never waited on the server
    # The server answered every send after the restart, so the final record is the outage's.
    assert summary == {**outage, "sent_points": len(logged) - len(dropped)}
    run = client.get_run(run_id)
    recorded = json.loads(run.data.tags["cglab.unlogged"])
    assert recorded == {
        "points": len(dropped),
        "steps": outage["unlogged_steps"],
        "late_points": len(kept),
        "failed_sends": summary["failed_sends"],
    }
    assert run.data.metrics["mlflow/unlogged_points"] == len(dropped)
    # On the server: every point logged except the dropped ones, each once.
    for key in ("train/loss", "train/lr"):
        history = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert history == [s for s, k in logged if k == key and (s, k) not in dropped], key


def test_a_checkpoint_step_is_in_mlflow_before_the_checkpoint_is_handed_on(mlflow_server, tmp_path):
    """MlflowMetrics flushes at a step with a checkpoint (RayReport, after it, registers the checkpoint): a worker
    lost right after resumes past that step, so its metrics must already be on the server. A step without a
    checkpoint stays queued for the sender (here: an hour away)."""
    from mlflow import MlflowClient

    from cglab.train.callbacks import MlflowMetrics, StepEnd

    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("test/checkpoint-flush")).info.run_id
    sink = MlflowMetrics(MlflowContext(mlflow_server.uri, run_id, system_metrics=False), rank=0)
    sink.logger.close()
    sink.logger = RankZeroLogger(
        MlflowContext(mlflow_server.uri, run_id, system_metrics=False), rank=0, flush_every_s=3600
    )
    try:
        sink.on_log(StepEnd(7, {"loss": 3.5}, 0.0, 0.1))
        sink.on_log(StepEnd(8, {"loss": 3.25}, 0.0, 0.1, checkpoint=tmp_path / "step_8"))
        got = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
        assert got == {7: 3.5, 8: 3.25}  # everything up to the checkpoint's step, before it is registered
        sink.on_log(StepEnd(9, {"loss": 3.0}, 0.0, 0.1))
        assert 9 not in {m.step for m in client.get_metric_history(run_id, "loss")}
    finally:
        sink.on_end()

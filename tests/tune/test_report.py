"""The report reads a sweep back from a real MLflow server (runs logged the way the sweep logs them)."""

import pytest

from cglab import cli
from cglab.report import collect, compare_url, metric_url, resolve_tracking, text_table, verdict_lines, write_report
from cglab.track.mlflow_logger import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND, SweepTracker
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config
from cglab.tune.results import record_verdict

pytestmark = pytest.mark.slow
SEEDS = (1, 2, 3)


def _log_sweep(uri, name, code, nl):
    """A lesson-4 sweep as the sweep logs it: code/nl: variant -> one value per seed in SEEDS."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from cglab.config import dump_config, flatten

    lesson, base = get_lesson(4), base_config("laptop")
    tracker = SweepTracker(uri, lesson.experiment, name)
    tracker.ensure_experiment()
    parent = tracker.parent_run()
    client = MlflowClient(uri)
    for v in code:
        for i, seed in enumerate(SEEDS[: len(code[v])]):
            cfg = lesson.config_for(v, base, seed)
            rid, resumed = tracker.trial_run(
                parent,
                f"{v}-{seed}",
                f"{v}-seed{seed}",
                {"variant": v, "seed": str(seed), "lesson": "4"},
                flatten(cfg),
                dump_config(cfg),
            )
            assert not resumed
            client.log_batch(rid, metrics=[Metric("loss", 5.0 - s / 10, 0, s) for s in range(1, 6)])
            tracker.finish_run(rid, {"eval/code_ppl": code[v][i], "eval/nl_ppl": nl[v][i]})
    tracker.finish_run(parent)
    return tracker, parent


def test_report_table_intervals_curves_and_verdict(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    # code: pl_only clearly best (paper agrees); nl: nl_only and mix overlap seed to seed (inconclusive)
    code = {"pl_only": [3.0, 3.1, 2.9], "nl_only": [9.0, 9.3, 8.8], "mix": [4.0, 4.3, 4.0]}
    nl = {"pl_only": [8.0, 8.1, 7.9], "nl_only": [5.0, 6.0, 4.0], "mix": [5.5, 4.5, 5.2]}
    tracker, parent = _log_sweep(mlflow_server.uri, "report-sweep", code, nl)
    client = MlflowClient(mlflow_server.uri)
    # opens as a model-training experiment in the MLflow UI, not the GenAI traces overview
    assert client.get_experiment(tracker.experiment_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND

    runs = collect(4, mlflow_server.uri)
    assert runs.sweep == "report-sweep" and list(runs.metrics) == ["pl_only", "nl_only", "mix"]
    assert runs.metrics["mix"]["eval/code_ppl"] == pytest.approx(4.1)
    assert runs.samples["mix"]["eval/code_ppl"] == {"1": 4.0, "2": 4.3, "3": 4.0}
    base = base_config("laptop")
    assert runs.curves["mix"][0] == (base.train.global_batch_size * base.data.seq_length, pytest.approx(4.9))
    table = text_table(runs)
    assert "eval/code_ppl" in table.splitlines()[0]
    mix_row = next(line for line in table.splitlines() if line.startswith("mix"))
    assert "4.1 ± 0.43" in mix_row  # sd 0.173, t(0.975, 2) = 4.303, /sqrt(3)
    lines = verdict_lines(runs)
    assert lines[0].startswith("eval/code_ppl: agrees: pl_only 3 ± 0.25 vs mix 4.1 ± 0.43, difference -1.1 [")
    assert "paired over 3 seeds; paper expects pl_only" in lines[0]
    assert lines[1].startswith("eval/nl_ppl: inconclusive (the difference's interval covers zero): nl_only")
    assert lines[2] == "eval/humaneval_pass_at_1: not measured"

    tags = record_verdict(runs, mlflow_server.uri)
    logged = client.get_run(parent).data
    assert logged.tags["verdict/eval/code_ppl"] == "agrees" == tags["verdict/eval/code_ppl"]
    assert logged.tags["verdict/eval/nl_ppl"] == "inconclusive"
    assert logged.tags["verdict/eval/humaneval_pass_at_1"] == "not measured"
    assert logged.metrics["verdict/eval/code_ppl/diff_hi"] < 0 < logged.metrics["verdict/eval/nl_ppl/diff_hi"]

    cmp = compare_url(runs, "http://ui:5000")
    assert cmp.startswith("http://ui:5000/#/compare-runs?runs=") and all(r in cmp for r in runs.run_ids)
    assert len(runs.run_ids) == 9 and "plot_metric_keys" in metric_url(runs, "http://ui:5000")

    out, _ = write_report(4, mlflow_server.uri, tmp_path / "lesson-4.html")
    page = out.read_text()
    assert "<table>" in page and "lesson-4.png" in page and (tmp_path / "lesson-4.png").stat().st_size > 0
    assert "lesson-4-metrics.png" in page and (tmp_path / "lesson-4-metrics.png").stat().st_size > 0
    assert "4.1 ± 0.43" in page and "compare-runs" in page
    with pytest.raises(LookupError, match="lesson-1-prefix-lm"):
        collect(1, mlflow_server.uri)


def test_one_seed_report_says_no_verdict(mlflow_server):
    _log_sweep(mlflow_server.uri, "one-seed", {"pl_only": [3.0], "mix": [9.0]}, {"pl_only": [8.0], "mix": [5.0]})
    lines = verdict_lines(collect(4, mlflow_server.uri, "one-seed"))
    assert lines[0] == (
        "eval/code_ppl: inconclusive (one seed, no verdict): pl_only 3 vs mix 9, difference -6; paper expects pl_only"
    )


@pytest.mark.timeout(60)  # a hang (MLflow's client retries for minutes) fails here, not at the suite's 600 s
def test_report_against_a_server_that_does_not_answer_fails_fast_and_says_so(tmp_path, capsys, monkeypatch):
    from cglab.track.server import free_port

    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert cli.main(["report", "--lesson", "3", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert f"the MLflow server at {uri} does not answer" in err and "cglab mlflow up" in err
    # no URI anywhere and no local store: says where it looked
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["report", "--lesson", "3"]) == 1
    assert "no local store at .cglab/mlflow/mlflow.db" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(LookupError, match="does not answer"):
        resolve_tracking(None)

"""The report reads a sweep back from a real MLflow server (runs logged the way the sweep logs them)."""
import pytest

from cglab.report import collect, text_table, verdict_lines, write_report
from cglab.track.mlflow_logger import SweepTracker
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config

pytestmark = pytest.mark.slow


def test_report_table_curves_and_verdict(tmp_path, mlflow_server):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    lesson = get_lesson(4)
    base = base_config("laptop")
    tracker = SweepTracker(mlflow_server.uri, lesson.experiment, "report-sweep")
    tracker.ensure_experiment()
    parent = tracker.parent_run()
    client = MlflowClient(mlflow_server.uri)
    code = {"pl_only": 3.0, "nl_only": 9.0, "mix": 4.0}
    nl = {"pl_only": 8.0, "nl_only": 5.0, "mix": 5.5}
    for i, v in enumerate(code):
        cfg = lesson.config_for(v, base, 1)
        from cglab.config import dump_config, flatten

        rid, resumed = tracker.trial_run(parent, f"t{i}", v, {"variant": v, "seed": "1", "lesson": "4"},
                                         flatten(cfg), dump_config(cfg))
        assert not resumed
        client.log_batch(rid, metrics=[Metric("train/loss", 5.0 - s / 10, 0, s) for s in range(1, 6)])
        tracker.finish_run(rid, {"eval/code_ppl": code[v], "eval/nl_ppl": nl[v]})
    tracker.finish_run(parent)

    runs = collect(4, mlflow_server.uri)
    assert runs.sweep == "report-sweep" and list(runs.metrics) == ["pl_only", "nl_only", "mix"]
    assert runs.metrics["mix"]["eval/code_ppl"] == 4.0
    tokens_per_step = base.train.global_batch_size * base.data.seq_length
    assert runs.curves["mix"][0] == (tokens_per_step, pytest.approx(4.9))
    table = text_table(runs)
    assert "eval/code_ppl" in table.splitlines()[0] and "mix" in table
    lines = verdict_lines(runs)
    assert lines[0].startswith("eval/code_ppl: pl_only wins by 25.0% over mix") and "agrees" in lines[0]
    assert lines[1].startswith("eval/nl_ppl: nl_only wins by 9.1% over mix")
    assert lines[2] == "eval/humaneval_pass_at_1: not measured"

    out, _ = write_report(4, mlflow_server.uri, tmp_path / "lesson-4.html")
    page = out.read_text()
    assert "<table>" in page and "lesson-4.png" in page and (tmp_path / "lesson-4.png").stat().st_size > 0
    with pytest.raises(LookupError, match="lesson-1-prefix-lm"):
        collect(1, mlflow_server.uri)

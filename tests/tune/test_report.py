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


def _trial_runs(uri, name, per_variant):
    """A lesson-4 sweep's parent and trial runs, created as the sweep creates them: per_variant: variant -> one entry
    per seed in SEEDS. Returns the tracker, the parent run, the laptop base config and (variant, seed index, run id)
    per trial."""
    from cglab.config import dump_config, flatten

    lesson, base = get_lesson(4), base_config("laptop")
    tracker = SweepTracker(uri, lesson.experiment, name)
    tracker.ensure_experiment()
    parent = tracker.parent_run()
    trials = []
    for v in per_variant:
        for i, seed in enumerate(SEEDS[: len(per_variant[v])]):
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
            trials.append((v, i, rid))
    return tracker, parent, base, trials


def _log_sweep(uri, name, code, nl):
    """A lesson-4 sweep as the sweep logs it: code/nl: variant -> one value per seed in SEEDS."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    tracker, parent, _, trials = _trial_runs(uri, name, code)
    client = MlflowClient(uri)
    for v, i, rid in trials:
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


def _log_curves_sweep(uri, name, code, nl, steps=(2, 4, 6, 8)):
    """A lesson-4 sweep whose trials evaluated at several steps, as training logs it: the held-out metrics under
    their final keys at each step, `eval/tokens_seen` with them except at the final step (the report falls back
    to step x batch x sequence there). code/nl: variant -> per seed, one value per step."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    tracker, parent, base, trials = _trial_runs(uri, name, code)
    per_step = base.train.global_batch_size * base.data.seq_length
    client = MlflowClient(uri)
    for v, i, rid in trials:
        points = [Metric("eval/tokens_seen", s * per_step, 0, s) for s in steps[:-1]]
        for k, vals in (("eval/code_ppl", code[v][i]), ("eval/nl_ppl", nl[v][i])):
            points += [Metric(k, x, 0, s) for s, x in zip(steps[:-1], vals[:-1])]
        client.log_batch(rid, metrics=points)
        tracker.finish_run(rid, {"eval/code_ppl": code[v][i][-1], "eval/nl_ppl": nl[v][i][-1]}, step=steps[-1])
    tracker.finish_run(parent)
    return parent, per_step


def test_report_curves_and_decision_stability(tmp_path, mlflow_server, capsys):
    from mlflow import MlflowClient

    # code: mix leads at the first evaluation (a quarter of the run), pl_only from the second on (the paper's
    # answer); nl: nl_only leads throughout. Two seeds, paired offsets: every difference is clear.
    code = {
        "pl_only": [[9.0, 5.0, 4.0, 3.0], [9.2, 5.1, 4.1, 3.1]],
        "nl_only": [[12.0, 11.0, 10.0, 9.0], [12.2, 11.1, 10.1, 9.2]],
        "mix": [[7.0, 6.0, 5.0, 4.0], [7.2, 6.1, 5.2, 4.1]],
    }
    nl = {
        "pl_only": [[12.0, 10.0, 9.0, 8.0], [12.1, 10.2, 9.1, 8.1]],
        "nl_only": [[8.0, 6.0, 5.0, 4.0], [8.1, 6.2, 5.1, 4.1]],
        "mix": [[9.0, 7.0, 6.0, 5.0], [9.1, 7.2, 6.1, 5.1]],
    }
    parent, per_step = _log_curves_sweep(mlflow_server.uri, "curves-sweep", code, nl)
    out, runs = write_report(4, mlflow_server.uri, tmp_path / "lesson-4.html", "curves-sweep")
    assert runs.histories["eval/code_ppl"]["mix"]["2"] == [
        (2 * per_step, 7.2), (4 * per_step, 6.1), (6 * per_step, 5.2), (8 * per_step, 4.1),
    ]  # fmt: skip
    code_s, nl_s, pass_s = runs.stability()
    assert [o.verdict for o in code_s.outcomes] == ["disagrees", "agrees", "agrees", "agrees"]
    assert code_s.final == runs.outcomes()[0]  # the last point is the final report's verdict
    assert code_s.stable_from_tokens == 4 * per_step and code_s.quarter == "different"
    assert nl_s.stable_from_tokens == 2 * per_step and nl_s.quarter == "same"
    assert pass_s.curves is None and pass_s.note == "not measured"

    page = out.read_text()
    for key in ("eval_code_ppl", "eval_nl_ppl"):
        png = tmp_path / f"lesson-4-curve-{key}.png"
        assert png.stat().st_size > 0 and png.name in page
    assert not list(tmp_path.glob("lesson-4-curve-eval_humaneval*"))
    assert "<tr><td>eval/humaneval_pass_at_1</td><td>not measured</td><td>-</td><td>-</td><td>not measured</td>" in page
    tok = f"{4 * per_step:,}"
    assert (
        "<tr><td>eval/code_ppl</td><td>agrees, best pl_only</td>"
        f"<td>{tok}</td><td>50%</td><td>different (disagrees, best mix at 25%)</td><td></td></tr>"
    ) in page
    assert (
        "<td>eval/nl_ppl</td><td>agrees, best nl_only</td>" in page and "<td>same (agrees, best nl_only at 25%)" in page
    )

    logged = MlflowClient(mlflow_server.uri).get_run(parent).data.tags
    assert logged["stability/eval/code_ppl/stable_from_tokens"] == str(4 * per_step)
    assert logged["stability/eval/code_ppl/stable_from_fraction"] == "0.5"
    assert logged["stability/eval/code_ppl/quarter_run"] == "different"
    assert logged["stability/eval/nl_ppl/quarter_run"] == "same"
    assert logged["stability/eval/humaneval_pass_at_1/quarter_run"] == "not measured"
    arts = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(parent, "report")}
    assert arts == {"report/lesson-4-curve-eval_code_ppl.png", "report/lesson-4-curve-eval_nl_ppl.png"}

    assert cli.main(["report", "--lesson", "4", "--sweep", "curves-sweep", "--tracking-uri", mlflow_server.uri,
                     "--out", str(tmp_path / "cli.html")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        f"eval/code_ppl: ranking and verdict stable from {tok} tokens (50% of the run); "
        "a run 4x shorter: different (disagrees, best mix at 25%)"
    ) in printed


def test_runs_with_only_the_final_evaluation_have_no_curve(tmp_path, mlflow_server):
    code, nl = {"pl_only": [3.0, 3.1], "mix": [9.0, 9.1]}, {"pl_only": [8.0, 8.1], "mix": [5.0, 5.1]}
    _log_sweep(mlflow_server.uri, "final-only", code, nl)
    out, runs = write_report(4, mlflow_server.uri, tmp_path / "l4.html", "final-only")
    assert [s.note for s in runs.stability()][:2] == ["one evaluation per run (the final one): no curve"] * 2
    assert "no curves" in out.read_text() and not list(tmp_path.glob("l4-curve-*"))

"""The report reads a sweep back from a real MLflow server (runs logged the way the sweep logs them)."""

import pytest

from cglab import cli
from cglab.report import collect, compare_url, metric_url, resolve_tracking, text_table, verdict_lines, write_report
from cglab.track.mlflow_logger import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND, SweepTracker
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config
from cglab.tune.results import record_verdict

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)
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


def _log_sweep(uri, name, code, nl, ppl=None):
    """A lesson-4 sweep as the sweep logs it: code/nl (bits per byte), ppl (code perplexity, optional): variant ->
    one value per seed in SEEDS."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    tracker, parent, _, trials = _trial_runs(uri, name, code)
    client = MlflowClient(uri)
    for v, i, rid in trials:
        client.log_batch(rid, metrics=[Metric("loss", 5.0 - s / 10, 0, s) for s in range(1, 6)])
        final = {"eval/code_bpb": code[v][i], "eval/nl_bpb": nl[v][i]}
        tracker.finish_run(rid, final | ({"eval/code_ppl": ppl[v][i]} if ppl else {}))
    tracker.finish_run(parent)
    return tracker, parent


@pytest.fixture(scope="module")
def report_sweep(mlflow_server):
    """The sweep "report-sweep" (tracker, parent run). code: mix within 0.01 bpb of pl_only in every seed
    (equivalent within the 0.02 margin); nl: mix and nl_only differ by -0.1 to +0.2 between seeds (inconclusive)."""
    code = {"pl_only": [3.0, 3.1, 2.9], "nl_only": [3.3, 3.4, 3.2], "mix": [3.005, 3.11, 2.91]}
    nl = {"pl_only": [3.9, 4.0, 3.8], "nl_only": [3.5, 3.6, 3.4], "mix": [3.55, 3.5, 3.6]}
    ppl = {"pl_only": [3.0, 3.1, 2.9], "nl_only": [9.0, 9.3, 8.8], "mix": [4.0, 4.3, 4.0]}
    tracker, parent = _log_sweep(mlflow_server.uri, "report-sweep", code, nl, ppl)
    record_verdict(collect(4, mlflow_server.uri, "report-sweep"), mlflow_server.uri)  # as the sweep does at its end
    return tracker, parent


def test_report_table_intervals_curves_and_verdict(tmp_path, mlflow_server, report_sweep):
    from mlflow import MlflowClient

    tracker, parent = report_sweep
    client = MlflowClient(mlflow_server.uri)
    # opens as a model-training experiment in the MLflow UI, not the GenAI traces overview
    assert client.get_experiment(tracker.experiment_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND

    runs = collect(4, mlflow_server.uri)
    assert runs.sweep == "report-sweep" and list(runs.metrics) == ["pl_only", "nl_only", "mix"]
    assert runs.metrics["mix"]["eval/code_bpb"] == pytest.approx(3.0083333)
    # a perplexity's mean over seeds is over its log (mean NLL), shown back as a perplexity: not (4+4.3+4)/3
    assert runs.metrics["mix"]["eval/code_ppl"] == pytest.approx((4.0 * 4.3 * 4.0) ** (1 / 3))
    assert runs.interval("mix", "eval/code_ppl").mean == pytest.approx((4.0 * 4.3 * 4.0) ** (1 / 3))
    assert runs.samples["mix"]["eval/code_ppl"] == {"1": 4.0, "2": 4.3, "3": 4.0}
    base = base_config("laptop")
    assert runs.curves["mix"][0] == (base.train.global_batch_size * base.data.seq_length, pytest.approx(4.9))
    table = text_table(runs)
    assert table.splitlines()[0].split()[2:4] == ["eval/code_bpb", "eval/nl_bpb"]  # the deciding metrics first
    mix_row = next(line for line in table.splitlines() if line.startswith("mix"))
    assert "3.008 ± 0.25" in mix_row  # sd 0.1, t(0.975, 2) = 4.303, /sqrt(3)
    lines = verdict_lines(runs)
    assert lines[0].startswith(
        "equivalence mix vs pl_only on eval/code_bpb: equivalent: mix 3.008 ± 0.25 vs pl_only 3 ± 0.25, "
        "a - b +0.008333 [+0.003467, +0.0132] (90%, paired over 3 seeds), margin 0.02, p 0.0099 (Holm 0.0198)"
    )  # TOST's upper test: t = (0.02 - 0.00833) / 0.00167 = 7 at df 2, p = 1/2 - 7 / (2 sqrt(51)); Holm: x2
    assert lines[1].startswith("equivalence mix vs nl_only on eval/nl_bpb: inconclusive (p ")
    assert len(lines) == 2  # pass@1 is reported, never decided

    tags = record_verdict(runs, mlflow_server.uri)
    logged = client.get_run(parent).data
    code_key, nl_key = "verdict/eval/code_bpb/mix_vs_pl_only", "verdict/eval/nl_bpb/mix_vs_nl_only"
    assert logged.tags[code_key] == "equivalent" == tags[code_key] and logged.tags[nl_key] == "inconclusive"
    assert logged.tags[f"{code_key}/test"] == "equivalence, margin 0.02"
    m = logged.metrics
    assert m[f"{code_key}/diff_lo"] > -0.02 and m[f"{code_key}/diff_hi"] < 0.02 and m[f"{code_key}/margin"] == 0.02
    assert m[f"{code_key}/p"] < m[f"{code_key}/p_holm"] < 0.05 < m[f"{nl_key}/p_holm"]

    cmp = compare_url(runs, "http://ui:5000")
    assert cmp.startswith("http://ui:5000/#/compare-runs?runs=") and all(r in cmp for r in runs.run_ids)
    assert len(runs.run_ids) == 9 and "plot_metric_keys" in metric_url(runs, "http://ui:5000")

    out, _ = write_report(4, mlflow_server.uri, tmp_path / "lesson-4.html")
    page = out.read_text()
    assert "<table>" in page and "lesson-4.png" in page and (tmp_path / "lesson-4.png").stat().st_size > 0
    assert "lesson-4-metrics.png" in page and (tmp_path / "lesson-4-metrics.png").stat().st_size > 0
    assert "3.008 ± 0.25" in page and "compare-runs" in page
    assert (
        (
            "<tr><td>mix vs pl_only</td><td>eval/code_bpb</td><td>equivalence</td><td>0.02</td>"
            "<td>+0.008333 [+0.003467, +0.0132]</td>"
        )
        in page
        and "<td>equivalent</td>" in page
        and "Held equal across variants: raw tokens." in page
    )
    with pytest.raises(LookupError, match="lesson-1-prefix-lm"):
        collect(1, mlflow_server.uri)


def test_what_a_person_opens_after_cglab_report_in_a_browser(tmp_path, mlflow_server, report_sweep, capsys):
    """`cglab report` as a user runs it, then its page and every MLflow link it prints, rendered by Chromium on a
    first visit: the page shows the variants and the verdicts, and each link lands on its page of the sweep's
    trial runs (the runs table, the sweep's run, the compare and metric views), never the GenAI traces overview."""
    from tests.browser import chromium, links, render, text, title

    browser = chromium()
    tracker, parent = report_sweep
    out = tmp_path / "lesson-4.html"
    argv = ["report", "--lesson", "4", "--sweep", "report-sweep", "--tracking-uri", mlflow_server.uri]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if ": http" in line]
    report, *pages = render(browser, [out.as_uri(), *printed], tmp_path)

    seen = text(report)
    for v in ("pl_only", "nl_only", "mix"):
        assert f"|{v}|3|FINISHED|" in seen  # the variants x metrics table: each variant, its seeds, their status
    assert (
        "|mix vs pl_only|eval/code_bpb|equivalence|0.02|+0.008333 [+0.003467, +0.0132]|0.0099|0.0198|equivalent|"
        in seen
    )
    assert "|mix vs nl_only|eval/nl_bpb|equivalence|0.05|+0.05 [-0.2029, +0.3029]|0.5|0.5|inconclusive|" in seen
    assert links(report) == printed  # the page links to the pages the command printed, in its order

    eid = tracker.experiment_id
    assert [title(p) for p in pages] == [
        f"Runs - Experiment {eid} - MLflow",
        f"Run {parent} - MLflow",
        "Compare Runs - MLflow",
        "Metric Details - MLflow",
    ]
    trials = [f"{v}-seed{s}" for v in ("pl_only", "nl_only", "mix") for s in SEEDS]
    for url, page in zip(printed, pages):
        shown = text(page)
        assert [t for t in trials if f"|{t}|" not in shown] == [], f"{url} does not show every trial run"
        assert "|Model registry|" in shown, f"{url} opens MLflow's GenAI side, not its model training side"
    assert "|verdict/eval/code_bpb/mix_vs_pl_only|: equivalent|" in text(pages[1])  # the sweep's run: its verdicts


def test_one_seed_report_says_no_verdict(mlflow_server):
    _log_sweep(mlflow_server.uri, "one-seed", {"pl_only": [3.0], "mix": [9.0]}, {"pl_only": [8.0], "mix": [5.0]})
    lines = verdict_lines(collect(4, mlflow_server.uri, "one-seed"))
    assert lines[0] == (
        "equivalence mix vs pl_only on eval/code_bpb: inconclusive (one seed, no verdict): mix 9 vs pl_only 3, "
        "a - b +6, margin 0.02, p - (Holm -)"
    )
    assert lines[1].startswith("equivalence mix vs nl_only on eval/nl_bpb: not measured (no eval/nl_bpb for nl_only)")


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
        for k, vals in (("eval/code_bpb", code[v][i]), ("eval/nl_bpb", nl[v][i])):
            points += [Metric(k, x, 0, s) for s, x in zip(steps[:-1], vals[:-1])]
        client.log_batch(rid, metrics=points)
        tracker.finish_run(rid, {"eval/code_bpb": code[v][i][-1], "eval/nl_bpb": nl[v][i][-1]}, step=steps[-1])
    tracker.finish_run(parent)
    return parent, per_step


def test_report_curves_and_decision_stability(tmp_path, mlflow_server, capsys):
    from mlflow import MlflowClient

    # code: mix leads at the first evaluation (a quarter of the run), pl_only from the second on; nl: nl_only leads
    # throughout. Two seeds, paired offsets: every difference is clear, and far outside the equivalence margins.
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
    assert runs.histories["eval/code_bpb"]["mix"]["2"] == [
        (2 * per_step, 7.2), (4 * per_step, 6.1), (6 * per_step, 5.2), (8 * per_step, 4.1),
    ]  # fmt: skip
    code_s, nl_s, pass_s = runs.stability()
    assert [[o.verdict for o in os] for os in code_s.outcomes] == [["disagrees"]] * 4
    assert code_s.final == (runs.outcomes()[0],)  # the last point is the final report's verdict
    assert code_s.stable_from_tokens == 4 * per_step and code_s.quarter == "different"
    assert nl_s.stable_from_tokens == 2 * per_step and nl_s.quarter == "same"
    assert pass_s.curves is None and pass_s.note == "not measured"

    page = out.read_text()
    for key in ("eval_code_bpb", "eval_nl_bpb"):
        png = tmp_path / f"lesson-4-curve-{key}.png"
        assert png.stat().st_size > 0 and png.name in page
    assert not list(tmp_path.glob("lesson-4-curve-eval_humaneval*"))
    assert "<tr><td>eval/humaneval_pass_at_1</td><td>not measured</td><td>-</td><td>-</td><td>not measured</td>" in page
    tok = f"{4 * per_step:,}"
    assert (
        "<tr><td>eval/code_bpb</td><td>mix vs pl_only: disagrees, best pl_only</td>"
        f"<td>{tok}</td><td>50%</td><td>different (mix vs pl_only: disagrees, best mix at 25%)</td><td></td></tr>"
    ) in page
    assert "<td>eval/nl_bpb</td><td>mix vs nl_only: disagrees, best nl_only</td>" in page
    assert "<td>same (mix vs nl_only: disagrees, best nl_only at 25%)" in page

    logged = MlflowClient(mlflow_server.uri).get_run(parent).data.tags
    assert logged["stability/eval/code_bpb/stable_from_tokens"] == str(4 * per_step)
    assert logged["stability/eval/code_bpb/stable_from_fraction"] == "0.5"
    assert logged["stability/eval/code_bpb/quarter_run"] == "different"
    assert logged["stability/eval/nl_bpb/quarter_run"] == "same"
    assert logged["stability/eval/humaneval_pass_at_1/quarter_run"] == "not measured"
    arts = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(parent, "report")}
    assert arts == {"report/lesson-4-curve-eval_code_bpb.png", "report/lesson-4-curve-eval_nl_bpb.png"}

    assert cli.main(["report", "--lesson", "4", "--sweep", "curves-sweep", "--tracking-uri", mlflow_server.uri,
                     "--out", str(tmp_path / "cli.html")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        f"eval/code_bpb: ranking and verdicts stable from {tok} tokens (50% of the run); "
        "a run 4x shorter: different (mix vs pl_only: disagrees, best mix at 25%)"
    ) in printed


def test_runs_with_only_the_final_evaluation_have_no_curve(tmp_path, mlflow_server):
    code, nl = {"pl_only": [3.0, 3.1], "mix": [9.0, 9.1]}, {"pl_only": [8.0, 8.1], "mix": [5.0, 5.1]}
    _log_sweep(mlflow_server.uri, "final-only", code, nl)
    out, runs = write_report(4, mlflow_server.uri, tmp_path / "l4.html", "final-only")
    assert [s.note for s in runs.stability()][:2] == ["one evaluation per run (the final one): no curve"] * 2
    assert "no curves" in out.read_text() and not list(tmp_path.glob("l4-curve-*"))

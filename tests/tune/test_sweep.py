"""A lesson grid through Ray Tune -> Ray Train (the real Megatron trainer) -> evaluation -> a real MLflow
server, interrupted and restored, then `cglab report`. One sweep (lesson 2: clm, infill, two seeds each) serves every
test here: its first infill trial fails once before training, the sweep is restored, and then every trial has
trained and been evaluated."""

import json
from pathlib import Path

import numpy as np
import pytest

from cglab.eval.sandbox import isolation_mode
from cglab.tune.lessons import get_lesson
from cglab.tune.presets import base_config
from cglab.tune.verdicts import ONE_SEED

pytestmark = pytest.mark.slow
STEPS = 8
HE_LIMIT = 3  # HumanEval problems per trial: enough to see pass@1 logged with its sandbox conditions
EVERY, CODE_LIMIT = 4, 2  # evaluation while training (cglab.eval.periodic): due at steps 4 and 8
SEEDS = (1, 2)  # the fewest that give intervals and a verdict (the laptop preset's default is one seed)


def _base(sources):
    return base_config(
        "laptop",
        overrides=[
            f"data.sources={json.dumps(sources)}",
            f"train.train_steps={STEPS}",
            "train.warmup_steps=2",
            "eval.suites=[nl,humaneval]",
            f"eval.limit={HE_LIMIT}",
            # evaluation while training: text curves every EVERY steps, pass@1 on CODE_LIMIT tasks per suite
            f"eval.every={EVERY}",
            f"eval.code_every={EVERY}",
            f"eval.code_limit={CODE_LIMIT}",
        ],
    )


def _recording_fit(calls: Path, fail_once: str):
    """The real trainer, noting each call (MLflow run id, Train run name); the first call of one objective
    fails before training, as an interrupted trial would."""

    def fit(cfg, *, storage_path, name, mlflow=None, **kw):
        from cglab.train.trainer import fit as real_fit

        kind = cfg.objective.kind
        log = calls / f"{kind}.jsonl"
        first = not log.exists()
        with log.open("a") as f:
            f.write(json.dumps({"run_id": mlflow.run_id if mlflow else None, "name": name}) + "\n")
        if kind == fail_once and first:
            raise RuntimeError("injected failure: first attempt of " + kind)
        return real_fit(cfg, storage_path=storage_path, name=name, mlflow=mlflow, **kw)

    return fit


def _calls(calls: Path, kind: str) -> list[dict]:
    p = calls / f"{kind}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, micro_sources, mlflow_server, ray_local):
    from cglab.tune.sweep import run_lesson

    tmp = tmp_path_factory.mktemp("sweep")
    calls = tmp / "calls"
    calls.mkdir()
    kw = dict(
        preset="laptop",
        base=_base(micro_sources),
        storage_path=str(tmp / "tune"),
        name="resume-me",
        seeds=SEEDS,
        tracking_uri=mlflow_server.uri,
        train_fn=_recording_fit(calls, fail_once="infill"),
        trial_max_failures=0,
        system_metrics_interval_s=1,
        verbose=0,
    )
    first = run_lesson(2, **kw)
    second = run_lesson(2, **kw)
    return dict(first=first, second=second, calls=calls, uri=mlflow_server.uri, sources=micro_sources, tmp=tmp)


def test_two_variant_grid_logs_parent_children_params_tags_and_metrics(sweep):
    from mlflow import MlflowClient

    res, lesson = sweep["second"], get_lesson(2)
    assert not res.errors, res.errors
    client = MlflowClient(sweep["uri"])
    exp = client.get_experiment_by_name("codegen2/lesson-2-infill")
    assert exp is not None and exp.experiment_id == res.experiment_id
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == res.parent_run_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    heldout = {"eval.texts": "heldout", "eval.heldout": "nl:heldout,code:heldout"}
    assert parent[0].data.tags == {**parent[0].data.tags, **heldout}
    assert sorted((c.data.tags["variant"], c.data.tags["seed"]) for c in children) == sorted(
        (v.name, str(s)) for v in lesson.variants for s in SEEDS
    )
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        assert child.info.status == "FINISHED"
        assert tags["lesson"] == "2" and int(tags["seed"]) in SEEDS and tags["preset"] == "laptop"
        expected = lesson.config_for(tags["variant"], _base(sweep["sources"]), int(tags["seed"]))
        assert params["train.seed"] == params["data.seed"] == tags["seed"]
        assert params["objective.kind"] == expected.objective.kind
        assert params["train.train_steps"] == str(STEPS) and params["model.hidden_size"] == "64"
        # trained on the sources as configured minus the sweep's held-out split (skipped at read time, one split
        # for every trial: eval.holdout and its own seed), with the sweep's one tokenizer
        assert params["data.sources.0.paths"] == json.dumps(sweep["sources"][0]["paths"])
        assert params["eval.holdout"] == "True" and params["eval.heldout_seed"] == "0"
        assert params["data.tokenizer.path"].endswith("resume-me-inputs/tokenizer")
        for key in ("eval/code_ppl", "eval/nl_ppl", "eval/infill_ppl", "eval/code_bpb", "eval/infill_bpb", "loss"):
            assert 1.0 < metrics[key] < 1e6, (key, metrics[key])
        # scored on the held-out split, and pass@1 logged with its conditions: the sandbox's isolation and
        # every program's status (a jail failure would show as sandbox_error, never hide among the fails)
        assert tags == {**tags, **heldout, "eval/humaneval_isolation": isolation_mode()}
        counts = {s: metrics[f"eval/humaneval_{s}"] for s in ("passed", "failed", "timed_out", "sandbox_error")}
        assert sum(counts.values()) == HE_LIMIT and counts["sandbox_error"] == 0, counts
        assert metrics["eval/humaneval_pass_at_1"] == pytest.approx(counts["passed"] / HE_LIMIT)
        history = client.get_metric_history(child.info.run_id, "loss")
        # every step from rank 0 (the trial's final metrics repeat the last step's loss once)
        assert sorted({m.step for m in history}) == list(range(1, STEPS + 1)) and len(history) <= STEPS + 1
        assert any(k.startswith("system/") for k in metrics)
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["config.yaml", "plan.json"]
        # the Tune result points at the run the training job logged into
        assert child.info.run_id in {c["run_id"] for c in _calls(sweep["calls"], expected.objective.kind)}
    assert sorted((r["variant"], r["seed"]) for r in res.results) == sorted(
        (v, s) for v in ("clm", "infill-r0.5") for s in SEEDS
    )
    assert sorted(r["mlflow_run_id"] for r in res.results) == sorted(c.info.run_id for c in children)
    assert all(r["eval.texts"] == "heldout" and r["eval/humaneval_isolation"] == isolation_mode() for r in res.results)


def test_every_trial_hands_back_where_its_time_went(sweep):
    """cglab.track.timeline's events reach the driver in each trial's result, from all four processes of a trial
    (trial function, `fit`'s task, the Train worker, the final evaluation's task), in the order they ran."""
    from cglab.track import timeline

    run_order = "trial start|fit entry|trainer.fit called|worker_loop entry|first step done|last step done|"
    run_order += "trainer.fit returned|eval entry|eval end|mlflow final writes done|trial end"
    for r in sweep["second"].results:
        at = {e["phase"]: e for e in timeline.events(r["timeline"])}
        times = [at[p]["t"] for p in run_order.split("|")]
        assert times == sorted(times), sorted(at, key=lambda p: at[p]["t"])
        pids = {at[p]["pid"] for p in ("trial start", "fit entry", "worker_loop entry")}
        assert len(pids) == 3 and at["worker imports done"]["t"] <= at["worker_loop entry"]["t"]


def test_trials_run_in_a_reused_trial_actor_on_the_plan_the_preflight_made(sweep):
    """Tune's reuse_actors: back-to-back trials of one `run_lesson` share their trial actor (its process and imports
    are warm); each trial's `fit` checks and records the sweep preflight's plan of it (made for the trial's place in
    the sweep: the trial function's and its data tasks' CPUs counted) instead of planning again."""
    from cglab.track import timeline
    from cglab.tune.presets import get_preset

    first = [r for r in sweep["second"].results if r["variant"] == "clm"]  # both trained in the first run_lesson
    pids = {next(e["pid"] for e in timeline.events(r["timeline"]) if e["phase"] == "trial start") for r in first}
    assert len(first) == len(SEEDS) and len(pids) == 1, pids
    pre = get_preset("laptop")
    plan_files = sorted((sweep["tmp"] / "tune" / "resume-me-train").glob("*/plan.json"))
    assert len(plan_files) == 2 * len(SEEDS)
    for plan_file in plan_files:
        per_run = json.loads(plan_file.read_text())["resources"]["per_run"]
        # the trial's CPUs as the sweep counts them (cglab.tune.presets.trial_resources), not a lone run's
        assert per_run["CPU"] == pytest.approx(1 + pre.driver_cpus + pre.data_cpus + 0.5), (plan_file, per_run)


def test_interrupted_sweep_restores_without_rerunning_finished_trials(sweep):
    from mlflow import MlflowClient

    first, second, calls = sweep["first"], sweep["second"], sweep["calls"]
    assert not first.restored
    assert [r["variant"] for r in first.errors] == ["infill-r0.5"]
    assert second.restored and not second.errors
    assert len(_calls(calls, "clm")) == len(SEEDS)  # finished trials not re-run
    infill = _calls(calls, "infill")
    assert len(infill) == len(SEEDS) + 1  # the failed one, the other seed's, the failed one again
    retried = [c for c in infill[1:] if c["run_id"] == infill[0]["run_id"]]
    assert len(retried) == 1  # the retried trial kept its MLflow run
    assert retried[0]["name"] == infill[0]["name"]  # ... and its Train run name (so its checkpoints)
    assert second.parent_run_id == first.parent_run_id
    run = MlflowClient(sweep["uri"]).get_run(retried[0]["run_id"])
    assert run.info.status == "FINISHED" and "eval/infill_ppl" in run.data.metrics


def test_evaluation_while_training_logs_curves_and_pass_at_1_at_their_steps(sweep):
    """eval.every / eval.code_every in a real trial: the Ray task's metrics land in the trial's MLflow run at the
    steps their snapshots were taken, the text metrics' history is the curve ending in the final evaluation, and
    every snapshot is deleted."""
    from mlflow import MlflowClient

    from cglab.eval.periodic import read_evals

    res = sweep["second"]
    client = MlflowClient(sweep["uri"])
    tokens_per_step = 8 * 128  # the laptop preset's global batch x sequence length
    for r in res.results:
        rid = r["mlflow_run_id"]

        def hist(key):
            return {m.step: m.value for m in client.get_metric_history(rid, key)}

        evaluated, skipped = set(hist("code_eval/humaneval_pass_at_1")), set(hist("eval/skipped"))
        # the first due step always has its task; a later one is evaluated or, while that task runs, skipped
        assert EVERY in evaluated and evaluated | skipped == {EVERY, STEPS} and not evaluated & skipped
        tags = client.get_run(rid).data.tags
        for suite in ("humaneval", "humaneval_infill"):
            assert tags[f"code_eval/{suite}_isolation"] == isolation_mode()
            for step in evaluated:
                n = {
                    s: hist(f"code_eval/{suite}_{s}")[step] for s in ("passed", "failed", "timed_out", "sandbox_error")
                }
                assert sum(n.values()) == CODE_LIMIT and n["sandbox_error"] == 0, (suite, step, n)
                assert hist(f"code_eval/{suite}_pass_at_1")[step] == pytest.approx(n["passed"] / CODE_LIMIT)
        for step in evaluated:
            assert hist("code_eval/seconds")[step] > 0 and hist("eval_task/cpu_s")[step] > 0
        # the curves: the periodic point at EVERY, then the final evaluation's at the last step (tokens_seen with
        # each); the fixed-subset pass@1 never lands on the final evaluation's keys
        for key in (
            "eval/nl_ppl",
            "eval/nl_bpb",
            "eval/code_ppl",
            "eval/code_bpb",
            "eval/infill_ppl",
            "eval/infill_bpb",
        ):
            assert sorted(hist(key)) == [EVERY, STEPS], key
        tokens = hist("eval/tokens_seen")
        assert {EVERY, STEPS} <= set(tokens) and all(tokens[s] == s * tokens_per_step for s in tokens)
        assert sorted(hist("eval/humaneval_pass_at_1")) == [STEPS]
    train_runs = sorted((sweep["tmp"] / "tune" / "resume-me-train").iterdir())
    assert len(train_runs) == 2 * len(SEEDS)
    for run_dir in train_runs:
        records = read_evals(run_dir)
        assert EVERY in records and all("error" not in rec for rec in records.values()), records
        assert list((run_dir / "evals").iterdir()) == []  # every snapshot deleted after its evaluation


def test_report_of_the_two_seed_sweep_shows_intervals_verdicts_and_curves(sweep, tmp_path):
    """`cglab report --lesson 2` (the real command, in a subprocess) on the sweep: every value a mean over the two
    seeds with its interval, a verdict per declared contrast (not "one seed"), the held-out curves with their
    seed bands drawn, and the decision stability, also recorded on the sweep's parent run."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from cglab.tune.results import collect

    res, lesson = sweep["second"], get_lesson(2)
    out = tmp_path / "lesson-2.html"
    cmd = [sys.executable, "-m", "cglab.cli", "report", "--lesson", "2", "--tracking-uri", sweep["uri"]]
    r = subprocess.run([*cmd, "--sweep", res.name, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["variant", "seeds", "eval/code_bpb", "eval/infill_bpb"]
    for v in ("clm", "infill-r0.5"):
        row = next(line for line in lines if line.startswith(v + " "))
        assert row.split()[1] == str(len(SEEDS)) and row.count("±") >= 3, row  # code, NL and infill ppl at least
    for c in lesson.contrasts:
        line = next(line for line in lines if line.startswith(f"{c.test} {c.name}: "))
        word = line.split(": ")[1].split()[0]
        assert word in ("agrees", "disagrees", "inconclusive") and "one seed" not in line, line
        assert f"paired over {len(SEEDS)} seeds" in line, line  # variants of a lesson share each seed's data order
    assert "decision stability:" in lines

    runs = collect(lesson, sweep["uri"], res.name)
    parent = MlflowClient(sweep["uri"]).get_run(res.parent_run_id).data.tags
    curved = 0
    for s in runs.stability():
        assert parent[f"stability/{s.metric}/quarter_run"] in ("same", "different", "not measured")
        if s.curves is None:
            assert s.note in ("not measured", "one evaluation per run (the final one): no curve"), s
            continue
        curved += 1
        # the point at EVERY and the final evaluation's, both seeds at each: a mean with its band
        assert s.curves.fraction.tolist() == [EVERY / STEPS, 1.0] and (s.curves.n == len(SEEDS)).all()
        assert not np.isnan(s.curves.lo).any() and (s.curves.lo <= s.curves.mean).all()
        assert s.stable_from is not None and float(parent[f"stability/{s.metric}/stable_from_tokens"]) > 0
        assert (tmp_path / f"lesson-2-curve-{s.metric.replace('/', '_')}.png").stat().st_size > 0
        assert all(o.note != ONE_SEED for os in s.outcomes for o in os)  # a verdict at every point, not only at the end
    assert curved >= 2  # code and infill bits per byte (pass@1 is only evaluated at the end)

"""The README's order for a newcomer: `cglab ablate 3 --preset laptop`, then `cglab report --lesson 3`, with no
tracking URI anywhere. Real processes: ablate starts its own Ray and MLflow server on a SQLite store under
.cglab/mlflow and stops them; report must find that store by itself."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cglab(args, cwd, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", "cglab.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_ablate_then_report_with_no_tracking_uri(tmp_path, micro_sources):
    from mlflow import MlflowClient

    from cglab.track.mlflow_logger import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND
    from cglab.track.server import sqlite_uri

    # Smallest real sweep: the two variants of lesson 3's declared contrast, one seed, a few steps.
    # (overrides before --variants: its nargs="+" would take them as variant names)
    ablate = _cglab(
        [
            "ablate",
            "3",
            f"data.sources={json.dumps(micro_sources)}",
            "train.train_steps=4",
            "train.warmup_steps=1",
            "train.log_every=2",
            "eval.limit=2",
            "track.system_metrics=false",
            "--preset",
            "laptop",
            "--variants",
            "clm",
            "codegen2-file_level",
        ],
        tmp_path,
        540,
    )
    assert ablate.returncode == 0, ablate.stdout[-3000:] + ablate.stderr[-3000:]
    assert (tmp_path / ".cglab/mlflow/mlflow.db").is_file()
    # its server stopped with it: the links are to the UI `cglab mlflow up` serves on that store, the runs first
    assert "MLflow UI on these runs: `cglab mlflow up --root .cglab/mlflow --port 5000`, then\n" in ablate.stdout
    assert "\n  the sweep's runs: http://127.0.0.1:5000/#/experiments/1/runs?searchFilter=" in ablate.stdout

    report = _cglab(["report", "--lesson", "3"], tmp_path, 120)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    out = report.stdout
    assert out.splitlines()[0].split()[:4] == ["variant", "seeds", "eval/code_bpb", "eval/infill_bpb"]
    assert any(line.startswith("clm ") for line in out.splitlines())
    assert "non_inferiority codegen2-file_level vs clm on eval/code_bpb: inconclusive (one seed, no verdict): " in out
    assert "#/compare-runs?runs=" in out and "cglab mlflow up --root .cglab/mlflow" in out
    assert (tmp_path / "dashboards/lesson-3.html").is_file()
    assert (tmp_path / "dashboards/lesson-3-metrics.png").is_file()

    # what ablate left in the store: a model-training experiment, the verdict on the sweep's parent run
    client = MlflowClient(sqlite_uri(tmp_path / ".cglab/mlflow/mlflow.db"))
    exp = client.get_experiment_by_name("codegen2/lesson-3-objective")
    assert exp.tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    parent = client.search_runs([exp.experiment_id], "tags.`cglab.role` = 'sweep'")[0]
    key = "verdict/eval/code_bpb/codegen2-file_level_vs_clm"
    assert parent.data.tags[key] == "inconclusive" and parent.data.tags[f"{key}/note"] == "one seed, no verdict"

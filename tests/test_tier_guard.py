"""The fast tier's guard (tests/tier_guard.py): an unmarked test that starts an MLflow server fails, the same test
marked slow passes, and the commands cglab and the cluster tests really run are recognised."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cglab.track.server import server_command
from tests.tier_guard import _heavy_command

REPO = Path(__file__).resolve().parents[1]

INNER = """
import subprocess, sys

import pytest

# A command line of the shape `mlflow server ...`, run by a Python that exits at once: the guard reads command
# lines, so this exercises it without paying for a server.
COMMAND = [sys.executable, "-c", "pass", "mlflow", "server"]


def test_unmarked():
    subprocess.run(COMMAND, check=True)


@pytest.mark.slow
def test_marked():
    subprocess.run(COMMAND, check=True)


def test_plain():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_an_unmarked_test_that_starts_a_server_fails_and_a_slow_one_does_not(pytester, monkeypatch, request):
    assert request.config.pluginmanager.has_plugin("tests.tier_guard")  # this suite runs under the guard
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
    )
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "tests.tier_guard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_unmarked is not marked slow but started an MLflow server*"])


def test_the_commands_that_start_servers_are_recognised():
    mlflow = server_command("sqlite:///m.db", "/tmp/a", "127.0.0.1", 5000)
    assert _heavy_command(mlflow) == "an MLflow server"
    assert _heavy_command([sys.executable, "-m", "mlflow", "server", "--port", "1"]) == "an MLflow server"
    assert _heavy_command(["/venv/bin/ray", "start", "--head", "--block"]) == "a Ray node (ray start)"
    assert _heavy_command(["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_id=x"]) == "Ray's raylet"
    assert _heavy_command(["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=1"]) == "Ray's gcs_server"
    assert _heavy_command("bash") is None
    assert _heavy_command(["bash", "-n", "gpu_e2e.sh"]) is None
    assert _heavy_command([sys.executable, "-m", "cglab.cli", "mlflow", "--help"]) is None

"""The fast tier's guard (tests/tier_guard.py): an unmarked test that starts an MLflow server fails, the same test
marked slow passes, and the commands cglab and the cluster tests really run are recognised."""

from __future__ import annotations

import os
import re
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


RAY_BESIDE = """
import shutil, subprocess

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def raylet_in_a_child(tmp_path):
    # A process named `raylet` (a copy of sleep) that a shell starts: the audit hook sees only `sh`, so only the
    # descendants' watch can see it. Still running when the test's call ends; stopped after.
    exe = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), exe)
    procs = []
    yield lambda: procs.append(subprocess.Popen(["sh", "-c", f"exec {exe} 600"]))
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.no_ray
def test_beside_ray_starting_a_raylet(raylet_in_a_child):
    raylet_in_a_child()


def test_in_the_ray_group_starting_a_raylet(raylet_in_a_child):
    raylet_in_a_child()


@pytest.mark.no_ray
def test_beside_ray_starting_none():
    subprocess.run(["sh", "-c", "true"], check=True)
"""


def test_a_no_ray_test_whose_child_starts_ray_fails_and_one_in_the_ray_group_does_not(pytester, monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
    )
    pytester.makepyfile(test_inner=RAY_BESIDE)
    pytester.makeini("[pytest]\nmarkers =\n  slow: x\n  no_ray: x\n")
    result = pytester.runpytest_subprocess("-p", "tests.tier_guard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_beside_ray_starting_a_raylet is marked no_ray but started Ray's raylet (in a child process)*"]
    )


SPLIT = """
import pytest


@pytest.mark.slow
def test_ray():
    pass


@pytest.mark.gpu
def test_gpu():
    pass


@pytest.mark.slow
@pytest.mark.no_ray
def test_slow_beside():
    pass


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_slow():
    pass


@pytest.mark.slow
@pytest.mark.own_cluster
def test_own_cluster():
    pass


def test_unit():
    pass
"""


def test_make_tests_two_runs_split_the_suite_into_ray_tests_and_the_rest(pytester):
    """The Makefile's two pytest runs (`-m "$(RAY_TESTS)"` and `-m "not ($(RAY_TESTS))"`), on tests of every marking:
    the local-Ray tests are the slow and gpu ones not marked no_ray or own_cluster, and together the runs select every
    test once."""
    ray_tests = re.search(r"^RAY_TESTS := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f'-m "{ray_tests}"' not in (REPO / "Makefile").read_text()  # the Makefile uses the variable, not a copy
    pytester.makepyfile(test_inner=SPLIT)
    pytester.makeini("[pytest]\nmarkers =\n  slow: x\n  gpu: x\n  no_ray: x\n  own_cluster: x\n")

    def selected(expr):
        result = pytester.runpytest("-p", "no:cacheprovider", "-v", "-m", expr)
        return {line.split("::")[1].split()[0] for line in result.outlines if " PASSED" in line}

    assert selected(ray_tests) == {"test_ray", "test_gpu", "test_gpu_slow"}
    assert selected(f"not ({ray_tests})") == {"test_slow_beside", "test_own_cluster", "test_unit"}


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

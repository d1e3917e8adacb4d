"""A private Ray head for tests: `ray start --head --block` on 127.0.0.1, free ports, its own temp dir and session.

Not a test module: tests/train, tests/track and tests/clusters import it to run real jobs against a real head.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a private head and its clients, as README's one-machine section sets up: token auth with the
    token in a private HOME (like clusters/local.sh), the venv active (job entry points say `python`), no outside
    cluster or tracking server."""
    env = {
        **os.environ,
        "HOME": str(tmp / "home"),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        if k not in extra:
            env.pop(k, None)
    return env


def auth_headers(env: dict[str, str]) -> dict[str, str]:
    """HTTP headers for the job API of a head started with `env` (for clients in this process, whose own
    environment has no token)."""
    if env.get("RAY_AUTH_MODE") != "token":
        return {}
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Head:
    gcs: str  # RAY_ADDRESS for drivers: host:port
    address: str  # job API / dashboard: http://host:port
    metrics_port: int
    log: Path


def _stop_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """End the process group we started, and only it. Every process of the head (GCS, raylet, dashboard, workers)
    is in that group; a graceful stop takes Ray ~30 s, so after a short grace period SIGKILL finishes the job."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def ray_head(tmp: Path, env: dict[str, str], num_cpus: int | None = None, timeout_s: float = 120.0) -> Iterator[Head]:
    """Start the head with clusters/local.sh's flags (loopback, the driver slots, metrics export), wait until its
    job API answers, yield it, stop it. `tmp` must be a short path: Ray's unix sockets live under the temp dir and
    must fit in 107 bytes. num_cpus None: Ray's default, the machine's cores, as local.sh leaves it."""
    if env.get("RAY_AUTH_MODE") == "token":
        subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120
        )
    gcs, dash, metrics, client, agent_http, agent_grpc, rt_agent, om, nm = free_ports(9)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_agent}",
        f"--object-manager-port={om}",
        f"--node-manager-port={nm}",
        "--num-gpus=0",
        '--resources={"cglab_driver": 4}',
        f"--temp-dir={tmp / 'ray'}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    log_path = tmp / "ray-head.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(gcs=f"127.0.0.1:{gcs}", address=f"http://127.0.0.1:{dash}", metrics_port=metrics, log=log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(head.address + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering, if only to say 401 without the token
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray head did not start:\n" + log_path.read_text()[-3000:]) from None
                time.sleep(1)
        yield head
    finally:
        _stop_group(proc)
        log.close()


def job_checkout(dst: Path) -> Path:
    """What a checkout uploads with `ray job submit --working-dir`: code, configs and the ignore file (which leaves
    `.cglab` behind)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for d in ("jobs", "platform"):
        shutil.copytree(REPO / d, dst / d, ignore=skip)
    shutil.copy2(REPO / ".rayignore", dst / ".rayignore")
    return dst


def submit_job(address: str, sid: str, wd: Path, env_vars: dict[str, str], entry: list[str], env: dict[str, str]):
    """`ray job submit --no-wait` of `entry` with `wd` as the uploaded working dir, Ray's own CLI as a user runs it."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--submission-id", sid]
    cmd += ["--working-dir", str(wd), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entry]
    r = subprocess.run(cmd, env=env, cwd=wd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def wait_for_job(address: str, headers: dict[str, str], sid: str, while_running=None):
    """(final status, job log). No window of its own: a job that never ends meets pytest's timeout, however loaded
    the machine, and is stopped on the way out. `while_running()`, if given, is called at every poll while the job
    runs (e.g. a scrape of the head's metrics)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers=headers)
    status = client.get_job_status(sid)
    try:
        while not status.is_terminal():
            if while_running is not None:
                while_running()
            time.sleep(2)
            status = client.get_job_status(sid)
        return status, client.get_job_logs(sid)
    finally:
        if not status.is_terminal():
            client.stop_job(sid)

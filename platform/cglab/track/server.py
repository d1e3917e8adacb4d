"""A local MLflow tracking server on a SQL store: start it, wait for it, stop it.

`cglab mlflow up` runs one in the foreground; `local_server()` starts one on a free port for tests and the
demo and stops it on exit. The store is a SQLite file by default (switched to WAL so the server's readers do
not block its writer); any SQLAlchemy URI such as postgresql://... works the same. Artifacts are served by
the server itself (proxied), so clients on other nodes never need the artifact directory mounted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

DEFAULT_ROOT = ".cglab/mlflow"

# MLflow's job execution (its GenAI jobs: judges, prompt optimisation, trace roll-ups; on by default since 3.x) starts
# a job runner and eight huey consumer processes beside every server, each importing MLflow: 10 processes, 2264 MiB
# and 21 CPU-s per start instead of 2, 497 MiB and 5.2 (benchmarks/results/process_start.txt, quiet). cglab submits
# no MLflow jobs, so every server it starts, and every recipe's (clusters/), runs without it; a user's setting wins.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class TrackingUnavailable(LookupError):
    """The tracking server does not answer, or there is no store to read."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sqlite_uri(db_path: str | Path) -> str:
    return f"sqlite:///{Path(db_path).resolve()}"


def enable_wal(backend_store_uri: str) -> None:
    """Put a SQLite store into WAL mode (persisted in the file). Other SQL stores are left alone."""
    if not backend_store_uri.startswith("sqlite:///"):
        return
    path = Path(backend_store_uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r}); is it on a network filesystem?")


def server_command(
    backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int = 1
) -> list[str]:
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [
        mlflow,
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--workers",
        str(workers),
    ]


def wait_healthy(uri: str, timeout_s: float | None = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Return once GET /health answers OK; raise if the process exits or the deadline passes (None: no deadline,
    wait as long as `proc` runs; tests, where a loaded machine may take minutes and pytest's timeout bounds it)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout_s:.0f}s")
        time.sleep(0.3)


@dataclass
class MlflowServer:
    """A running `mlflow server` process we started (and so may stop)."""

    root: Path
    backend_store_uri: str
    artifacts_destination: str
    host: str
    port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    workers: int = 1
    _log: object = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float | None = 120.0) -> MlflowServer:
        enable_wal(self.backend_store_uri)
        Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / f"server-{self.port}.log"
        self._log = open(self.log_path, "ab")
        cmd = server_command(self.backend_store_uri, self.artifacts_destination, self.host, self.port, self.workers)
        # Own process group: stop() must reach the uvicorn/gunicorn workers, not only the CLI wrapper.
        env = {**SERVER_ENV, **os.environ}
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.uri, timeout_s, self.proc)
        except Exception:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server failed to start; log {self.log_path}:\n{tail}") from None
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout_s: float | None = 120.0) -> MlflowServer:
        """Same store, same port: what a client sees after a server outage."""
        self.stop()
        return self.start(timeout_s)


def make_server(
    root: str | Path = DEFAULT_ROOT,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    workers: int = 1,
) -> MlflowServer:
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return MlflowServer(
        root=root,
        backend_store_uri=backend_store_uri or sqlite_uri(root / "mlflow.db"),
        artifacts_destination=artifacts_destination or str(root / "artifacts"),
        host=host,
        port=port or free_port(host),
        workers=workers,
    )


@contextlib.contextmanager
def local_server(
    root: str | Path | None = None, start_timeout_s: float | None = 120.0, **kwargs
) -> Iterator[MlflowServer]:
    """A server on a free 127.0.0.1 port for the duration of the block (temp dir when root is None); see
    `wait_healthy` for `start_timeout_s`."""
    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="cglab-mlflow-")
        root = tmp.name
    server = make_server(root, **kwargs).start(start_timeout_s)
    try:
        yield server
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingUnavailable unless an http(s) tracking server answers within timeout_s. Any HTTP answer
    counts (an auth-protected server says 401): only a refused, unreachable or silent server fails."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(
            f"the MLflow server at {uri} does not answer ({reason}); start it (`cglab mlflow up`), or leave out "
            f"--tracking-uri and unset MLFLOW_TRACKING_URI to read the local store that `cglab ablate` wrote "
            f"under .cglab/mlflow"
        ) from None

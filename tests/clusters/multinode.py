"""A multi-node Ray cluster and an S3 object store on 127.0.0.1, shaped like the recipes (clusters/kuberay/
raycluster.yaml, clusters/aws-p5.yaml): a head with 0 CPUs (and the `cglab_driver` slots), worker nodes with CPUs, and
`s3://` storage (moto's server, a real S3 API over HTTP).

Not a test module: tests/clusters/conftest.py starts one per test run. What makes the nodes separate machines
for the code under test: each worker node runs in a mount namespace of its own (`unshare -m`) where `hidden` (the
driver's side: pytest's temp root, so every test's tmp_path, the driver's working directory and HOME) is covered by
an empty tmpfs, so a path only the driver has does not exist on a worker node; each has its own HOME and TMPDIR
(node-local scratch, `scratch`), which the others never read. The S3 endpoint and credentials reach the nodes as
the pods' env does (AWS_*), and pyarrow's S3 file system (what Ray Train and cglab.storage use) reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cglab.config import JOB_STOP_WAIT_S
from tests.clusters.ray_head import BIN, _stop_group, free_ports, ray_head

BUCKET = "cglab"
REPO = Path(__file__).resolve().parents[2]


def _mount_namespace(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/mnt")
    return None


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in mount namespace `ns` until none is left (a zombie has no namespace to read)."""
    while True:
        left = [int(p) for p in os.listdir("/proc") if p.isdigit() and _mount_namespace(int(p)) == ns]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@dataclass
class Node:
    name: str
    scratch: Path  # node-local: HOME, TMPDIR, Ray's temp dir
    proc: subprocess.Popen
    log: Path


@dataclass
class MultiNode:
    gcs: str  # RAY_ADDRESS for drivers
    address: str  # the head's job API (http://127.0.0.1:port, no token: the bed runs without auth)
    s3_env: dict[str, str]  # AWS_* for a client of the object store
    bucket: str
    hidden: Path  # what no worker node can see
    root: Path  # the cluster's own files (logs, nodes' scratch): short, for Ray's unix sockets
    env: dict[str, str]  # the environment the nodes were started with (less what each node sets)
    nodes: dict[str, Node] = field(default_factory=dict)

    def add_worker(self, name: str, num_cpus: int, attempts: int = 3) -> Node:
        """Start a worker node `name` (a custom resource of the same name pins work to it) and wait until it has
        joined the head. `ray start` gives the raylet a fixed 30 s to register and exits when a loaded machine
        misses that, so a node that exited is started again, `attempts` times in all."""
        for _ in range(attempts):
            node = self._start_worker(name, num_cpus)
            while "Ray runtime started" not in node.log.read_text(errors="replace"):  # joined the head
                if node.proc.poll() is not None:
                    break
                time.sleep(0.5)
            else:
                self.nodes[name] = node
                return node
            _stop_group(node.proc, timeout_s=0)
        raise RuntimeError(f"worker node {name} did not join:\n" + node.log.read_text()[-3000:])

    def _start_worker(self, name: str, num_cpus: int) -> Node:
        scratch = self.root / name
        for d in ("home", "tmp", "ray"):
            (scratch / d).mkdir(parents=True, exist_ok=True)
        om, nm, metrics, agent_http, agent_grpc, rt_agent = free_ports(6)
        ray_start = [
            str(BIN / "ray"),
            "start",
            f"--address={self.gcs}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({name: 1})}",
            f"--object-manager-port={om}",
            f"--node-manager-port={nm}",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_agent}",
            f"--temp-dir={scratch / 'ray'}",
            "--disable-usage-stats",
        ]
        # Mounting needs CAP_SYS_ADMIN in the namespace: root, as here and in CI, or `unshare -rm` elsewhere.
        script = 'mount -t tmpfs -o size=1m,mode=0555 cglab-hidden "$CGLAB_HIDE" && exec "$@"'
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *ray_start]
        env = {
            **self.env,
            "CGLAB_HIDE": str(self.hidden),
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
        }
        log_path = self.root / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, env=env, cwd=scratch, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return Node(name, scratch, proc, log_path)

    def kill_worker(self, name: str) -> None:
        """Stop a worker node at once (its raylet and every process on it, SIGKILL) and lose its scratch. Every
        process on it: the `ray start` process group, and whatever left that group inside the node's mount namespace
        (a Ray worker runs in a process group of its own; the processes it spawns, e.g. multiprocessing's, would
        otherwise outlive the node)."""
        node = self.nodes.pop(name)
        ns = _mount_namespace(node.proc.pid)
        _stop_group(node.proc, timeout_s=0)
        if ns is not None and ns != _mount_namespace(os.getpid()):  # never this process's own namespace
            _kill_namespace(ns)
        shutil.rmtree(node.scratch, ignore_errors=True)

    def s3(self):
        """pyarrow's S3 file system on the store (the client env comes from os.environ, set by the fixture)."""
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(f"s3://{self.bucket}")[0]

    def keys(self, prefix: str) -> list[str]:
        """Every object key under `s3://bucket/prefix`, without the bucket."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{self.bucket}/{prefix.strip('/')}", recursive=True, allow_not_found=True)
        return sorted(
            i.path.removeprefix(f"{self.bucket}/") for i in self.s3().get_file_info(sel) if i.type == pafs.FileType.File
        )

    def upload(self, local: Path, prefix: str) -> str:
        """Copy a local directory's files to `s3://bucket/prefix/`; returns that URI."""
        fs = self.s3()
        for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = f"{self.bucket}/{prefix}/{f.relative_to(local)}"
            with fs.open_output_stream(key, compression=None) as out:  # as is: *.zst stays one zstd stream
                out.write(f.read_bytes())
        return f"s3://{self.bucket}/{prefix}"


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (a free port) in a process of its own; yields the AWS_* client env.

    Not moto's ThreadedMotoServer: a server thread inside the pytest process compiles code while the tests do, and
    CPython 3.11's AST validation keeps its recursion depth in state the threads share ("AST constructor recursion
    depth mismatch" in an unrelated test's ast.parse)."""
    import urllib.error
    import urllib.request

    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [str(Path(BIN) / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # up when it answers; a start that fails says so instead of hanging the run
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except urllib.error.HTTPError:  # an answer, whatever its status: the server is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server on port {port} did not start (exit {proc.poll()})") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "cglab-test",
            "AWS_SECRET_ACCESS_KEY": "cglab-test",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        _stop_group(proc, timeout_s=10)


@contextlib.contextmanager
def multinode(hidden: Path, workers: dict[str, int], s3_env: dict[str, str]) -> Iterator[MultiNode]:
    """The head (0 CPUs) and `workers` ({name: CPUs}), each worker in its own mount namespace without `hidden`, with
    `s3_env` (AWS_*) in its environment; torn down, and its files removed, on exit."""
    root = Path(tempfile.mkdtemp(prefix="cgmn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        **s3_env,
        "RAY_USAGE_STATS_ENABLED": "0",
        # as the recipes' heads (clusters/local.sh, ...): `ray job stop` waits for the driver's checkpoint
        "RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p),
    }
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "XDG_CACHE_HOME"):
        env.pop(k, None)
    (root / "head").mkdir()
    try:
        with ray_head(root / "head", {**env, "HOME": str(root / "head")}, num_cpus=0) as head:
            cluster = MultiNode(head.gcs, head.address, s3_env, BUCKET, hidden, root, env)
            try:
                for name, cpus in workers.items():
                    cluster.add_worker(name, cpus)
                yield cluster
            finally:
                for name in list(cluster.nodes):
                    cluster.kill_worker(name)
    finally:
        shutil.rmtree(root, ignore_errors=True)

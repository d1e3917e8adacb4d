"""Submit a cglab entry point (jobs/*.py) to a Ray cluster as a Ray job, carrying only the code.

`ray job submit --working-dir .` zips the directory and uploads it to the cluster's GCS. Ray 2.60 refuses a package
at its gRPC message limit (512 MiB in 2.60; older docs say 100 MiB) and warns at half; a cglab upload is ~0.6 MiB.
What Ray 2.60 leaves out, read from ray/_private/runtime_env:
  - always: `.git`, `.venv`, `venv`, `__pycache__` (RAY_RUNTIME_ENV_DEFAULT_EXCLUDES);
  - patterns in `.gitignore` (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and in `.rayignore`, in every directory;
  - runtime_env["excludes"] (gitwildmatch patterns, relative to the working dir).
The repo's `.rayignore` lists corpora, checkpoints and MLflow stores so a plain `ray job submit --working-dir .` is
small; `runtime_env()` below repeats the list as `excludes` so a submission through this module does not depend on
the ignore files being present or read.

The driver is pinned by a custom resource: every cglab cluster recipe (clusters/) gives the head node
`{"cglab_driver": 4}` and zero schedulable CPUs/GPUs, so up to four drivers (Tune controllers) run on the head,
never on a GPU worker, and never take a GPU worker's CPUs.

    python -m cglab.submit --address http://127.0.0.1:8265 -- python jobs/ablate.py --lesson 3 --preset cluster
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

# gitwildmatch patterns without a trailing slash: Ray matches directory paths without one, so `.cglab` prunes the
# whole tree at once while `.cglab/` would only match the files inside it.
EXCLUDES: list[str] = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    ".import_linter_cache",
    "*.egg-info",
    "build",
    "/.whl",
    "/.gl",
    ".cglab",  # built corpora, tokenizers, local run state
    "checkpoints",
    "*.distcp",
    "*.pt",
    "*.safetensors",  # model state
    "mlruns",
    "mlartifacts",
    "*.db",
    "*.sqlite",  # MLflow stores
    "ray_results",
    "*.log",
    "/benchmarks/results",  # committed result files and plots: read here, never by a job
]

DRIVER_RESOURCE = "cglab_driver"
# Env vars passed from the submitting shell to the job when set there (credentials stay out of files and git).
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")


def runtime_env(
    working_dir: str | Path = ".", env_vars: dict[str, str] | None = None, extra_excludes: Sequence[str] = ()
) -> dict[str, Any]:
    """The runtime_env for a cglab job: the checkout as working_dir, the cglab package from the checkout (so the
    cluster runs the submitted code, not the copy baked into its image), and the excludes above."""
    wd = Path(working_dir)
    if not (wd / "platform" / "cglab" / "__init__.py").is_file():
        raise ValueError(f"working_dir {wd}: not a cglab checkout (no platform/cglab/__init__.py)")
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    env.update(env_vars or {})
    out: dict[str, Any] = {
        "working_dir": str(wd),
        "py_modules": [str(wd / "platform" / "cglab")],
        "excludes": EXCLUDES + list(extra_excludes),
    }
    if env:
        out["env_vars"] = env
    return out


def entrypoint_resources(on_head: bool = True) -> dict[str, float]:
    return {DRIVER_RESOURCE: 1} if on_head else {}


def submit(
    entrypoint: Sequence[str] | str,
    address: str = "http://127.0.0.1:8265",
    working_dir: str | Path = ".",
    env_vars: dict[str, str] | None = None,
    on_head: bool = True,
    submission_id: str | None = None,
) -> str:
    """Submit and return the submission id. Token auth (RAY_AUTH_MODE=token) is picked up by Ray's client from
    the environment / ~/.ray/auth_token."""
    from ray.job_submission import JobSubmissionClient  # Ray: kept off `--print-command` and `--help`

    cmd = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    client = JobSubmissionClient(address)
    return client.submit_job(
        entrypoint=cmd,
        runtime_env=runtime_env(working_dir, env_vars),
        submission_id=submission_id,
        entrypoint_num_cpus=0,
        entrypoint_num_gpus=0,
        entrypoint_resources=entrypoint_resources(on_head),
    )


def cli_command(entrypoint: Sequence[str], address: str = "http://127.0.0.1:8265", on_head: bool = True) -> list[str]:
    """The equivalent `ray job submit` argv, for docs and for people who prefer Ray's CLI."""
    env = {"py_modules": ["platform/cglab"], "excludes": EXCLUDES}
    argv = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", json.dumps(env)]
    if on_head:
        argv += ["--entrypoint-resources", json.dumps(entrypoint_resources())]
    return argv + ["--", *entrypoint]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cglab.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    p.add_argument("--working-dir", default=".")
    p.add_argument("--anywhere", action="store_true", help="let Ray place the driver (default: the head node)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    p.add_argument("--print-command", action="store_true", help="print the equivalent `ray job submit` and exit")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- command to run, e.g. python jobs/ablate.py ...")
    a = p.parse_args(argv)
    cmd = a.entrypoint[1:] if a.entrypoint[:1] == ["--"] else a.entrypoint
    if not cmd:
        p.error("missing entrypoint: add `-- python jobs/ablate.py --lesson 3 --preset cluster`")
    if a.print_command:
        print(shlex.join(cli_command(cmd, a.address, not a.anywhere)))
        return 0
    sid = submit(cmd, a.address, a.working_dir, on_head=not a.anywhere)
    print(f"submitted {sid}; logs: ray job logs --address {a.address} -f {sid}")
    if a.no_wait:
        return 0
    from ray.job_submission import JobStatus, JobSubmissionClient  # Ray: kept off `--print-command` and `--help`

    client = JobSubmissionClient(a.address)

    async def follow():
        async for chunk in client.tail_job_logs(sid):
            print(chunk, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(sid)
    print(f"job {sid}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())

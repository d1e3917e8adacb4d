"""Checkpoints: complete ones load back exactly; interrupted ones are refused; export to HF is faithful."""

import json

import pytest
import torch

from cglab.config import from_dict
from cglab.train import checkpoint
from cglab.train.checkpoint import DataPosition, IncompleteCheckpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_tokenizer):
    """A tiny model after 3 steps, saved; parallel state left up for the module's tests."""
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.train.step import build_train_state, train_step

    cfg = from_dict(
        {}, ["model.preset=tiny", "train.micro_batch_size=2", "train.global_batch_size=2", "train.train_steps=10"]
    )
    init_parallel(1, 1, seed=3)
    state = build_train_state(cfg)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        tok = torch.randint(0, 1000, (2, 32), generator=g)
        batches.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": torch.ones(2, 32),
                "segment_ids": torch.zeros(2, 32, dtype=torch.long),
            }
        )
    for b in batches[:3]:
        train_step(state, cfg, [b])
    d = tmp_path_factory.mktemp("ckpt") / "c"
    tok_json = (micro_tokenizer.path / "tokenizer.json").read_text()
    checkpoint.save(
        d,
        state,
        3,
        DataPosition(0, 6),
        extra={"config": cfg.model_dump(mode="json")},
        files={"tokenizer/tokenizer.json": tok_json},
    )
    later = [train_step(state, cfg, [b])["loss"] for b in batches[3:]]
    yield cfg, d, batches, later
    destroy_parallel()


def test_resume_continues_exactly(trained):
    from cglab.train.step import build_train_state, train_step

    cfg, d, batches, later = trained
    fresh = build_train_state(cfg)
    step, pos = checkpoint.load(d, fresh)
    assert (step, pos) == (3, DataPosition(0, 6))
    again = [train_step(fresh, cfg, [b])["loss"] for b in batches[3:]]
    assert again == pytest.approx(later, abs=1e-6)


def test_interrupted_checkpoint_is_refused(trained, tmp_path):
    import shutil

    _, d, _, _ = trained
    cut = tmp_path / "cut"
    shutil.copytree(d, cut)
    (cut / checkpoint.MARKER).unlink()  # the write stopped before the marker
    with pytest.raises(IncompleteCheckpoint, match="marker"):
        checkpoint.verify(cut)
    short = tmp_path / "short"
    shutil.copytree(d, short)
    shard = next(p for p in short.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:10])  # a truncated shard
    with pytest.raises(IncompleteCheckpoint, match="bytes"):
        checkpoint.verify(short)
    assert checkpoint.newest_complete(cut, short) is None


def test_newest_complete_skips_a_broken_newest(trained, tmp_path):
    import shutil

    _, d, _, _ = trained
    good, bad = tmp_path / "checkpoint_1", tmp_path / "checkpoint_2"
    shutil.copytree(d, good)
    shutil.copytree(d, bad)
    state = json.loads((bad / checkpoint.STATE).read_text())
    state["step"] = 99  # the newer one ...
    (bad / checkpoint.STATE).write_text(json.dumps(state))
    (bad / checkpoint.MARKER).unlink()  # ... was cut off mid-write
    assert checkpoint.newest_complete(bad, tmp_path) == str(good)


def test_export_gives_the_same_greedy_tokens(trained, tmp_path):
    """The exported HF model (with KV cache) and the cglab model (full recompute) agree token for token."""
    from transformers import AutoModelForCausalLM

    from cglab.model.codegen import build_model, forward_logits
    from cglab.model.hf_convert import load_into

    cfg, d, _, _ = trained
    hf_dir = checkpoint.checkpoint_to_hf(d, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "codegen"
    full, m = checkpoint.to_full_state_dict(d)
    ours = build_model(m, cfg.parallel).eval()
    load_into(ours, full)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompts = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = hf.generate(
            prompts, max_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts)
        )[:, 12:]
        seq = prompts
        for _ in range(16):
            nxt = forward_logits(ours, m, seq, torch.zeros_like(seq))[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq[:, 12:])
    assert len(set(seq[:, 12:].flatten().tolist())) > 1  # not a degenerate constant output


def test_generator_loads_a_training_checkpoint(trained):
    from cglab.eval.generate import load_generator

    _, d, _, _ = trained
    gen = load_generator(d)
    out = gen.generate(["def add(a, b):"], max_new_tokens=5)
    assert len(out) == 1 and len(out[0]) == 1 and isinstance(out[0][0], str)


def test_the_planned_checkpoint_size_is_what_a_save_writes(trained):
    """`cglab plan`'s checkpoint size (cglab.train.checkpoint_size, what the preemption grace is checked against)
    against the bytes a real save of this model wrote: the weights and the optimizer state dominate, within 10%
    (the rest is metadata, the RNG states and the tokenizer)."""
    from cglab.train.budget import budget
    from cglab.train.checkpoint_size import checkpoint_plan
    from cglab.train.memory import memory_gib

    cfg, d, _, _ = trained
    written = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    mem = memory_gib(cfg, "sdpa")
    planned = checkpoint_plan(cfg, mem["params_per_gpu"], budget(cfg, "none")["parameters"]["total"], False, None)
    assert planned["gb_total"] == planned["gb_per_gpu"]  # one GPU
    assert abs(planned["gb_total"] * 1e9 - written) <= 0.1 * written, (planned, written)

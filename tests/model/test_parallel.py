"""TP=2 and PP=2 on CPU (gloo, real processes) give the loss and gradients of TP=1/PP=1 (fp32)."""

import pytest
import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

from cglab.config import from_dict
from cglab.distributed import spawn
from cglab.model.hf_convert import hf_to_cglab
from cglab.model.hf_export import full_state_dict
from tests.model._parallel_worker import fwd_bwd  # noqa: E402
from tests.model.conftest import tiny_hf

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)


def _batches(vocab, n_micro=2, b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_micro):
        tokens = torch.randint(0, vocab, (b, s), generator=g)
        seg = torch.zeros(b, s, dtype=torch.long)
        seg[:, s // 2 :] = 1  # two documents per row: exercises document masking
        loss_mask = (torch.rand(b, s, generator=g) > 0.2).float()
        pre = torch.zeros(b, s, dtype=torch.long)  # per token: each document's own prefix (row 1: only the first)
        pre[0, : s // 2], pre[0, s // 2 :], pre[1, : s // 2] = 5, s // 2 + 4, 9
        out.append(
            {
                "tokens": tokens,
                "labels": torch.roll(tokens, -1, 1),
                "loss_mask": loss_mask,
                "segment_ids": seg,
                "prefix_end": pre,
                "objective": torch.tensor([0, 1]),
            }
        )
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("par")
    m = from_dict({}, ["model.preset=tiny"]).model
    torch.manual_seed(0)
    hf = CodeGenForCausalLM(
        CodeGenConfig(
            vocab_size=m.vocab_size,
            n_positions=256,
            n_ctx=256,
            n_embd=m.hidden_size,
            n_layer=m.num_layers,
            n_head=m.num_attention_heads,
            rotary_dim=m.rotary_dim,
            tie_word_embeddings=False,
        )
    )
    torch.save(hf_to_cglab(hf.state_dict(), m), d / "full.pt")
    torch.save(_batches(m.vocab_size), d / "batches.pt")
    return d


def _run(inputs, world, tp, pp, name, overrides=(), full="full.pt", save_to=None):
    out = inputs / f"{name}.pt"
    full = str(inputs / full) if full else None
    spawn(fwd_bwd, world, tp, pp, full, str(inputs / "batches.pt"), str(out), list(overrides), save_to)
    return torch.load(out)


def _same(got, ref, what):
    assert abs(got["loss"]["loss"] - ref["loss"]["loss"]) < 1e-5, what
    assert got["grads"].keys() == ref["grads"].keys()
    for k, g in ref["grads"].items():
        assert g.abs().sum() > 0 or "bias" in k, k
        torch.testing.assert_close(got["grads"][k], g, atol=1e-5, rtol=1e-4, msg=f"{k} at {what}")


@pytest.mark.parametrize("arch", ["causal", "prefix_lm"])
def test_tp2_and_pp2_match_single_rank(inputs, arch):
    ov = [f"model.architecture={arch}"]
    ref = _run(inputs, 1, 1, 1, f"ref-{arch}", ov)
    assert ref["loss"]["loss"] > 0
    for world, tp, pp in ((2, 2, 1), (2, 1, 2)):
        got = _run(inputs, world, tp, pp, f"tp{tp}pp{pp}-{arch}", ov)
        assert abs(got["loss"]["loss"] - ref["loss"]["loss"]) < 1e-5, (tp, pp)
        assert got["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            assert g.abs().sum() > 0 or "bias" in k, k
            torch.testing.assert_close(got["grads"][k], g, atol=1e-5, rtol=1e-4, msg=f"{k} at TP{tp} PP{pp}")


@pytest.mark.parametrize("fusions", ["true", "false"])
def test_sequence_parallel_tp2_matches_single_rank(inputs, fusions):
    """parallel.sequence_parallel at TP=2 (gloo's reduce_scatter_tensor / all_gather_into_tensor on CPU): the
    embedding output, layer norms and residual adds on half the sequence each; the loss and every gradient (the
    layer norms' summed over the two sequence halves) of the single-rank model, fused block or not."""
    ov = [f"model.compile_fusions={fusions}", "model.attention_backend=sdpa"]
    ref = _run(inputs, 1, 1, 1, f"ref-sp-{fusions}", ov)
    assert not ref["sequence_parallel"]
    got = _run(inputs, 2, 2, 1, f"tp2-sp-{fusions}", [*ov, "parallel.sequence_parallel=true"])
    assert got["sequence_parallel"]
    _same(got, ref, f"TP2 with sequence parallelism, compile_fusions={fusions}")


def test_uneven_pp4_matches_single_rank_and_its_checkpoint_loads_at_tp2(inputs, tmp_path):
    """10 layers over PP=4 as 2/3/3/2 (Megatron's first/last-stage counts), started from a HF directory: the loss
    and every gradient of the single-rank model; the weights it saves as a checkpoint (dist_checkpointing, uneven
    stages) start a TP=2 x PP=1 run (model.init_from, Megatron resharding) with that same loss and gradients, and
    read back whole in one process (the HF export's reader) they are the weights loaded."""
    m = from_dict({}, ["model.preset=tiny", "model.num_layers=10"]).model
    hf = tiny_hf(m)
    hf.save_pretrained(tmp_path / "hf")
    full = hf_to_cglab(hf.state_dict(), m)
    torch.save(full, inputs / "full10.pt")
    ten = ["model.num_layers=10"]
    ref = _run(inputs, 1, 1, 1, "ref-10", ten, full="full10.pt")
    ends = ["parallel.num_layers_in_first_pipeline_stage=2", "parallel.num_layers_in_last_pipeline_stage=2"]
    ckpt = tmp_path / "uneven"
    # the uneven run starts from the HF directory: each stage converts its own layers (model.init_from)
    got = _run(inputs, 4, 1, 4, "pp4-uneven", [*ten, *ends, f"model.init_from={tmp_path / 'hf'}"], None, str(ckpt))
    assert got["stages"] == [2, 3, 3, 2]
    _same(got, ref, "PP4 2/3/3/2")
    again = _run(inputs, 2, 2, 1, "tp2-from-uneven", [*ten, f"model.init_from={ckpt}"], full=None)
    _same(again, ref, "TP2 from the PP4 2/3/3/2 checkpoint")
    for k, w in ref["weights"].items():
        torch.testing.assert_close(again["weights"][k], w, atol=0, rtol=0, msg=k)
    exported = full_state_dict(ckpt)  # the one-process reader behind checkpoint_to_hf and `cglab eval`
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)


@pytest.mark.parametrize("arch", ["causal", "prefix_lm"])
def test_fused_block_matches_unfused_single_rank(inputs, arch):
    """compile_fusions swaps the attention glue and residual sum; loss and every gradient stay those of the
    unfused TP=1 model, also with the heads split over two ranks (two documents per row; prefix-LM mask)."""
    a = f"model.architecture={arch}"
    # Both sides name compile_fusions: its default (None) is "on wherever it applies", so a reference left at the
    # default would be the fused model compared with itself.
    ref = _run(
        inputs, 1, 1, 1, f"ref-unfused-{arch}", ["model.attention_backend=sdpa", "model.compile_fusions=false", a]
    )
    assert ref["built"] == {"attention": "NoBiasSelfAttention", "fused_residual": False, "compile_loss": False}
    for world, tp in ((1, 1), (2, 2)):
        got = _run(
            inputs,
            world,
            tp,
            1,
            f"fused-tp{tp}-{arch}",
            ["model.attention_backend=sdpa", "model.compile_fusions=true", a],
        )
        # the compiled loss applies at TP=1 only (Megatron's vocab-parallel loss otherwise)
        assert got["built"] == {"attention": "FusedSelfAttention", "fused_residual": True, "compile_loss": tp == 1}
        assert abs(got["loss"]["loss"] - ref["loss"]["loss"]) < 1e-5, tp
        for k, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, atol=1e-5, rtol=1e-4, msg=f"{k} fused at TP{tp}")


def _init_worker(rank, tp, pp, out_path):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from cglab.config import from_dict
    from cglab.distributed import init_parallel
    from cglab.model.codegen import build_model
    from cglab.model.hf_convert import model_state, unshard

    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
        ],
    )
    init_parallel(tp, pp, seed=rank * 17)  # a different global RNG state per rank must not matter
    model = build_model(cfg.model, cfg.parallel, seed=7)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(
        parts, ((ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()), model_state(model))
    )
    if rank == 0:
        torch.save(unshard(dict(parts)), out_path)


def test_initialisation_is_layout_independent(tmp_path):
    runs = {}
    for world, tp, pp in ((1, 1, 1), (2, 2, 1), (2, 1, 2)):
        out = tmp_path / f"init{tp}{pp}.pt"
        spawn(_init_worker, world, tp, pp, str(out))
        runs[(tp, pp)] = torch.load(out)
    ref = runs[(1, 1)]
    assert ref["decoder.layers.1.mlp.linear_fc1.weight"].std() > 0.01
    for layout, sd in runs.items():
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (layout, k)

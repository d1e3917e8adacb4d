"""Fidelity with HF CodeGen: converted weights give the same logits, the round trip is exact, export loads."""

import pytest
import torch
from transformers import CodeGenForCausalLM

from cglab.model.codegen import build_model, forward_logits
from cglab.model.hf_convert import cglab_to_hf, export_hf, hf_to_cglab, load_into, model_state
from tests.model.conftest import tiny_hf


@pytest.mark.parametrize("backend", ["sdpa", "local", "sdpa+fused"])
def test_converted_logits_match_hf(single_rank, tiny_cfg, backend):
    m = tiny_cfg.model.model_copy(
        update={
            "attention_backend": backend.split("+")[0],
            "document_masking": False,
            "compile_fusions": backend.endswith("+fused"),
        }
    )
    hf = tiny_hf(m)
    ours = build_model(m, tiny_cfg.parallel).eval()
    load_into(ours, hf_to_cglab(hf.state_dict(), m))
    tokens = torch.randint(0, m.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = forward_logits(ours, m, tokens, segment_ids=torch.zeros_like(tokens))
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_round_trip_is_exact(tiny_cfg):
    hf_sd = tiny_hf(tiny_cfg.model).state_dict()
    back = cglab_to_hf(hf_to_cglab(hf_sd, tiny_cfg.model), tiny_cfg.model)
    assert back.keys() == {k for k in hf_sd if not k.endswith(("masked_bias", "causal_mask"))}
    for k, v in back.items():
        assert torch.equal(v, hf_sd[k]), k


def test_rotary_permutation_is_not_identity(tiny_cfg):
    # Guards the test above: the qkv layout must actually be rearranged, not copied.
    m = tiny_cfg.model
    hf_sd = tiny_hf(m).state_dict()
    ours = hf_to_cglab(hf_sd, m)
    assert not torch.equal(
        ours["decoder.layers.0.self_attention.linear_qkv.weight"], hf_sd["transformer.h.0.attn.qkv_proj.weight"]
    )


def test_export_loads_in_transformers(single_rank, tiny_cfg, tmp_path):
    m = tiny_cfg.model
    ours = build_model(m, tiny_cfg.parallel).eval()
    out = export_hf(model_state(ours), m, tmp_path / "hf")
    hf = CodeGenForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, m.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(
            forward_logits(ours, m, tokens, torch.zeros_like(tokens)), hf(input_ids=tokens).logits, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("stages", [(2, 3, 3, 2), (5, 5), (1, 3, 3, 3), (10,)])
def test_shard_and_unshard_follow_uneven_stages(stages):
    """A full 10-layer state dict cut into TP=2 x the given pipeline stages and merged back is what it was; each
    stage holds its own layers, numbered from 0 as Megatron numbers them, and only the ends hold the embedding and
    the head."""
    from cglab.config import from_dict
    from cglab.model.hf_convert import shard, unshard

    m = from_dict({}, ["model.preset=tiny", "model.num_layers=10"]).model
    full = hf_to_cglab(tiny_hf(m).state_dict(), m)
    parts = {(tp, pp): shard(full, m, tp, 2, pp, stages) for tp in range(2) for pp in range(len(stages))}
    for pp, n in enumerate(stages):
        local = parts[(0, pp)]
        assert {int(k.split(".")[2]) for k in local if k.startswith("decoder.layers.")} == set(range(n))
        first = sum(stages[:pp])  # the stage's layer 0 is this global layer
        name = "self_attention.linear_proj.weight"
        assert torch.equal(local[f"decoder.layers.0.{name}"], full[f"decoder.layers.{first}.{name}"].chunk(2, 1)[0])
        assert ("embedding.word_embeddings.weight" in local) == (pp == 0)
        assert ("output_layer.bias" in local) == (pp == len(stages) - 1)
    back = unshard(parts)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="do not add up to model.num_layers=10"):
        shard(full, m, 0, 2, 0, (2, 3, 3, 3))

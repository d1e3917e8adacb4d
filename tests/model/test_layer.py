"""ParallelResidualLayer refuses, by name, an argument it would otherwise drop: Megatron's block and callers pass more
than the layer implements (padding_mask, rotary_pos_cos_sin, inference_params, ...), and a silently dropped value
would make the layer compute something other than what was asked. None values, what training passes, still work."""

import pytest
import torch

from cglab.config import from_dict
from cglab.model.codegen import build_model
from cglab.model.layer import ParallelResidualLayer


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def layer_and_inputs(single_rank, request):
    m = from_dict(
        {}, ["model.preset=tiny", "model.attention_backend=sdpa", f"model.compile_fusions={str(request.param).lower()}"]
    ).model
    model = build_model(m, from_dict({}, ["model.preset=tiny"]).parallel, seed=3).eval()
    layer = model.decoder.layers[0]
    assert isinstance(layer, ParallelResidualLayer) and layer.fused_residual is request.param
    s, b = 8, 2
    hidden = torch.randn(s, b, m.hidden_size, generator=torch.Generator().manual_seed(0))
    return layer, hidden, model.rotary_pos_emb(s)


def test_none_for_the_arguments_megatron_passes_is_accepted(layer_and_inputs):
    layer, hidden, freqs = layer_and_inputs
    with torch.no_grad():
        ref, _ = layer(hidden, attention_mask=None, rotary_pos_emb=freqs)
        # what Megatron's TransformerBlock hands every layer in training
        got, ctx = layer(
            hidden_states=hidden,
            attention_mask=None,
            context=None,
            context_mask=None,
            rotary_pos_emb=freqs,
            rotary_pos_cos=None,
            rotary_pos_sin=None,
            rotary_pos_cos_sin=None,
            attention_bias=None,
            inference_context=None,
            packed_seq_params=None,
            sequence_len_offset=None,
            padding_mask=None,
            inference_params=None,
        )
    assert ctx is None
    assert torch.equal(got, ref)
    assert not torch.equal(ref, hidden)


@pytest.mark.parametrize(
    "name", ["padding_mask", "rotary_pos_cos_sin", "inference_params", "context_mask", "some_future_argument"]
)
def test_a_value_the_layer_does_not_implement_is_refused_by_name(layer_and_inputs, name):
    layer, hidden, freqs = layer_and_inputs
    s, b = hidden.shape[:2]
    values = {
        "padding_mask": torch.ones(b, s, dtype=torch.bool),
        "rotary_pos_cos_sin": (torch.cos(freqs), torch.sin(freqs)),
        "inference_params": object(),
        "context_mask": torch.ones(b, 1, s, s, dtype=torch.bool),
        "some_future_argument": 1,
    }
    with pytest.raises(TypeError, match=name):
        layer(hidden, attention_mask=None, rotary_pos_emb=freqs, **{name: values[name]})

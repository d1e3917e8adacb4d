import pytest
import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

from cglab.config import from_dict


def tiny_hf(m, seed=0):
    torch.manual_seed(seed)
    cfg = CodeGenConfig(
        vocab_size=m.vocab_size,
        n_positions=m.max_position_embeddings,
        n_ctx=m.max_position_embeddings,
        n_embd=m.hidden_size,
        n_layer=m.num_layers,
        n_head=m.num_attention_heads,
        rotary_dim=m.rotary_dim,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = CodeGenForCausalLM(cfg).eval()
    # Random LayerNorm/bias values too, so a swapped or dropped parameter cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


@pytest.fixture
def tiny_cfg():
    return from_dict({}, ["model.preset=tiny"])

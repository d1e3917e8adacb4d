"""HF CodeGenForCausalLM <-> cglab (Megatron-Core) weights, and TP/PP sharding of a full cglab state dict.

Two layout differences are undone here, both pure permutations, so a round trip is exact:
- HF fuses q, k, v in `qkv_proj` in mp_num=4 blocks, each ordered [q | v | k] over a quarter of the heads;
  Megatron's `linear_qkv` is per head [q | k | v].
- HF rotates the first rotary_dim dims of each head GPT-J style (interleaved pairs 2i, 2i+1); we use Megatron's
  half layout (pairs i, i + rotary_dim/2), which has fused kernels. Permuting those q/k rows the same way in q and
  k leaves every attention score unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from cglab.config import ModelConfig

MP_NUM = 4  # HF CodeGen's hard-coded model-parallel block count in qkv_proj


def _rotary_perm(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """cglab row j of a head = HF row perm[j]."""
    rot = list(range(0, rotary_dim, 2)) + list(range(1, rotary_dim, 2))
    return torch.tensor(rot + list(range(rotary_dim, head_dim)))


def hf_to_cglab(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """A full (unsharded) cglab state dict from a HF CodeGen state dict."""
    H, hd, d = m.num_attention_heads, m.head_dim, m.hidden_size
    if H % MP_NUM:
        raise ValueError(f"model.num_attention_heads={H}: HF CodeGen needs a multiple of {MP_NUM}")
    perm = _rotary_perm(hd, m.rotary_dim)
    out = {
        "embedding.word_embeddings.weight": hf["transformer.wte.weight"],
        "decoder.final_layernorm.weight": hf["transformer.ln_f.weight"],
        "decoder.final_layernorm.bias": hf["transformer.ln_f.bias"],
        "output_layer.weight": hf["lm_head.weight"],
        "output_layer.bias": hf["lm_head.bias"],
    }
    for i in range(m.num_layers):
        h, c = f"transformer.h.{i}.", f"decoder.layers.{i}."
        w = hf[h + "attn.qkv_proj.weight"].view(MP_NUM, 3, H // MP_NUM, hd, d)
        q, v, k = (w[:, j].reshape(H, hd, d) for j in range(3))  # HF block order is q, v, k
        q, k = q[:, perm], k[:, perm]
        out[c + "self_attention.linear_qkv.weight"] = torch.stack([q, k, v], dim=1).reshape(3 * d, d)
        out[c + "self_attention.linear_proj.weight"] = hf[h + "attn.out_proj.weight"]
        out[c + "input_layernorm.weight"] = hf[h + "ln_1.weight"]
        out[c + "input_layernorm.bias"] = hf[h + "ln_1.bias"]
        for ours, theirs in (("linear_fc1", "fc_in"), ("linear_fc2", "fc_out")):
            out[c + f"mlp.{ours}.weight"] = hf[h + f"mlp.{theirs}.weight"]
            out[c + f"mlp.{ours}.bias"] = hf[h + f"mlp.{theirs}.bias"]
    return {k: v.clone() for k, v in out.items()}


def cglab_to_hf(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_cglab."""
    H, hd, d = m.num_attention_heads, m.head_dim, m.hidden_size
    inv = torch.argsort(_rotary_perm(hd, m.rotary_dim))
    out = {
        "transformer.wte.weight": sd["embedding.word_embeddings.weight"],
        "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"],
        "lm_head.weight": sd["output_layer.weight"],
        "lm_head.bias": sd["output_layer.bias"],
    }
    for i in range(m.num_layers):
        h, c = f"transformer.h.{i}.", f"decoder.layers.{i}."
        w = sd[c + "self_attention.linear_qkv.weight"].view(H, 3, hd, d)
        q, k, v = w[:, 0][:, inv], w[:, 1][:, inv], w[:, 2]
        blocks = [t.reshape(MP_NUM, H // MP_NUM, hd, d) for t in (q, v, k)]
        out[h + "attn.qkv_proj.weight"] = torch.stack(blocks, dim=1).reshape(3 * d, d)
        out[h + "attn.out_proj.weight"] = sd[c + "self_attention.linear_proj.weight"]
        out[h + "ln_1.weight"] = sd[c + "input_layernorm.weight"]
        out[h + "ln_1.bias"] = sd[c + "input_layernorm.bias"]
        for ours, theirs in (("linear_fc1", "fc_in"), ("linear_fc2", "fc_out")):
            out[h + f"mlp.{theirs}.weight"] = sd[c + f"mlp.{ours}.weight"]
            out[h + f"mlp.{theirs}.bias"] = sd[c + f"mlp.{ours}.bias"]
    return {k: v.clone() for k, v in out.items()}


# ------------------------------------------------------------------------------------------ TP / PP sharding
_COLUMN = re.compile(
    r"(word_embeddings\.weight|linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)|"
    r"output_layer\.(weight|bias))$"
)
_ROW = re.compile(r"(linear_proj\.weight|linear_fc2\.weight)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _split_dim(name: str) -> int | None:
    if _COLUMN.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def stage_offsets(stages: Sequence[int]) -> list[int]:
    """The global index of each pipeline stage's first layer, from the layers on each stage."""
    return [sum(stages[:i]) for i in range(len(stages))]


def shard(
    full: dict[str, torch.Tensor],
    m: ModelConfig,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    stages: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's slice of a full state dict, with Megatron's stage-local layer numbering. stages: the layers on
    each pipeline stage, even or not (`CGLabConfig.pipeline_stages`); None: one stage."""
    stages = tuple(stages) if stages is not None else (m.num_layers,)
    if sum(stages) != m.num_layers:
        raise ValueError(f"shard: stages {stages} do not add up to model.num_layers={m.num_layers}")
    start = stage_offsets(stages)[pp_rank]
    first, last = pp_rank == 0, pp_rank == len(stages) - 1
    out = {}
    for name, t in full.items():
        mt = _LAYER.match(name)
        if mt:
            i = int(mt.group(1))
            if not (start <= i < start + stages[pp_rank]):
                continue
            name = f"decoder.layers.{i - start}.{mt.group(2)}"
        elif name.startswith("embedding.") and not first:
            continue
        elif (name.startswith("output_layer.") or name.startswith("decoder.final_layernorm.")) and not last:
            continue
        dim = _split_dim(name)
        out[name] = t.chunk(tp_size, dim=dim)[tp_rank].clone() if dim is not None else t.clone()
    return out


def unshard(shards: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge {(tp_rank, pp_rank): stage-local state dict} back into one full state dict; each stage's layer count
    is read off its own keys, so even and uneven pipeline stages merge alike."""
    tp_size = 1 + max(t for t, _ in shards)
    pp_size = 1 + max(p for _, p in shards)
    stages = [len({mt.group(1) for n in shards[(0, pp)] if (mt := _LAYER.match(n))}) for pp in range(pp_size)]
    offsets = stage_offsets(stages)
    full = {}
    for pp in range(pp_size):
        for name in shards[(0, pp)]:
            if name.endswith("_extra_state"):
                continue
            parts = [shards[(tp, pp)][name] for tp in range(tp_size)]
            dim = _split_dim(name)
            t = torch.cat(parts, dim=dim) if dim is not None else parts[0]
            mt = _LAYER.match(name)
            if mt:
                name = f"decoder.layers.{int(mt.group(1)) + offsets[pp]}.{mt.group(2)}"
            full[name] = t
    return full


def load_into(model: torch.nn.Module, local: dict[str, torch.Tensor]) -> None:
    """Load a stage-local state dict; Megatron's `_extra_state` buffers are left as they are."""
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={missing} unexpected={unexpected}")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters on the CPU, without `_extra_state` (unwraps DDP / Float16Module)."""
    while hasattr(model, "module"):
        model = model.module
    return {
        k: v.detach().float().cpu()
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
    }


# ------------------------------------------------------------------------------------------ HF export
def hf_config(m: ModelConfig, eos_token_id: int | None = None, bos_token_id: int | None = None):
    from transformers import CodeGenConfig  # transformers (seconds to import): only for an export

    return CodeGenConfig(
        vocab_size=m.vocab_size,
        n_positions=m.max_position_embeddings,
        n_ctx=m.max_position_embeddings,
        n_embd=m.hidden_size,
        n_layer=m.num_layers,
        n_head=m.num_attention_heads,
        rotary_dim=m.rotary_dim,
        n_inner=m.ffn_size,
        activation_function="gelu_new",
        layer_norm_epsilon=m.layernorm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def export_hf(
    full: dict[str, torch.Tensor],
    m: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    eos_token_id: int | None = None,
    specials: tuple[str, str] | None = None,
) -> Path:
    """Write a HF model directory that `CodeGenForCausalLM.from_pretrained(out_dir)` loads, with the tokenizer in
    `tokenizer_dir` when given; `specials` names its (eos, pad) tokens (the data contract's, which the model layer
    does not import: the caller passes them)."""
    if tokenizer_dir is not None and specials is None:
        raise ValueError("export_hf: a tokenizer_dir needs its specials (eos, pad)")
    from transformers import CodeGenForCausalLM  # transformers (seconds to import): only for an export

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = CodeGenForCausalLM(hf_config(m, eos_token_id=eos_token_id, bos_token_id=eos_token_id))
    missing, unexpected = model.load_state_dict(cglab_to_hf(full, m), strict=False)
    if unexpected or [k for k in missing if "masked_bias" not in k and "causal_mask" not in k]:
        raise KeyError(f"HF export mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        from transformers import PreTrainedTokenizerFast  # as above

        tok_file = Path(tokenizer_dir) / "tokenizer.json"
        eos, pad = specials
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=eos, pad_token=pad)
        tok.save_pretrained(out)
    (out / "cglab_model.json").write_text(json.dumps(m.model_dump(mode="json"), indent=1))
    return out

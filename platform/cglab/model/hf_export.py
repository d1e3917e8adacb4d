"""A Megatron distributed checkpoint's model weights as a HF CodeGenForCausalLM directory, in one process.

The checkpoint's own format (the COMPLETE marker, the manifest, which file holds the config) belongs to
`cglab.train.checkpoint`, which checks a directory and then calls `export_checkpoint` here; this module only
reads Megatron's tensors and converts them (`cglab.model.hf_convert`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from tokenizers import Tokenizer

from cglab.config import ModelConfig
from cglab.distributed import _free_port
from cglab.model.hf_convert import export_hf

_STACKED = "decoder.layers."


def full_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) cglab state dict in a Megatron dist checkpoint of any TP/PP layout: optimizer and
    `_extra_state` entries dropped, the stacked layers split into one entry per layer, float32."""
    own_group = not dist.is_initialized()
    if own_group:  # Megatron's loader speaks torch.distributed; a world of one is enough
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        plain = dist_checkpointing.load_plain_tensors(str(directory))
    finally:
        if own_group:
            dist.destroy_process_group()
    full = {}
    for k, v in plain.items():
        if not isinstance(v, torch.Tensor) or k.startswith("optimizer") or k.endswith("_extra_state"):
            continue
        k = k.removeprefix("model.")
        if k.startswith(_STACKED):  # layers are saved stacked along a leading layer axis
            rest = k[len(_STACKED) :]
            for i in range(v.shape[0]):
                full[f"{_STACKED}{i}.{rest}"] = v[i].float().clone()
        else:
            full[k] = v.float().clone()
    return full


def export_checkpoint(
    directory: str | Path,
    m: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    specials: tuple[str, str] | None = None,
) -> Path:
    """Write the checkpoint's model as a HF directory, with the tokenizer in `tokenizer_dir` when it has one and
    it holds `specials` (eos, pad)."""
    full = full_state_dict(directory)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    eos = None
    if tok is not None and specials is not None and (tok / "tokenizer.json").is_file():
        eos = Tokenizer.from_file(str(tok / "tokenizer.json")).token_to_id(specials[0])
    if eos is None:
        tok = None
    return export_hf(full, m, out_dir, tokenizer_dir=tok, eos_token_id=eos, specials=specials)

"""`model.init_from`: start a run from released weights, a HF CodeGen directory or a cglab checkpoint.

    src = inspect(path)                  # what the directory holds: format, shape, tokenizer (driver, cheap)
    errors = shape_errors(cfg.model, src)  # every shape field that differs, named (`cglab plan`, fit's checks)
    tok = load_tokenizer(cfg)            # the tokenizer that came with the weights, checked against the vocabulary
    load_weights(model, cfg)             # each worker: its TP x PP slice, before DDP and the optimizer see the model

Only reading the weights happens on the workers; everything that can be wrong is found on the driver first (the
plan's errors, which `fit` refuses on, and the tokenizer load in `prepare_data`), from config.json or
trainer_state.json and the tokenizer file.

A HF directory is converted with cglab.model.hf_convert (qkv block layout, rotary permutation) one pipeline stage at
a time: tensors are read lazily (safetensors, or a memory-mapped pytorch_model.bin), so a worker holds its stage of
the released weights, not the whole model. A cglab checkpoint is read with Megatron's dist_checkpointing into this
run's own sharded state dict, which reshards any TP x PP layout the checkpoint was written with; only the weights are
read, so the optimizer, the LR schedule and the data position start fresh.

Full precision: `load_weights` also returns the weights as the source holds them, in fp32, for the optimizer's main
params (`cglab.compat.seed_main_params`): a bf16 run's parameters are their rounding, and Megatron would otherwise
build its fp32 copy from that rounding. A HF directory's values are its tensors'; a bf16 run's checkpoint holds
the optimizer's fp32 copy (`MASTER_KEY`), which is read instead of its bf16 weights (their rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cglab.config import CGLabConfig, ConfigError, ModelConfig, ParallelConfig, pipeline_stages

# The tokenizer that comes with the weights is a data concern (prepare_data loads it): defined in data.tokenizer.
from cglab.data.tokenizer import (
    CKPT_STATE,
    HF_CONFIG,
    INIT_FROM,
    added_tokens,
    load_tokenizer,  # noqa: F401
    some_tokens,
    tokenizer_file,
    weights_tokenizer,
)
from cglab.model.hf_convert import MP_NUM, hf_to_cglab, load_into, shard, stage_offsets
from cglab.train.checkpoint import IncompleteCheckpoint, verify

FIELD = INIT_FROM
# Where both of Megatron's mixed-precision optimizers save the fp32 main params, keyed by the model's sharded keys.
MASTER_KEY = "optimizer.state.fp32_param"
# In the order transformers prefers them; the index files name the shards of a split checkpoint.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# The ModelConfig fields the weights fix, with HF CodeGen's config.json name for each.
SHAPE = {
    "num_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "rotary_dim": "rotary_dim",
    "vocab_size": "vocab_size",
    "ffn_hidden_size": "n_inner",
    "layernorm_epsilon": "layer_norm_epsilon",
}


@dataclass(frozen=True)
class Source:
    """What a `model.init_from` directory holds."""

    path: Path
    kind: str  # "hf" | "cglab"
    weights: str  # the weight files (HF) or the checkpoint's step and layout (cglab)
    shape: dict[str, Any]  # SHAPE field -> the weights' value (ffn_hidden_size resolved to its width)
    tokenizer: Path | None  # the tokenizer.json that came with the weights
    tie_embeddings: bool = False  # HF: lm_head.weight may be absent, being wte's

    def describe(self) -> str:
        what = "HF CodeGen" if self.kind == "hf" else "cglab checkpoint"
        return f"{what} {self.path} ({self.weights})"


def inspect(path: str | Path) -> Source:
    """Read what `path` holds (config.json or trainer_state.json and the file names only, no weights); ConfigError
    naming model.init_from when it is neither a HF CodeGen directory nor a complete cglab checkpoint."""
    d = Path(path).expanduser().resolve()
    if not d.is_dir():
        raise ConfigError(f"{FIELD}: {path!r} is not a directory")
    if (d / CKPT_STATE).is_file():
        return _inspect_cglab(d)
    if (d / HF_CONFIG).is_file():
        return _inspect_hf(d)
    raise ConfigError(
        f"{FIELD}: {d} is neither a HF CodeGen directory ({HF_CONFIG} + weights) nor a cglab "
        f"checkpoint ({CKPT_STATE}); for a run directory, name one of its checkpoint_* directories"
    )


def _inspect_hf(d: Path) -> Source:
    try:
        hc = json.loads((d / HF_CONFIG).read_text())
    except ValueError as err:
        raise ConfigError(f"{FIELD}: {d / HF_CONFIG} is not valid JSON ({err})") from None
    if hc.get("model_type") != "codegen":
        raise ConfigError(
            f"{FIELD}: {d / HF_CONFIG} has model_type={hc.get('model_type')!r}; only HF CodeGen "
            f"(CodeGenForCausalLM, model_type 'codegen') weights can be converted"
        )
    if hc.get("activation_function", "gelu_new") != "gelu_new":
        raise ConfigError(
            f"{FIELD}: {d / HF_CONFIG} has activation_function={hc['activation_function']!r}; "
            f"cglab's CodeGen block is gelu_new (tanh)"
        )
    if hc.get("rotary_dim") is None:
        raise ConfigError(
            f"{FIELD}: {d / HF_CONFIG} has no rotary_dim (HF then rotates all of n_embd); "
            f"cglab supports partial rotary within a head only"
        )
    files = [f for f in HF_WEIGHTS if (d / f).is_file()]
    if not files:
        raise ConfigError(f"{FIELD}: {d} has {HF_CONFIG} but no weights (looked for {', '.join(HF_WEIGHTS)})")
    shape = {ours: hc.get(theirs) for ours, theirs in SHAPE.items()}
    shape["ffn_hidden_size"] = shape["ffn_hidden_size"] or 4 * shape["hidden_size"]
    shape["layernorm_epsilon"] = shape["layernorm_epsilon"] if shape["layernorm_epsilon"] is not None else 1e-5
    tok = weights_tokenizer(d)
    return Source(d, "hf", files[0], shape, tok if tok.is_file() else None, bool(hc.get("tie_word_embeddings", False)))


def _inspect_cglab(d: Path) -> Source:
    try:
        manifest = verify(d)
        doc = json.loads((d / CKPT_STATE).read_text())
        m = ModelConfig.model_validate(doc["config"]["model"])
        par = doc["config"].get("parallel", {})
    except IncompleteCheckpoint as err:
        raise ConfigError(f"{FIELD}: not a complete checkpoint: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{FIELD}: {d / CKPT_STATE} has no readable model config ({err})") from None
    shape = {k: getattr(m, k) for k in SHAPE}
    shape["ffn_hidden_size"] = m.ffn_size
    layout = (
        f"step {doc.get('step')}, written at TP{par.get('tensor_model_parallel_size', 1)} x "
        f"PP{par.get('pipeline_model_parallel_size', 1)} by {manifest['world_size']} ranks"
    )
    tok = weights_tokenizer(d)
    return Source(d, "cglab", layout, shape, tok if tok.is_file() else None)


def shape_errors(m: ModelConfig, src: Source) -> list[str]:
    """'model.<field>: ...' for every shape field of the config that differs from the weights'."""
    ours = {k: getattr(m, k) for k in SHAPE}
    ours["ffn_hidden_size"] = m.ffn_size
    errors = []
    for field, theirs in src.shape.items():
        if ours[field] != theirs:
            where = f"{HF_CONFIG} {SHAPE[field]}" if src.kind == "hf" else CKPT_STATE
            errors.append(
                f"model.{field}: {ours[field]} in this config, but the weights of {FIELD}={src.path} have "
                f"{theirs} ({where}); set model.{field}={theirs}"
            )
    if src.kind == "hf" and m.num_attention_heads % MP_NUM:
        errors.append(
            f"model.num_attention_heads: {m.num_attention_heads}; HF CodeGen's qkv_proj layout needs a "
            f"multiple of {MP_NUM}"
        )
    return errors


# ---------------------------------------------------------------------------------------------- the plan
def plan_entry(cfg: CGLabConfig, errors: list[str], warnings: list[str]) -> dict:
    """Where the run's weights come from, for `cglab plan` and plan.json; appends what a run would refuse."""
    if not cfg.model.init_from:
        return {"weights": f"random initialisation (train.seed={cfg.train.seed})"}
    try:
        src = inspect(cfg.model.init_from)
    except ConfigError as err:
        errors.append(str(err))
        return {"weights": f"{cfg.model.init_from} (unreadable, see errors)"}
    errors += shape_errors(cfg.model, src)
    p = cfg.parallel
    out = {
        "weights": src.describe(),
        "into": f"TP{p.tensor_model_parallel_size} x PP{p.pipeline_model_parallel_size}, "
        + ("converted from HF's layout and " if src.kind == "hf" else "")
        + "sharded as each worker builds its model",
        "fresh": "optimizer state, LR schedule (warmup from 0), data position (step 0)",
    }
    try:
        found, tok = tokenizer_file(cfg), load_tokenizer(cfg)
    except ConfigError:
        return out  # the run's tokenizer load (the plan's data scan, prepare_data) reports it
    out["tokenizer"] = f"{found[1]} ({found[0]})"
    added = added_tokens(found[1], tok) if found[0] == FIELD else []
    if added:
        warnings.append(
            f"{FIELD}: {len(added)} tokens added to the weights' tokenizer for cglab's data contract "
            f"({some_tokens(added)}); their embedding rows were not trained for them"
        )
    return out


# ---------------------------------------------------------------------------------------------- the workers
def load_weights(model: torch.nn.Module, cfg: CGLabConfig) -> dict[str, torch.Tensor]:
    """Load model.init_from's weights into this rank's model chunk (built, not yet wrapped in DDP or given to the
    optimizer); returns them by state-dict name in fp32 as the source holds them, which a bf16 model only rounds,
    for the optimizer's main params. {} when init_from is unset."""
    if not cfg.model.init_from:
        return {}

    src = inspect(cfg.model.init_from)
    errors = shape_errors(cfg.model, src)
    if errors:  # the driver's plan refuses these first; a direct caller gets the same words
        raise ConfigError("; ".join(errors))
    local = _hf_local(src, cfg.model, cfg.parallel, model) if src.kind == "hf" else _cglab_local(src, model)
    load_into(model, local)  # copied into the model's dtype: bf16 rounds, the returned values do not
    return {k: v.float() for k, v in local.items()}


def _cglab_local(src: Source, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's tensors from a cglab checkpoint of any layout: Megatron reshards into our sharded state dict
    (collective: every rank of the run calls it). `_extra_state` objects are left as built. From a checkpoint
    with the optimizer's fp32 main params (a bf16 run's `checkpoint.save`), those; else its weights."""
    # Megatron: only to load weights, not to inspect them (`cglab plan`)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    saved = dist_checkpointing.load_tensors_metadata(str(src.path))
    if all(f"{MASTER_KEY}.{v.key}" in saved for v in sharded.values()):
        sharded = {
            k: make_sharded_optimizer_tensor(v, torch.empty_like(v.data, dtype=torch.float32), MASTER_KEY)
            for k, v in sharded.items()
        }
    loaded = dist_checkpointing.load(sharded, str(src.path))
    return {k: loaded[k] for k in sharded}  # the checkpoint's common state (the optimizer's) comes back too


def _hf_local(src: Source, m: ModelConfig, p: ParallelConfig, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's slice of a HF CodeGen: its pipeline stage's layers converted (hf_to_cglab on a stage-sized
    config, layers renumbered from 0 as Megatron numbers them per stage), then its TP slice (shard)."""
    # Megatron: only to load weights, not to inspect them (`cglab plan`)
    from megatron.core import parallel_state as ps

    pp_rank = ps.get_pipeline_model_parallel_rank()
    stages = pipeline_stages(m.num_layers, p)  # even or uneven, as build_model split them
    stage = m.model_copy(update={"num_layers": stages[pp_rank]})
    full = hf_to_cglab(_StageView(HFTensors(src), stage_offsets(stages)[pp_rank]), stage)
    local = shard(full, stage, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    want = model.state_dict().keys()  # the first stage has the embedding, the last the head; load_into checks
    return {k: v for k, v in local.items() if k in want}


class _StageView:
    """HF keys with the layers renumbered: transformer.h.i here is transformer.h.(first + i) in the weights."""

    def __init__(self, tensors: HFTensors, first: int):
        self.tensors, self.first = tensors, first

    def __getitem__(self, key: str) -> torch.Tensor:
        if key.startswith("transformer.h."):
            i, rest = key[len("transformer.h.") :].split(".", 1)
            key = f"transformer.h.{int(i) + self.first}.{rest}"
        return self.tensors[key]


class HFTensors:
    """A HF weights directory's tensors by name, read when asked: safetensors files lazily, pytorch_model.bin
    memory-mapped; split checkpoints through their index file."""

    def __init__(self, src: Source):
        self.src = src
        d, f = src.path, src.path / src.weights
        self._bins: dict[Path, dict] = {}  # pytorch_model*.bin, memory-mapped once each
        if src.weights.endswith(".index.json"):
            self.where = {k: d / name for k, name in json.loads(f.read_text())["weight_map"].items()}
        elif src.weights.endswith(".safetensors"):
            with safe_open(str(f), "pt") as sf:
                self.where = {k: f for k in sf.keys()}
        else:
            self._bins[f] = self._bin(f)
            self.where = {k: f for k in self._bins[f]}

    @staticmethod
    def _bin(path: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.where and key == "lm_head.weight" and self.src.tie_embeddings:
            key = "transformer.wte.weight"  # tied: saved once, as the embedding
        if key not in self.where:
            raise KeyError(f"{FIELD}: {self.src.path} has no tensor {key!r}")
        f = self.where[key]
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as sf:
                return sf.get_tensor(key)
        if f not in self._bins:
            self._bins[f] = self._bin(f)
        return self._bins[f][key]

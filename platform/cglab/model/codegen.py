"""The CodeGen2 model on Megatron-Core: config translation, construction, and the attention mask it is fed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from cglab import compat
from cglab.config import ModelConfig, ParallelConfig, pipeline_stages
from cglab.decisions import ModelDecisions
from cglab.model import fused
from cglab.model.hf_convert import stage_offsets
from cglab.model.init import init_weights
from cglab.model.masks import attention_mask, block_mask
from cglab.model.spec import codegen_block_spec, codegen_layer_spec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """CodeGen's "gelu_new"."""
    return F.gelu(x, approximate="tanh")


def transformer_config(
    m: ModelConfig, p: ParallelConfig, bf16: bool = False, decisions: ModelDecisions | None = None
) -> TransformerConfig:
    """decisions: the run's (None: resolved for m on this machine)."""
    d = decisions or ModelDecisions.resolve(m, p)
    dtype = torch.bfloat16 if bf16 else torch.float32
    # On GPU, Megatron's fused bias+gelu and cross-entropy kernels. Its fused "gelu" is the tanh approximation
    # (CodeGen's gelu_new) and is selected by activation_func == F.gelu, so F.gelu here still means gelu_tanh.
    fuse = d.fused_kernels
    stages = pipeline_stages(m.num_layers, p)
    uneven = len(set(stages)) > 1  # Megatron's first/last-stage counts; the stages between split the rest evenly
    return TransformerConfig(
        num_layers=m.num_layers,
        num_layers_in_first_pipeline_stage=stages[0] if uneven else None,
        num_layers_in_last_pipeline_stage=stages[-1] if uneven else None,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.head_dim,
        layernorm_epsilon=m.layernorm_epsilon,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu if fuse else gelu_tanh,
        bias_activation_fusion=fuse,
        cross_entropy_loss_fusion=fuse,
        cross_entropy_fusion_impl="native",
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # cglab.model.init does it, independently of the parallel layout
        # Fusions need CUDA kernels (and apex); the parallel-residual layer does its own bias/dropout/add.
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=d.wgrad_fusion,
        rotary_interleaved=False,
        recompute_granularity=d.recompute.granularity,
        recompute_method=d.recompute.method,
        recompute_num_layers=d.recompute.num_layers,
        recompute_modules=list(d.recompute.modules) or None,
    )


class CodeGenModel(GPTModel):
    """GPTModel with CodeGen's untied LM head *with bias* (GPTModel's head has none). compile_loss: at TP=1, the
    per-token loss through cglab.model.fused.cross_entropy (compiled on GPU) instead of Megatron's. `decisions`:
    what it was built with, so that what feeds it (forward_logits) masks for the backend it really has."""

    def __init__(
        self, config: TransformerConfig, compile_loss: bool = False, decisions: ModelDecisions | None = None, **kwargs
    ):
        super().__init__(config, **kwargs)
        self.decisions = decisions
        self.compile_loss = compile_loss and config.tensor_model_parallel_size == 1
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=True,
                skip_bias_add=False,
                gather_output=not self.parallel_output,
                tp_group=self.pg_collection.tp,
            )

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.compile_loss:
            return fused.cross_entropy(logits, labels)
        return super().compute_language_model_loss(labels, logits)


def build_model(
    m: ModelConfig,
    p: ParallelConfig,
    *,
    bf16: bool = False,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    seed: int = 1234,
    decisions: ModelDecisions | None = None,
) -> CodeGenModel:
    """One pipeline stage of the model for this rank (parallel_state must be initialised), initialised from `seed`
    identically whatever the TP x PP layout. decisions: the run's (None: resolved for m on this machine)."""
    d = decisions or ModelDecisions.resolve(m, p)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    cfg = transformer_config(m, p, bf16=bf16, decisions=d)
    stages, pp_rank = pipeline_stages(m.num_layers, p), parallel_state.get_pipeline_model_parallel_rank()
    if cfg.gradient_accumulation_fusion:
        compat.apply("wgrad")  # before the linear layers check for Apex's extension
    model = CodeGenModel(
        cfg,
        compile_loss=d.compile_loss,
        decisions=d,
        transformer_layer_spec=codegen_block_spec(
            codegen_layer_spec(d.attention_backend, d.fuse_attention, m.sdpa_kernel), stages[pp_rank]
        ),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=m.rotary_dim / m.head_dim,
        rotary_base=10000,
    )
    if torch.cuda.is_available():
        model = model.cuda()
    offset = stage_offsets(stages)[pp_rank]
    layers = model.decoder.layers
    # init, sharding and checkpoints number layers by cglab's split; Megatron must have built the same stage
    if len(layers) != stages[pp_rank] or layers[0].layer_number != offset + 1:
        raise RuntimeError(
            f"pipeline stage {pp_rank}: Megatron-Core built layers {layers[0].layer_number}.."
            f"{layers[-1].layer_number} (1-based), cglab's split {stages} says {offset + 1}..{offset + stages[pp_rank]}"
        )
    init_weights(model, m, seed, parallel_state.get_tensor_model_parallel_rank(), p.tensor_model_parallel_size, offset)
    return model


def batch_mask(
    m: ModelConfig, shape: tuple[int, int], segment_ids=None, prefix_end=None, device=None, backend: str | None = None
):
    """The attention mask the config asks for a [b, s] batch (a dense bool mask or a FlexAttention BlockMask), or
    None for plain causal on a backend that does it natively. prefix_end: [b, s] per token (the data's field) or
    [b] per row (see `cglab.model.masks.allowed`). backend: the model's resolved attention backend (None: resolve
    m's here; a run passes its decision)."""
    b, s = shape
    seg = segment_ids if m.document_masking else None
    pre = prefix_end if m.architecture == "prefix_lm" else None
    if backend is None:
        backend = ModelDecisions.resolve(m).attention_backend
    if seg is None and pre is None and backend in ("sdpa", "te", "flex"):
        return None
    if backend == "flex" and torch.device(device or "cpu").type == "cuda":  # FlexAttention has no CPU backward
        return block_mask(seg, pre, seq_len=s, batch=b, device=device)
    return attention_mask(seg, pre, seq_len=s, batch=b, device=device)


def forward_logits(model, m: ModelConfig, tokens: torch.Tensor, segment_ids=None, prefix_end=None) -> torch.Tensor:
    """Logits [b, s, vocab/TP] of one (single-stage) model."""
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    backend = model.decisions.attention_backend
    return model(tokens, pos, batch_mask(m, tuple(tokens.shape), segment_ids, prefix_end, tokens.device, backend))

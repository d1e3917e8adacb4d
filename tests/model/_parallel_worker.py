"""Runs in spawned processes: one forward/backward of the tiny model at a given TP x PP, results to a file."""

import torch
import torch.distributed as dist


def fwd_bwd(rank, tp, pp, full_path, batches_path, out_path, overrides, save_to=None):
    """full_path: a full state dict to shard in (None: the weights the config builds, e.g. model.init_from's);
    save_to: a directory every rank can reach, to write the loaded weights as a cglab checkpoint (model only)."""
    from megatron.core import parallel_state as ps

    from cglab.config import from_dict
    from cglab.distributed import init_parallel
    from cglab.model.hf_convert import load_into, model_state, shard, unshard
    from cglab.train.step import build_train_state, forward_backward, reduce_stats

    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            *overrides,
        ],
    )
    init_parallel(tp, pp)
    state = build_train_state(cfg)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    inner = state.model[0].module
    if full_path is not None:
        load_into(inner, shard(torch.load(full_path), cfg.model, tp_rank, tp, pp_rank, cfg.pipeline_stages))
    if save_to is not None:
        from cglab.train import checkpoint

        checkpoint.save_model(save_to, state, 0, extra={"config": cfg.model_dump(mode="json")})
    stats = forward_backward(state, cfg, torch.load(batches_path))
    loss = reduce_stats(stats)
    grads = {n: p.main_grad.detach().float().clone() for n, p in inner.named_parameters()}
    everything_layers = [None] * dist.get_world_size()  # (pp rank, layers Megatron built there)
    dist.all_gather_object(everything_layers, (pp_rank, len(inner.decoder.layers)))
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, ((tp_rank, pp_rank), grads, model_state(inner)))
    if rank == 0:
        g = unshard({k: v for k, v, _ in everything})
        w = unshard({k: v for k, _, v in everything})
        # which block the config built, so a test comparing two configs can check they really differ
        layer = inner.decoder.layers[0]
        built = {
            "attention": type(layer.self_attention).__name__,
            "fused_residual": layer.fused_residual,
            "compile_loss": inner.compile_loss,
        }
        stages = [n for _, n in sorted(dict(everything_layers).items())]  # the layers Megatron built per stage
        # sequence parallelism as built: Megatron's flag, and every layer norm marked for its TP grad all-reduce
        norms = [p for n, p in inner.named_parameters() if "layernorm" in n]
        sp = inner.config.sequence_parallel and all(getattr(p, "sequence_parallel", False) for p in norms)
        out = {"loss": loss, "grads": g, "weights": w, "built": built, "stages": stages, "sequence_parallel": sp}
        torch.save(out, out_path)

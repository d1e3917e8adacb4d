"""A checkpoint's size and write time, planned against the preemption grace (issue 27, item 4).

A cglab checkpoint holds, per GPU, the model's weights of its shard (2 bytes a parameter in bf16, 4 in fp32) and the
optimizer's state of its shard (fp32 main params + Adam's two moments: 12 bytes a parameter in bf16, 8 in fp32,
split over DP by the distributed optimizer), from the memory plan's parameters on the busiest GPU. A 7B model in bf16
is ~14 bytes a parameter in all: ~98 GB.

The write time is an ESTIMATE from two assumed bandwidths, per node (the GPUs of a node share its disk and its
network): the local staging write (NVMe, STAGE_GBPS) and Ray Train's copy of it to storage (an object store,
UPLOAD_GBPS). A preemption's stop must fit in `train.preempt_grace_s`: the step in progress, a background write
still in flight (train.async_save), and its own checkpoint written and copied. `cglab plan` warns when it cannot.
"""

from __future__ import annotations

from cglab.config import CGLabConfig

STAGE_GBPS = 2.0  # GB/s a node writes to its local staging disk (one NVMe, shared by its GPUs)
UPLOAD_GBPS = 1.0  # GB/s a node uploads to object storage (S3 from an 8-GPU node; less on a shared link)
GPUS_PER_NODE = 8  # the recipes' nodes (clusters/aws-p5.yaml: p5.48xlarge, 8 x H100)


def checkpoint_plan(
    cfg: CGLabConfig, params_per_gpu: int, params_total: int, async_save: bool, step_s: float | None
) -> dict:
    """Size on the busiest GPU and in all, the stop's write time on the busiest node, and whether the grace
    covers it."""
    p, t = cfg.parallel, cfg.train
    bf16 = t.precision == "bf16"
    weights, state = (2, 12) if bf16 else (4, 8)
    shard = p.data_parallel_size if p.use_distributed_optimizer else 1
    per_gpu = params_per_gpu * (weights + state / shard)
    total = params_total * (weights + state)  # one copy of each (DP replicas write theirs once)
    gpus_on_node = min(cfg.world_size, GPUS_PER_NODE) if p.use_gpu else 1
    node_gb = per_gpu * gpus_on_node / 1e9
    write_s = node_gb / STAGE_GBPS + node_gb / UPLOAD_GBPS
    # the stop waits for a write in flight (at worst a whole one) before writing its own
    stop_s = (step_s or 0.0) + write_s * (2 if async_save else 1)
    return {
        "gb_per_gpu": round(per_gpu / 1e9, 3),
        "gb_total": round(total / 1e9, 3),
        "write_s": round(write_s, 1),
        "stop_s": round(stop_s, 1),
        "preempt_grace_s": t.preempt_grace_s,
        "fits_grace": stop_s <= t.preempt_grace_s,
        "method": (
            f"ESTIMATE: per node ({gpus_on_node} GPU(s)) {node_gb:.1f} GB staged at {STAGE_GBPS:g} GB/s and copied to "
            f"storage at {UPLOAD_GBPS:g} GB/s; a stop = one step + "
            + ("a write in flight + its own" if async_save else "its own write")
        ),
    }


def grace_warning(plan: dict) -> str | None:
    if plan["fits_grace"]:
        return None
    return (
        f"train.preempt_grace_s={plan['preempt_grace_s']:g}: a preemption's stop needs ~{plan['stop_s']:.0f} s "
        f"({plan['gb_per_gpu']:.1f} GB per GPU, {plan['gb_total']:.0f} GB in all; {plan['method']}); raise the "
        f"grace to what the cluster's preemption notice allows (e.g. a spot VM's 120 s), or shard the checkpoint "
        f"further (DP with the distributed optimizer)"
    )

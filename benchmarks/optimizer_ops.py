"""Megatron's multi-tensor optimizer ops without Apex/TE: its local per-parameter loops vs cglab.compat.foreach,
on the parameter list of a preset (the tensors the Float16 optimizer touches every step), in one run.

    PYTHONPATH=platform python benchmarks/optimizer_ops.py [--preset small] [--reps 20]

Rows: the gradient L2 norm (clip_grads.get_grad_norm_fp32's kernel), the in-place clip scale, and the fp32 main ->
bf16 model parameter copy after the optimizer step. Times are medians in ms; on GPU every row ends with a sync, which
the local norm also does once per parameter inside.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def param_shapes(preset: str) -> list[tuple[int, ...]]:
    """The shapes of the model's parameters (TP=1), in the order a model lists them."""
    from cglab.config import PRESETS

    p = PRESETS[preset]
    d, L, V = p["hidden_size"], p["num_layers"], p["vocab_size"]
    layer = [(d,), (d,), (3 * d, d), (d, d), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(V, d)] + layer * L + [(d,), (d,), (V, d), (V,)]


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return 1000 * statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="default: codegen2-1B on GPU, small on CPU")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    preset = args.preset or ("codegen2-1B" if cuda else "small")
    from cglab import compat
    from cglab.compat import foreach

    compat.apply("cpu")  # CPU only: Megatron's local norm builds its result with device="cuda"
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = param_shapes(preset)
    g = torch.Generator(device=dev).manual_seed(0)
    grads = [torch.randn(s, device=dev, generator=g) for s in shapes]
    main_params = [torch.randn(s, device=dev, generator=g) for s in shapes]
    model_params = [torch.empty(s, device=dev, dtype=torch.bfloat16) for s in shapes]
    n = sum(t.numel() for t in grads)
    ops = {
        "grad L2 norm": (
            lambda: local_multi_tensor_l2_norm(0, None, [grads], False),
            lambda: foreach.l2_norm(0, None, [grads], False),
        ),
        "clip: scale grads in place": (
            lambda: local_multi_tensor_scale(0, None, [grads, grads], 0.999),
            lambda: foreach.scale(0, None, [grads, grads], 0.999),
        ),
        "copy fp32 main -> bf16 model": (
            lambda: local_multi_tensor_scale(0, None, [main_params, model_params], 1.0),
            lambda: foreach.scale(0, None, [main_params, model_params], 1.0),
        ),
    }
    name = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, preset {preset}: {len(shapes)} tensors, {n / 1e6:.1f} M params")
    print(f"{'op':32s} {'Megatron local ms':>18s} {'foreach ms':>11s} {'speed-up':>9s}")
    for op, (local, ours) in ops.items():
        a, b = timed(local, args.reps, sync), timed(ours, args.reps, sync)
        print(f"{op:32s} {a:>18.2f} {b:>11.2f} {a / b:>8.1f}x")


if __name__ == "__main__":
    main()

"""Training throughput of cglab (Megatron-Core CodeGen, our train step) beside HF CodeGen eager and torch.compile,
measured in one run on one GPU. Prints one JSON line per case and a table at the end.

    PYTHONPATH=platform python benchmarks/train_throughput.py [--preset codegen2-1B] [--steps 20] [--cases ...]

Model FLOPs per token = 6·(12·L·d² + V·d) + 12·L·d·S (design.md §3). MFU is cglab.train.flops.mfu, the training
loop's metric: against the datasheet dense bf16 peak (989 TFLOP/s on an H100/H200). A second column gives the same
model FLOP/s as a fraction of the bf16 8192³ matmul peak measured in this run.
Tokens are synthetic (uniform random ids): this measures the model step, not the data pipeline
(benchmarks/data_pipeline.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_codegen_baseline as hfb  # noqa: E402

# case name -> config overrides (all cglab cases share the rest)
CASES = {
    # the defaults: compiled glue + loss (model.compile_fusions), wgrad accumulated into the fp32 main grads
    # (model.wgrad_fusion), SDPA for causal / FlexAttention for document masks (auto backend), foreach optimizer ops
    "cglab": [],
    # 1/tokens grad scaling and the clip as two passes over the fp32 grads (Megatron's own) instead of inside fused
    # AdamW's kernel (train.fold_grad_scale, on by default on GPU)
    "cglab-nofold": ["train.fold_grad_scale=false"],
    "cglab-nowgrad": ["model.wgrad_fusion=false"],
    "cglab-nofusions": ["model.compile_fusions=false", "model.wgrad_fusion=false"],
    "cglab-unfused": [
        "model.compile_fusions=false",
        "model.wgrad_fusion=false",
        "model.fused_kernels=false",
        "train.fused_adam=false",
    ],
    "cglab-distopt": ["parallel.distributed_optimizer=true"],
    "cglab-flash": ["model.sdpa_kernel=flash"],
    "cglab-cudnn": ["model.sdpa_kernel=cudnn"],
    "cglab-docmask": ["model.document_masking=true"],  # FlexAttention block masks on GPU
    "cglab-sdpa-docmask": ["model.attention_backend=sdpa", "model.document_masking=true"],  # dense [b,1,s,s] mask
}


def case_config(preset: str, mb: int, seq: int, overrides: list[str], n_micro: int):
    """A case's config: the preset's shape, bf16 on one GPU, then the case's overrides (which win, model shape too)."""
    from cglab.config import from_dict

    return from_dict(
        {},
        [
            f"model.preset={preset}",
            "parallel.use_gpu=true",
            "train.precision=bf16",
            f"data.seq_length={seq}",
            f"train.micro_batch_size={mb}",
            f"train.global_batch_size={mb * n_micro}",
            "train.train_steps=1000",
            "model.document_masking=false",
            "train.warmup_steps=10",
            # synthetic batches, no objective runs: nothing to size data.num_sentinels for at this length
            "objective.kind=clm",
            *overrides,
        ],
    )


def cglab_case(preset: str, mb: int, seq: int, overrides: list[str], n_micro: int):
    from cglab.distributed import init_parallel
    from cglab.train.step import build_train_state

    cfg = case_config(preset, mb, seq, overrides, n_micro)
    doc_mask = cfg.model.document_masking
    init_parallel(1, 1)
    state = build_train_state(cfg)
    V = cfg.model.vocab_size
    batches = []
    for _ in range(n_micro):
        tok = torch.randint(0, V, (mb, seq))
        seg = torch.zeros(mb, seq, dtype=torch.long)
        if doc_mask:  # four documents per row
            seg = torch.arange(seq).div(seq // 4, rounding_mode="floor").expand(mb, seq).contiguous()
        batches.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": torch.ones(mb, seq),
                "segment_ids": seg,
                "objective": torch.zeros(mb, dtype=torch.long),
            }
        )
    timing = {"fwd_bwd": [], "opt": []}

    from cglab.train import step as st

    def one():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = st.forward_backward(state, cfg, batches)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        st.optimizer_step(state)
        state.scheduler.step(increment=1)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        timing["fwd_bwd"].append(t1 - t0)
        timing["opt"].append(t2 - t1)
        return stats

    return one, mb * seq * n_micro, timing, cfg


KINDS = [  # CUDA kernel name (lower case) -> what it is; first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "lpnorm")),
]


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in KINDS if any(k in n for k in keys)), "other")


def profile_step(step, case: str, top: int = 15):
    """CUDA time of one step by kernel kind, and the top kernels: what bounds the step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events) / 1e3
    by_kind: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total / 1e3
    print(
        json.dumps(
            {
                "profile": case,
                "cuda_ms": round(total, 1),
                **{k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            }
        ),
        flush=True,
    )
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"  {e.device_time_total / 1e3:8.2f} ms {e.count:5d}x {kernel_kind(e.key):9s} {e.key[:110]}", flush=True)


def result_row(
    case: str,
    tokens_per_s: float,
    model_cfg,
    seq_len: int,
    measured_peak_tflops: float | None = None,
    datasheet_peak_tflops: float | None = None,
) -> dict:
    """One GPU's row for `tokens_per_s`. `mfu` comes from cglab.train.flops.mfu, as the training loop's live metric
    does, so the tables and the dashboards quote one number (datasheet_peak_tflops None: this GPU's datasheet peak;
    no known peak: None). `of_measured_peak` is the same model FLOP/s over the matmul peak measured in this run."""
    from cglab.train import flops

    tf = flops.model_tflops(tokens_per_s, model_cfg, seq_len)
    mfu = flops.mfu(tokens_per_s, model_cfg, seq_len, 1, datasheet_peak_tflops)
    return {
        "case": case,
        "tokens_per_s": round(tokens_per_s),
        "tflops": round(tf, 1),
        "mfu": None if mfu is None else round(mfu, 4),
        "of_measured_peak": round(tf / measured_peak_tflops, 4) if measured_peak_tflops else None,
    }


TABLE_HEADER = (
    f"{'case':40s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU(datasheet)':>14s} {'of-measured-peak':>16s} "
    f"{'mem GB':>7s} {'fwd+bwd ms':>10s} {'opt ms':>7s}"
)


def table_line(r: dict) -> str:
    """The printed table's line for a result_row (plus mem_gb and, for cglab cases, the step's phases)."""
    if r.get("error"):
        return f"{r['case']:40s} ERROR"
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731  (no datasheet peak for this GPU)
    return (
        f"{r['case']:40s} {r['tokens_per_s']:>10,d} {r['tflops']:>8.1f} {pct(r['mfu']):>14s} "
        f"{pct(r.get('of_measured_peak')):>16s} {r.get('mem_gb', ''):>7} {r.get('fwd_bwd_ms', ''):>10} "
        f"{r.get('optimizer_ms', ''):>7}"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="codegen2-1B")
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro", type=int, default=1, help="micro-batches per step (grad accumulation)")
    ap.add_argument(
        "--profile",
        default="",
        help="comma-separated cases to profile one step of (CUDA kernel time "
        "by kind: GEMM, attention, optimizer, other; and the top kernels)",
    )
    ap.add_argument(
        "--cases", default="cglab,cglab-nofold,cglab-nowgrad,cglab-nofusions,cglab-docmask,cglab-sdpa-docmask,hf,hfc"
    )
    return ap


def main():
    args = parser().parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    hfb.PEAK = hfb.measure_peak()
    from cglab.config import PRESETS, ModelConfig
    from cglab.train.flops import device_peak_tflops

    print(
        json.dumps({"measured_matmul_peak_tflops": round(hfb.PEAK, 1), "datasheet_peak_tflops": device_peak_tflops()}),
        flush=True,
    )

    p = PRESETS[args.preset]
    d, L, H, V, rot = p["hidden_size"], p["num_layers"], p["num_attention_heads"], p["vocab_size"], p["rotary_dim"]
    S = args.seq
    fpt = hfb.flops_per_token(d, L, S, V)
    row = functools.partial(
        result_row, model_cfg=ModelConfig(preset=args.preset), seq_len=S, measured_peak_tflops=hfb.PEAK
    )
    rows = []
    for case in args.cases.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            if case.startswith("cglab"):
                step, tokens, timing, _ = cglab_case(
                    args.preset, args.mb, S, CASES[case.split("@")[0]], n_micro=args.micro
                )
                r = hfb.bench(
                    step, tokens, fpt, f"{case}-{args.preset}-mb{args.mb}x{args.micro}", n=args.steps, row=row
                )
                med = lambda xs: sorted(xs[3:])[len(xs[3:]) // 2]  # noqa: E731  (after the warm-up steps)
                r["fwd_bwd_ms"] = round(1000 * med(timing["fwd_bwd"]), 1)
                r["optimizer_ms"] = round(1000 * med(timing["opt"]), 1)
                print(json.dumps(r), flush=True)
                if case in args.profile.split(","):
                    try:
                        profile_step(step, case)
                    except Exception:  # a profiler hiccup must not cost the measured row
                        traceback.print_exc()
            else:
                step = hfb.hf_codegen(d, L, H, S, V, args.mb, rot, compile_=(case == "hfc"), n_micro=args.micro)
                r = hfb.bench(
                    step,
                    args.mb * S * args.micro,
                    fpt,
                    f"{case}-{args.preset}-mb{args.mb}x{args.micro}",
                    n=args.steps,
                    row=row,
                )
            rows.append(r)
        except Exception:
            traceback.print_exc()
            rows.append({"case": case, "error": True})
        step = None
        import gc

        gc.collect()
    print("\n" + TABLE_HEADER)
    for r in rows:
        print(table_line(r))


if __name__ == "__main__":
    main()
